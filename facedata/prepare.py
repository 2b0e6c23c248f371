"""Turn a face dataset as downloaded into a ``subjectid_gender`` training folder (and, on request, a .bin).

    python tools/prepare_dataset.py --format lfw --images lfw/ --labels female_names.txt male_names.txt \\
        --out data/train/LFW [--bin data/eval/lfw_prepared.bin --pairs 3000]

Formats (--images, --labels):
  lfw         Name/Name_0001.jpg folders; the gender lists female_names.txt and male_names.txt (one image file
              name per line; a list is told female or male by its file name).
  agedb       a flat folder of ID_Name_Age_g.jpg files, g = f or m; no --labels (the file names carry the gender).
  colorferet  subject folders named by the 5-digit subject number (00001/...); subjects.xml of the ground truths
              (<Subject id="cfrS00001"> ... <Gender value="Male"/> or "Female"). Images must be decompressed
              (the distribution's .ppm.bz2 files are skipped and counted).
  vggface2    n000001/... folders; identity_meta.csv (Class_ID, Gender m/f) or per-image attribute annotations
              (a CSV with the image path in a Filename column and a Male column in {-1, 0, 1}; 0 = undetermined,
              skipped and counted).
  celeba      a flat folder of 000001.jpg... (img_align_celeba, or img_celeba with --align); two label files:
              identity_CelebA.txt ('000001.jpg 2880': the identity of each image) and list_attr_celeba.txt (with
              or without its count line, then the attribute names, then '000001.jpg -1 1 ...'; Male 1 masculine,
              -1 feminine, per image). Files told apart by the attribute file's header row.
  rec         an insightface train.rec (or the folder holding train.rec and train.idx); a CSV with the columns
              label (the identity number the records carry) and gender (female/male, f/m, or 1/0 in this
              project's convention). Folders are <label>_<gender>, labels zero-padded to one width so that
              their sorted order (the training labels) is the records' label order.

Per-image labels (celeba, vggface2's attribute CSV, lfw's lists) can disagree within an identity. --gender-rule
unanimous (the default) leaves such an identity out; --gender-rule majority keeps it with the gender of at least
--gender-min-share of its labels (default 0.8) and lists it with its counts in the report.

Output: OUT/<identity>_<gender>/ folders, gender 1 feminine and 0 masculine whatever the source's convention,
holding links to the source images (--link symbolic, the default, with absolute targets; or hard). Nothing is
copied and the source is never changed -- except for `rec`, where no image files exist to link to: its images'
encoded bytes are written as files (the only format that writes image files). OUT/.prepare.log states the gender
mapping and the counts; OUT/.prepare_report.txt lists every identity left out (no label, conflicting labels,
fewer than --min-images images) and every file that does not follow the format's layout -- never guessed. Both
are hidden files, which the training scanner ignores. Identity folder names keep [A-Za-z0-9._-] and replace
other characters with '_' (a short hash tells apart names that would then coincide).

--align DETECTOR (not for rec, whose records are aligned crops already) writes, instead of links, each image's
aligned 112x112 crop (facedata.align, as tools/align_faces.py: five landmarks, similarity onto insightface's
reference points): images where no face is found are left out (OUT/.align_report.txt), every image's landmarks
are in OUT/.align_landmarks.csv, and an identity none of whose images could be aligned is left out and listed.
For CelebA's in-the-wild photos (img_celeba), its own landmarks: --align file --landmarks
list_landmarks_celeba.txt (list_landmarks_align_celeba.txt for img_align_celeba).

Running again with the same inputs changes nothing (same links, same report bytes, no file touched). An existing
OUT holding anything this run would not create (another file, a link to another image) is an error, never
overwritten; entries still missing (an interrupted run) are added.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union


from facedata.align.cli import add_detector_options, log_to_stderr, spec_from
from facedata.align.detectors import DetectorSpec
from facedata.align.run import LOG_NAME as ALIGN_LOG_NAME, Job, align_images
from facedata.bin_builder import build_bin, sidecar_path
from facedata.dataset import IMAGE_EXTENSIONS, entry_kind, scan_dataset, visible_entries
from utils.errors import UserError, listing, run_cli
from utils.io import atomic_write_text, check_creatable
from facedata.record_identities import label_width, read_gender_csv, record_identities
from facedata.recordio import RecordFile

FORMATS = ("lfw", "agedb", "colorferet", "vggface2", "celeba", "rec")
GENDER_RULES = ("unanimous", "majority")
MIN_SHARE = 0.8   # --gender-min-share: the default share of its labels the majority gender needs
REPORT_NAME = ".prepare_report.txt"
LOG_NAME = ".prepare.log"
FEMININE, MASCULINE = 1, 0
BROKEN_LINKS = "broken symbolic links (pointing to nothing, or looping)"   # skipped, counted in the log
Source = Union[Path, int]   # an image file to link to, or a record key of a .rec


@dataclass
class Identity:
    """What the label sources say about one identity, and its images."""
    images: list[Path] = field(default_factory=list)            # the image files of a folder format
    keys: list[int] = field(default_factory=list)               # --format rec: its record keys (no files)
    evidence: dict[int, Counter] = field(default_factory=dict)   # gender -> Counter of where it was read
    notes: list[str] = field(default_factory=list)               # shown in the report if it is left out
    conflict: str = ""                                            # a problem that rules the identity out

    def add(self, gender: int, where: str) -> None:
        self.evidence.setdefault(gender, Counter())[where] += 1

    @property
    def count(self) -> int:
        """How many images it has: files, or record keys of a .rec."""
        return len(self.images) + len(self.keys)


@dataclass
class Collected:
    """One format's reading of the dataset: identities, the gender mapping it used and what it skipped."""
    identities: dict[str, Identity]
    mapping: list[str]
    notes: list[str] = field(default_factory=list)               # counts for the log
    unparsed: list[tuple[str, str]] = field(default_factory=list)  # (item, why) for the report
    rec: RecordFile | None = None
    extensions: dict[int, str] = field(default_factory=dict)     # rec: record key -> image file extension
    rule: str = "unanimous"                                       # set by decide(): the gender rule, for the log
    decided: list[tuple[str, str, int, str]] = field(default_factory=list)   # set by decide(): kept by majority


@dataclass
class Prepared:
    """The result of a run (for callers and tests)."""
    out: Path
    kept: dict[str, int]                   # folder name -> gender
    left_out: list[tuple[str, str, int, str]]   # (reason, identity, images, details)
    report: Path
    log: Path
    bin: Path | None
    created: int                           # links or files made by this run (0 on a repeated run)


# ---------------------------------------------------------------- helpers shared by the formats

def _images_of(folder: Path, skipped: Counter) -> list[Path]:
    """Image files directly in ``folder``; other and empty files are counted in ``skipped``."""
    images = []
    for e in visible_entries(folder):
        kind = entry_kind(e)
        if kind == "broken":
            skipped[BROKEN_LINKS] += 1
        if kind != "file":
            continue
        name = e.name.lower()
        if name.endswith(".bz2"):
            skipped["compressed .bz2 files (decompress them first, e.g. bunzip2 -k)"] += 1
        elif Path(name).suffix not in IMAGE_EXTENSIONS:
            skipped["files without an image extension"] += 1
        elif e.stat().st_size == 0:
            skipped["empty (0-byte) image files"] += 1
        else:
            images.append(Path(e.path))
    return images


def _skipped_notes(skipped: Counter) -> list[str]:
    return [f"skipped {n} {what}" for what, n in sorted(skipped.items())]


def _label_file(path: Path) -> Path:
    if path.is_dir():
        raise UserError(f"label file '{path}' (--labels) is a folder; name the label file(s) inside it (see "
                        f"tools/prepare_dataset.py --help for each format's label files).")
    if not path.is_file():
        raise UserError(f"label file '{path}' (--labels) does not exist. Give the path of the dataset's label file "
                        f"(see tools/prepare_dataset.py --help for where each format's labels come from).")
    return path


def _read_text(path: Path) -> str:
    try:
        return _label_file(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"label file '{path}' is not UTF-8 text; it is damaged or not the expected label file. "
                        f"Download it again.") from None


def _garbled(path: Path, problems: list[str], expected: str, total: int = 0) -> UserError:
    """The error for a label file that does not parse; ``problems`` are the first few of ``total``."""
    total = max(total, len(problems))
    listed = "; ".join(problems[:5]) + (f"; and {total - 5} more" if total > 5 else "")
    return UserError(f"label file '{path}' does not read as {expected}: {listed}. Check that it is the right file "
                     f"and not damaged (download it again).")


class _BadLines:
    """Counts the lines of a label file that do not parse, keeping the first few for the error message."""

    def __init__(self, path: Path, expected: str):
        self.path, self.expected, self.count = path, expected, 0
        self.first: list[str] = []

    def add(self, problem: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(problem)

    def raise_if_any(self) -> None:
        if self.count:
            raise _garbled(self.path, self.first, self.expected, self.count)


def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """(column names stripped and lower-cased, streamed (line, cells) rows) of a CSV whose header may have spaces
    and quotes (VGGFace2's identity_meta.csv has both); blank lines are skipped."""
    fh = open(_label_file(path), newline="", encoding="utf-8-sig")
    reader = csv.reader(fh, skipinitialspace=True)

    def rows() -> Iterator[tuple[int, list[str]]]:
        with fh:
            try:
                for row in reader:
                    if any(c.strip() for c in row):
                        yield reader.line_num, [c.strip() for c in row]
            except (csv.Error, UnicodeDecodeError) as exc:
                raise _garbled(path, [f"line {reader.line_num + 1}: {exc}"], "a UTF-8 CSV file") from None

    it = rows()
    header = next(it, None)
    if header is None:
        raise _garbled(path, ["it is empty"], "a CSV file with a header row")
    return [c.lower() for c in header[1]], it


def _column(path: Path, columns: list[str], names: Sequence[str], expected: str) -> int:
    for name in names:
        if name in columns:
            return columns.index(name)
    raise _garbled(path, [f"no column {' or '.join(repr(n) for n in names)} (columns: {', '.join(columns)})"],
                   expected)


def _directory_identities(images: Path, skipped: Counter) -> dict[str, Identity]:
    """One identity per visible sub-folder of ``images`` with that folder's image files."""
    identities = {}
    for e in visible_entries(images):
        if entry_kind(e) == "dir":
            identities[e.name] = Identity(images=_images_of(Path(e.path), skipped))
        elif entry_kind(e) == "broken":
            skipped[BROKEN_LINKS] += 1
        else:
            skipped["files outside identity folders"] += 1
    return identities


# ---------------------------------------------------------------- the formats

_LFW_LINE = re.compile(r"^(?P<name>.+)_\d+\.[A-Za-z0-9]+$")


def collect_lfw(images: Path, labels: list[Path]) -> Collected:
    """LFW: identity folders; per-image gender lists female_names.txt / male_names.txt."""
    skipped: Counter = Counter()
    identities = _directory_identities(images, skipped)
    mapping, notes = [], []
    for path in labels:
        stem = _label_file(path).name.lower()
        gender = FEMININE if "female" in stem else MASCULINE if "male" in stem else None
        if gender is None:
            raise UserError(f"label file '{path}': an LFW gender list must have 'female' or 'male' in its name "
                            f"(female_names.txt, male_names.txt) so that its gender is known. Rename it.")
        mapping.append(f"{path.name} (listed images) -> {gender}")
        bad, unknown = _BadLines(path, "an LFW gender list (one image file name per line)"), set()
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            match = _LFW_LINE.match(line.replace("\\", "/").rpartition("/")[2])
            if match is None:
                bad.add(f"line {n}: {line[:60]!r} is not an image file name like Name_0001.jpg")
                continue
            name = match["name"]
            if name in identities:
                identities[name].add(gender, path.name)
            else:
                unknown.add(name)
        bad.raise_if_any()
        if unknown:
            notes.append(f"{len(unknown)} identities listed in {path.name} have no folder in '{images}' "
                         f"(e.g. {sorted(unknown)[0]})")
    return Collected(identities, mapping, notes + _skipped_notes(skipped))


_AGEDB_NAME = re.compile(r"^(?P<id>\d+)_(?P<name>.+)_(?P<age>\d+)_(?P<g>[fm])$", re.IGNORECASE)


def collect_agedb(images: Path, labels: list[Path]) -> Collected:
    """AgeDB: a flat folder of ID_Name_Age_g.jpg files; identity = Name, gender from g."""
    if labels:
        raise UserError("--format agedb takes no --labels: AgeDB's file names (ID_Name_Age_g.jpg) carry the gender.")
    skipped: Counter = Counter()
    identities: dict[str, Identity] = {}
    unparsed = []
    for path in _images_of(images, skipped):
        match = _AGEDB_NAME.match(path.stem)
        if match is None:
            unparsed.append((path.name, "file name does not follow ID_Name_Age_g.jpg (g = f or m)"))
            continue
        ident = identities.setdefault(match["name"], Identity())
        ident.images.append(path)
        g = match["g"].lower()
        ident.add(FEMININE if g == "f" else MASCULINE, f"file names ending _{g}")
    if any(entry_kind(e) == "dir" for e in visible_entries(images)):
        skipped["sub-folders (AgeDB is one flat folder)"] += 1
    return Collected(identities, ["file name ending _f -> 1", "file name ending _m -> 0"],
                     _skipped_notes(skipped), unparsed)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _safe_xml(path: Path) -> ET.Element:
    text = _read_text(path)
    if "<!doctype" in text.lower() or "<!entity" in text.lower():
        raise UserError(f"label file '{path}' declares a DTD or entities (<!DOCTYPE/<!ENTITY), which subjects.xml "
                        f"never needs and which can make an XML parser read other files or exhaust memory; it was "
                        f"not parsed. Use the subjects.xml of the NIST ColorFERET distribution.")
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise _garbled(path, [f"XML error: {exc}"], "XML") from None


def collect_colorferet(images: Path, labels: list[Path]) -> Collected:
    """ColorFERET: subject folders 00001/...; gender per <Subject id="cfrS00001"> in subjects.xml."""
    skipped: Counter = Counter()
    identities, unparsed = {}, []
    for e in visible_entries(images):
        if entry_kind(e) == "dir" and e.name.isdigit():
            identities[e.name] = Identity(images=_images_of(Path(e.path), skipped))
        elif entry_kind(e) == "broken":
            skipped[BROKEN_LINKS] += 1
        elif entry_kind(e) == "dir":
            unparsed.append((e.name + "/", "folder name is not a subject number (00001)"))
        else:
            skipped["files outside subject folders"] += 1
    by_number = {int(name): ident for name, ident in identities.items()}
    values = {"male": MASCULINE, "female": FEMININE}
    absent = 0
    for path in labels:
        subjects = [el for el in _safe_xml(path).iter() if _local(el.tag) == "Subject"]
        if not subjects:
            raise _garbled(path, ["no <Subject> elements"], "ColorFERET's subjects.xml")
        for subject in subjects:
            number = re.search(r"(\d+)$", subject.get("id", ""))
            if number is None:
                raise _garbled(path, [f"<Subject id={subject.get('id')!r}> has no subject number"],
                               "ColorFERET's subjects.xml")
            ident = by_number.get(int(number.group(1)))
            if ident is None:
                absent += 1
                continue
            genders = [el.get("value", "") for el in subject.iter() if _local(el.tag) == "Gender"]
            for value in genders:
                if value.strip().lower() in values:
                    ident.add(values[value.strip().lower()], f"{path.name}: {value.strip()}")
                else:
                    ident.notes.append(f"gender value {value!r} in {path.name}")
            if not genders:
                ident.notes.append(f"no <Gender> for subject {subject.get('id')} in {path.name}")
    notes = _skipped_notes(skipped)
    if absent:
        notes.append(f"{absent} subjects of the XML have no folder in '{images}'")
    return Collected(identities, ["<Gender value=\"Female\"/> -> 1", "<Gender value=\"Male\"/> -> 0"], notes,
                     unparsed)


def collect_vggface2(images: Path, labels: list[Path]) -> Collected:
    """VGGFace2: n000001/... folders; identity_meta.csv (Gender m/f) or per-image Male annotations (-1/0/1)."""
    skipped: Counter = Counter()
    identities = _directory_identities(images, skipped)
    mapping, notes = [], []
    for path in labels:
        columns, rows = _csv_rows(path)
        if "class_id" in columns and "gender" in columns:
            id_col, g_col = columns.index("class_id"), columns.index("gender")
            mapping.append(f"{path.name}: Gender f -> 1, m -> 0")
            absent = 0
            for n, row in rows:
                if len(row) <= max(id_col, g_col):
                    raise _garbled(path, [f"line {n} has {len(row)} fields, the header {len(columns)}"],
                                   "VGGFace2's identity_meta.csv")
                ident = identities.get(row[id_col])
                value = row[g_col].lower()
                if ident is None:
                    absent += 1
                elif value in ("f", "m"):
                    ident.add(FEMININE if value == "f" else MASCULINE, f"{path.name}: Gender {value}")
                else:
                    ident.notes.append(f"Gender {row[g_col]!r} in {path.name}")
            if absent:
                notes.append(f"{absent} identities of {path.name} have no folder in '{images}'")
            continue
        expected = "VGGFace2 labels (identity_meta.csv with Class_ID and Gender, or per-image annotations with a " \
                   "Filename and a Male column)"
        f_col = _column(path, columns, ("filename", "file", "image", "path"), expected)
        m_col = _column(path, columns, ("male",), expected)
        mapping.append(f"{path.name}: Male -1 -> 1, Male 1 -> 0 (Male 0 = undetermined, not used)")
        undetermined: Counter = Counter()
        absent, bad = 0, _BadLines(path, expected)
        for n, row in rows:
            if len(row) <= max(f_col, m_col):
                bad.add(f"line {n} has {len(row)} fields")
                continue
            folder, sep, _ = row[f_col].replace("\\", "/").strip("/").partition("/")
            try:
                male = float(row[m_col])
            except ValueError:
                male = math.nan   # not a number: refused below as any value other than -1, 0 and 1
            if male not in (-1.0, 0.0, 1.0) or not sep:
                bad.add(f"line {n}: {row[f_col]!r}, Male {row[m_col]!r} (expected folder/image and -1, 0 or 1)")
                continue
            ident = identities.get(folder)
            if ident is None:
                absent += 1
            elif male == 0.0:
                undetermined[folder] += 1
            else:
                ident.add(FEMININE if male == -1.0 else MASCULINE, f"{path.name}: Male {int(male)}")
        bad.raise_if_any()
        for folder, k in undetermined.items():
            identities[folder].notes.append(f"{k} undetermined row(s) (Male 0) in {path.name}")
        notes.append(f"{sum(undetermined.values())} rows of {path.name} with Male = 0 (undetermined) skipped")
        if absent:
            notes.append(f"{absent} rows of {path.name} name images outside '{images}'")
    return Collected(identities, mapping, notes + _skipped_notes(skipped))


def _rec_paths(images: Path) -> tuple[Path, Path]:
    rec = images / "train.rec" if images.is_dir() else images
    if not rec.is_file():
        raise UserError(f"--images '{images}': no record file there. For --format rec give the train.rec or the "
                        f"folder holding train.rec and train.idx.")
    return rec, rec.with_suffix(".idx")


def collect_rec(images: Path, labels: list[Path]) -> Collected:
    """insightface train.rec + train.idx; identity label -> gender from CSVs with columns label,gender (read and
    sorted as training on the .rec does: facedata/record_identities.py)."""
    rec = RecordFile(*_rec_paths(images))
    found = record_identities(rec)
    # zero-padded to one width, so that the folders' sorted order (the training labels) is the records' label order
    width = label_width(found)
    identities = {f"{i.label:0{width}d}": Identity(keys=list(i.images)) for i in found}
    mapping, notes = [], []
    extensions: dict[int, str] = {}
    for path in labels:
        rows = read_gender_csv(path, rec.rec_path, "--labels")
        mapping.append(f"{path.name}: gender female/f/1 -> 1, male/m/0 -> 0")
        absent = 0
        for label, given in rows.items():
            ident = identities.get(f"{label:0{width}d}")
            if ident is None:
                absent += len(given)
                continue
            for gender, value in given:
                ident.add(gender, f"{path.name}: {value}")
        if absent:
            notes.append(f"{absent} labels of {path.name} are not identities of '{rec.rec_path}'")
    for record in found:
        extensions.update(record.images)
        if record.other_labels:
            identities[f"{record.label:0{width}d}"].conflict = (
                f"{sum(record.other_labels.values())} of its image records carry another label "
                f"({', '.join(f'{v:g}' for v in sorted(record.other_labels))}) than identity record {record.label}")
    unknown_type = sum(i.not_images for i in found)
    if unknown_type:
        notes.append(f"skipped {unknown_type} records whose bytes are not a JPEG/PNG/BMP/WebP/TIFF image")
    return Collected(identities, mapping, notes, rec=rec, extensions=extensions)


def _celeba_table(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(attribute names or None, (line, cells) rows) of a CelebA text file: whitespace- or comma-separated, an
    attribute file with or without its count line (a header row is one whose cells are not a file name's row)."""
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        cells = [c.strip() for c in (line.split(",") if "," in line else line.split())]
        if any(cells):
            rows.append((n, cells))
    if rows and len(rows[0][1]) == 1 and rows[0][1][0].isdigit():
        rows = rows[1:]   # the attribute file's count line
    if rows and any(c.lower() == "male" for c in rows[0][1]):
        header = [c.lower() for c in rows[0][1]]
        return (header[1:] if header[0] in ("image_id", "filename", "file", "image") else header), rows[1:]
    return None, rows


def collect_celeba(images: Path, labels: list[Path]) -> Collected:
    """CelebA: a flat folder of 000001.jpg...; identity_CelebA.txt (file, identity) and list_attr_celeba.txt
    (file, 40 attributes of -1/1; Male 1 masculine, -1 feminine), told apart by the attribute file's header."""
    tables = {path: _celeba_table(path) for path in labels}
    attrs = [p for p, (header, _) in tables.items() if header is not None]
    ids = [p for p, (header, _) in tables.items() if header is None]
    if len(attrs) != 1 or len(ids) != 1:
        raise UserError(f"--format celeba needs two --labels: identity_CelebA.txt (lines '000001.jpg 2880') and "
                        f"list_attr_celeba.txt (a header row of attribute names with Male, then '000001.jpg -1 1 "
                        f"...'); got {len(ids)} identity file(s) and {len(attrs)} attribute file(s) among "
                        f"{', '.join(p.name for p in labels)}.")
    skipped: Counter = Counter()
    on_disk = {p.name: p for p in _images_of(images, skipped)}
    if any(entry_kind(e) == "dir" for e in visible_entries(images)):
        skipped["sub-folders (CelebA's images are one flat folder)"] += 1
    identities: dict[str, Identity] = {}
    identity_of: dict[str, str] = {}
    path = ids[0]
    bad, absent = _BadLines(path, "CelebA's identity_CelebA.txt (an image file name and an identity number per "
                                  "line)"), 0
    for n, cells in tables[path][1]:
        if len(cells) != 2 or not cells[1].isdigit():
            bad.add(f"line {n}: {' '.join(cells)[:60]!r}")
            continue
        name, ident = cells[0], str(int(cells[1]))
        if name in identity_of and identity_of[name] != ident:
            identities[ident] = identities.get(ident) or Identity()
            identities[ident].conflict = f"{name} is listed under identities {identity_of[name]} and {ident}"
            continue
        identity_of[name] = ident
        if name not in on_disk:
            absent += 1
            continue
        identities.setdefault(ident, Identity()).images.append(on_disk[name])
    bad.raise_if_any()
    path = attrs[0]
    header, rows = tables[path][0] or [], tables[path][1]   # attrs: the tables with a header
    col = header.index("male")
    expected = "CelebA's list_attr_celeba.txt (an image file name and one -1/1 value per attribute)"
    bad, unlabelled = _BadLines(path, expected), 0
    for n, cells in rows:
        if len(cells) != len(header) + 1 or cells[col + 1] not in ("1", "-1"):
            bad.add(f"line {n}: {len(cells)} fields, Male {cells[col + 1] if len(cells) > col + 1 else None!r} "
                    f"(expected {len(header) + 1} fields, Male 1 or -1)")
            continue
        labelled = identities.get(identity_of.get(cells[0], ""))
        if labelled is None:
            unlabelled += 1
        elif on_disk.get(cells[0]) in labelled.images:
            labelled.add(FEMININE if cells[col + 1] == "-1" else MASCULINE, f"{path.name}: Male {cells[col + 1]}")
    bad.raise_if_any()
    unparsed = [(name, f"not in {ids[0].name}") for name in sorted(set(on_disk) - set(identity_of))]
    notes = _skipped_notes(skipped)
    if absent:
        notes.append(f"{absent} images of {ids[0].name} are not in '{images}'")
    if unlabelled:
        notes.append(f"{unlabelled} rows of {path.name} name images without a kept identity (not in '{images}' or "
                     f"not in {ids[0].name})")
    return Collected(identities, [f"{path.name}: Male -1 -> 1, Male 1 -> 0 (per image)"], notes, unparsed)


COLLECTORS = {"lfw": collect_lfw, "agedb": collect_agedb, "colorferet": collect_colorferet,
              "vggface2": collect_vggface2, "rec": collect_rec,
              "celeba": collect_celeba}


# ---------------------------------------------------------------- deciding and writing

def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)
    return safe or "_"


def _unique_names(originals: Sequence[str], files: bool) -> dict[str, str]:
    """original -> safe name; names that coincide (ignoring case) once cleaned get a short hash of the original
    (before the extension for ``files``)."""
    safe = {o: _safe_name(o) for o in originals}
    counts = Counter(s.lower() for s in safe.values())
    for o, s in safe.items():
        if counts[s.lower()] > 1:
            suffix = Path(s).suffix if files else ""
            digest = hashlib.sha1(o.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            safe[o] = f"{s[:len(s) - len(suffix)]}-{digest}{suffix}"
    return safe


def _counts(ident: Identity) -> dict[int, int]:
    return {g: sum(where.values()) for g, where in ident.evidence.items()}


def decide(collected: Collected, min_images: int, rule: str = "unanimous", min_share: float = MIN_SHARE
           ) -> tuple[dict[str, int], list[tuple[str, str, int, str]]]:
    """identity -> gender for the identities kept; (reason, identity, images, details) for those left out.

    ``rule`` unanimous: an identity whose labels disagree is left out. majority: it is kept with the gender of at
    least ``min_share`` of its labels (one per image for per-image labels), and listed in ``collected.decided``."""
    kept, left_out = {}, []
    collected.rule = "unanimous" if rule == "unanimous" else f"majority, minimum share {min_share:g}"
    collected.decided = []
    for name in sorted(collected.identities):
        ident = collected.identities[name]
        n = ident.count
        sources = "; ".join(f"{g} ({'feminine' if g == FEMININE else 'masculine'}) from "
                            + ", ".join(f"{where} x{k}" if k > 1 else where
                                        for where, k in sorted(ident.evidence[g].items()))
                            for g in sorted(ident.evidence))
        counts = _counts(ident)
        top = max(counts, key=lambda g: (counts[g], g)) if counts else -1
        share = counts[top] / sum(counts.values()) if counts else 0.0
        split = (f"{counts.get(FEMININE, 0)} feminine and {counts.get(MASCULINE, 0)} masculine labels, "
                 f"{share:.0%} {'feminine' if top == FEMININE else 'masculine'}")
        if ident.conflict:
            left_out.append(("conflicting labels", name, n, ident.conflict))
        elif len(ident.evidence) > 1 and (rule == "unanimous" or share < min_share):
            why = "" if rule == "unanimous" else f" ({split}, under the --gender-min-share {min_share:g})"
            left_out.append(("conflicting labels", name, n, sources + why))
        elif not ident.evidence:
            notes = "; ".join(ident.notes[:3]) + (f"; and {len(ident.notes) - 3} more" if len(ident.notes) > 3 else "")
            left_out.append(("no label", name, n, notes or "not in the label files"))
        elif n < min_images:
            left_out.append(("too few images", name, n, f"{n} image(s), --min-images {min_images}"))
        else:
            kept[name] = top
            if len(ident.evidence) > 1:
                collected.decided.append(("kept by majority", name, n, f"{split}: gender {top}; {sources}"))
    return kept, left_out


def plan_output(collected: Collected, kept: dict[str, int]) -> dict[str, dict[str, Source]]:
    """folder name -> {file name -> source} of the output."""
    folders = _unique_names(sorted(kept), files=False)
    plan = {}
    for name, gender in kept.items():
        ident = collected.identities[name]
        files: dict[str, Source]
        if collected.rec is not None:   # record keys padded to one width: sorted names = record order
            width = len(str(int(collected.rec.keys.max())))
            files = {f"{key:0{width}d}{collected.extensions[key]}": key for key in ident.keys}
        else:
            images = ident.images
            names = _unique_names([p.name for p in images], files=True)
            files = {names[p.name]: p for p in images}
        plan[f"{folders[name]}_{gender}"] = files
    return plan


class _Writer:
    """Creates the planned links or files, and tells whether an existing entry is exactly what the plan wants.

    Each entry is made under a hidden temporary name and renamed into place, so an interrupted run leaves whole
    entries only (no fsync per image: millions of them would take hours; a rerun checks every entry anyway)."""

    def __init__(self, link: str, rec: RecordFile | None):
        self.link, self.rec = link, rec

    def _record(self, key: int) -> bytes:
        """The image bytes of record ``key``."""
        assert self.rec is not None, "record keys are planned for --format rec only, whose RecordFile the writer has"
        return self.rec.read(key)[1]

    def matches(self, path: Path, source: Source) -> bool:
        if isinstance(source, int):
            return path.is_file() and not path.is_symlink() and path.read_bytes() == self._record(source)
        if self.link == "symbolic":
            return path.is_symlink() and os.readlink(path) == str(source)
        return not path.is_symlink() and path.is_file() and os.path.samefile(path, source)

    def create(self, path: Path, source: Source) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if isinstance(source, int):
                tmp.write_bytes(self._record(source))
            elif self.link == "symbolic":
                os.symlink(source, tmp)
            else:
                os.link(source, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            hint = " Hard links need OUT on the same file system as the images; use --link symbolic." \
                if self.link == "hard" and not isinstance(source, int) else ""
            raise UserError(f"cannot create '{path}' (from '{source}'): {exc.strerror or exc}.{hint}") from None
        finally:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()


def check_existing(out: Path, plan: dict[str, dict[str, Source]], writer: _Writer) -> set[Path]:
    """The entries of ``out`` that already match the plan; anything else in ``out`` is a UserError."""
    done: set[Path] = set()
    conflicts = []
    if not out.exists():
        return done
    if not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a folder. Choose another --out.")
    for e in visible_entries(out):
        files = plan.get(e.name)
        if files is None or e.is_symlink() or entry_kind(e) != "dir":
            conflicts.append(f"'{e.name}' (not part of this preparation)")
            continue
        for f in visible_entries(Path(e.path)):
            path = Path(f.path)
            if f.name not in files:
                conflicts.append(f"'{e.name}/{f.name}' (not part of this preparation)")
            elif not writer.matches(path, files[f.name]):
                conflicts.append(f"'{e.name}/{f.name}' (differs from the link or file this run would make)")
            else:
                done.add(path)
    if conflicts:
        raise UserError(f"--out '{out}' already holds {len(conflicts)} entries that this preparation would not "
                        f"create: {listing(conflicts)}. Nothing was changed. Existing files are never "
                        f"overwritten: choose a new --out, or remove these entries if they are left over from "
                        f"other inputs.")
    return done


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _report_text(fmt: str, left_out: list[tuple[str, str, int, str]], unparsed: list[tuple[str, str]],
                 decided: Sequence[tuple[str, str, int, str]] = ()) -> str:
    lines = [(f"# Left out by tools/prepare_dataset.py --format {fmt}: never guessed. Fix the labels (or add images) "
              f"and run again."),
             "# reason\tidentity or file\timages\tdetails"]
    lines += [f"{reason}\t{name}\t{n}\t{details}" for reason, name, n, details in left_out]
    lines += [f"not in the format's layout\t{item}\t\t{why}" for item, why in sorted(unparsed)]
    if decided:
        lines += ["# Kept by --gender-rule majority although some of their labels disagree (the counts):"]
        lines += [f"{reason}\t{name}\t{n}\t{details}" for reason, name, n, details in decided]
    return "\n".join(lines) + "\n"


def _log_text(fmt: str, images: Path, labels: list[Path], link: str, min_images: int, collected: Collected,
              kept: dict[str, int], plan: dict[str, dict[str, Source]], left_out: list, aligned: str = "") -> str:
    n_images = sum(len(files) for files in plan.values())
    reasons = Counter(reason for reason, *_ in left_out)
    how = ("image files written from the records (a .rec holds no files to link to)" if fmt == "rec"
           else f"aligned 112x112 crops written ({aligned}; counts in {ALIGN_LOG_NAME})" if aligned
           else f"{link} links" + (" (absolute targets)" if link == "symbolic" else ""))
    lines = [f"tools/prepare_dataset.py --format {fmt}",
             f"images: {collected.rec.rec_path if collected.rec is not None else images}",
             f"labels: {', '.join(str(p) for p in labels) or '(the file names)'}",
             f"output: {how}; --min-images {min_images}",
             f"gender rule: {collected.rule}"
             + (f" ({len(collected.decided)} identities kept by majority, listed in {REPORT_NAME})"
                if collected.rule != "unanimous" else " (an identity whose labels disagree is left out)"),
             "gender mapping (this project: 1 feminine, 0 masculine):"]
    lines += [f"  {m}" for m in collected.mapping]
    lines += [f"kept: {len(kept)} identities ({sum(1 for g in kept.values() if g == FEMININE)} feminine, "
              f"{sum(1 for g in kept.values() if g == MASCULINE)} masculine), {n_images} images",
              f"left out: {len(left_out)} identities ("
              + (", ".join(f"{k} {r}" for r, k in sorted(reasons.items())) or "none")
              + f"), {len(collected.unparsed)} items not in the format's layout; listed in {REPORT_NAME}"]
    lines += [f"note: {n}" for n in collected.notes]
    return "\n".join(lines) + "\n"


def _check_bin(out: Path, bin_path: Path, n_pairs: int, n_gender: int, seed: int) -> None:
    """Build the .bin and its sidecar; if the .bin exists, it must be byte-identical to what this run builds (then
    it is left alone, and a missing sidecar is added)."""
    if not bin_path.exists():
        build_bin(out, bin_path, None, n_pairs, n_gender, seed)
        return
    with tempfile.TemporaryDirectory(prefix=".prepare-bin.", dir=bin_path.parent) as tmp:
        fresh = build_bin(out, Path(tmp) / bin_path.name, None, n_pairs, n_gender, seed)
        if fresh.read_bytes() != bin_path.read_bytes():
            raise UserError(f"--bin '{bin_path}' already exists and differs from the .bin these inputs give. "
                            f"Existing files are never overwritten: choose another --bin path.")
        sidecar, fresh_sidecar = sidecar_path(bin_path), sidecar_path(fresh)
        if not os.path.lexists(sidecar):
            atomic_write_text(sidecar, fresh_sidecar.read_text())
        elif not sidecar.is_file() or sidecar.read_bytes() != fresh_sidecar.read_bytes():
            raise UserError(f"'{sidecar}' (the sidecar of --bin) already exists and differs from the one these "
                            f"inputs give. Existing files are never overwritten: move it away or choose another "
                            f"--bin path.")


def prepare(fmt: str, images: str | os.PathLike, labels: Sequence[str | os.PathLike], out: str | os.PathLike,
            link: str = "symbolic", min_images: int = 1, bin_path: str | os.PathLike | None = None,
            n_pairs: int = 3000, n_gender: int = 2000, seed: int = 0, align: DetectorSpec | None = None,
            workers: int | None = None, fallback: bool = False, progress: bool = True,
            gender_rule: str = "unanimous", min_share: float = MIN_SHARE) -> Prepared:
    """Prepare ``out`` from a dataset as downloaded; see the module docstring for the formats and guarantees.
    ``align``: write aligned crops found by that landmark source (with ``workers``, ``fallback``) instead of links.
    ``gender_rule``, ``min_share``: how an identity whose labels disagree is decided (see decide())."""
    if fmt not in COLLECTORS:
        raise UserError(f"--format '{fmt}' is not known; choose one of {', '.join(FORMATS)}.")
    if gender_rule not in GENDER_RULES:
        raise UserError(f"--gender-rule '{gender_rule}': choose {' or '.join(GENDER_RULES)}.")
    if not (isinstance(min_share, (int, float)) and 0.5 < min_share <= 1):
        raise UserError(f"--gender-min-share {min_share}: the share of an identity's labels its majority gender needs "
                        f"must be a number above 0.5 and at most 1 (the default is {MIN_SHARE:g}); a share of 0.5 or "
                        f"less would let a tie decide.")
    if link not in ("symbolic", "hard"):
        raise UserError(f"--link '{link}': choose symbolic or hard.")
    if min_images < 1:
        raise UserError(f"--min-images {min_images}: must be at least 1.")
    if bin_path is not None and n_pairs < 1:
        raise UserError(f"--pairs {n_pairs}: the number of verification pairs drawn for --bin must be at least 1 "
                        f"(the paper's protocol uses 3000, the default).")
    if bin_path is not None and n_gender < 2:
        raise UserError(f"--n-gender {n_gender}: the gender test of --bin needs at least 2 images, one of each "
                        f"gender (the default is 2000).")
    images, out = Path(images).resolve(), Path(out).resolve()
    label_paths = [Path(p).resolve() for p in labels]
    if not images.exists() or (fmt != "rec" and not images.is_dir()):
        raise UserError(f"images folder '{images}' (--images) does not exist or is not a folder. Point --images to "
                        f"the dataset as unpacked (see --help for each format's layout).")
    if align is not None and fmt == "rec":
        raise UserError("--align does not apply to --format rec: insightface's record files hold aligned 112x112 "
                        "crops already. Leave --align out.")
    if fmt != "agedb" and not label_paths:
        raise UserError(f"--format {fmt} needs --labels (see --help for the label files of each format).")
    source_root = images if images.is_dir() else images.parent
    bin_path = Path(bin_path).resolve() if bin_path is not None else None
    for what, path in (("--out", out), ("--bin", bin_path)):
        if path is not None and _inside(path, source_root):
            raise UserError(f"{what} '{path}' lies inside the source '{source_root}'; the source is never changed. "
                            f"Choose a path outside it.")
    check_creatable(out, "--out")
    if bin_path is not None:
        check_creatable(bin_path, "--bin")
    if bin_path is not None and bin_path.suffix.lower() != ".bin":
        raise UserError(f"--bin '{bin_path}': name the file <name>.bin (its sidecar <name>.pairs.csv goes beside it).")
    if bin_path is not None and _inside(bin_path, out):
        raise UserError(f"--bin '{bin_path}' lies inside --out '{out}', which must hold identity folders only. "
                        f"Choose a path outside it.")

    collected = COLLECTORS[fmt](images, label_paths)
    kept, left_out = decide(collected, min_images, gender_rule, min_share)
    if len(set(kept.values())) < 2:
        raise UserError(f"only {len(kept)} identities of '{images}' could be kept, of "
                        f"{'no gender' if not kept else 'one gender'}; the privacy constraints need identities of "
                        f"both genders. Check the label files (left out: {len(left_out)} identities, e.g. "
                        f"{'; '.join(f'{n}: {r}' for r, n, *_ in left_out[:3]) or 'none'}).")
    plan = plan_output(collected, kept)
    report, log = out / REPORT_NAME, out / LOG_NAME
    if align is not None:
        return _prepare_aligned(fmt, images, label_paths, out, min_images, collected, kept, left_out, plan, align,
                                workers, fallback, progress, bin_path, (n_pairs, n_gender, seed))
    writer = _Writer(link, collected.rec)
    done = check_existing(out, plan, writer)

    created = 0
    for folder, files in sorted(plan.items()):
        try:
            (out / folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create '{out / folder}' (--out): {exc.strerror or exc}. Choose an --out you "
                            f"can write to.") from None
        for name, source in sorted(files.items()):
            path = out / folder / name
            if path not in done:
                writer.create(path, source)
                created += 1
    _write_if_changed(report, _report_text(fmt, left_out, collected.unparsed, collected.decided))
    _write_if_changed(log, _log_text(fmt, images, label_paths, link, min_images, collected, kept, plan, left_out))
    scan_dataset(out, option="--out")   # the training code's own check of the result
    if bin_path is not None:
        _check_bin(out, bin_path, n_pairs, n_gender, seed)
    return Prepared(out, {folder: int(folder.rpartition("_")[2]) for folder in plan}, left_out, report, log,
                    bin_path, created)


def _prepare_aligned(fmt: str, images: Path, label_paths: list[Path], out: Path, min_images: int,
                     collected: Collected, kept: dict[str, int], left_out: list, plan: dict[str, dict[str, Source]],
                     spec: DetectorSpec, workers: int | None, fallback: bool, progress: bool, bin_path: Path | None,
                     bin_args: tuple[int, int, int]) -> Prepared:
    """The planned images as aligned crops (facedata.align) instead of links; the alignment's journal makes reruns
    and interrupted runs behave as the links do."""
    jobs = []
    for folder, files in sorted(plan.items()):
        for name, source in sorted(files.items()):
            assert isinstance(source, Path), "prepare() refuses --align for --format rec: every source is a file"
            jobs.append(Job(source, source.relative_to(images).as_posix(), f"{folder}/{name}"))
    result = align_images(jobs, out, spec, workers, fallback, keep=(REPORT_NAME, LOG_NAME), progress=progress,
                          description=f"tools/prepare_dataset.py --format {fmt} --images {images} --align {spec.name}")
    written = Counter(rel.partition("/")[0] for rel, r in result.records.items() if (out / rel).is_file())
    left_out = list(left_out)
    for folder, files in sorted(plan.items()):
        if not written[folder]:
            left_out.append(("no image aligned", folder, len(files),
                             f"none of its {len(files)} images could be aligned (see .align_report.txt)"))
    report, log = out / REPORT_NAME, out / LOG_NAME
    _write_if_changed(report, _report_text(fmt, left_out, collected.unparsed, collected.decided))
    _write_if_changed(log, _log_text(fmt, images, label_paths, "", min_images, collected, kept, plan, left_out,
                                     aligned=f"--align {spec.name}, landmarks from {result.source}"))
    scan_dataset(out, option="--out")
    if bin_path is not None:
        _check_bin(out, bin_path, *bin_args)
    return Prepared(out, {f: int(f.rpartition("_")[2]) for f in plan if written[f]}, left_out, report, log,
                    bin_path, result.processed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="layout of the dataset as downloaded (no default)")
    parser.add_argument("--images", required=True,
                        help="the dataset's image folder (for rec: train.rec or the folder holding it; no default)")
    parser.add_argument("--labels", nargs="+", default=[],
                        help="the format's label file(s) (default: none, which only agedb takes)")
    parser.add_argument("--out", required=True, help="the subjectid_gender folder to create (no default)")
    parser.add_argument("--bin", default=None,
                        help="also write an evaluation <name>.bin (5 items) of the prepared images, and its "
                             "<name>.pairs.csv (default: none)")
    parser.add_argument("--pairs", type=int, default=3000, help="verification pairs drawn for --bin (default 3000)")
    parser.add_argument("--n-gender", type=int, default=2000,
                        help="images of the gender test in --bin (default 2000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of --bin's drawn pairs and gender images (default 0)")
    parser.add_argument("--min-images", type=int, default=1,
                        help="identities with fewer images are left out (default 1)")
    parser.add_argument("--link", choices=("symbolic", "hard"), default="symbolic",
                        help="kind of link to the source images (rec: files are written instead; default symbolic)")
    parser.add_argument("--gender-rule", choices=GENDER_RULES, default="unanimous",
                        help="an identity whose labels disagree (per-image labels: celeba, vggface2's attribute CSV, "
                             "lfw's lists): left out (unanimous, the default) or kept with the gender of at least "
                             "--gender-min-share of its labels (majority), listed in the report with its counts")
    parser.add_argument("--gender-min-share", type=float, default=MIN_SHARE,
                        help=f"the share of its labels the majority gender needs under --gender-rule majority, "
                             f"above 0.5 and at most 1 (default {MIN_SHARE:g})")
    align = parser.add_argument_group("alignment (--align DETECTOR: write aligned 112x112 crops instead of links; "
                                      "default: no alignment, links to the images)")
    add_detector_options(align, flag="--align", default=None)
    args = parser.parse_args(argv)

    def body() -> None:
        spec = spec_from(args, args.align) if args.align else None
        with log_to_stderr():   # the alignment's progress lines are seen in a job's output too
            result = prepare(args.format, args.images, args.labels, args.out, args.link, args.min_images, args.bin,
                             args.pairs, args.n_gender, args.seed, spec, args.workers, args.fallback == "centre",
                             gender_rule=args.gender_rule, min_share=args.gender_min_share)
        print(result.log.read_text(), end="")
        print(f"{result.created} new entries in {result.out}" + (" (nothing changed)" if not result.created else ""))
        print(f"log: {result.log}\nreport of what was left out: {result.report}")
        if result.bin is not None:
            print(f"evaluation file: {result.bin} (its pairs' images and genders: {sidecar_path(result.bin)})")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
