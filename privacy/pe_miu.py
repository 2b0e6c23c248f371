"""PE-MIU, privacy enhancement by minimum information units (Terhörst, Riehl, Damer, Rot, Bortolato, Kirchbuchner,
Struc, Kuijper, "PE-MIU: A Training-Free Privacy-Enhancing Face Recognition Approach Based on Minimum Information
Units", IEEE Access 2020).

Training-free. A template is cut into blocks of ``pe_miu.block_size`` values (the minimum information units) and the
blocks are put in a random order drawn for that template, so a dimension's meaning differs from template to
template and an attribute classifier trained on fixed dimensions loses its footing. Comparison undoes the shuffle:
the blocks of one template are assigned to the blocks of the other by the optimal assignment (scipy's
``linear_sum_assignment``), and the templates are compared in that alignment (squared Euclidean distance of the
unit templates, [0, 4]; it does not depend on either template's order). The assignment's cost is, as in the
authors' ``reconstruct``, the Euclidean distance between blocks (``pe_miu.cost=euclidean``, the default);
``pe_miu.cost=squared`` minimises squared block distances instead, which for unit templates is maximising the summed
block inner products: a cheaper cost that can pick another assignment when blocks are close to equidistant.

The order of a template is drawn from a generator seeded by ``seed`` and the template's position in the batch:
like an enrolment, which draws one random key per enrolled template, the two views of an image (t(x) and t(flip x),
passed in the same order as the evaluation does) share their order, and the order says nothing of the face.
One checkpoint (step 1): the block size and the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from config.options import option
from privacy.base import register_method, FitContext, PathMethod, checkpoint_tensor
from utils.errors import UserError

__all__ = ["PEMIU", "PEMIUOptions", "BlockPermutation", "aligned_similarity"]


COSTS = ("euclidean", "squared")


def aligned_similarity(a_blocks: np.ndarray, b_blocks: np.ndarray, cost: str = "euclidean") -> np.ndarray:
    """(M, B, b) blocks of M first and M second templates -> (M,) summed inner products of the blocks paired by
    the assignment of least total cost: Euclidean block distances, or squared ones (max inner products)."""
    sims = np.einsum("mik,mjk->mij", a_blocks, b_blocks)
    if cost == "euclidean":
        sq = (a_blocks ** 2).sum(-1)[:, :, None] + (b_blocks ** 2).sum(-1)[:, None, :] - 2 * sims
        costs = np.sqrt(np.clip(sq, 0.0, None))
    elif cost == "squared":
        costs = -sims
    else:
        raise ValueError(f"unknown PE-MIU assignment cost {cost!r}; one of {COSTS}")
    out = np.empty(len(sims))
    for k in range(len(sims)):
        rows, cols = linear_sum_assignment(costs[k])
        out[k] = sims[k, rows, cols].sum()
    return out


def _unit_blocks(t: np.ndarray, block_size: int) -> np.ndarray:
    """(N, D) templates, L2-normalised, as (N, D / block_size, block_size) blocks."""
    t = np.asarray(t, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return t.reshape(len(t), -1, block_size)


class BlockPermutation(nn.Module):
    """Each template's blocks in an order of its own; with its own comparison (``pair_distances``, ``similarity``)
    that re-aligns the blocks."""
    block_size: torch.Tensor   # buffers (in the checkpoint)
    seed: torch.Tensor

    def __init__(self, block_size: int, seed: int, cost: str = "euclidean"):
        super().__init__()
        self.register_buffer("block_size", torch.tensor(int(block_size)))
        self.register_buffer("seed", torch.tensor(int(seed)))
        self.cost = cost          # a setting of the run (pe_miu.cost), not of the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        b = int(self.block_size)
        if d % b:
            raise ValueError(f"template size {d} is not a multiple of the block size {b}")
        keys = torch.rand(n, d // b, generator=torch.Generator().manual_seed(int(self.seed)))
        order = keys.argsort(dim=1).to(x.device)
        return x.reshape(n, d // b, b).gather(1, order[..., None].expand(-1, -1, b)).reshape(n, d)

    def pair_distances(self, ver: np.ndarray) -> np.ndarray:
        """(2P, D) templates in consecutive pairs -> (P,) squared Euclidean distances after optimal block alignment."""
        blocks = _unit_blocks(ver, int(self.block_size))
        return np.clip(2.0 - 2.0 * aligned_similarity(blocks[0::2], blocks[1::2], self.cost), 0.0, 4.0)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(Na, Nb) cosine similarities of templates a (Na, D) and b (Nb, D), each pair optimally block-aligned."""
        ba, bb = _unit_blocks(a, int(self.block_size)), _unit_blocks(b, int(self.block_size))
        return np.stack([aligned_similarity(np.broadcast_to(blocks, bb.shape), bb, self.cost) for blocks in ba])


@dataclass
class PEMIUOptions:
    block_size: int = option(16, "size of the permuted blocks; must divide embedding_size", ge=1)
    cost: str = option("euclidean", "block assignment cost: euclidean (the authors' reconstruct) or squared",
                       choices=COSTS)


@register_method("pe_miu", options=PEMIUOptions,
                 help="PE-MIU: training-free permutation of minimum information units (Terhörst et al.)")
class PEMIU(PathMethod):
    comparison = "PE-MIU block assignment"

    def run_name(self) -> str:
        return f"pe_miu_{self.opts.block_size}b"

    def check(self) -> None:
        super().check()
        b, d = self.opts.block_size, self.cfg.embedding_size
        if d % b or d // b < 2:
            raise UserError(f"config option pe_miu.block_size={b} must divide the template size (embedding_size "
                            f"{d}) into at least two blocks, e.g. 8, 16, 32 or 64 for 512.")

    def path(self, ctx: FitContext) -> Iterator[tuple[int, nn.Module]]:
        b, d = self.opts.block_size, self.cfg.embedding_size
        ctx.log.info("pe_miu: %d blocks of %d values, permuted per template (training-free)", d // b, b)
        yield 1, BlockPermutation(b, self.cfg.seed, self.opts.cost)

    def build_transform(self, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        b = checkpoint_tensor(state, "block_size", path, self.name)
        seed = checkpoint_tensor(state, "seed", path, self.name)
        d = self.cfg.embedding_size
        if b.numel() != 1 or seed.numel() != 1 or int(b) < 1 or d % int(b):
            raise UserError(f"pe_miu checkpoint '{path}' holds block size {b.tolist()}, which does not divide "
                            f"embedding_size {d}. Set embedding_size to the backbone the run used, or remove the file.")
        return BlockPermutation(int(b), int(seed), self.opts.cost)
