"""Incremental Variable Elimination (Terhörst, Damer, Kirchbuchner, Kuijper, "Suppressing Gender and Age in Face
Templates Using Incremental Variable Elimination", ICB 2019).

Round after round, a tree ensemble learns to predict gender from the template dimensions still kept, and the
``ive.dims_per_round`` dimensions it finds most important are removed; after ``ive.rounds`` rounds the template
keeps D - rounds * dims_per_round dimensions. The ensemble is scikit-learn's random forest (impurity importances),
seeded by ``seed``. The defaults are the authors' example (``incremental_variable_elimination.py``): standardised
templates, 30 trees without class weights, 5 dimensions removed per round over 20 rounds. One checkpoint per round
(step = round), so the sweep traces the privacy/utility path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn

from config.options import option
from privacy.base import register_method, FitContext, PathMethod, checkpoint_tensor, training_templates
from utils.errors import UserError

__all__ = ["IVE", "IVEOptions", "KeepDimensions"]


@dataclass
class IVEOptions:
    dims_per_round: int = option(5, "dimensions removed per round (the most gender-predictive)", ge=1)
    rounds: int = option(20, "elimination rounds, a checkpoint each (keeps D - rounds * dims_per_round)", ge=1)
    estimators: int = option(30, "trees of the random forest whose importances rank the dimensions", ge=1)
    class_weight: str = option("none", "forest class weights: none (the authors') or balanced",
                               choices=("none", "balanced"))
    standardize: bool = option(True, "fit the forests on standardised templates (the authors' StandardScaler)")


class KeepDimensions(nn.Module):
    """The template restricted to the kept dimensions (a buffer of indices into the backbone's template)."""
    kept: torch.Tensor   # the buffer

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.register_buffer("kept", torch.as_tensor(kept, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.kept)


@register_method("ive", options=IVEOptions,
                 help="Incremental Variable Elimination: gender-predictive dimensions dropped (Terhörst et al.)")
class IVE(PathMethod):
    def run_name(self) -> str:
        o = self.opts
        return f"ive_{o.dims_per_round}x{o.rounds}_{o.estimators}trees"

    def check(self) -> None:
        super().check()
        o, d = self.opts, self.cfg.embedding_size
        if o.dims_per_round * o.rounds >= d:
            raise UserError(f"config options ive.dims_per_round={o.dims_per_round} and ive.rounds={o.rounds} "
                            f"would remove {o.dims_per_round * o.rounds} of the {d} "
                            f"dimensions (embedding_size); their product must be smaller. Lower either.")

    def path(self, ctx: FitContext) -> Iterator[tuple[int, nn.Module]]:
        c, o = self.cfg, self.opts
        x, y = training_templates(ctx)
        if o.standardize:    # the ranking only; the checkpoints keep dimensions of the templates as they are
            x = StandardScaler().fit_transform(x)
        kept = np.arange(x.shape[1])
        weights = None if o.class_weight == "none" else o.class_weight
        for round_ in range(1, o.rounds + 1):
            forest = RandomForestClassifier(n_estimators=o.estimators, class_weight=weights, n_jobs=c.n_jobs,
                                            random_state=c.seed + round_)
            forest.fit(x[:, kept], y)
            order = np.argsort(-forest.feature_importances_, kind="stable")
            removed = kept[order[:o.dims_per_round]]
            kept = np.setdiff1d(kept, removed)
            ctx.log.info("ive round %d: removed dimensions %s (importance %.4f of the forest's), %d kept", round_,
                         sorted(removed.tolist()), float(forest.feature_importances_[order[:len(removed)]].sum()),
                         len(kept))
            yield round_, KeepDimensions(torch.from_numpy(kept))

    def build_transform(self, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        kept = checkpoint_tensor(state, "kept", path, self.name)
        d = self.cfg.embedding_size
        if kept.ndim != 1 or kept.dtype != torch.long or not len(kept) or int(kept.min()) < 0 or \
                int(kept.max()) >= d or len(torch.unique(kept)) != len(kept):
            raise UserError(f"ive checkpoint '{path}': 'kept' must be distinct dimension indices in [0, {d}) "
                            f"(embedding_size); the file holds {tuple(kept.shape)} {kept.dtype} values. Set "
                            f"embedding_size to the backbone the run was trained on, or remove the file.")
        return KeepDimensions(kept)
