"""Verification reported as biometrics standards ask: ISO/IEC 19795-1 error rates over all comparisons pooled, DET
curves and score files others can recompute from, and ISO/IEC 19795-10 demographic differentials by gender.

Scores. Every number here is computed from comparison scores s where higher means more similar: for templates
compared by the protocol's squared Euclidean distance d between L2-normalised templates, s = 1 - d/2 (their cosine
similarity; a method with its own distance on the same [0, 4] scale is mapped the same way). The score files hold
exactly these s, so that the numbers recomputed from them are ours to the last bit.

Decision rule and thresholds (ISO/IEC 19795-1: the threshold comes from the impostor scores). A comparison is a
match when s > t. For a target FMR f over N impostor comparisons, k = floor(f * N) false matches are allowed and t is
the (k+1)-th highest impostor score: the most lenient threshold whose FMR does not exceed f. No score equal to t
matches (ties fall on the non-match side for genuine and impostor comparisons alike), so the FMR reached is at most
f, and FNMR = (genuine scores <= t) / genuine comparisons. The rule of three: with N impostor comparisons an FMR
below 3/N cannot be shown at 95% confidence, so FNMR@FMR=f is left empty, with a note, where 3/f > N.

EER: the threshold-free EER of all pairs pooled (exact ROC, linear between its points: eval/verification.py's
``exact_eer_auc``), with a seeded bootstrap interval: subjects are drawn with replacement and each brings all its
pairs (a pair belongs to the subject of its first image, as the probe); without subject ids the pairs themselves are
drawn, and the results say so.

Demographic differentials, where each compared image's gender is known, at the global threshold of FMR = 1e-3 (of all
pairs pooled; where 3/1e-3 exceeds the impostor count, at the smallest FMR the rule of three allows, 3/N, and said
so): FNMR of each gender's genuine pairs, FMR of same-gender and of cross-gender impostor pairs, and their ratios.

As a tool, for templates of any system (``eval/verify.py``):

    python eval/verify.py --templates T.npy --pairs P.csv [--ids IDS.csv] [--fmr 0.01 0.001 0.0001]
                          [--differential-fmr 0.001] [--bootstrap 1000] [--seed 0] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import norm
from torch import nn

from facedata.bin_builder import pair_line_names
from eval.evalset import EvalTemplates, model_templates, own_comparison
from eval.gender_leakage import unit_rows
from eval.leakage_cli import load_templates, read_text_csv
from eval.verification import exact_eer_auc, pair_distances
from utils.errors import UserError, full_disk_named, listing, run_cli
from utils.figures import save_figure, set_margins
from utils.io import atomic_write_text, free_path
from utils.logs import get_logger

__all__ = ["FMR_TARGETS", "DIFFERENTIAL_FMR", "PairMeta", "VerificationReport", "verification_report",
           "fmr_threshold", "read_pairs_sidecar", "pair_meta_for_bin", "write_score_file", "plot_det",
           "RunCheckpoints", "sweep_verification", "check_verification_files", "verification_section", "main"]

log = get_logger(__name__)

FMR_TARGETS = (1e-2, 1e-3, 1e-4)
DIFFERENTIAL_FMR = 1e-3
GENDERS = ("f", "m")
CONFIDENCE = 0.95
BOOTSTRAP_BLOCK = 100           # replicates evaluated together (bounds memory); part of what a seed draws
SIDECAR_COLUMNS = ["pair", "image_a", "image_b", "subject_a", "subject_b", "gender_a", "gender_b"]
# a score file: bob.bio.base's CSV score layout (probe_*, bio_ref_*, score; genuine = the subject ids agree) plus our
# genuine flag and the two images' genders as bob's metadata columns
SCORE_COLUMNS = ["probe_reference_id", "probe_subject_id", "bio_ref_reference_id", "bio_ref_subject_id", "score",
                 "genuine", "probe_gender", "bio_ref_gender"]
SCORES_DIR = "scores"            # the sweep's score files: scores/<run>/<set>_step<step>.csv, scores/bare_backbone/
BARE = "bare_backbone"


def fmr_label(fmr: float) -> str:
    """How an FMR is named in columns and plots: in percent, as the standard and the authors' TAR@FAR=0.1% do."""
    return f"{fmr * 100:g}%"


def report_columns(fmrs: Sequence[float] = FMR_TARGETS) -> list[str]:
    """The result columns of one (model, set), in order (the sweep's CSVs put Step and Dataset first)."""
    return ["Genuine", "Impostor", *(f"FNMR@FMR={fmr_label(f)}" for f in fmrs), "EER-Pooled", "EER-CI-Low",
            "EER-CI-High", "Bootstrap-Unit", "Differential-FMR", "Threshold", "Genuine-f", "Genuine-m", "FNMR-f",
            "FNMR-m", "FNMR-Ratio-f/m", "Impostor-Same-Gender", "Impostor-Cross-Gender", "FMR-Same-Gender",
            "FMR-Cross-Gender", "FMR-Ratio-Cross/Same", "Note"]


VERIFICATION_COLUMNS = ["Step", "Dataset", *report_columns()]
BARE_VERIFICATION_COLUMNS = ["Dataset", *report_columns()]


# ---- what is known of the pairs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairMeta:
    """What is known of each pair's two images: (P, 2) reference ids, subject ids and genders ('f', 'm'; '' where
    unknown), and where that came from."""
    images: np.ndarray
    subjects: np.ndarray
    genders: np.ndarray
    source: str

    @classmethod
    def unknown(cls, n_pairs: int, name: str) -> PairMeta:
        """Nothing known: reference ids name the pair and its side, subjects and genders are empty."""
        images = np.array([[f"{name}/pair{p}/{side}" for side in "ab"] for p in range(n_pairs)], dtype=object)
        empty = np.full((n_pairs, 2), "", dtype=object)
        return cls(images.reshape(n_pairs, 2), empty, empty.copy(), "unknown")

    @property
    def subjects_known(self) -> bool:
        return bool(len(self.subjects)) and bool(np.all(self.subjects != ""))

    @property
    def genders_known(self) -> np.ndarray:
        """(P,) whether both images' genders are known."""
        return np.all(self.genders != "", axis=1)


def _check_consistent(subjects: Sequence[str], genuine: bool, where: str) -> None:
    """Both subject ids known: they agree exactly for a genuine pair (what bob.bio.base's readers assume)."""
    a, b = subjects
    if a and b and (a == b) != genuine:
        raise UserError(f"{where}: subjects '{a}' and '{b}' for a {'genuine' if genuine else 'impostor'} pair; a "
                        f"genuine pair compares two images of one subject and an impostor pair two subjects. Fix the "
                        f"subject columns (or the pair order, which must be the .bin's).")


def read_pairs_sidecar(path: str | Path, issame: np.ndarray) -> PairMeta:
    """The pairs sidecar ``<name>.pairs.csv`` of a .bin: one row per pair (``pair`` its 0-based index in the .bin's
    pair order) with its images, subjects and genders (f, m or empty). A malformed file is a UserError naming it and
    the line."""
    path, issame = Path(path), np.asarray(issame, dtype=bool)
    n = len(issame)
    rows = csv.reader(io.StringIO(_text(path, "pairs sidecar")))
    header = [h.strip() for h in next(rows, [])]
    missing = [c for c in SIDECAR_COLUMNS if c not in header]
    if missing:
        raise UserError(f"pairs sidecar '{path}' line 1: the header {header} lacks {missing}; it must name the "
                        f"columns {', '.join(SIDECAR_COLUMNS)}. Fix or remove the file.")
    col = {c: header.index(c) for c in SIDECAR_COLUMNS}
    images = np.full((n, 2), "", dtype=object)
    subjects, genders = images.copy(), images.copy()
    seen = np.zeros(n, dtype=bool)
    for line, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"pairs sidecar '{path}' line {line}"
        if len(row) != len(header):
            raise UserError(f"{where}: {len(row)} fields, the header has {len(header)}. Fix or remove the file.")
        cells = {c: row[i].strip() for c, i in col.items()}
        if not re.fullmatch(r"\d+", cells["pair"]) or int(cells["pair"]) >= n:
            raise UserError(f"{where}: pair '{cells['pair']}' is not a pair index from 0 to {n - 1} (the .bin holds "
                            f"{n} pairs). The sidecar must belong to this .bin; rebuild both together.")
        p = int(cells["pair"])
        if seen[p]:
            raise UserError(f"{where}: pair {p} is listed twice. Fix or remove the file.")
        seen[p] = True
        for k, side in enumerate("ab"):
            g = cells[f"gender_{side}"].lower()
            if g not in ("", *GENDERS):
                raise UserError(f"{where}: gender_{side} is '{cells[f'gender_{side}']}'; it must be f, m or empty "
                                f"(unknown). Fix or remove the file.")
            images[p, k], subjects[p, k], genders[p, k] = cells[f"image_{side}"], cells[f"subject_{side}"], g
        _check_consistent(subjects[p], bool(issame[p]), where)
    if not seen.all():
        absent = np.flatnonzero(~seen)
        raise UserError(f"pairs sidecar '{path}' lists {int(seen.sum())} of the .bin's {n} pairs (missing: pair "
                        f"{listing([str(p) for p in absent])}). It must list every pair; rebuild it with the .bin.")
    fallback = PairMeta.unknown(n, path.name.removesuffix(".pairs.csv"))
    images = np.where(images == "", fallback.images, images)
    return PairMeta(images, subjects, genders, str(path))


def _text(path: Path, what: str) -> str:
    """A text file's content, or a UserError naming it as ``what``."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} '{path}' could not be read as text ({type(exc).__name__}: {exc}). Fix or remove "
                        f"it.") from None


def _lfw_names(path: Path) -> set[str]:
    """Image names (``Name_0001``) of an LFW gender list (one image file name per line)."""
    return {Path(line.strip().replace("\\", "/")).stem for line in _text(path, "LFW gender list").splitlines()
            if line.strip()}


def read_lfw_pairs(path: str | Path, issame: np.ndarray, female: Path | None = None,
                   male: Path | None = None) -> PairMeta:
    """LFW's ``pairs.txt`` (``name i j`` genuine, ``name1 i name2 j`` impostor, after a header line of numbers),
    whose order is that of insightface's lfw.bin; genders per image from the LFW site's gender lists where given
    (images in neither list stay unknown)."""
    path, issame = Path(path), np.asarray(issame, dtype=bool)
    females = _lfw_names(female) if female else set()
    males = _lfw_names(male) if male else set()
    images: list[list[str]] = []
    subjects: list[list[str]] = []
    genders: list[list[str]] = []
    for line, text in enumerate(_text(path, "LFW pairs file").splitlines(), start=1):
        parts = text.split()
        if not parts or (line == 1 and all(p.isdigit() for p in parts)):
            continue
        where = f"LFW pairs file '{path}' line {line}"
        named = pair_line_names(parts, where)
        if not all(i.isdigit() for _, i in named):
            raise UserError(f"{where}: image numbers must be whole numbers, got '{text.strip()}'.")
        if len(images) >= len(issame):
            raise UserError(f"{where}: more pairs than the .bin's {len(issame)}; the file must list the .bin's pairs "
                            f"in its order.")
        ids = [f"{name}_{int(i):04d}" for name, i in named]
        _check_consistent([named[0][0], named[1][0]], bool(issame[len(images)]), where)
        images.append(ids)
        subjects.append([name for name, _ in named])
        genders.append(["f" if i in females else "m" if i in males else "" for i in ids])
    if len(images) != len(issame):
        raise UserError(f"LFW pairs file '{path}' lists {len(images)} pairs, the .bin {len(issame)}; it must list the "
                        f"same pairs in the same order.")
    return PairMeta(np.array(images, dtype=object), np.array(subjects, dtype=object),
                    np.array(genders, dtype=object), str(path))


def pair_meta_for_bin(bin_path: str | Path, issame: np.ndarray) -> PairMeta:
    """What is known of a .bin's pairs: its sidecar ``<name>.pairs.csv`` if present; else LFW's pairs.txt saved as
    ``<name>.pairs.txt`` (with ``female_names.txt`` / ``male_names.txt`` beside it for genders); else nothing."""
    bin_path = Path(bin_path)
    sidecar, lfw = bin_path.with_suffix(".pairs.csv"), bin_path.with_suffix(".pairs.txt")
    if sidecar.is_file():
        return read_pairs_sidecar(sidecar, issame)
    if lfw.is_file():
        lists = [bin_path.parent / f"{g}_names.txt" for g in ("female", "male")]
        return read_lfw_pairs(lfw, issame, *(p if p.is_file() else None for p in lists))
    return PairMeta.unknown(len(issame), bin_path.stem)


# ---- the metrics ---------------------------------------------------------------------------------------------------

def check_fmrs(fmrs: Sequence[float], option: str = "--fmr") -> tuple[float, ...]:
    """FMR targets strictly between 0 and 1, else a UserError naming ``option``."""
    bad = [f for f in fmrs if not (isinstance(f, (int, float)) and 0 < f < 1)]
    if bad or not fmrs:
        raise UserError(f"{option}: every FMR must lie strictly between 0 and 1 (e.g. 0.001 for 0.1%); got "
                        f"{', '.join(map(str, bad)) or 'none'}.")
    return tuple(float(f) for f in fmrs)


def fmr_threshold(impostor: np.ndarray, fmr: float) -> float:
    """The most lenient threshold t whose FMR (impostor scores > t) does not exceed ``fmr``: the (k+1)-th highest
    impostor score, k = floor(fmr * N) (-inf, everything matching, when k >= N)."""
    imp = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    k = math.floor(fmr * len(imp) + 1e-9)    # the tolerance keeps 0.29 * 100 at 29
    return float(imp[k]) if k < len(imp) else -math.inf


def rule_of_three(n_impostor: int, fmr: float) -> bool:
    """Whether ``n_impostor`` comparisons can show an FMR of ``fmr`` (3 / fmr of them are needed)."""
    return n_impostor * fmr >= 3 - 1e-9


def similarity_from_distance(dist: np.ndarray) -> np.ndarray:
    """Scores (higher: more similar) of squared Euclidean distances between unit templates: s = 1 - d/2."""
    return 1.0 - np.asarray(dist, dtype=np.float64) / 2


def check_scores(scores: np.ndarray, genuine: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite scores with both genuine and impostor comparisons, else a UserError naming ``name``."""
    scores, genuine = np.asarray(scores, dtype=np.float64), np.asarray(genuine, dtype=bool)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise UserError(f"{name}: {len(bad)} comparison score(s) are NaN or infinite (pairs "
                        f"{listing([str(p) for p in bad[:20]])}, counting from 0); their templates are NaN, infinite "
                        f"or zero. Fix how the templates were computed, or leave those pairs out.")
    for flag, kind in ((True, "genuine"), (False, "impostor")):
        if not np.any(genuine == flag):
            raise UserError(f"{name}: there are no {kind} pairs among the {len(genuine)}; FNMR, FMR and the EER need "
                            f"both genuine and impostor comparisons.")
    return scores, genuine


def _weighted_eer(scores: np.ndarray, genuine: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) threshold-free EERs of the scores with (B, P) pair weights (a bootstrap's multiplicities): the ROC over
    every distinct score, linear between its points where FMR = FNMR (as exact_eer_auc); NaN where a replicate has
    no genuine or no impostor weight."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]   # a ROC point after each group of tied scores
    w = weights[:, order]
    gen = np.cumsum(w * genuine[order], axis=1)[:, ends]
    imp = np.cumsum(w, axis=1)[:, ends] - gen
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = gen / gen[:, -1:], imp / imp[:, -1:]
    gap = fpr + tpr - 1.0                 # from -1 at the origin (before the first point) to +1 at the last
    rows = np.arange(len(w))
    k = np.argmax(gap >= 0, axis=1)
    first = k == 0
    prev_fpr = np.where(first, 0.0, fpr[rows, k - 1])
    prev_gap = np.where(first, -1.0, gap[rows, k - 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(gap[rows, k] == 0, 1.0, -prev_gap / (gap[rows, k] - prev_gap))
    eer = prev_fpr + t * (fpr[rows, k] - prev_fpr)
    return np.where(np.isfinite(gap[:, -1]), eer, np.nan)


def bootstrap_eer(scores: np.ndarray, genuine: np.ndarray, subjects: np.ndarray | None, n_bootstrap: int,
                  seed: int, confidence: float = CONFIDENCE) -> tuple[float, float, str]:
    """(low, high, unit) of the EER's bootstrap interval: ``subjects`` (the subject of each pair's first image)
    drawn with replacement, each bringing its pairs, or the pairs themselves without subjects (unit 'pairs')."""
    if n_bootstrap <= 0:
        return math.nan, math.nan, ""
    if subjects is not None:
        _, unit_of_pair = np.unique(subjects, return_inverse=True)
        unit = "subjects"
    else:
        unit_of_pair, unit = np.arange(len(scores)), "pairs"
    n_units = int(unit_of_pair.max()) + 1
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_bootstrap, BOOTSTRAP_BLOCK):
        b = min(BOOTSTRAP_BLOCK, n_bootstrap - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        counts = np.bincount((np.arange(b)[:, None] * n_units + draws).ravel(),
                             minlength=b * n_units).reshape(b, n_units)
        reps.append(_weighted_eer(scores, genuine, counts[:, unit_of_pair].astype(np.float64)))
    r = np.concatenate(reps)
    r = r[np.isfinite(r)]
    if not len(r):
        return math.nan, math.nan, unit
    low, high = np.quantile(r, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high), unit


@dataclass
class VerificationReport:
    """ISO/IEC 19795-1 results of one set of comparisons and, where genders are known, its 19795-10 differentials;
    NaN where a value is not defined (the notes say why)."""
    n_genuine: int
    n_impostor: int
    fnmr: dict[float, float]
    eer: float
    eer_ci: tuple[float, float]
    bootstrap_unit: str
    differential_fmr: float
    threshold: float
    genuine_by_gender: dict[str, int] = field(default_factory=dict)
    fnmr_by_gender: dict[str, float] = field(default_factory=dict)
    impostor_same: int = 0
    impostor_cross: int = 0
    fmr_same: float = math.nan
    fmr_cross: float = math.nan
    notes: list[str] = field(default_factory=list)

    @property
    def fnmr_ratio(self) -> float:
        return _ratio(self.fnmr_by_gender.get("f", math.nan), self.fnmr_by_gender.get("m", math.nan))

    @property
    def fmr_ratio(self) -> float:
        return _ratio(self.fmr_cross, self.fmr_same)

    def cells(self) -> dict[str, str]:
        """The report's columns (report_columns of its FMRs) as CSV cells: full values, empty where undefined."""
        values: list[object] = [self.n_genuine, self.n_impostor, *self.fnmr.values(), self.eer, *self.eer_ci,
                                self.bootstrap_unit, self.differential_fmr, self.threshold,
                                *(self.genuine_by_gender.get(g, "") for g in GENDERS),
                                *(self.fnmr_by_gender.get(g, math.nan) for g in GENDERS), self.fnmr_ratio,
                                *((self.impostor_same, self.impostor_cross) if self.genders_known else ("", "")),
                                self.fmr_same, self.fmr_cross,
                                self.fmr_ratio, "; ".join(self.notes)]
        return dict(zip(report_columns(tuple(self.fnmr)), map(_cell, values)))

    @property
    def genders_known(self) -> bool:
        """Whether the differentials were computed (some pair's two genders are known)."""
        return math.isfinite(self.differential_fmr)


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _cell(v: object) -> str:
    """A CSV cell: numbers in full (repr), empty where undefined (never NaN or inf)."""
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if math.isfinite(v) else ""
    return str(v)


def verification_report(scores: np.ndarray, genuine: np.ndarray, meta: PairMeta | None = None,
                        fmrs: Sequence[float] = FMR_TARGETS, differential_fmr: float = DIFFERENTIAL_FMR,
                        n_bootstrap: int = 1000, seed: int = 0, name: str = "scores") -> VerificationReport:
    """Everything this module reports for (P,) comparison scores (higher: more similar) and genuine flags; ``meta``
    gives subjects (the EER interval's unit) and genders (the differentials) where known."""
    scores, genuine = check_scores(scores, genuine, name)
    fmrs = check_fmrs(fmrs)
    check_fmrs([differential_fmr], "the differentials' FMR")
    meta = meta if meta is not None else PairMeta.unknown(len(scores), name)
    gen, imp = scores[genuine], scores[~genuine]
    notes = []
    fnmr = {}
    for f in fmrs:
        if rule_of_three(len(imp), f):
            fnmr[f] = float(np.mean(gen <= fmr_threshold(imp, f)))
        else:
            fnmr[f] = math.nan
            notes.append(f"FNMR@FMR={fmr_label(f)} empty: the rule of three needs {math.ceil(3 / f - 1e-9)} impostor "
                         f"comparisons, there are {len(imp)}")
    eer, _ = exact_eer_auc(-scores, genuine)
    subjects = meta.subjects[:, 0] if meta.subjects_known else None
    low, high, unit = bootstrap_eer(scores, genuine, subjects, n_bootstrap, seed)
    if unit == "pairs":
        notes.append("EER interval from resampled pairs: subject ids unknown")
    rep = VerificationReport(int(genuine.sum()), int((~genuine).sum()), fnmr, eer, (low, high), unit, math.nan,
                             math.nan, notes=notes)
    if not meta.genders_known.any():
        notes.append("no differentials: the genders of the pair images are unknown")
        return rep
    rep.differential_fmr = differential_fmr if rule_of_three(len(imp), differential_fmr) else min(1.0, 3 / len(imp))
    if rep.differential_fmr != differential_fmr:
        notes.append(f"differentials at FMR={fmr_label(rep.differential_fmr)}, the smallest the rule of three "
                     f"allows with {len(imp)} impostor comparisons (not {fmr_label(differential_fmr)})")
    rep.threshold = fmr_threshold(imp, rep.differential_fmr)
    _differentials(rep, scores, genuine, meta.genders, rep.threshold)
    return rep


def _differentials(rep: VerificationReport, scores: np.ndarray, genuine: np.ndarray, genders: np.ndarray,
                   threshold: float) -> None:
    """Fill ``rep``'s per-gender FNMR and same-/cross-gender FMR at the global ``threshold``, over the pairs whose
    two images' genders are known (a genuine pair counts for its gender when both images agree)."""
    known = np.all(genders != "", axis=1)
    match = scores > threshold
    for g in GENDERS:
        mine = genuine & known & (genders[:, 0] == g) & (genders[:, 1] == g)
        if mine.any():
            rep.genuine_by_gender[g] = int(mine.sum())
            rep.fnmr_by_gender[g] = float(np.mean(~match[mine]))
    same = ~genuine & known & (genders[:, 0] == genders[:, 1])
    cross = ~genuine & known & (genders[:, 0] != genders[:, 1])
    rep.impostor_same, rep.impostor_cross = int(same.sum()), int(cross.sum())
    rep.fmr_same = float(np.mean(match[same])) if same.any() else math.nan
    rep.fmr_cross = float(np.mean(match[cross])) if cross.any() else math.nan


# ---- score files and DET curves ------------------------------------------------------------------------------------

def score_file_text(scores: np.ndarray, genuine: np.ndarray, meta: PairMeta) -> str:
    """A score file: one row per pair in bob.bio.base's CSV layout (SCORE_COLUMNS). Unknown subject ids are made up
    per pair ('pair<p>', with '-a'/'-b' for the two people of an impostor pair) so that, as bob's readers assume,
    the two ids agree exactly for the genuine pairs."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for p, (s, same) in enumerate(zip(np.asarray(scores, dtype=np.float64), np.asarray(genuine, dtype=bool))):
        a, b = meta.subjects[p]
        if not a or not b:
            a, b = (a or b or f"pair{p}",) * 2 if same else (a or f"pair{p}-a", b or f"pair{p}-b")
        writer.writerow([meta.images[p, 0], a, meta.images[p, 1], b, repr(float(s)), int(same), *meta.genders[p]])
    return buf.getvalue()


def write_score_file(path: str | Path, scores: np.ndarray, genuine: np.ndarray, meta: PairMeta) -> Path:
    """Write a score file atomically (unchanged content is left as it is)."""
    path = Path(path)
    text = score_file_text(scores, genuine, meta)
    if not (path.is_file() and path.read_text() == text):
        with full_disk_named(path.parent, "the results folder"):
            atomic_write_text(path, text)
    return path


def read_score_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, genuine) of one of our score files."""
    table = pd.read_csv(path, usecols=["score", "genuine"])
    return table["score"].to_numpy(np.float64), table["genuine"].to_numpy() == 1


def det_points(scores: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) at every distinct score as threshold (match: s > t), from the strictest to the most lenient."""
    scores, genuine = np.asarray(scores, dtype=np.float64), np.asarray(genuine, dtype=bool)
    t = np.unique(scores)[::-1]
    imp, gen = np.sort(scores[~genuine]), np.sort(scores[genuine])
    fmr = (len(imp) - np.searchsorted(imp, t, side="right")) / max(len(imp), 1)
    fnmr = np.searchsorted(gen, t, side="right") / max(len(gen), 1)
    return fmr, fnmr


DET_TICKS = [0.0001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
DET_RANGE = (0.0001, 0.5)


def plot_det(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, path: str | Path) -> Path:
    """One DET plot (FNMR against FMR on normal-deviate axes, ticks labelled in %, as ISO/IEC 19795-1 draws them) of
    several (label, scores, genuine) curves; rates beyond the axes are drawn at their edge."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    edge = norm.ppf([DET_RANGE[0] / 2, 0.999])
    for label, scores, genuine in curves:
        fmr, fnmr = det_points(scores, genuine)
        x = np.clip(norm.ppf(np.clip(fmr, 1e-12, 1 - 1e-12)), *edge)
        y = np.clip(norm.ppf(np.clip(fnmr, 1e-12, 1 - 1e-12)), *edge)
        ax.step(x, y, where="post", lw=1.3, label=label)
    ticks = norm.ppf(DET_TICKS)
    labels = [f"{100 * v:g}" for v in DET_TICKS]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlim(*norm.ppf(DET_RANGE))
    ax.set_ylim(*norm.ppf(DET_RANGE))
    ax.set_xlabel("false match rate FMR (%)")
    ax.set_ylabel("false non-match rate FNMR (%)")
    ax.plot(norm.ppf(DET_RANGE), norm.ppf(DET_RANGE), ls=":", c="gray", lw=0.8)   # FMR = FNMR: the EER line
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")   # DET curves run from upper left to lower right
    set_margins(fig, left=0.85, right=0.2, bottom=0.6, top=0.4)
    return save_figure(fig, path, "the results folder")


# ---- in the sweep --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunCheckpoints:
    """A swept run as this module needs it: its name, its (step, checkpoint) pairs, and how to load a transform."""
    name: str
    checkpoints: Sequence[tuple[int, Path]]
    load: Callable[[Path], nn.Module]


def set_scores(ev: EvalTemplates, transform: nn.Module | None) -> np.ndarray:
    """(P,) comparison scores of a model on a set: its verification templates (flip-summed), compared by its own
    distance if it has one, else the protocol's, then s = 1 - d/2."""
    ver, _ = model_templates(ev, transform)
    own = own_comparison(transform)
    return similarity_from_distance(own.pair_distances(ver) if own is not None else pair_distances(ver))


def score_path(out_dir: Path, run: str | None, dataset: str, step: int | None = None) -> Path:
    """Where the sweep keeps the score file of a run's checkpoint (``run`` None: the bare backbone) on a set."""
    if run is None:
        return out_dir / SCORES_DIR / BARE / f"{dataset}.csv"
    return out_dir / SCORES_DIR / run / f"{dataset}_step{step}.csv"


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """One of our verification CSVs as text cells (empty if absent); another file there is refused, not replaced."""
    if not path.is_file():
        return pd.DataFrame(columns=columns, dtype=str)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != columns:
        raise UserError(f"verification file '{path}' has the columns {list(table.columns)}, expected {columns}. It "
                        f"is not one of this tool's files: move it away or choose another --log-root.")
    return table


def _upsert(path: Path, columns: list[str], rows: list[dict[str, str]], key: list[str]) -> None:
    """Replace the rows of ``path`` with the same ``key`` by ``rows`` (added at the end); rewritten atomically, and
    only when its content changes."""
    old = _read_table(path, columns)
    new = pd.DataFrame(rows, columns=columns)
    if len(old):
        taken = set(map(tuple, new[key].to_numpy()))
        old = old[[tuple(r) not in taken for r in old[key].to_numpy()]]
    text = pd.concat([old, new], ignore_index=True).to_csv(index=False, lineterminator="\n")
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


def check_verification_files(out_dir: Path, runs: Sequence[str]) -> None:
    """Pre-flight: every verification CSV the sweep would add rows to is ours or absent."""
    _read_table(out_dir / f"{BARE}_verification.csv", BARE_VERIFICATION_COLUMNS)
    for run in runs:
        _read_table(out_dir / f"{run}_verification.csv", VERIFICATION_COLUMNS)


def _summary(rep: VerificationReport) -> str:
    """A log line's numbers."""
    fnmr = ", ".join(f"FNMR@FMR={fmr_label(f)} {'n/a' if math.isnan(v) else f'{v:.4f}'}" for f, v in rep.fnmr.items())
    cross = "n/a" if math.isnan(rep.fmr_cross) else f"{rep.fmr_cross:.4f}"
    return (f"{rep.n_genuine} genuine / {rep.n_impostor} impostor pairs, {fnmr}, pooled EER {rep.eer:.4f}; "
            f"cross-gender FMR {cross} at FMR={fmr_label(rep.differential_fmr)}")


def sweep_verification(out_dir: Path, rec: str | Path, sets: Sequence[EvalTemplates], runs: Sequence[RunCheckpoints],
                       force: bool, seed: int, n_bootstrap: int, logger=log) -> bool:
    """The sweep's verification report: ``bare_backbone_verification.csv`` (recomputed each time, rewritten only on
    a change) and every run's ``<run>_verification.csv`` (checkpoints not yet there, all with ``force``), with a
    score file per (checkpoint, set) under ``scores/``. True when anything was written."""
    out_dir = Path(out_dir)
    metas = {ev.name: pair_meta_for_bin(Path(rec) / f"{ev.name}.bin", ev.issame) for ev in sets}
    changed = False
    bare_path = out_dir / f"{BARE}_verification.csv"
    before = bare_path.read_text() if bare_path.is_file() else None
    rows = []
    for ev in sets:
        scores = set_scores(ev, None)
        rep = verification_report(scores, ev.issame, metas[ev.name], n_bootstrap=n_bootstrap, seed=seed,
                                  name=f"bare backbone on '{ev.name}'")
        write_score_file(score_path(out_dir, None, ev.name), scores, ev.issame, metas[ev.name])
        rows.append({"Dataset": ev.name, **rep.cells()})
        logger.info("bare backbone on %s: %s (pairs: %s)", ev.name, _summary(rep), metas[ev.name].source)
    _upsert(bare_path, BARE_VERIFICATION_COLUMNS, rows, ["Dataset"])
    changed |= before != bare_path.read_text()
    for run in runs:
        path = out_dir / f"{run.name}_verification.csv"
        done = set(map(tuple, _read_table(path, VERIFICATION_COLUMNS)[["Step", "Dataset"]].to_numpy()))
        for step, ckpt in run.checkpoints:
            todo = [ev for ev in sets if force or (str(step), ev.name) not in done]
            if not todo:
                continue
            transform = run.load(ckpt)
            rows = []
            for ev in todo:
                scores = set_scores(ev, transform)
                rep = verification_report(scores, ev.issame, metas[ev.name], n_bootstrap=n_bootstrap, seed=seed,
                                          name=f"{run.name} step {step} ({Path(ckpt).name}) on '{ev.name}'")
                write_score_file(score_path(out_dir, run.name, ev.name, step), scores, ev.issame, metas[ev.name])
                rows.append({"Step": str(step), "Dataset": ev.name, **rep.cells()})
                logger.info("%s step %d %s: %s", run.name, step, ev.name, _summary(rep))
            _upsert(path, VERIFICATION_COLUMNS, rows, ["Step", "Dataset"])
            changed = True
    return changed


# ---- in the report -------------------------------------------------------------------------------------------------

def _num(v: str | float | None) -> float:
    """A cell of our CSVs as a number (NaN where empty)."""
    try:
        return float(v) if v not in ("", None) else math.nan
    except (TypeError, ValueError):
        return math.nan


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}%"


def _shown_step(metrics: pd.DataFrame, table: pd.DataFrame, run: str, dataset: str) -> int | None:
    """A run's checkpoint shown for a set: the best PIC (as the comparison table's), else its last verified step."""
    steps = sorted(int(s) for s in table.loc[table["Dataset"] == dataset, "Step"])
    if not steps:
        return None
    if not metrics.empty and {"Run", "Step", "Dataset", "PIC"} <= set(metrics.columns):
        rr = metrics[(metrics["Run"] == run) & (metrics["Dataset"] == dataset) & metrics["PIC"].notna()
                     & metrics["Step"].isin(steps)]
        if not rr.empty:
            return int(rr.loc[rr["PIC"].astype(float).idxmax(), "Step"])
    return steps[-1]


def _table_row(model: str, row: pd.Series) -> list[str]:
    fnmr = [c for c in row.index if c.startswith("FNMR@FMR=")]
    ci = (f" [{_num(row['EER-CI-Low']):.4f}, {_num(row['EER-CI-High']):.4f}]"
          if math.isfinite(_num(row["EER-CI-Low"])) else "")
    ratio = _num(row["FMR-Ratio-Cross/Same"])
    return [model, row["Genuine"], row["Impostor"], *(_pct(_num(row[c])) for c in fnmr),
            f"{_num(row['EER-Pooled']):.4f}{ci}", _pct(_num(row["Differential-FMR"])), _pct(_num(row["FNMR-f"])),
            _pct(_num(row["FNMR-m"])), _pct(_num(row["FMR-Same-Gender"])), _pct(_num(row["FMR-Cross-Gender"])),
            "n/a" if math.isnan(ratio) else f"{ratio:.2f}"]


def cross_gender_warnings(bare: pd.Series, table: pd.DataFrame, run: str, dataset: str) -> list[str]:
    """A warning line when any checkpoint of ``run`` matches people of different genders more often than the bare
    backbone does at the same global FMR (19795-10's cross-gender FMR): the checkpoint that does so most is named."""
    before = _num(bare["FMR-Cross-Gender"])
    if math.isnan(before):
        return []
    rows = table[table["Dataset"] == dataset].assign(cross=lambda t: t["FMR-Cross-Gender"].map(_num))
    worse = rows[rows["cross"] > before]
    if worse.empty:
        return []
    w = worse.loc[worse["cross"].idxmax()]
    n, n_bare = int(_num(w["Impostor-Cross-Gender"])), int(_num(bare["Impostor-Cross-Gender"]))
    return [(f"- **Warning** ({run} on {dataset}): the layer raises cross-gender false matches. At the global "
            f"threshold of FMR={_pct(_num(w['Differential-FMR']))}, step {w['Step']} falsely matches "
            f"{round(w['cross'] * n)} of {n} impostor pairs of different genders ({_pct(w['cross'])}), the bare "
            f"backbone {round(before * n_bare)} of {n_bare} ({_pct(before)}); {len(worse)} of the run's {len(rows)} "
            f"checkpoints raise it.")]


def verification_section(out_dir: Path, metrics: pd.DataFrame, runs: Sequence[str]) -> list[str]:
    """report.md's verification section (empty when the sweep wrote no verification files): per set a table of the
    bare backbone and each run's best checkpoint (ISO/IEC 19795-1 rates, pooled EER with its interval, 19795-10
    differentials), a DET plot ``det_<set>.png`` of the same models, and a warning line for every run that raises
    cross-gender false matches above the bare backbone's."""
    out_dir = Path(out_dir)
    bare = _read_table(out_dir / f"{BARE}_verification.csv", BARE_VERIFICATION_COLUMNS)
    tables = {r: _read_table(out_dir / f"{r}_verification.csv", VERIFICATION_COLUMNS) for r in runs}
    datasets = sorted(set(bare["Dataset"]).union(*(set(t["Dataset"]) for t in tables.values())))
    if not datasets:
        return []
    fnmr_cols = [c for c in BARE_VERIFICATION_COLUMNS if c.startswith("FNMR@FMR=")]
    header = ["Model", "Genuine", "Impostor", *fnmr_cols, "EER pooled [95% CI]", "at FMR", "FNMR f", "FNMR m",
              "FMR same gender", "FMR cross gender", "cross/same"]
    lines = ["## Verification as ISO/IEC 19795-1 and demographic differentials (19795-10)", "",
             ("Over all pairs of a set pooled (no folds), scores s = 1 - d/2 (higher: more similar), a match when "
             "s > t; the threshold of FNMR@FMR=f is the (k+1)-th highest impostor score, k = floor(f x impostors). "
             "n/a where the rule of three fails (fewer than 3/f impostor comparisons). The pooled EER's interval is a "
             "seeded bootstrap over subjects (over pairs where subjects are unknown). Differentials where both "
             "images' genders are known, at each model's own global threshold of the FMR in 'at FMR'. Per "
             "checkpoint in `<run>_verification.csv`; score files (bob.bio.base CSV layout) under `scores/`."), ""]
    warnings = []
    for ds in datasets:
        rows, curves = [], []
        b = bare[bare["Dataset"] == ds]
        if len(b):
            rows.append(_table_row("bare backbone", b.iloc[0]))
            curves.append(("bare backbone", score_path(out_dir, None, ds)))
        for run, table in tables.items():
            step = _shown_step(metrics, table, run, ds)
            if step is None:
                continue
            r = table[(table["Dataset"] == ds) & (table["Step"] == str(step))].iloc[0]
            rows.append(_table_row(f"{run} (step {step})", r))
            curves.append((f"{run} (step {step})", score_path(out_dir, run, ds, step)))
            if len(b):
                warnings += cross_gender_warnings(b.iloc[0], table, run, ds)
        lines += [f"### Verification on {ds}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if len(b) and not b.iloc[0]["Differential-FMR"]:
            lines += ["", (f"The genders of {ds}'s pair images are unknown, so there are no differentials: give the "
                           f".bin a sidecar `{ds}.pairs.csv` (README 'Verification as biometrics standards report "
                           f"it').")]
        drawn = [(label, *read_score_file(p)) for label, p in curves if p.is_file()]
        if drawn:
            plot_det(drawn, f"DET on {ds}", out_dir / f"det_{ds}.png")
            lines += ["", f"`det_{ds}.png`: DET curves of these models (normal-deviate axes, in %)."]
        lines.append("")
    if warnings:
        lines += ["### Warnings: cross-gender false matches", "", *warnings, ""]
    return lines


# ---- the tool ------------------------------------------------------------------------------------------------------

TRUE, FALSE = ("1", "true", "yes", "genuine"), ("0", "false", "no", "impostor")


def _read_ids(path: Path) -> dict[str, int]:
    """Template ids, one per template row in order (a one-column text file, or a CSV whose first column is 'id')."""
    try:
        lines = [ln.split(",")[0].strip() for ln in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"ids file '{path}' (--ids) could not be read ({type(exc).__name__}); it must list one "
                        f"template id per line, in the templates' row order.") from None
    if lines and lines[0].lower() == "id":
        lines = lines[1:]
    ids: dict[str, int] = {}
    for row, name in enumerate(lines):
        if not name or name in ids:
            raise UserError(f"ids file '{path}' (--ids): {'an empty' if not name else f'a repeated id {name!r} in'} "
                            f"line for template row {row}; every template needs its own id.")
        ids[name] = row
    return ids


def read_pairs_csv(path: Path, n_templates: int, ids: dict[str, int] | None
                   ) -> tuple[np.ndarray, np.ndarray, PairMeta]:
    """(P, 2) template rows, (P,) genuine flags and what is known of the pairs, from a pairs CSV with the columns
    image_a, image_b (template rows counted from 0, or ids of --ids), genuine (1/0, true/false) and optionally
    subject_a, subject_b, gender_a, gender_b (f, m or empty)."""
    table = read_text_csv(path, "pairs file (--pairs)", "one row per pair and the columns image_a, image_b, "
                                                         "genuine (and optionally subject_a, subject_b, gender_a, "
                                                         "gender_b)")
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("image_a", "image_b", "genuine") if c not in table.columns]
    if missing:
        raise UserError(f"pairs file '{path}' has no column(s) {missing}; its columns are {list(table.columns)}. It "
                        f"needs image_a, image_b (template rows or --ids ids) and genuine (1/0).")
    if table.empty:
        raise UserError(f"pairs file '{path}' holds no pairs.")
    rows = np.zeros((len(table), 2), dtype=np.int64)
    cells = {c: table[c].str.strip().to_numpy() if c in table.columns else np.full(len(table), "", dtype=object)
             for c in SIDECAR_COLUMNS[1:] + ["genuine"]}
    genuine = np.zeros(len(table), dtype=bool)
    for i in range(len(table)):
        where = f"pairs file '{path}' line {i + 2}"
        for k, side in enumerate("ab"):
            ref = cells[f"image_{side}"][i]
            if ids is not None:
                if ref not in ids:
                    raise UserError(f"{where}: image_{side} '{ref}' is not an id of the --ids file; name templates "
                                    f"by the ids listed there.")
                rows[i, k] = ids[ref]
            elif re.fullmatch(r"\d+", ref) and int(ref) < n_templates:
                rows[i, k] = int(ref)
            else:
                raise UserError(f"{where}: image_{side} '{ref}' is not a template row from 0 to {n_templates - 1}; "
                                f"name rows of the templates file, or give --ids to name them by id.")
            g = cells[f"gender_{side}"][i].lower()
            if g not in ("", *GENDERS):
                raise UserError(f"{where}: gender_{side} '{g}' must be f, m or empty (unknown).")
        flag = cells["genuine"][i].lower()
        if flag not in TRUE + FALSE:
            raise UserError(f"{where}: genuine '{cells['genuine'][i]}' must be 1/0 (or true/false).")
        genuine[i] = flag in TRUE
        _check_consistent([cells["subject_a"][i], cells["subject_b"][i]], bool(genuine[i]), where)
    both = {c: np.stack([cells[f"{c}_a"], cells[f"{c}_b"]], axis=1).astype(str) for c in ("image", "subject", "gender")}
    meta = PairMeta(both["image"].astype(object), both["subject"].astype(object),
                    np.char.lower(both["gender"]).astype(object), str(path))
    return rows, genuine, meta


def main(argv: list[str] | None = None) -> int:
    """Command line: verification of a .npy of templates over a pairs CSV; table printed, CSV, score file and DET
    plot written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", required=True, help=".npy file of an (N, D) array, one template per row")
    parser.add_argument("--pairs", required=True,
                        help="CSV: image_a, image_b (rows or --ids ids), genuine; optional subject_*, gender_*")
    parser.add_argument("--ids", default=None, help="one id per template row (a text file or a CSV headed 'id')")
    parser.add_argument("--fmr", type=float, nargs="+", default=list(FMR_TARGETS), help="FMR targets of FNMR@FMR")
    parser.add_argument("--differential-fmr", type=float, default=DIFFERENTIAL_FMR,
                        help="global FMR whose threshold the gender differentials use")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap replicates of the EER interval (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--out", default=".", help="folder for <templates>_verification.csv, _scores.csv, _det.png")
    args = parser.parse_args(argv)

    def body() -> None:
        fmrs = check_fmrs(args.fmr)
        check_fmrs([args.differential_fmr], "--differential-fmr")
        if args.bootstrap < 0 or not 0 <= args.seed < 2 ** 32:
            raise UserError(f"--bootstrap must be at least 0 and --seed a whole number from 0 to {2 ** 32 - 1} (got "
                            f"{args.bootstrap} and {args.seed}).")
        templates = Path(args.templates)
        x = load_templates(templates)
        ids = _read_ids(Path(args.ids)) if args.ids else None
        if ids is not None and len(ids) != len(x):
            raise UserError(f"ids file '{args.ids}' lists {len(ids)} ids, '{templates}' holds {len(x)} templates; "
                            f"they must match one to one, in order.")
        rows, genuine, meta = read_pairs_csv(Path(args.pairs), len(x), ids)
        used = np.unique(rows)
        with np.errstate(all="ignore"):
            t = unit_rows(x[used])
        bad = used[~np.isfinite(t).all(axis=1)]
        if len(bad):
            raise UserError(f"'{templates}': template row(s) {listing([str(r) for r in bad])} (counting from 0) hold "
                            f"NaN or infinite values or only zeros, so their scores would be NaN. Fix them or leave "
                            f"their pairs out of '{args.pairs}'.")
        unit = np.zeros((len(x), x.shape[1]))
        unit[used] = t
        scores = np.sum(unit[rows[:, 0]] * unit[rows[:, 1]], axis=1)   # cosine similarity = 1 - d/2
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out '{out}' is a file; name a folder for the results.")
        rep = verification_report(scores, genuine, meta, fmrs, args.differential_fmr, args.bootstrap, args.seed,
                                  name=str(args.pairs))
        cells = rep.cells()
        print(f"{templates}: {len(x)} templates; '{args.pairs}': {rep.n_genuine} genuine and {rep.n_impostor} "
              f"impostor comparisons (cosine similarity, a match when s > t)")
        for column, value in cells.items():
            if column != "Note":
                print(f"  {column:24s} {value or 'n/a'}")
        for note in rep.notes:
            print(f"  note: {note}")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(cells), lineterminator="\n")
        writer.writeheader()
        writer.writerow(cells)
        try:
            path = free_path(out / f"{templates.stem}_verification.csv")   # stem_2.csv... if taken
            atomic_write_text(path, text.getvalue())
            scores_path = free_path(out / f"{templates.stem}_scores.csv")
            write_score_file(scores_path, scores, genuine, meta)
            det = plot_det([(templates.stem, scores, genuine)], f"DET of {templates.name}",
                           free_path(out / f"{templates.stem}_det.png"))
        except OSError as exc:
            raise UserError(f"cannot write the results to '{out}' ({exc.strerror or exc}); choose another --out.") \
                from None
        print(f"written: {path}, {scores_path}, {det}")
    return run_cli(body)
