"""Training sets beyond one folder: an insightface record file as data_dir, several datasets in one run, the
paper's cross-dataset setting (tools/cross_dataset.py) and the train/test overlap check (tools/check_overlap.py)."""
from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import train as finetune
from pipeline import sweep as evaluation
from helpers import demo_cfg, synthetic_world
from eval.overlap import best_matches
from pipeline import overlap_check as overlap_tool
from pipeline import cross_dataset
from facedata.prepare import prepare
from facedata.binfile import load_bin
from facedata.dataset import ImageDataset, RecordImage, scan_dataset, scan_training_data
from utils.errors import UserError
from facedata.recordio import write_identity_records


def same_checkpoints(a: Path, b: Path) -> int:
    """Every .pth of run folder ``a`` equals (exactly) the file of the same name in ``b``; returns how many."""
    files = sorted(p.name for p in a.glob("*.pth"))
    assert files == sorted(p.name for p in b.glob("*.pth"))
    for name in files:
        x, y = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        tensors = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}
        assert tensors and tensors.keys() == {k for k, v in y.items() if isinstance(v, torch.Tensor)}, name
        assert all(torch.equal(v, y[k]) for k, v in tensors.items()), name
    return len(files)


def record_file_of(folder: Path, rec: Path, unlabelled: int, junk_in: int) -> Path:
    """A .rec (insightface layout) of a subjectid_gender folder's images, plus its gender CSV (<stem>_genders.csv)
    without a row for identity ``unlabelled``; identity ``junk_in`` gets an extra record that is not an image."""
    index = scan_dataset(folder)
    identities = [[p.read_bytes() for p, label in zip(index.paths, index.labels) if label == k]
                  for k in range(index.num_identities)]
    identities[junk_in].insert(1, b"not an image at all")
    write_identity_records(rec, identities)
    rows = [f"{k},{'Female' if g else 'm'}" for k, g in enumerate(index.identity_gender) if k != unlabelled]
    genders = rec.with_name(f"{rec.stem}_genders.csv")
    genders.write_text("label, gender\r\n" + "\r\n".join(rows + ["999,f"]) + "\r\n")
    return genders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    synthetic_world(root, n_train_ids=12, imgs=4, n_test_ids=8, test_imgs=4, pairs=40, gender=32,
                    test_sets=("synth_a", "b"))
    return root


@pytest.mark.subprocess
def test_a_record_file_trains_to_the_checkpoints_of_its_prepared_folder(world, tmp_path):
    rec = tmp_path / "faces" / "train.rec"
    rec.parent.mkdir()
    genders = record_file_of(world / "train", rec, unlabelled=3, junk_in=10)
    prepared = tmp_path / "prepared"
    prepare("rec", rec, [genders], prepared)

    direct, folder = scan_training_data(str(rec)), scan_dataset(prepared)
    assert direct.folders == folder.folders and len(direct) == len(folder) == 44
    assert np.array_equal(direct.labels, folder.labels) and np.array_equal(direct.genders, folder.genders)
    assert [direct.paths[i].read_bytes() for i in range(len(direct))] == [p.read_bytes() for p in folder.paths]
    notes = " ".join(direct.sources[0].notes)
    assert "left out 1 identities without a row in train_genders.csv (labels 3)" in notes
    assert "skipped 1 records" in notes and "1 labels of train_genders.csv are not identities" in notes
    # what DataLoader workers receive: the items pickle without an open file and decode the same images
    dataset = pickle.loads(pickle.dumps(ImageDataset(direct.paths)))
    assert torch.equal(dataset[5][1], ImageDataset(folder.paths)[5][1]) and dataset[5][3] == ""
    assert str(direct.paths[0]) == f"{rec} record 1"

    common = ["num_epoch=2", "checkpoint_every=1", "batch_size=16", "cache=True", f"log_dir={tmp_path / 'logs'}",
              f"cache_dir={tmp_path / 'cache'}"]   # a cache of its own: the miss and hit below are this test's
    a = finetune.train(demo_cfg(world, *common, f"data_dir={prepared}", f"checkpoint_root={tmp_path / 'a'}"))
    b = finetune.train(demo_cfg(world, *common, f"data_dir={rec}", f"checkpoint_root={tmp_path / 'b'}",
                                "num_workers=2"))
    assert a.step == b.step == 4 and same_checkpoints(a.checkpoint_dir, b.checkpoint_dir) == 5
    log = (b.log_dir / "training.log").read_text()
    assert "left out 1 identities without a row" in log and "template cache miss" in log
    again = finetune.train(demo_cfg(world, *common, f"data_dir={rec}", f"checkpoint_root={tmp_path / 'c'}"))
    assert "template cache hit" in (again.log_dir / "training.log").read_text()

    # rec_genders names the CSV elsewhere; a missing CSV is named with the option
    moved = tmp_path / "elsewhere.csv"
    shutil.copy(genders, moved)
    assert len(scan_training_data(rec, moved)) == 44
    genders.unlink()
    with pytest.raises(UserError, match=r"train_genders\.csv.*does not exist.*rec_genders"):
        scan_training_data(rec)


def test_record_file_errors_are_named_before_any_compute(tmp_path, world):
    rec = tmp_path / "train.rec"
    genders = record_file_of(world / "train", rec, unlabelled=0, junk_in=0)
    genders.write_text("label,gender\n0,f\n1,maybe\n2,\n")
    with pytest.raises(UserError, match=r"train_genders\.csv.*2 row\(s\) do not: line 3.*line 4"):
        scan_training_data(rec)
    genders.write_text("id,sex\n0,f\n")
    with pytest.raises(UserError, match="first row has the columns"):
        scan_training_data(rec)
    genders.write_text("label,gender\n" + "".join(f"{k},f\n" for k in range(12)))
    with pytest.raises(UserError, match="all 12 identities kept are of gender 1"):
        scan_training_data(rec)
    with pytest.raises(UserError, match=r"holds no identity folders.*record file train\.rec.*set data_dir"):
        scan_training_data(tmp_path)


def test_two_sources_keep_their_identities_apart_and_are_logged(world, tmp_path):
    a, b = world / "train", world / "test" / "b"          # both name their folders 00000_g, 00001_g, ...
    index = scan_training_data([str(a), str(b)])
    first, second = scan_dataset(a), scan_dataset(b)
    assert first.folders[0][:5] == second.folders[0][:5] == "00000"
    assert index.num_identities == first.num_identities + second.num_identities == 20
    assert index.labels.tolist() == first.labels.tolist() + (second.labels + 12).tolist()
    assert index.folders[12] == f"b/{second.folders[0]}" and index.paths[48] == second.paths[0]
    assert [s.summary() for s in index.sources] == [f"{a}: 12 identities, 48 images", f"{b}: 8 identities, 32 images"]

    res = finetune.train(demo_cfg(world, f"data_dir={[str(a), str(b)]!r}", "num_epoch=1", "batch_size=16",
                                  f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}",
                                  f"cache_dir={tmp_path / 'cache'}"))
    log = (res.log_dir / "training.log").read_text()
    assert f"source {a}: 12 identities, 48 images" in log and f"source {b}: 8 identities, 32 images" in log
    header = torch.load(res.checkpoint_dir / f"{res.step}header.pth", weights_only=True)
    assert header["kernel"].shape == (512, 20)
    with open(res.log_dir / "config.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["data_sources"] == index.summary()

    # a record file and a folder in one run; one source of a single gender is fine when the run has both
    rec = tmp_path / "faces" / "train.rec"
    rec.parent.mkdir()
    record_file_of(b, rec, unlabelled=0, junk_in=0)
    mixed = scan_training_data([a, rec])
    assert mixed.num_identities == 12 + 7 and isinstance(mixed.paths[48], RecordImage)
    assert mixed.name == "train+faces-train"
    one = tmp_path / "one_gender"
    shutil.copytree(b / second.folders[0], one / "x_1")
    assert scan_training_data([a, one]).num_identities == 13
    with pytest.raises(UserError, match="only gender 1"):
        scan_training_data(one)
    with pytest.raises(UserError, match="lists .* twice"):
        scan_training_data([a, Path(str(a) + "/")])
    with pytest.raises(UserError, match="empty list"):
        scan_training_data([])
    with pytest.raises(UserError, match="rec_genders names one gender CSV .* lists 0 .rec"):
        scan_training_data([a, b], tmp_path / "g.csv")
    with pytest.raises(UserError) as err:   # every source's problem in one message
        scan_training_data([tmp_path / "nowhere", tmp_path / "missing.rec"])
    assert "nowhere" in str(err.value) and "missing.rec" in str(err.value)


def test_best_matches_in_chunks_equal_the_whole_product_and_see_mirrored_copies():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(11, 2, 6)).astype(np.float32)
    train /= np.linalg.norm(train, axis=2, keepdims=True)
    probe = rng.normal(size=(7, 6)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    train[4, 1] = probe[5]                       # image 4 mirrored is probe 5
    best, arg = best_matches(train, probe, chunk=3)
    full = np.einsum("nfd,md->nfm", train, probe).max(axis=1)
    assert np.allclose(best, full.max(axis=1)) and np.array_equal(arg, full.argmax(axis=1))
    assert np.isclose(best[4], 1.0) and arg[4] == 5 and (np.delete(best, 4) < 0.95).all()


def test_overlap_check_finds_planted_duplicates_and_nothing_in_disjoint_data(world, tmp_path):
    clean = tmp_path / "train"
    shutil.copytree(world / "train", clean)
    planted = tmp_path / "planted"
    shutil.copytree(clean, planted)
    evalset = load_bin(world / "rec" / "synth_a.bin")
    (planted / "99999_1").mkdir()
    for k, data in enumerate([evalset.pair_images[0], evalset.pair_images[3]]):
        (planted / "99999_1" / f"copy{k}.png").write_bytes(data)
    image = cv2.imdecode(np.frombuffer(evalset.gender_images[2], np.uint8), cv2.IMREAD_COLOR)
    cv2.imwrite(str(planted / "99999_1" / "reencoded.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])

    assert overlap_tool.main(["--set", f"data_dir={clean}", *world_settings(world, tmp_path)]) == 0
    mine = tmp_path / "pairs.csv"   # a file of the user's at the --csv path is kept; the pairs go to pairs_2.csv
    mine.write_text("my own notes\n")
    argv = ["--set", f"data_dir={planted}", *world_settings(world, tmp_path), "--csv", str(mine)]
    assert overlap_tool.main(argv) == 1
    assert mine.read_text() == "my own notes\n"
    out = tmp_path / "pairs_2.csv"
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(Path(r["Training image"]).name for r in rows) == ["copy0.png", "copy1.png", "reencoded.jpg"]
    assert all(r["Identity"] == "99999_1" for r in rows)
    cosine = {Path(r["Training image"]).name: float(r["Cosine"]) for r in rows}
    assert cosine["copy0.png"] > 0.999 and cosine["copy1.png"] > 0.999 and 0.95 < cosine["reencoded.jpg"] < 0.9999
    assert {r["Evaluation image"] for r in rows} >= {"synth_a.bin bins[0]", "synth_a.bin bins[3]"}

    # training warns in its log, once the training templates and validation sets are loaded
    res = finetune.train(demo_cfg(world, f"data_dir={planted}", "num_epoch=1", "eval_step=1000", "batch_size=16",
                                  f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}",
                                  f"cache_dir={tmp_path / 'cache'}"))
    log = (res.log_dir / "training.log").read_text()
    assert "WARNING overlap check: 3 training images of 1 identities are near-duplicates (cosine >= 0.95)" in log


def world_settings(world: Path, tmp_path: Path) -> list[str]:
    """--set items of the synthetic world's backbone, evaluation set and a cache of the test's own."""
    backbone = world / "ckpt" / "Demo" / "reference" / "backbone.pth"
    return ["plugins=['synthetic']", "network=demo_decoder", f"output_ori={backbone}", f"rec={world / 'rec'}",
            "test_targets=['synth_a']", f"cache_dir={tmp_path / 'cache'}", "device=cpu", "num_workers=0"]


def test_cross_dataset_runs_every_fold_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
    synthetic_world(tmp_path, n_train_ids=2, n_test_ids=8, test_imgs=4, pairs=40, gender=32,
                    test_sets=("a", "b", "c", "d"))
    calls = {"train": 0, "evaluate": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(finetune, "train", counted("train", finetune.train))
    monkeypatch.setattr(evaluation, "evaluate_runs", counted("evaluate", evaluation.evaluate_runs))
    cfg = demo_cfg(tmp_path, "num_epoch=1", "batch_size=16", "eval_step=0")
    datasets = {"A": str(tmp_path / "test" / "a"), "B": str(tmp_path / "test" / "b"), "C": str(tmp_path / "test" / "c")}
    targets = {"A": "a", "B": "b", "C": "c"}
    results = tmp_path / "results"
    table, path = cross_dataset.cross_dataset(cfg, datasets, targets, "d", "Cross", results)
    assert calls == {"train": 4, "evaluate": 4}
    assert table["Held out"].tolist() == ["A", "B", "C", "(none)"]
    assert table["Trained on"].tolist() == ["B + C", "A + C", "A + B", "A + B + C"]
    assert table["Dataset"].tolist() == ["a", "b", "c", "d"]
    assert table["Step"].tolist() == [4, 4, 4, 6] and table["Near-duplicates"].tolist() == [0, 0, 0, 0]
    assert table[["EER", "TAR@FAR=0.1%", "BACC-Gender-AVG", "Backbone EER"]].notna().all().all()
    assert Path(table["Run"][0]) == tmp_path / "ckpt" / "Demo" / "Cross" / "B+C" / "20L1_1L2"
    assert (results / "Demo" / "CrossDataset" / "B+C" / "20L1_1L2" / "20L1_1L2_metrics.csv").is_file()
    first = path.read_text()

    again, _ = cross_dataset.cross_dataset(cfg, datasets, targets, "d", "Cross", results)
    assert calls == {"train": 4, "evaluate": 4} and path.read_text() == first
    assert again.equals(table)
    # a fold trained whose results are gone (deleted, or interrupted in its sweep) is only evaluated
    (results / "Demo" / "CrossDataset" / "A+C" / "20L1_1L2" / "20L1_1L2_metrics.csv").unlink()
    cross_dataset.cross_dataset(cfg, datasets, targets, "d", "Cross", results)
    assert calls == {"train": 4, "evaluate": 5} and path.read_text() == first

    assert cross_dataset.main(["--set", "plugins=['synthetic']", "--datasets", "A=x"]) == 2
    with pytest.raises(UserError, match="no evaluation set for C"):
        cross_dataset.cross_dataset(cfg, datasets, {"A": "a", "B": "b"}, None, "Cross", results)


def test_cross_dataset_rerun_with_runtime_options_changed_or_a_damaged_state(tmp_path, monkeypatch, capsys):
    """Another n_jobs or device retrains and re-evaluates nothing; a damaged fold state (not JSON, no 'run') is
    reported and that fold's finished run is adopted again (not retrained)."""
    synthetic_world(tmp_path, n_train_ids=2, n_test_ids=8, test_imgs=4, pairs=40, gender=32, test_sets=("a", "b"))
    calls = {"train": 0}
    real = finetune.train

    def counted(*args, **kwargs):
        calls["train"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(finetune, "train", counted)
    datasets = {"A": str(tmp_path / "test" / "a"), "B": str(tmp_path / "test" / "b")}
    results = tmp_path / "results"

    def run(*extra):
        cfg = demo_cfg(tmp_path, "num_epoch=1", "batch_size=16", "eval_step=0", *extra)
        return cross_dataset.cross_dataset(cfg, datasets, {"A": "a", "B": "b"}, None, "Cross", results)
    table, path = run("n_jobs=1", "device=cpu")
    first = path.read_text()
    assert calls["train"] == 2
    again, _ = run("n_jobs=2", "device=auto", "num_workers=1", "log_every=3")
    assert calls["train"] == 2 and path.read_text() == first

    states = results / ".experiments"
    damaged = next(states.glob("*_held_out_A_*.json"))
    for text, why in (("{not json", "JSONDecodeError"), (json.dumps({"fold": "heldout-A"}), "'run' entry")):
        damaged.write_text(text)
        capsys.readouterr()
        table3, _ = run()
        said = capsys.readouterr().out
        assert f"state file '{damaged}' is damaged" in said and why in said and "treated as not done" in said
        assert json.loads(damaged.read_text())["run"]          # replaced by a sound state
        assert table3["Step"].tolist() == table["Step"].tolist()
        assert "adopted the finished run" in said               # its run (same settings) is found, not retrained
    assert calls["train"] == 2
