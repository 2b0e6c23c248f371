"""Train/test overlap: training images that are near-duplicates of evaluation images (same photograph re-encoded,
resized or mirrored) make that set's numbers optimistic. .bin files carry no names, so images are compared by the
cosine of their cached backbone templates, in chunks of CHUNK_ROWS rows per side (bounded memory). Used by training
(a warning in its log) and by tools/check_overlap.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from eval.evalset import EvalTemplates
from templates.entry import Templates
from facedata.dataset import TrainIndex

__all__ = ["DEFAULT_THRESHOLD", "Overlap", "best_matches", "find_overlap", "eval_image_name", "describe",
           "warn_overlap"]

DEFAULT_THRESHOLD = 0.95
CHUNK_ROWS = 2048          # per side of one matrix product: at most (2 x 2048) x 2048 float32 similarities (32 MB)
EXAMPLES = 3               # pairs named in a log line
CSV_COLUMNS = ["Dataset", "Training image", "Identity", "Evaluation image", "Cosine"]


@dataclass
class Overlap:
    """The training images with a near-duplicate in one evaluation set, with their best match."""
    target: str
    threshold: float
    train_images: np.ndarray    # indices into the training index
    eval_images: np.ndarray     # index of the best-matching image of the set (pair images, then gender images)
    cosine: np.ndarray
    identities: int             # distinct training identities among them

    def __len__(self) -> int:
        return len(self.train_images)


def best_matches(train: np.ndarray, probe: np.ndarray, chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each training image (N, 2, D: as is, mirrored), the highest cosine of either template with any of the
    probe's (M, D) unit templates, and that probe's index; chunked matrix products, memory bounded by ``chunk``."""
    n = train.shape[0]
    best = np.full(n, -np.inf, dtype=np.float32)
    arg = np.zeros(n, dtype=np.int64)
    for i in range(0, n, chunk):
        a = np.asarray(train[i:i + chunk], dtype=np.float32)
        rows = a.shape[0]
        a = a.reshape(2 * rows, -1)
        for j in range(0, probe.shape[0], chunk):
            sims = (a @ np.asarray(probe[j:j + chunk], dtype=np.float32).T).reshape(rows, 2, -1).max(axis=1)
            k = sims.argmax(axis=1)
            value = sims[np.arange(rows), k]
            better = value > best[i:i + rows]
            best[i:i + rows][better] = value[better]
            arg[i:i + rows][better] = j + k[better]
    return best, arg


def find_overlap(index: TrainIndex, templates: Templates, ev: EvalTemplates,
                 threshold: float = DEFAULT_THRESHOLD) -> Overlap:
    """The training images whose template has a cosine of at least ``threshold`` with an image of ``ev``."""
    best, arg = best_matches(templates.templates, ev.templates.templates[:, 0])
    hit = np.flatnonzero(best >= threshold)
    order = hit[np.argsort(-best[hit], kind="stable")]
    return Overlap(ev.name, threshold, order, arg[order], best[order], len(np.unique(index.labels[order])))


def eval_image_name(ev: EvalTemplates, j: int) -> str:
    """An evaluation image as the .bin holds it: bins[j] (verification pairs) or bins_gender[j] (gender test)."""
    n = ev.num_pair_images
    return f"{ev.name}.bin bins[{j}]" if j < n else f"{ev.name}.bin bins_gender[{j - n}]"


def describe(index: TrainIndex, ev: EvalTemplates, overlap: Overlap) -> str:
    """One log line: what was found in ``ev``, with the closest pairs."""
    if not len(overlap):
        return (f"overlap check: no training image is a near-duplicate (cosine >= {overlap.threshold}) of an image "
                f"of {ev.name}.bin")
    examples = "; ".join(f"{index.paths[i]} ~ {eval_image_name(ev, int(j))} ({c:.3f})" for i, j, c in
                         zip(overlap.train_images[:EXAMPLES], overlap.eval_images[:EXAMPLES], overlap.cosine))
    return (f"overlap check: {len(overlap)} training images of {overlap.identities} identities are near-duplicates "
            f"(cosine >= {overlap.threshold}) of images of {ev.name}.bin, e.g. {examples}. Those identities make "
            f"{ev.name}'s verification and gender numbers optimistic: leave them out of the training set "
            f"(tools/check_overlap.py --csv lists every pair) or evaluate on another set.")


def warn_overlap(log: logging.Logger, index: TrainIndex, templates: Templates | None,
                 val_sets: Sequence[EvalTemplates], threshold: float = DEFAULT_THRESHOLD) -> None:
    """Training's check: a warning per validation set that near-duplicates training images (cached templates)."""
    if templates is None or not val_sets:
        log.info("overlap check skipped (%s); tools/check_overlap.py checks the test_targets",
                 "cache=False: no cached templates" if templates is None else "no validation sets: eval_step=0")
        return
    for ev in val_sets:
        overlap = find_overlap(index, templates, ev, threshold)
        (log.warning if len(overlap) else log.info)(describe(index, ev, overlap))
