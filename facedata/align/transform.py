"""The five-point similarity alignment the backbones were trained with: insightface's 112x112 reference points, the
least-squares similarity (Umeyama) from an image's five landmarks onto them, and the warp.

The reference points are insightface's ``arcface_dst`` (utils/face_align.py); the estimate is the one scikit-image's
``SimilarityTransform.estimate`` computes (Umeyama 1991, no reflection), here in float64; the warp is
``cv2.warpAffine`` with bilinear interpolation and a black border, as insightface's ``norm_crop``.
"""
from __future__ import annotations

import cv2
import numpy as np

ALIGNED_SIZE = 112
# Left eye, right eye, nose tip, left mouth corner, right mouth corner, as seen in the image (x, y), for a
# 112x112 crop: insightface's arcface_dst (float32 values as insightface stores them).
REFERENCE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                          [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32).astype(np.float64)
POINT_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")


class DegenerateLandmarks(ValueError):
    """Landmarks that fix no similarity (all points equal, or not finite)."""


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix [sR | t] minimising sum ||s R src_i + t - dst_i||^2 over scale s > 0, rotation R (det +1) and
    translation t (Umeyama's closed form)."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (N, 2) point arrays with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise DegenerateLandmarks("landmarks are not finite numbers")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise DegenerateLandmarks("all landmarks coincide")
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:   # the best orthogonal matrix would be a reflection: take the best rotation instead
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / var_s
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def estimate_norm(landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The 2x3 matrix taking five (x, y) landmarks of an image onto the reference points of a ``size`` crop
    (insightface's rule for other sizes: reference scaled by size/112, or size/128 with 8 px shift for 128
    multiples)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"need five (x, y) landmarks, got an array of shape {landmarks.shape}")
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    else:
        raise ValueError(f"crop size {size} is neither a multiple of 112 nor of 128")
    dst = REFERENCE_112 * ratio
    dst[:, 0] += shift
    return umeyama_similarity(landmarks, dst)


def warp(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``image`` under ``matrix`` (bilinear, black outside the image)."""
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (size, size), borderValue=0.0)


def norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The aligned crop of the face whose five landmarks are given."""
    return warp(image, estimate_norm(landmarks, size), size)


def centre_crop(image: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The centred square of the short side, resized to ``size`` (the marked fallback when no face is found)."""
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = image[y0:y0 + side, x0:x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)
