"""The paper's method: a privacy layer trained with CE + alpha * P1 + beta * P2 (Rezgui et al., TBIOM 2024).

z = normalize(layer(normalize(backbone(x)))); CE from an identity header (ArcFace-style, s=64, m=0 by default);
P1 the angle between the batch's two gender centroids; P2 the angle between each gender's templates and the other
gender's mean identity weight (losses/privacy.py). Checkpoints are the authors' ``{step}ftn_layers.pth`` and
``{step}header.pth``, so their released layers sweep like ours.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from config.config import Config
from losses import privacy_terms
from privacy.base import register_method, FitContext
from privacy.layer_training import IdentityObjective, LayerMethod, Objective


class AngularObjective(IdentityObjective):
    """CE(header(z), id) + alpha * P1 + beta * P2; also reports whether the batch held one gender only."""

    def __init__(self, cfg: Config, n_identities: int, identity_gender: np.ndarray | torch.Tensor):
        super().__init__(cfg, n_identities)
        self.register_buffer("identity_gender", torch.as_tensor(identity_gender), persistent=False)
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)

    def forward(self, z, ids, genders, generator):
        ce = self.identity_loss(z, ids, generator)
        t = privacy_terms(z, genders, self.header.kernel, self.identity_gender)
        loss = ce + self.alpha * t.p1 + self.beta * t.p2
        return {"ce": ce, "p1": t.p1, "p2": t.p2, "loss": loss, "single_gender": t.single_gender.to(loss.dtype)}

    def describe(self, terms: dict[str, float]) -> str:
        return (f"CE {terms['ce']:.4f}  P1 {math.degrees(terms['p1']):.2f} deg  P2 {terms['p2']:.4f}  "
                f"loss {terms['loss']:.4f}  single-gender batches {100 * terms['single_gender']:.1f}%")


@register_method("angular",
                 help="the paper's privacy layer: identity loss + alpha * P1 + beta * P2 (angular constraints)")
class Angular(LayerMethod):
    settings_options = ("alpha", "beta")

    def run_name(self) -> str:
        return f"{self.cfg.alpha}L1_{self.cfg.beta}L2"   # the authors' folder name

    def objective(self, ctx: FitContext) -> Objective:
        return AngularObjective(self.cfg, ctx.index.num_identities, ctx.index.identity_gender)
