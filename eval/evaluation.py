"""Evaluate every privacy-layer checkpoint of an experiment with the paper's protocol.

    python eval/evaluation.py --log-root L --model-root M --experiment-name E --reference-pth R
                              [--config PATH] [--set KEY=VALUE ...] [--force]

For every run folder under M/E and every ``{step}ftn_layers.pth`` in it (step order), on each of config
``test_targets`` (``rec/<name>.bin``): EER, TAR@FAR=0.1%, gender balanced accuracy of three classifiers and their
mean, and PIC against the bare backbone's results in R (computed and written there first if R does not exist).
Writes ``L/E/<run>_metrics.csv``, ``L/E/evaluate.log``, ``L/E/report.md`` and PNG plots. Checkpoints already in a
CSV are skipped unless --force, so an interrupted sweep resumes where it stopped. The backbone runs once per
evaluation set (template cache), never once per checkpoint. The underscore spellings --log_root, --model_root,
--experiment_name, --reference_pth of the authors' README are accepted too.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from backbones import load_backbone, load_projection  # noqa: E402
from eval.report import write_report  # noqa: E402
from utils.config import OVERRIDE_HELP, Config, load_config  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.evaluate import METRIC_COLUMNS, EvalTemplates, evaluate_set, open_eval_set, pic  # noqa: E402
from utils.io import atomic_write_text, check_writable  # noqa: E402
from utils.logs import log_to  # noqa: E402

CSV_COLUMNS = ["Step", "Dataset", *METRIC_COLUMNS, "PIC"]
REFERENCE_COLUMNS = ["Dataset", *METRIC_COLUMNS]
_STEP = re.compile(r"^(\d+)ftn_layers\.pth$")
log = logging.getLogger("genderprivacy.eval")


def find_runs(model_root: Path, experiment: str) -> dict[str, list[tuple[int, Path]]]:
    """Run folders under model_root/experiment with their (step, checkpoint) lists in step order."""
    base = model_root / experiment
    if not base.is_dir():
        raise UserError(f"no folder '{base}' (--model-root / --experiment-name). It should hold one folder per run "
                        f"(e.g. 20L1_1L2/) with the {{step}}ftn_layers.pth checkpoints that finetune.py writes.")
    runs: dict[str, list[tuple[int, Path]]] = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        ckpts = []
        for f in folder.glob("*ftn_layers.pth"):
            m = _STEP.match(f.name)
            if m is None:
                log.warning("skipping '%s': the name is not {step}ftn_layers.pth", f)
                continue
            ckpts.append((int(m.group(1)), f))
        if ckpts:
            runs[folder.name] = sorted(ckpts)
    if not runs:
        raise UserError(f"no checkpoints found under '{base}': expected run folders holding {{step}}ftn_layers.pth "
                        f"files (the authors' released layers work too, placed in such a folder).")
    return runs


def _fmt(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def read_csv_rows(path: Path, columns: list[str], what: str) -> list[dict[str, str]]:
    """Rows of one of our CSVs; a file with another header is refused, never overwritten."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != columns:
            raise UserError(f"{what} '{path}' has the columns {reader.fieldnames}, expected {columns}. It is not "
                            f"one of this tool's files: move it away or choose another --log-root.")
        return list(reader)


def append_row(path: Path, columns: list[str], row: dict[str, str], replace: tuple[str, str] | None = None) -> None:
    """Add one row (replacing the row with the same (Step, Dataset) when given), rewriting the file atomically."""
    rows = read_csv_rows(path, columns, "metrics file")
    if replace is not None:
        rows = [r for r in rows if (r["Step"], r["Dataset"]) != replace]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + [row])
    atomic_write_text(path, buf.getvalue())


def read_reference(path: Path, targets: list[str]) -> dict[str, dict[str, float]]:
    """The bare backbone's metrics per dataset; a missing column, row or number is a clear error."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing_cols = [c for c in ("Dataset", "EER", *METRIC_COLUMNS[2:5]) if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise UserError(f"reference file '{path}' (--reference-pth) lacks the column(s) {missing_cols}; it needs "
                            f"Dataset, EER and the three BACC-Gender columns. Delete or move it to have it recomputed.")
        rows = {r["Dataset"]: r for r in reader}
    out = {}
    for name in targets:
        if name not in rows:
            raise UserError(f"reference file '{path}' has no row for dataset '{name}' (it has {sorted(rows)}). Add the "
                            f"bare backbone's results for it, or move the file away to have all rows recomputed.")
        vals = {}
        for col in METRIC_COLUMNS:
            raw = rows[name].get(col, "")
            try:
                vals[col] = float(raw) if raw not in ("", None) else float("nan")
            except ValueError:
                raise UserError(f"reference file '{path}', dataset '{name}', column '{col}': '{raw}' is not a "
                                f"number.") from None
            if col in ("EER", *METRIC_COLUMNS[2:5]) and not math.isfinite(vals[col]) and raw not in ("", None):
                raise UserError(f"reference file '{path}', dataset '{name}', column '{col}' is {raw}.")
        out[name] = vals
    return out


def compute_reference(path: Path, sets: list[EvalTemplates], gender_folds: int) -> dict[str, dict[str, float]]:
    """Evaluate the bare backbone on each set and write the reference CSV (atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REFERENCE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    out = {}
    for ev in sets:
        m = evaluate_set(ev, None, gender_folds)
        out[ev.name] = m
        writer.writerow({"Dataset": ev.name, **{c: _fmt(m[c]) for c in METRIC_COLUMNS}})
    atomic_write_text(path, buf.getvalue())
    return out


def evaluate(cfg: Config, log_root: str | Path, model_root: str | Path, experiment: str, reference: str | Path,
             force: bool = False) -> Path:
    """Run the sweep; returns the output folder L/E."""
    out_dir = Path(log_root) / experiment
    reference = Path(reference)
    runs = find_runs(Path(model_root), experiment)
    targets = list(cfg.test_targets)
    if not targets:
        raise UserError("config option test_targets is empty: name at least one rec/<name>.bin to evaluate on.")
    missing = [str(Path(cfg.rec) / f"{t}.bin") for t in targets if not (Path(cfg.rec) / f"{t}.bin").is_file()]
    if missing:
        raise UserError(f"evaluation file(s) {', '.join(missing)} not found (config options rec, test_targets). Put "
                        f"the .bin files there, or choose targets with --set test_targets=\"['lfw']\".")
    check_writable(out_dir, "--log-root")
    if not reference.is_file():
        check_writable(reference.parent if str(reference.parent) else Path("."), "--reference-pth")
    for run in runs:  # refuse foreign CSVs before any compute
        read_csv_rows(out_dir / f"{run}_metrics.csv", CSV_COLUMNS, "metrics file")
    device = select_device(cfg.device)
    with log_to(out_dir / "evaluate.log", log.name) as lg:
        lg.info("evaluating %d run(s) of %s on %s", len(runs), experiment, ", ".join(targets))

        def backbone_loader():
            return load_backbone(cfg.network, cfg.output_ori, cfg.embedding_size, cfg.SE)
        sets = [open_eval_set(cfg, name, device, backbone_loader) for name in targets]
        changed = False
        if reference.is_file():
            ref = read_reference(reference, targets)
            lg.info("reference results read from %s", reference)
        else:
            ref = compute_reference(reference, sets, cfg.gender_folds)
            changed = True
            lg.info("reference file %s did not exist: computed the bare backbone's results with the same protocol "
                    "and wrote them there", reference)
        for run, ckpts in runs.items():
            csv_path = out_dir / f"{run}_metrics.csv"
            done = {(r["Step"], r["Dataset"]) for r in read_csv_rows(csv_path, CSV_COLUMNS, "metrics file")}
            for step, ckpt in ckpts:
                todo = [ev for ev in sets if force or (str(step), ev.name) not in done]
                if not todo:
                    lg.info("%s step %d: already in %s, skipped (use --force to recompute)", run, step, csv_path.name)
                    continue
                layer = load_projection(ckpt, cfg.embedding_size, cfg.n_hidden).to(device)
                for ev in todo:
                    m = evaluate_set(ev, layer, cfg.gender_folds)
                    p = pic(m, ref[ev.name])
                    row = {"Step": str(step), "Dataset": ev.name, **{c: _fmt(m[c]) for c in METRIC_COLUMNS},
                           "PIC": _fmt(p)}
                    append_row(csv_path, CSV_COLUMNS, row, replace=(str(step), ev.name))
                    changed = True
                    lg.info("%s step %d %s: EER %.4f TAR %.4f BACC-AVG %s PIC %s", run, step, ev.name, m["EER"],
                            m["TAR@FAR=0.1%"], row["BACC-Gender-AVG"] or "n/a", row["PIC"] or "n/a")
        if changed or not (out_dir / "report.md").is_file():
            report = write_report(out_dir, {run: out_dir / f"{run}_metrics.csv" for run in runs}, ref, runs, sets,
                                  cfg.gender_folds, lambda p: load_projection(p, cfg.embedding_size, cfg.n_hidden))
            lg.info("report: %s", report)
        else:
            lg.info("nothing new: %s and the plots are up to date", out_dir / "report.md")
    return out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OVERRIDE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-root", "--log_root", dest="log_root", required=True,
                        help="folder for the CSVs, evaluate.log, report.md and plots (under L/E)")
    parser.add_argument("--model-root", "--model_root", dest="model_root", required=True,
                        help="folder holding E/<run>/{step}ftn_layers.pth, e.g. checkpoint_root/ArcFace")
    parser.add_argument("--experiment-name", "--experiment_name", dest="experiment_name", required=True,
                        help="experiment sub-path, e.g. OneDataset/ColorFeret")
    parser.add_argument("--reference-pth", "--reference_pth", dest="reference_pth", required=True,
                        help="CSV of the bare backbone's results; computed and written if it does not exist")
    parser.add_argument("--config", default=None, help="config module (default: config/config.py)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config options")
    parser.add_argument("--force", action="store_true", help="recompute checkpoints already in the CSVs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.set)
        out = evaluate(cfg, args.log_root, args.model_root, args.experiment_name, args.reference_pth, args.force)
        print(f"results: {out}")
    return run_cli(body)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
