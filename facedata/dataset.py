"""Training data: the authors' layout (one ``subjectid_gender`` folder per identity, gender 0 or 1), an insightface
record file (``train.rec`` + ``train.idx``) with a gender CSV, or several of these in one run.

A record file gives the index of the folder tools/prepare_dataset.py --format rec makes of it: the same identities
left out, identities in numeric label order, images in record-key order, the same bytes. Several sources are
concatenated in the order given, each keeping its own identities (labels offset), whatever their names.

Images are decoded as the authors' loaders do (OpenCV, BGR -> RGB, short side resized to 112 where needed)
and normalised as (x/255 - 0.5)/0.5. Sampling is gender-balanced: weight N/count(gender) per image and N
draws with replacement per epoch, as torch's WeightedRandomSampler in the authors' code.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import UserError, listing
from facedata.record_identities import label_width, read_gender_csv, record_identities
from facedata.recordio import RecordFile
from utils.logs import get_logger

log = get_logger(__name__)

IMAGE_SIZE = 112
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2"}


class DecodeError(ValueError):
    """An image that OpenCV cannot decode."""


def decode_image(data: bytes | np.ndarray) -> tuple[np.ndarray, bool]:
    """Encoded image -> (112x112x3 uint8 RGB, whether it had to be resized).

    cv2.IMREAD_COLOR converts grayscale, RGBA and 16-bit images to 8-bit BGR (as cv2.imread in the authors'
    training loader and mxnet's imdecode in their .bin loader). Other sizes: short side resized to 112
    (bicubic, mxnet's resize_short) and, if not square, the centre 112x112 crop.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise DecodeError("not a decodable image")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    if (h, w) == (IMAGE_SIZE, IMAGE_SIZE):
        return img, False
    if h > w:
        new_h, new_w = IMAGE_SIZE * h // w, IMAGE_SIZE
    else:
        new_h, new_w = IMAGE_SIZE, IMAGE_SIZE * w // h
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    top, left = (new_h - IMAGE_SIZE) // 2, (new_w - IMAGE_SIZE) // 2
    return np.ascontiguousarray(img[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]), True


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 in [-1, 1], i.e. (x/255 - 0.5)/0.5, on whatever device x is.

    Workers ship uint8 (4x less data than float32) and this runs where the backbone runs."""
    return x.float().div_(255.0).sub_(0.5).div_(0.5)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 in [-1, 1]."""
    return normalize_images(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))


@dataclass(frozen=True)
class RecordImage:
    """One image of a record file, read when needed; shown as '<file> record <key>' in messages."""
    records: RecordFile
    key: int

    def read_bytes(self) -> bytes:
        """The image's encoded bytes, as stored in the record."""
        return self.records.read(self.key)[1]

    def __str__(self) -> str:
        return f"{self.records.rec_path} record {self.key}"


class RecordImages(Sequence):
    """A record file's images as a sequence read lazily (positioned reads): no image is held in memory, and it
    pickles small for DataLoader workers (each reopens the file)."""

    def __init__(self, records: RecordFile, keys: np.ndarray):
        self.records, self.keys = records, np.asarray(keys, np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordImages(self.records, self.keys[i])
        return RecordImage(self.records, int(self.keys[i]))


class ChainedItems(Sequence):
    """Several sources' image sequences as one: image i of the run is looked up in the source that holds it."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = bisect.bisect_right(self.ends, i)
        return self.parts[part][i - (self.ends[part - 1] if part else 0)]


@dataclass(frozen=True)
class DataSource:
    """One dataset of a training set (a subjectid_gender folder or a record file): its images and counts."""
    path: Path
    items: Sequence                   # list[Path] of a folder, RecordImages of a record file
    identities: int
    genders_csv: Path | None = None   # the gender CSV of a record file
    notes: tuple[str, ...] = ()       # what was left out, for the training log

    @property
    def name(self) -> str:
        """Short name for cache folders: a folder's name; a record file's folder and stem (most are train.rec)."""
        return f"{self.path.parent.name}-{self.path.stem}" if isinstance(self.items, RecordImages) else self.path.name

    def summary(self) -> str:
        """'<path>: N identities, M images', for the log and config.csv."""
        genders = f" (genders from {self.genders_csv})" if self.genders_csv is not None else ""
        return f"{self.path}: {self.identities} identities, {len(self.items)} images{genders}"


@dataclass
class TrainIndex:
    """The scanned training set: one entry per image, plus one gender per identity."""
    root: Path                    # the data_dir; with several sources, the folder that holds them all
    paths: Sequence               # per image: its file (Path) or its record (RecordImage)
    labels: np.ndarray            # identity label per image = index of its identity in sorted order, source by source
    genders: np.ndarray           # 0/1 per image
    identity_gender: np.ndarray   # 0/1 per identity
    folders: list[str] = field(default_factory=list)   # identity names; with several sources, '<source>/<name>'
    sources: list[DataSource] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_identities(self) -> int:
        return len(self.identity_gender)

    @property
    def name(self) -> str:
        """The training set's name in cache folder names (the hash beside it is what tells caches apart)."""
        names = [s.name for s in self.sources] or [self.root.name]
        joined = "+".join(names)
        return joined if len(joined) <= 80 else f"{names[0]}+{len(names) - 1}more"

    @property
    def where(self) -> str:
        """The sources' paths, for messages."""
        return ", ".join(str(s.path) for s in self.sources) or str(self.root)

    def summary(self) -> str:
        """Per-source identity and image counts, for the log and config.csv."""
        return "; ".join(s.summary() for s in self.sources)


def visible_entries(folder: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """The entries of ``folder`` in name order, hidden ones (a leading dot) left out."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def entry_kind(entry: os.DirEntry) -> str:
    """'dir' or 'file' (a symbolic link counts as what it points to), 'broken' for a symbolic link that is
    dangling or loops (or an entry that cannot be examined), 'other' for anything else (a pipe, a socket)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        return "broken" if entry.is_symlink() else "other"
    except OSError:   # ELOOP: a link to itself, or links pointing at each other
        return "broken"


BROKEN_LINK = "a broken symbolic link (it points to nothing, or to itself through a loop of links)"


def scan_training_data(data_dir: str | os.PathLike | Sequence[str | os.PathLike],
                       rec_genders: str | os.PathLike | None = None) -> TrainIndex:
    """The index of config option data_dir: a folder, a .rec, or a list of them whose identities are kept apart;
    every source is checked and all their problems are reported at once."""
    entries = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
    if not entries:
        raise UserError("config option data_dir is an empty list. Name at least one training set: a "
                        "subjectid_gender folder or an insightface .rec (its .idx and gender CSV beside it).")
    paths = [Path(e) for e in entries]
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise UserError(f"config option data_dir lists '{p}' twice (also as '{seen[p.resolve()]}'): its "
                            f"identities would count as two sets of people. List each training set once.")
        seen[p.resolve()] = p
    recs = [p for p in paths if p.suffix == ".rec"]
    if rec_genders is not None and len(recs) != 1:
        raise UserError(f"config option rec_genders names one gender CSV ('{rec_genders}') but data_dir lists "
                        f"{len(recs)} .rec files. With several, put each one's CSV beside it as <name>_genders.csv "
                        f"(train_genders.csv beside train.rec) and leave rec_genders unset; with none, unset it.")
    single = len(paths) == 1
    parts, errors = [], []
    for p in paths:
        try:
            parts.append(scan_record_file(p, rec_genders, check_genders=single) if p.suffix == ".rec" else
                         scan_dataset(p, check_genders=single))
        except UserError as exc:
            errors.append(str(exc))
    if errors:
        raise UserError(" ".join(errors))
    if single:
        return parts[0]
    index = _concatenate(parts)
    if len(set(index.identity_gender.tolist())) < 2:
        raise UserError(f"the training sets of data_dir ({', '.join(map(str, paths))}) together hold identities of "
                        f"gender {index.identity_gender[0]} only; the privacy constraints need both genders. Add a "
                        f"training set with identities of the other gender.")
    return index


def _concatenate(parts: list[TrainIndex]) -> TrainIndex:
    """One index of several sources: each source's identity labels offset past the previous sources' identities."""
    offsets = np.cumsum([0] + [p.num_identities for p in parts[:-1]])
    sources = [p.sources[0] for p in parts]
    root = Path(os.path.commonpath([str(s.path.resolve().parent) for s in sources]))
    return TrainIndex(root, ChainedItems([p.paths for p in parts]),
                      np.concatenate([p.labels + off for p, off in zip(parts, offsets)]),
                      np.concatenate([p.genders for p in parts]),
                      np.concatenate([p.identity_gender for p in parts]),
                      [f"{s.name}/{f}" for p, s in zip(parts, sources) for f in p.folders], sources)


def scan_dataset(root: str | os.PathLike, option: str = "data_dir", check_genders: bool = True) -> TrainIndex:
    """List the images of a ``subjectid_gender`` root; report every layout problem at once (a single gender too,
    unless ``check_genders`` is off: one of several sources may hold one gender)."""
    root = Path(root)
    what = "training data folder" if option == "data_dir" else "image folder"
    if not root.is_dir():
        raise UserError(f"{what} '{root}' ({option}) does not exist. Point {option} to a folder holding "
                        f"one 'subjectid_gender' folder per identity (gender 0 or 1), e.g. 0001_1/, 0002_0/"
                        f"{' (or to an insightface .rec file)' if option == 'data_dir' else ''}.")
    entries = visible_entries(root)
    subdirs = [e for e in entries if entry_kind(e) == "dir"]
    problems: list[str] = [f"'{e.name}': {BROKEN_LINK}" for e in entries if entry_kind(e) == "broken"]
    if not subdirs:
        recs = [e.name for e in entries if e.name.endswith(".rec")]
        hint = (f" It holds the record file {recs[0]}: to train on it, set {option} to '{root / recs[0]}'."
                if recs and option == "data_dir" else "")
        raise UserError(f"{what} '{root}' ({option}) holds no identity folders. Expected one "
                        f"'subjectid_gender' folder per identity (e.g. 0001_1/, 0002_0/) with the face images "
                        f"inside.{hint}")
    paths: list[Path] = []
    labels: list[int] = []
    genders: list[int] = []
    identity_gender: list[int] = []
    for folder in subdirs:
        _, sep, suffix = folder.name.rpartition("_")
        if not sep or suffix not in ("0", "1"):
            problems.append(f"folder '{folder.name}': name must end in _0 or _1 (the gender), got "
                            f"'{suffix if sep else folder.name}'")
            continue
        inside = visible_entries(folder.path)
        files = [e for e in inside if entry_kind(e) == "file"]
        problems += [f"file '{folder.name}/{e.name}': {BROKEN_LINK}" for e in inside if entry_kind(e) == "broken"]
        images = [e for e in files if Path(e.name).suffix.lower() in IMAGE_EXTENSIONS]
        for other in files:
            if other not in images:
                problems.append(f"file '{folder.name}/{other.name}': not an image extension "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if not images:
            problems.append(f"folder '{folder.name}': holds no images")
            continue
        for e in images:
            if e.stat().st_size == 0:
                problems.append(f"file '{folder.name}/{e.name}': empty (0 bytes)")
        label = len(identity_gender)
        identity_gender.append(int(suffix))
        for e in images:
            paths.append(Path(e.path))
            labels.append(label)
            genders.append(int(suffix))
    if check_genders and not problems and len(set(identity_gender)) < 2:
        problems.append(f"only gender {identity_gender[0]} is present: the privacy constraints need identities of "
                        f"both genders (folders ending in _0 and in _1)")
    if problems:
        raise UserError(problem_report(f"{what} '{root}' ({option})", problems,
                                       "Fix or remove these folders/files, then run again."))
    return TrainIndex(root, paths, np.asarray(labels, np.int64), np.asarray(genders, np.int64),
                      np.asarray(identity_gender, np.int64), [e.name for e in subdirs],
                      [DataSource(root, paths, len(identity_gender))])


def _labels_text(labels: list[int]) -> str:
    return ", ".join(map(str, labels[:10])) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")


def scan_record_file(rec_path: str | os.PathLike, genders_csv: str | os.PathLike | None = None,
                     check_genders: bool = True) -> TrainIndex:
    """The index of an insightface record file, with genders from its CSV (default: <stem>_genders.csv beside it).

    Identities are left out exactly as tools/prepare_dataset.py --format rec leaves them out (no CSV row,
    conflicting genders or record labels, no image record) and listed in the source's notes; records whose bytes
    are not an image are skipped. Identities come in numeric label order, images in key order."""
    rec_path = Path(rec_path)
    csv_path = Path(genders_csv) if genders_csv is not None else rec_path.with_name(f"{rec_path.stem}_genders.csv")
    records = RecordFile(rec_path)
    genders = {label: {g for g, _ in rows} for label, rows in read_gender_csv(
        csv_path, rec_path, "data_dir, rec_genders", "Write it there, or name it with config option rec_genders."
    ).items()}
    identities = record_identities(records, genders)
    width = label_width(identities)
    unlabelled, conflicting, empty, not_image = [], [], [], 0
    keys, labels, folders = [], [], []
    identity_gender: list[int] = []   # the gender of each identity kept, at its new label
    for ident in identities:
        given = genders.pop(ident.label, None)
        if given is None:
            unlabelled.append(ident.label)
            continue
        not_image += ident.not_images
        if ident.other_labels or len(given) > 1:
            conflicting.append(ident.label)
        elif not ident.images:
            empty.append(ident.label)
        else:
            gender = given.pop()
            keys += list(ident.images)
            labels += [len(identity_gender)] * len(ident.images)
            identity_gender.append(gender)
            folders.append(f"{ident.label:0{width}d}_{gender}")
    notes = [f"left out {len(found)} identities {why} (labels {_labels_text(found)})" for found, why in (
        (unlabelled, f"without a row in {csv_path.name}"),
        (conflicting, "with conflicting labels (two genders in the CSV, or image records labelled with another "
                      "identity)"),
        (empty, "without an image record")) if found]
    if not_image:
        notes.append(f"skipped {not_image} records whose bytes are not a JPEG/PNG/BMP/WebP/TIFF image")
    if genders:
        notes.append(f"{len(genders)} labels of {csv_path.name} are not identities of the record file "
                     f"(e.g. {_labels_text(sorted(genders))})")
    where = f"record file '{rec_path}' (data_dir) with gender CSV '{csv_path}'"
    if not identity_gender:
        raise UserError(f"{where}: no identity could be kept ({'; '.join(notes)}). Check that the CSV's labels are "
                        f"the identity numbers the records carry.")
    if check_genders and len(set(identity_gender)) < 2:
        raise UserError(f"{where}: all {len(identity_gender)} identities kept are of gender {identity_gender[0]}; "
                        f"the privacy constraints need both genders. Check the CSV's gender column.")
    items = RecordImages(records, np.asarray(keys, np.int64))
    labels_arr = np.asarray(labels, np.int64)
    identity_arr = np.asarray(identity_gender, np.int64)
    source = DataSource(rec_path, items, len(identity_gender), csv_path, tuple(notes))
    return TrainIndex(rec_path, items, labels_arr, identity_arr[labels_arr], identity_arr, folders, [source])


def problem_report(where: str, problems: list[str], fix: str) -> str:
    return f"{where}: {len(problems)} problem(s): {listing(problems)}. {fix}"


class ImageDataset(Dataset):
    """Decodes images from file paths, records of a record file or encoded bytes; returns (index, 3x112x112 uint8
    tensor, resized, error). Normalise batches with ``normalize_images`` on the compute device."""

    def __init__(self, items: Sequence[Path] | Sequence[RecordImage] | Sequence[bytes]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            item = item.row_item() if hasattr(item, "row_item") else item   # an item standing for a file or bytes
            data = np.fromfile(item, dtype=np.uint8) if isinstance(item, Path) else \
                item.read_bytes() if isinstance(item, RecordImage) else item
            img, resized = decode_image(data)
            return i, torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), resized, ""
        except (DecodeError, OSError, cv2.error, UserError) as exc:   # UserError: a damaged record
            return i, torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), False, f"{type(exc).__name__}: {exc}"


def balanced_epoch(genders: np.ndarray, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and flip flags of one epoch: N draws with replacement, weight N/count(gender) per image.

    The draws of epoch e depend only on (seed, e), so a resumed run replays exactly the same epoch.
    """
    n = len(genders)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    counts = np.bincount(genders, minlength=2).astype(np.float64)
    weights = torch.as_tensor(n / counts[genders], dtype=torch.double)
    indices = torch.multinomial(weights, n, replacement=True, generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return indices, flips
