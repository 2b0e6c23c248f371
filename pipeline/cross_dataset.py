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
<experiment>/<data>/<run>); the sweep's CSVs, report and plots to R/<data>/ with R = <results>/<pretrained>/
<experiment>, beside one bare-backbone reference file per evaluation set (R/reference_<name>.csv).

The table, R/cross_dataset.csv (also printed): per fold the held-out dataset, the datasets trained on, the
evaluation set, the run folder, the final checkpoint's step and metrics (EER, TAR@FAR=0.1%, BACC-Gender-AVG, PIC),
the bare backbone's EER and BACC-Gender-AVG, and the number of training images that are near-duplicates of images
of the evaluation set (tools/check_overlap.py; empty when cache=False).

Each fold is one experiment of the plan mechanism (pipeline/reproduce.py, as `python reproduce.py` runs them):
resumable, its state in R/.folds/<fold>-<hash of its settings>.json. A finished fold is not redone (unless its run
folder was deleted); a trained one is only evaluated (the sweep resumes per checkpoint); one interrupted in training
resumes from its last resume state. A damaged state file is reported and its fold is done again. Changed settings
(alpha, seed, data, ...) are new folds; runtime-only options (device, workers, n_jobs, cache folder, logging) never.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path


import pandas as pd

from backbones.spec import BackboneSpec
from config.config import Config
from config.loading import OVERRIDE_HELP, load_config
from eval.evalset import check_bins
from pipeline.overlap_check import check_overlap
from pipeline.plans import Experiment
from pipeline.reproduce import StateStore, run_experiment
from utils.errors import UserError, run_cli
from utils.io import atomic_write_text

PAPER_DATASETS = {"LFW": "data/train/LFW", "AgeDB": "data/train/AgeDB", "ColorFeret": "data/train/ColorFeret"}
PAPER_TARGETS = {"LFW": "lfw", "AgeDB": "agedb_30", "ColorFeret": "colorferet"}
PAPER_ALL_TARGET = "vggface2"
METRICS = ["EER", "TAR@FAR=0.1%", "BACC-Gender-AVG", "PIC"]
TABLE_COLUMNS = ["Held out", "Trained on", "Dataset", "Run", "Step", *METRICS, "Backbone EER",
                 "Backbone BACC-Gender-AVG", "Near-duplicates"]


@dataclass(frozen=True)
class Fold:
    """One training + evaluation of the setting."""
    held_out: str                 # the dataset left out of training; "" for the fold trained on all
    train_on: tuple[str, ...]
    target: str                   # the evaluation set: <rec>/<target>.bin

    @property
    def data(self) -> str:
        return "+".join(self.train_on)

    @property
    def name(self) -> str:
        return f"heldout-{self.held_out}" if self.held_out else "all"


def plan_folds(datasets: dict[str, str], targets: dict[str, str], all_target: str | None) -> list[Fold]:
    """A held-out fold per dataset (trained on the others), then the fold trained on all (if ``all_target``)."""
    if len(datasets) < 2:
        raise UserError(f"--datasets names {len(datasets)} dataset(s); the cross-dataset setting trains on the "
                        f"others of each held-out one, so it needs at least two (the paper's: LFW, AgeDB, "
                        f"ColorFeret).")
    lacking = [n for n in datasets if n not in targets]
    if lacking:
        raise UserError(f"--targets names no evaluation set for {', '.join(lacking)}; each held-out dataset is "
                        f"evaluated on its own .bin, e.g. --targets {lacking[0]}=<name of its .bin>.")
    folds = [Fold(h, tuple(n for n in datasets if n != h), targets[h]) for h in datasets]
    return folds + ([Fold("", tuple(datasets), all_target)] if all_target else [])


def fold_config(cfg: Config, fold: Fold, datasets: dict[str, str], experiment: str) -> Config:
    """The user's configuration with the fold's data, names and evaluation set (and the default run folders)."""
    return dataclasses.replace(cfg, data_dir=[datasets[n] for n in fold.train_on], data=fold.data,
                               experiment=experiment, val_targets=[fold.target], test_targets=[fold.target],
                               output=None, log_output=None, resume=False)


def fold_experiment(cfg: Config, fold: Fold) -> Experiment:
    """A fold as an experiment of the plan mechanism."""
    return Experiment(backbone=cfg.pretrained, setting="CrossDataset", trained_on=fold.data, method=cfg.method,
                      cfg=cfg, held_out=fold.held_out or "(none)")


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def _final_row(csv_path: Path, target: str) -> dict[str, str]:
    """The sweep's row of the run's last checkpoint on ``target``."""
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Dataset"] == target]
    if not rows:
        raise UserError(f"the sweep wrote no row for '{target}' in '{csv_path}'; run eval/evaluation.py on that "
                        f"experiment to see why, then run this command again.")
    return max(rows, key=lambda r: int(r["Step"]))


def _reference_row(path: Path, target: str) -> dict[str, str]:
    with open(path, newline="") as fh:
        return next(r for r in csv.DictReader(fh) if r["Dataset"] == target)


def run_fold(cfg: Config, fold: Fold, results: Path) -> dict[str, object]:
    """Train and evaluate one fold unless its state says it was done; returns its table row."""
    exp = fold_experiment(cfg, fold)
    store = StateStore(results / ".folds")
    state = store.read(exp.key)
    what = f"{fold.name}: train on {' + '.join(fold.train_on)}, evaluate on {fold.target}"
    if "row" in state and exp.sweep_key in state.get("swept", []):
        print(f"{what}: done earlier ({state['run']}), not redone", flush=True)
        return state["row"]
    if state.get("swept"):   # trained and swept, but its row was never written: evaluate (resumes) again
        state["swept"] = []
        store.write(exp.key, fold.name, state)
    print(f"{what}: {'evaluating ' + state['run'] if state.get('trained') else 'training'}", flush=True)
    reference = results / f"reference_{fold.target}.csv"
    state = run_experiment(exp, _Labelled(store, fold.name), results, lambda _: reference)
    run, out = Path(state["run"]), Path(state["sweep_dir"])
    final, bare = _final_row(out / f"{run.name}_metrics.csv", fold.target), _reference_row(reference, fold.target)
    near = None
    if cfg.cache:   # the training templates are cached: the check costs only the similarities
        _, [(_, overlap)] = check_overlap(cfg)
        near = len(overlap)
    state["row"] = {"Held out": fold.held_out or "(none)", "Trained on": " + ".join(fold.train_on),
                    "Dataset": fold.target, "Run": str(run), "Step": int(final["Step"]),
                    **{m: _number(final[m]) for m in METRICS}, "Backbone EER": _number(bare["EER"]),
                    "Backbone BACC-Gender-AVG": _number(bare["BACC-Gender-AVG"]), "Near-duplicates": near}
    store.write(exp.key, fold.name, state)
    return state["row"]


class _Labelled(StateStore):
    """The fold's state store, its files named after the fold (heldout-LFW-<hash>.json) as before."""

    def __init__(self, store: StateStore, label: str):
        super().__init__(store.folder, store.say)
        self.label = label

    def write(self, key: str, label: str, state: dict) -> None:
        super().write(key, self.label, state)


def cross_dataset(cfg: Config, datasets: dict[str, str] | None = None, targets: dict[str, str] | None = None,
                  all_target: str | None = PAPER_ALL_TARGET, experiment: str = "CrossDataset",
                  results: str | Path = "work_dirs/results") -> tuple[pd.DataFrame, Path]:
    """Run (or resume) every fold; returns the table and the path of its CSV."""
    datasets = dict(PAPER_DATASETS if datasets is None else datasets)
    folds = plan_folds(datasets, dict(PAPER_TARGETS if targets is None else targets), all_target)
    missing = [f"{name}={path}" for name, path in datasets.items() if not Path(path).exists()]
    if missing:
        raise UserError(f"training dataset(s) {', '.join(missing)} not found (--datasets NAME=PATH: a "
                        f"subjectid_gender folder or a .rec). Prepare them with tools/prepare_dataset.py (README: "
                        f"'Preparing the datasets') or point --datasets to them.")
    check_bins(cfg.rec, [f.target for f in folds], "config option rec, --targets, --all-target",
               "choose other targets with --targets / --all-target")
    BackboneSpec.from_config(cfg).check()
    out = Path(results) / cfg.pretrained / experiment
    rows = [run_fold(fold_config(cfg, fold, datasets, experiment), fold, out) for fold in folds]
    numbers = {c: "float64" for c in [*METRICS, "Backbone EER", "Backbone BACC-Gender-AVG"]}
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({**numbers, "Step": "Int64", "Near-duplicates": "Int64"})
    path = out / "cross_dataset.csv"
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
