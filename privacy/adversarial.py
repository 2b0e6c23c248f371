"""Adversarial gender suppression: the paper's privacy layer trained with the identity loss against a gender
adversary through gradient reversal (the family of SensitiveNets, Morales et al., IEEE TPAMI 2021, and PASS, Dhar
et al., ICCV 2021; gradient reversal as in Ganin & Lempitsky, ICML 2015).

z = normalize(layer(normalize(backbone(x)))) feeds the same identity header as the paper's method (CE) and, through
a gradient-reversal layer, a small gender classifier (Linear -> ReLU -> Linear, ``adversarial.hidden`` units). The
adversary minimises its cross-entropy; the reversed gradient, scaled by ``adversarial.weight``, makes the layer
maximise it while keeping identities apart. Checkpoints are the paper's ``{step}ftn_layers.pth`` and
``{step}header.pth``, so the sweep treats them as it treats the paper's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass

from config.config import Config
from config.options import option
from privacy.base import register_method, FitContext
from privacy.layer_training import IdentityObjective, LayerMethod, Objective

__all__ = ["Adversarial", "AdversarialOptions", "AdversarialObjective", "reverse_gradient"]


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -weight backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """x unchanged; what flows back through it is -weight times the gradient (Ganin & Lempitsky's layer)."""
    return _ReverseGradient.apply(x, weight)


@dataclass
class AdversarialOptions:
    weight: float = option(1.0, "weight of the reversed gradient of the gender adversary", ge=0)
    hidden: int = option(256, "hidden units of the adversary (Linear-ReLU-Linear)", ge=1)


class AdversarialObjective(IdentityObjective):
    """CE(header(z), id) + CE(adversary(reverse(z)), gender): the header and the adversary descend their own loss,
    the layer descends CE and ascends the adversary's loss, weighted by ``adversarial.weight``."""

    def __init__(self, cfg: Config, n_identities: int, opts: AdversarialOptions):
        super().__init__(cfg, n_identities)
        self.adversary = nn.Sequential(nn.Linear(cfg.embedding_size, opts.hidden), nn.ReLU(),
                                       nn.Linear(opts.hidden, 2))
        self.weight = float(opts.weight)

    def forward(self, z: torch.Tensor, ids: torch.Tensor, genders: torch.Tensor,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        ce = self.identity_loss(z, ids, generator)
        logits = self.adversary(reverse_gradient(z, self.weight))
        genders = genders.long()
        adv = F.cross_entropy(logits, genders)
        accuracy = (logits.argmax(dim=1) == genders).to(z.dtype).mean()
        return {"ce": ce, "adv": adv, "adv_acc": accuracy, "loss": ce + adv}

    def describe(self, terms: dict[str, float]) -> str:
        return (f"CE {terms['ce']:.4f}  adversary CE {terms['adv']:.4f}  adversary accuracy "
                f"{100 * terms['adv_acc']:.1f}% (chance 50%)  loss {terms['loss']:.4f}")


@register_method("adversarial", options=AdversarialOptions,
                 help="the privacy layer trained against a gender adversary by gradient reversal")
class Adversarial(LayerMethod):
    def run_name(self) -> str:
        return f"adversarial_{self.opts.weight}w_{self.opts.hidden}h"

    def objective(self, ctx: FitContext) -> Objective:
        return AdversarialObjective(self.cfg, ctx.index.num_identities, self.opts)
