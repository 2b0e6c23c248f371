"""Training data in the authors' layout: one ``subjectid_gender`` folder per identity (gender 0 or 1).

Images are decoded as the authors' loaders do (OpenCV, BGR -> RGB, short side resized to 112 where needed)
and normalised as (x/255 - 0.5)/0.5. Sampling is gender-balanced: weight N/count(gender) per image and N
draws with replacement per epoch, as torch's WeightedRandomSampler in the authors' code.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2"}
MAX_LISTED = 20  # problems listed one by one in an error; the rest are counted


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


@dataclass
class TrainIndex:
    """The scanned training set: one entry per image, plus one gender per identity."""
    root: Path
    paths: list[Path]
    labels: np.ndarray            # identity label per image = index of its folder in sorted order
    genders: np.ndarray           # 0/1 per image
    identity_gender: np.ndarray   # 0/1 per identity
    folders: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_identities(self) -> int:
        return len(self.identity_gender)


def _visible(entries: Sequence[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def scan_dataset(root: str | os.PathLike, option: str = "data_dir") -> TrainIndex:
    """List the images of a ``subjectid_gender`` root; report every layout problem at once."""
    root = Path(root)
    what = "training data folder" if option == "data_dir" else "image folder"
    if not root.is_dir():
        raise UserError(f"{what} '{root}' ({option}) does not exist. Point {option} to a folder holding "
                        f"one 'subjectid_gender' folder per identity (gender 0 or 1), e.g. 0001_1/, 0002_0/.")
    with os.scandir(root) as it:
        entries = _visible(list(it))
    subdirs = [e for e in entries if e.is_dir()]
    if not subdirs:
        raise UserError(f"{what} '{root}' ({option}) holds no identity folders. Expected one "
                        f"'subjectid_gender' folder per identity (e.g. 0001_1/, 0002_0/) with the face images inside.")
    problems: list[str] = []
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
        with os.scandir(folder.path) as it:
            files = [e for e in _visible(list(it)) if e.is_file()]
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
    if not problems and len(set(identity_gender)) < 2:
        problems.append(f"only gender {identity_gender[0]} is present: the privacy constraints need identities of "
                        f"both genders (folders ending in _0 and in _1)")
    if problems:
        raise UserError(problem_report(f"{what} '{root}' ({option})", problems,
                                       "Fix or remove these folders/files, then run again."))
    return TrainIndex(root, paths, np.asarray(labels, np.int64), np.asarray(genders, np.int64),
                      np.asarray(identity_gender, np.int64), [e.name for e in subdirs])


def problem_report(where: str, problems: list[str], fix: str) -> str:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{where}: {len(problems)} problem(s): {listed}{more}. {fix}"


class ImageDataset(Dataset):
    """Decodes images from file paths or from encoded bytes; returns (index, 3x112x112 uint8 tensor, resized,
    error). Normalise batches with ``normalize_images`` on the compute device."""

    def __init__(self, items: Sequence[Path] | Sequence[bytes]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            data = np.fromfile(item, dtype=np.uint8) if isinstance(item, Path) else item
            img, resized = decode_image(data)
            return i, torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), resized, ""
        except (DecodeError, OSError, cv2.error) as exc:
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
