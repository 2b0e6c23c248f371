"""A plan's tables and figures, from the sweeps' CSVs of its experiments (nothing is recomputed here).

<results>/<plan>/tables.md, and one CSV per table under <results>/<plan>/tables/:
  - <backbone>_<set>.csv, per backbone and evaluation set (the one-dataset setting and released layers): the bare
    backbone, then every experiment's last checkpoint and its checkpoint of best PIC;
  - cross_dataset_<backbone>.csv: every cross-dataset fold (held out, trained on, evaluated on);
  - ablation_<backbone>_<data>.csv: the alpha x beta grid of the paper's method.
Columns: EER, TAR@FAR=0.1%, the three gender BACCs and their mean, PIC, and, when attackers beyond the paper's ran,
the worst-case attacker's BACC with its bootstrap interval. With --paper-values, '<metric> (paper)' and
'<metric> diff' (ours minus the paper's) beside every metric the paper gives a value for.
Figures: tradeoff_<backbone>.png (every experiment's path over its checkpoints), angles_<backbone>.png (the paper's
method), pic_alpha_beta.png (the ablation).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from eval.evalset import METRIC_COLUMNS
from pipeline.paper_values import ID_COLUMNS, PaperValues
from pipeline.plans import Experiment, Plan, digest, safe_name
from pipeline.results import ResultReader, StateStore, SweepResults
from privacy import get_method
from utils.figures import save_figure
from utils.io import atomic_path, atomic_write_text

METRICS = [*METRIC_COLUMNS, "PIC"]
# the verification report's columns the tables show (the full report: each sweep's <run>_verification.csv)
VERIFICATION_SHOWN = ["FNMR@FMR=1%", "FNMR@FMR=0.1%", "EER-Pooled", "EER-CI-Low", "EER-CI-High", "FMR-Ratio-Cross/Same"]
WORST_COLUMNS = ["Worst-case BACC", "Worst CI-Low", "Worst CI-High", "Worst attacker"]
TABLE_IDS = {"main": ["Trained on", "Method", "Settings", "Checkpoint", "Step"],
             "cross": ["Held out", "Trained on", "Dataset", "Method", "Settings", "Checkpoint", "Step"],
             "ablation": ["alpha", "beta", "Dataset", "Checkpoint", "Step"]}


def _setting(exp: Experiment) -> str:
    return exp.released_setting or "OneDataset" if exp.released else exp.setting


def _method_label(exp: Experiment) -> tuple[str, str]:
    if exp.released:
        return "released", "the authors' released layer"
    return exp.method, exp.label or get_method(exp.cfg.method)(exp.cfg).describe()


def sweep_of(exp: Experiment, state: dict) -> dict | None:
    """The record of the experiment's own sweep in its state ({folder, run, reference}); None when not swept."""
    return state.get("sweeps", {}).get(exp.sweep_key) if state.get("trained") else None


def read_plan(plan: Plan, store: StateStore, reader: ResultReader) -> list[tuple[Experiment, SweepResults]]:
    """Every experiment of the plan with its sweep's results (read once, through ``reader``); experiments without a
    sweep are left out."""
    out = []
    for exp in plan.experiments:
        swept = sweep_of(exp, store.read(exp.key))
        if swept:
            out.append((exp, reader.sweep(swept["folder"], [swept["run"]], swept["reference"])))
    return out


def collect(results: list[tuple[Experiment, SweepResults]]) -> tuple[list[dict], list[dict], int]:
    """Rows of every experiment (last and best-PIC checkpoint per evaluation set), the bare backbone's rows (with its
    worst-case attacker when the sweep ran attackers beyond the paper's), and how many experiments have results."""
    rows, bare, have = [], {}, 0
    for exp, res in results:
        metrics = res.metrics
        if metrics.empty:
            continue
        have += 1
        worst = res.worst().reset_index() if not res.attackers.empty else pd.DataFrame()
        reference = res.reference
        method, described = _method_label(exp)
        folders = exp.cfg.gender_protocol == "folders"   # the paper-era gender test: marked in the rows
        described += " [gender test: folders]" if folders else ""
        ab = exp.alpha_beta
        for ds in exp.cfg.test_targets:
            rr = metrics[metrics["Dataset"] == ds].sort_values("Step")
            if rr.empty:
                continue
            base = {"Backbone": exp.backbone, "Setting": _setting(exp), "Trained on": exp.trained_on,
                    "Held out": exp.held_out, "Dataset": ds}
            ref = reference[reference["Dataset"] == ds] if not reference.empty else reference
            key = (exp.backbone, ds, folders)
            if len(ref) and key not in bare:
                bare[key] = {**base, "Trained on": "", "Held out": "", "Method": "bare backbone",
                             "Settings": "[gender test: folders]" if folders else "", "Checkpoint": "", "Step": None,
                             **{c: float(ref.iloc[0][c]) for c in METRIC_COLUMNS}, "PIC": 0.0}
            bare_worst = res.bare_worst(ds)
            if key in bare and bare_worst is not None:
                bare[key].update(_worst_cells(bare_worst))
            if key in bare:
                bare[key].update(_verification_cells(res.verification_row(ds)))
            picked = [("last", rr.iloc[-1])]
            finite = rr[rr["PIC"].notna()]
            if not finite.empty:
                picked.append(("best PIC", finite.loc[finite["PIC"].idxmax()]))
            for tag, r in picked:
                row = {**base, "Method": method, "Settings": described, "Checkpoint": tag, "Step": int(r["Step"]),
                       "alpha": ab[0] if ab else None, "beta": ab[1] if ab else None,
                       **{c: finite_number(r[c]) for c in METRICS}}
                if len(ref):
                    row["Backbone EER"] = float(ref.iloc[0]["EER"])
                    row["Backbone BACC-Gender-AVG"] = float(ref.iloc[0]["BACC-Gender-AVG"])
                w = worst[(worst["Dataset"] == ds) & (worst["Step"] == r["Step"])] if not worst.empty else worst
                if len(w):
                    row.update(_worst_cells(w.iloc[0]))
                row.update(_verification_cells(res.verification_row(ds, res.runs[0], int(r["Step"]))))
                rows.append(row)
    return rows, list(bare.values()), have


def _worst_cells(w: pd.Series) -> dict[str, float | str | None]:
    """The worst-case columns of a table row from a worst-case row of an attackers CSV."""
    return {"Worst-case BACC": finite_number(w["BACC"]), "Worst CI-Low": finite_number(w["CI-Low"]),
            "Worst CI-High": finite_number(w["CI-High"]), "Worst attacker": w["Reached-By"]}


def _verification_cells(v: pd.Series | None) -> dict[str, float | None]:
    """The verification columns of a table row (ISO/IEC 19795-1 and -10: eval/biometrics.py) from a row of the
    sweep's verification report; an empty cell where the rule of three leaves the FNMR unmeasured."""
    if v is None:
        return {}
    return {c: finite_number(v.get(c)) for c in VERIFICATION_SHOWN}


def finite_number(v: Any) -> float | None:
    """A cell of any type as a finite float; None for what float() refuses (text, blanks), NaN and infinities."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Table:
    """One table: its kind (main, cross, ablation), title, rows with every identifying column, and the columns shown."""

    def __init__(self, kind: str, title: str, frame: pd.DataFrame, shown: list[str]):
        self.kind, self.title, self.frame, self.shown = kind, title, frame.reset_index(drop=True), shown

    @property
    def view(self) -> pd.DataFrame:
        return self.frame[self.shown]


def build_tables(rows: list[dict], bare: list[dict]) -> dict[str, Table]:
    """file stem -> table."""
    frame = pd.DataFrame(rows).reindex(columns=list(dict.fromkeys([*ID_COLUMNS, *pd.DataFrame(rows).columns])))
    tables: dict[str, Table] = {}
    if frame.empty:
        return tables
    worst = [c for c in WORST_COLUMNS if c in frame] + [c for c in VERIFICATION_SHOWN if c in frame]
    main = frame[frame["Setting"] == "OneDataset"]
    for (backbone, ds), part in main.groupby(["Backbone", "Dataset"], sort=False):
        b = [r for r in bare if r["Backbone"] == backbone and r["Dataset"] == ds]
        part = pd.concat([pd.DataFrame(b), part], ignore_index=True) if b else part
        tables[f"{safe_name(backbone)}_{safe_name(ds)}"] = Table(
            "main", f"{backbone}, evaluated on {ds} (one-dataset setting)", part, TABLE_IDS["main"] + METRICS + worst)
    cross = frame[frame["Setting"] == "CrossDataset"]
    for backbone, part in cross.groupby("Backbone", sort=False):
        extra = [c for c in ("Backbone EER", "Backbone BACC-Gender-AVG") if c in part]
        tables[f"cross_dataset_{safe_name(backbone)}"] = Table(
            "cross", f"{backbone}, cross-dataset setting", part, TABLE_IDS["cross"] + METRICS + extra + worst)
    ablation = frame[frame["Setting"] == "Ablation"]
    for (backbone, data), part in ablation.groupby(["Backbone", "Trained on"], sort=False):
        tables[f"ablation_{safe_name(backbone)}_{safe_name(data)}"] = Table(
            "ablation", f"{backbone}, trained on {data}: alpha x beta", part, TABLE_IDS["ablation"] + METRICS + worst)
    return tables


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def markdown(t: pd.DataFrame) -> list[str]:
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in t.itertuples(index=False):
        cells = [_fmt(v) if not (isinstance(v, float) and c == "Step") else ("" if math.isnan(v) else str(int(v)))
                 for c, v in zip(cols, r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _save(fig, path: Path) -> None:
    """The plan's figures: their extent set by their text (crop to it), no software tag (the same bytes each run)."""
    save_figure(fig, path, "the plan's results folder", dpi=100, tight=True, metadata={"Software": None})


def tradeoff_figures(results: list[tuple[Experiment, SweepResults]], out: Path) -> list[Path]:
    """Per backbone: every one-dataset (and released) experiment's path, gender BACC against EER, per set."""
    paths = []
    by_backbone: dict[str, list[tuple[Experiment, SweepResults]]] = {}
    for exp, res in results:
        if _setting(exp) == "OneDataset":
            by_backbone.setdefault(exp.backbone, []).append((exp, res))
    for backbone, exps in by_backbone.items():
        series = [(exp, res.metrics, res.reference) for exp, res in exps if not res.metrics.empty]
        if not series:
            continue
        sets = list(dict.fromkeys(ds for exp, _, _ in series for ds in exp.cfg.test_targets))
        fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.4), squeeze=False)
        for ax, ds in zip(axes[0], sets):
            starred = False
            for exp, m, ref in series:
                rr = m[m["Dataset"] == ds].sort_values("Step")
                if rr.empty:
                    continue
                ax.plot(rr["EER"], rr["BACC-Gender-AVG"], "o-", ms=3, lw=1,
                        label=f"{_method_label(exp)[0]} ({exp.trained_on}"
                              f"{', gender test: folders' if exp.cfg.gender_protocol == 'folders' else ''})")
                r = ref[ref["Dataset"] == ds] if not ref.empty else ref
                if len(r) and not starred:
                    ax.scatter([r.iloc[0]["EER"]], [r.iloc[0]["BACC-Gender-AVG"]], marker="*", s=200, c="k",
                               zorder=5, label="bare backbone")
                    starred = True
            ax.axhline(0.5, ls=":", c="gray", lw=1)
            ax.set_xlabel("EER")
            ax.set_ylabel("gender BACC (mean of the paper's 3)")
            ax.set_title(ds)
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
        fig.suptitle(f"{backbone}: privacy / utility trade-off, each experiment's path over its checkpoints")
        path = out / f"tradeoff_{safe_name(backbone)}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def angles_figures(results: list[tuple[Experiment, SweepResults]], out: Path) -> list[Path]:
    """The sweep's angles figure of the paper's method, per backbone (its first one-dataset experiment)."""
    paths, seen = [], set()
    for exp, res in results:
        if exp.method != "angular" or exp.released or exp.backbone in seen:
            continue
        src = res.folder / f"{res.runs[0]}_angles.png"
        if src.is_file():
            path = out / f"angles_{safe_name(exp.backbone)}.png"
            with atomic_path(path, suffix=".png") as tmp:
                shutil.copyfile(src, tmp)
            paths.append(path)
            seen.add(exp.backbone)
    return paths


def ablation_figure(tables: dict[str, Table], out: Path) -> list[Path]:
    """Best PIC against alpha (a line per beta) and against beta (a line per alpha), per ablation and set."""
    grids = [(t.title, t.frame[t.frame["Checkpoint"] == "best PIC"]) for t in tables.values() if t.kind == "ablation"]
    panels = [(title, ds, part) for title, t in grids for ds, part in t.groupby("Dataset", sort=False)]
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.8 * len(panels)), squeeze=False)
    for (title, ds, part), (ax_a, ax_b) in zip(panels, axes):
        for beta, rr in part.groupby("beta"):
            rr = rr.sort_values("alpha")
            ax_a.plot(rr["alpha"], rr["PIC"], "o-", label=f"beta={beta:g}")
        for alpha, rr in part.groupby("alpha"):
            rr = rr.sort_values("beta")
            ax_b.plot(rr["beta"], rr["PIC"], "o-", label=f"alpha={alpha:g}")
        for ax, x in ((ax_a, "alpha (weight of P1)"), (ax_b, "beta (weight of P2)")):
            ax.set_xlabel(x)
            ax.set_ylabel("best PIC")
            ax.set_title(f"{title}, {ds}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "pic_alpha_beta.png"
    _save(fig, path)
    return [path]


TABLES_RECORD = ".tables-written"   # the table CSVs the last write made (older ones are removed, never a user's)


def _stale_tables(folder: Path, record: Path, keep: set[str]) -> list[Path]:
    """Table CSVs an earlier write made that the new tables do not have: those the record lists, and (written before
    the record existed) those whose header is one of our tables' headers."""
    listed = set(record.read_text().split()) if record.is_file() else set()
    heads = tuple(",".join(ids) for ids in TABLE_IDS.values())
    stale = []
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        if path.name in keep:
            continue
        try:
            with open(path) as fh:
                ours = path.name in listed or fh.readline().startswith(heads)
        except (OSError, UnicodeDecodeError):
            ours = False
        if ours:
            stale.append(path)
    return stale


def write_outputs(plan: Plan, results: Path, paper_values: PaperValues | None = None) -> str:
    """tables.md, the CSVs and the figures of a plan; nothing is rewritten when their inputs have not changed. Table
    CSVs of an earlier write that the new tables lack (an experiment whose results are gone) are removed."""
    store = StateStore(Path(results) / ".experiments", lambda _: None)
    out = Path(results) / safe_name(plan.name)
    reader = ResultReader()
    swept = read_plan(plan, store, reader)
    paper = paper_values.path.read_bytes().hex() if paper_values else ""
    stamp = digest([reader.digest(), plan.path.read_text(), paper,
                    [(e.key, e.sweep_key, e.name) for e in plan.experiments], [e.name for e, _ in swept]])
    if (out / "tables.md").is_file() and (out / ".tables-digest").is_file() and \
            (out / ".tables-digest").read_text() == stamp:
        return f"nothing new: {out / 'tables.md'} is up to date"
    rows, bare, have = collect(swept)
    tables = build_tables(rows, bare)
    matched = paper_values.annotate(tables, METRICS) if paper_values else None
    total = len({e.key for e in plan.experiments})
    lines = [f"# Plan '{plan.name}': tables", "",
             f"{have} of {len(plan.experiments)} experiments have results ({total} distinct trainings); rows: the last "
             f"checkpoint and the checkpoint with the best PIC of each. Numbers from the sweeps' CSVs under "
             f"{Path(results)}.", "",
             "Verification as ISO/IEC 19795-1 reports it, beside the protocol's numbers (each sweep's "
             "`<run>_verification.csv` holds the full report): FNMR at FMR = 1% and 0.1% over all pairs pooled (empty "
             "where fewer than 3/FMR impostor comparisons leave it unmeasured), the pooled EER with its identity-level "
             "bootstrap interval, and FMR-Ratio-Cross/Same, the cross-gender impostors' false match rate over the "
             "same-gender ones' (ISO/IEC 19795-10; above 1, the layer makes people of different genders match more "
             "often).", ""]
    if paper_values:
        lines += [f"Paper values from {paper_values.path}: {matched} cell(s) compared ('diff' = ours - paper).", ""]
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"{stem}.csv" for stem in tables}
    for path in _stale_tables(folder, out / TABLES_RECORD, names):
        path.unlink()
    for stem, table in tables.items():
        t = table.view
        atomic_write_text(folder / f"{stem}.csv", t.to_csv(index=False, lineterminator="\n"))
        lines += [f"## {table.title}", "", f"`tables/{stem}.csv`", ""] + markdown(t) + [""]
        if table.kind == "ablation":
            for ds, part in t[t["Checkpoint"] == "last"].groupby("Dataset", sort=False):
                grid = part.pivot_table(index="alpha", columns="beta", values="PIC", aggfunc="first")
                lines += [f"PIC of the last checkpoint on {ds} (rows alpha, columns beta):", ""]
                lines += markdown(grid.reset_index().rename(columns=lambda c: f"beta={c:g}" if isinstance(
                    c, float) else c)) + [""]
    atomic_write_text(out / TABLES_RECORD, "".join(f"{n}\n" for n in sorted(names)))
    figures = tradeoff_figures(swept, out) + angles_figures(swept, out) + ablation_figure(tables, out)
    lines += ["## Figures", ""] + [f"- `{p.name}`" for p in figures] + [""]
    atomic_write_text(out / "tables.md", "\n".join(lines))
    atomic_write_text(out / ".tables-digest", stamp)
    return f"tables: {out / 'tables.md'} ({len(tables)} tables, {len(figures)} figures)"
