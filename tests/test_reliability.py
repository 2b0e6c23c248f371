"""Faults injected into real processes: SIGKILL during training, evaluation and template extraction."""
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import demo_cfg, synthetic_world

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def overrides(cfg_like):
    return [f"{k}={v!r}" if isinstance(v, list) else f"{k}={v}" for k, v in cfg_like.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    synthetic_world(root, n_train_ids=60, imgs=4, test_sets=("synth_a",))
    return root


def base_settings(world, tag):
    return {"plugins": ["synthetic"], "network": "demo_decoder", "pretrained": "Demo", "experiment": "Exp", "data": "Synth",
            "checkpoint_root": world / f"ckpt_{tag}", "log_dir": world / f"logs_{tag}",
            "data_dir": world / "train", "rec": world / "rec", "cache_dir": world / "cache",
            "output_ori": world / "ckpt" / "Demo" / "reference" / "backbone.pth", "batch_size": 32,
            "num_epoch": 150, "checkpoint_every": 1, "eval_step": 0, "num_workers": 0, "device": "cpu",
            "val_targets": ["synth_a"], "test_targets": ["synth_a"]}


def wait_for(predicate, timeout=120):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.02)


def kill_when(proc, predicate, extra_delay):
    wait_for(lambda: predicate() or proc.poll() is not None)
    time.sleep(extra_delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_killed_training_resumes_to_the_uninterrupted_weights(world):
    settings = base_settings(world, "ref")
    ref = subprocess.run([sys.executable, "finetune.py", "--set", *overrides(settings)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    final = 150 * (240 // 32)
    ref_ckpt = next(Path(settings["checkpoint_root"]).rglob(f"{final}ftn_layers.pth"))
    rng = random.Random(2)  # the kill delays are reproducible
    for attempt in range(2):
        killed = base_settings(world, f"kill{attempt}")
        proc = subprocess.Popen([sys.executable, "finetune.py", "--set", *overrides(killed)], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        root = Path(killed["checkpoint_root"])
        code = kill_when(proc, lambda: any(root.rglob("resume.pth")), rng.uniform(0.0, 1.5))
        assert code == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
        resumed = subprocess.run([sys.executable, "finetune.py", "--set", *overrides(killed), "resume=True"],
                                 cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        got = next(root.rglob(f"{final}ftn_layers.pth"))
        a, b = torch.load(got, weights_only=True), torch.load(ref_ckpt, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert len(list(root.glob("*/*/*/*"))) == 1  # resumed in place, no second run folder


def test_killed_sweep_reruns_to_one_row_per_checkpoint(world, tmp_path):
    from pipeline import train as finetune
    finetune.train(demo_cfg(world, f"checkpoint_root={world / 'sweep'}", f"log_dir={world / 'sweep_logs'}",
                            "num_epoch=40", "checkpoint_every=1"))
    settings = base_settings(world, "x")
    cmd = [sys.executable, "eval/evaluation.py", "--log-root", str(tmp_path), "--model-root",
           str(world / "sweep" / "Demo"), "--experiment-name", "Exp/Synth", "--reference-pth",
           str(tmp_path / "ref.csv"), "--set", *overrides(settings)]
    csv_path = tmp_path / "Exp" / "Synth" / "20L1_1L2_metrics.csv"
    rng = random.Random(3)  # the kill delays are reproducible
    for attempt in range(3):
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, lambda: csv_path.exists() and csv_path.stat().st_size > 200 * (attempt + 1),
                  rng.uniform(0.0, 0.5))
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = csv_path.read_text().splitlines()
    assert lines.count(lines[0]) == 1
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["Step"]) for r in rows]
    assert steps == [7 * e for e in range(1, 41)]
    assert all(len(r) == 9 and all(v not in ("", None) for v in r.values()) for r in rows)


EXTRACT = """
import sys, torch
sys.path.insert(0, {repo!r})
from pathlib import Path
from backbones.spec import BackboneSpec
from templates.cache import TemplateCache
from templates.extraction import ExtractionSettings
items = sorted(Path({data!r}).rglob('*.png'))
TemplateCache({cache!r}, BackboneSpec('iresnet18', Path({weights!r})),
              ExtractionSettings(torch.device('cpu'), batch_size=4, num_workers=0)).get('train', 'k', items)
"""


def test_killed_extraction_is_never_read_and_is_rebuilt(world, tmp_path):
    from backbones import iresnet18
    from backbones import load_backbone
    from backbones.spec import BackboneSpec
    from templates.cache import TemplateCache
    from templates.entry import open_entry
    from templates.extraction import ExtractionSettings
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(iresnet18().state_dict(), weights)
    cache = tmp_path / "cache"
    script = EXTRACT.format(repo=str(REPO), data=str(world / "train"), cache=str(cache), weights=str(weights))
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    building = lambda: any(p.name.startswith(".building")  # noqa: E731  (a miss in progress)
                           for p in cache.glob(".*")) if cache.exists() else False
    assert kill_when(proc, building, 1.0) == -signal.SIGKILL
    tc = TemplateCache(cache, BackboneSpec("iresnet18", weights), ExtractionSettings(torch.device("cpu"), batch_size=16,
                                                                                       num_workers=0))
    assert not any(open_entry(p) for p in cache.glob("train-*"))
    items = sorted((world / "train").rglob("*.png"))[:12]
    full = sorted((world / "train").rglob("*.png"))
    t = tc.get("train", "k", full)
    assert len(t) == len(full)
    with torch.no_grad():
        from facedata.dataset import ImageDataset, normalize_images
        x = normalize_images(torch.stack([ImageDataset(items)[i][1] for i in range(len(items))]))
        direct = torch.nn.functional.normalize(load_backbone("iresnet18", weights)(x))
    np.testing.assert_allclose(t.templates[:12, 0], direct.numpy(), atol=1e-5)
