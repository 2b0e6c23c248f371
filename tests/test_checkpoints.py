"""Real checkpoints as people save them (issue 23 part 3): containers unwrapped and named in the log, anything else
refused with its keys listed; the template size read from the weights for any architecture; plug-in architectures
seen by tools/identify_backbone.py, and a "closest" layout offered only when a real share of its keys fits."""
import logging

import pytest
import torch
from torch import nn

from backbones import (ARCHITECTURES, candidate_architectures, embedding_size_for, iresnet18, load_backbone,
                       template_size)
from config.loading import load_config
from pipeline import identify_backbone
from helpers import registered
from utils.errors import UserError
from utils.io import extract_state_dict


class MiniFaceNet(nn.Module):
    """A small network of another family (like a MobileFaceNet plug-in): its output layer is neither fc nor
    readout."""

    def __init__(self, num_features: int = 512, **_):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.stem(x))))


class FixedNet(nn.Module):
    """A plug-in whose builder ignores num_features: its template size is whatever its output is (48)."""

    def __init__(self, **_):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4 * 14 * 14, 48))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "minifacenet", MiniFaceNet)
    monkeypatch.setitem(ARCHITECTURES, "fixednet", FixedNet)


CONTAINERS = [
    lambda s: {"state_dict": s, "epoch": 3},
    lambda s: {"epoch": 12, "net_state_dict": s, "optimizer": {"lr": 0.1}},
    lambda s: {"model": s},
    lambda s: {"model_state_dict": s, "loss": 0.4},
    lambda s: {"backbone": s, "header": {"kernel": torch.zeros(2)}},
    lambda s: {"net": {f"module.{k}": v for k, v in s.items()}},
    lambda s: {"model": {"state_dict": s}},
    lambda s: {f"module.{k}": v for k, v in s.items()},
]
KEYS = ["['state_dict']", "['net_state_dict']", "['model']", "['model_state_dict']", "['backbone']", "['net']",
        "['model']['state_dict']", None]


@pytest.mark.parametrize("case", range(len(CONTAINERS)))
def test_every_container_loads_and_the_log_names_the_key(plugins, tmp_path, caplog, case):
    torch.manual_seed(0)
    net = MiniFaceNet(128).eval()
    path = tmp_path / "ckpt.pth"
    torch.save(CONTAINERS[case](net.state_dict()), path)
    with caplog.at_level(logging.INFO):
        loaded = load_backbone("minifacenet", path, 128)
    x = torch.rand(2, 3, 112, 112)
    assert torch.equal(loaded(x), net(x))
    used = [r.getMessage() for r in caplog.records if "weights read from the checkpoint's entry" in r.getMessage()]
    assert used == ([] if KEYS[case] is None else [f"backbone weights '{path}': weights read from the checkpoint's "
                                                   f"entry {KEYS[case]}"])


def test_a_non_container_is_refused_with_its_keys_and_types(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"epoch": 3, "weights": [torch.zeros(2)], "opt": {"lr": 0.1}, "emb": torch.zeros(4, 2)}, path)
    with pytest.raises(UserError) as err:
        extract_state_dict(torch.load(path, weights_only=True), path, "backbone weights")
    msg = str(err.value)
    assert "'epoch' (int)" in msg and "'weights' (list of 1)" in msg and "'opt' (dict of 1)" in msg
    assert "'emb' (Tensor (4, 2))" in msg and "net_state_dict" in msg
    with pytest.raises(UserError, match="but an empty dict"):
        extract_state_dict({}, path, "backbone weights")


def test_template_size_is_read_from_the_weights_for_any_architecture(plugins, tmp_path):
    state = MiniFaceNet(128).state_dict()
    assert template_size("minifacenet", state) == 128
    assert ("minifacenet", False, 128) in candidate_architectures(state)
    assert template_size("fixednet", FixedNet().state_dict()) == 48           # from the network's output
    assert template_size("iresnet18", state) is None                          # another family: no size
    assert template_size("iresnet18", iresnet18(num_features=64).state_dict()) == 64
    torch.save({"net_state_dict": state}, tmp_path / "mfn.pth")
    cfg = load_config(None, ["network=minifacenet", f"output_ori={tmp_path / 'mfn.pth'}"])
    assert cfg.embedding_size == 512 and embedding_size_for(cfg).embedding_size == 128


def test_an_unknown_size_names_the_option(plugins, tmp_path):
    torch.save({"x.weight": torch.zeros(3, 3)}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="embedding_size"):
        load_backbone("minifacenet", tmp_path / "odd.pth", 512)


PLUGIN = """
import torch
from torch import nn
from backbones import register_architecture


class PluginNet(nn.Module):
    def __init__(self, num_features=512, **_):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, num_features, bias=False))

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.stem(x))))


register_architecture("mfn_plugin", PluginNet)
"""


def test_identify_backbone_sees_plugins_and_offers_a_closest_layout_only_when_it_is_close(tmp_path, capsys):
    plugin = tmp_path / "mfn_plugin.py"
    plugin.write_text(PLUGIN)
    with registered():   # the plug-in's architecture is forgotten after the test
        weights = {"stem.weight": torch.zeros(8, 3, 7, 7), "stem.bias": torch.zeros(8),
                   "head.1.weight": torch.zeros(128, 32)}
        assert identify_backbone.main([str(_save(tmp_path / "mfn.pth", {"net_state_dict": weights})), "--set",
                                       f"plugins=['{plugin}']"]) == 0
        out = capsys.readouterr().out
        assert "mfn_plugin" in out and "network=mfn_plugin SE=False embedding_size=128" in out
        # a file sharing no key with any layout: no "closest" offered
        with pytest.raises(UserError, match="no registered architecture shares even 50%"):
            identify_backbone.identify(_save(tmp_path / "odd.pth", {"a.weight": torch.zeros(2)}))
        # an iresnet18 missing one tensor: most keys fit, the closest is offered
        state = iresnet18().state_dict()
        state.pop("fc.bias")
        with pytest.raises(UserError, match="the closest is iresnet18 "):
            identify_backbone.identify(_save(tmp_path / "r18.pth", state))
    assert "mfn_plugin" not in ARCHITECTURES


def _save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("names, named", [
    (["6ftn_layers.pth", "0006ftn_layers.pth", "12ftn_layers.pth"], ["0006ftn_layers.pth and 6ftn_layers.pth"]),
    (["abcftn_layers.pth", "12ftn_layers.pth"], ["'abcftn_layers.pth'"]),
    (["ftn_layers.pth", "1_ftn_layers.pth", "6ftn_layers.pth", "06ftn_layers.pth"],
     ["'ftn_layers.pth'", "'1_ftn_layers.pth'", "06ftn_layers.pth and 6ftn_layers.pth"])])
def test_checkpoint_names_that_are_not_one_step_each_are_refused_naming_them(tmp_path, names, named):
    from config.loading import config_from_dict
    from privacy import get_method
    method = get_method("angular")(config_from_dict({}, "test"))
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match="run folder") as err:
        method.list_checkpoints(tmp_path)
    assert all(n in str(err.value) for n in named), str(err.value)


def test_checkpoints_are_listed_in_step_order_with_other_files_left_alone(tmp_path):
    from config.loading import config_from_dict
    from privacy import get_method
    method = get_method("angular")(config_from_dict({}, "test"))
    for name in ["24ftn_layers.pth", "0006ftn_layers.pth", "12ftn_layers.pth", "12header.pth", "resume.pth",
                 "run.json", ".12ftn_layers.pth.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert method.list_checkpoints(tmp_path) == [(6, tmp_path / "0006ftn_layers.pth"),
                                                 (12, tmp_path / "12ftn_layers.pth"),
                                                 (24, tmp_path / "24ftn_layers.pth")]
