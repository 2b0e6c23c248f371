"""reproduce.py: plans as files, resumable and shardable runs, the dry run, released layers, tables."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.paper_values import read_paper_values
from pipeline import plans, reproduce, sweep, tables, train
from privacy import layer_training
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
# the synthetic plan's shape (one-dataset with the paper's method and a comparison method, the paper's method swept
# under the folders protocol too, the cross-dataset folds, an ablation whose default point is the one-dataset training)
# on a small world
TINY = '''
INCLUDE = "synthetic"
SIZE = dict(train_ids=12, train_imgs=4, test_ids=8, test_imgs=4, pairs=40, gender=32)
DATASETS = ["SynthA", "SynthB"]
TARGETS = {"SynthA": "synth_a", "SynthB": "synth_b"}
METHODS = {"angular": {}, "leace": {}}
CROSS_METHODS = ["angular"]
ABLATION = dict(trained_on="SynthA", alphas=[20], betas=[0, 1])
FOLDER_METHODS = ["angular"]
SET = {"num_epoch": 2, "batch_size": 16, "checkpoint_every": 1, "n_jobs": 1}
'''


def outputs(root: Path) -> dict[str, str]:
    """tables.md and every table CSV of the tiny plan run under ``root``."""
    out = root / "work_dirs" / "results" / "tiny"
    files = {"tables.md": (out / "tables.md").read_text()}
    files.update({p.name: p.read_text() for p in sorted((out / "tables").glob("*.csv"))})
    return files


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny plan run once, in one process, from a folder of its own (as from a fresh clone). Tests that change
    its files work on a copy (``copy_of``)."""
    root = tmp_path_factory.mktemp("once")
    (root / "tiny.py").write_text(TINY)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        assert reproduce.main(["tiny.py"]) == 0
    return root


def copy_of(root: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of a plan's folder (its state files hold paths relative to it), made the working directory."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


def own_sweep(exp: plans.Experiment, store: reproduce.StateStore) -> dict:
    """The record of an experiment's own sweep (its folder, its run's name, its reference file)."""
    return store.read(exp.key)["sweeps"][exp.sweep_key]


class Interrupt(BaseException):
    """Stands for a kill: nothing catches it."""


def interrupt_at(monkeypatch, module, name: str, when: int) -> dict:
    """Make ``module.name`` raise Interrupt on its ``when``-th call (earlier calls run as usual)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == when:
            raise Interrupt(f"{name} call {when}")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_tables_figures_and_a_second_run_that_does_nothing(uninterrupted, monkeypatch, capsys):
    files = outputs(uninterrupted)
    text = files["tables.md"]
    assert "11 of 11 experiments have results (8 distinct trainings)" in text   # 2 one-dataset runs swept twice
    for table in ("Demo_decoder_synth_a.csv", "Demo_decoder_synth_b.csv", "Demo_decoder_synth_all.csv",
                  "cross_dataset_Demo_decoder.csv", "ablation_Demo_decoder_SynthA.csv"):
        assert table in files
    rows = list(csv.DictReader(files["Demo_decoder_synth_a.csv"].splitlines()))
    # the same trainings under the paper-era gender test (every image of the set's folder), with their own bare row
    folders = [r for r in rows if r["Settings"].endswith("[gender test: folders]")]
    plain = [r for r in rows if r not in folders]
    assert [(r["Trained on"], r["Method"], r["Checkpoint"]) for r in plain][:3] == [
        ("", "bare backbone", ""), ("SynthA", "angular", "last"), ("SynthA", "angular", "best PIC")]
    assert {(r["Trained on"], r["Method"]) for r in folders} == {
        ("", "bare backbone"), ("SynthA", "angular"), ("SynthB", "angular")}
    bins_bare, folder_bare = (next(r for r in rs if r["Method"] == "bare backbone") for rs in (rows, folders))
    assert bins_bare["EER"] == folder_bare["EER"] and bins_bare["BACC-Gender-AVG"] != folder_bare["BACC-Gender-AVG"]
    assert {r["Method"] for r in rows} == {"bare backbone", "angular", "leace"}
    # every number is the sweep's: the last checkpoint's row of the run's metrics CSV
    monkeypatch.chdir(uninterrupted)
    store = reproduce.StateStore(Path("work_dirs/results/.experiments"))
    plan = plans.load_plan("tiny.py")
    first = plan.experiments[0]
    state = store.read(first.key)
    swept = own_sweep(first, store)
    with open(Path(swept["folder"]) / f"{swept['run']}_metrics.csv", newline="") as fh:
        swept = [r for r in csv.DictReader(fh) if r["Dataset"] == "synth_a"]
    last = max(swept, key=lambda r: int(r["Step"]))
    assert float(plain[1]["EER"]) == float(last["EER"]) and int(plain[1]["Step"]) == int(last["Step"]) == 6
    cross = list(csv.DictReader(files["cross_dataset_Demo_decoder.csv"].splitlines()))
    assert [(r["Held out"], r["Trained on"], r["Dataset"]) for r in cross if r["Checkpoint"] == "last"] == [
        ("SynthA", "SynthB", "synth_a"), ("SynthB", "SynthA", "synth_b"), ("(none)", "SynthA+SynthB", "synth_all")]
    ablation = list(csv.DictReader(files["ablation_Demo_decoder_SynthA.csv"].splitlines()))
    assert {(r["alpha"], r["beta"]) for r in ablation} == {("20.0", "0.0"), ("20.0", "1.0")}
    out = uninterrupted / "work_dirs" / "results" / "tiny"
    assert {p.name for p in out.glob("*.png")} == {"tradeoff_Demo_decoder.png", "angles_Demo_decoder.png",
                                                     "pic_alpha_beta.png"}
    # the ablation's default point is the one-dataset training: one training, two sweeps, each in its own folder
    default = [e for e in plan.experiments if e.setting == "Ablation" and e.cfg.beta == 1][0]
    assert default.key == first.key and store.read(default.key)["run"] == state["run"]
    folders = [Path(own_sweep(e, store)["folder"]) for e in reproduce.unique(plan.experiments)]
    assert len(set(folders)) == len(folders) == 11   # 9, and 2 swept again under folders
    for exp, folder in zip(reproduce.unique(plan.experiments), folders):   # each sweep holds its own run alone
        assert sorted(p.name for p in folder.glob("*_metrics.csv")) == [f"{Path(store.read(exp.key)['run']).name}"
                                                                          f"_metrics.csv"]
    assert not list(Path("work_dirs/checkpoints/Demo/OneDataset/SynthA").glob("20L1_0L2*"))   # the ablation's own

    # a second run trains, sweeps and writes nothing
    calls = interrupt_at(monkeypatch, train, "train", 1)
    sweeps = interrupt_at(monkeypatch, sweep, "evaluate_runs", 1)
    stamp = (out / "tables.md").stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce.main(["tiny.py"]) == 0
    assert calls["n"] == sweeps["n"] == 0 and (out / "tables.md").stat().st_mtime_ns == stamp
    assert "nothing new" in capsys.readouterr().out
    # runtime-only options are the same experiments; a changed setting is a new one
    again = plans.load_plan("tiny.py", ["n_jobs=2", "device=cpu", "num_workers=1", "log_every=7"])
    assert [e.key for e in again.experiments] == [e.key for e in plan.experiments]
    assert reproduce.main(["tiny.py", "--set", "n_jobs=2", "device=cpu"]) == 0 and calls["n"] == 0
    changed = plans.load_plan("tiny.py", ["alpha=5"])
    assert changed.experiments[0].key != first.key


@pytest.mark.slow
def test_killed_at_several_points_and_rerun_gives_the_same_tables(uninterrupted, tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    # killed in training (after the first checkpoint and resume state of a layer), in a sweep (after some rows),
    # and while recording an experiment's state
    for module, name, when in ((layer_training, "atomic_torch_save", 3), (sweep.ResultFile, "add", 4),
                               (reproduce.StateStore, "write", 9), (layer_training, "atomic_torch_save", 6)):
        with monkeypatch.context() as m:
            interrupt_at(m, module, name, when)
            with pytest.raises(Interrupt):
                reproduce.main(["tiny.py"])
    resumed = list((tmp_path / "work_dirs" / "logs").rglob("training.log"))
    assert any("resumed run" in p.read_text() for p in resumed)
    assert reproduce.main(["tiny.py"]) == 0
    assert outputs(tmp_path) == outputs(uninterrupted)


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_shards_in_two_processes_give_the_tables_of_one(uninterrupted, tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "reproduce.py"), "tiny.py", "--shard", f"{k}/2"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in (1, 2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert outputs(tmp_path) == outputs(uninterrupted)
    monkeypatch.chdir(tmp_path)
    plan = plans.load_plan("tiny.py")
    shares = [reproduce.select_shard(reproduce.unique(plan.experiments), k, 2) for k in (1, 2)]
    assert shares[0] and shares[1] and not {e.key for e in shares[0]} & {e.key for e in shares[1]}


def test_dry_run_of_the_paper_plan_with_nothing_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = interrupt_at(monkeypatch, train, "train", 1)
    sweeps = interrupt_at(monkeypatch, sweep, "evaluate_runs", 1)
    assert reproduce.main(["paper", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert calls["n"] == sweeps["n"] == 0 and not (tmp_path / "work_dirs").exists()
    plan = plans.load_plan("paper")
    assert len(plan.experiments) == 3 * (3 * 6 + 4 * 6) and f"{len(plan.experiments)} experiment(s)" in out
    for path in ("work_dirs/checkpoints/ArcFace/reference/backbone.pth",
                 "work_dirs/checkpoints/ElasticFace/reference/backbone.pth",
                 "work_dirs/checkpoints/SphereFace/reference/backbone.pth", "data/train/LFW", "data/train/AgeDB",
                 "data/train/ColorFeret", "data/eval_insightface/lfw.bin", "data/eval_insightface/agedb_30.bin",
                 "data/eval_insightface/colorferet.bin", "data/eval_insightface/vggface2.bin",
                 "data/train/VGGFace2_sample"):   # the paper's gender test: every image of the sets' folders
        assert f": {path}  (README: '" in out, path
    assert "MISSING INPUTS (11)" in out and "Preparing the datasets" in out
    # the real run refuses before any compute, naming them all
    assert reproduce.main(["paper"]) == 2
    assert "lacks 11 input(s)" in capsys.readouterr().err and calls["n"] == 0


def test_released_layers_in_an_unknown_layout_are_evaluated_with_the_mapping_file(uninterrupted, tmp_path,
                                                                                   monkeypatch, capsys):
    """Layers of the tiny world's one-dataset runs, copied into folders whose names say nothing, placed by the mapping
    file and swept: their rows equal those of the runs they were copied from."""
    uninterrupted = copy_of(uninterrupted, tmp_path, monkeypatch)
    plan = plans.load_plan("tiny.py")
    store = reproduce.StateStore(Path("work_dirs/results/.experiments"))
    source = Path(store.read(plan.experiments[0].key)["run"])          # angular trained on SynthA
    download = tmp_path / "download"
    (download / "x1" / "deep").mkdir(parents=True)
    (download / "x1" / "deep" / "layer_final.pth").write_bytes((source / "6ftn_layers.pth").read_bytes())
    (download / "x1" / "notes.pth").write_bytes(b"not a checkpoint")
    torch.save({"kernel": torch.zeros(2, 2)}, download / "x1" / "header.pth")
    world = plans.load_namespace("tiny.py")[1]
    root = Path(world["ROOT"]) / next(p.name for p in Path(world["ROOT"]).iterdir())
    released_plan = uninterrupted / "rel.py"
    released_plan.write_text(TINY + f'''
from pipeline.released import released_experiments
BACKBONES = {{"Demo decoder": {{"output_ori": "{root / 'backbone.pth'}", "rec": "{root / 'eval'}"}}}}
EVAL_SETS = ["synth_a", "synth_b", "synth_all"]
ALL_TARGET = "synth_all"
def experiments(plan):
    return released_experiments(plan)
''')
    assert reproduce.main(["rel.py", "--released", str(download)]) == 2
    err = capsys.readouterr().err
    template = Path("work_dirs/results/released_mapping.csv")
    assert "1 released layer(s)" in err and "x1/deep/layer_final.pth" in err and str(template) in err
    assert template.read_text() == "layer,backbone,setting,dataset\nx1/deep/layer_final.pth,,,\n"
    template.write_text("layer,backbone,setting,dataset\nx1/deep/layer_final.pth,Demo decoder,OneDataset,SynthA\n")
    assert reproduce.main(["rel.py", "--released", str(download), "--mapping", str(template)]) == 0
    assert (download / "x1" / "deep" / "layer_final.pth").read_bytes() == (source / "6ftn_layers.pth").read_bytes()
    table = "work_dirs/results/{}/tables/Demo_decoder_synth_b.csv"
    ours = next(r for r in csv.DictReader((uninterrupted / table.format("tiny")).read_text().splitlines())
                if (r["Trained on"], r["Method"], r["Checkpoint"]) == ("SynthA", "angular", "last"))
    rows = list(csv.DictReader((uninterrupted / table.format("rel")).read_text().splitlines()))
    released = rows[1]
    best = [("SynthA", "released", "best PIC")] if released["PIC"] else []   # a best-PIC row where PIC is defined
    assert [(r["Trained on"], r["Method"], r["Checkpoint"]) for r in rows] == [
        ("", "bare backbone", ""), ("SynthA", "released", "last"), *best]
    assert released["Step"] == "1"      # a file name without a step: the layer's position in its folder
    metrics = ["EER", "TAR@FAR=0.1%", "BACC-Gender-LogReg", "BACC-Gender-SVM", "BACC-Gender-RBF", "BACC-Gender-AVG"]
    assert [released[m] for m in metrics] == [ours[m] for m in metrics]


def test_paper_values_add_the_papers_number_and_our_difference(uninterrupted, tmp_path, monkeypatch):
    copy_of(uninterrupted, tmp_path, monkeypatch)
    rows = list(csv.DictReader(Path("work_dirs/results/tiny/tables/Demo_decoder_synth_a.csv").read_text()
                               .splitlines()))
    values = tmp_path / "paper.csv"
    values.write_text("Backbone,Dataset,Trained on,Method,Metric,Value\n"
                      "Demo decoder,synth_a,SynthA,angular,EER,0.25\n"
                      "Demo decoder,synth_a,,bare backbone,BACC-Gender-AVG,0.5\n")
    plan = plans.load_plan("tiny.py")
    tables.write_outputs(plan, Path("work_dirs/results"), read_paper_values(values, tables.METRICS))
    new = list(csv.DictReader(Path("work_dirs/results/tiny/tables/Demo_decoder_synth_a.csv").read_text()
                              .splitlines()))
    angular_last = next(r for r in new if r["Method"] == "angular" and r["Checkpoint"] == "last" and
                        r["Trained on"] == "SynthA")
    assert float(angular_last["EER (paper)"]) == 0.25
    assert float(angular_last["EER diff"]) == pytest.approx(float(angular_last["EER"]) - 0.25)
    assert next(r for r in new if r["Method"] == "leace")["EER (paper)"] == ""      # no paper value: empty
    bare = new[0]
    assert float(bare["BACC-Gender-AVG diff"]) == pytest.approx(float(rows[0]["BACC-Gender-AVG"]) - 0.5)
    values.write_text("Metric,Value\nAUC,1\n")
    with pytest.raises(UserError, match="Metric 'AUC' is not one of"):
        read_paper_values(values, tables.METRICS)


def test_plan_files_include_override_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.py").write_text('INCLUDE = "b"\nSET = {"alpha": 5}\n')
    (tmp_path / "b.py").write_text('SET = {"beta": 3, "alpha": 1}\nEXPERIMENTS = [dict(method="angular", '
                                   'trained_on="X", options={"seed": 2})]\n')
    plan = plans.load_plan(str(tmp_path / "a.py"), ["seed=4"])
    cfg = plan.experiments[0].cfg
    assert (cfg.alpha, cfg.beta, cfg.seed, cfg.data, cfg.experiment) == (5, 3, 4, "X", "OneDataset")
    (tmp_path / "b.py").write_text('INCLUDE = "a"\n')
    with pytest.raises(UserError, match="includes itself"):
        plans.load_plan(str(tmp_path / "a.py"))
    (tmp_path / "c.py").write_text('EXPERIMENTS = [dict(methd="angular")]\n')
    with pytest.raises(UserError, match=r"unknown key\(s\) \['methd'\]"):
        plans.load_plan(str(tmp_path / "c.py"))
    (tmp_path / "d.py").write_text('EXPERIMENTS = [dict(options={"alpha": -1})]\n')
    with pytest.raises(UserError, match="alpha"):
        plans.load_plan(str(tmp_path / "d.py"))
    with pytest.raises(UserError, match="no plan named 'nope'"):
        plans.load_plan("nope")
    for name in plans.known_plans():   # every shipped plan loads (released needs its folder)
        if name != "released":
            assert plans.load_plan(name).experiments
    with pytest.raises(UserError, match="--shard 3/2"):
        reproduce.parse_shard("3/2")


def test_a_rerun_after_the_results_are_deleted_sweeps_again_and_retrains_a_run_of_other_settings(
        uninterrupted, tmp_path, monkeypatch, capsys):
    """The results deleted (state files kept): every experiment is swept again (none trained) into the same tables; a
    recorded run whose run.json holds other settings is not taken for the experiment's, which is trained again."""
    copy_of(uninterrupted, tmp_path, monkeypatch)
    results = Path("work_dirs/results")
    for path in results.iterdir():
        if path.name != ".experiments":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    trainings = interrupt_at(monkeypatch, train, "train", 99)
    assert reproduce.main(["tiny.py"]) == 0
    assert trainings["n"] == 0 and outputs(Path.cwd()) == outputs(uninterrupted)
    said = capsys.readouterr().out
    assert said.count("are gone; it is swept again") == 8   # per state file (the ablation's default shares one)
    # a run folder whose run.json holds other settings (the user trained something else into it)
    plan = plans.load_plan("tiny.py")
    leace = next(e for e in plan.experiments if e.method == "leace" and e.trained_on == "SynthA")
    run = Path(reproduce.StateStore(results / ".experiments").read(leace.key)["run"])
    doc = json.loads((run / "run.json").read_text())
    doc["config"]["seed"] = 99
    (run / "run.json").write_text(json.dumps(doc))
    assert reproduce.main(["tiny.py"]) == 0
    assert trainings["n"] == 1 and f"names run '{run}'" in capsys.readouterr().out
    assert reproduce.StateStore(results / ".experiments").read(leace.key)["run"] != str(run)
    assert outputs(Path.cwd()) == outputs(uninterrupted)


def test_stale_tables_are_removed_and_a_users_file_kept(uninterrupted, tmp_path, monkeypatch):
    copy_of(uninterrupted, tmp_path, monkeypatch)
    tables_dir = Path("work_dirs/results/tiny/tables")
    (tables_dir / "mine.csv").write_text("my,notes\n")
    Path("tiny.py").write_text(TINY + "ABLATION = dict(trained_on='SynthA', alphas=[], betas=[])\n")
    trainings = interrupt_at(monkeypatch, train, "train", 1)
    assert reproduce.main(["tiny.py"]) == 0 and trainings["n"] == 0
    kept = {p.name for p in tables_dir.glob("*.csv")}
    assert kept == set(outputs(uninterrupted)) - {"tables.md", "ablation_Demo_decoder_SynthA.csv"} | {"mine.csv"}
    assert (tables_dir / "mine.csv").read_text() == "my,notes\n"


def test_a_finished_run_of_the_same_settings_is_adopted_not_retrained(uninterrupted, tmp_path, monkeypatch, capsys):
    """Every state and table deleted (the sweeps' folders kept): the finished runs (made by finetune.py's code, each
    with its run.json) are adopted, named in the log, their sweeps' rows are found where they were written (nothing
    is evaluated again), and they give the same tables. (A full sweep after the results are deleted: the test
    above.)"""
    copy_of(uninterrupted, tmp_path, monkeypatch)
    shutil.rmtree("work_dirs/results/.experiments")
    shutil.rmtree("work_dirs/results/tiny")
    reports = {p: p.stat().st_mtime_ns for p in Path("work_dirs/results").rglob("report.md")}
    trainings = interrupt_at(monkeypatch, train, "train", 1)
    jobs = interrupt_at(monkeypatch, sweep, "job_done", 1)
    assert reproduce.main(["tiny.py"]) == 0 and trainings["n"] == jobs["n"] == 0
    said = capsys.readouterr().out
    assert said.count("adopted the finished run") == 8 and "work_dirs/checkpoints/Demo/OneDataset/SynthA/leace" in said
    assert {p: p.stat().st_mtime_ns for p in Path("work_dirs/results").rglob("report.md")} == reports
    assert outputs(Path.cwd()) == outputs(uninterrupted)


def test_plan_values_reach_the_config_as_values(tmp_path, monkeypatch):
    """A Path stays a path (not the text "PosixPath(...)"); a value of another type is refused naming the option."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.py").write_text("from pathlib import Path\nEXPERIMENTS = [dict(trained_on='X', options={"
                                   "'data_dir': Path('/data/LFW'), 'test_targets': ['lfw'], 'alpha': 5})]\n")
    cfg = plans.load_plan(str(tmp_path / "p.py")).experiments[0].cfg
    assert (cfg.data_dir, cfg.test_targets, cfg.alpha) == ("/data/LFW", ["lfw"], 5)
    (tmp_path / "q.py").write_text("EXPERIMENTS = [dict(options={'num_epoch': '5'})]\n")
    with pytest.raises(UserError, match=r"num_epoch.*plan '.*q.py', experiment 1"):
        plans.load_plan(str(tmp_path / "q.py"))


def test_the_bare_backbones_worst_case_attacker_is_in_the_tables(tmp_path, monkeypatch):
    """With attackers beyond the paper's, the bare backbone's row carries its worst case and interval: those of the
    sweep's bare_backbone_attackers.csv."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "worst.py").write_text('''
INCLUDE = "synthetic"
SIZE = dict(train_ids=12, train_imgs=4, test_ids=8, test_imgs=4, pairs=40, gender=32)
DATASETS = ["SynthA"]
TARGETS = {"SynthA": "synth_a"}
METHODS = {"leace": {}}
CROSS_METHODS = []
ABLATION = dict(trained_on="SynthA", alphas=[], betas=[])
SET = {"num_epoch": 2, "batch_size": 16, "n_jobs": 1, "attackers": ["LogReg", "SVM", "RBF", "kNN"], "bootstrap": 20}
''')
    assert reproduce.main(["worst.py"]) == 0
    plan = plans.load_plan("worst.py")
    swept = own_sweep(plan.experiments[0], reproduce.StateStore(Path("work_dirs/results/.experiments")))
    with open(Path(swept["folder"]) / "bare_backbone_attackers.csv", newline="") as fh:
        worst = next(r for r in csv.DictReader(fh) if r["Dataset"] == "synth_a" and r["Attacker"] == "worst-case")
    bare = next(csv.DictReader(Path("work_dirs/results/worst/tables/Demo_decoder_synth_a.csv").read_text()
                               .splitlines()))
    assert bare["Method"] == "bare backbone" and bare["Worst attacker"] == worst["Reached-By"]
    for ours, theirs in (("Worst-case BACC", "BACC"), ("Worst CI-Low", "CI-Low"), ("Worst CI-High", "CI-High")):
        assert worst[theirs] and float(bare[ours]) == float(worst[theirs])
    text = Path("work_dirs/results/worst/tables.md").read_text()
    line = next(x for x in text.splitlines() if "| bare backbone |" in x and "| synth_a |" not in x)
    assert f"| {float(worst['BACC']):.4f} |" in line and f"| {worst['Reached-By']} |" in line


def test_tables_carry_the_sweeps_verification_report(uninterrupted, monkeypatch):
    """The tables' verification columns are the sweep's <run>_verification.csv (and bare_backbone_verification.csv)
    cells of the same checkpoint and set; FNMR at FMR = 1% is empty where 3/FMR exceeds the impostor comparisons."""
    monkeypatch.chdir(uninterrupted)
    rows = list(csv.DictReader(Path("work_dirs/results/tiny/tables/Demo_decoder_synth_a.csv").read_text()
                               .splitlines()))
    plan = plans.load_plan("tiny.py")
    store = reproduce.StateStore(Path("work_dirs/results/.experiments"))
    first = plan.experiments[0]
    swept = own_sweep(first, store)
    with open(Path(swept["folder"]) / f"{swept['run']}_verification.csv", newline="") as fh:
        report = [r for r in csv.DictReader(fh) if r["Dataset"] == "synth_a"]
    with open(Path(swept["folder"]) / "bare_backbone_verification.csv", newline="") as fh:
        bare_report = next(r for r in csv.DictReader(fh) if r["Dataset"] == "synth_a")
    row = next(r for r in rows if r["Method"] == first.method and r["Checkpoint"] == "last"
               and not r["Settings"].endswith("[gender test: folders]"))
    ours = next(r for r in report if int(r["Step"]) == int(row["Step"]))
    for column in ("EER-Pooled", "EER-CI-Low", "EER-CI-High"):
        assert float(row[column]) == pytest.approx(float(ours[column]), abs=5e-5), column
    impostors = int(ours["Impostor"])
    assert 3 / 0.01 > impostors and row["FNMR@FMR=1%"] == "" and ours["FNMR@FMR=1%"] == ""   # the rule of three
    bare = next(r for r in rows if r["Method"] == "bare backbone" and r["Settings"] == "")
    assert float(bare["EER-Pooled"]) == pytest.approx(float(bare_report["EER-Pooled"]), abs=5e-5)
    assert "FMR-Ratio-Cross/Same" in rows[0]
    assert "ISO/IEC 19795-1" in Path("work_dirs/results/tiny/tables.md").read_text()


def test_a_plans_own_released_layer_without_a_run_name_is_staged_under_released(tmp_path, monkeypatch):
    """A released experiment written in a plan by hand (no run_name option) is linked into
    <checkpoint_root>/<pretrained>/<experiment>/<data>/released, not refused with a traceback."""
    from config.loading import load_config
    from pipeline.released import stage
    monkeypatch.chdir(tmp_path)
    layer = tmp_path / "theirs" / "6ftn_layers.pth"
    layer.parent.mkdir()
    layer.write_bytes(b"layer")
    cfg = load_config(None, [f"checkpoint_root={tmp_path / 'ckpt'}", "pretrained=ArcFace", "experiment=Released",
                             "data=OneDataset-LFW"])
    assert cfg.run_name in (None, "")
    exp = plans.Experiment(backbone="ArcFace", setting="Released", trained_on="LFW", method="angular", cfg=cfg,
                           released=(layer,))
    folder = stage(exp)
    assert folder == tmp_path / "ckpt" / "ArcFace" / "Released" / "OneDataset-LFW" / "released"
    assert (folder / "6ftn_layers.pth").resolve() == layer.resolve() and stage(exp) == folder   # again: the same link
