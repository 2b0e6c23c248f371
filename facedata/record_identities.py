"""The identities of an insightface record file and their genders from a gender CSV: the one reading shared by
training on a .rec (facedata/dataset.py) and by preparing a folder of it (facedata/prepare.py --format rec), so that
both keep and leave out the same identities and images.

The gender CSV has the columns label (the identity number the records carry) and gender (female/male, f/m or 1/0
in any case, 1 feminine); blank lines are skipped and any other row is an error listing the first few. An identity's
image records are those its identity record names (or that carry its label, without a header record); a record
whose label is another identity's, or whose bytes are not a JPEG/PNG/BMP/WebP/TIFF image, is not one of its images.
"""
from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container

from facedata.recordio import RecordFile
from utils.errors import UserError

GENDER_VALUES = {"female": 1, "f": 1, "1": 1, "male": 0, "m": 0, "0": 0}   # gender cell -> 1 feminine, 0 masculine
_SHOWN_ROWS = 5   # bad rows quoted in an error; the rest are counted


def image_extension(head: bytes) -> str | None:
    """The file extension of an encoded image from its first 12 bytes (None if not a JPEG/PNG/BMP/WebP/TIFF)."""
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"BM"):
        return ".bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return ".tif"
    return None


def read_gender_csv(path: str | os.PathLike, rec_path: str | os.PathLike, option: str,
                    missing_hint: str = "") -> dict[int, list[tuple[int, str]]]:
    """identity label -> (gender, the cell as written) for each of its rows in the gender CSV ``path`` of record
    file ``rec_path``; ``option`` names where the CSV was given (in errors), ``missing_hint`` how to give it."""
    path = Path(path)
    expected = (f"gender CSV '{path}' of record file '{rec_path}' ({option}) must have the columns label (the "
                f"identity number the records carry) and gender (female/male, f/m, or 1/0 with 1 feminine)")
    if path.is_dir():
        raise UserError(f"{expected}, but it is a folder. Name the CSV file itself.")
    if not path.is_file():
        raise UserError(f"{expected}, but it does not exist.{' ' + missing_hint if missing_hint else ''}")
    bad: list[str] = []
    n_bad = 0
    genders: dict[int, list[tuple[int, str]]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, skipinitialspace=True)
            rows = ([c.strip() for c in row] for row in reader if any(c.strip() for c in row))
            header = [c.lower() for c in next(rows, [])]
            if "label" not in header or "gender" not in header:
                raise UserError(f"{expected}; its first row has the columns {header or 'nothing'}. Add the header "
                                f"row label,gender.")
            l_col, g_col = header.index("label"), header.index("gender")
            for row in rows:
                value = row[g_col] if len(row) > max(l_col, g_col) else ""
                if value.lower() not in GENDER_VALUES or not re.fullmatch(r"\d+", row[l_col]):
                    n_bad += 1
                    if len(bad) < _SHOWN_ROWS:
                        bad.append(f"line {reader.line_num}: {','.join(row)[:60]!r}")
                    continue
                genders.setdefault(int(row[l_col]), []).append((GENDER_VALUES[value.lower()], value))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{expected}; it does not read as a UTF-8 CSV file ({exc}).") from None
    except OSError as exc:
        raise UserError(f"{expected}; it could not be read ({exc.strerror or exc}).") from None
    if n_bad:
        raise UserError(f"{expected}; {n_bad} row(s) do not: {'; '.join(bad)}{'; ...' if n_bad > len(bad) else ''}. "
                        f"Fix those rows.")
    return genders


@dataclass
class RecordIdentity:
    """One identity of a record file and what its image records hold."""
    label: int
    images: dict[int, str] = field(default_factory=dict)   # record key -> file extension, in key order
    other_labels: Counter = field(default_factory=Counter)  # label -> image records of its range carrying it
    not_images: int = 0                                     # records of its range whose bytes are not an image
    scanned: bool = False                                   # False: its records were not read (not asked for)


def record_identities(records: RecordFile, labels: Container[int] | None = None) -> list[RecordIdentity]:
    """Every identity of ``records`` in numeric label order; the image records of those in ``labels`` (all when
    None) read and sorted into images, records labelled with another identity, and records that are no image."""
    identities = []
    for label, keys in records.identity_ranges():
        ident = RecordIdentity(label)
        if labels is None or label in labels:
            ident.scanned = True
            for key in sorted(keys):
                record_labels, head = records.read_head(key, 12)
                ext = image_extension(head)
                if record_labels[0] != float(label):
                    ident.other_labels[record_labels[0]] += 1
                elif ext is None:
                    ident.not_images += 1
                else:
                    ident.images[key] = ext
        identities.append(ident)
    if not identities:
        raise UserError(f"record file '{records.rec_path}' holds no identity: its header record names no identity "
                        f"records. It is not a complete insightface training set; copy it again.")
    return identities


def label_width(identities: list[RecordIdentity]) -> int:
    """Digits of the largest label: labels zero-padded to it sort as numbers (folder names follow label order)."""
    return len(str(max((i.label for i in identities), default=0)))
