"""report.md and PNG plots of an evaluation sweep (pandas for the tables, matplotlib headless for the plots).

The comparison table puts, per evaluation set, the bare backbone first and then every run (its method and settings
read from its run.json): the last checkpoint, and marked separately the checkpoint with the best PIC. With
attackers beyond the paper's it adds worst-case leakage and its interval.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from eval.biometrics import verification_section
from eval.evalset import COLLAPSE_SHARE, METRIC_COLUMNS, EvalTemplates
from eval.gender_leakage import WORST
from eval.verification import FEW_GRID_STEPS, GRID_STEP, ScoreDiagnostics
from pipeline.results import ResultReader
from utils.figures import save_figure, set_margins
from utils.io import atomic_write_text

if TYPE_CHECKING:
    from privacy.runs import SweptRun

# the columns of <run>_diagnostics.csv after Step and Dataset (the sweep writes them): threshold-free EER of the exact
# ROC, ROC AUC, grid steps (0.01) spanned by the central 90% of the pair distances, median impostor angle (degrees)
DIAGNOSTICS = ["EER-Threshold-Free", "ROC-AUC", "Grid-Steps-90%", "Impostor-Angle"]
BARE_COMPARISON = "squared Euclidean"   # what the protocol compares unit templates with (README 'Protocol')
PLOTTED = [("EER", "EER"), ("TAR@FAR=0.1%", "TAR@FAR=0.1%"), ("BACC-Gender-AVG", "gender BACC (avg)"), ("PIC", "PIC")]
LINEAR_ERASURE = ("leace", "inlp")


def _save(fig, path: Path, tight: bool = False) -> None:
    """Write a figure atomically; a full disk or a file-size limit names the results folder and leaves no file."""
    save_figure(fig, path, "the sweep's results folder", tight=tight)


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def plot_curves(run: str, rows: pd.DataFrame, ref: dict[str, dict[str, float]], path: Path) -> None:
    """EER, TAR, gender BACC and PIC against step, one line per dataset, the bare backbone dashed."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    datasets = sorted(rows["Dataset"].unique())
    colors = dict(zip(datasets, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for ax, (col, title) in zip(axes, PLOTTED):
        for ds in datasets:
            rr = rows[rows["Dataset"] == ds].sort_values("Step")
            ax.plot(rr["Step"], rr[col], "o-", ms=3, color=colors[ds], label=ds)
            if col in ref.get(ds, {}) and math.isfinite(ref[ds][col]):
                ax.axhline(ref[ds][col], ls="--", lw=1, color=colors[ds])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{run}: metrics against step (dashed: bare backbone)", y=1 - 0.1 / 3.6)
    set_margins(fig, left=0.55, right=0.15, bottom=0.5, top=0.75, wspace=0.55)
    _save(fig, path)


def _chance_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid, and the chance level of balanced accuracy."""
    ax.axhline(0.5, ls=":", c="gray", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _legend_below(fig, axes) -> None:
    """One legend for all panels, under them, so that it never hides a path."""
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[k] for k in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2 if len(labels) > 3 else len(labels), fontsize=8, frameon=False)


def plot_tradeoff(metrics: pd.DataFrame, labels: dict[str, str], ref: dict[str, dict[str, float]],
                  path: Path) -> None:
    """Every run's path over its checkpoints (gender BACC against EER, the last checkpoint ringed); the bare
    backbone as a star."""
    datasets = sorted(metrics["Dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for run, rr in metrics[metrics["Dataset"] == ds].groupby("Run", sort=False):
            rr = rr.sort_values("Step")
            line, = ax.plot(rr["EER"], rr["BACC-Gender-AVG"], "o-", ms=3, lw=1, label=labels.get(run, run))
            ax.scatter(rr["EER"].iloc[-1:], rr["BACC-Gender-AVG"].iloc[-1:], s=60, facecolors="none",
                       edgecolors=line.get_color())
        if ds in ref:
            ax.scatter([ref[ds]["EER"]], [ref[ds]["BACC-Gender-AVG"]], marker="*", s=240, c="k", zorder=5,
                       label="bare backbone")
        _chance_axes(ax, "EER (lower: better verification)", "gender BACC, paper's 3 (0.5: no leakage)", ds)
    _legend_below(fig, axes[0])
    fig.suptitle("privacy / utility trade-off: each run's path over its checkpoints (ringed: last)")
    _save(fig, path, tight=True)   # the legend of run names under the panels sets the extent


def plot_worst_case(worst: pd.DataFrame, bare: pd.DataFrame, labels: dict[str, str], path: Path) -> None:
    """Worst-case balanced accuracy over all attackers (with its interval) against step; the bare backbone dashed."""
    frame = worst.reset_index()
    datasets = sorted(frame["Dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for run, rr in frame[frame["Dataset"] == ds].groupby("Run", sort=False):
            rr = rr.sort_values("Step")
            line, = ax.plot(rr["Step"], rr["BACC"], "o-", ms=3, label=labels.get(run, run))
            if rr["CI-Low"].notna().all():
                ax.fill_between(rr["Step"], rr["CI-Low"], rr["CI-High"], alpha=0.2, color=line.get_color())
        b = bare[(bare["Dataset"] == ds) & (bare["Attacker"] == WORST)] if not bare.empty else bare
        if len(b):
            ax.axhline(float(b["BACC"].iloc[0]), ls="--", c="k", lw=1, label="bare backbone")
        _chance_axes(ax, "step", "worst-case gender BACC", ds)
    _legend_below(fig, axes[0])
    fig.suptitle("worst-case leakage over all attackers (band: bootstrap interval)")
    _save(fig, path, tight=True)


def centroid_angles(templates: torch.Tensor, genders: np.ndarray) -> np.ndarray:
    """(G, 2) angles in degrees between each template and the two gender centroids of the set."""
    z = F.normalize(templates.double(), dim=1)
    c = F.normalize(torch.stack([z[torch.as_tensor(genders == g)].mean(0) for g in (0, 1)]), dim=1)
    return torch.rad2deg(torch.acos((z @ c.T).clamp(-1, 1))).numpy()


def plot_angles(ev: EvalTemplates, transform: torch.nn.Module, title: str, path: Path) -> None:
    """Angles to the two gender centroids before (bare backbone) and after the method's transform."""
    n = ev.num_pair_images
    before = ev.templates.normalized(slice(n, None), 0)
    with torch.no_grad():
        after = transform.eval().cpu()(before)
    g = ev.gender_labels
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharey="row")
    for r, (name, t) in enumerate((("bare backbone", before), ("with the privacy method", after))):
        ang = centroid_angles(t, g)
        for c in (0, 1):
            ax = axes[r, c]
            bins = np.linspace(ang.min() - 1, ang.max() + 1, 40)
            for gg, color in ((0, "tab:blue"), (1, "tab:red")):
                # one filled outline per histogram: a bar per bin costs a patch each, and the drawing twice as long
                ax.hist(ang[g == gg, c], bins=bins, alpha=0.55, color=color, histtype="stepfilled",
                        label=f"templates of gender {gg}")
            ax.set_title(f"{name}: angle to the gender-{c} centroid", fontsize=11)
            ax.set_xlabel("degrees")
            ax.legend(fontsize=7)
    fig.suptitle(title, y=1 - 0.1 / 6.5)
    set_margins(fig, left=0.5, right=0.1, bottom=0.5, top=0.75, wspace=0.45, hspace=0.85)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------
def _cell(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, (float, np.floating)) and math.isfinite(v) else "n/a"


def _worst_cell(w: pd.Series | None) -> str:
    if w is None:
        return "n/a"
    ci = f" [{w['CI-Low']:.3f}, {w['CI-High']:.3f}]" if pd.notna(w["CI-Low"]) else ""
    return f"{w['BACC']:.4f}{ci} ({w['Reached-By']})"


def _markdown(rows: list[list[str]], header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _scores_cells(diag: pd.DataFrame, run: str, step: object, ds: str) -> list[str]:
    """The threshold-free EER and AUC of a checkpoint from the diagnostics frame (n/a when absent)."""
    if diag.empty:
        return ["n/a", "n/a"]
    hit = diag[(diag["Run"] == run) & (diag["Step"] == step) & (diag["Dataset"] == ds)]
    return [_cell(hit[c].iloc[0]) if len(hit) else "n/a" for c in DIAGNOSTICS[:2]]


def comparison_table(ds: str, metrics: pd.DataFrame, worst: pd.DataFrame, runs: list["SweptRun"],
                     ref: dict[str, float] | None, bare_worst: pd.Series | None,
                     diag: pd.DataFrame | None = None, bare: ScoreDiagnostics | None = None) -> list[str]:
    """Markdown rows of one dataset: bare backbone, then per run its last checkpoint and its best-PIC one; after the
    authors' columns, the threshold-free EER and the ROC AUC."""
    diag = diag if diag is not None else pd.DataFrame()
    header = ["Model", "Method and settings", "Comparison", "Checkpoint", *METRIC_COLUMNS, "PIC",
              "EER (threshold-free)", "ROC AUC"]
    with_worst = not worst.empty
    if with_worst:
        header.append("Worst-case BACC [95% CI] (attacker)")
    rows = []
    if ref is not None:
        rows.append(["bare backbone", "-", BARE_COMPARISON, "-", *(_cell(ref[c]) for c in METRIC_COLUMNS),
                     "0 (by definition)", *((_cell(bare.eer_exact), _cell(bare.auc)) if bare else ("n/a", "n/a"))]
                    + ([_worst_cell(bare_worst)] if with_worst else []))
    for run in runs:
        rr = metrics[(metrics["Run"] == run.name) & (metrics["Dataset"] == ds)].sort_values("Step")
        if rr.empty:
            continue
        picked = [("last", rr.iloc[-1])]
        finite = rr[rr["PIC"].notna()]
        if not finite.empty:
            picked.append(("best PIC", finite.loc[finite["PIC"].idxmax()]))
        for tag, r in picked:
            w = None
            if with_worst and (run.name, r["Step"], ds) in worst.index:
                w = worst.loc[(run.name, r["Step"], ds)]
            rows.append([run.name, run.settings, run.method.comparison, f"{tag} (step {int(r['Step'])})",
                         *(_cell(r[c]) for c in METRIC_COLUMNS), _cell(r["PIC"]),
                         *_scores_cells(diag, run.name, r["Step"], ds)]
                        + ([_worst_cell(w)] if with_worst else []))
    return _markdown(rows, header)


def protocol_warnings(metrics: pd.DataFrame, diag: pd.DataFrame, bare: dict[str, ScoreDiagnostics]) -> list[str]:
    """Markdown list items: every checkpoint whose pair distances fall within a few grid steps (both EERs named), and
    every one whose template spread is far below the bare backbone's."""
    items = []
    for name, sc in bare.items():
        if sc.below_grid:
            items.append(f"- bare backbone on {name}: 90% of the pair distances within {sc.grid_steps:.1f} grid "
                         f"steps; threshold-free EER {sc.eer_exact:.4f}.")
    if diag.empty:
        return items
    eers = metrics.set_index(["Run", "Step", "Dataset"])["EER"] if not metrics.empty else pd.Series(dtype=float)
    for _, r in diag.sort_values(["Run", "Step", "Dataset"]).iterrows():
        key = (r["Run"], r["Step"], r["Dataset"])
        where = f"{r['Run']} step {int(r['Step'])} on {r['Dataset']}"
        if r["Grid-Steps-90%"] < FEW_GRID_STEPS:
            eer = _cell(eers.get(key, float("nan")))
            items.append(f"- {where}: 90% of the pair distances lie within {r['Grid-Steps-90%']:.1f} steps of the "
                         f"protocol's threshold grid (step {GRID_STEP}): the protocol's EER {eer} cannot resolve "
                         f"them; the threshold-free EER is {r['EER-Threshold-Free']:.4f} (ROC AUC "
                         f"{r['ROC-AUC']:.4f}).")
        b = bare.get(r["Dataset"])
        if b is not None and r["Impostor-Angle"] < COLLAPSE_SHARE * b.impostor_angle:
            items.append(f"- {where}: templates collapsed: median impostor angle {r['Impostor-Angle']:.1f} "
                         f"degrees, below a third of the bare backbone's {b.impostor_angle:.1f}.")
    return items


def write_report(out_dir: Path, runs: list["SweptRun"], ref: dict[str, dict[str, float]], sets: list[EvalTemplates],
                 gender_folds: int, bare_scores: dict[str, ScoreDiagnostics] | None = None) -> Path:
    """report.md (warnings, the comparison table per evaluation set, notes) and the plots, from the sweep folder's
    result files (pipeline/results.py, the reader a plan's tables use too)."""
    results = ResultReader().sweep(out_dir, [run.name for run in runs])
    metrics, diag, worst = results.metrics, results.diagnostics, results.worst()
    bare_scores = bare_scores or {}
    labels = {run.name: f"{run.name}: {run.settings}" for run in runs}
    lines = ["# Evaluation report", "", "Runs (method and settings from each run's run.json):", ""]
    lines += _markdown([[run.name, run.settings + ("" if run.described else " (no run.json: the sweep's settings)")]
                        for run in runs], ["Run", "Method and settings"])
    warnings = protocol_warnings(metrics, diag, bare_scores)
    if warnings:
        lines += ["", "## Warnings: where the protocol's numbers stop meaning what they seem to", "",
                  "The protocol's EER and TAR read the ROC at the fixed thresholds 0, 0.01, ..., 3.99 of the squared "
                  "distance; when a layer squeezes the templates into a small cone, the pair distances fall between "
                  "a few of them and the protocol's EER reads near chance although the templates may still rank "
                  "genuine pairs above impostor pairs. The threshold-free EER and the ROC AUC (exact ROC of all "
                  "scores, `<run>_diagnostics.csv`) show what the templates do; a collapsing layer also loses most of "
                  "the templates' spread.", "", *warnings]
    lines += ["", "## Comparison", "",
              "Per evaluation set: the bare backbone, then for every run its last checkpoint and, marked "
              "separately, its checkpoint with the best PIC. BACC-Gender-AVG is the mean of the paper's three "
              "attackers and enters PIC; the comparison column says how templates were compared for verification "
              "(the protocol's: squared Euclidean distance between L2-normalised templates, which ranks pairs as "
              "cosine similarity does). After PIC, beside the protocol: the threshold-free EER (exact ROC of all "
              "pair scores) and the ROC AUC.",
              ""]
    for ds in sorted(metrics["Dataset"].unique()) if not metrics.empty else []:
        lines += [f"### {ds}", ""] + comparison_table(ds, metrics, worst, runs, ref.get(ds), results.bare_worst(ds),
                                                      diag, bare_scores.get(ds)) + [""]
    lines += verification_section(out_dir, metrics, [run.name for run in runs])
    methods = {run.method.name for run in runs}
    if methods & set(LINEAR_ERASURE):
        lines += ["**Linear erasure.** `leace` and `inlp` remove the linearly decodable gender information from "
                  "the templates they were fit on, so the linear attackers (LogReg, SVM) sit at chance by "
                  "construction; for these methods the RBF column" + (" and the worst case over the stronger "
                  "attackers are" if not worst.empty else " is (and the stronger attackers, attackers=all, are)")
                  + " the informative measure of leakage.", ""]
    lines += ["## Plots", ""]
    if not metrics.empty:
        plot_tradeoff(metrics, labels, ref, out_dir / "tradeoff.png")
        lines.append("- `tradeoff.png`: every run's path over its checkpoints, gender BACC against EER; the star is "
                     "the bare backbone.")
    if not worst.empty:
        plot_worst_case(worst, results.bare_attackers, labels, out_dir / "worst_case.png")
        lines.append("- `worst_case.png`: worst-case balanced accuracy over all attackers against step, with its "
                     "bootstrap interval.")
    gender_sets = [ev for ev in sets if len(ev.gender_labels)]
    for run in runs:
        rows = metrics[metrics["Run"] == run.name] if not metrics.empty else metrics
        if rows.empty:
            continue
        plot_curves(run.name, rows, ref, out_dir / f"{run.name}_curves.png")
        lines.append(f"- `{run.name}_curves.png`: EER, TAR, gender BACC and PIC against step.")
        if gender_sets:
            ev = gender_sets[0]
            steps = dict(run.checkpoints)   # rows of checkpoints deleted since are not plotted
            finite = rows[(rows["Dataset"] == ev.name) & rows["PIC"].notna() & rows["Step"].isin(list(steps))]
            step = int(finite.loc[finite["PIC"].idxmax(), "Step"]) if not finite.empty else run.checkpoints[-1][0]
            ckpt = steps[step]
            plot_angles(ev, run.method.load_transform(ckpt), f"{run.name}, step {step}, {ev.name}: angles to the "
                        f"gender centroids", out_dir / f"{run.name}_angles.png")
            lines.append(f"- `{run.name}_angles.png`: angles between {ev.name}'s gender-test templates and the two "
                         f"gender centroids, bare backbone against step {step}.")
    lines += ["", f"Gender leakage: {gender_folds}-fold StratifiedGroupKFold grouped by identity; BACC-Gender-AVG is "
              "the mean of LogReg, SVM (linear) and RBF. PIC = relative privacy gain - relative EER loss.", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
