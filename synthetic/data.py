"""Synthetic face-template populations for the demo, the tests and the benchmark (nothing is downloaded).

Each identity has a centre on the unit sphere with a gender component along one fixed direction; an image's
template is its identity's centre plus isotropic noise, painted into a 112x112 PNG that the demo backbone
(synthetic.backbone.TemplateDecoder) reads back. The numbers these give are synthetic, not the paper's.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from synthetic.backbone import TemplateDecoder, encode_template


def population(n_ids: int, dim: int, rng: np.random.Generator, gender_strength: float,
               gender_direction: np.ndarray, basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Identity centres (n_ids, dim) and genders (n_ids,), half of each gender.

    With ``basis`` (dim, r), identities vary in that r-dimensional subspace only (as face templates occupy a
    small part of the sphere), so identities seen in training cover the space of unseen ones."""
    genders = np.arange(n_ids) % 2
    rng.shuffle(genders)
    u = rng.normal(size=(n_ids, dim if basis is None else basis.shape[1]))
    u = u if basis is None else u @ basis.T
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    centres = u + gender_strength * np.where(genders[:, None] == 1, 1.0, -1.0) * gender_direction[None]
    return centres / np.linalg.norm(centres, axis=1, keepdims=True), genders


def identity_basis(dim: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthonormal (dim, rank) basis."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, rank)))
    return q


def sample_templates(centre: np.ndarray, n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """n templates around ``centre``: normalize(centre + spread * noise), noise of unit expected norm."""
    noise = rng.normal(size=(n, centre.shape[0])) / np.sqrt(centre.shape[0])
    t = centre[None] + spread * noise
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def write_identity_folders(root: Path, centres: np.ndarray, genders: np.ndarray, images_per_id: int, spread: float,
                           rng: np.random.Generator, first_id: int = 0) -> None:
    """One ``{id:05d}_{gender}`` folder per identity with ``images_per_id`` PNG faces."""
    for k, (c, g) in enumerate(zip(centres, genders)):
        folder = root / f"{first_id + k:05d}_{int(g)}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, t in enumerate(sample_templates(c, images_per_id, spread, rng)):
            img = encode_template(t, rng)
            cv2.imwrite(str(folder / f"{j:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def save_demo_backbone(path: Path, dim: int = 512) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(TemplateDecoder(dim).state_dict(), path)
