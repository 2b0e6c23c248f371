"""Landmark sources for the alignment, one file each, chosen by name (``--detector``).

A source gives, for one image, every face it finds: a box and the five points (left eye, right eye, nose tip,
left mouth corner, right mouth corner, as seen in the image). When there are several, the aligner keeps the one
insightface keeps (``pick_face``). Sources are built inside each worker process from a picklable ``DetectorSpec``
(detector objects of dlib and onnxruntime cannot be sent between processes).
"""
from facedata.align.detectors.base import (DETECTORS, Detector, DetectorSpec, Face, LeftOut, box_of, build_detector,
                                           pick_face, register_detector)
# the built-in sources register themselves on import
from facedata.align.detectors import dlib68, landmark_file, scrfd  # noqa: E402,F401

__all__ = ["DETECTORS", "Detector", "DetectorSpec", "Face", "LeftOut", "box_of", "build_detector", "pick_face",
           "register_detector", "dlib68", "landmark_file", "scrfd"]
