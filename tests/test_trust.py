"""Numbers a researcher can trust (issue 23 part 1): the threshold-free EER and ROC AUC beside the protocol's, the
warnings when the protocol's threshold grid cannot resolve the pair distances or a layer collapses the templates,
and the warning before training on few identities."""
import csv
import logging
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve

from backbones import ProjectionLayer
from eval.verification import FEW_GRID_STEPS, exact_eer_auc, score_diagnostics
from eval.evalset import warn_if_few_identities
import kill_points
from helpers import demo_cfg, synthetic_world, template_cache
from eval.evalset import open_eval_set
from pipeline import sweep as evaluation
from pipeline import train as finetune
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def sklearn_eer_auc(dist, issame):
    """The EER of scikit-learn's exact ROC (every point kept) as the root of 1 - x - TPR(x), and its AUC."""
    fpr, tpr, _ = roc_curve(issame, -dist, drop_intermediate=False)
    return brentq(lambda x: 1 - x - np.interp(x, fpr, tpr), 0, 1), roc_auc_score(issame, -dist)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_free_eer_and_auc_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    issame = rng.random(700) < 0.4
    dist = np.where(issame, rng.normal(0.8, 0.3, 700), rng.normal(1.2, 0.3, 700))
    dist = np.round(dist, 2 + seed % 2)   # ties between genuine and impostor pairs, as a coarse score has
    eer, auc = exact_eer_auc(dist, issame)
    want_eer, want_auc = sklearn_eer_auc(dist, issame)
    assert eer == pytest.approx(want_eer, abs=1e-9) and auc == pytest.approx(want_auc, abs=1e-12)


def test_hand_worked_roc():
    # genuine 0.1, 0.3; impostor 0.2, 0.4: accepting <= 0.1 gives (FPR 0, TPR .5), <= 0.2 (.5, .5), <= 0.3 (.5, 1)
    # FPR = 1 - TPR at (.5, .5): EER 0.5; AUC: P(genuine closer) = 3 of 4 pairs
    eer, auc = exact_eer_auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([True, False, True, False]))
    assert eer == pytest.approx(0.5) and auc == pytest.approx(0.75)
    d = score_diagnostics(np.array([0.0, 2.0, 0.0, 2.0] * 5), np.array([True, False] * 10))
    assert d.eer_exact == 0 and d.auc == 1 and d.impostor_angle == pytest.approx(90.0)


def collapsing_layer(dim: int, shrink: float, offset: float = 1.0) -> dict:
    """A privacy layer that maps t to offset + shrink * t: with an offset, every template lands near the same
    direction (a cone whose width is set by ``shrink``), the order of distances almost kept."""
    layer = ProjectionLayer(dim, dim)
    with torch.no_grad():
        layer.proj[0].weight.copy_(shrink * torch.eye(dim))
        layer.proj[0].bias.fill_(offset)       # 1: all positive, the LeakyReLU passes everything
        layer.proj[2].weight.copy_(torch.eye(dim))
        layer.proj[2].bias.zero_()
    return layer.state_dict()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    synthetic_world(root, n_train_ids=8, imgs=4, n_test_ids=24, test_imgs=4, pairs=200, gender=96)
    return root


def test_collapsing_layer_is_warned_with_both_eers_and_the_threshold_free_eer_is_right(world, tmp_path, caplog):
    run = tmp_path / "models" / "Exp" / "Synth" / "collapsed"
    run.mkdir(parents=True)
    torch.save(collapsing_layer(512, 0.05), run / "10ftn_layers.pth")
    torch.save(collapsing_layer(512, 1.0, 0.0), run / "20ftn_layers.pth")   # leaky_relu(t): no warning
    cfg = demo_cfg(world)
    with caplog.at_level(logging.WARNING):
        out = evaluation.evaluate(cfg, tmp_path / "res", tmp_path / "models", "Exp/Synth", tmp_path / "ref.csv")
    # independent computation: the layer applied to the cached backbone templates, flip-summed, squared distances
    ev = open_eval_set(template_cache(cfg), cfg.rec, "synth_a")
    n = ev.num_pair_images
    with torch.no_grad():
        def ver(t):
            return (1 + shrink * t.double()).numpy()
        shrink = 0.05
        v = ver(ev.templates.normalized(slice(0, n), 0)) + ver(ev.templates.normalized(slice(0, n), 1))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    dist = np.sum((v[0::2] - v[1::2]) ** 2, axis=1)
    assert np.quantile(dist, 0.95) < 0.01   # the whole set within the first step of the grid
    want_eer, want_auc = sklearn_eer_auc(dist, ev.issame)
    with open(out / "collapsed_diagnostics.csv", newline="") as fh:
        diag = {r["Step"]: r for r in csv.DictReader(fh)}
    with open(out / "collapsed_metrics.csv", newline="") as fh:
        metrics = {r["Step"]: r for r in csv.DictReader(fh)}
    assert float(diag["10"]["EER-Threshold-Free"]) == pytest.approx(want_eer, abs=2e-3)
    assert float(diag["10"]["ROC-AUC"]) == pytest.approx(want_auc, abs=2e-3)
    assert float(diag["10"]["Grid-Steps-90%"]) < 1 and want_eer < 0.25
    assert float(metrics["10"]["EER"]) > 0.45       # the protocol's grid sees chance ...
    assert float(diag["20"]["Grid-Steps-90%"]) > FEW_GRID_STEPS
    # ... and says so, in the log and in the report, naming the checkpoint and both EERs
    grid = [r.getMessage() for r in caplog.records if "cannot resolve" in r.getMessage()]
    assert len(grid) == 1 and "collapsed step 10 (10ftn_layers.pth) on 'synth_a'" in grid[0]
    assert f"{float(metrics['10']['EER']):.4f}" in grid[0] and f"{want_eer:.3f}" in grid[0]
    collapsed = [r.getMessage() for r in caplog.records if "collapsing templates" in r.getMessage()]
    assert len(collapsed) == 1 and "step 10" in collapsed[0]
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and "collapsed step 10 on synth_a" in report and "step 20 on" not in report
    assert f"{float(diag['10']['EER-Threshold-Free']):.4f}" in report
    assert "squared Euclidean" in report and "cosine |" not in report
    log = (out / "evaluate.log").read_text()
    assert "spread (median impostor angle)" in log
    picks = re.findall(r"BACC-AVG (\S+) PIC (\S+)", log)
    assert len(picks) == 2 and all(re.fullmatch(r"-?\d+\.\d{4}", v) for pair in picks for v in pair)  # rounded
    # the authors' metrics CSV keeps its columns exactly
    assert (out / "collapsed_metrics.csv").read_text().splitlines()[0] == (
        "Step,Dataset,EER,TAR@FAR=0.1%,BACC-Gender-LogReg,BACC-Gender-SVM,BACC-Gender-RBF,BACC-Gender-AVG,PIC")


def test_a_run_swept_before_the_diagnostics_gets_them_without_recomputing_its_metrics(world, tmp_path):
    run = tmp_path / "models" / "Exp" / "Synth" / "old"
    run.mkdir(parents=True)
    torch.save(collapsing_layer(512, 1.0, 0.0), run / "10ftn_layers.pth")
    args = (demo_cfg(world), tmp_path / "res", tmp_path / "models", "Exp/Synth", tmp_path / "ref.csv")
    out = evaluation.evaluate(*args)
    metrics = (out / "old_metrics.csv").read_text()
    diagnostics = (out / "old_diagnostics.csv").read_text()
    (out / "old_diagnostics.csv").unlink()   # as a sweep of the previous version left it
    evaluation.evaluate(*args)
    assert (out / "old_diagnostics.csv").read_text() == diagnostics and (out / "old_metrics.csv").read_text() == metrics
    second = (out / "evaluate.log").read_text().rsplit("evaluating 1 run(s)", 1)[1]
    assert "old step 10 synth_a: threshold-free EER" in second and "old step 10 synth_a: EER" not in second


def test_few_training_identities_are_warned_before_training_and_validation_logs_the_spread(world):
    res = finetune.train(demo_cfg(world, "num_epoch=1", "batch_size=8", "eval_step=4", "checkpoint_every=1"))
    log = (res.log_dir / "training.log").read_text()
    assert "the training set has 8 identities, fewer than the 512 dimensions" in log
    assert log.index("identities, fewer than") < log.index("finished at step")
    assert "spread: median impostor angle" in log and "threshold-free EER" in log


def test_few_identities_rule():
    logger = logging.getLogger("test_trust")
    assert warn_if_few_identities(16, 128, True, logger)           # the MobileFaceNet case
    assert not warn_if_few_identities(1000, 512, True, logger)     # ColorFeret-sized: enough
    assert not warn_if_few_identities(16, 128, False, logger)      # no identity header (leace, inlp, ...)


def test_reference_naming_a_folder_is_a_clear_error(world, tmp_path):
    (tmp_path / "refdir").mkdir()
    (tmp_path / "models" / "Exp" / "Synth" / "run").mkdir(parents=True)
    torch.save(collapsing_layer(512, 1.0, 0.0), tmp_path / "models" / "Exp" / "Synth" / "run" / "10ftn_layers.pth")
    with pytest.raises(UserError, match="--reference-pth .* is a folder"):
        evaluation.evaluate(demo_cfg(world), tmp_path / "res", tmp_path / "models", "Exp/Synth", tmp_path / "refdir")


def _wait_ended(pid: int, timeout: float = 120.0) -> bool:
    """Wait (without polling) until process ``pid``, not necessarily a child, has ended; False after ``timeout``
    seconds (a hang guard only: a worker watching its parent ends within a second)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:   # already gone
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])   # a pidfd is readable once its process has ended
    finally:
        os.close(fd)


@pytest.mark.subprocess
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="waits on the workers with pidfd_open (Linux)")
def test_sigkill_of_a_sweep_ends_its_joblib_workers(world, tmp_path):
    run = tmp_path / "models" / "Exp" / "Synth" / "many"
    run.mkdir(parents=True)
    for step in range(1, 11):
        torch.save(collapsing_layer(512, 1.0 + step / 10, 0.0), run / f"{step}ftn_layers.pth")
    script = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n"
              f"import kill_points\nfrom pathlib import Path\nfrom helpers import demo_cfg\n"
              f"from pipeline.sweep import evaluate\n"
              f"evaluate(demo_cfg(Path({str(world)!r}), 'n_jobs=2'), {str(tmp_path / 'res')!r}, "
              f"{str(tmp_path / 'models')!r}, 'Exp/Synth', {str(tmp_path / 'ref.csv')!r})\n")
    note = tmp_path / "children"
    # the sweep kills itself as it loads its 6th checkpoint: 4 were handed to the 2 workers at once, 2 more as the
    # first results came back, so the workers run and have work
    env = {**os.environ, kill_points.ENV: kill_points.point("load", "ftn_layers.pth", 6),
           kill_points.CHILDREN_ENV: str(note)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, f"the sweep was not killed (exit {out.returncode}): {out.stderr[-2000:]}"
    workers = [int(p) for p in note.read_text().split()]
    assert len(workers) >= 2, "the sweep started no workers"   # loky's workers (and its resource tracker)
    assert all(_wait_ended(w) for w in workers), "joblib workers outlived their killed parent"
