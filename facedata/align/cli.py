"""tools/align_faces.py: align the faces of a folder tree of photographs into the 112x112 crops the backbones were
trained on (five landmarks, least-squares similarity onto insightface's reference points).

    python tools/align_faces.py SRC OUT [--detector dlib|scrfd|retinaface|file] [--detector-model PATH]
                                        [--landmarks FILE ...] [--workers N] [--fallback centre]
                                        [--max-megapixels M] [--progress-seconds S]

OUT mirrors SRC one to one (same relative paths, same file extensions), so tools/prepare_dataset.py and
tools/make_bin.py work on OUT as on an aligned download. Images where no face is found are left out and listed in
OUT/.align_report.txt (or, with --fallback centre, replaced by a centred crop, marked there), and so are
unreadable files, images above --max-megapixels and landmarks that are no face of the image (outside it, an
absurd scale, two different rows of a landmark file); several faces: the largest nearest the image centre is
taken (insightface's rule) and counted. --detector dlib searches with HOG, then with dlib's CNN detector (MMOD)
where HOG finds none. OUT/.align_landmarks.csv records every image's five points, their source and the source
file's size and time (reusable with --detector file --landmarks OUT/.align_landmarks.csv); OUT/.align.log the
counts, rewritten as the run goes. SRC is never changed (links to folders are followed, loops listed as skipped);
an OUT holding anything else is refused; a rerun changes nothing but the images whose source was replaced; an
interrupted run continues where it stopped.

Detectors:
{detectors}
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from facedata.align.detectors import DETECTORS, DetectorSpec
from facedata.align.run import (LANDMARKS_NAME, LOG_NAME, PROGRESS_SECONDS, REPORT_NAME, align_tree,
                                default_workers)
from facedata.align.worker import MAX_MEGAPIXELS
from utils.errors import run_cli
from utils.logs import ROOT


def add_detector_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str = "--detector",
                         default: str | None = "dlib") -> None:
    """The options that choose a landmark source, on a parser or one of its groups (shared with
    tools/prepare_dataset.py --align)."""
    parser.add_argument(flag, default=default, choices=sorted(DETECTORS),
                        help=f"landmark source (default {default})" if default else "landmark source")
    parser.add_argument("--detector-model", default=None,
                        help="model file: the .onnx of scrfd/retinaface (required), or dlib's 68-point .dat")
    parser.add_argument("--landmarks", nargs="+", default=[],
                        help="--detector file: VGGFace2 loose_landmark_*.csv, CelebA list_landmarks_*celeba.txt, "
                             "or a CSV path,x1,y1,...,x5,y5 (paths relative to the image folder)")
    parser.add_argument("--workers", type=int, default=None, help=f"parallel processes (default: the cores, "
                                                                  f"{default_workers()} here; at most the cores and "
                                                                  f"the images to align)")
    parser.add_argument("--fallback", choices=("none", "centre"), default="none",
                        help="no face found: leave the image out (none, the default) or write a centred crop, "
                             "marked in the report")


def spec_from(args: argparse.Namespace, name: str) -> DetectorSpec:
    """The DetectorSpec of parsed options."""
    return DetectorSpec(name, args.detector_model, tuple(args.landmarks))


@contextlib.contextmanager
def log_to_stderr() -> Iterator[None]:
    """The library's log lines (progress, workers) on stderr while the command runs (prepare_dataset.py --align
    can wrap its body in it too)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger(ROOT)
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    listing = "\n".join(f"  {name:<11} {DETECTORS.help(name)}" for name in sorted(DETECTORS))
    parser = argparse.ArgumentParser(description=__doc__.format(detectors=listing),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of the photographs as downloaded (never changed)")
    parser.add_argument("out", help="folder of the aligned crops (created; a rerun continues it)")
    add_detector_options(parser)
    parser.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                        help=f"images with more pixels (as their header declares) are left out and listed, never "
                             f"decoded (default {MAX_MEGAPIXELS:g})")
    parser.add_argument("--progress-seconds", type=float, default=PROGRESS_SECONDS,
                        help=f"without a terminal (output to a file), a progress line at most this often; "
                             f".align.log is rewritten as often (default {PROGRESS_SECONDS:g}; 0: every image)")
    args = parser.parse_args(argv)

    def body() -> None:
        with log_to_stderr():
            result = align_tree(args.src, args.out, spec_from(args, args.detector), args.workers,
                                args.fallback == "centre", max_megapixels=args.max_megapixels,
                                progress_seconds=args.progress_seconds)
        print((result.out / LOG_NAME).read_text(), end="")
        if result.processed:
            print(f"{result.processed} images done by this run in {result.seconds:.1f} s "
                  f"({result.processed / max(result.seconds, 1e-9):.1f} images/s)")
        else:
            print("nothing to do: every image was already aligned (nothing changed)")
        print(f"landmarks: {result.out / LANDMARKS_NAME}\nreport of what was left out: {result.out / REPORT_NAME}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
