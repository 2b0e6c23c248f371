"""Train/test overlap: training images that are near-duplicates of evaluation images make that set's verification
and gender numbers optimistic (the layer has seen those people).

    python tools/check_overlap.py [--config PATH] [--set KEY=VALUE ...] [--threshold 0.95] [--csv OUT.csv]

.bin files carry no names, so images are compared by template: every training image of config option data_dir
(as is and mirrored) against every image of each evaluation set of test_targets (rec/<name>.bin), by the cosine
of the backbone's normalised templates (from the template cache, computed once and shared with training). A
training image whose best match reaches --threshold is reported with that match, per evaluation set, and counted
by identity; --csv writes every such pair (to a new _2, _3... name if that file exists: never replaced). Exit
status 1 when any is found, 0 when none, 2 on bad input.

The default threshold 0.95 is one for the same photograph, not for the same person: a photograph re-encoded,
resized or mirrored typically stays above it under a face-recognition backbone, while two different
photographs of one person usually score well below it (genuine pairs mostly fall between 0.3 and 0.8 with
ArcFace-type models). Lower it to catch near-identical frames; identities present only through other
photographs are not found this way. Similarities are computed in chunks of CHUNK_ROWS rows per side, so memory
stays bounded whatever the sizes.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
from pathlib import Path


from backbones.spec import BackboneSpec
from config.config import Config
from eval.evalset import EvalTemplates, check_bins, open_eval_set
from eval.overlap import CSV_COLUMNS, DEFAULT_THRESHOLD, Overlap, describe, eval_image_name, find_overlap
from templates.cache import TemplateCache, index_inputs
from config.loading import OVERRIDE_HELP, load_config
from facedata.dataset import TrainIndex, scan_training_data
from utils.device import select_device
from utils.errors import UserError, run_cli
from utils.io import atomic_write_text, free_path


def check_overlap(cfg: Config, threshold: float = DEFAULT_THRESHOLD, csv_path: str | Path | None = None
                  ) -> tuple[TrainIndex, list[tuple[EvalTemplates, Overlap]]]:
    """The training set of ``cfg`` (returned) against each of its test_targets; writes every near-duplicate pair
    to ``csv_path`` (atomically) when given, which must not exist (a user's file is never replaced)."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: a cosine similarity threshold must be in (0, 1]; the default is "
                        f"{DEFAULT_THRESHOLD}.")
    if csv_path is not None and os.path.lexists(csv_path):
        raise UserError(f"--csv '{csv_path}' already exists; existing files are never overwritten. Choose another "
                        f"path (the command line takes the next free _2, _3... name by itself).")
    if not cfg.test_targets:
        raise UserError("config option test_targets is empty: name the evaluation sets to check, e.g. "
                        "--set test_targets=\"['lfw']\".")
    check_bins(cfg.rec, cfg.test_targets, "config options rec, test_targets",
               "choose the sets with --set test_targets=\"['lfw']\"")
    index = scan_training_data(cfg.data_dir, cfg.rec_genders)
    backbone = BackboneSpec.from_config(cfg)
    backbone.check()
    cache = TemplateCache.from_config(cfg, select_device(cfg.device), backbone=backbone)
    templates = cache.get(f"train-{index.name}", index_inputs(index), index.paths, lambda i: str(index.paths[i]),
                          what=f"training images of {index.where}")
    found = []
    for name in cfg.test_targets:
        ev = open_eval_set(cache, cfg.rec, name)
        found.append((ev, find_overlap(index, templates, ev, threshold)))
    if csv_path is not None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for ev, overlap in found:
            for i, j, c in zip(overlap.train_images, overlap.eval_images, overlap.cosine):
                writer.writerow([ev.name, str(index.paths[i]), index.folders[index.labels[i]],
                                 eval_image_name(ev, int(j)), f"{c:.6f}"])
        try:
            atomic_write_text(csv_path, buf.getvalue())
        except OSError as exc:
            raise UserError(f"cannot write the pairs to '{csv_path}' (--csv): {exc.strerror or exc}. Choose another "
                            f"--csv path.") from None
    return index, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OVERRIDE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config module (default: config/config.py)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config options (data_dir, rec_genders, rec, test_targets, ...)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine from which two images count as the same photograph (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--csv", default=None, help="write every near-duplicate pair to this CSV")
    args = parser.parse_args(argv)
    found_any = []

    def body() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S")
        written = free_path(args.csv) if args.csv else None
        index, found = check_overlap(load_config(args.config, args.set), args.threshold, written)
        for ev, overlap in found:
            print(describe(index, ev, overlap))
            found_any.append(len(overlap) > 0)
        if written is not None:
            print(f"pairs: {written}")
    code = run_cli(body)
    return 1 if code == 0 and any(found_any) else code


if __name__ == "__main__":
    sys.exit(main())
