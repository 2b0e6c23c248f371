"""Gender attackers: named classifiers that try to predict gender from templates (a small registry).

The paper's protocol is its three attackers at scikit-learn defaults: ``LogReg`` (LogisticRegression()),
``SVM`` (SVC(kernel='linear')) and ``RBF`` (SVC(kernel='rbf')); their mean is BACC-Gender-AVG and enters PIC.
Any other registered attacker is reported apart from them. A new attacker is one function and one decorator:

    @register_attacker("MyAttack")
    def my_attack(ctx: AttackContext):
        return SomeClassifier(random_state=ctx.seed)      # anything with fit(X, y) and predict(X)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

__all__ = ["PAPER_ATTACKERS", "ATTACKERS", "AttackContext", "Attacker", "register_attacker", "make_attacker"]

PAPER_ATTACKERS = ("LogReg", "SVM", "RBF")


class Attacker(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> object: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class AttackContext:
    """What an attacker may use besides the templates: a seed, and the system's own comparison (similarity of
    templates a (Na, D) to b (Nb, D), higher = more alike), for comparison-based attacks."""
    seed: int = 0
    similarity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


ATTACKERS: dict[str, Callable[[AttackContext], Attacker]] = {}


def register_attacker(name: str) -> Callable[[Callable[[AttackContext], Attacker]], Callable[[AttackContext], Attacker]]:
    """Decorator: make ``factory(ctx) -> classifier`` available as attacker ``name`` (config option attackers)."""
    def add(factory: Callable[[AttackContext], Attacker]) -> Callable[[AttackContext], Attacker]:
        ATTACKERS[name] = factory
        return factory
    return add


def make_attacker(name: str, ctx: AttackContext | None = None) -> Attacker:
    """A fresh, unfitted classifier of attacker ``name``."""
    return ATTACKERS[name](ctx or AttackContext())


@register_attacker("LogReg")
def _logreg(ctx: AttackContext) -> Attacker:
    return LogisticRegression()


@register_attacker("SVM")
def _linear_svm(ctx: AttackContext) -> Attacker:
    return SVC(kernel="linear")


@register_attacker("RBF")
def _rbf_svm(ctx: AttackContext) -> Attacker:
    return SVC(kernel="rbf")
