import csv
import hashlib
import io

import pytest
import torch

from pipeline import train as finetune
from backbones import ProjectionLayer
from pipeline import sweep as evaluation
from helpers import demo_cfg, synthetic_world
from utils.errors import UserError

COLUMNS = ["Step", "Dataset", "EER", "TAR@FAR=0.1%", "BACC-Gender-LogReg", "BACC-Gender-SVM", "BACC-Gender-RBF",
           "BACC-Gender-AVG", "PIC"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic world with two runs of several checkpoints each."""
    root = tmp_path_factory.mktemp("evalworld")
    synthetic_world(root, n_train_ids=40, imgs=4, test_sets=("synth_a", "synth_b"), pairs=200, gender=96)
    for alpha in (20, 5):
        finetune.train(demo_cfg(root, f"alpha={alpha}", "num_epoch=6", "checkpoint_every=2",
                                "test_targets=['synth_a','synth_b']"))
    return root


def sweep(root, out, *extra, force=False):
    cfg = demo_cfg(root, "test_targets=['synth_a','synth_b']", *extra)
    return evaluation.evaluate(cfg, out, root / "ckpt" / "Demo", "Exp/Synth", out / "reference.csv", force=force)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "evaluate.log"}


def test_full_sweep_writes_csvs_report_plots_and_is_idempotent(trained, tmp_path):
    out_dir = sweep(trained, tmp_path)
    assert out_dir == tmp_path / "Exp/Synth"
    for run in ("20L1_1L2", "5L1_1L2"):
        with open(out_dir / f"{run}_metrics.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
        assert reader.fieldnames == COLUMNS
        assert [(r["Step"], r["Dataset"]) for r in rows] == [(s, d) for s in ("10", "20", "30")
                                                             for d in ("synth_a", "synth_b")]
        for r in rows:
            vals = [float(r[c]) for c in COLUMNS[2:]]
            assert all(v == v for v in vals)  # no NaN
            assert 0 <= float(r["EER"]) <= 1 and 0 <= float(r["BACC-Gender-AVG"]) <= 1
        (out_dir / f"{run}_curves.png").stat()
        (out_dir / f"{run}_angles.png").stat()
    ref = (tmp_path / "reference.csv").read_text().splitlines()
    assert ref[0] == "Dataset,EER,TAR@FAR=0.1%,BACC-Gender-LogReg,BACC-Gender-SVM,BACC-Gender-RBF,BACC-Gender-AVG"
    assert len(ref) == 3
    report = (out_dir / "report.md").read_text()
    assert "bare backbone" in report and "20L1_1L2" in report and "tradeoff.png" in report
    assert "computed the bare backbone's results" in (out_dir / "evaluate.log").read_text()
    assert (out_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    # a second invocation adds nothing and changes nothing
    before = digest(out_dir) | {"ref": hashlib.sha256((tmp_path / "reference.csv").read_bytes()).hexdigest()}
    sweep(trained, tmp_path)
    after = digest(out_dir) | {"ref": hashlib.sha256((tmp_path / "reference.csv").read_bytes()).hexdigest()}
    assert after == before  # CSVs, reference, report.md and every plot byte for byte
    assert "already in" in (out_dir / "evaluate.log").read_text()


def test_metrics_equal_a_direct_evaluation_of_the_layer(trained, tmp_path):
    """The sweep's numbers for a checkpoint equal evaluating layer(normalize(backbone(x))) on decoded images."""
    from backbones import load_backbone, load_projection
    from facedata.binfile import load_bin
    from facedata.dataset import decode_image, to_tensor
    from eval.verification import evaluate_verification
    from eval.gender_leakage import gender_leakage
    out_dir = sweep(trained, tmp_path)
    es = load_bin(trained / "rec" / "synth_b.bin")
    net = load_backbone("demo_decoder", trained / "ckpt" / "Demo" / "reference" / "backbone.pth")
    layer = load_projection(trained / "ckpt/Demo/Exp/Synth/5L1_1L2/20ftn_layers.pth")
    with torch.no_grad():
        x = torch.stack([to_tensor(decode_image(d)[0]) for d in es.pair_images])
        model = lambda t: layer(torch.nn.functional.normalize(net(t)))  # noqa: E731
        ver = (model(x) + model(x.flip(3))).double().numpy()
        g = torch.stack([to_tensor(decode_image(d)[0]) for d in es.gender_images])
        gen = model(g).double().numpy()
    res = evaluate_verification(ver, es.issame)
    bacc = gender_leakage(gen, es.gender_labels, es.id_labels)
    with open(out_dir / "5L1_1L2_metrics.csv", newline="") as fh:
        row = [r for r in csv.DictReader(fh) if r["Step"] == "20" and r["Dataset"] == "synth_b"][0]
    assert float(row["EER"]) == pytest.approx(res.eer, abs=2e-3)
    assert float(row["TAR@FAR=0.1%"]) == pytest.approx(res.tar, abs=2e-2)
    assert float(row["BACC-Gender-AVG"]) == pytest.approx(bacc["AVG"], abs=2e-2)


def test_force_recomputes_and_keeps_one_row_per_checkpoint(trained, tmp_path):
    out_dir = sweep(trained, tmp_path)
    path = out_dir / "20L1_1L2_metrics.csv"
    true_rows = path.read_text().splitlines()
    tampered = true_rows[1].split(",")
    tampered[2] = "0.987654"                           # a value the sweep cannot have computed
    path.write_text("\n".join([true_rows[0], ",".join(tampered), *true_rows[2:]]) + "\n")
    sweep(trained, tmp_path)                           # resuming keeps the rows it finds ...
    assert "0.987654" in path.read_text()
    sweep(trained, tmp_path, force=True)               # ... --force computes every one again
    rows = path.read_text().splitlines()
    assert rows == true_rows and len(rows) == 7 and rows.count(rows[0]) == 1


def test_reference_problems_are_clear(trained, tmp_path):
    ref = tmp_path / "reference.csv"
    ref.write_text("Dataset,EER,TAR@FAR=0.1%,BACC-Gender-LogReg,BACC-Gender-SVM,BACC-Gender-RBF,BACC-Gender-AVG\n"
                   "synth_a,0.05,0.5,0.9,0.9,0.9,0.9\n")
    with pytest.raises(UserError, match="no row for dataset 'synth_b'"):
        sweep(trained, tmp_path)
    ref.write_text(ref.read_text() + "synth_b,abc,0.5,0.9,0.9,0.9,0.9\n")
    with pytest.raises(UserError, match="'abc' is not a number"):
        sweep(trained, tmp_path)
    ref.write_text("Dataset,EER\nsynth_a,0.1\nsynth_b,0.1\n")
    with pytest.raises(UserError, match="lacks the column"):
        sweep(trained, tmp_path)
    assert not (tmp_path / "Exp/Synth/20L1_1L2_metrics.csv").exists()


def test_missing_bin_corrupt_and_misshaped_checkpoints(trained, tmp_path):
    with pytest.raises(UserError, match="nope.bin"):
        sweep(trained, tmp_path, "test_targets=['synth_a','nope']")
    bad_root = tmp_path / "models"
    run = bad_root / "Exp" / "Synth" / "run1"
    run.mkdir(parents=True)
    (run / "10ftn_layers.pth").write_bytes(b"garbage, not a checkpoint")
    cfg = demo_cfg(trained, "test_targets=['synth_a']")
    with pytest.raises(UserError, match="10ftn_layers.pth"):
        evaluation.evaluate(cfg, tmp_path / "out", bad_root, "Exp/Synth", tmp_path / "out" / "ref.csv")
    torch.save(ProjectionLayer(256, 256).state_dict(), run / "10ftn_layers.pth")
    with pytest.raises(UserError, match="does not fit ProjectionLayer"):
        evaluation.evaluate(cfg, tmp_path / "out", bad_root, "Exp/Synth", tmp_path / "out" / "ref.csv")
    with pytest.raises(UserError, match="no folder"):
        evaluation.evaluate(cfg, tmp_path / "out", bad_root, "Exp/Other", tmp_path / "out" / "ref.csv")


def test_foreign_csv_is_refused_not_overwritten(trained, tmp_path):
    out_dir = tmp_path / "Exp/Synth"
    out_dir.mkdir(parents=True)
    foreign = out_dir / "20L1_1L2_metrics.csv"
    foreign.write_text("my,own,file\n1,2,3\n")
    with pytest.raises(UserError, match="not one of this tool's files"):
        sweep(trained, tmp_path)
    assert foreign.read_text() == "my,own,file\n1,2,3\n"


@pytest.mark.subprocess
def test_cli_accepts_both_spellings(trained, tmp_path, capsys):
    common = ["--set", "plugins=['synthetic']", "network=demo_decoder", f"rec={trained / 'rec'}",
              f"cache_dir={trained / 'cache'}", f"output_ori={trained / 'ckpt/Demo/reference/backbone.pth'}",
              "test_targets=['synth_a']", "num_workers=0"]
    code = evaluation.main(["--log_root", str(tmp_path / "a"), "--model_root", str(trained / "ckpt/Demo"),
                            "--experiment_name", "Exp/Synth", "--reference_pth", str(tmp_path / "ref.csv"), *common])
    assert code == 0 and (tmp_path / "a/Exp/Synth/5L1_1L2_metrics.csv").is_file()
    code = evaluation.main(["--log-root", str(tmp_path / "b"), "--model-root", str(trained / "ckpt/Demo"),
                            "--experiment-name", "Exp/Missing", "--reference-pth", str(tmp_path / "ref.csv"), *common])
    err = capsys.readouterr().err
    assert code == 2 and "error: no folder" in err and "Traceback" not in err


def test_unwritable_log_root_and_missing_backbone_fail_before_compute(trained, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        sweep(trained, blocker)
    with pytest.raises(UserError, match="backbone weights not found"):
        sweep(trained, tmp_path / "out", f"output_ori={tmp_path / 'missing.pth'}")
    assert not list((tmp_path / "out").rglob("*.csv"))


def test_near_chance_bare_backbone_is_warned_in_training_and_the_sweep(tmp_path, caplog):
    """A randomly initialised backbone on a .bin is what a wrong layout or normalisation looks like."""
    import logging
    from backbones import iresnet18
    synthetic_world(tmp_path, n_train_ids=4, imgs=2, n_test_ids=20, test_imgs=3, pairs=100, gender=48)
    torch.manual_seed(0)
    torch.save(iresnet18().state_dict(), tmp_path / "random_r18.pth")
    random_net = ["network=iresnet18", f"output_ori={tmp_path / 'random_r18.pth'}", "eval_step=100", "num_epoch=1",
                  "batch_size=8", "checkpoint_every=1"]
    with caplog.at_level(logging.WARNING):
        res = finetune.train(demo_cfg(tmp_path, *random_net))
    warned = [r.getMessage() for r in caplog.records if "near chance" in r.getMessage()]
    assert len(warned) == 1 and "synth_a" in warned[0] and "tools/identify_backbone.py" in warned[0]
    assert "near chance" in (res.log_dir / "training.log").read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluation.evaluate(demo_cfg(tmp_path, *random_net), tmp_path / "res", tmp_path / "ckpt" / "Demo",
                            "Exp/Synth", tmp_path / "ref.csv")
    assert any("near chance" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):   # the right backbone on the same files: no warning
        finetune.train(demo_cfg(tmp_path, "eval_step=100", "num_epoch=1", "batch_size=8"))
    assert not any("near chance" in r.getMessage() for r in caplog.records)


def test_report_survives_checkpoints_deleted_after_they_were_swept(trained, tmp_path):
    """A user who keeps only the last checkpoint: its rows stay in the CSV and the report is still written."""
    import shutil
    models = tmp_path / "models"
    shutil.copytree(trained / "ckpt" / "Demo" / "Exp" / "Synth" / "5L1_1L2", models / "Exp" / "Synth" / "5L1_1L2")
    cfg = demo_cfg(trained, "test_targets=['synth_a','synth_b']")
    out = evaluation.evaluate(cfg, tmp_path / "res", models, "Exp/Synth", tmp_path / "ref.csv")
    with open(out / "5L1_1L2_metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Dataset"] == "synth_a"]
    best = max(rows, key=lambda r: float(r["PIC"]))["Step"]
    (models / "Exp" / "Synth" / "5L1_1L2" / f"{best}ftn_layers.pth").unlink()   # the one the report would plot
    (out / "report.md").unlink()
    evaluation.evaluate(cfg, tmp_path / "res", models, "Exp/Synth", tmp_path / "ref.csv")
    assert f"step {best}" in (out / "report.md").read_text()   # still in the table: its row was swept
    assert (out / "5L1_1L2_angles.png").is_file()


def test_result_file_appends_each_jobs_rows_without_reading_the_file_again(tmp_path, monkeypatch):
    """Rows go to the end of the file as they come (the file is parsed once, when opened), with the bytes of writing
    them all at once; a replaced row (--force) moves to the end; a last line cut by a kill is dropped on opening."""
    path, columns = tmp_path / "run_metrics.csv", ["Step", "Dataset", "EER"]
    rows = [{"Step": str(s), "Dataset": d, "EER": f"0.{s}{k}"} for s in range(4) for k, d in enumerate("ab")]
    file = evaluation.ResultFile(path, columns, ("Step", "Dataset"), "metrics file")

    def whole(items: list[dict]) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(items)
        return buf.getvalue()
    with monkeypatch.context() as m:
        m.setattr(evaluation.csv, "DictReader", None)   # adding rows never parses the file
        for row in rows:
            file.add([row])
        assert path.read_text() == whole(rows)
        again = {**rows[2], "EER": "0.9"}
        file.add([again])
        assert path.read_text() == whole([r for r in rows if r is not rows[2]] + [again])
    path.write_text(whole(rows)[:-3])                  # killed while appending the last row
    reopened = evaluation.ResultFile(path, columns, ("Step", "Dataset"), "metrics file")
    assert ("3", "b") not in reopened and ("3", "a") in reopened and path.read_text() == whole(rows[:-1])
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not one of this tool's files"):
        evaluation.ResultFile(path, columns, ("Step", "Dataset"), "metrics file")
    assert path.read_text() == "a,b\n1,2\n"
