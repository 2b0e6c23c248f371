"""tools/align_faces.py: align the faces of a folder tree of photographs into the 112x112 crops the backbones were
trained on (five landmarks, least-squares similarity onto insightface's reference points).

    python tools/align_faces.py SRC OUT [--detector dlib|scrfd|retinaface|file] [--detector-model PATH]
                                        [--landmarks FILE ...] [--workers N] [--fallback centre]

OUT mirrors SRC one to one (same relative paths, same file extensions), so tools/prepare_dataset.py and
tools/make_bin.py work on OUT as on an aligned download. Images where no face is found are left out and listed in
OUT/.align_report.txt (or, with --fallback centre, replaced by a centred crop, marked there); several faces: the
largest nearest the image centre is taken (insightface's rule) and counted. OUT/.align_landmarks.csv records every
image's five points and their source (reusable with --detector file --landmarks OUT/.align_landmarks.csv);
OUT/.align.log the counts. SRC is never changed; an OUT holding anything else is refused; a rerun changes nothing;
an interrupted run continues where it stopped.

Detectors:
{detectors}
"""
from __future__ import annotations

import argparse
import sys

from facedata.align.detectors import DETECTORS, DetectorSpec
from facedata.align.run import LANDMARKS_NAME, LOG_NAME, REPORT_NAME, align_tree, default_workers
from utils.errors import run_cli


def add_detector_options(parser: argparse.ArgumentParser, flag: str = "--detector", default: str | None = "dlib"
                         ) -> None:
    """The options that choose a landmark source (shared with tools/prepare_dataset.py --align)."""
    parser.add_argument(flag, default=default, choices=sorted(DETECTORS),
                        help=f"landmark source (default {default})" if default else "landmark source")
    parser.add_argument("--detector-model", default=None,
                        help="model file: the .onnx of scrfd/retinaface (required), or dlib's 68-point .dat")
    parser.add_argument("--landmarks", nargs="+", default=[],
                        help="--detector file: VGGFace2 loose_landmark_*.csv, CelebA list_landmarks_*celeba.txt, "
                             "or a CSV path,x1,y1,...,x5,y5 (paths relative to the image folder)")
    parser.add_argument("--workers", type=int, default=None, help=f"parallel processes (default: the cores, "
                                                                  f"{default_workers()} here)")
    parser.add_argument("--fallback", choices=("none", "centre"), default="none",
                        help="no face found: leave the image out (none, the default) or write a centred crop, "
                             "marked in the report")


def spec_from(args: argparse.Namespace, name: str) -> DetectorSpec:
    """The DetectorSpec of parsed options."""
    return DetectorSpec(name, args.detector_model, tuple(args.landmarks))


def main(argv: list[str] | None = None) -> int:
    listing = "\n".join(f"  {name:<11} {DETECTORS.help(name)}" for name in sorted(DETECTORS))
    parser = argparse.ArgumentParser(description=__doc__.format(detectors=listing),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of the photographs as downloaded (never changed)")
    parser.add_argument("out", help="folder of the aligned crops (created; a rerun continues it)")
    add_detector_options(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        result = align_tree(args.src, args.out, spec_from(args, args.detector), args.workers,
                            args.fallback == "centre")
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
