"""What every landmark source shares: the face it returns, the spec a worker builds it from, the registry of sources
(``--detector``) and the choice among several faces."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from utils.registry import Registry


@dataclass
class Face:
    """One detected face: box (x1, y1, x2, y2) and five (x, y) landmarks in the image's pixels."""
    box: np.ndarray
    points: np.ndarray
    score: float = 1.0
    found_by: str = ""   # which of a source's detectors found it (dlib: "hog" or "mmod"), for the journal


class LeftOut(Exception):
    """Raised by a source's ``faces`` to leave an image out with a stated reason instead of guessing (e.g. a
    landmark file giving two different rows for it); ``status`` is the journal's status, the message its note."""

    def __init__(self, status: str, note: str):
        super().__init__(note)
        self.status, self.note = status, note

    def __reduce__(self):   # sent to worker processes inside a task
        return LeftOut, (self.status, self.note)


class Detector(Protocol):
    """What a landmark source provides to the aligner."""
    source: str          # what the landmarks CSV records as their origin (e.g. "dlib68", "file:list.txt")
    needs_pixels: bool   # False: the landmarks come from a file, the image is decoded only for the warp

    def faces(self, image: np.ndarray | None, rel: str) -> list[Face]:
        """Every face found in ``image`` (BGR uint8), whose path relative to the source root is ``rel``."""
        ...


@dataclass(frozen=True)
class DetectorSpec:
    """A detector's name and options: what a worker process needs to build it."""
    name: str
    model: str | None = None                    # --detector-model
    landmarks: tuple[str, ...] = ()             # --landmarks files (detector 'file')
    options: tuple[tuple[str, object], ...] = field(default=())


# option --detector: every landmark source, by name: a builder from a spec, and a help line for --help
DETECTORS: Registry[Callable[[DetectorSpec], Detector]] = Registry("landmark source", "--detector")


def register_detector(name: str, help_text: str) -> Callable:
    """Class or function decorator adding a landmark source under ``name`` (``DETECTORS.register``)."""
    return DETECTORS.register(name, help=help_text)


def build_detector(spec: DetectorSpec) -> Detector:
    """The detector a spec names (a UserError with the closest name for an unknown one)."""
    return DETECTORS.get(spec.name)(spec)


def pick_face(faces: Sequence[Face], shape: tuple[int, ...]) -> Face:
    """The face insightface's detectors keep with max_num=1: the largest box area minus twice the squared distance
    of the box centre from the image centre (integer centre (h//2, w//2), as insightface)."""
    cy, cx = shape[0] // 2, shape[1] // 2

    def value(face: Face) -> float:
        x1, y1, x2, y2 = (float(v) for v in face.box)
        area = (x2 - x1) * (y2 - y1)
        off = ((x1 + x2) / 2 - cx) ** 2 + ((y1 + y2) / 2 - cy) ** 2
        return area - 2.0 * off

    return max(faces, key=value)   # max keeps the first of equal values, as a stable argsort would


def box_of(points: np.ndarray) -> np.ndarray:
    """The box spanned by landmarks (for sources that give points only)."""
    points = np.asarray(points, dtype=np.float64)
    return np.concatenate([points.min(0), points.max(0)])
