"""Face-verification metrics of the insightface protocol, as the authors' evaluation computes them.

Distances are squared Euclidean between L2-normalised templates; 10 folds without shuffle; the ROC is taken
at thresholds 0, 0.01, ..., 3.99 on each test split and averaged over folds; EER is the root of
1 - x - interp(FPR, TPR)(x); TAR@FAR=1e-3 uses thresholds 0, 0.001, ..., 3.999 and, per fold, the threshold at
which the training split's FAR reaches 1e-3 (linear interpolation), measured on the test split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from sklearn.model_selection import KFold

from utils.errors import UserError

ROC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
N_FOLDS = 10
FAR_TARGET = 1e-3


GRID_STEP = 0.01          # the ROC grid's step (ROC_THRESHOLDS)
FEW_GRID_STEPS = 5        # central 90% of the pair distances within fewer steps than this: the grid EER is unreliable


@dataclass
class VerificationResult:
    eer: float
    tar: float
    accuracy: float
    tpr: np.ndarray
    fpr: np.ndarray


@dataclass(frozen=True)
class ScoreDiagnostics:
    """What the protocol's grid cannot see: the threshold-free EER and the ROC AUC of all pair scores, how many grid
    steps the central 90% of the pair distances span, and the templates' spread (median impostor angle)."""
    eer_exact: float
    auc: float
    grid_steps: float
    impostor_angle: float

    @property
    def below_grid(self) -> bool:
        """The pair distances fall mostly within a few grid steps: the protocol's EER and TAR then mostly measure
        the grid, not the templates (compare eer_exact)."""
        return self.grid_steps < FEW_GRID_STEPS


def pair_distances(templates: np.ndarray) -> np.ndarray:
    """(2P, D) templates in consecutive pairs -> (P,) squared Euclidean distances after L2 normalisation."""
    t = np.asarray(templates, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return np.sum(np.square(t[0::2] - t[1::2]), axis=1)


def _counts_below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many distances are strictly below it (np.less, exactly)."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def _rates(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray):
    same, diff = dist[issame], dist[~issame]
    tp = _counts_below(same, thresholds)
    fp = _counts_below(diff, thresholds)
    return tp, fp, len(same), len(diff)


def check_folds(issame: np.ndarray, name: str = "evaluation set", n_folds: int = N_FOLDS) -> None:
    """Every fold needs genuine and impostor pairs (the authors' code divides by zero otherwise)."""
    if len(issame) < n_folds:
        raise UserError(f"{name} has {len(issame)} pairs; the protocol's {n_folds} folds need at least {n_folds}.")
    for k, (_, test) in enumerate(KFold(n_splits=n_folds, shuffle=False).split(issame)):
        for split, idx in (("test", test), ("training", np.setdiff1d(np.arange(len(issame)), test))):
            if issame[idx].all() or not issame[idx].any():
                kind = "impostor" if issame[idx].all() else "genuine"
                raise UserError(f"{name}: fold {k + 1} of {n_folds} has no {kind} pair in its {split} split (pairs "
                                f"are split into {n_folds} consecutive blocks without shuffling). Interleave genuine "
                                f"and impostor pairs, as tools/make_bin.py does.")


def evaluate_verification(templates: np.ndarray, issame: np.ndarray, name: str = "evaluation set"
                          ) -> VerificationResult:
    """EER, TAR@FAR=0.1% and accuracy of (2P, D) pair templates, the authors' protocol exactly."""
    return verification_from_distances(pair_distances(templates), issame, name)


def verification_from_distances(dist: np.ndarray, issame: np.ndarray, name: str = "evaluation set"
                                ) -> VerificationResult:
    """The protocol on (P,) pair distances in [0, 4] (squared Euclidean between unit templates, or a method's own
    comparison on that scale)."""
    issame = np.asarray(issame, dtype=bool)
    dist = np.asarray(dist, dtype=np.float64)
    if not np.all(np.isfinite(dist)):
        raise UserError(f"{name}: templates contain NaN or infinite values; the model's output is broken.")
    check_folds(issame, name)
    folds = list(KFold(n_splits=N_FOLDS, shuffle=False).split(np.arange(len(issame))))
    tprs = np.zeros((N_FOLDS, len(ROC_THRESHOLDS)))
    fprs = np.zeros_like(tprs)
    accuracy = np.zeros(N_FOLDS)
    tars = np.zeros(N_FOLDS)
    for k, (train, test) in enumerate(folds):
        # ROC on the test split; accuracy at the training split's best threshold
        tp, fp, n_same, n_diff = _rates(ROC_THRESHOLDS, dist[train], issame[train])
        acc_train = (tp + (n_diff - fp)) / len(train)
        best = ROC_THRESHOLDS[int(np.argmax(acc_train))]
        tp, fp, n_same, n_diff = _rates(ROC_THRESHOLDS, dist[test], issame[test])
        tprs[k], fprs[k] = tp / n_same, fp / n_diff
        pred = dist[test] < best
        accuracy[k] = np.mean(pred == issame[test])
        # TAR at FAR = 1e-3: threshold from the training split, rates on the test split
        _, fp, _, n_diff = _rates(VAL_THRESHOLDS, dist[train], issame[train])
        far_train = fp / n_diff
        if np.max(far_train) >= FAR_TARGET:
            order = np.argsort(far_train, kind="mergesort")
            threshold = float(np.interp(FAR_TARGET, far_train[order], VAL_THRESHOLDS[order]))
        else:
            threshold = 0.0
        pred = dist[test] < threshold
        tars[k] = np.sum(pred & issame[test]) / np.sum(issame[test])
    tpr, fpr = tprs.mean(axis=0), fprs.mean(axis=0)
    return VerificationResult(eer_from_roc(fpr, tpr), float(tars.mean()), float(accuracy.mean()), tpr, fpr)


def eer_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Root of 1 - x - interp(FPR, TPR)(x) on [0, 1]; interpolation on the stably sorted FPRs (as scipy's interp1d)."""
    order = np.argsort(fpr, kind="mergesort")
    xs, ys = np.asarray(fpr)[order], np.asarray(tpr)[order]
    return float(brentq(lambda x: 1.0 - x - np.interp(x, xs, ys), 0.0, 1.0))


def exact_roc(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of accepting pairs with distance <= t, at every distinct distance t (and the origin): the ROC of
    all scores, with no threshold grid."""
    dist, issame = np.asarray(dist, dtype=np.float64), np.asarray(issame, dtype=bool)
    values, inverse = np.unique(dist, return_inverse=True)
    genuine = np.bincount(inverse, weights=issame, minlength=len(values))
    impostor = np.bincount(inverse, weights=~issame, minlength=len(values))
    tpr = np.concatenate([[0.0], np.cumsum(genuine) / max(issame.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(impostor) / max((~issame).sum(), 1)])
    return fpr, tpr


def exact_eer_auc(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold-free EER (where FPR = 1 - TPR on the exact ROC, linear between its points) and ROC AUC (trapezoids
    over the exact ROC: the probability that a genuine pair is closer than an impostor pair, ties counting half)."""
    fpr, tpr = exact_roc(dist, issame)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    gap = fpr + tpr - 1.0                 # rises from -1 at the origin to +1 at (1, 1)
    k = int(np.argmax(gap >= 0))          # first ROC point on or past the line FPR = 1 - TPR
    if gap[k] == 0 or k == 0:
        return float(fpr[k]), auc
    w = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(fpr[k - 1] + w * (fpr[k] - fpr[k - 1])), auc


def score_diagnostics(dist: np.ndarray, issame: np.ndarray) -> ScoreDiagnostics:
    """ScoreDiagnostics of (P,) pair distances on the squared-Euclidean scale [0, 4]; the impostor angle is
    arccos(1 - d/2) of the median impostor distance, in degrees (for a method with its own comparison, the angle
    its distance corresponds to)."""
    dist, issame = np.asarray(dist, dtype=np.float64), np.asarray(issame, dtype=bool)
    eer, auc = exact_eer_auc(dist, issame)
    low, high = np.quantile(dist, [0.05, 0.95])
    impostor = dist[~issame]
    angle = float(np.degrees(np.arccos(np.clip(1 - np.median(impostor) / 2, -1, 1)))) if len(impostor) else math.nan
    return ScoreDiagnostics(eer, auc, float((high - low) / GRID_STEP), angle)
