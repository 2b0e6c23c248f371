"""Run the whole method on a synthetic mini-benchmark, on the CPU, in a few minutes, with nothing downloaded.

    python demo.py [--out demo_output] [--quick] [--seed 0]

It writes a training set in the ``subjectid_gender`` layout, two evaluation .bin files in the authors' 5-item
format (built by tools/make_bin.py) and a backbone file, then runs the real finetune.py and
eval/evaluation.py code on them and prints, per dataset, the bare backbone against the trained privacy layer.

THE NUMBERS ARE SYNTHETIC, NOT THE PAPER'S. The "faces" are 112x112 images into which a template has been
painted, and the demo backbone (backbones/demo.py) reads it back: identities are points on the hypersphere with
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

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from eval.evaluation import evaluate  # noqa: E402
from finetune import train  # noqa: E402
from tools.make_bin import build_bin  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from eval.evalset import METRIC_COLUMNS  # noqa: E402
from synthetic.data import identity_basis, population, save_demo_backbone, write_identity_folders  # noqa: E402

GENDER_STRENGTH, SPREAD, DIM, RANK = 0.2, 2.2, 512, 48
FULL = {"train_ids": 1000, "train_imgs": 8, "test_ids": 160, "test_imgs": 6, "pairs": 1200, "gender": 900,
        "epochs": 40, "batch": 128}
QUICK = {"train_ids": 600, "train_imgs": 6, "test_ids": 120, "test_imgs": 5, "pairs": 600, "gender": 600,
         "epochs": 15, "batch": 128}


def free_folder(base: Path) -> Path:
    """``base``, or ``base_2``, ``base_3``... : an earlier demo is never overwritten."""
    k, out = 1, base
    while out.exists() and any(out.iterdir()):
        k += 1
        out = base.with_name(f"{base.name}_{k}")
    return out


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


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Generate data, train, evaluate; returns the paths and the final metrics per dataset."""
    size = QUICK if quick else FULL
    out = free_folder(out)
    t0 = time.time()
    make_data(out, size, seed)
    overrides = demo_overrides(out, size, seed)
    cfg = load_config(None, overrides)
    print(f"[demo] synthetic data in {out / 'data'} ({time.time() - t0:.0f}s); training with\n"
          f"       {shlex.join(['python', 'finetune.py', '--set', *overrides])}", flush=True)
    result = train(cfg)
    results = out / "results"
    reference = results / "reference_Demo.csv"
    command = ["python", "eval/evaluation.py", "--log-root", str(results), "--model-root",
               str(out / "checkpoints" / "Demo"), "--experiment-name", "Synthetic/SynthFaces", "--reference-pth",
               str(reference), "--set", *overrides]
    print(f"[demo] evaluating with (shell-quoted, ready to paste)\n       {shlex.join(command)}", flush=True)
    out_dir = evaluate(cfg, results, out / "checkpoints" / "Demo", "Synthetic/SynthFaces", reference)
    run = result.checkpoint_dir.name
    with open(out_dir / f"{run}_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(reference, newline="") as fh:
        ref = {r["Dataset"]: r for r in csv.DictReader(fh)}
    final = {r["Dataset"]: r for r in rows if int(r["Step"]) == result.step}
    return {"out": out, "results": out_dir, "reference": reference, "final": final, "ref": ref,
            "step": result.step, "seconds": time.time() - t0, "run": run}


def print_tables(res: dict) -> None:
    cols = [*METRIC_COLUMNS, "PIC"]
    print("\nSYNTHETIC DATA: these numbers show the pipeline working; they are not the paper's results.\n")
    for ds, row in res["final"].items():
        print(f"== {ds} ==")
        print(f"{'model':<28}" + "".join(f"{c:>20}" for c in cols))
        ref = res["ref"][ds]
        print(f"{'bare backbone':<28}" + "".join(f"{float(ref[c]):>20.4f}" for c in METRIC_COLUMNS) + f"{'0':>20}")
        print(f"{'privacy layer, step ' + str(res['step']):<28}" +
              "".join(f"{float(row[c]):>20.4f}" if row[c] else f"{'n/a':>20}" for c in cols))
        print()
    r = res["results"]
    print(f"metrics CSV: {r / (res['run'] + '_metrics.csv')}\nreference:   {res['reference']}\n"
          f"report:      {r / 'report.md'}\nplots:       {', '.join(str(p) for p in sorted(r.glob('*.png')))}\n"
          f"total time:  {res['seconds']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder (a new _2, _3... if it is in use)")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (used by the tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_cli(lambda: print_tables(run_demo(Path(args.out), args.quick, args.seed)))


if __name__ == "__main__":
    sys.exit(main())
