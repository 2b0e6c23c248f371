"""Gender attackers: named classifiers that try to predict gender from templates (a small registry).

The paper's protocol is its three attackers at scikit-learn defaults: ``LogReg`` (LogisticRegression()),
``SVM`` (SVC(kernel='linear')) and ``RBF`` (SVC(kernel='rbf')); their mean is BACC-Gender-AVG and enters PIC.
Any other registered attacker is reported apart from them. A new attacker is one function and one decorator:

    @register_attacker("MyAttack", help="one line for listings")
    def my_attack(ctx: AttackContext):
        return SomeClassifier(random_state=ctx.seed)      # anything with fit(X, y) and predict(X)

A classifier whose ``fit`` takes a ``groups`` keyword receives the identities of its training split, so that it
can keep identities apart in its own model selection (eval/leakage.py passes them).

Stronger attackers registered here (never part of BACC-Gender-AVG or PIC): ``MLP`` (a small multi-layer perceptron
with early stopping), ``kNN`` (cosine k-nearest neighbours, k chosen by identity-grouped inner cross-validation),
``GBDT`` (histogram gradient boosting) and ``Similarity`` (the comparison-based attack of Osorio-Roig et al., IEEE
TBIOM 2022: a template's attribute is inferred from the system's own comparison scores to labelled templates of
other identities). ``expand_attackers(["all"])`` names every registered attacker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from config.options import register_options
from utils.registry import Registry

__all__ = ["PAPER_ATTACKERS", "ALL", "ATTACKERS", "AttackContext", "Attacker", "register_attacker", "make_attacker",
           "expand_attackers", "cosine_similarity", "CosineKNN", "ComparisonAttack"]

PAPER_ATTACKERS = ("LogReg", "SVM", "RBF")
ALL = "all"   # in an attacker list (config option attackers, --attackers): every registered attacker


class Attacker(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> object: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class AttackContext:
    """What an attacker may use besides the templates: a seed, and the system's own comparison (similarity of
    templates a (Na, D) to b (Nb, D), higher = more alike), for comparison-based attacks."""
    seed: int = 0
    similarity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


Factory = Callable[[AttackContext], Attacker]
# config option ``attackers``: every attacker, by name (``register_attacker`` is its decorator)
ATTACKERS: Registry[Factory] = Registry("attacker", "attackers", on_options=register_options)
register_attacker = ATTACKERS.register


def make_attacker(name: str, ctx: AttackContext | None = None) -> Attacker:
    """A fresh, unfitted classifier of attacker ``name``."""
    return ATTACKERS.get(name)(ctx or AttackContext())


def expand_attackers(names: Iterable[str]) -> tuple[str, ...]:
    """The attacker list with ``"all"`` replaced by every registered attacker (the paper's three first), without
    repeats; other names are kept as given (validated by the caller against ATTACKERS)."""
    out: list[str] = []
    for name in names:
        for n in ([*PAPER_ATTACKERS, *ATTACKERS] if name == ALL else [name]):
            if n not in out:
                out.append(n)
    return tuple(out)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) cosine similarities: the comparison of a system that compares templates by angle."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _grouped_inner_splits(y: np.ndarray, groups: np.ndarray | None, n_splits: int = 3) -> list | None:
    """Identity-grouped inner folds for model selection inside a training split (None when too few identities:
    with identities shared between inner folds, selection would reward memorising identities)."""
    if groups is None:
        return None
    per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
    k = min(n_splits, per_class)
    if k < 2:
        return None
    return list(StratifiedGroupKFold(n_splits=k).split(np.zeros(len(y)), y, groups))


class CosineKNN(ClassifierMixin, BaseEstimator):
    """k-nearest neighbours by cosine distance, k chosen from ``candidates`` by balanced accuracy in
    identity-grouped inner cross-validation (``default_k`` when the training split has too few identities)."""

    def __init__(self, candidates: tuple[int, ...] = (1, 3, 7, 15, 31, 63), default_k: int = 7):
        self.candidates = candidates
        self.default_k = default_k

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "CosineKNN":
        """Choose k on inner folds that keep identities apart, then fit on the whole training split."""
        x, y = np.asarray(x), np.asarray(y)
        splits = _grouped_inner_splits(y, groups)
        knn = KNeighborsClassifier(metric="cosine", algorithm="brute")
        if splits is None:
            self.k_ = min(self.default_k, len(y))
        else:
            smallest = min(len(train) for train, _ in splits)
            ks = [k for k in self.candidates if k <= smallest] or [1]
            search = GridSearchCV(knn, {"n_neighbors": ks}, scoring="balanced_accuracy", cv=splits, refit=False)
            self.k_ = int(search.fit(x, y).best_params_["n_neighbors"])
        self.model_ = knn.set_params(n_neighbors=self.k_).fit(x, y)
        self.classes_ = self.model_.classes_
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict(x)


class ComparisonAttack(ClassifierMixin, BaseEstimator):
    """The comparison-based attack (Osorio-Roig et al.): compare a template with the attacker's labelled reference
    templates using the system's own comparison, summarise the best scores to each class (mean of the top-k
    scores, for each k in ``top_k``) and let a balanced logistic regression on these summaries decide.

    The references are the training split. Its own summaries, on which the decision is learnt, leave out the
    comparisons of a template with its own identity (``groups``; without them only with itself), as a real
    attacker's references never hold the attacked person.
    """

    def __init__(self, similarity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 top_k: tuple[int, ...] = (1, 5, 20), chunk: int = 2048):
        self.similarity = similarity
        self.top_k = top_k
        self.chunk = chunk

    def _summaries(self, x: np.ndarray, own: np.ndarray | None) -> np.ndarray:
        """(N, classes x len(top_k)) top-k mean scores of x to each class's references; ``own[i]`` is the identity
        of row i whose references are left out (None: no row is a reference)."""
        compare = self.similarity or cosine_similarity
        out = np.empty((len(x), len(self.classes_) * len(self.top_k)))
        for start in range(0, len(x), self.chunk):
            rows = slice(start, start + self.chunk)
            s = np.asarray(compare(x[rows], self.refs_), dtype=np.float64)
            if own is not None:
                s = np.where(own[rows, None] == self.ref_groups_[None, :], -np.inf, s)
            lowest = np.min(s, where=np.isfinite(s), initial=np.inf)
            for c_i, c in enumerate(self.classes_):
                sc = s[:, self.ref_y_ == c]
                kmax = min(max(self.top_k), sc.shape[1])
                top = -np.sort(-np.partition(sc, sc.shape[1] - kmax, axis=1)[:, sc.shape[1] - kmax:], axis=1)
                valid = np.isfinite(top)
                csum = np.cumsum(np.where(valid, top, 0.0), axis=1)
                ccount = np.cumsum(valid, axis=1)
                for k_i, k in enumerate(self.top_k):
                    j = min(k, kmax) - 1
                    mean = csum[:, j] / np.maximum(ccount[:, j], 1)
                    out[rows, c_i * len(self.top_k) + k_i] = np.where(ccount[:, j] > 0, mean, lowest)
        return out

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "ComparisonAttack":
        """Keep the training split as references and learn the decision from its leave-own-identity-out scores."""
        self.refs_ = np.asarray(x)
        self.ref_y_ = np.asarray(y)
        self.ref_groups_ = np.arange(len(y)) if groups is None else np.asarray(groups)
        self.classes_ = np.unique(self.ref_y_)
        self.model_ = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
        self.model_.fit(self._summaries(self.refs_, self.ref_groups_), self.ref_y_)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict(self._summaries(np.asarray(x), None))


@register_attacker("LogReg", help="the paper's: LogisticRegression() at scikit-learn defaults")
def _logreg(ctx: AttackContext) -> Attacker:
    return LogisticRegression()


@register_attacker("SVM", help="the paper's: SVC(kernel='linear')")
def _linear_svm(ctx: AttackContext) -> Attacker:
    return SVC(kernel="linear")


@register_attacker("RBF", help="the paper's: SVC(kernel='rbf')")
def _rbf_svm(ctx: AttackContext) -> Attacker:
    return SVC(kernel="rbf")


@register_attacker("MLP", help="a small multi-layer perceptron (128 hidden units) with early stopping")
def _mlp(ctx: AttackContext) -> Attacker:
    return MLPClassifier(hidden_layer_sizes=(128,), learning_rate_init=1e-2, early_stopping=True, max_iter=500,
                         random_state=ctx.seed)


@register_attacker("kNN", help="cosine k-nearest neighbours, k chosen by identity-grouped inner cross-validation")
def _knn(ctx: AttackContext) -> Attacker:
    return CosineKNN()


@register_attacker("GBDT", help="histogram gradient boosting")
def _gbdt(ctx: AttackContext) -> Attacker:
    # early stopping is scikit-learn's default from 10,000 samples on; below, it cuts the cost several-fold
    return HistGradientBoostingClassifier(early_stopping=True, random_state=ctx.seed)


@register_attacker("Similarity", help="the comparison-based attack of Osorio-Roig et al. (TBIOM 2022)")
def _similarity(ctx: AttackContext) -> Attacker:
    return ComparisonAttack(similarity=ctx.similarity)
