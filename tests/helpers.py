"""Small synthetic data sets, backbones and configs for the tests (nothing is downloaded)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import nn

from backbones import ARCHITECTURES
from config.options import OPTION_GROUPS
from eval.attackers import ATTACKERS
from facedata.align.detectors import DETECTORS
from losses import HEADERS
from privacy import METHODS
from facedata.bin_builder import build_bin
from templates.cache import TemplateCache
from config.loading import load_config
from synthetic.data import identity_basis, population, save_demo_backbone, write_identity_folders

DIM = 512


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """Whatever the block registers (methods, attackers, backbones, headers, detectors, option groups, plug-in
    modules) is forgotten after it, so that no test's entries reach a later test's ``attackers=['all']`` or sweep
    workers."""
    registries = (METHODS, ATTACKERS, ARCHITECTURES, HEADERS, DETECTORS)
    saved = [r.snapshot() for r in registries]
    groups = dict(OPTION_GROUPS)
    modules = set(sys.modules)
    try:
        yield
    finally:
        for registry, before in zip(registries, saved):
            registry.restore(before)
        OPTION_GROUPS.clear()
        OPTION_GROUPS.update(groups)
        for name in set(sys.modules) - modules:
            if name.startswith("_plugin_"):
                del sys.modules[name]


class TinyNet(nn.Module):
    """A small backbone that is not flip-invariant and has BatchNorm statistics (for freezing tests).

    It computes in float64 and returns float32, so its templates do not depend on how images are batched (a
    float32 convolution's last bits do); the cached/in-the-loop comparison then isolates the training code."""

    def __init__(self, num_features: int = 512, **_):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 27 * 27, num_features)

    def forward(self, x):
        if self.bn.training:  # never when frozen; if it happened, the real running statistics would move
            return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))
        x = x.double()
        with torch.autocast("cpu", enabled=False):
            out = torch.nn.functional.conv2d(x, self.conv.weight.double(), self.conv.bias.double(), stride=4)
            bn = self.bn
            out = torch.nn.functional.batch_norm(out, bn.running_mean.double(), bn.running_var.double(),
                                                 bn.weight.double(), bn.bias.double(), bn.training, bn.momentum,
                                                 bn.eps)
            out = torch.nn.functional.linear(torch.flatten(torch.relu(out), 1), self.fc.weight.double(),
                                             self.fc.bias.double())
        return out.float()


def tiny_backbone_file(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def synthetic_world(root: Path, n_train_ids: int = 40, imgs: int = 4, n_test_ids: int = 24, test_imgs: int = 4,
                    pairs: int = 200, gender: int = 96, seed: int = 0, test_sets: tuple[str, ...] = ("synth_a",),
                    gender_strength: float = 0.2, spread: float = 2.2) -> dict[str, Path]:
    """A demo-style training folder, .bin files and a demo-decoder backbone under ``root``."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    basis = identity_basis(DIM, 48, rng)
    c, g = population(n_train_ids, DIM, rng, gender_strength, direction, basis)
    write_identity_folders(root / "train", c, g, imgs, spread, rng)
    for k, name in enumerate(test_sets):
        c, g = population(n_test_ids, DIM, rng, gender_strength, direction, basis)
        write_identity_folders(root / "test" / name, c, g, test_imgs, spread, rng)
        build_bin(root / "test" / name, root / "rec" / f"{name}.bin", n_pairs=pairs, n_gender=gender, seed=seed + k)
    save_demo_backbone(root / "ckpt" / "Demo" / "reference" / "backbone.pth", DIM)
    return {"data_dir": root / "train", "rec": root / "rec", "backbone": root / "ckpt" / "Demo" / "reference" /
            "backbone.pth"}


def demo_cfg(root: Path, *extra: str, **kw):
    """A config for the synthetic world under ``root``."""
    sets = kw.get("val", ["synth_a"])
    overrides = ["plugins=['synthetic']", "network=demo_decoder", "pretrained=Demo", "experiment=Exp", "data=Synth",
                 f"checkpoint_root={root / 'ckpt'}", f"log_dir={root / 'logs'}", f"data_dir={root / 'train'}",
                 f"rec={root / 'rec'}", f"cache_dir={root / 'cache'}", "batch_size=32", "num_epoch=4",
                 "checkpoint_every=2", "eval_step=0", "log_every=10", f"val_targets={sets!r}",
                 f"test_targets={sets!r}", "num_workers=0", "device=cpu", "n_jobs=1",   # a test of parallelism sets it
                 f"output_ori={root / 'ckpt' / 'Demo' / 'reference' / 'backbone.pth'}", *extra]
    return load_config(None, overrides)


def write_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


def template_cache(cfg, device: str = "cpu") -> TemplateCache:
    """The template cache of a config's backbone and extraction settings."""
    return TemplateCache.from_config(cfg, torch.device(device))
