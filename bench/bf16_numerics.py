"""What amp=bf16 changes in the numbers (BENCHMARKS.md, numerical notes), in one run on a CPU with bfloat16:

1. the templates' cosine to float32 (image and flip rows) over the synthetic demo's images, for the demo backbone and
   for the golden backbones' deterministic weights (shared/golden/backbones.json: weights rebuilt from the keys and
   a seed, as tests/test_golden_backbones.py does), through the real extraction (bf16 with channels_last);
2. the change of every metric of the quick demo's sweep (each checkpoint and the bare backbone, both sets) when the
   same checkpoints are swept with amp=bf16 instead of float32.

    python bench/bf16_numerics.py [--out bf16_numerics] [--images 256] [--golden PATH] [--existing DEMO_FOLDER]
"""
from __future__ import annotations
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import json
import logging

import numpy as np
import torch

import backbones
from backbones.spec import BackboneSpec
from config.loading import load_config
from demo import QUICK, demo_overrides, run_demo
from eval.evalset import METRIC_COLUMNS
from facedata.dataset import scan_dataset
from pipeline.sweep import evaluate
from templates.cache import TemplateCache
from synthetic.backbone import seeded_weights as golden_weights
from templates.extraction import ExtractionSettings


def cosines(spec: BackboneSpec, items: list, work: Path) -> np.ndarray:
    """Cosine of every bf16 row (image and flip) to its float32 row, through the template cache's extraction."""
    rows = {}
    for amp in ("none", "bf16"):
        cache = TemplateCache(work / f"cache_{amp}", spec, ExtractionSettings(
            torch.device("cpu"), batch_size=32, num_workers=0, amp=amp, channels_last=amp == "bf16"))
        rows[amp] = np.array(cache.get("cos", "bf16-numerics", items).templates, dtype=np.float64)
    return (rows["none"] * rows["bf16"]).sum(-1).ravel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bf16_numerics")
    parser.add_argument("--images", type=int, default=256, help="demo images for the golden backbones' cosines")
    parser.add_argument("--golden", default=str(Path(__file__).resolve().parents[2] / "shared" / "golden" /
                                                 "backbones.json"))
    parser.add_argument("--existing", default=None, help="a quick demo's folder made by an earlier run: not made again")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    if args.existing:
        out = Path(args.existing)
        results = out / "results" / "Synthetic" / "SynthFaces"
        res = {"out": out, "reference": out / "results" / "reference_Demo.csv", "results": results,
               "final": [p.name[: -len("_metrics.csv")] for p in results.glob("*_metrics.csv")]}
    else:
        res = run_demo(Path(args.out), quick=True)
        out = res["out"]
    overrides = demo_overrides(out, QUICK, 0)
    lines = []
    # 1. cosines: the demo backbone over all the demo's images (training set and both .bin files' images)
    train = scan_dataset(out / "data" / "train" / "SynthFaces").paths
    cfg = load_config(None, overrides)
    cos = cosines(BackboneSpec.from_config(cfg), train, out / "numerics")
    lines.append(f"demo backbone, {len(train)} demo training images x 2 (flip): cosine min {cos.min():.6f}, "
                 f"mean {cos.mean():.6f}")
    print(lines[-1], flush=True)
    golden = json.loads(Path(args.golden).read_text())
    subset = train[:: max(1, len(train) // args.images)][: args.images]
    for case in golden["cases"]:
        name, _, se = case["name"].partition("+")
        net = backbones.get_backbone(name, 512, se == "SE")
        weights = out / "numerics" / f"{case['name']}.pth"
        torch.save(golden_weights(net.state_dict(), case["seed"]), weights)
        cos = cosines(BackboneSpec(name, weights, se == "SE"), subset, out / "numerics" / case["name"])
        lines.append(f"{case['name']} (golden weights, seed {case['seed']}), {len(subset)} demo images x 2: cosine "
                     f"min {cos.min():.6f}, mean {cos.mean():.6f}")
        print(lines[-1], flush=True)
    # 2. the same checkpoints swept again with amp=bf16
    bf16_dir = evaluate(load_config(None, [*overrides, "amp=bf16", "channels_last=True"]), out / "results_bf16",
                        out / "checkpoints" / "Demo", "Synthetic/SynthFaces", out / "results_bf16" / "reference.csv")

    def rows(path: Path) -> dict:
        with open(path, newline="") as fh:
            return {(r["Dataset"], r.get("Step", "")): r for r in csv.DictReader(fh)}
    pairs = [(rows(res["reference"]), rows(out / "results_bf16" / "reference.csv"))]
    pairs += [(rows(res["results"] / f"{run}_metrics.csv"), rows(bf16_dir / f"{run}_metrics.csv")) for run in
              res["final"]]
    for col in [*METRIC_COLUMNS, "PIC"]:
        diffs = [abs(float(a[k][col]) - float(b[k][col])) for ra, rb in pairs for k in ra
                 for a, b in [(ra, rb)] if a[k].get(col) not in (None, "") and b[k].get(col) not in (None, "")]
        if diffs:
            lines.append(f"{col}: max |bf16 - float32| {max(diffs):.5f} over {len(diffs)} rows")
    text = "\n".join(lines)
    (out / "bf16_numerics.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
