"""The two angular privacy constraints of the paper, symmetric in the two genders.

P1 = arccos(<c_0, c_1>), c_g the L2-normalised mean of the batch's templates of gender g.
P2 = mean_{i: g_i=0} arccos(<z_i, w_1>) + mean_{i: g_i=1} arccos(<z_i, w_0>), w_g the L2-normalised mean of the
L2-normalised header columns of the training identities of gender g.
A batch without one of the genders has no P1 (it contributes 0) and no half of P2 for the missing gender.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["PrivacyTerms", "gender_weight_centroids", "privacy_terms", "COS_EPS"]

COS_EPS = 1e-6  # cosines are clamped to [-1+eps, 1-eps]: arccos has an infinite slope at +-1


class PrivacyTerms(NamedTuple):
    p1: torch.Tensor
    p2: torch.Tensor
    single_gender: bool


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))


def gender_weight_centroids(kernel: torch.Tensor, identity_gender: torch.Tensor) -> torch.Tensor:
    """(2, D): w_0 and w_1 from the header kernel (D, n_identities) and each identity's gender (0/1)."""
    cols = F.normalize(kernel, dim=0)
    w = torch.stack([cols[:, identity_gender == g].mean(dim=1) for g in (0, 1)])
    return F.normalize(w, dim=1)


def privacy_terms(z: torch.Tensor, gender: torch.Tensor, kernel: torch.Tensor,
                  identity_gender: torch.Tensor) -> PrivacyTerms:
    """P1 and P2 of a batch of templates ``z`` (B, D; normalised inside) with genders ``gender`` (B,)."""
    z = F.normalize(z, dim=1)
    masks = [gender == 0, gender == 1]
    present = [bool(mk.any()) for mk in masks]
    zero = z.sum() * 0.0
    if all(present):
        c = F.normalize(torch.stack([z[mk].mean(dim=0) for mk in masks]), dim=1)
        p1 = _angle((c[0] * c[1]).sum())
    else:
        p1 = zero
    w = gender_weight_centroids(kernel, identity_gender)
    p2 = zero
    for g in (0, 1):
        if present[g]:
            p2 = p2 + _angle(z[masks[g]] @ w[1 - g]).mean()
    return PrivacyTerms(p1, p2, not all(present))
