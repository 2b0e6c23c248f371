"""The alignment keeps the suite's promises with hostile inputs (issue 29): no file of the user's in OUT is removed
or replaced (also by a refused run), no implausible landmark becomes a crop marked aligned, a replaced source is
redone, ambiguous landmark rows are never guessed, and every bad input ends in one paragraph naming it."""
from __future__ import annotations

import csv
import errno
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedata.align import run as align_run
from facedata.align.detectors import DetectorSpec
from facedata.align.run import LANDMARKS_NAME, LOG_NAME, REPORT_NAME, Progress, align_tree
from facedata.align.transform import estimate_norm
from facedata.align.worker import Record, header_pixels
from test_align import constant_onnx, make_tree, scrfd_outputs, snapshot
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def file_spec(points: Path) -> DetectorSpec:
    return DetectorSpec("file", landmarks=(str(points),))


def one_paragraph(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text.strip() and "Traceback" not in text
    return text


def write_points(path: Path, rows: list[tuple[str, object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5"])
        for rel, pts in rows:
            w.writerow([rel, *np.asarray(pts, dtype=float).reshape(-1)])
    return path


# ---------------------------------------------------------------- a user's files in OUT (29.1-3)

def test_a_users_temporary_file_is_kept_and_the_run_refused(tmp_path):
    src, points, _ = make_tree(tmp_path, n_people=1, per=2)
    out = tmp_path / "aligned"
    out.mkdir()
    draft = out / ".draft.2024.tmp"
    draft.write_bytes(b"my draft, not a crop")
    with pytest.raises(UserError, match=r"\.draft\.2024\.tmp") as exc:
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert "Nothing was changed" in one_paragraph(exc)
    assert draft.read_bytes() == b"my draft, not a crop"
    assert sorted(p.name for p in out.iterdir()) == [".draft.2024.tmp"]   # nothing written either
    # a run that is refused for another entry leaves the temporary file too (the check comes before any change)
    draft.unlink()
    align_tree(src, out, file_spec(points), workers=1, progress=False)
    mine = out / "Person_0" / ".Person_0_0001.png.77.align-tmp"   # our marker's shape, but no crop of ours left it
    other = out / "Person_0" / ".notes.txt.12.align-tmp"
    for path, data in ((mine, b"mine"), (other, b"other"), (draft, b"draft")):
        path.write_bytes(data)
    (out / "Person_0" / "extra.jpg").write_bytes(b"user's photo")
    with pytest.raises(UserError, match="extra.jpg"):
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert draft.read_bytes() == b"draft" and other.read_bytes() == b"other" and mine.read_bytes() == b"mine"
    (out / "Person_0" / "extra.jpg").unlink()
    with pytest.raises(UserError, match="notes.txt.12.align-tmp"):   # names no image of the journal: not ours
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert other.read_bytes() == b"other" and draft.read_bytes() == b"draft"


def test_only_a_temporary_file_of_this_tool_for_an_image_of_its_journal_is_removed(tmp_path):
    src, points, table = make_tree(tmp_path, n_people=1, per=2)
    out = tmp_path / "aligned"
    align_tree(src, out, file_spec(points), workers=1, progress=False)
    rel = sorted(table)[0]
    left = out / Path(rel).parent / f".{Path(rel).name}.4242.align-tmp"   # a killed run's half-renamed crop
    left.write_bytes(b"half a crop")
    before = snapshot(out)
    del before[str(left.relative_to(out))]
    result = align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert result.processed == 0 and not left.exists() and snapshot(out) == before


def test_a_foreign_landmarks_journal_is_refused_before_any_repair(tmp_path):
    src, points, _ = make_tree(tmp_path, n_people=1, per=2)
    out = tmp_path / "aligned"
    out.mkdir()
    foreign = b"name,score\nalice,3\nbob,4"   # no newline at the end: the repair would have cut "bob,4"
    (out / LANDMARKS_NAME).write_bytes(foreign)
    with pytest.raises(UserError, match="not this tool's landmarks journal") as exc:
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    one_paragraph(exc)
    assert (out / LANDMARKS_NAME).read_bytes() == foreign and os.listdir(out) == [LANDMARKS_NAME]
    (out / LANDMARKS_NAME).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not this tool's landmarks journal"):
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert (out / LANDMARKS_NAME).read_bytes() == b"\xff\xfe\x00garbage"


@pytest.mark.parametrize("name", [LOG_NAME, REPORT_NAME])
def test_a_users_log_or_report_is_refused_unless_the_journal_shows_the_tool_wrote_it(tmp_path, name):
    src, points, _ = make_tree(tmp_path, n_people=1, per=2)
    out = tmp_path / "aligned"
    out.mkdir()
    (out / name).write_bytes(b"my own notes\n")
    with pytest.raises(UserError, match=f"'{name}' \\(not written by this tool") as exc:
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    one_paragraph(exc)
    assert (out / name).read_bytes() == b"my own notes\n" and os.listdir(out) == [name]
    # after a run, the tool's own versions pass; a user's replacement of one of them does not
    (out / name).unlink()
    align_tree(src, out, file_spec(points), workers=1, progress=False)
    before = snapshot(out)
    assert align_tree(src, out, file_spec(points), workers=1, progress=False).processed == 0
    assert snapshot(out) == before
    text = (out / name).read_text() + "my remark\n"
    (out / name).write_text(text)
    journal = (out / LANDMARKS_NAME).read_bytes()
    with pytest.raises(UserError, match=f"'{name}' \\(not written by this tool"):
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert (out / name).read_text() == text and (out / LANDMARKS_NAME).read_bytes() == journal
    (out / name).unlink()
    (out / name).mkdir()   # a folder of that name: refused before any work, not met at the end
    (out / name / "inside.txt").write_text("mine")
    with pytest.raises(UserError, match=f"'{name}' \\(a folder where this tool writes its file"):
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert (out / name / "inside.txt").read_text() == "mine"


def test_a_journal_of_the_earlier_layout_is_continued(tmp_path, monkeypatch):
    """OUTs aligned before the journal recorded sizes and hashes: their rows, report and log are taken as they are."""
    src, points, table = make_tree(tmp_path, n_people=1, per=3)
    out = tmp_path / "aligned"
    align_tree(src, out, file_spec(points), workers=1, progress=False)
    rows = [r for r in csv.reader((out / LANDMARKS_NAME).read_text().splitlines()) if r[2] != "own_file"]
    with open(out / LANDMARKS_NAME, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([r[:16] for r in rows[:-1]])   # the last image not yet done
    (out / rows[-1][0]).unlink()
    real = align_run._atomic_write

    def crops_fail(path, data):   # killed (here: a full disk) after the first new row was appended
        if path.suffix == ".png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(align_run, "_atomic_write", crops_fail)
    with pytest.raises(UserError, match="disk is full"):
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    monkeypatch.setattr(align_run, "_atomic_write", real)
    result = align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert result.processed == 1 and sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(table)
    assert align_tree(src, out, file_spec(points), workers=1, progress=False).processed == 0


# ---------------------------------------------------------------- landmarks that are no face of the image (29.7)

def test_landmarks_outside_the_image_or_of_an_absurd_scale_are_left_out_and_listed(tmp_path):
    src, _, table = make_tree(tmp_path, n_people=1, per=6)
    rels = sorted(table)
    good = table[rels[0]]
    rows = [(rels[0], good),
            (rels[1], good - 500),                                   # 250x250 image: far left and above it
            (rels[2], good + 1e5),
            (rels[3], good * 1e300),
            (rels[4], good[2] + (good - good.mean(0)) * 1e-3),       # five points within 0.1 px: a 1000x scale
            (rels[5], np.full((5, 2), 40.0))]                        # coinciding (as before)
    points = write_points(tmp_path / "points.csv", rows)
    out = tmp_path / "aligned"
    result = align_tree(src, out, file_spec(points), workers=1, progress=False)
    status = {rel: result.records[rel].status for rel in rels}
    assert status == {rels[0]: "aligned", rels[1]: "implausible", rels[2]: "implausible", rels[3]: "implausible",
                      rels[4]: "implausible", rels[5]: "degenerate"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [rels[0]]
    report = (out / REPORT_NAME).read_text()
    for rel in rels[1:5]:
        assert f"the landmarks are not a face of the image (outside it, or an absurd scale)\t{rel}\t" in report
    assert "outside the 250x250 image" in result.records[rels[1]].note
    assert "magnify" in result.records[rels[4]].note
    assert len((out / LANDMARKS_NAME).read_text()) < 10_000   # no 300-digit numbers in the journal
    # the margin is stated: a face cut by the frame (a point 20 px outside) is still aligned
    shifted = write_points(tmp_path / "shifted.csv", [(rels[0], good - good.min(0) - 20)])
    again = align_tree(src, tmp_path / "again", file_spec(shifted), workers=1, progress=False)
    assert again.records[rels[0]].status == "aligned"


def test_an_onnx_detector_output_of_1e30_is_left_out(tmp_path):
    outputs = scrfd_outputs()
    i = (15 * 40 + 20) * 2
    outputs["kps_16"][i, 0] = 1e30                                # the best face's left eye overflows
    outputs["kps_16"][i + 1] = 1e30                               # and the duplicate's every point
    model = constant_onnx(tmp_path / "overflow.onnx", outputs)
    src = tmp_path / "raw" / "Some_One"
    src.mkdir(parents=True)
    cv2.imwrite(str(src / "a.png"), np.full((240, 320, 3), 100, np.uint8))
    result = align_tree(tmp_path / "raw", tmp_path / "aligned", DetectorSpec("scrfd", str(model)), workers=1,
                        progress=False)
    rec = result.records["Some_One/a.png"]
    assert rec.status == "implausible" and rec.points is None and "outside the 320x240 image" in rec.note
    assert not (tmp_path / "aligned" / "Some_One" / "a.png").exists()


@pytest.mark.parametrize("case", ["scores (N, 2)", "landmarks (N, 8)", "anchors", "input rank 3"])
def test_an_onnx_detector_of_another_layout_is_one_paragraph(tmp_path, case):
    outputs = scrfd_outputs()
    shape = None
    if case == "scores (N, 2)":
        outputs["score_8"] = np.zeros((outputs["score_8"].shape[0], 2), np.float32)
    elif case == "landmarks (N, 8)":
        outputs["kps_32"] = np.zeros((outputs["kps_32"].shape[0], 8), np.float32)
    elif case == "anchors":
        outputs = {k: v[: len(v) // 2] for k, v in outputs.items()}   # half the anchors the grid has
    else:
        shape = [3, None, None]
    model = constant_onnx(tmp_path / "other.onnx", outputs, shape)
    src = tmp_path / "raw" / "A"
    src.mkdir(parents=True)
    cv2.imwrite(str(src / "a.png"), np.full((64, 64, 3), 100, np.uint8))
    with pytest.raises(UserError, match="other.onnx") as exc:
        align_tree(tmp_path / "raw", tmp_path / "aligned", DetectorSpec("scrfd", str(model)), workers=1,
                   progress=False)
    one_paragraph(exc)


# ---------------------------------------------------------------- links in SRC (29.8)

def test_links_to_folders_are_followed_and_loops_listed_as_skipped(tmp_path):
    src, points, table = make_tree(tmp_path, n_people=2, per=1)
    os.symlink(src / "Person_0", src / "Alias")                   # followed, as the training scan follows it
    os.symlink(src, src / "Person_1" / "back")                    # a loop: listed, not followed
    os.symlink(tmp_path / "nowhere", src / "Person_1" / "gone")   # broken
    out = tmp_path / "aligned"
    rows = list(table.items()) + [("Alias/Person_0_0001.png", table["Person_0/Person_0_0001.png"])]
    result = align_tree(src, out, file_spec(write_points(tmp_path / "p.csv", rows)), workers=1, progress=False)
    assert sorted(result.records) == sorted([*table, "Alias/Person_0_0001.png"])
    assert all(r.status == "aligned" for r in result.records.values())
    assert (out / "Alias/Person_0_0001.png").read_bytes() == (out / "Person_0/Person_0_0001.png").read_bytes()
    report = (out / REPORT_NAME).read_text()
    assert "skipped\tPerson_1/back\t\ta symbolic link to a folder above it (a loop): not followed" in report
    assert "skipped\tPerson_1/gone\t\ta broken symbolic link" in report
    assert "skipped in SRC: 2 entries" in (out / LOG_NAME).read_text()


# ---------------------------------------------------------------- replaced sources (29.9)

def test_a_replaced_source_is_aligned_again(tmp_path):
    src, points, table = make_tree(tmp_path, n_people=1, per=3)
    rels = sorted(table)
    broken = src / "Person_0" / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "aligned"
    spec = file_spec(write_points(tmp_path / "p.csv", list(table.items()) + [("Person_0/broken.png", table[rels[0]])]))
    first = align_tree(src, out, spec, workers=1, progress=False)
    assert first.records["Person_0/broken.png"].status == "unreadable"
    old_crop = (out / rels[1]).read_bytes()
    # the user replaces the unreadable file with a good photograph, and another photograph with a different one
    broken.write_bytes((src / rels[0]).read_bytes())
    photo = cv2.imread(str(src / rels[1]))
    cv2.imwrite(str(src / rels[1]), 255 - photo)
    for path in (broken, src / rels[1]):
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a later time, whatever the clock's grain
    unchanged = {rel: (out / rel).stat().st_mtime_ns for rel in (rels[0], rels[2])}
    second = align_tree(src, out, spec, workers=1, progress=False)
    assert second.processed == 2
    assert second.records["Person_0/broken.png"].status == "aligned"
    assert (out / "Person_0/broken.png").read_bytes() == (out / rels[0]).read_bytes()
    assert (out / rels[1]).read_bytes() != old_crop
    expect = cv2.warpAffine(255 - photo, estimate_norm(table[rels[1]]), (112, 112), borderValue=0.0)
    assert np.array_equal(cv2.imread(str(out / rels[1])), expect)
    assert {rel: (out / rel).stat().st_mtime_ns for rel in unchanged} == unchanged
    # a photograph replaced by a damaged file: its old crop (this tool's) goes, the image is listed
    (src / rels[2]).write_bytes(b"damaged")
    third = align_tree(src, out, spec, workers=1, progress=False)
    assert third.processed == 1 and third.records[rels[2]].status == "unreadable" and not (out / rels[2]).exists()
    assert align_tree(src, out, spec, workers=1, progress=False).processed == 0


# ---------------------------------------------------------------- ambiguous landmark rows (29.10)

def test_two_different_rows_for_one_image_are_never_guessed(tmp_path):
    src, _, table = make_tree(tmp_path, n_people=1, per=3)
    rels = sorted(table)
    rows = [(rels[0], table[rels[0]]), (rels[1], table[rels[1]]), (rels[0], table[rels[0]] + 3),
            (rels[2], table[rels[2]]), (rels[2], table[rels[2]])]       # the same row twice: not ambiguous
    points = write_points(tmp_path / "p.csv", rows)
    result = align_tree(src, tmp_path / "aligned", file_spec(points), workers=2, progress=False)   # sent to workers
    assert {rel: r.status for rel, r in result.records.items()} == {rels[0]: "ambiguous", rels[1]: "aligned",
                                                                      rels[2]: "aligned"}
    assert "(lines 2 and 4)" in result.records[rels[0]].note
    assert (f"the landmark file gives two different rows for it\t{rels[0]}"
            in (tmp_path / "aligned" / REPORT_NAME).read_text())
    assert not (tmp_path / "aligned" / rels[0]).exists()


# ---------------------------------------------------------------- images too large, OUT unwritable (29.14)

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG file declaring width x height pixels (its IHDR), with a token IDAT: never decodable in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_images_above_the_pixel_limit_are_listed_without_decoding(tmp_path):
    src, points, table = make_tree(tmp_path, n_people=1, per=1)
    png_header_only(src / "Person_0" / "huge.png", 40000, 40000)
    png_header_only(src / "Person_0" / "big.png", 30000, 30000)
    out = tmp_path / "aligned"
    result = align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert result.records["Person_0/huge.png"].status == "too_large"
    assert result.records["Person_0/big.png"].status == "too_large"
    assert "900 megapixels (as its header declares), above the limit of 100" in result.records["Person_0/big.png"].note
    small_header = png_header_only(tmp_path / "declared.png", 12000, 10000)   # below Pillow's own limit
    assert header_pixels(small_header) == (120_000_000, "12000x10000")
    report = (out / REPORT_NAME).read_text()
    assert "more pixels than --max-megapixels allows (not decoded)\tPerson_0/huge.png" in report
    assert result.records["Person_0/Person_0_0001.png"].status == "aligned"
    # the limit is an option: a 250x250 photo is above 0.05 megapixels
    small = align_tree(src, tmp_path / "small", file_spec(points), workers=1, progress=False, max_megapixels=0.05)
    assert small.records["Person_0/Person_0_0001.png"].status == "too_large"


def test_out_under_a_file_is_one_paragraph(tmp_path):
    src, points, _ = make_tree(tmp_path, n_people=1, per=1)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UserError, match="afile") as exc:
        align_tree(src, tmp_path / "afile" / "out", file_spec(points), workers=1, progress=False)
    one_paragraph(exc)
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_unwritable_out_is_one_paragraph_and_the_rerun_continues(tmp_path, monkeypatch, code):
    src, points, table = make_tree(tmp_path, n_people=1, per=3)
    out = tmp_path / "aligned"
    real = align_run._atomic_write
    calls = []

    def failing(path, data):   # the second crop meets a read-only file system / a full disk / no permission
        calls.append(path)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(align_run, "_atomic_write", failing)
    with pytest.raises(UserError, match=str(out)) as exc:
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    text = one_paragraph(exc)
    assert ("disk is full" in text) if code == errno.ENOSPC else (os.strerror(code) in text)
    monkeypatch.setattr(align_run, "_atomic_write", real)
    result = align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert result.processed == 2   # the second image (its row written, its crop not) and the third
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(table)
    assert not list(out.rglob("*tmp"))


@pytest.mark.parametrize("edit", [("faces", "abc"), ("x1", "oops"), ("status", "fine"), ("source_size", "-3")])
def test_a_hand_edited_journal_is_one_paragraph_naming_its_line(tmp_path, edit):
    src, points, _ = make_tree(tmp_path, n_people=1, per=2)
    out = tmp_path / "aligned"
    align_tree(src, out, file_spec(points), workers=1, progress=False)
    rows = list(csv.reader((out / LANDMARKS_NAME).read_text().splitlines()))
    rows[2][rows[0].index(edit[0])] = edit[1]
    with open(out / LANDMARKS_NAME, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    before = snapshot(out)
    with pytest.raises(UserError, match=f"{LANDMARKS_NAME}', line 3") as exc:
        align_tree(src, out, file_spec(points), workers=1, progress=False)
    assert repr(edit[1]) in one_paragraph(exc) or edit[1] in str(exc.value)
    assert snapshot(out) == before


# ---------------------------------------------------------------- landmark files read once; workers capped (29.18)

def test_workers_get_their_landmarks_from_the_main_process(tmp_path, monkeypatch):
    """The landmark file is moved away once the main process has read it: worker processes that read it again
    would fail; they receive each task's points instead."""
    src, points, table = make_tree(tmp_path, n_people=2, per=2)
    real_build = align_run.build_detector

    def build_then_move(spec):
        detector = real_build(spec)
        points.rename(points.with_suffix(".moved"))
        return detector

    monkeypatch.setattr(align_run, "build_detector", build_then_move)
    result = align_tree(src, tmp_path / "aligned", file_spec(points), workers=2, progress=False)
    assert result.workers == 2 and result.counts["aligned"] == len(table)


def test_workers_are_capped_at_the_images_and_the_cores(tmp_path, caplog):
    src, points, _ = make_tree(tmp_path, n_people=1, per=2)
    with caplog.at_level(logging.INFO, logger="genderprivacy"):
        result = align_tree(src, tmp_path / "aligned", file_spec(points), workers=10000, progress=False)
    assert result.workers == min(2, align_run.default_workers())
    assert f"--workers 10000: {result.workers} worker process(es)" in caplog.text


def test_a_large_landmark_file_is_read_into_one_array():
    """100,000 rows: one (N, 5, 2) array and an index (a dict of arrays per row took 3.75 GB for 2,000,000)."""
    import tempfile
    from facedata.align.detectors.landmark_file import read_table
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 250, (100_000, 10))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.csv"
        path.write_text("".join(f"p{i}/img.jpg," + ",".join(f"{v:.2f}" for v in row) + "\n"
                                for i, row in enumerate(values)))
        table = read_table(path)
    assert len(table) == 100_000 and table.points.shape == (100_000, 5, 2)
    np.testing.assert_allclose(table.get("p12345/img.jpg"), values[12345].reshape(5, 2), atol=0.006)


# ---------------------------------------------------------------- progress without a terminal (30.3)

def test_progress_line_counts_rate_and_time_left():
    ticks = iter(float(t) for t in range(0, 100, 2))                 # 2 s per image
    meter = Progress(10, interval_s=5, clock=lambda: next(ticks))
    lines = []
    for k in range(10):
        status = "no_face" if k == 1 else "unreadable" if k == 4 else "aligned"
        lines.append(meter.add(Record(f"{k}.jpg", "", status, "file", 0, None)))
    due = [line for line in lines if line]
    assert len(due) == 4                                              # at 6, 12, 18 s and at the end
    assert due[0] == "aligned 3/10 images (30.0%), 0.5 images/s, no face 1, undecodable 0, about 14 s left"
    assert due[-1].startswith("aligned 10/10 images (100.0%), 0.5 images/s, no face 1, undecodable 1, about 0 s")


def test_progress_lines_appear_with_output_redirected_to_a_file(tmp_path):
    src, points, table = make_tree(tmp_path, n_people=2, per=2)
    log_file = tmp_path / "job.log"
    with open(log_file, "w") as fh:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "align_faces.py"), str(src),
                               str(tmp_path / "aligned"), "--detector", "file", "--landmarks", str(points),
                               "--workers", "1", "--progress-seconds", "0"], stdout=fh, stderr=subprocess.STDOUT,
                              timeout=120)
    assert proc.returncode == 0
    text = log_file.read_text()
    lines = [line for line in text.splitlines() if " images/s, no face " in line]
    assert len(lines) == len(table)
    assert f"aligned {len(table)}/{len(table)} images (100.0%)" in lines[-1]
    assert "\r" not in text   # no progress bar written into the file


def test_the_log_is_written_as_the_run_goes(tmp_path, monkeypatch):
    src, points, table = make_tree(tmp_path, n_people=2, per=2)
    out = tmp_path / "aligned"
    written = []
    real = align_run._atomic_write

    def spy(path, data):
        if path.name == LOG_NAME:
            written.append(data.decode())
        real(path, data)

    monkeypatch.setattr(align_run, "_atomic_write", spy)
    align_tree(src, out, file_spec(points), workers=1, progress=False, progress_seconds=0)
    assert [t.count(f"in progress: aligned {k}/4 images") for k, t in enumerate(written[:4], start=1)] == [1] * 4
    assert "in progress" not in written[-1] and written[-1] == (out / LOG_NAME).read_text()
    assert align_tree(src, out, file_spec(points), workers=1, progress=False).processed == 0   # the log is ours
