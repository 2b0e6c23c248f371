"""Seeded fuzzers of the alignment's text inputs, like the .rec one of tests/test_reliability_inputs.py: landmark
files (--detector file) and a hand-edited OUT/.align_landmarks.csv, mutated in values, types, lengths and
encodings. Only two outcomes are accepted: success with every crop a plausible alignment, or one paragraph
naming the problem (and then OUT unchanged)."""
from __future__ import annotations

import csv
import io
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedata.align.detectors import DetectorSpec
from facedata.align.run import LANDMARKS_NAME, align_tree, read_journal
from facedata.align.transform import REFERENCE_112, check_landmarks
from facedata.align.worker import STATUSES, WRITTEN
from test_align import apply, similarity, snapshot
from utils.errors import UserError

SIZE = 64   # small photographs: the fuzzer is about the text, not the pixels
VALUES = ["nan", "NaN", "inf", "-inf", "1e300", "-1e300", "-500", "1e5", "abc", "", " ", "0x1F", "1_000", "٣٢",
          "1e-320", "-0", "12.5.3", "1,5", '"7"', "None", "\x00", "\u00e9", "9" * 400]


def tiny_tree(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    src, table = root / "raw", {}
    for k in range(3):
        rel = f"P_{k}/P_{k}_0001.png"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), cv2.GaussianBlur(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), (5, 5), 0))
        table[rel] = apply(similarity(rng.uniform(0.45, 0.55), rng.uniform(-0.2, 0.2), *rng.uniform(0, 6, 2)),
                           REFERENCE_112)
    return src, table


def formats(table: dict[str, np.ndarray]) -> dict[str, str]:
    """The same landmarks in the three layouts a landmark file may have."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5"])
    for rel, pts in table.items():
        w.writerow([rel, *[f"{v:.2f}" for v in pts.reshape(-1)]])
    celeba = [str(len(table)), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                               "rightmouth_x rightmouth_y"]
    celeba += [f"{Path(rel).name} " + " ".join(f"{v:.0f}" for v in pts.reshape(-1)) for rel, pts in table.items()]
    vgg = ["NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y"]
    vgg += [f'"{rel[:-4]}",' + ",".join(f"{v:.3f}" for v in pts.reshape(-1)) for rel, pts in table.items()]
    return {"csv": buf.getvalue(), "celeba": "\n".join(celeba) + "\n", "vggface2": "\n".join(vgg) + "\n"}


def mutate_text(text: str, rng: np.random.Generator, sep: str) -> tuple[bytes, str]:
    """One seeded damage to a landmark text (``sep`` its field separator), and what it was."""
    lines = text.splitlines()
    i = int(rng.integers(len(lines)))
    cells = lines[i].split(sep)
    kind = int(rng.integers(10))
    if kind <= 2:   # a value replaced (most often: that is what real files get wrong)
        j = int(rng.integers(len(cells)))
        value = VALUES[int(rng.integers(len(VALUES)))]
        cells[j] = value
        lines[i] = sep.join(cells)
        what = f"line {i + 1} field {j} = {value[:20]!r}"
    elif kind == 3:   # a field dropped or added
        j = int(rng.integers(len(cells)))
        cells = cells[:j] + cells[j + 1:] if rng.random() < 0.5 else cells[:j] + ["3"] + cells[j:]
        lines[i] = sep.join(cells)
        what = f"line {i + 1} length {len(cells)}"
    elif kind == 4:   # a line repeated, as it is or with other points
        copy = lines[i] if rng.random() < 0.5 else sep.join(cells[:-1] + [str(rng.integers(0, 60))])
        lines.insert(int(rng.integers(len(lines) + 1)), copy)
        what = f"line {i + 1} repeated"
    elif kind == 5:   # a line dropped (the header, the count line or a row)
        del lines[i]
        what = f"line {i + 1} dropped"
    elif kind == 6:   # garbage lines
        lines.insert(i, "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(1, 30)))))
        what = f"garbage at line {i + 1}"
    else:
        data = ("\n".join(lines) + "\n").encode()
        if kind == 7:   # another encoding or line ending
            enc = ["utf-16", "utf-8-sig", "latin-1", "crlf", "cr"][int(rng.integers(5))]
            if enc in ("crlf", "cr"):
                return data.replace(b"\n", b"\r\n" if enc == "crlf" else b"\r"), f"{enc} line endings"
            return (text.replace("P_1", "P_\u00e91") if enc == "latin-1" else text).encode(enc), f"encoded {enc}"
        if kind == 8:   # truncated
            cut = int(rng.integers(len(data)))
            return data[:cut], f"truncated at {cut}"
        pos = rng.integers(0, len(data), int(rng.integers(1, 4)))   # bytes flipped
        flipped = bytearray(data)
        for p in pos:
            flipped[p] ^= int(rng.integers(1, 256))
        return bytes(flipped), f"bytes flipped at {pos.tolist()}"
    return ("\n".join(lines) + "\n").encode(), what


def _hang(signum, frame):
    raise TimeoutError("a mutant took over 20 s")


def check_outcome(run, what: str, outcomes: dict) -> object:
    signal.alarm(20)
    try:
        result = run()
        outcomes["accepted"] += 1
        return result
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), (what, str(exc))
        outcomes["refused"] += 1
    except Exception as exc:   # noqa: BLE001 - the fuzzer's finding, reported with its mutant
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    finally:
        signal.alarm(0)
    return None


def plausible(result, fresh: bool) -> None:
    """Every crop of an accepted run is there, and (``fresh``: all of them made by this run) a plausible alignment
    of its photograph; no crop is left for an image left out (the fuzzer's property)."""
    for rel, rec in result.records.items():
        assert rec.status in STATUSES
        assert (result.out / rel).is_file() == (rec.status in WRITTEN)
        if rec.status == "aligned":
            assert rec.points.shape == (5, 2) and np.isfinite(rec.points).all()
            if fresh:
                check_landmarks(rec.points, (SIZE, SIZE))


def test_landmark_file_fuzzer_finds_no_traceback_and_no_implausible_crop(tmp_path):
    src, table = tiny_tree(tmp_path)
    before = snapshot(src)
    texts = formats(table)
    rng = np.random.default_rng(29)
    outcomes = {"accepted": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _hang)
    try:
        for n in range(150):
            kind = list(texts)[n % 3]
            data, what = mutate_text(texts[kind], rng, " " if kind == "celeba" else ",")
            path = tmp_path / f"m{n}.txt"
            path.write_bytes(data)
            spec = DetectorSpec("file", landmarks=(str(path),))
            result = check_outcome(lambda n=n, spec=spec: align_tree(src, tmp_path / f"out{n}", spec, workers=1,
                                                                      progress=False),
                                   f"mutant {n} ({kind}: {what})", outcomes)
            if result is not None:
                plausible(result, fresh=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert snapshot(src) == before
    assert outcomes["accepted"] > 30 and outcomes["refused"] > 30, outcomes


def test_hand_edited_journal_fuzzer_finds_no_traceback_and_changes_nothing_it_refuses(tmp_path):
    src, table = tiny_tree(tmp_path)
    points = tmp_path / "points.csv"
    points.write_text(formats(table)["csv"])
    spec = DetectorSpec("file", landmarks=(str(points),))
    done = tmp_path / "done"
    align_tree(src, done, spec, workers=1, progress=False)
    journal = (done / LANDMARKS_NAME).read_text()
    assert len(read_journal(done / LANDMARKS_NAME)) == 3
    rng = np.random.default_rng(14)
    outcomes = {"accepted": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _hang)
    try:
        for n in range(80):
            out = tmp_path / f"j{n}"
            shutil.copytree(done, out)
            data, what = mutate_text(journal, rng, ",")
            (out / LANDMARKS_NAME).write_bytes(data)
            before = snapshot(out)
            result = check_outcome(lambda out=out: align_tree(src, out, spec, workers=1, progress=False),
                                   f"journal mutant {n} ({what})", outcomes)
            if result is None:
                assert snapshot(out) == before, f"journal mutant {n} ({what}) was refused after changing OUT"
            else:
                plausible(result, fresh=False)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["accepted"] > 10 and outcomes["refused"] > 10, outcomes
