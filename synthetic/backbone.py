"""A backbone for the synthetic demo and the tests: it reads a template written into the image's pixels.

``encode_template`` paints each template value into a 4x4 cell of a 112x112 image and into the mirrored
cell, so a horizontal flip keeps the template; ``TemplateDecoder`` average-pools the cells, symmetrises them
and applies a linear read-out. It is a real ``nn.Module`` loaded from a weights file, so the demo runs the
production decoding, extraction, caching, training and evaluation code; only the faces are synthetic.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["TemplateDecoder", "demo_decoder", "encode_template", "DEMO_VMAX"]

DEMO_VMAX = 0.25   # template values are clipped to [-DEMO_VMAX, DEMO_VMAX] when painted
_CELL = 4
_GRID = 112 // _CELL  # 28 x 28 cells per channel
_HALF = _GRID // 2    # 14 unique columns once mirrored


def _slots(dim: int) -> np.ndarray:
    """Flat (channel, row, col<14) slot of each template component."""
    if dim > 3 * _GRID * _HALF:
        raise ValueError(f"the demo decoder holds at most {3 * _GRID * _HALF} values")
    return np.arange(dim)


def encode_template(template: np.ndarray, rng: np.random.Generator, pixel_noise: float = 2.0) -> np.ndarray:
    """Paint ``template`` (D,) into a 112x112x3 uint8 RGB image, mirrored left-right, with pixel noise."""
    dim = template.shape[0]
    cells: np.ndarray = np.zeros(3 * _GRID * _HALF, dtype=np.float64)
    cells[_slots(dim)] = np.clip(template, -DEMO_VMAX, DEMO_VMAX) / DEMO_VMAX
    cells = cells.reshape(3, _GRID, _HALF)
    cells = np.concatenate([cells, cells[:, :, ::-1]], axis=2)                    # (3, 28, 28) mirrored
    img = np.kron(cells, np.ones((_CELL, _CELL)))                                 # (3, 112, 112) in [-1, 1]
    img = 127.5 + 127.5 * img + rng.normal(0.0, pixel_noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)


class TemplateDecoder(nn.Module):
    def __init__(self, num_features: int = 512):
        super().__init__()
        self.num_features = num_features
        self.readout = nn.Linear(3 * _GRID * _HALF, num_features)
        with torch.no_grad():
            self.readout.weight.zero_()
            self.readout.weight[torch.arange(num_features), torch.as_tensor(_slots(num_features))] = DEMO_VMAX
            self.readout.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = F.avg_pool2d(x, _CELL)                         # (B, 3, 28, 28)
        sym = 0.5 * (cells + cells.flip(-1))[..., :_HALF]      # flip-invariant half
        return self.readout(torch.flatten(sym, 1))


def demo_decoder(num_features: int = 512, **_: object) -> TemplateDecoder:
    return TemplateDecoder(num_features)


def seeded_weights(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for a state dict's keys and shapes, drawn key by key in sorted order from one generator
    (the golden backbone file's weights: tests and bench rebuild them from keys and a seed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state):
        t = state[key]
        if not t.is_floating_point():
            out[key] = t.clone()
        elif key.endswith("running_var"):
            out[key] = torch.empty(t.shape).uniform_(0.5, 2.0, generator=g)
        elif t.dim() >= 2:
            out[key] = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        elif key.endswith("weight"):
            out[key] = torch.empty(t.shape).uniform_(0.5, 1.5, generator=g)
        else:
            out[key] = 0.1 * torch.randn(t.shape, generator=g)
    return out
