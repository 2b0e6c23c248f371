"""One image's alignment: what each worker process runs (its imports kept light: workers are started fresh, since
a fork of a process whose OpenCV or torch threads hold locks can hang).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facedata.align.detectors import DetectorSpec, Face, LeftOut, build_detector, pick_face
from facedata.align.transform import (ALIGNED_SIZE, DegenerateLandmarks, ImplausibleLandmarks, centre_crop,
                                      check_landmarks, warp)
from utils.errors import UserError

ALIGNED, CENTRE = "aligned", "centre_crop"
WRITTEN = (ALIGNED, CENTRE)                 # statuses with a crop under OUT
REASONS = {"no_face": "no face found", "unreadable": "the file does not decode as an image",
           "too_large": "the image has more pixels than --max-megapixels allows (not decoded)",
           "degenerate": "the landmarks fix no alignment (points coincide)",
           "implausible": "the landmarks are not a face of the image (outside it, or an absurd scale)",
           "ambiguous": "the landmark file gives two different rows for it"}
STATUSES = (*WRITTEN, *REASONS)
JPEG_QUALITY = 95
MAX_MEGAPIXELS = 100.0   # default limit: larger images are refused from their header, before decoding


@dataclass(frozen=True)
class Job:
    """One image to align: its file, its path relative to the source root (how landmark files name it), and the
    path of its crop relative to OUT."""
    src: Path
    key: str
    rel: str


@dataclass
class Record:
    """One row of the landmarks journal."""
    rel: str
    src: str
    status: str
    landmarks_from: str
    faces: int
    points: np.ndarray | None
    note: str = ""
    found_by: str = ""            # which detector found the face (dlib: hog or mmod)
    size: int | None = None       # the source file's size and modification time when it was aligned: a source
    mtime_ns: int | None = None   # replaced since is aligned again

    def row(self) -> list[str]:
        pts = [f"{v:.3f}" for v in self.points.reshape(-1)] if self.points is not None else [""] * 10
        return [self.rel, self.src, self.status, self.landmarks_from, str(self.faces), *pts, self.note,
                self.found_by, "" if self.size is None else str(self.size),
                "" if self.mtime_ns is None else str(self.mtime_ns)]


@dataclass(frozen=True)
class Task:
    """What a worker does with one job. ``mode``: 'detect' (run the detector), 'given' (``given`` holds the faces
    a landmark file gives, or the LeftOut it raised), 'warp' (``given`` holds the journal's points) or 'centre'."""
    job: Job
    mode: str
    given: object
    fallback: bool
    source: str
    max_pixels: float


def _encode(crop: np.ndarray, rel: str) -> bytes:
    ext = Path(rel).suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext in (".jpg", ".jpeg") else []
    if ext == ".pgm":
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    ok, buf = cv2.imencode(ext, crop, params)
    if not ok:
        raise UserError(f"OpenCV cannot write '{ext}' images (for '{rel}').")
    return buf.tobytes()


def header_pixels(path: Path) -> tuple[int, str] | None:
    """(pixels, "WxH") as the file's header declares them, read without decoding the pixels (Pillow reads the
    header only: PNG's IHDR, JPEG's SOF, ...); None when the header is not one Pillow knows."""
    try:
        from PIL import Image
    except ImportError:   # Pillow comes with matplotlib; without it, OpenCV's own pixel limit is the guard
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Pillow's decompression-bomb warning: the limit here is ours
            with Image.open(path) as im:
                w, h = im.size
                return w * h, f"{w}x{h}"
    except Image.DecompressionBombError as exc:   # above Pillow's own limit (about 179 megapixels): its count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return (int(found[1]), "") if found else (1 << 40, "")
    except Exception:   # noqa: BLE001 - a damaged or unknown header: the decoder decides
        return None


def decode(path: Path, max_pixels: float) -> tuple[np.ndarray | None, str, str]:
    """(image, status, note): the BGR pixels, or None with the reason ('unreadable' or 'too_large')."""
    size = header_pixels(path)
    if size is not None and size[0] > max_pixels:
        return None, "too_large", (f"{size[1] + ' = ' if size[1] else ''}{size[0] / 1e6:.0f} megapixels (as its header "
                                   f"declares), above the limit of {max_pixels / 1e6:g} (--max-megapixels)")
    try:
        data = np.fromfile(path, dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except OSError as exc:
        return None, "unreadable", f"cannot be read ({exc.strerror or exc})"
    except (cv2.error, MemoryError) as exc:   # OpenCV's own pixel limit, or no memory for the pixels
        return None, "unreadable", f"{REASONS['unreadable']} ({type(exc).__name__}: {str(exc).strip()[:120]})"
    if image is None:
        return None, "unreadable", REASONS["unreadable"]
    return image, "", ""


def _plausible(faces: list[Face], shape: tuple[int, ...]) -> tuple[list[tuple[Face, np.ndarray]], tuple | None]:
    """The faces whose landmarks fix a plausible alignment (with its matrix), and the first failure
    (status, note) among the others."""
    good, failure = [], None
    for face in faces:
        try:
            good.append((face, check_landmarks(face.points, shape, ALIGNED_SIZE)))
        except DegenerateLandmarks as exc:
            failure = failure or ("degenerate", str(exc))
        except ImplausibleLandmarks as exc:
            failure = failure or ("implausible", str(exc))
    return good, failure


def process(detector, task: Task) -> tuple[Record, bytes | None]:
    """Align one image (see Task)."""
    job, source = task.job, task.source
    size: int | None = None
    mtime: int | None = None
    try:
        st = os.stat(job.src)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        pass   # a link gone since the scan: unreadable

    def record(status: str, faces: int = 0, points=None, note: str = "", by: str = "") -> Record:
        return Record(job.rel, str(job.src), status, source, faces, points, note, by, size, mtime)

    image, status, note = decode(job.src, task.max_pixels) if size is not None else (None, "unreadable",
                                                                                      "the file cannot be read")
    if image is None:
        return record(status, note=note), None
    if task.mode == "centre":
        return record(CENTRE, note="no face found: centred crop"), _encode(centre_crop(image), job.rel)
    try:
        if task.mode == "detect":
            found = detector.faces(image if detector.needs_pixels else None, job.key)
        elif task.mode == "given":
            if isinstance(task.given, LeftOut):
                raise task.given
            found = list(task.given)  # type: ignore[call-overload]  # the faces a landmark file gives
        else:   # warp: the journal's points
            found = [Face(np.zeros(4), np.asarray(task.given, dtype=np.float64))]
    except LeftOut as exc:
        return record(exc.status, note=exc.note), None
    faces = len(found)
    good, failure = _plausible(found, image.shape)
    if not good:
        if failure is not None:   # the note names the offending point (the journal keeps no absurd numbers)
            return record(failure[0], faces, note=failure[1]), None
        if not task.fallback:
            from_file = task.mode == "given"
            return record("no_face", faces, note="no landmarks for it in the landmark file(s)" if from_file
                          else REASONS["no_face"]), None
        return record(CENTRE, faces, note="no face found: centred crop"), _encode(centre_crop(image), job.rel)
    face = pick_face([f for f, _ in good], image.shape)
    matrix = next(m for f, m in good if f is face)
    note = f"{faces} faces: kept the largest nearest the centre" if faces > 1 else ""
    return (record(ALIGNED, faces, np.asarray(face.points, dtype=np.float64), note, face.found_by),
            _encode(warp(image, matrix, ALIGNED_SIZE), job.rel))


# A worker process's own detector, built once by the pool initializer (dlib and onnxruntime objects cannot be
# pickled per task); the main process never sets it. Sources that need no pixels (landmark files) are not built
# in the workers at all: the main process looks their points up once and sends each task its own.
_WORKER_DETECTOR = None


def worker_init(spec: DetectorSpec | None) -> None:
    """Pool initializer: build this process's detector once (``spec`` None: the tasks carry their landmarks)."""
    global _WORKER_DETECTOR
    cv2.setNumThreads(1)   # one image per process: OpenCV's own threads would only compete with the workers
    _WORKER_DETECTOR = build_detector(spec) if spec is not None else None


def worker_task(task: Task) -> tuple[Record, bytes | None]:
    """One task with this process's detector."""
    return process(_WORKER_DETECTOR, task)
