"""CUDA paths (skipped where no GPU): extraction, autocast, channels_last and training on the GPU."""
import numpy as np
import pytest
import torch

import backbones
import finetune
from helpers import TinyNet, demo_cfg, synthetic_world
from utils.cache import ExtractionSettings, extract
from utils.dataset import scan_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    synthetic_world(root, n_train_ids=40, imgs=4, test_sets=("synth_a",))
    return root


def extracted(world, tmp_path, name, device, **kw):
    torch.manual_seed(0)
    net = backbones.iresnet18().eval()
    out = tmp_path / name
    out.mkdir()
    items = scan_dataset(world / "train").paths[:64]
    extract(net, items, out, ExtractionSettings(torch.device(device), batch_size=16, num_workers=2, **kw))
    return np.load(out / "templates.npy")


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
    common = ["device=cuda", "network=tiny", f"output_ori={tmp_path / 'tiny.pth'}", "batch_size=16", "num_epoch=3", "checkpoint_every=3"]
    a = finetune.train(demo_cfg(world, *common, "cache=True", f"checkpoint_root={tmp_path / 'a'}"))
    b = finetune.train(demo_cfg(world, *common, "cache=False", f"checkpoint_root={tmp_path / 'b'}"))
    sa, sb = (torch.load(r.checkpoints[-1], weights_only=True) for r in (a, b))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=5e-2, rtol=0)
