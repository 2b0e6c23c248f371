"""Run the whole method on a synthetic mini-benchmark, on the CPU, in a few minutes, with nothing downloaded.

    python demo.py [--out demo_output] [--quick] [--seed 0] [--methods angular|all|NAME,NAME...]

It writes a training set in the ``subjectid_gender`` layout, two evaluation .bin files in the authors' 5-item
format (built by tools/make_bin.py) and a backbone file, then runs the real finetune.py and
eval/evaluation.py code on them and prints, per dataset, the bare backbone against the trained privacy layer
(``--methods all``: against every registered privacy method, trained and swept the same way).

THE NUMBERS ARE SYNTHETIC, NOT THE PAPER'S. The "faces" are 112x112 images into which a template has been
painted, and the demo backbone (synthetic/backbone.py) reads it back: identities are points on the hypersphere with
a gender component along one direction. Everything after the backbone (decoding, template cache, training,
evaluation protocol, report) is the production code.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path


import numpy as np

from pipeline.sweep import evaluate
from pipeline.train import train
from facedata.bin_builder import build_bin
from config.loading import load_config
from privacy import METHODS
from utils.errors import UserError, run_cli
from utils.io import free_path
from eval.evalset import METRIC_COLUMNS
from synthetic.data import identity_basis, population, save_demo_backbone, write_identity_folders

GENDER_STRENGTH, SPREAD, DIM, RANK = 0.2, 2.2, 512, 48
FULL = {"train_ids": 1000, "train_imgs": 8, "test_ids": 160, "test_imgs": 6, "pairs": 1200, "gender": 900,
        "epochs": 40, "batch": 128}
QUICK = {"train_ids": 600, "train_imgs": 6, "test_ids": 120, "test_imgs": 5, "pairs": 600, "gender": 600,
         "epochs": 15, "batch": 128}


# demo-sized settings of the other methods (their defaults are sized for real training sets)
METHOD_SETTINGS: dict[str, list[str]] = {
    "ive": ["ive.estimators=30", "ive.rounds=5"],     # 5 rounds of 5 dimensions
    "inlp": ["inlp.iterations=5"],
    "pe_miu": ["pe_miu.block_size=128"],              # the demo's noisy templates need large blocks (README)
}
# comparing every method: no validation during training and 5 checkpoints per layer method, so that training and
# sweeping all of them stays within a few minutes on 2 CPU cores
COMPARISON_SETTINGS = ["eval_step=0", "checkpoint_every=8"]


def free_folder(base: Path) -> Path:
    """``base``, or ``base_2``, ``base_3``... : an earlier demo is never overwritten."""
    return free_path(base, folder=True)


def make_data(out: Path, size: dict, seed: int) -> dict[str, Path]:
    """The synthetic training folder, two .bin files and the backbone file."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    basis = identity_basis(DIM, RANK, rng)
    centres, genders = population(size["train_ids"], DIM, rng, GENDER_STRENGTH, direction, basis)
    write_identity_folders(out / "data" / "train" / "SynthFaces", centres, genders, size["train_imgs"], SPREAD, rng)
    for k, name in enumerate(("synth_a", "synth_b")):
        centres, genders = population(size["test_ids"], DIM, rng, GENDER_STRENGTH, direction, basis)
        folder = out / "data" / "test" / name
        write_identity_folders(folder, centres, genders, size["test_imgs"], SPREAD, rng)
        build_bin(folder, out / "data" / "eval" / f"{name}.bin", n_pairs=size["pairs"], n_gender=size["gender"],
                  seed=seed + k)
    save_demo_backbone(out / "checkpoints" / "Demo" / "reference" / "backbone.pth", DIM)
    return {"data_dir": out / "data" / "train" / "SynthFaces", "rec": out / "data" / "eval"}


def demo_overrides(out: Path, size: dict, seed: int) -> list[str]:
    return ["plugins=synthetic", "network=demo_decoder", "pretrained=Demo", "experiment=Synthetic", "data=SynthFaces",
            f"checkpoint_root={out / 'checkpoints'}", f"log_dir={out / 'logs'}",
            f"data_dir={out / 'data' / 'train' / 'SynthFaces'}", f"rec={out / 'data' / 'eval'}",
            f"cache_dir={out / 'cache'}", f"num_epoch={size['epochs']}", f"batch_size={size['batch']}",
            "checkpoint_every=4", "eval_step=50", "log_every=25", "val_targets=synth_a",
            "test_targets=synth_a,synth_b", f"seed={seed}", "num_workers=0"]


def run_demo(out: Path, quick: bool = False, seed: int = 0, methods: tuple[str, ...] = ("angular",)) -> dict:
    """Generate data, fit each method, sweep them all; returns the paths and each run's final metrics."""
    size = QUICK if quick else FULL
    out = free_folder(out)
    t0 = time.time()
    make_data(out, size, seed)
    overrides = demo_overrides(out, size, seed)
    results, runs = out / "results", {}
    for method in methods:
        run_overrides = [*overrides, f"method={method}", *METHOD_SETTINGS.get(method, []),
                         *(COMPARISON_SETTINGS if len(methods) > 1 else [])]
        print(f"[demo] {'synthetic data in ' + str(out / 'data') + f' ({time.time() - t0:.0f}s); ' if not runs else ''}"
              f"training '{method}' with\n       {shlex.join(['python', 'finetune.py', '--set', *run_overrides])}",
              flush=True)
        result = train(load_config(None, run_overrides))
        runs[result.checkpoint_dir.name] = (method, result.step)
    reference = results / "reference_Demo.csv"
    command = ["python", "eval/evaluation.py", "--log-root", str(results), "--model-root",
               str(out / "checkpoints" / "Demo"), "--experiment-name", "Synthetic/SynthFaces", "--reference-pth",
               str(reference), "--set", *overrides]
    print(f"[demo] evaluating with (shell-quoted, ready to paste)\n       {shlex.join(command)}", flush=True)
    out_dir = evaluate(load_config(None, overrides), results, out / "checkpoints" / "Demo", "Synthetic/SynthFaces",
                       reference)
    final = {}
    for run, (method, step) in runs.items():
        with open(out_dir / f"{run}_metrics.csv", newline="") as fh:
            final[run] = (method, step, {r["Dataset"]: r for r in csv.DictReader(fh) if int(r["Step"]) == step})
    with open(reference, newline="") as fh:
        ref = {r["Dataset"]: r for r in csv.DictReader(fh)}
    return {"out": out, "results": out_dir, "reference": reference, "final": final, "ref": ref,
            "seconds": time.time() - t0}


def print_tables(res: dict) -> None:
    """Per evaluation set: the bare backbone, then every run's last checkpoint."""
    cols = [*METRIC_COLUMNS, "PIC"]
    print("\nSYNTHETIC DATA: these numbers show the pipeline working; they are not the paper's results.\n")
    for ds, ref in res["ref"].items():
        print(f"== {ds} ==")
        print(f"{'model':<34}" + "".join(f"{c:>20}" for c in cols))
        print(f"{'bare backbone':<34}" + "".join(f"{float(ref[c]):>20.4f}" for c in METRIC_COLUMNS) + f"{'0':>20}")
        for method, step, rows in res["final"].values():
            row = rows[ds]
            print(f"{f'{method}, step {step}':<34}" +
                  "".join(f"{float(row[c]):>20.4f}" if row[c] else f"{'n/a':>20}" for c in cols))
        print()
    r = res["results"]
    print(f"metrics CSVs: {', '.join(str(r / (run + '_metrics.csv')) for run in res['final'])}\n"
          f"reference:    {res['reference']}\nreport:       {r / 'report.md'} (the comparison table per set)\n"
          f"plots:        {', '.join(str(p) for p in sorted(r.glob('*.png')))}\ntotal time:   {res['seconds']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder (a new _2, _3... if it is in use)")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (used by the tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="angular",
                        help="privacy methods to compare, comma-separated, or 'all' (default: angular, the paper's)")
    args = parser.parse_args(argv)

    def body() -> None:
        names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown or not names:
            raise UserError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(METHODS)} or 'all'.")
        print_tables(run_demo(Path(args.out), args.quick, args.seed, tuple(names)))
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
