"""Iterative Nullspace Projection (Ravfogel, Elazar, Gonen, Twiton, Goldberg, "Null It Out: Guarding Protected
Attributes by Iterative Nullspace Projection", ACL 2020).

Each iteration trains a linear gender classifier on the templates as projected so far and projects its direction
out: with w_k the unit direction (orthogonalised against the earlier ones), P_k = P_{k-1} - w_k w_k^T, so after k
iterations P_k is the orthogonal projection onto the complement of a rank-k subspace. The classifier is a linear
SVM (scikit-learn's LinearSVC, seeded by ``seed``) with the settings of the authors' gender experiment on word
vectors: no intercept, no class weights, C = 1, primal solver (``inlp.fit_intercept``, ``inlp.class_weight``,
``inlp.C``; their BiasBios experiments use C = 0.01 or 0.3). One checkpoint per iteration (step = iteration),
holding P_k.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score
from sklearn.svm import LinearSVC
from torch import nn

from config.options import option
from privacy.base import register_method, FitContext, PathMethod, checkpoint_tensor, training_templates
from utils.errors import UserError

__all__ = ["INLP", "INLPOptions", "Projection"]


class Projection(nn.Module):
    """x -> x P with P a (D, D) projection matrix (a buffer)."""
    projection: torch.Tensor

    def __init__(self, projection: torch.Tensor):
        super().__init__()
        self.register_buffer("projection", torch.as_tensor(projection, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.projection


@dataclass
class INLPOptions:
    iterations: int = option(20, "linear classifiers whose directions are projected out, one each", ge=1)
    C: float = option(1.0, "inverse regularisation of the linear SVM (the authors': 1 for word vectors)", gt=0)
    fit_intercept: bool = option(False, "whether the SVM has an intercept (the authors': no)")
    class_weight: str = option("none", "SVM class weights: none (the authors') or balanced",
                               choices=("none", "balanced"))


@register_method("inlp", options=INLPOptions,
                 help="iterative nullspace projection of linear gender classifiers (Ravfogel et al.)")
class INLP(PathMethod):
    def run_name(self) -> str:
        return f"inlp_{self.opts.iterations}it"

    def check(self) -> None:
        super().check()
        if self.opts.iterations >= self.cfg.embedding_size:
            raise UserError(f"config option inlp.iterations={self.opts.iterations} would project out the whole "
                            f"{self.cfg.embedding_size}-d template (embedding_size); it must be smaller.")

    def path(self, ctx: FitContext) -> Iterator[tuple[int, nn.Module]]:
        x, y = training_templates(ctx)
        x = x.astype(np.float64)
        projection = np.eye(x.shape[1])
        o = self.opts
        for it in range(1, self.opts.iterations + 1):
            clf = LinearSVC(C=o.C, fit_intercept=o.fit_intercept, dual=False, random_state=self.cfg.seed,
                            class_weight=None if o.class_weight == "none" else o.class_weight)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x, y)
            bacc = balanced_accuracy_score(y, clf.predict(x))
            w = projection @ clf.coef_[0]           # stay orthogonal to the directions already removed
            norm = np.linalg.norm(w)
            if norm < 1e-12:
                ctx.log.info("inlp iteration %d: the classifier found no direction left to remove; stopping", it)
                return
            w /= norm
            projection -= np.outer(w, w)
            x -= np.outer(x @ w, w)
            ctx.log.info("inlp iteration %d: training balanced accuracy of the classifier before its removal %.4f",
                         it, bacc)
            yield it, Projection(torch.from_numpy(projection))

    def build_transform(self, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        p = checkpoint_tensor(state, "projection", path, self.name)
        d = self.cfg.embedding_size
        if tuple(p.shape) != (d, d):
            raise UserError(f"inlp checkpoint '{path}' holds a {tuple(p.shape)} projection; embedding_size is {d}. "
                            f"Set embedding_size to the backbone the run was trained on, or remove the file.")
        return Projection(p)
