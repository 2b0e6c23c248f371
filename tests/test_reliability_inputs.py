"""Hostile and broken inputs (issue 24): each gets one clear error naming the file, record or option, nothing of the
user's is overwritten and nothing partial is left; a seeded fuzzer of .rec/.idx mutants finds no traceback or hang."""
from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backbones import ProjectionLayer
from config.loading import load_config
from eval import leakage_cli
from eval.gender_leakage import leakage_report
from facedata.bin_builder import build_bin
from facedata.binfile import load_bin
from facedata.dataset import ImageDataset, scan_training_data
from facedata.prepare import LOG_NAME, prepare
from facedata.recordio import RecordWriter, write_identity_records
from helpers import demo_cfg, synthetic_world
from pipeline import sweep as evaluation
from pipeline.overlap_check import check_overlap
from privacy.runs import read_run_config
from utils.errors import UserError
from utils.io import first_free_number, free_path, numbered


def jpeg(seed: int, size: int = 16) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def face_folder(root: Path, n_ids: int = 4, per_id: int = 3) -> Path:
    """``n_ids`` subjectid_gender folders (genders alternating) of ``per_id`` small JPEGs."""
    for k in range(n_ids):
        folder = root / f"{k:02d}_{k % 2}"
        folder.mkdir(parents=True)
        for j in range(per_id):
            (folder / f"{j}.jpg").write_bytes(jpeg(10 * k + j))
    return root


def record_set(folder: Path, identities: int = 4, per_id: int = 2) -> tuple[Path, Path]:
    """A valid train.rec/.idx of ``identities`` identities and its gender CSV (genders alternating)."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / "train.rec"
    write_identity_records(rec, [[jpeg(10 * k + j) for j in range(per_id)] for k in range(identities)])
    genders = folder / "train_genders.csv"
    genders.write_text("label,gender\n" + "".join(f"{k},{'fm'[k % 2]}\n" for k in range(identities)))
    return rec, genders


# ---------------------------------------------------------------- one "next free _2 name" rule; nothing overwritten

def test_free_names_never_replace_anything(tmp_path):
    f = tmp_path / "result.csv"
    assert free_path(f) == f
    f.write_text("mine")
    (tmp_path / "result_2.csv").mkdir()                   # an empty folder still takes a file's name
    os.symlink(tmp_path / "nowhere", tmp_path / "result_3.csv")   # so does a dangling link
    assert free_path(f) == tmp_path / "result_4.csv"
    run = tmp_path / "lr0.1"                               # folders: a dot is part of the name, not an extension
    (run / "x").mkdir(parents=True)
    assert free_path(run, folder=True) == tmp_path / "lr0.1_2"
    (tmp_path / "lr0.1_2").mkdir()                         # an empty folder is reused
    assert free_path(run, folder=True) == tmp_path / "lr0.1_2"
    logs = tmp_path / "logs" / "lr0.1"
    (logs.parent / "lr0.1_2" / "training.log").parent.mkdir(parents=True)
    (logs.parent / "lr0.1_2" / "training.log").write_text("")
    # a run's checkpoint and log folders take one number: the first free for both
    assert first_free_number([run, logs], folder=True) == 3
    assert numbered(logs, 3, folder=True) == logs.parent / "lr0.1_3"


def test_check_overlap_refuses_an_existing_csv_before_any_work(tmp_path):
    mine = tmp_path / "pairs.csv"
    mine.write_text("my notes\n")
    with pytest.raises(UserError, match=r"--csv '.*pairs\.csv' already exists.*never overwritten"):
        check_overlap(load_config(None, ["test_targets=[]"]), csv_path=mine)
    assert mine.read_text() == "my notes\n"


# ---------------------------------------------------------------- leakage: scale, files, options

def separable(n_ids: int = 12, per_id: int = 4, dim: int = 8):
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(n_ids), per_id)
    genders = ids % 2
    x = rng.normal(size=(len(ids), dim)) + 6.0 * np.where(genders[:, None] == 1, 1.0, -1.0) * np.eye(dim)[0]
    return x, genders, ids


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_leakage_of_extreme_but_finite_templates_equals_normal_scale(scale):
    x, g, ids = separable()
    normal = leakage_report(x, g, ids, attackers=["LogReg"], n_bootstrap=0).bacc["LogReg"]
    assert normal == 1.0
    assert leakage_report(x * scale, g, ids, attackers=["LogReg"], n_bootstrap=0).bacc["LogReg"] == normal


def test_leakage_tells_zero_rows_from_nan_rows():
    x, g, ids = separable()
    zero, nan = x.copy(), x.copy()
    zero[3] = 0.0
    nan[5, 2] = np.nan
    with pytest.raises(UserError, match=r"1 template row\(s\) hold only zeros \(rows 3"):
        leakage_report(zero, g, ids, attackers=["LogReg"], n_bootstrap=0)
    with pytest.raises(UserError, match=r"1 template row\(s\) hold NaN or infinite values \(rows 5"):
        leakage_report(nan, g, ids, attackers=["LogReg"], n_bootstrap=0)


def test_leakage_tool_names_a_lying_npy_header_and_bad_options(tmp_path, capsys):
    import numpy.lib.format as npformat
    x, g, ids = separable()
    good, labels = tmp_path / "t.npy", tmp_path / "l.csv"
    np.save(good, x)
    labels.write_text("identity,gender\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, g)))
    lying = tmp_path / "huge.npy"
    with open(lying, "wb") as fh:   # claims 10^15 float64 values, holds 64 bytes
        npformat.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (10 ** 12, 1000)})
        fh.write(b"\0" * 64)
    for argv, fragment in (([f"--templates={lying}"], "huge.npy' could not be read"),
                           ([f"--templates={good}", "--n-jobs", "0"], "--n-jobs 0"),
                           ([f"--templates={good}", "--seed", "-1"], "--seed -1")):
        assert leakage_cli.main([*argv, f"--labels={labels}", f"--out={tmp_path}", "--bootstrap=0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not list(tmp_path.glob("*_leakage*.csv"))


# ---------------------------------------------------------------- make_bin / prepare_dataset options and paths

def test_bin_options_are_named_with_their_allowed_values(tmp_path):
    faces = face_folder(tmp_path / "faces")   # 12 images: 6 of each gender
    for kwargs, message in (({"n_pairs": 0}, r"--n-pairs 0: .* at least 1"),
                            ({"n_pairs": -3}, r"--n-pairs -3: .* at least 1"),
                            ({"n_gender": 100000}, r"--n-gender 100000 asks for 50000 images of each gender.* 6 of "
                                                   r"gender 0 and 6 of gender 1\. Choose --n-gender 12 or less"),
                            ({"n_gender": 0}, r"--n-gender 0: .* at least 2")):
        with pytest.raises(UserError, match=message):
            build_bin(faces, tmp_path / "x.bin", n_pairs=kwargs.get("n_pairs", 20), n_gender=kwargs.get("n_gender", 4))
        assert not (tmp_path / "x.bin").exists()
    assert len(load_bin(build_bin(faces, tmp_path / "ok.bin", n_pairs=20, n_gender=12)).gender_labels) == 12
    with pytest.raises(UserError, match=r"--out '.*ok\.bin/x\.bin' cannot be created: '.*ok\.bin' is a file"):
        build_bin(faces, tmp_path / "ok.bin" / "x.bin", n_pairs=20, n_gender=4)


def lfw_like(root: Path) -> tuple[Path, list[Path]]:
    for name in ("Ann_Lee", "Bo_Kim", "Cy_Ng", "Di_Ho"):
        (root / name).mkdir(parents=True)
        for j in (1, 2):
            (root / name / f"{name}_{j:04d}.jpg").write_bytes(jpeg(len(name) * 10 + j))
    female, male = root.parent / "female_names.txt", root.parent / "male_names.txt"
    female.write_text("Ann_Lee_0001.jpg\nCy_Ng_0001.jpg\n")
    male.write_text("Bo_Kim_0001.jpg\nDi_Ho_0001.jpg\n")
    return root, [female, male]


def test_prepare_paths_and_labels_named_before_any_work(tmp_path):
    images, labels = lfw_like(tmp_path / "lfw" / "images")
    with pytest.raises(UserError, match=r"--pairs -5: .* at least 1"):
        prepare("lfw", images, labels, tmp_path / "o1", bin_path=tmp_path / "o1.bin", n_pairs=-5)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=r"--out '.*a_file/sub' cannot be created: '.*a_file' is a file"):
        prepare("lfw", images, labels, a_file / "sub")
    with pytest.raises(UserError, match=r"label file '.*lfw' \(--labels\) is a folder"):
        prepare("lfw", images, [tmp_path / "lfw"], tmp_path / "o2")
    assert not any((tmp_path / name).exists() for name in ("o1", "o1.bin", "o2"))


def test_link_loops_and_dangling_links_are_named_or_counted(tmp_path):
    images, labels = lfw_like(tmp_path / "lfw" / "images")
    os.symlink("self.jpg", images / "Ann_Lee" / "self.jpg")                 # a link to itself
    os.symlink("b.jpg", images / "Bo_Kim" / "a.jpg")                        # two links to each other
    os.symlink("a.jpg", images / "Bo_Kim" / "b.jpg")
    os.symlink(tmp_path / "gone.jpg", images / "Cy_Ng" / "Cy_Ng_0009.jpg")  # dangling
    out = tmp_path / "out"
    result = prepare("lfw", images, labels, out)
    assert len(result.kept) == 4 and "skipped 4 broken symbolic links" in (out / LOG_NAME).read_text()

    train = face_folder(tmp_path / "train")
    os.symlink("loop.jpg", train / "00_0" / "loop.jpg")
    os.symlink(tmp_path / "gone.jpg", train / "01_1" / "gone.jpg")
    os.symlink("02_0x", train / "02_0x")
    with pytest.raises(UserError) as err:
        scan_training_data(train)
    text = str(err.value)
    assert "3 problem(s)" in text and "'00_0/loop.jpg': a broken symbolic link" in text
    assert "'01_1/gone.jpg': a broken symbolic link" in text and "'02_0x': a broken symbolic link" in text


# ---------------------------------------------------------------- record files with impossible labels

def rec_with(folder: Path, header: tuple[float, ...], identity_labels: list[tuple[float, float]],
             image_labels: list[float]) -> Path:
    folder.mkdir(parents=True)
    rec = folder / "train.rec"
    with RecordWriter(rec) as w:
        w.write(0, header)
        for key, label in enumerate(image_labels, start=1):
            w.write(key, label, jpeg(key))
        for k, labels in enumerate(identity_labels):
            w.write(len(image_labels) + 1 + k, labels)
    (folder / "train_genders.csv").write_text("label,gender\n0,f\n1,m\n")
    return rec


@pytest.mark.parametrize("case, header, identities, message", [
    ("nan-header", (float("nan"), 7.0), [(1.0, 3.0), (3.0, 5.0)], r"header record 0 has label nan, not a whole"),
    ("inf-identity", (5.0, 7.0), [(1.0, float("inf")), (3.0, 5.0)], r"identity record 5 has label inf, not a whole"),
    ("fraction", (5.0, 7.0), [(1.0, 3.0), (3.0, 4.5)], r"identity record 6 has label 4\.5, not a whole"),
    ("no-identities", (5.0, 5.0), [], r"holds no identity: its header record names no identity records"),
    ("keys-missing", (5.0, 7.0), [(1.0, 3.0), (3.0, 5.0)], None),
])
def test_impossible_record_labels_are_named_in_preparation_and_training(tmp_path, case, header, identities, message):
    rec = rec_with(tmp_path / case, header, identities, [0.0, 0.0, 1.0, 1.0])
    if message is None:   # an identity record naming image keys the index lacks
        idx = rec.with_suffix(".idx")
        idx.write_text("".join(line + "\n" for line in idx.read_text().splitlines() if not line.startswith("4\t")))
        message = r"identity record 6 names image records 3\.\.4, of which 1 are not in its index"
    with pytest.raises(UserError, match=message):
        prepare("rec", rec, [rec.with_name("train_genders.csv")], tmp_path / f"{case}-out")
    with pytest.raises(UserError, match=message):
        scan_training_data(rec)
    assert not (tmp_path / f"{case}-out").exists()


def test_flat_record_file_with_a_fractional_label_is_refused(tmp_path):
    rec = tmp_path / "flat.rec"
    with RecordWriter(rec) as w:
        for key, label in enumerate([0.0, 16.5, 1.0]):
            w.write(key, label, jpeg(key))
    (tmp_path / "flat_genders.csv").write_text("label,gender\n0,f\n1,m\n16,m\n")
    with pytest.raises(UserError, match=r"flat\.rec': record 1 has label 16\.5, not a whole number"):
        scan_training_data(rec)


def test_rec_gender_csv_parsed_once_for_training_and_preparation(tmp_path):
    """One reading of the gender CSV (facedata/record_identities.py): the same rows refused by both callers."""
    rec, genders = record_set(tmp_path / "faces")
    genders.write_text("label,gender\n0,f\n1,maybe\n2,\n")
    for call in (lambda: scan_training_data(rec), lambda: prepare("rec", rec, [genders], tmp_path / "o")):
        with pytest.raises(UserError, match=r"train_genders\.csv.*2 row\(s\) do not: line 3: '1,maybe'; line 4"):
            call()


# ---------------------------------------------------------------- run descriptions and broken checkpoints

def test_run_json_whose_config_is_a_list_is_named(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "method": "angular", "config": [1, 2]}))
    with pytest.raises(UserError, match=r"run description '.*run\.json' is not readable .*'config' is a list"):
        read_run_config(tmp_path)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken_ckpt")
    synthetic_world(root, n_train_ids=4, imgs=2, n_test_ids=12, test_imgs=3, pairs=40, gender=24)
    return root


@pytest.mark.parametrize("weights, said", [(float("nan"), "contain NaN or infinite values"), (0.0, "are zero")])
def test_broken_checkpoint_is_named_with_its_run_and_file(small_world, tmp_path, weights, said):
    run = tmp_path / "ckpt" / "Exp" / "Synth" / "broken_run"
    run.mkdir(parents=True)
    layer = ProjectionLayer(512, 512, 2)
    torch.save({k: torch.full_like(v, weights) for k, v in layer.state_dict().items()}, run / "4ftn_layers.pth")
    cfg = demo_cfg(small_world)
    with pytest.raises(UserError) as err:
        evaluation.evaluate(cfg, tmp_path / "out", tmp_path / "ckpt", "Exp/Synth", tmp_path / "reference.csv")
    text = str(err.value)
    assert said in text and f"checkpoint '{run / '4ftn_layers.pth'}' of run 'broken_run'" in text, text
    assert "'synth_a'" in text and not list((tmp_path / "out").rglob("*_metrics.csv"))


# ---------------------------------------------------------------- the .rec mutation fuzzer

SPECIAL = [float("nan"), float("inf"), float("-inf"), 16.5, -1.0, 0.0, 1e9, 3e38, 2.0 ** 24]


def label_fields(idx: str) -> list[int]:
    """Offsets of every record's label fields in the .rec: the IRHeader's label and the first two extra labels (the
    header and identity records keep theirs there), so that the fuzzer damages labels often, not by chance alone."""
    starts = [int(line.split("\t")[1]) + 8 for line in idx.splitlines()]
    return [start + k for start in starts for k in (4, 24, 28)]


def mutate(rec: bytes, idx: str, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """One seeded damage to a .rec/.idx pair, and what it was (for the failure message)."""
    data, lines = bytearray(rec), idx.splitlines()
    fields = [p for p in label_fields(idx) if p + 4 <= len(data)]
    kind = int(rng.integers(8))
    if kind == 0:     # random bytes flipped
        for pos in rng.integers(0, len(data), int(rng.integers(1, 5))):
            data[pos] ^= int(rng.integers(1, 256))
        return bytes(data), idx, "flipped bytes"
    if kind == 1:     # a float32 at a 4-byte-aligned offset (labels sit there) replaced by an impossible value
        pos = int(rng.choice(fields)) if rng.random() < 0.8 else 4 * int(rng.integers(0, len(data) // 4))
        value = SPECIAL[int(rng.integers(len(SPECIAL)))]
        data[pos:pos + 4] = struct.pack("<f", value)
        return bytes(data), idx, f"float {value} at {pos}"
    if kind == 2:     # a uint32 (magic, lengths, label counts) replaced by an extreme value
        pos = int(rng.choice(fields)) - 4 if rng.random() < 0.5 else 4 * int(rng.integers(0, len(data) // 4))
        data[pos:pos + 4] = struct.pack("<I", int(rng.choice([0, 1, 0xFFFFFFFF, 1 << 29, (1 << 29) - 1, 3 << 29])))
        return bytes(data), idx, f"uint32 at {pos}"
    if kind == 3:     # truncated
        cut = int(rng.integers(0, len(data)))
        return bytes(data[:cut]), idx, f"truncated at {cut}"
    if kind == 4:     # an index line dropped or duplicated
        i = int(rng.integers(len(lines)))
        lines = lines[:i] + lines[i + 1:] if rng.random() < 0.5 else lines[:i + 1] + lines[i:]
        return bytes(data), "\n".join(lines) + "\n", f"index line {i} dropped/duplicated"
    if kind == 5:     # an index offset moved
        i = int(rng.integers(len(lines)))
        key, offset = lines[i].split("\t")
        lines[i] = f"{key}\t{int(offset) + int(rng.integers(-40, 40))}"
        return bytes(data), "\n".join(lines) + "\n", f"offset of index line {i} moved"
    if kind == 6:     # an index key changed
        i = int(rng.integers(len(lines)))
        key, offset = lines[i].split("\t")
        lines[i] = f"{int(rng.integers(-3, 40))}\t{offset}"
        return bytes(data), "\n".join(lines) + "\n", f"key of index line {i} changed"
    garbage = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()   # garbage appended/inserted
    pos = int(rng.integers(0, len(data)))
    return bytes(data[:pos] + garbage + data[pos:]), idx, f"{len(garbage)} bytes inserted at {pos}"


def _hang(signum, frame):
    raise TimeoutError("a mutant took over 20 s")


def test_rec_mutation_fuzzer_finds_no_traceback_and_no_hang(tmp_path):
    rec, genders = record_set(tmp_path / "valid", identities=4, per_id=2)
    assert struct.unpack_from("<2f", rec.read_bytes(), label_fields(rec.with_suffix(".idx").read_text())[1]) == (9, 13)
    original, index = rec.read_bytes(), rec.with_suffix(".idx").read_text()
    rng = np.random.default_rng(2024)
    outcomes = {"accepted": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _hang)
    try:
        for n in range(300):
            data, idx, what = mutate(original, index, rng)
            folder = tmp_path / f"m{n}"
            folder.mkdir()
            (folder / "train.rec").write_bytes(data)
            (folder / "train.idx").write_text(idx)
            (folder / "train_genders.csv").write_bytes(genders.read_bytes())
            for stage in ("prepare", "training scan"):
                signal.alarm(20)
                try:
                    if stage == "prepare":
                        prepare("rec", folder, [folder / "train_genders.csv"], tmp_path / f"out{n}")
                    else:
                        items = scan_training_data(folder / "train.rec").paths
                        dataset = ImageDataset(items)   # what training decodes: damage becomes a per-image error
                        assert all(len(dataset[i]) == 4 for i in range(len(dataset)))
                    outcomes["accepted"] += 1
                except UserError as exc:
                    assert str(exc) and "\n" not in str(exc).strip(), (n, what, stage, str(exc))
                    outcomes["refused"] += 1
                except Exception as exc:   # noqa: BLE001 - the fuzzer's finding, reported with its mutant
                    pytest.fail(f"mutant {n} ({what}), {stage}: {type(exc).__name__}: {exc}")
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    # the mutants exercise both outcomes: a fuzzer whose mutants are all refused (or all harmless) tests little
    assert outcomes["accepted"] > 50 and outcomes["refused"] > 50, outcomes
