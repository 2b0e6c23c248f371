"""Gender (or any attribute) leakage: balanced accuracy of attackers predicting it from templates.

StratifiedGroupKFold without shuffle, grouped by identity (no identity in both training and test); balanced
accuracy per fold, averaged. With the paper's three attackers (eval/attackers.py) this is the authors' protocol;
'AVG' is their mean. The SVMs are fit without probability=True: predict() is the same, the fit is faster.

Beyond the protocol, ``leakage_report`` gives the worst-case leakage (the largest balanced accuracy over the
attackers run, and which attacker reached it) and identity-level bootstrap intervals, and runs the (attacker, fold)
fits in parallel; ``gender_leakage`` is its plain-number view. The command line over it
is eval/leakage.py (code: eval/leakage_cli.py).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Sequence


import numpy as np
from joblib import delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold

from eval.attackers import (PAPER_ATTACKERS, AttackContext, Attacker, make_attacker)
from utils.errors import UserError
from utils.logs import get_logger
from utils.workers import parallel

__all__ = ["LeakageResult", "leakage_report", "gender_leakage", "normalise_labels"]

log = get_logger(__name__)
WORST = "worst-case"    # the name of the worst case (the maximum over the attackers run) in result tables
BOOTSTRAP_BLOCK = 100   # bootstrap replicates drawn and evaluated together (bounds memory); part of what a seed draws


@dataclass(frozen=True)
class LeakageResult:
    """Leakage of one set of templates: per attacker (and 'AVG', the mean of the paper's three, when all three ran)
    the mean balanced accuracy over folds and its bootstrap interval (NaN without bootstrap); the worst case over
    the attackers run; the out-of-fold predictions behind them."""
    attackers: tuple[str, ...]
    bacc: dict[str, float]
    ci_low: dict[str, float]
    ci_high: dict[str, float]
    fold_bacc: dict[str, tuple[float, ...]]
    worst_attacker: str
    worst_bacc: float
    worst_ci_low: float
    worst_ci_high: float
    predictions: dict[str, np.ndarray]   # attacker -> (N,) prediction of each template by the fold that tested it
    fold: np.ndarray                     # (N,) index of the fold whose test split holds each template
    confidence: float
    n_bootstrap: int

    def as_dict(self) -> dict[str, float]:
        """Balanced accuracy per attacker, plus 'AVG' when the paper's three ran (gender_leakage's result)."""
        return dict(self.bacc)


def _fit_predict(clf: Attacker, x: np.ndarray, y: np.ndarray, groups: np.ndarray, train: np.ndarray,
                 test: np.ndarray) -> np.ndarray:
    """Fit one attacker on a training split and predict its test split (one parallel task)."""
    kwargs = {"groups": groups[train]} if "groups" in inspect.signature(clf.fit).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs at max_iter=100 is the protocol
        clf.fit(x[train], y[train], **kwargs)
    return np.asarray(clf.predict(x[test]))


def _check_inputs(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, name: str,
                  attribute: str) -> None:
    """Refuse inputs the grouped cross-validation cannot use, with the rows or classes at fault."""
    if x.ndim != 2 or len(x) != len(y) or len(y) != len(groups):
        raise UserError(f"{name}: {x.shape[0] if x.ndim else 0} templates of shape {x.shape[1:]} but {len(y)} "
                        f"{attribute} labels and {len(groups)} identity labels: templates must be (N, D) with one "
                        f"label of each per row.")
    finite = np.isfinite(x).all(axis=1)
    for bad, what in ((np.flatnonzero(~finite), "NaN or infinite values"),
                      (np.flatnonzero(finite & ~(x != 0).any(axis=1)), "only zeros")):
        if len(bad):
            rows = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise UserError(f"{name}: {len(bad)} template row(s) hold {what} (rows {rows}, counting from 0); they "
                            f"cannot be normalised. Remove them (and their labels) or fix how they were computed.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(f"{name}: every template has {attribute} {classes[0]!r} (or there are none); leakage needs "
                        f"at least two classes.")
    n_ids = {c: len(np.unique(groups[y == c])) for c in classes}
    if min(n_ids.values()) < n_splits:
        counts = " and ".join(f"{n} of {attribute} {c}" for c, n in n_ids.items())
        raise UserError(f"{name}: the {attribute} test needs at least {n_splits} identities of each {attribute} "
                        f"({n_splits}-fold grouped cross-validation); it has {counts}. Add identities of the short "
                        f"class(es), merge rare classes, or use fewer folds.")


def _label_key(text: str) -> str:
    """The class a label's spelling names: a number by its value (1, 1.0, 01 and +1 are one class), a name without
    case or surrounding blanks ('f', 'F' and 'f ' are one class)."""
    try:
        value = float(text)
    except ValueError:
        return text.casefold()
    if not math.isfinite(value):
        return text.casefold()
    return str(int(value)) if value.is_integer() else repr(value)


def normalise_labels(labels: np.ndarray) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Class labels with each class spelled one way, and the spellings merged (class -> its spellings, only where
    there were several). Numeric arrays are returned as they are (numpy already compares 1 and 1.0 equal); text and
    mixed labels are grouped by ``_label_key`` and each group takes its most frequent spelling (then the first in
    sorted order), so that a class written two ways is never two classes."""
    y = np.asarray(labels)
    if y.dtype.kind in "biuf":
        return y, {}
    spelled = np.array([str(v).strip() for v in y.ravel()], dtype=object)
    keys = np.array([_label_key(v) for v in spelled], dtype=object)
    canon: dict[str, str] = {}
    merged: dict[str, list[str]] = {}
    for key in dict.fromkeys(keys.tolist()):
        names, counts = np.unique([str(v) for v in spelled[keys == key]], return_counts=True)
        canon[key] = str(names[np.argmax(counts)])   # argmax: the first of the most frequent, in sorted order
        raw = sorted({str(v) for v in y.ravel()[keys == key]})
        if len(raw) > 1:
            merged[canon[key]] = raw
    out = np.array([canon[k] for k in keys], dtype=str)
    return out.reshape(y.shape), merged


def merged_note(merged: dict[str, list[str]], attribute: str) -> str:
    """One line naming the spellings counted as one class ('' when none were merged)."""
    if not merged:
        return ""
    parts = "; ".join(f"{', '.join(map(repr, spellings))} as {c!r}" for c, spellings in merged.items())
    return f"{attribute} labels spelled several ways were counted as one class: {parts}"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; rows of extreme magnitude (finite values around 1e160 or 1e-170, whose squares
    overflow or underflow) are first divided by their largest magnitude, so they normalise like any other."""
    x = np.asarray(x, dtype=np.float64)
    peak = np.max(np.abs(x), axis=1, keepdims=True) if x.size else np.ones((len(x), 1))
    extreme = (peak > 1e100) | (peak < 1e-100)
    if extreme.any():   # other rows are left bit for bit as before
        x = np.where(extreme, x / np.where(peak == 0, 1.0, peak), x)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bootstrap(y: np.ndarray, groups: np.ndarray, fold: np.ndarray, correct: dict[str, np.ndarray],
               n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """(n_bootstrap,) replicates of each fold-averaged balanced accuracy: in each fold's test split, identities are
    drawn with replacement within their class (the class of most of their templates), the same draws for every
    attacker (paired), so that the intervals of attackers, of 'AVG' and of the worst case are comparable."""
    classes, yi = np.unique(y, return_inverse=True)
    rng = np.random.default_rng(seed)
    n_folds = int(fold.max()) + 1
    out = {k: np.zeros(n_bootstrap) for k in correct}
    folds = []   # per fold: its identities' template counts per class, their stratum, each attacker's hits
    for f in range(n_folds):
        rows = np.flatnonzero(fold == f)
        ids, gi = np.unique(groups[rows], return_inverse=True)
        per_id = np.zeros((len(ids), len(classes)))          # templates of each identity and class
        np.add.at(per_id, (gi, yi[rows]), 1)
        hits = {}
        for k, ok in correct.items():
            hits[k] = np.zeros((len(ids), len(classes)))
            np.add.at(hits[k], (gi, yi[rows]), ok[rows])
        folds.append((len(ids), per_id, per_id.argmax(axis=1), hits))
    for start in range(0, n_bootstrap, BOOTSTRAP_BLOCK):
        b = min(BOOTSTRAP_BLOCK, n_bootstrap - start)
        for n_ids, per_id, stratum, hits in folds:
            weights = np.zeros((b, n_ids))
            for s in np.unique(stratum):
                members = np.flatnonzero(stratum == s)
                draws = rng.integers(0, len(members), size=(b, len(members)))
                counts = np.bincount((np.arange(b)[:, None] * len(members) + draws).ravel(),
                                     minlength=b * len(members)).reshape(b, len(members))
                weights[:, members] = counts
            totals = weights @ per_id                                # (b, classes) templates drawn per class
            for k in correct:
                with np.errstate(invalid="ignore", divide="ignore"):
                    recall = (weights @ hits[k]) / totals
                out[k][start:start + b] += np.nanmean(recall, axis=1) / n_folds
    return out


def leakage_report(templates: np.ndarray, labels: np.ndarray, identities: np.ndarray, n_splits: int = 3,
                   name: str = "evaluation set", attackers: Sequence[str] = PAPER_ATTACKERS,
                   context: AttackContext | None = None, n_bootstrap: int = 1000, confidence: float = 0.95,
                   seed: int = 0, n_jobs: int = 1, attribute: str = "gender") -> LeakageResult:
    """Every attacker's balanced accuracy with its identity-level bootstrap interval, and the worst case.

    Templates are L2-normalised; labels may have any number of classes. The (attacker, fold) fits run on
    ``n_jobs`` workers (joblib; -1: all cores); each fit is seeded (``context.seed``, else ``seed``) and
    independent, so the results do not depend on the number of workers. The interval holds the fitted attackers
    fixed and resamples the tested identities (``seed``); ``n_bootstrap=0`` skips it (NaN bounds).
    """
    x = np.asarray(templates, dtype=np.float64)
    y, merged = normalise_labels(labels)
    if merged:
        log.info("%s: %s", name, merged_note(merged, attribute))
    groups = np.asarray(identities)
    attackers = tuple(attackers)
    _check_inputs(x, y, groups, n_splits, name, attribute)
    x = unit_rows(x)
    splits = list(StratifiedGroupKFold(n_splits=n_splits).split(x, y, groups))
    classes = np.unique(y)
    for train, _ in splits:
        if len(np.unique(y[train])) < len(classes):
            raise UserError(f"{name}: a {attribute}-test fold lacks a class in its training split; add identities "
                            f"of the rarer classes.")
    ctx = context or AttackContext(seed=seed)
    tasks = [(k, f) for k in attackers for f in range(n_splits)]
    preds = parallel(n_jobs)(delayed(_fit_predict)(make_attacker(k, ctx), x, y, groups, *splits[f])
                                    for k, f in tasks)
    fold = np.empty(len(y), dtype=int)
    for f, (_, test) in enumerate(splits):
        fold[test] = f
    predictions = {k: np.empty(len(y), dtype=y.dtype) for k in attackers}
    fold_bacc: dict[str, list[float]] = {k: [] for k in attackers}
    for (k, f), p in zip(tasks, preds):
        test = splits[f][1]
        predictions[k][test] = p
        fold_bacc[k].append(balanced_accuracy_score(y[test], p))
    bacc = {k: float(np.mean(v)) for k, v in fold_bacc.items()}
    if all(k in bacc for k in PAPER_ATTACKERS):
        bacc["AVG"] = float(np.mean([bacc[k] for k in PAPER_ATTACKERS]))
    worst = max(attackers, key=lambda k: bacc[k])   # the first attacker run wins a tie
    nan = float("nan")
    ci_low, ci_high = dict.fromkeys(bacc, nan), dict.fromkeys(bacc, nan)
    worst_ci = (nan, nan)
    if n_bootstrap > 0:
        reps = _bootstrap(y, groups, fold, {k: predictions[k] == y for k in attackers}, n_bootstrap, seed)
        if "AVG" in bacc:
            reps["AVG"] = np.mean([reps[k] for k in PAPER_ATTACKERS], axis=0)
        q = ((1 - confidence) / 2, (1 + confidence) / 2)
        for k, r in reps.items():
            ci_low[k], ci_high[k] = (float(v) for v in np.quantile(r, q))
        low, high = np.quantile(np.max([reps[k] for k in attackers], axis=0), q)
        worst_ci = (float(low), float(high))
    return LeakageResult(attackers, bacc, ci_low, ci_high, {k: tuple(map(float, v)) for k, v in fold_bacc.items()},
                         worst, bacc[worst], *worst_ci, predictions, fold, confidence, n_bootstrap)


def gender_leakage(templates: np.ndarray, genders: np.ndarray, identities: np.ndarray, n_splits: int = 3,
                   name: str = "evaluation set", attackers: Sequence[str] = PAPER_ATTACKERS,
                   context: AttackContext | None = None, n_jobs: int = 1) -> dict[str, float]:
    """Balanced accuracy per attacker, plus 'AVG' (the mean of the paper's three) when all three ran."""
    return leakage_report(templates, genders, identities, n_splits, name, attackers, context, n_bootstrap=0,
                          n_jobs=n_jobs).as_dict()


# ---- the tool ------------------------------------------------------------------------------------------------------
