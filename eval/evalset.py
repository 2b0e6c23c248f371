"""One evaluation set from its cached templates: the metrics of a model on it, shared by validation during
training, the evaluation sweep, the demo and the tests.

The backbone's templates of a .bin come from the template cache (computed once); a method's transform is applied
to them directly, which equals running transform(normalize(backbone(x))) on the images. Verification uses
t(x) + t(flip(x)); the gender test uses t(x) alone; the bare backbone sums its raw outputs. A transform may bring
its own comparison (``OwnComparison``: ``pair_distances``, ``similarity``): verification and comparison-based
attacks then use it. Errors about a model's templates name the checkpoint it came from (``source``) when given.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from eval.attackers import PAPER_ATTACKERS, AttackContext, expand_attackers
from eval.gender_leakage import LeakageResult, leakage_report
from eval.verification import (FEW_GRID_STEPS, GRID_STEP, ScoreDiagnostics, pair_distances, score_diagnostics,
                               verification_from_distances)
from facedata.binfile import load_bin
from templates.cache import TemplateCache, bin_inputs
from templates.entry import Templates
from utils.errors import UserError
from utils.logs import get_logger

log = get_logger(__name__)

BACC_COLUMNS = [f"BACC-Gender-{a}" for a in PAPER_ATTACKERS]
METRIC_COLUMNS = ["EER", "TAR@FAR=0.1%", *BACC_COLUMNS, "BACC-Gender-AVG"]
NEAR_CHANCE_EER = 0.2   # a bare backbone worse than this on a face set is almost certainly misconfigured
# a transform whose median impostor angle is below this share of the bare backbone's has pulled the templates of
# different people together: the sign of a collapsing layer (a working face network keeps them near 60-90 degrees)
COLLAPSE_SHARE = 1 / 3


def missing_bins(rec: str | Path, names: Sequence[str]) -> list[str]:
    """The paths rec/<name>.bin of ``names`` that are not files, each once, in order."""
    return list(dict.fromkeys(str(Path(rec) / f"{n}.bin") for n in names if not (Path(rec) / f"{n}.bin").is_file()))


def check_bins(rec: str | Path, names: Sequence[str], options: str, fix: str, what: str = "evaluation") -> None:
    """Pre-flight: every rec/<name>.bin exists, else one error naming them (as ``what`` files), the config
    ``options`` that chose them and ``fix`` (what to do instead)."""
    missing = missing_bins(rec, names)
    if missing:
        raise UserError(f"{what} file(s) {', '.join(missing)} not found ({options}). Put the .bin files there "
                        f"(README: 'Evaluation files'), or {fix}.")


@dataclass
class EvalTemplates:
    """One evaluation set: cached backbone templates of its pair images followed by its gender images."""
    name: str
    templates: Templates
    issame: np.ndarray
    id_labels: np.ndarray
    gender_labels: np.ndarray

    @property
    def num_pair_images(self) -> int:
        return 2 * len(self.issame)


@dataclass
class SetResult:
    """The paper's metrics (METRIC_COLUMNS, NaN where not defined), every attacker's balanced accuracy, and the
    whole leakage result (intervals, worst case) when the set has a gender test."""
    metrics: dict[str, float]
    attacks: dict[str, float] = field(default_factory=dict)
    leakage: LeakageResult | None = None
    scores: ScoreDiagnostics | None = None   # threshold-free EER, AUC, grid resolution, spread (beside the protocol)

    def __getitem__(self, column: str) -> float:
        return self.metrics[column]


def open_eval_set(cache: TemplateCache, rec: str | Path, name: str) -> EvalTemplates:
    """Read rec/<name>.bin and get its templates from the cache (extracting them on the first use)."""
    path = Path(rec) / f"{name}.bin"
    es = load_bin(path)
    items = es.pair_images + es.gender_images
    n_pairs = len(es.pair_images)

    def describe(i: int) -> str:
        return f"{path} bins[{i}]" if i < n_pairs else f"{path} bins_gender[{i - n_pairs}]"
    t = cache.get(f"bin-{name}", bin_inputs(es.sha256), items, describe, what=f"images of {path.name}")
    return EvalTemplates(name, t, es.issame, es.id_labels, es.gender_labels)


@runtime_checkable
class Transform(Protocol):
    """A method's transform of unit templates (an nn.Module: moved to a device, put in eval mode, called)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> Transform: ...

    def to(self, device: torch.device) -> Transform: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def buffers(self) -> Iterator[torch.Tensor]: ...


@runtime_checkable
class OwnComparison(Protocol):
    """A transform that brings its own comparison of templates: verification distances of flip-summed pairs
    (rows 2i, 2i+1) and the similarity comparison-based attackers use."""

    def pair_distances(self, ver: np.ndarray) -> np.ndarray: ...

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


def own_comparison(transform: Transform | None) -> OwnComparison | None:
    """The transform's own comparison, or None where templates are compared as the protocol does."""
    return transform if isinstance(transform, OwnComparison) else None


@torch.no_grad()
def model_templates(ev: EvalTemplates, transform: Transform | nn.Module | None) -> tuple[np.ndarray, np.ndarray]:
    """(2P, D) verification templates (flip-summed) and (G, D) gender templates (unflipped) of the model."""
    n = ev.num_pair_images
    t = ev.templates
    if transform is None:
        ver = t.raw(slice(0, n), 0) + t.raw(slice(0, n), 1)
        gen = t.raw(slice(n, None), 0)
    else:
        transform.eval()
        dev = next(iter(transform.parameters()), next(iter(transform.buffers()), torch.empty(0))).device
        ver = transform(t.normalized(slice(0, n), 0).to(dev)) + transform(t.normalized(slice(0, n), 1).to(dev))
        gen = transform(t.normalized(slice(n, None), 0).to(dev))
    return ver.double().cpu().numpy(), gen.double().cpu().numpy()


def evaluate_set(ev: EvalTemplates, transform: Transform | None, gender_folds: int = 3,
                 attackers: Sequence[str] = PAPER_ATTACKERS, seed: int = 0, bootstrap: int = 0,
                 n_jobs: int = 1, source: Path | None = None) -> SetResult:
    """EER, TAR@FAR=0.1% and the attackers' gender balanced accuracies of ``transform`` (None: bare backbone);
    with ``bootstrap`` > 0 also identity-level intervals (eval/leakage.py). ``source``: the checkpoint the
    transform was loaded from, named by errors about its templates."""
    ver, gen = model_templates(ev, transform)
    own = own_comparison(transform)
    check_model_templates(ev.name, transform, (ver, gen), zero_rows_allowed=own is not None, source=source)
    dist = _distances(ver, transform)
    res = verification_from_distances(dist, ev.issame, name=f"'{ev.name}'")
    metrics = {c: float("nan") for c in METRIC_COLUMNS}
    metrics.update({"EER": res.eer, "TAR@FAR=0.1%": res.tar})
    scores = score_diagnostics(dist, ev.issame)
    if not len(gen):
        return SetResult(metrics, scores=scores)
    ctx = AttackContext(seed=seed, similarity=own.similarity if own is not None else None)
    leak = leakage_report(gen, ev.gender_labels, ev.id_labels, gender_folds, name=f"'{ev.name}'",
                          attackers=expand_attackers(attackers), context=ctx, n_bootstrap=bootstrap, seed=seed,
                          n_jobs=n_jobs)
    metrics.update({f"BACC-Gender-{k}": v for k, v in leak.bacc.items() if f"BACC-Gender-{k}" in METRIC_COLUMNS})
    return SetResult(metrics, {k: leak.bacc[k] for k in leak.attackers}, leak, scores)


def _distances(ver: np.ndarray, transform: Transform | None) -> np.ndarray:
    """Pair distances of verification templates: the transform's own comparison if it has one."""
    own = own_comparison(transform)
    return own.pair_distances(ver) if own is not None else pair_distances(ver)


def transform_scores(ev: EvalTemplates, transform: Transform | None) -> ScoreDiagnostics:
    """ScoreDiagnostics of ``transform`` (None: the bare backbone) on ``ev``: verification only, cheap."""
    ver, _ = model_templates(ev, transform)
    return score_diagnostics(_distances(ver, transform), ev.issame)


def bare_scores(ev: EvalTemplates) -> ScoreDiagnostics:
    """ScoreDiagnostics of the bare backbone on ``ev``."""
    return transform_scores(ev, None)


def warn_if_below_grid(where: str, protocol_eer: float, scores: ScoreDiagnostics, logger: logging.Logger) -> bool:
    """Warn when the pair distances of ``where`` (a checkpoint and set) fall mostly within a few steps of the
    protocol's threshold grid: its EER and TAR then measure the grid, not the templates."""
    if not scores.below_grid:
        return False
    logger.warning("%s: 90%% of the pair distances lie within %.1f steps of the protocol's threshold grid (step %g; "
                   "a warning below %d): the protocol's EER %.4f cannot resolve them, the threshold-free EER is %.4f "
                   "(ROC AUC %.4f). The templates have shrunk into a small cone (median impostor angle %.1f "
                   "degrees); see README 'Protocol'.", where, scores.grid_steps, GRID_STEP, FEW_GRID_STEPS,
                   protocol_eer, scores.eer_exact, scores.auc, scores.impostor_angle)
    return True


def warn_if_collapsed(where: str, angle: float, bare_angle: float, logger: logging.Logger) -> bool:
    """Warn when a transform's template spread (median impostor angle) is far below the bare backbone's: the layer
    is collapsing the templates of different people together."""
    if not (math.isfinite(angle) and math.isfinite(bare_angle)) or angle >= COLLAPSE_SHARE * bare_angle:
        return False
    logger.warning("%s: the templates' spread (median angle between the templates of different people) is %.1f "
                   "degrees, below a third of the bare backbone's %.1f: the layer is collapsing templates together, "
                   "and verification numbers from the protocol's threshold grid become unreliable. Likely causes: "
                   "too few training identities, or too strong privacy terms (alpha, beta).", where, angle,
                   bare_angle)
    return True


def warn_if_few_identities(num_identities: int, embedding_size: int, trains_identity_header: bool,
                           logger: logging.Logger) -> bool:
    """Warn before training when a layer is fit with an identity header on fewer identities than the template has
    dimensions: the header's class directions then span only part of the template space, the loss constrains the
    layer only there, and it may fold every unseen person into that span (templates collapse, see warn_if_collapsed).
    """
    if not trains_identity_header or num_identities >= embedding_size:
        return False
    logger.warning("the training set has %d identities, fewer than the %d dimensions of a template (embedding_size): "
                   "the identity loss then constrains the layer only within the %d directions of these identities, and "
                   "the layer may squeeze the templates of people it never saw into a small cone (the protocol's EER "
                   "then reads 0.5 although templates still rank). Train on more identities (at least %d), "
                   "and watch the spread lines of validation and of the sweep.", num_identities, embedding_size,
                   num_identities, embedding_size)
    return True


def check_model_templates(set_name: str, transform: Transform | None, templates: Sequence[np.ndarray],
                          zero_rows_allowed: bool = False, source: Path | None = None) -> None:
    """Refuse a model's templates that hold NaN or infinite values or are zero (they would become NaN metrics), naming
    the run and checkpoint file ``source`` when given (the sweep gives the checkpoint it loaded)."""
    what = (f"checkpoint '{source}' of run '{Path(source).parent.name}'" if source is not None
            else "the bare backbone" if transform is None else "the model")
    for t in templates:
        if not np.isfinite(t).all():
            raise UserError(f"'{set_name}': the templates of {what} contain NaN or infinite values: its weights are "
                            f"NaN or infinite (training diverged, or the file is damaged). Retrain the run, or "
                            f"remove this checkpoint to evaluate the others.")
        zero = ~(t != 0).any(axis=1) if t.ndim == 2 else np.zeros(0, bool)
        if zero.any() and (zero.all() or not zero_rows_allowed):
            raise UserError(f"'{set_name}': {int(zero.sum())} of the {len(t)} templates of {what} are zero (its "
                            f"weights are all zero, or map these faces to zero): they have no direction to compare. "
                            f"Retrain the run, or remove this checkpoint to evaluate the others.")


def check_bare_backbone(ev: EvalTemplates, logger: logging.Logger) -> float:
    """The bare backbone's EER on ``ev`` (verification only, cheap), with the near-chance warning."""
    ver, _ = model_templates(ev, None)
    eer = verification_from_distances(pair_distances(ver), ev.issame, name=f"'{ev.name}'").eer
    warn_if_near_chance(ev.name, eer, logger)
    return eer


def warn_if_near_chance(name: str, eer: float, logger: logging.Logger) -> bool:
    """Log a warning when the bare backbone's EER on a face set is near chance: the numbers are not to be trusted."""
    if not (math.isfinite(eer) and eer > NEAR_CHANCE_EER):
        return False
    logger.warning("the bare backbone's EER on '%s' is %.3f, near chance (> %.1f): check the backbone before trusting "
                   "any number. Likely causes: the wrong architecture or layout for the weights (config option "
                   "network; tools/identify_backbone.py lists the layouts that fit a file and their EERs, e.g. "
                   "sfnet20 against sfnet20_deprecated_v0), the SE option (SE), a template size (embedding_size), "
                   "images not aligned or normalised as the backbone expects (112x112, (x/255-0.5)/0.5, RGB), or a "
                   "misaligned .bin (pairs and issame out of step).", name, eer, NEAR_CHANCE_EER)
    return True


def pic(post: dict[str, float] | SetResult, pre: dict[str, float] | SetResult) -> float | None:
    """PIC = relative privacy gain minus relative identity loss; None where undefined (no gender test, EER_pre=0).

    PIC = ((1 - BACC_post) - (1 - BACC_pre)) / (1 - BACC_pre) - (EER_post - EER_pre) / EER_pre, with BACC the
    mean of the paper's three attackers' balanced accuracies.
    """
    b_post = float(np.mean([post[c] for c in BACC_COLUMNS]))
    b_pre = float(np.mean([pre[c] for c in BACC_COLUMNS]))
    e_post, e_pre = post["EER"], pre["EER"]
    if not all(math.isfinite(v) for v in (b_post, b_pre, e_post, e_pre)) or e_pre == 0 or b_pre == 1:
        return None
    return ((1 - b_post) - (1 - b_pre)) / (1 - b_pre) - (e_post - e_pre) / e_pre
