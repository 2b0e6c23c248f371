"""Landmarks given in a file, no detection (``--detector file --landmarks FILE ...``).

Formats, told apart by their header:
  VGGFace2  bb_landmark/loose_landmark_{train,test}.csv: NAME_ID,P1X,P1Y,...,P5X,P5Y with NAME_ID = n000001/0001_01
            (the image path without its extension).
  CelebA    list_landmarks_celeba.txt or list_landmarks_align_celeba.txt: a count line, a header line
            (lefteye_x lefteye_y ... rightmouth_y), then "000001.jpg x y ..." (the image's file name); the _align
            file's points belong to img_align_celeba's images, the other's to img_celeba's.
  CSV       path,x1,y1,...,x5,y5 with or without that header (other columns ignored, so an OUT/.align_landmarks.csv
            of an earlier run reads as is; its rows without points are skipped); paths relative to SRC.
Points are in the order left eye, right eye, nose tip, left mouth corner, right mouth corner, as seen in the image.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path, PurePosixPath

import numpy as np

from facedata.align.detectors import DetectorSpec, Face, box_of, register_detector
from utils.errors import UserError

COORDS = [f"{a}{i}" for i in range(1, 6) for a in ("x", "y")]
CELEBA_HEADER = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y", "leftmouth_x",
                 "leftmouth_y", "rightmouth_x", "rightmouth_y"]
VGG_HEADER = ["name_id"] + [f"p{i}{a}" for i in range(1, 6) for a in ("x", "y")]


def _points(values: list[str], path: Path, line: int) -> np.ndarray:
    try:
        pts = np.array([float(v) for v in values], dtype=np.float64).reshape(5, 2)
    except ValueError:
        raise UserError(f"landmark file '{path}', line {line}: {' '.join(values)[:80]!r} is not ten numbers "
                        f"(x1 y1 ... x5 y5). Check that it is the right file and not damaged.") from None
    if not np.isfinite(pts).all():
        raise UserError(f"landmark file '{path}', line {line}: landmarks are not finite numbers.")
    return pts


def _key(rel: str, kind: str) -> str:
    p = PurePosixPath(rel.replace("\\", "/").strip("/"))
    if kind == "vggface2":
        return str(p.with_suffix(""))
    if kind == "celeba":
        return p.name
    return str(p)


def read_landmarks(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(format, key -> 5x2 points) of one landmark file."""
    if not path.is_file():
        raise UserError(f"landmark file '{path}' (--landmarks) does not exist. Give the path of VGGFace2's "
                        f"loose_landmark_*.csv, CelebA's list_landmarks_*celeba.txt or a CSV path,x1,y1,...,x5,y5.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"landmark file '{path}' is not UTF-8 text; it is damaged or not a landmark file.") from None
    lines = text.splitlines()
    out: dict[str, np.ndarray] = {}
    if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].split() == CELEBA_HEADER:
        kind = "celeba"
        for n, line in enumerate(lines[2:], start=3):
            cells = line.split()
            if not cells:
                continue
            if len(cells) != 11:
                raise UserError(f"landmark file '{path}', line {n}: expected a file name and ten numbers (CelebA's "
                                f"list_landmarks format), got {len(cells)} fields.")
            out[_key(cells[0], kind)] = _points(cells[1:], path, n)
        return kind, out
    rows = list(csv.reader(lines, skipinitialspace=True))
    rows = [(n, [c.strip() for c in r]) for n, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"landmark file '{path}' is empty.")
    header = [c.lower() for c in rows[0][1]]
    if header[:11] == VGG_HEADER:
        kind, name_col, cols, body = "vggface2", 0, list(range(1, 11)), rows[1:]
    elif "path" in header and all(c in header for c in COORDS):
        kind, name_col, cols, body = "csv", header.index("path"), [header.index(c) for c in COORDS], rows[1:]
    else:
        kind, name_col, cols, body = "csv", 0, list(range(1, 11)), rows
        if len(rows[0][1]) == 11 and not re.fullmatch(r"-?[\d.eE+-]+", rows[0][1][1]):
            body = rows[1:]   # an unnamed header row
    for n, row in body:
        if len(row) <= max(cols + [name_col]):
            raise UserError(f"landmark file '{path}', line {n}: {len(row)} fields; expected a path and ten numbers "
                            f"(path,x1,y1,...,x5,y5).")
        values = [row[c] for c in cols]
        if all(v == "" for v in values):
            continue   # a row of a landmarks CSV for an image without points (no face)
        out[_key(row[name_col], kind)] = _points(values, path, n)
    return kind, out


class LandmarkFile:
    """Landmarks looked up by the image's path relative to SRC."""
    needs_pixels = False

    def __init__(self, spec: DetectorSpec):
        if not spec.landmarks:
            raise UserError("--detector file needs --landmarks FILE (VGGFace2's loose_landmark_*.csv, CelebA's "
                            "list_landmarks_*celeba.txt, or a CSV path,x1,y1,...,x5,y5).")
        self.tables: list[tuple[str, dict[str, np.ndarray]]] = []
        for name in spec.landmarks:
            self.tables.append(read_landmarks(Path(name)))
        self.source = "file:" + ",".join(Path(p).name for p in spec.landmarks)

    def faces(self, image: np.ndarray | None, rel: str) -> list[Face]:
        for kind, table in self.tables:
            pts = table.get(_key(rel, kind))
            if pts is not None:
                return [Face(box_of(pts), pts.copy())]
        return []

    def __len__(self) -> int:
        return sum(len(t) for _, t in self.tables)


@register_detector("file", "landmarks read from --landmarks files (VGGFace2 loose_landmark CSV, CelebA "
                           "list_landmarks, or path,x1,y1,...,x5,y5), no detection")
def build(spec: DetectorSpec) -> LandmarkFile:
    return LandmarkFile(spec)

