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
    single_gender: torch.Tensor   # 0-dim bool tensor: the batch holds one gender only


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))


def gender_weight_centroids(kernel: torch.Tensor, identity_gender: torch.Tensor) -> torch.Tensor:
    """(2, D): w_0 and w_1 from the header kernel (D, n_identities) and each identity's gender (0/1).

    The normalised mean of unit columns is the normalised sum; a one-hot product avoids boolean indexing (which
    would wait for the GPU on every step)."""
    cols = F.normalize(kernel, dim=0)
    onehot = F.one_hot(identity_gender.long(), 2).to(cols.dtype)     # (n_identities, 2)
    return F.normalize((cols @ onehot).T, dim=1)


def privacy_terms(z: torch.Tensor, gender: torch.Tensor, kernel: torch.Tensor,
                  identity_gender: torch.Tensor) -> PrivacyTerms:
    """P1 and P2 of a batch of templates ``z`` (B, D; normalised inside) with genders ``gender`` (B,).

    Computed with masks as weights, without data-dependent control flow, so the GPU is never waited for."""
    z = F.normalize(z, dim=1)
    masks = F.one_hot(gender.long(), 2).to(z.dtype).T                # (2, B)
    counts = masks.sum(dim=1)                                         # (2,)
    both = (counts > 0).all()
    c = F.normalize(masks @ z, dim=1)                                 # gender centroids (a missing one is 0)
    p1 = torch.where(both, _angle((c[0] * c[1]).sum()), torch.zeros((), dtype=z.dtype, device=z.device))
    w = gender_weight_centroids(kernel, identity_gender)
    to_other = _angle(z @ w.flip(0).T)                                # (B, 2): column g = angle to w_{1-g}
    per_gender = (masks * to_other.T).sum(dim=1) / counts.clamp(min=1)
    return PrivacyTerms(p1, per_gender.sum(), ~both)
