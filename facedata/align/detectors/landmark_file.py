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

import array
import csv
import itertools
import math
import re
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from facedata.align.detectors.base import DetectorSpec, Face, LeftOut, box_of, register_detector
from utils.errors import UserError

COORDS = [f"{a}{i}" for i in range(1, 6) for a in ("x", "y")]
CELEBA_HEADER = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y", "leftmouth_x",
                 "leftmouth_y", "rightmouth_x", "rightmouth_y"]
VGG_HEADER = ["name_id"] + [f"p{i}{a}" for i in range(1, 6) for a in ("x", "y")]


class Table:
    """One landmark file read once: key -> row of a (N, 5, 2) array, and the keys it gives two different rows for
    (never guessed: those images are left out and listed). Numbers are collected in a flat array of doubles (8
    bytes each): millions of rows fit in memory."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.index: dict[str, int] = {}
        self.lines = array.array("q")
        self.values = array.array("d")
        self.ambiguous: dict[str, tuple[int, int]] = {}
        self.points = np.zeros((0, 5, 2))

    def _numbers(self, cells: list[str], line: int) -> list[float]:
        try:
            numbers = [float(v) for v in cells]
        except ValueError:
            numbers = []
        if len(numbers) != 10 or not all(math.isfinite(v) for v in numbers):
            what = "not ten numbers (x1 y1 ... x5 y5)" if len(numbers) != 10 else "not finite numbers (nan or inf)"
            raise UserError(f"landmark file '{self.path}', line {line}: {' '.join(cells)[:80]!r} is {what}. Check "
                            f"that it is the right file and not damaged, or correct that row.")
        return numbers

    def add(self, key: str, cells: list[str], line: int) -> None:
        numbers = self._numbers(cells, line)
        row = self.index.get(key)
        if row is None:
            self.index[key] = len(self.lines)
            self.lines.append(line)
            self.values.extend(numbers)
        elif key not in self.ambiguous and list(self.values[10 * row:10 * row + 10]) != numbers:
            self.ambiguous[key] = (self.lines[row], line)

    def finish(self) -> Table:
        """The collected numbers as one (N, 5, 2) array."""
        self.points = np.frombuffer(self.values, dtype=np.float64).reshape(-1, 5, 2)
        return self

    def __len__(self) -> int:
        return len(self.index)

    def get(self, rel: str) -> np.ndarray | None:
        key = _key(rel, self.kind)
        if key in self.ambiguous:
            a, b = self.ambiguous[key]
            raise LeftOut("ambiguous", f"landmark file '{self.path.name}' gives two different rows for it (lines "
                                       f"{a} and {b}): never guessed")
        row = self.index.get(key)
        return None if row is None else self.points[row].copy()


def _key(rel: str, kind: str) -> str:
    p = PurePosixPath(rel.replace("\\", "/").strip("/"))
    if kind == "vggface2":
        return str(p.with_suffix(""))
    if kind == "celeba":
        return p.name
    return str(p)


def read_landmarks(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(format, key -> 5x2 points) of one landmark file (keys given two different rows are left out)."""
    table = read_table(path)
    return table.kind, {key: table.points[row] for key, row in table.index.items() if key not in table.ambiguous}


def read_table(path: Path) -> Table:
    """One landmark file as a Table, streamed line by line: a file of millions of rows is read once, into one
    array (the text is never held whole)."""
    if not path.is_file():
        raise UserError(f"landmark file '{path}' (--landmarks) does not exist or is not a file. Give the path of "
                        f"VGGFace2's loose_landmark_*.csv, CelebA's list_landmarks_*celeba.txt or a CSV "
                        f"path,x1,y1,...,x5,y5.")
    try:
        with open(path, encoding="utf-8-sig") as fh:   # universal newlines: \n, \r\n and \r alike
            return _parse(path, fh)
    except UnicodeDecodeError:
        raise UserError(f"landmark file '{path}' is not UTF-8 text; it is damaged or not a landmark file.") from None
    except csv.Error as exc:   # a NUL byte, a field beyond csv's size limit
        raise UserError(f"landmark file '{path}' is not a readable CSV ({exc}); it is damaged or not a landmark "
                        f"file.") from None
    except OSError as exc:
        raise UserError(f"landmark file '{path}' cannot be read ({exc.strerror or exc}).") from None


def _parse(path: Path, fh: Iterable[str]) -> Table:
    lines = iter(fh)
    head = list(itertools.islice(lines, 2))
    if len(head) == 2 and head[0].strip().isdigit() and head[1].split() == CELEBA_HEADER:
        table = Table(path, "celeba")
        for n, line in enumerate(lines, start=3):
            cells = line.split()
            if not cells:
                continue
            if len(cells) != 11:
                raise UserError(f"landmark file '{path}', line {n}: expected a file name and ten numbers (CelebA's "
                                f"list_landmarks format), got {len(cells)} fields.")
            table.add(_key(cells[0], "celeba"), cells[1:], n)
        return table.finish()
    reader = csv.reader(itertools.chain(head, lines), skipinitialspace=True)
    rows = ((n, [c.strip() for c in r]) for n, r in enumerate(reader, start=1))
    rows = ((n, r) for n, r in rows if any(r))
    first = next(rows, None)
    if first is None:
        raise UserError(f"landmark file '{path}' is empty.")
    header = [c.lower() for c in first[1]]
    body: Iterator[tuple[int, list[str]]]   # the data rows: after the header, or from the first row on
    if header[:11] == VGG_HEADER:
        kind, name_col, cols, body = "vggface2", 0, list(range(1, 11)), rows
    elif "path" in header and all(c in header for c in COORDS):
        kind, name_col, cols, body = "csv", header.index("path"), [header.index(c) for c in COORDS], rows
    else:
        kind, name_col, cols = "csv", 0, list(range(1, 11))
        unnamed_header = len(first[1]) == 11 and not re.fullmatch(r"-?[\d.eE+-]+", first[1][1])
        body = rows if unnamed_header else itertools.chain([first], rows)
    table = Table(path, kind)
    width = max(cols + [name_col])
    for n, row in body:
        if len(row) <= width:
            raise UserError(f"landmark file '{path}', line {n}: {len(row)} fields; expected a path and ten numbers "
                            f"(path,x1,y1,...,x5,y5).")
        values = [row[c] for c in cols]
        if all(v == "" for v in values):
            continue   # a row of a landmarks CSV for an image without points (no face)
        if not row[name_col]:
            raise UserError(f"landmark file '{path}', line {n}: the image path is empty.")
        table.add(_key(row[name_col], kind), values, n)
    return table.finish()


class LandmarkFile:
    """Landmarks looked up by the image's path relative to SRC (the files are read once, by the process that
    builds this source; the aligner passes each worker only the points of its images)."""
    needs_pixels = False

    def __init__(self, spec: DetectorSpec):
        if not spec.landmarks:
            raise UserError("--detector file needs --landmarks FILE (VGGFace2's loose_landmark_*.csv, CelebA's "
                            "list_landmarks_*celeba.txt, or a CSV path,x1,y1,...,x5,y5).")
        self.tables: list[Table] = [read_table(Path(name)) for name in spec.landmarks]
        self.source = "file:" + ",".join(Path(p).name for p in spec.landmarks)

    def faces(self, image: np.ndarray | None, rel: str) -> list[Face]:
        for table in self.tables:   # the first file that names the image gives its points
            pts = table.get(rel)
            if pts is not None:
                return [Face(box_of(pts), pts)]
        return []

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)


@register_detector("file", "landmarks read from --landmarks files (VGGFace2 loose_landmark CSV, CelebA "
                           "list_landmarks, or path,x1,y1,...,x5,y5), no detection")
def build(spec: DetectorSpec) -> LandmarkFile:
    return LandmarkFile(spec)

