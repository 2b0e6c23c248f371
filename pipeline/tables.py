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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from eval.evalset import METRIC_COLUMNS
from eval.leakage import WORST
from pipeline.plans import Experiment, Plan, digest, safe_name
from pipeline.reproduce import StateStore
from privacy import get_method
from utils.errors import UserError
from utils.io import atomic_path, atomic_write_text

METRICS = [*METRIC_COLUMNS, "PIC"]
WORST_COLUMNS = ["Worst-case BACC", "Worst CI-Low", "Worst CI-High", "Worst attacker"]
ID_COLUMNS = ["Backbone", "Setting", "Trained on", "Held out", "Dataset", "Method", "Settings", "Checkpoint", "Step",
              "alpha", "beta"]
TABLE_IDS = {"main": ["Trained on", "Method", "Settings", "Checkpoint", "Step"],
             "cross": ["Held out", "Trained on", "Dataset", "Method", "Settings", "Checkpoint", "Step"],
             "ablation": ["alpha", "beta", "Dataset", "Checkpoint", "Step"]}


def _read(path: str | None) -> pd.DataFrame:
    if not path or not Path(path).is_file():
        return pd.DataFrame()
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _setting(exp: Experiment) -> str:
    return exp.released_setting or "OneDataset" if exp.released else exp.setting


def _method_label(exp: Experiment) -> tuple[str, str]:
    if exp.released:
        return "released", "the authors' released layer"
    return exp.method, exp.label or get_method(exp.cfg.method)(exp.cfg).describe()


def collect(plan: Plan, store: StateStore) -> tuple[list[dict], list[dict], int]:
    """Rows of every experiment (last and best-PIC checkpoint per evaluation set), the bare backbone's rows, and how
    many experiments have results."""
    rows, bare, have = [], {}, 0
    for exp in plan.experiments:
        state = sweep_state(store, exp)
        metrics = _read(state.get("metrics"))
        if metrics.empty:
            continue
        have += 1
        attacks = _read(state.get("attackers"))
        worst = attacks[attacks["Attacker"] == WORST] if not attacks.empty else attacks
        reference = _read(state.get("reference"))
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
            if len(ref) and (exp.backbone, ds, folders) not in bare:
                bare[(exp.backbone, ds, folders)] = {**base, "Trained on": "", "Held out": "", "Method": "bare backbone",
                                                     "Settings": "[gender test: folders]" if folders else "",
                                                     "Checkpoint": "", "Step": None,
                                                     **{c: float(ref.iloc[0][c]) for c in METRIC_COLUMNS},
                                                     "PIC": 0.0}
            picked = [("last", rr.iloc[-1])]
            finite = rr[rr["PIC"].notna()]
            if not finite.empty:
                picked.append(("best PIC", finite.loc[finite["PIC"].idxmax()]))
            for tag, r in picked:
                row = {**base, "Method": method, "Settings": described, "Checkpoint": tag, "Step": int(r["Step"]),
                       "alpha": ab[0] if ab else None, "beta": ab[1] if ab else None,
                       **{c: _num(r[c]) for c in METRICS}}
                if len(ref):
                    row["Backbone EER"] = float(ref.iloc[0]["EER"])
                    row["Backbone BACC-Gender-AVG"] = float(ref.iloc[0]["BACC-Gender-AVG"])
                w = worst[(worst["Dataset"] == ds) & (worst["Step"] == r["Step"])] if not worst.empty else worst
                if len(w):
                    w = w.iloc[0]
                    row.update({"Worst-case BACC": _num(w["BACC"]), "Worst CI-Low": _num(w["CI-Low"]),
                                "Worst CI-High": _num(w["CI-High"]), "Worst attacker": w["Reached-By"]})
                rows.append(row)
    return rows, list(bare.values()), have


def sweep_state(store: StateStore, exp: Experiment) -> dict:
    """The experiment's state with the files of its own sweep (a training swept under two gender-test protocols
    has one set of files per sweep)."""
    state = store.read(exp.key)
    return {**state, **state.get("sweeps", {}).get(exp.sweep_key, {})}


def _num(v: object) -> float | None:
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
    worst = [c for c in WORST_COLUMNS if c in frame]
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


def add_paper_values(tables: dict[str, Table], path: Path) -> int:
    """'<metric> (paper)' and '<metric> diff' columns from a CSV of the paper's numbers; returns the cells matched."""
    paper = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = {"Metric", "Value"}
    if not need <= set(paper.columns):
        raise UserError(f"--paper-values '{path}' has the columns {list(paper.columns)}; it needs Metric and Value, "
                        f"plus any of {', '.join(ID_COLUMNS)} naming the row (README: 'Reproducing the paper').")
    unknown = set(paper.columns) - need - set(ID_COLUMNS)
    if unknown:
        raise UserError(f"--paper-values '{path}': unknown column(s) {sorted(unknown)}; the row is named by "
                        f"{', '.join(ID_COLUMNS)}.")
    matched = 0
    for line, p in enumerate(paper.to_dict("records"), start=2):
        if p["Metric"] not in METRICS:
            raise UserError(f"--paper-values '{path}' line {line}: Metric '{p['Metric']}' is not one of "
                            f"{', '.join(METRICS)}.")
        try:
            value = float(p["Value"])
        except ValueError:
            raise UserError(f"--paper-values '{path}' line {line}: Value '{p['Value']}' is not a number.") from None
        for table in tables.values():
            t = table.frame
            full = t.reindex(columns=ID_COLUMNS).astype(object).where(t.reindex(columns=ID_COLUMNS).notna(), "")
            mask = pd.Series(True, index=t.index)
            for col in ID_COLUMNS:
                given = p.get(col, "")
                if col == "Checkpoint" and not given:
                    mask &= full[col].isin(["last", ""])
                elif given:
                    mask &= full[col].astype(str).map(lambda v, g=given: _same(v, g))
            if mask.any():
                col = f"{p['Metric']} (paper)"
                if col not in table.shown:
                    at = table.shown.index(p["Metric"]) + 1
                    table.shown[at:at] = [col, f"{p['Metric']} diff"]
                    t[col] = float("nan")
                    t[f"{p['Metric']} diff"] = float("nan")
                t.loc[mask, col] = value
                t.loc[mask, f"{p['Metric']} diff"] = t.loc[mask, p["Metric"]] - value
                matched += int(mask.sum())
    return matched


def _same(value: str, given: str) -> bool:
    try:
        return float(value) == float(given)
    except ValueError:
        return value.strip().lower() == given.strip().lower()


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
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png", metadata={"Software": None})
    plt.close(fig)


def tradeoff_figures(plan: Plan, store: StateStore, out: Path) -> list[Path]:
    """Per backbone: every one-dataset (and released) experiment's path, gender BACC against EER, per set."""
    paths = []
    by_backbone: dict[str, list[Experiment]] = {}
    for exp in plan.experiments:
        if _setting(exp) == "OneDataset":
            by_backbone.setdefault(exp.backbone, []).append(exp)
    for backbone, exps in by_backbone.items():
        series = []
        for exp in exps:
            state = sweep_state(store, exp)
            m = _read(state.get("metrics"))
            if not m.empty:
                series.append((exp, m, _read(state.get("reference"))))
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


def angles_figures(plan: Plan, store: StateStore, out: Path) -> list[Path]:
    """The sweep's angles figure of the paper's method, per backbone (its first one-dataset experiment)."""
    paths, seen = [], set()
    for exp in plan.experiments:
        if exp.method != "angular" or exp.released or exp.backbone in seen:
            continue
        state = sweep_state(store, exp)
        src = Path(state.get("sweep_dir", "")) / f"{Path(state.get('run', '')).name}_angles.png"
        if state.get("sweep_dir") and src.is_file():
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


def inputs_digest(plan: Plan, store: StateStore, paper_values: str | None) -> str:
    """What the tables are made of: every state and result file of the plan, the plan and the paper's values."""
    parts = [plan.path.read_text(), Path(paper_values).read_text() if paper_values else ""]
    for exp in plan.experiments:
        state = store.read(exp.key)
        parts.append(exp.key + exp.sweep_key + exp.name)
        for k in ("metrics", "attackers", "reference"):
            p = Path(state.get(k, ""))
            parts.append(p.read_text() if state.get(k) and p.is_file() else "")
    return digest(parts)


def write_outputs(plan: Plan, results: Path, paper_values: str | None = None) -> str:
    """tables.md, the CSVs and the figures of a plan; nothing is rewritten when their inputs have not changed."""
    store = StateStore(Path(results) / ".experiments", lambda _: None)
    out = Path(results) / safe_name(plan.name)
    stamp = inputs_digest(plan, store, paper_values)
    if (out / "tables.md").is_file() and (out / ".tables-digest").is_file() and \
            (out / ".tables-digest").read_text() == stamp:
        return f"nothing new: {out / 'tables.md'} is up to date"
    rows, bare, have = collect(plan, store)
    tables = build_tables(rows, bare)
    matched = add_paper_values(tables, Path(paper_values)) if paper_values else None
    total = len({e.key for e in plan.experiments})
    lines = [f"# Plan '{plan.name}': tables", "",
             f"{have} of {len(plan.experiments)} experiments have results ({total} distinct trainings); rows: the last "
             f"checkpoint and the checkpoint with the best PIC of each. Numbers from the sweeps' CSVs under "
             f"{Path(results)}.", ""]
    if matched is not None:
        lines += [f"Paper values from {paper_values}: {matched} cell(s) compared ('diff' = ours - paper).", ""]
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for stem, table in tables.items():
        t = table.view
        atomic_write_text(out / "tables" / f"{stem}.csv", t.to_csv(index=False, lineterminator="\n"))
        lines += [f"## {table.title}", "", f"`tables/{stem}.csv`", ""] + markdown(t) + [""]
        if table.kind == "ablation":
            for ds, part in t[t["Checkpoint"] == "last"].groupby("Dataset", sort=False):
                grid = part.pivot_table(index="alpha", columns="beta", values="PIC", aggfunc="first")
                lines += [f"PIC of the last checkpoint on {ds} (rows alpha, columns beta):", ""]
                lines += markdown(grid.reset_index().rename(columns=lambda c: f"beta={c:g}" if isinstance(
                    c, float) else c)) + [""]
    figures = tradeoff_figures(plan, store, out) + angles_figures(plan, store, out) + ablation_figure(tables, out)
    lines += ["## Figures", ""] + [f"- `{p.name}`" for p in figures] + [""]
    atomic_write_text(out / "tables.md", "\n".join(lines))
    atomic_write_text(out / ".tables-digest", stamp)
    return f"tables: {out / 'tables.md'} ({len(tables)} tables, {len(figures)} figures)"
