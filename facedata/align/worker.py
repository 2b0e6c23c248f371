"""One image's alignment: what each worker process runs (its imports kept light: workers are started fresh, since
a fork of a process whose OpenCV or torch threads hold locks can hang).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facedata.align.detectors import DetectorSpec, build_detector, pick_face
from facedata.align.transform import ALIGNED_SIZE, DegenerateLandmarks, centre_crop, norm_crop
from utils.errors import UserError

ALIGNED, CENTRE = "aligned", "centre_crop"
WRITTEN = (ALIGNED, CENTRE)                 # statuses with a crop under OUT
REASONS = {"no_face": "no face found", "unreadable": "the file does not decode as an image",
           "degenerate": "the landmarks fix no alignment (points coincide)"}
JPEG_QUALITY = 95


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

    def row(self) -> list[str]:
        pts = [f"{v:.3f}" for v in self.points.reshape(-1)] if self.points is not None else [""] * 10
        return [self.rel, self.src, self.status, self.landmarks_from, str(self.faces), *pts, self.note]


def _encode(crop: np.ndarray, rel: str) -> bytes:
    ext = Path(rel).suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext in (".jpg", ".jpeg") else []
    if ext == ".pgm":
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    ok, buf = cv2.imencode(ext, crop, params)
    if not ok:
        raise UserError(f"OpenCV cannot write '{ext}' images (for '{rel}').")
    return buf.tobytes()


def process(detector, job: Job, mode: str, given: np.ndarray | None, fallback: bool
            ) -> tuple[Record, bytes | None]:
    """Align one image; ``mode`` 'detect' (find landmarks), 'warp' (use ``given``) or 'centre' (centred crop)."""
    data = np.fromfile(job.src, dtype=np.uint8) if job.src.is_file() else np.zeros(0, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    source = detector.source
    if image is None:
        return Record(job.rel, str(job.src), "unreadable", source, 0, None, REASONS["unreadable"]), None
    faces, points, note = 0, given, ""
    if mode == "detect":
        found = detector.faces(image if detector.needs_pixels else None, job.key)
        faces = len(found)
        if found:
            points = pick_face(found, image.shape).points
            if faces > 1:
                note = f"{faces} faces: kept the largest nearest the centre"
    if mode == "centre" or points is None:
        if mode != "centre" and not fallback:
            why = REASONS["no_face"] if detector.needs_pixels else "no landmarks for it in the landmark file(s)"
            return Record(job.rel, str(job.src), "no_face", source, faces, None, why), None
        return (Record(job.rel, str(job.src), CENTRE, source, faces, None, "no face found: centred crop"),
                _encode(centre_crop(image), job.rel))
    try:
        crop = norm_crop(image, points, ALIGNED_SIZE)
    except DegenerateLandmarks as exc:
        return Record(job.rel, str(job.src), "degenerate", source, faces, np.asarray(points), str(exc)), None
    return Record(job.rel, str(job.src), ALIGNED, source, faces, np.asarray(points), note), _encode(crop, job.rel)


# A worker process's own detector, built once by the pool initializer (dlib and onnxruntime objects cannot be
# pickled per task); the main process never sets it.
_WORKER_DETECTOR = None


def worker_init(spec: DetectorSpec) -> None:
    """Pool initializer: build this process's detector once."""
    global _WORKER_DETECTOR
    cv2.setNumThreads(1)   # one image per process: OpenCV's own threads would only compete with the workers
    _WORKER_DETECTOR = build_detector(spec)


def worker_task(task: tuple) -> tuple[Record, bytes | None]:
    """One task (job, mode, given points, fallback) with this process's detector."""
    return process(_WORKER_DETECTOR, *task)
