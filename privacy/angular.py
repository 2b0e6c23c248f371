"""The paper's method: a privacy layer trained with CE + alpha * P1 + beta * P2 (Rezgui et al., TBIOM 2024).

z = normalize(layer(normalize(backbone(x)))); CE from an identity header (ArcFace-style, s=64, m=0 by default);
P1 the angle between the batch's two gender centroids; P2 the angle between each gender's templates and the other
gender's mean identity weight (losses/privacy.py). Checkpoints are the authors' ``{step}ftn_layers.pth`` and
``{step}header.pth``, so their released layers sweep like ours.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from backbones import load_projection
from losses import get_header, privacy_terms
from privacy.base import FitContext, FitResult, PrivacyMethod
from privacy.layer_training import Objective, train_layer


class AngularObjective(Objective):
    """CE(header(z), id) + alpha * P1 + beta * P2; also reports whether the batch held one gender only."""

    def __init__(self, cfg, n_identities: int, identity_gender: torch.Tensor):
        super().__init__()
        self.header = get_header(cfg.loss, cfg.embedding_size, n_identities, cfg.s, cfg.m, cfg.sigma)
        self.register_buffer("identity_gender", torch.as_tensor(identity_gender), persistent=False)
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)

    def forward(self, z, ids, genders, generator):
        ce = F.cross_entropy(self.header(z, ids, generator), ids)
        t = privacy_terms(z, genders, self.header.kernel, self.identity_gender)
        loss = ce + self.alpha * t.p1 + self.beta * t.p2
        return {"ce": ce, "p1": t.p1, "p2": t.p2, "loss": loss, "single_gender": t.single_gender.to(loss.dtype)}

    def describe(self, terms: dict[str, float]) -> str:
        return (f"CE {terms['ce']:.4f}  P1 {math.degrees(terms['p1']):.2f} deg  P2 {terms['p2']:.4f}  "
                f"loss {terms['loss']:.4f}  single-gender batches {100 * terms['single_gender']:.1f}%")

    def checkpoint_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"header.pth": self.header.state_dict()}


class Angular(PrivacyMethod):
    name = "angular"
    checkpoint_suffix = "ftn_layers.pth"
    trains_in_loop = True
    settings_options = ("alpha", "beta")
    varied_options = ("lr", "headid_lr", "batch_size", "num_epoch", "n_hidden", "loss", "s", "m", "sigma", "grad_clip",
                      "seed")

    def run_name(self) -> str:
        return f"{self.cfg.alpha}L1_{self.cfg.beta}L2"   # the authors' folder name

    def fit(self, ctx: FitContext) -> FitResult:
        return train_layer(self, ctx, lambda: AngularObjective(self.cfg, ctx.index.num_identities,
                                                             ctx.index.identity_gender))

    def load_transform(self, path: Path) -> nn.Module:
        return load_projection(path, self.cfg.embedding_size, self.cfg.n_hidden)
