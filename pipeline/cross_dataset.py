"""The paper's cross-dataset setting in one command: for each held-out dataset among LFW, AgeDB and ColorFeret,
train on the other two and evaluate on the held-out one; then train on all three and evaluate on the VGGFace2
sample. One table collects the results.

    python tools/cross_dataset.py [--config PATH] [--set KEY=VALUE ...]
        [--datasets LFW=data/train/LFW AgeDB=data/train/AgeDB ColorFeret=data/train/ColorFeret]
        [--targets LFW=lfw AgeDB=agedb_30 ColorFeret=colorferet] [--all-target vggface2]
        [--experiment CrossDataset] [--results work_dirs/results]

Each fold is an ordinary training run (finetune.py) and sweep (eval/evaluation.py) with your configuration, except:
data_dir = the fold's training datasets (a list, so their identities stay apart), data = their names joined by
'+' (e.g. AgeDB+ColorFeret), experiment = --experiment, val_targets = test_targets = the fold's evaluation set
(config option rec holds <name>.bin). Checkpoints go where any run's go (checkpoint_root/<pretrained>/
<experiment>/<data>/<run>).

The table, <results>/<pretrained>/<experiment>/cross_dataset.csv (also printed): per fold the held-out dataset, the
datasets trained on, the evaluation set, the run folder, the final checkpoint's step and metrics (EER, TAR@FAR=0.1%,
BACC-Gender-AVG, PIC), the bare backbone's EER and BACC-Gender-AVG, and the number of training images that are
near-duplicates of images of the evaluation set (tools/check_overlap.py; empty when cache=False).

The folds are the experiments of the cross_dataset plan (plans/cross_dataset.py) run by the plan runner
(pipeline/reproduce.py, as `python reproduce.py cross_dataset` runs them): resumable, matched to earlier work by
their settings, their state in <results>/.experiments/, each fold's sweep (its run alone) in
<results>/<pretrained>/CrossDataset/<data>/<run>/. A finished fold is not redone; a trained one is only evaluated
(the sweep resumes per checkpoint); one interrupted in training resumes from its last resume state; a fold whose
results were deleted is swept again. A damaged state file is reported and the fold's finished run adopted again (a
fold without one is done again). Changed settings
(alpha, seed, data, ...) are new folds; runtime-only options (device, workers, n_jobs, cache folder, logging) never.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from backbones.spec import BackboneSpec
from config import options
from config.config import Config
from config.loading import OVERRIDE_HELP, load_config
from eval.evalset import check_bins
from pipeline.overlap_check import check_overlap
from pipeline.plans import Experiment, Plan, load_plan
from pipeline.reproduce import run_plan
from pipeline.results import ResultReader, StateStore
from pipeline.tables import finite_number, sweep_of
from utils.errors import UserError, run_cli
from utils.io import atomic_write_text

PLAN = "cross_dataset"   # plans/cross_dataset.py
PAPER_DATASETS = {"LFW": "data/train/LFW", "AgeDB": "data/train/AgeDB", "ColorFeret": "data/train/ColorFeret"}
PAPER_TARGETS = {"LFW": "lfw", "AgeDB": "agedb_30", "ColorFeret": "colorferet"}
PAPER_ALL_TARGET = "vggface2"
METRICS = ["EER", "TAR@FAR=0.1%", "BACC-Gender-AVG", "PIC"]
TABLE_COLUMNS = ["Held out", "Trained on", "Dataset", "Run", "Step", *METRICS, "Backbone EER",
                 "Backbone BACC-Gender-AVG", "Near-duplicates"]


def cross_dataset_plan(cfg: Config, datasets: dict[str, str], targets: dict[str, str], all_target: str | None,
                       experiment: str, results: str | Path) -> Plan:
    """The cross_dataset plan with these datasets and targets, every fold starting from ``cfg``'s values."""
    return load_plan(PLAN, extra={"DATASETS": datasets, "TARGETS": targets, "ALL_TARGET": all_target,
                                  "EXPERIMENT": experiment, "CONFIG": options.recorded(cfg), "results": str(results)})


def fold_row(exp: Experiment, state: dict, reader: ResultReader) -> dict[str, object]:
    """A fold's table row: its run's last checkpoint on the fold's set, the bare backbone's numbers, and the training
    images that are near-duplicates of the set's (when the training templates are cached)."""
    target = exp.cfg.test_targets[0]
    swept = sweep_of(exp, state)
    assert swept is not None, "run_plan (one shard: every fold) trained and swept each fold"
    res = reader.sweep(swept["folder"], [swept["run"]], swept["reference"])
    rows = res.metrics[res.metrics["Dataset"] == target] if not res.metrics.empty else res.metrics
    if rows.empty:
        raise UserError(f"the sweep wrote no row for '{target}' in '{swept['folder']}'; run eval/evaluation.py on that "
                        f"experiment to see why, then run this command again.")
    final = rows.loc[rows["Step"].idxmax()]
    bare = res.reference[res.reference["Dataset"] == target].iloc[0]
    near = None
    if exp.cfg.cache:   # the training templates are cached: the check costs only the similarities
        _, [(_, overlap)] = check_overlap(exp.cfg)
        near = len(overlap)
    return {"Held out": exp.held_out, "Trained on": exp.trained_on.replace("+", " + "), "Dataset": target,
            "Run": state["run"], "Step": int(final["Step"]), **{m: finite_number(final[m]) for m in METRICS},
            "Backbone EER": finite_number(bare["EER"]),
            "Backbone BACC-Gender-AVG": finite_number(bare["BACC-Gender-AVG"]),
            "Near-duplicates": near}


def cross_dataset(cfg: Config, datasets: dict[str, str] | None = None, targets: dict[str, str] | None = None,
                  all_target: str | None = PAPER_ALL_TARGET, experiment: str = "CrossDataset",
                  results: str | Path = "work_dirs/results") -> tuple[pd.DataFrame, Path]:
    """Run (or resume) every fold of the cross_dataset plan; returns the table and the path of its CSV."""
    datasets = dict(PAPER_DATASETS if datasets is None else datasets)
    plan = cross_dataset_plan(cfg, datasets, dict(PAPER_TARGETS if targets is None else targets), all_target,
                              experiment, results)
    missing = [f"{name}={path}" for name, path in datasets.items() if not Path(path).exists()]
    if missing:
        raise UserError(f"training dataset(s) {', '.join(missing)} not found (--datasets NAME=PATH: a "
                        f"subjectid_gender folder or a .rec). Prepare them with tools/prepare_dataset.py (README: "
                        f"'Preparing the datasets') or point --datasets to them.")
    check_bins(cfg.rec, [e.cfg.test_targets[0] for e in plan.experiments], "config option rec, --targets, "
               "--all-target", "choose other targets with --targets / --all-target")
    BackboneSpec.from_config(cfg).check()
    results = Path(results)
    run_plan(plan, results, progress=False)
    store, reader = StateStore(results / ".experiments"), ResultReader()
    rows = [fold_row(exp, store.read(exp.key), reader) for exp in plan.experiments]
    numbers = {c: "float64" for c in [*METRICS, "Backbone EER", "Backbone BACC-Gender-AVG"]}
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({**numbers, "Step": "Int64", "Near-duplicates": "Int64"})
    path = results / cfg.pretrained / experiment / "cross_dataset.csv"
    atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))
    return table, path


def _pairs(items: list[str], option: str) -> dict[str, str]:
    """NAME=VALUE arguments -> an ordered mapping."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserError(f"{option} expects NAME=VALUE items, got '{item}'. Example: {option} LFW=data/train/LFW")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OVERRIDE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config module (default: config/config.py)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config options")
    parser.add_argument("--datasets", nargs="+", metavar="NAME=PATH",
                        default=[f"{k}={v}" for k, v in PAPER_DATASETS.items()],
                        help="training datasets, in order (default: the paper's three, as tools/prepare_dataset.py "
                             "writes them in the README)")
    parser.add_argument("--targets", nargs="+", metavar="NAME=BIN",
                        default=[f"{k}={v}" for k, v in PAPER_TARGETS.items()],
                        help="each dataset's evaluation .bin, by name in config option rec (default: the paper's)")
    parser.add_argument("--all-target", default=PAPER_ALL_TARGET,
                        help="evaluation .bin of the fold trained on all datasets ('' to skip that fold)")
    parser.add_argument("--experiment", default="CrossDataset", help="experiment folder name of the runs")
    parser.add_argument("--results", default="work_dirs/results", help="root of the sweeps' outputs and the table")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.set)
        table, path = cross_dataset(cfg, _pairs(args.datasets, "--datasets"), _pairs(args.targets, "--targets"),
                                    args.all_target or None, args.experiment, args.results)
        print(table.to_string(index=False, float_format=lambda v: "" if math.isnan(v) else f"{v:.4f}"))
        print(f"table: {path}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
