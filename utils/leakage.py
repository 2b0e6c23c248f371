"""Gender leakage: balanced accuracy of three classifiers predicting gender from templates.

3-fold StratifiedGroupKFold without shuffle, grouped by identity (no identity in both training and test);
LogisticRegression(), SVC(kernel='linear') and SVC(kernel='rbf') at scikit-learn defaults; balanced accuracy
per fold, averaged. The SVMs are fit without probability=True: predict() is the same, the fit is faster.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.svm import SVC

from utils.errors import UserError

CLASSIFIERS = ("LogReg", "SVM", "RBF")


def make_classifier(kind: str, probability: bool = False):
    if kind == "LogReg":
        return LogisticRegression()
    extra = {"probability": True} if probability else {}  # passing probability=False warns in sklearn >= 1.9
    if kind == "SVM":
        return SVC(kernel="linear", **extra)
    if kind == "RBF":
        return SVC(kernel="rbf", **extra)
    raise ValueError(kind)


def gender_leakage(templates: np.ndarray, genders: np.ndarray, identities: np.ndarray, n_splits: int = 3,
                   name: str = "evaluation set", probability: bool = False) -> dict[str, float]:
    """Balanced accuracy per classifier ('LogReg', 'SVM', 'RBF') and their mean ('AVG')."""
    x = np.asarray(templates, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(genders)
    groups = np.asarray(identities)
    n_ids = [len(np.unique(groups[y == g])) for g in (0, 1)]
    if min(n_ids) < n_splits:
        raise UserError(f"{name}: the gender test needs at least {n_splits} identities of each gender "
                        f"({n_splits}-fold grouped cross-validation); it has {n_ids[0]} of gender 0 and "
                        f"{n_ids[1]} of gender 1.")
    scores = {k: [] for k in CLASSIFIERS}
    for train, test in StratifiedGroupKFold(n_splits=n_splits).split(x, y, groups):
        if len(np.unique(y[train])) < 2:
            raise UserError(f"{name}: a gender-test fold has only one gender in its training split; add identities.")
        for kind in CLASSIFIERS:
            clf = make_classifier(kind, probability)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs at max_iter=100 is the protocol
                warnings.simplefilter("ignore", FutureWarning)       # sklearn >= 1.9 deprecates probability=True
                clf.fit(x[train], y[train])
            scores[kind].append(balanced_accuracy_score(y[test], clf.predict(x[test])))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["AVG"] = float(np.mean([out[k] for k in CLASSIFIERS]))
    return out
