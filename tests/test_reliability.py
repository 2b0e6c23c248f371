"""Faults injected into real processes: SIGKILL during training, evaluation and template extraction, each at a
deterministic kill point (tests/kill_points.py: the n-th optimizer step, file rename or checkpoint load), so the
same process dies at the same place on any machine, however busy."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kill_points
from helpers import demo_cfg, synthetic_world

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parent.parent
PLUGIN = str(Path(kill_points.__file__).resolve())
# one thread per child: a busy machine changes nothing but their speed (and 2 shared cores go further)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
EPOCHS, STEPS_PER_EPOCH = 6, 240 // 32   # 60 identities x 4 images, incomplete batches dropped


def overrides(cfg_like):
    return [f"{k}={v!r}" if isinstance(v, list) else f"{k}={v}" for k, v in cfg_like.items()]


def killed_at(cmd: list[str], where: str, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the kill point ``where``; it must have died there (not finished, not failed)."""
    out = subprocess.run(cmd, env={**ENV, kill_points.ENV: where}, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == -signal.SIGKILL, f"not killed at {where} (exit {out.returncode}): {out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic data (read only by the tests; each writes its runs under its own names or tmp_path)."""
    root = tmp_path_factory.mktemp("faults")
    synthetic_world(root, n_train_ids=60, imgs=4, test_sets=("synth_a",))
    return root


def base_settings(world, tag):
    return {"plugins": ["synthetic", PLUGIN], "network": "demo_decoder", "pretrained": "Demo", "experiment": "Exp",
            "data": "Synth", "checkpoint_root": world / f"ckpt_{tag}", "log_dir": world / f"logs_{tag}",
            "data_dir": world / "train", "rec": world / "rec", "cache_dir": world / "cache",
            "output_ori": world / "ckpt" / "Demo" / "reference" / "backbone.pth", "batch_size": 32,
            "num_epoch": EPOCHS, "checkpoint_every": 1, "eval_step": 0, "num_workers": 0, "device": "cpu", "n_jobs": 1,
            "val_targets": ["synth_a"], "test_targets": ["synth_a"]}


def layer_checkpoints(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted(root.rglob("*ftn_layers.pth"))}


@pytest.fixture(scope="module")
def uninterrupted(world) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoints of the run that no kill interrupts (every killed run resumes to them)."""
    settings = base_settings(world, "ref")
    ref = subprocess.run([sys.executable, "finetune.py", "--set", *overrides(settings)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = layer_checkpoints(Path(settings["checkpoint_root"]))
    assert len(out) == EPOCHS
    return out


@pytest.mark.slow
@pytest.mark.parametrize("where, left", [
    (kill_points.point("step", n=2 * STEPS_PER_EPOCH + 3), 2),   # mid-epoch 3: 2 checkpoints and their resume state
    (kill_points.point("replace", "resume.pth", 4), 4),          # 4 checkpoints, the resume state of the 3rd
], ids=["mid-epoch", "between-checkpoint-and-resume-state"])
def test_killed_training_resumes_to_the_uninterrupted_weights(world, uninterrupted, where, left, tmp_path):
    killed = {**base_settings(world, "killed"), "checkpoint_root": tmp_path / "ckpt", "log_dir": tmp_path / "logs"}
    root = tmp_path / "ckpt"
    killed_at([sys.executable, "finetune.py", "--set", *overrides(killed)], where, cwd=REPO)
    assert len(layer_checkpoints(root)) == left
    resumed = subprocess.run([sys.executable, "finetune.py", "--set", *overrides(killed), "resume=True"],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = layer_checkpoints(root)
    assert got.keys() == uninterrupted.keys()                    # every checkpoint, each as the uninterrupted run's
    for name, want in uninterrupted.items():
        assert all(torch.equal(got[name][k], want[k]) for k in want), name
    assert len(list(root.glob("*/*/*/*"))) == 1                  # resumed in place, no second run folder


@pytest.mark.slow
def test_killed_sweep_reruns_to_one_row_per_checkpoint(world, tmp_path):
    from pipeline import train as finetune
    epochs = 8
    finetune.train(demo_cfg(world, f"checkpoint_root={tmp_path / 'runs'}", f"log_dir={tmp_path / 'run_logs'}",
                            f"num_epoch={epochs}", "checkpoint_every=1"))
    settings = base_settings(world, "x")
    cmd = [sys.executable, "eval/evaluation.py", "--log-root", str(tmp_path / "res"), "--model-root",
           str(tmp_path / "runs" / "Demo"), "--experiment-name", "Exp/Synth", "--reference-pth",
           str(tmp_path / "ref.csv"), "--set", *overrides(settings)]
    csv_path = tmp_path / "res" / "Exp" / "Synth" / "20L1_1L2_metrics.csv"
    done = []
    for n in (3, 1, 2):   # dies as it loads its n-th checkpoint: after n - 1 new rows; the second time before any
        killed_at(cmd, kill_points.point("load", "ftn_layers.pth", n), cwd=REPO)
        with open(csv_path, newline="") as fh:
            done.append(len(list(csv.DictReader(fh))))
    assert done == [2, 2, 3]                                      # each rerun went on where the last one died
    finished = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    lines = csv_path.read_text().splitlines()
    assert lines.count(lines[0]) == 1
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["Step"]) for r in rows]
    assert steps == [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)]
    assert all(len(r) == 9 and all(v not in ("", None) for v in r.values()) for r in rows)


EXTRACT = """
import sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
import kill_points   # dies where KILL_POINT says
import synthetic     # registers the demo decoder
import templates.rowstore
from pathlib import Path
from backbones.spec import BackboneSpec
from templates.cache import TemplateCache
from templates.extraction import ExtractionSettings
templates.rowstore.CHUNK_ROWS = 16   # rows reach the store in several files: a kill can fall between them
items = sorted(Path({data!r}).rglob('*.png'))
TemplateCache({cache!r}, BackboneSpec('demo_decoder', Path({weights!r})),
              ExtractionSettings(torch.device('cpu'), batch_size=4, num_workers=0)).get('train', 'k', items)
"""


@pytest.mark.parametrize("where", [kill_points.point("replaced", "chunk-", 2),   # two chunks of rows in the store
                                   kill_points.point("replace", "train-", 1)],   # all assembled, not yet published
                         ids=["mid-extraction", "before-publishing"])
def test_killed_extraction_is_never_read_and_is_rebuilt(world, tmp_path, where):
    from backbones.spec import BackboneSpec
    from facedata.dataset import ImageDataset, normalize_images
    from synthetic.backbone import demo_decoder
    from templates.cache import TemplateCache
    from templates.entry import open_entry
    from templates.extraction import ExtractionSettings
    weights, cache = world / "ckpt" / "Demo" / "reference" / "backbone.pth", tmp_path / "cache"
    script = EXTRACT.format(repo=str(REPO), tests=str(Path(__file__).parent), data=str(world / "train"),
                            cache=str(cache), weights=str(weights))
    killed_at([sys.executable, "-c", script], where)
    assert any(p.name.startswith(".building") for p in cache.glob(".*"))   # a build was under way
    assert not any(open_entry(p) for p in cache.glob("train-*"))
    tc = TemplateCache(cache, BackboneSpec("demo_decoder", weights),
                       ExtractionSettings(torch.device("cpu"), batch_size=16, num_workers=0))
    items = sorted((world / "train").rglob("*.png"))
    t = tc.get("train", "k", items)
    assert len(t) == len(items)
    net = demo_decoder()
    net.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():   # the backbone run directly on every image
        x = normalize_images(torch.stack([ImageDataset(items)[i][1] for i in range(len(items))]))
        direct = torch.nn.functional.normalize(net.eval()(x))
    np.testing.assert_allclose(t.templates[:, 0], direct.numpy(), atol=1e-5)
