"""insightface's SCRFD / RetinaFace face detectors (the ONNX files of its model packs, e.g. buffalo_l's det_10g.onnx)
run through onnxruntime, given the model file the user downloaded (``--detector-model PATH``).

Both export the same outputs: per feature stride (8, 16, 32; or 8..128), a face score per anchor, the box as four
distances from the anchor centre and the five landmarks as offsets from it, all in units of the stride. Input: the
image resized (aspect kept) into a 640x640 canvas at the top left, RGB, (x - 127.5) / 128. Faces: score >= 0.5,
then non-maximum suppression at IoU 0.4 (insightface's defaults).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from facedata.align.detectors.base import DetectorSpec, Face, register_detector
from utils.errors import UserError

INPUT_SIZE = 640
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4


def anchor_centres(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height*width*num_anchors, 2) anchor centres (x, y) in input pixels, row-major, each repeated per anchor."""
    ys, xs = np.mgrid[:height, :width]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, num_anchors, axis=0) if num_anchors > 1 else centres


def decode(scores: list[np.ndarray], boxes: list[np.ndarray], kps: list[np.ndarray], strides: list[int],
           num_anchors: int, input_hw: tuple[int, int], threshold: float = SCORE_THRESHOLD
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (K,), boxes (K, 4), landmarks (K, 5, 2)) in input pixels of the anchors scoring >= ``threshold``."""
    out_s, out_b, out_k = [], [], []
    for s, b, k, stride in zip(scores, boxes, kps, strides):
        s, b, k = np.asarray(s), np.asarray(b), np.asarray(k)
        if b.size != 4 * s.size or k.size != 10 * s.size:
            raise ValueError(f"stride {stride}: {s.size} scores, {b.size} box values and {k.size} landmark values")
        with np.errstate(over="ignore", invalid="ignore"):   # an overflowing output becomes inf, left out later
            s, b, k = s.reshape(-1), b.reshape(-1, 4) * stride, k.reshape(-1, 10) * stride
        centres = anchor_centres(input_hw[0] // stride, input_hw[1] // stride, stride, num_anchors)
        if len(centres) != len(s):
            raise ValueError(f"stride {stride}: {len(s)} scores for {len(centres)} anchors")
        keep = s >= threshold
        c = centres[keep]
        out_s.append(s[keep])
        with np.errstate(over="ignore", invalid="ignore"):
            out_b.append(np.concatenate([c - b[keep, :2], c + b[keep, 2:]], axis=1))
            out_k.append((np.tile(c, 5) + k[keep]).reshape(-1, 5, 2))
    return np.concatenate(out_s), np.concatenate(out_b), np.concatenate(out_k)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_THRESHOLD) -> list[int]:
    """Indices kept by greedy non-maximum suppression, highest score first (insightface's +1 pixel box areas)."""
    with np.errstate(over="ignore", invalid="ignore"):   # boxes of an overflowing output: dropped by the aligner
        return _nms(boxes, scores, iou)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= iou]
    return keep


class Scrfd:
    """An insightface SCRFD / RetinaFace ONNX detector with five-point outputs."""
    needs_pixels = True

    def __init__(self, spec: DetectorSpec):
        if importlib.util.find_spec("onnxruntime") is None:
            raise UserError(f"--detector {spec.name} needs onnxruntime, which is not installed: run "
                            f"`pip install -r requirements-align.txt`.")
        if not spec.model:
            raise UserError(f"--detector {spec.name} needs --detector-model PATH: an insightface detector file (e.g. "
                            f"det_10g.onnx of the buffalo_l model pack, or scrfd_10g_bnkps.onnx), downloaded by you.")
        model = Path(spec.model)
        if not model.is_file():
            raise UserError(f"--detector-model '{model}' does not exist. Give the path of the downloaded .onnx file.")
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1   # parallelism comes from the workers
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as exc:   # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"--detector-model '{model}' could not be loaded by onnxruntime "
                            f"({type(exc).__name__}: {str(exc)[:200]}). Give an insightface SCRFD/RetinaFace "
                            f".onnx.") from None
        self.model = model
        inputs = self.session.get_inputs()
        shape = list(inputs[0].shape) if inputs else []
        if len(inputs) != 1 or len(shape) != 4 or shape[1] not in (3, "3") and isinstance(shape[1], int):
            raise UserError(f"--detector-model '{model}' takes {len(inputs)} input(s) of shape {shape}; an insightface "
                            f"detector takes one image batch (1, 3, height, width). Use det_10g.onnx or a *_kps / "
                            f"*bnkps model.")
        self.input_name = inputs[0].name
        h, w = shape[2:4]
        self.input_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else (INPUT_SIZE, INPUT_SIZE)
        if min(self.input_hw) < 32:
            raise UserError(f"--detector-model '{model}' takes {self.input_hw[0]}x{self.input_hw[1]} images; an "
                            f"insightface detector takes at least 32x32 (640x640 by default).")
        outputs = self.session.get_outputs()
        n = len(outputs)
        layouts = {9: ([8, 16, 32], 2), 15: ([8, 16, 32, 64, 128], 1)}
        if n not in layouts:
            raise UserError(f"--detector-model '{model}' has {n} outputs; an insightface detector with five-point "
                            f"landmarks has 9 (3 strides) or 15 (5 strides). Use a *_kps / *bnkps model or "
                            f"det_10g.onnx.")
        self.strides, self.num_anchors = layouts[n]
        k = len(self.strides)
        for i, out in enumerate(outputs):   # scores (N, 1), boxes (N, 4), landmarks (N, 10) per stride
            want, last = (1, 4, 10)[i // k], out.shape[-1] if out.shape else None
            if isinstance(last, int) and last != want:
                raise UserError(self._layout_error(f"output {i} ('{out.name}') has shape {out.shape}"))
        self.source = f"{spec.name}:{model.name}"

    def _layout_error(self, what: str) -> str:
        return (f"--detector-model '{self.model}': {what}, not insightface's layout (per stride: scores (N, 1), "
                f"boxes (N, 4), five landmarks (N, 10), N anchors of the input's grid). Use det_10g.onnx or a "
                f"*_kps / *bnkps model.")

    def faces(self, image: np.ndarray | None, rel: str) -> list[Face]:
        assert image is not None, "needs_pixels: the aligner passes the decoded image"
        h, w = image.shape[:2]
        ih, iw = self.input_hw
        scale = min(ih / h, iw / w)
        nh, nw = int(round(h * scale)), int(round(w * scale))
        canvas = np.zeros((ih, iw, 3), dtype=np.uint8)
        canvas[:nh, :nw] = cv2.resize(image, (nw, nh))
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128, (iw, ih), (127.5, 127.5, 127.5), swapRB=True)
        try:
            outs = self.session.run(None, {self.input_name: blob})
        except Exception as exc:   # noqa: BLE001 - onnxruntime's own exception types (a shape the model refuses)
            raise UserError(self._layout_error(f"running it on a (1, 3, {ih}, {iw}) input failed "
                                               f"({type(exc).__name__}: {str(exc)[:200]})")) from None
        k = len(self.strides)
        try:
            s, b, p = decode(outs[:k], outs[k:2 * k], outs[2 * k:3 * k], self.strides, self.num_anchors, (ih, iw))
        except ValueError as exc:
            raise UserError(self._layout_error(f"its outputs do not decode ({exc}; shapes "
                                               f"{[np.shape(o) for o in outs]})")) from None
        keep = nms(b, s)
        return [Face(b[i] / scale, p[i] / scale, float(s[i])) for i in keep]


@register_detector("scrfd", "insightface's SCRFD detector (e.g. buffalo_l det_10g.onnx) via onnxruntime; needs "
                            "--detector-model PATH")
def build_scrfd(spec: DetectorSpec) -> Scrfd:
    return Scrfd(spec)


@register_detector("retinaface", "insightface's RetinaFace ONNX export (same outputs as SCRFD) via onnxruntime; "
                                 "needs --detector-model PATH")
def build_retinaface(spec: DetectorSpec) -> Scrfd:
    return Scrfd(spec)
