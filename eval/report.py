"""report.md and PNG plots of an evaluation sweep (matplotlib, headless)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eval.evalset import METRIC_COLUMNS, EvalTemplates  # noqa: E402
from utils.io import atomic_path, atomic_write_text  # noqa: E402

if TYPE_CHECKING:
    from privacy.runs import SweptRun

PLOTTED = [("EER", "EER"), ("TAR@FAR=0.1%", "TAR@FAR=0.1%"), ("BACC-Gender-AVG", "gender BACC (avg)"), ("PIC", "PIC")]


def _num(v: str) -> float:
    return float(v) if v not in ("", None) else float("nan")


def _rows(path: Path) -> list[dict[str, float | str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: (v if k == "Dataset" else _num(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_curves(run: str, rows: list[dict], ref: dict[str, dict[str, float]], path: Path) -> None:
    """EER, TAR, gender BACC and PIC against step, one line per dataset, the bare backbone dashed."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    datasets = sorted({r["Dataset"] for r in rows})
    colors = dict(zip(datasets, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for ax, (col, title) in zip(axes, PLOTTED):
        for ds in datasets:
            rr = sorted((r for r in rows if r["Dataset"] == ds), key=lambda r: r["Step"])
            ax.plot([r["Step"] for r in rr], [r[col] for r in rr], "o-", ms=3, color=colors[ds], label=ds)
            if col in ref.get(ds, {}) and math.isfinite(ref[ds][col]):
                ax.axhline(ref[ds][col], ls="--", lw=1, color=colors[ds])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{run}: metrics against step (dashed: bare backbone)", y=1.04)
    _save(fig, path)


def plot_tradeoff(all_rows: dict[str, list[dict]], ref: dict[str, dict[str, float]], path: Path) -> None:
    """Gender BACC against EER for every checkpoint; the bare backbone as a star."""
    datasets = sorted({r["Dataset"] for rows in all_rows.values() for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for run, rows in all_rows.items():
            rr = [r for r in rows if r["Dataset"] == ds]
            ax.scatter([r["EER"] for r in rr], [r["BACC-Gender-AVG"] for r in rr], s=18, label=run)
        if ds in ref:
            ax.scatter([ref[ds]["EER"]], [ref[ds]["BACC-Gender-AVG"]], marker="*", s=220, c="k",
                       label="bare backbone")
        ax.axhline(0.5, ls=":", c="gray", lw=1)
        ax.set_xlabel("EER (lower: better verification)")
        ax.set_ylabel("gender BACC (0.5: no leakage)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("privacy / utility trade-off")
    _save(fig, path)


def centroid_angles(templates: torch.Tensor, genders: np.ndarray) -> np.ndarray:
    """(G, 2) angles in degrees between each template and the two gender centroids of the set."""
    z = F.normalize(templates.double(), dim=1)
    c = F.normalize(torch.stack([z[torch.as_tensor(genders == g)].mean(0) for g in (0, 1)]), dim=1)
    return torch.rad2deg(torch.acos((z @ c.T).clamp(-1, 1))).numpy()


def plot_angles(ev: EvalTemplates, layer: torch.nn.Module, title: str, path: Path) -> None:
    """Angles to the two gender centroids before (bare backbone) and after the privacy layer."""
    n = ev.num_pair_images
    before = ev.templates.normalized(slice(n, None), 0)
    with torch.no_grad():
        after = layer.eval().cpu()(before)
    g = ev.gender_labels
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharey="row")
    for r, (name, t) in enumerate((("bare backbone", before), ("with privacy layer", after))):
        ang = centroid_angles(t, g)
        for c in (0, 1):
            ax = axes[r, c]
            bins = np.linspace(ang.min() - 1, ang.max() + 1, 40)
            for gg, color in ((0, "tab:blue"), (1, "tab:red")):
                ax.hist(ang[g == gg, c], bins=bins, alpha=0.55, color=color, label=f"templates of gender {gg}")
            ax.set_title(f"{name}: angle to the gender-{c} centroid")
            ax.set_xlabel("degrees")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _best(rows: list[dict], ds: str) -> dict | None:
    rr = [r for r in rows if r["Dataset"] == ds and math.isfinite(r["PIC"])]
    return max(rr, key=lambda r: r["PIC"]) if rr else None


def _cell(v: float) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "n/a"


def write_report(out_dir: Path, runs: list["SweptRun"], ref: dict[str, dict[str, float]], sets: list[EvalTemplates],
                 gender_folds: int) -> Path:
    """report.md with, per run and dataset, the bare backbone and the best checkpoint by PIC; and the plots."""
    all_rows = {run.name: _rows(out_dir / f"{run.name}_metrics.csv") for run in runs}
    lines = ["# Evaluation report", "",
             "Per run and dataset: the bare backbone (reference) and the checkpoint with the highest PIC.", ""]
    lines += ["| Run | Method and settings (run.json) |", "|---|---|"]
    lines += [f"| {run.name} | {run.settings}{'' if run.described else ' (no run.json)'} |" for run in runs]
    lines.append("")
    cols = ["Run", "Dataset", "Model", *METRIC_COLUMNS, "PIC"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for run, rows in all_rows.items():
        for ds in sorted({r["Dataset"] for r in rows}):
            if ds in ref:
                lines.append("| " + " | ".join([run, ds, "bare backbone", *(_cell(ref[ds][c]) for c in METRIC_COLUMNS),
                                                "0 (by definition)"]) + " |")
            best = _best(rows, ds)
            if best is not None:
                lines.append("| " + " | ".join([run, ds, f"step {int(best['Step'])}",
                                                *(_cell(best[c]) for c in METRIC_COLUMNS), _cell(best["PIC"])]) + " |")
    lines += ["", "## Plots", ""]
    plot_tradeoff(all_rows, ref, out_dir / "tradeoff.png")
    lines.append("- `tradeoff.png`: gender BACC against EER for every checkpoint; the star is the bare backbone.")
    gender_sets = [ev for ev in sets if len(ev.gender_labels)]
    for run in runs:
        rows = all_rows[run.name]
        if not rows:
            continue
        plot_curves(run.name, rows, ref, out_dir / f"{run.name}_curves.png")
        lines.append(f"- `{run.name}_curves.png`: EER, TAR, gender BACC and PIC against step.")
        if gender_sets:
            ev = gender_sets[0]
            best = _best(rows, ev.name)
            step = int(best["Step"]) if best else run.checkpoints[-1][0]
            ckpt = dict(run.checkpoints)[step]
            plot_angles(ev, run.method.load_transform(ckpt), f"{run.name}, step {step}, {ev.name}: angles to the "
                        f"gender centroids", out_dir / f"{run.name}_angles.png")
            lines.append(f"- `{run.name}_angles.png`: angles between {ev.name}'s gender-test templates and the two "
                         f"gender centroids, bare backbone against step {step}.")
    lines += ["", f"Gender leakage: {gender_folds}-fold StratifiedGroupKFold grouped by identity; BACC-Gender-AVG is "
              "the mean of LogReg, SVM (linear) and RBF. PIC = relative privacy gain - relative EER loss.", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
