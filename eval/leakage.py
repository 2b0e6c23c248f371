"""Gender leakage: balanced accuracy of attackers predicting gender from templates.

StratifiedGroupKFold without shuffle, grouped by identity (no identity in both training and test); balanced
accuracy per fold, averaged. With the paper's three attackers (eval/attackers.py) this is the authors' protocol;
'AVG' is their mean. The SVMs are fit without probability=True: predict() is the same, the fit is faster.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold

from eval.attackers import PAPER_ATTACKERS, AttackContext, make_attacker
from utils.errors import UserError


def gender_leakage(templates: np.ndarray, genders: np.ndarray, identities: np.ndarray, n_splits: int = 3,
                   name: str = "evaluation set", attackers: Sequence[str] = PAPER_ATTACKERS,
                   context: AttackContext | None = None) -> dict[str, float]:
    """Balanced accuracy per attacker, plus 'AVG' (the mean of the paper's three) when all three ran."""
    x = np.asarray(templates, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(genders)
    groups = np.asarray(identities)
    n_ids = [len(np.unique(groups[y == g])) for g in (0, 1)]
    if min(n_ids) < n_splits:
        raise UserError(f"{name}: the gender test needs at least {n_splits} identities of each gender "
                        f"({n_splits}-fold grouped cross-validation); it has {n_ids[0]} of gender 0 and "
                        f"{n_ids[1]} of gender 1.")
    scores: dict[str, list[float]] = {k: [] for k in attackers}
    for train, test in StratifiedGroupKFold(n_splits=n_splits).split(x, y, groups):
        if len(np.unique(y[train])) < 2:
            raise UserError(f"{name}: a gender-test fold has only one gender in its training split; add identities.")
        for kind in attackers:
            clf = make_attacker(kind, context)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs at max_iter=100 is the protocol
                clf.fit(x[train], y[train])
            scores[kind].append(balanced_accuracy_score(y[test], clf.predict(x[test])))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    if all(k in out for k in PAPER_ATTACKERS):
        out["AVG"] = float(np.mean([out[k] for k in PAPER_ATTACKERS]))
    return out
