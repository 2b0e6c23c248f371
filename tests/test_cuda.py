"""CUDA paths (skipped where no GPU): extraction, autocast, channels_last and training on the GPU."""
import numpy as np
import pytest
import torch

import backbones
from pipeline import train as finetune
from helpers import TinyNet, demo_cfg, synthetic_world
from backbones.spec import BackboneSpec
from templates.cache import TemplateCache
from templates.extraction import ExtractionSettings
from facedata.dataset import scan_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    synthetic_world(root, n_train_ids=40, imgs=4, test_sets=("synth_a",))
    return root


def extracted(world, tmp_path, name, device, **kw):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    if not weights.exists():
        torch.save(backbones.iresnet18().state_dict(), weights)
    items = scan_dataset(world / "train").paths[:64]
    cache = TemplateCache(tmp_path / name, BackboneSpec("iresnet18", weights),
                          ExtractionSettings(torch.device(device), batch_size=16, num_workers=2, **kw))
    return np.array(cache.get("train", "cuda-test", items).templates)


@pytest.mark.subprocess
def test_cuda_extraction_matches_cpu_and_autocast_is_close(world, tmp_path):
    cpu = extracted(world, tmp_path, "cpu", "cpu")
    gpu = extracted(world, tmp_path, "gpu", "cuda")
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)
    cl = extracted(world, tmp_path, "cl", "cuda", channels_last=True)
    np.testing.assert_allclose(cl, cpu, atol=2e-3)
    bf16 = extracted(world, tmp_path, "bf16", "cuda", amp="bf16")
    cos = (bf16.astype(np.float64) * cpu).sum(-1)
    assert cos.min() > 0.98


def test_training_and_validation_on_cuda(world, tmp_path):
    res = finetune.train(demo_cfg(world, "device=cuda", f"checkpoint_root={tmp_path}", "num_epoch=6",
                                  "eval_step=10", "checkpoint_every=3"))
    state = torch.load(res.checkpoints[-1], weights_only=True)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in state.values())
    assert res.history and all(0 <= h["EER"] <= 1 for h in res.history)
    assert res.epoch_losses[-1]["loss"] < res.epoch_losses[0]["loss"]


def test_cached_and_in_loop_agree_on_cuda(world, tmp_path, monkeypatch):
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyNet)
    from helpers import tiny_backbone_file
    tiny_backbone_file(tmp_path / "tiny.pth")
    common = ["device=cuda", "network=tiny", f"output_ori={tmp_path / 'tiny.pth'}", "batch_size=16", "num_epoch=3",
              "checkpoint_every=3"]
    a = finetune.train(demo_cfg(world, *common, "cache=True", f"checkpoint_root={tmp_path / 'a'}"))
    b = finetune.train(demo_cfg(world, *common, "cache=False", f"checkpoint_root={tmp_path / 'b'}"))
    sa, sb = (torch.load(r.checkpoints[-1], weights_only=True) for r in (a, b))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=5e-2, rtol=0)


def test_elastic_margins_are_drawn_on_the_gpu():
    from losses import ElasticArcFace
    header = ElasticArcFace(8, 4, m=0.5, sigma=0.05).cuda()
    labels = torch.zeros(4096, dtype=torch.long, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")   # a copy from the host would wait for the GPU, and raise here
    try:
        margins = header.margins(labels, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert margins.device.type == "cuda"
    assert abs(margins.mean().item() - 0.5) < 0.01 and abs(margins.std().item() - 0.05) < 0.01


def test_cached_steps_never_wait_for_the_gpu(world, tmp_path, monkeypatch):
    """With CUDA's sync debug mode on, the cached loop (the template cache held on the GPU) waits for the GPU only
    between the steps where it fetches the loss terms (every log_every steps, the epoch ends with the checkpoint):
    5 steps an epoch, 6 epochs, log_every=10 leave at most 3 + 5 of the 29 gaps between steps with a wait (the
    previous design waited in every one). The run's losses match the CPU's."""
    import warnings
    import privacy.layer_training as lt
    common = ["num_epoch=6", "checkpoint_every=6", "log_every=10", "eval_step=0"]
    real, before_step = lt.train_step, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def step(*a, **k):   # the sync warnings seen so far, at the start of each step
            before_step.append(sum("synchroniz" in str(w.message) for w in caught))
            return real(*a, **k)
        monkeypatch.setattr(lt, "train_step", step)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gpu = finetune.train(demo_cfg(world, "device=cuda", *common, f"checkpoint_root={tmp_path / 'g'}"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert gpu.step == len(before_step) == 30
    waits = sum(b > a for a, b in zip(before_step, before_step[1:]))
    assert waits <= 30 // 10 + 5, before_step
    monkeypatch.setattr(lt, "train_step", real)
    cpu = finetune.train(demo_cfg(world, "device=cpu", *common, f"checkpoint_root={tmp_path / 'c'}"))
    for k in ("loss", "ce"):
        assert gpu.epoch_losses[0][k] == pytest.approx(cpu.epoch_losses[0][k], rel=1e-3)
