"""LEACE, least-squares concept erasure (Belrose, Schneider-Joseph, Ravfogel, Cotterell, Raff, Biderman, "LEACE:
Perfect linear concept erasure in closed form", NeurIPS 2023), with the authors' package ``concept-erasure``.

The closed-form affine map x -> x - W^+ P W (x - mu) (W the whitening of the templates' covariance, P the
projection onto the whitened cross-covariance with gender) makes the two genders' mean templates equal, so no
linear classifier does better than a constant on the data it was fit on, while moving templates the least in the
least-squares sense. Fit on the training set's unflipped cached templates (streamed in chunks, so memory stays
O(D^2)); one checkpoint (step 1). As in the package's defaults, the covariance estimate is shrunk towards a scaled
identity (its ``shrinkage=True``, a Ledoit-Wolf-type estimate that keeps the whitening stable when D is large
against the number of templates), so the eraser is the formula above with that estimate; ``leace.shrinkage=False``
uses the plain sample covariance.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from concept_erasure import LeaceFitter
from torch import nn

from config.options import option
from privacy.base import register_method, FitContext, PathMethod, checkpoint_tensor
from utils.errors import UserError

__all__ = ["LEACE", "LEACEOptions", "AffineErasure"]

CHUNK = 1 << 16   # templates per statistics update


class AffineErasure(nn.Module):
    """x -> x - ((x - bias) R^T) L^T: the LEACE eraser stored as its two (D, k) / (k, D) factors and the mean."""
    proj_left: torch.Tensor   # buffers (in the checkpoint)
    proj_right: torch.Tensor
    bias: torch.Tensor

    def __init__(self, proj_left: torch.Tensor, proj_right: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("proj_left", torch.as_tensor(proj_left, dtype=torch.float32))
        self.register_buffer("proj_right", torch.as_tensor(proj_right, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - ((x - self.bias) @ self.proj_right.T) @ self.proj_left.T


@dataclass
class LEACEOptions:
    shrinkage: bool = option(True, "shrink the covariance estimate (concept-erasure's default)")


@register_method("leace", options=LEACEOptions,
                 help="LEACE: closed-form least-squares concept erasure of gender (Belrose et al.)")
class LEACE(PathMethod):
    def path(self, ctx: FitContext) -> Iterator[tuple[int, nn.Module]]:
        templates, genders = ctx.cached(), torch.as_tensor(ctx.index.genders, dtype=torch.float64)
        fitter = LeaceFitter(templates.templates.shape[2], 1, dtype=torch.float64, shrinkage=self.opts.shrinkage)
        for start in range(0, len(templates), CHUNK):
            sl = slice(start, start + CHUNK)
            fitter.update(templates.normalized(sl, 0).double(), genders[sl])
        eraser = fitter.eraser
        ctx.log.info("leace: fitted on %d templates; the eraser changes the identity map by rank %d", len(templates),
                     int(torch.linalg.matrix_rank(eraser.proj_left)))
        yield 1, AffineErasure(eraser.proj_left, eraser.proj_right, eraser.bias)

    def build_transform(self, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        left, right, bias = (checkpoint_tensor(state, k, path, self.name) for k in ("proj_left", "proj_right", "bias"))
        d = self.cfg.embedding_size
        fits = left.ndim == 2 and left.shape[0] == d and tuple(right.shape) == (left.shape[1], d)
        if not fits or tuple(bias.shape) != (d,):
            raise UserError(f"leace checkpoint '{path}' holds factors of shapes {tuple(left.shape)}, "
                            f"{tuple(right.shape)} and a bias of {tuple(bias.shape)}, which do not fit embedding_size "
                            f"{d}. Set embedding_size to the backbone the run was trained on, or remove the file.")
        return AffineErasure(left, right, bias)
