import json
import logging
import pickle
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backbones import (FinetunedModel, FrozenBackbone, ProjectionLayer, get_backbone, iresnet18,
                       load_backbone, load_projection)
from utils.errors import UserError

KEYS = json.loads((Path(__file__).parent / "data" / "state_dict_keys.json").read_text())
JSON_NAME = {
    "iresnet18": "iresnet18", "iresnet34": "iresnet34", "iresnet50": "iresnet50", "iresnet100": "iresnet100",
    "sfnet20_deprecated": "sfnet20_deprecated (OpenSphere; residual adds after the ReLU)",
    "sfnet20": "sfnet20 (OpenSphere, no norm layers; ReLU after the residual add)",
    # OpenSphere v0's sfnet20_deprecated: the current sfnet20's keys, another forward
    "sfnet20_deprecated_v0": "sfnet20 (OpenSphere, no norm layers; ReLU after the residual add)",
}
SFNET = ("sfnet20", "sfnet20_deprecated", "sfnet20_deprecated_v0")


def meta_state(name):
    with torch.device("meta"):
        net = get_backbone(name)
    return [(k, list(v.shape)) for k, v in net.state_dict().items()]


@pytest.mark.parametrize("name", list(JSON_NAME))
def test_state_dict_keys_and_shapes_equal_public_checkpoints(name):
    assert meta_state(name) == [(k, s) for k, s in KEYS[JSON_NAME[name]]]


def test_projection_layer_keys():
    got = [(k, list(v.shape)) for k, v in ProjectionLayer(512, 512, 2).state_dict().items()]
    assert got == [(k, s) for k, s in KEYS["ProjectionLayer(512,512,n_hidden=2)"]]


@pytest.mark.parametrize("name, relu_after_add", [("sfnet20", True), ("sfnet20_deprecated", False),
                                                    ("sfnet20_deprecated_v0", False)])
def test_sfnet_layouts_residual_order(name, relu_after_add):
    torch.manual_seed(0)
    block = get_backbone(name).layer1[1]
    x = torch.randn(1, 64, 8, 8)
    branch = block.conv2(torch.relu(block.conv1(x)))
    want = torch.relu(x + branch) if relu_after_add else x + torch.relu(branch)
    assert torch.allclose(block(x), want, atol=1e-6)
    assert get_backbone(name)(torch.randn(2, 3, 112, 112)).shape == (2, 512)


def test_module_prefix_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    net = iresnet18().eval()
    path = tmp_path / "backbone.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    loaded = load_backbone("iresnet18", path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_checkpoint_of_another_architecture_names_it(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(iresnet18().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_backbone("iresnet50", path)
    msg = str(err.value)
    assert "this file holds an iresnet18" in msg and "config.network is iresnet50" in msg
    assert "missing" in msg and str(path) in msg


def opensphere_file(tmp_path, name, seed=0):
    """An OpenSphere-style file of layout ``name``: DataParallel's 'module.' prefix on the json's keys."""
    torch.manual_seed(seed)
    net = get_backbone(name).eval()
    path = tmp_path / f"{name}.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    return path, net


@pytest.mark.parametrize("name", SFNET)
def test_opensphere_files_of_each_layout_load_strictly_under_their_name(tmp_path, name):
    path, net = opensphere_file(tmp_path, name)
    loaded = load_backbone(name, path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert loaded.layer1[1].relu_after_add == (name == "sfnet20")


@pytest.mark.parametrize("name, other", [("sfnet20", "sfnet20_deprecated_v0"), ("sfnet20_deprecated_v0", "sfnet20")])
def test_file_fitting_two_layouts_logs_one_line_naming_both(tmp_path, caplog, name, other):
    path, _ = opensphere_file(tmp_path, name)
    with caplog.at_level(logging.INFO, logger="genderprivacy.backbones"):
        net = load_backbone(name, path)
    lines = [r.getMessage() for r in caplog.records if r.name == "genderprivacy.backbones"]
    assert len(lines) == 1
    assert name in lines[0] and other in lines[0] and f"--set network={other}" in lines[0].replace(" or ", " --set ")
    assert net.layer1[1].relu_after_add == (name == "sfnet20")  # the configured layout is honoured


def test_unambiguous_file_logs_nothing(tmp_path, caplog):
    path, _ = opensphere_file(tmp_path, "sfnet20_deprecated")
    with caplog.at_level(logging.INFO, logger="genderprivacy.backbones"):
        load_backbone("sfnet20_deprecated", path)
    assert not [r for r in caplog.records if r.name == "genderprivacy.backbones"]


@pytest.mark.parametrize("configured", ["sfnet20", "sfnet20_deprecated_v0"])
def test_sfnet_file_of_the_only_other_fitting_layout_is_used_with_a_warning(tmp_path, caplog, configured):
    path, net = opensphere_file(tmp_path, "sfnet20_deprecated")
    with caplog.at_level(logging.INFO, logger="genderprivacy.backbones"):
        loaded = load_backbone(configured, path)
    assert "layer1.0.conv.weight" in loaded.state_dict()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert any("sfnet20_deprecated" in r.getMessage() and configured in r.getMessage() for r in caplog.records)


def test_conv1_file_under_sfnet20_deprecated_is_refused_naming_both_layouts(tmp_path):
    path, _ = opensphere_file(tmp_path, "sfnet20")
    with pytest.raises(UserError) as err:
        load_backbone("sfnet20_deprecated", path)
    msg = str(err.value)
    assert "config.network is sfnet20_deprecated" in msg
    assert "network=sfnet20 " in msg and "network=sfnet20_deprecated_v0 " in msg
    assert "identify_backbone" in msg


def iresnet18_se_state(seed=0):
    """An ElasticFace SE=True state dict: iresnet18's public keys plus, per block, two bias-free 1x1 SE convs."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in KEYS["iresnet18"]:
        state[key] = (torch.zeros(shape, dtype=torch.long) if key.endswith("num_batches_tracked")
                      else torch.rand(shape, generator=g) + 0.5)
        if key.endswith(".bn3.weight"):
            block, planes = key[:-len("bn3.weight")], shape[0]
            state[block + "se_block.fc1.weight"] = torch.randn(planes // 16, planes, 1, 1, generator=g) * 0.1
            state[block + "se_block.fc2.weight"] = torch.randn(planes, planes // 16, 1, 1, generator=g) * 0.1
    return state


def test_elasticface_se_checkpoint_loads_strictly(tmp_path):
    state = iresnet18_se_state()
    assert not any("se_block" in k and k.endswith("bias") for k in state)
    path = tmp_path / "elasticface_se.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    net = load_backbone("iresnet18", path, use_se=True)
    assert set(net.state_dict()) == set(state)
    with pytest.raises(UserError, match=r"this file holds an iresnet18 with SE blocks.*SE=True"):
        load_backbone("iresnet18", path, use_se=False)


def test_wrong_shapes_and_broken_files_are_clear_errors(tmp_path):
    state = ProjectionLayer(512, 512, 2).state_dict()
    state["proj.2.weight"] = torch.zeros(256, 512)
    bad = tmp_path / "5ftn_layers.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match="does not fit ProjectionLayer"):
        load_projection(bad)
    trunc = tmp_path / "trunc.pth"
    full = tmp_path / "full.pth"
    torch.save(iresnet18().state_dict(), full)
    trunc.write_bytes(full.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated"):
        load_backbone("iresnet18", trunc)
    with pytest.raises(UserError, match="does not exist"):
        load_backbone("iresnet18", tmp_path / "nope.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_backbone("iresnet18", empty)


class Payload:
    def __init__(self, kind, target):
        self.kind, self.target = kind, str(target)

    def __reduce__(self):
        import os
        import subprocess
        if self.kind == "os.system":
            return os.system, (f"touch {self.target}",)
        if self.kind == "subprocess":
            return subprocess.call, (["touch", self.target],)
        return eval, (f"open({self.target!r}, 'w').close()",)


def test_pickled_model_is_refused_with_advice(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(iresnet18(), whole)
    with pytest.raises(UserError, match="not a plain state dict.*state_dict"):
        load_backbone("iresnet18", whole)


@pytest.mark.parametrize("kind", ["os.system", "subprocess", "eval"])
def test_code_in_checkpoints_is_refused_and_never_runs(tmp_path, kind):
    from privacy.layer_training import load_resume
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload(kind, target)}, evil)
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as fh:
        pickle.dump(Payload(kind, target), fh)
    for path in (evil, legacy):
        with pytest.raises(UserError, match="not a plain state dict|could not be read"):
            load_projection(path)
        with pytest.raises(UserError):
            load_backbone("iresnet18", path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "resume.pth").write_bytes(evil.read_bytes())
    with pytest.raises(UserError):
        load_resume(tmp_path / "run", None, None, None, None)
    assert not target.exists()


def test_frozen_backbone_stays_in_eval_mode_without_gradients():
    model = FinetunedModel(iresnet18(), ProjectionLayer())
    model.train()
    assert model.layer.training
    assert not any(m.training for m in model.backbone.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model.layer(torch.nn.functional.normalize(model.backbone.backbone(x)))
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert isinstance(model.backbone, FrozenBackbone)


# tools/identify_backbone.py

def keys_only_file(path, name, use_se=False, num_features=512):
    """A file with ``name``'s keys and shapes whose tensors are stride-0 views of one zero: a few hundred kB."""
    with torch.device("meta"):
        state = get_backbone(name, num_features, use_se).state_dict()
    torch.save({"module." + k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("name, use_se, num_features, expected", [
    ("iresnet50", False, 512, [("iresnet50", False, 512)]),
    ("iresnet100", True, 512, [("iresnet100", True, 512)]),
    ("iresnet50", False, 128, [("iresnet50", False, 128)]),
    ("sfnet20_deprecated", False, 512, [("sfnet20_deprecated", False, 512)]),
    ("sfnet20", False, 512, [("sfnet20", False, 512), ("sfnet20_deprecated_v0", False, 512)]),
])
def test_identify_backbone_lists_every_fitting_layout(tmp_path, capsys, name, use_se, num_features, expected):
    from pipeline.identify_backbone import main, report
    path = keys_only_file(tmp_path / "b.pth", name, use_se, num_features)
    assert [r[:3] for r in report(path)] == expected
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    for candidate, se, nf in expected:
        assert re.search(rf"^\s+{candidate}\s+{se}\s+{nf}\s*$", out, re.M)


def test_identify_backbone_errors_are_one_paragraph(tmp_path, capsys):
    from pipeline.identify_backbone import main
    assert main([str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    state = {k.replace("module.", ""): v for k, v in torch.load(keys_only_file(tmp_path / "r50.pth", "iresnet50"),
                                                                 weights_only=True).items()}
    del state["fc.bias"]
    other = tmp_path / "other.pth"
    torch.save(state, other)
    assert main([str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "fit no known architecture" in err and "closest is iresnet50 (474 of its 475" in err


def face_folder(root, n_ids=6, imgs=4, seed=0):
    """Identities whose images are one random picture plus light noise, half of each gender."""
    rng = np.random.default_rng(seed)
    for k in range(n_ids):
        base = rng.integers(0, 256, (112, 112, 3))
        folder = root / f"person{k}_{k % 2}"
        folder.mkdir(parents=True)
        for i in range(imgs):
            img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"person{k}_{i + 1:04d}.png"), img)
    return root


def test_identify_backbone_prints_each_candidates_eer(tmp_path, capsys):
    from pipeline.identify_backbone import main
    from facedata.bin_builder import build_bin
    good = build_bin(face_folder(tmp_path / "faces"), tmp_path / "good.bin", n_pairs=20, n_gender=8)
    path, _ = opensphere_file(tmp_path, "sfnet20")
    assert main([str(path), "--bin", str(good), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "EER on good.bin (20 pairs)" in out
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(sfnet20\S*)\s+False\s+512\s+([0-9.]+)", out, re.M)}
    assert set(rows) == {"sfnet20", "sfnet20_deprecated_v0"}
    assert all(eer < 0.2 for eer in rows.values()) and "near chance" not in out


class PoolNet(torch.nn.Module):
    """A cheap registered architecture: 8x8 average pooling and a linear read-out."""

    def __init__(self, num_features=512, **_):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 14 * 14, num_features)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.avg_pool2d(x, 8), 1))


def test_identify_backbone_flags_near_chance_eer_of_a_misaligned_two_item_bin(tmp_path, capsys, monkeypatch):
    import backbones
    from pipeline.identify_backbone import report
    from facedata.bin_builder import build_bin
    monkeypatch.setitem(backbones.ARCHITECTURES, "poolnet", PoolNet)
    faces = face_folder(tmp_path / "faces")
    flags = tmp_path / "inverted.csv"  # every pair's same/different flag inverted
    pairs = [(k % 6, (k + k % 2) % 6) for k in range(20)]
    flags.write_text("".join(f"person{a}_{a % 2}/person{a}_0001.png,person{b}_{b % 2}/person{b}_000{2 + (a == b)}"
                             f".png,{int(a != b)}\n" for a, b in pairs))
    bad = build_bin(faces, tmp_path / "bad.bin", pairs_file=flags, two_item=True)
    torch.manual_seed(0)
    path = tmp_path / "pool.pth"
    torch.save(PoolNet().state_dict(), path)
    rows = report(path, bad, device="cpu")
    assert [r[:3] for r in rows] == [("poolnet", False, 512)] and rows[0][3] > 0.2
    assert "near chance" in capsys.readouterr().out


def test_load_backbone_builds_only_the_requested_architecture_while_the_keys_fit(tmp_path):
    """Other architectures are built (to say what the file holds) only when the file does not fit the requested
    one; a spy architecture counts its builds."""
    from helpers import registered
    from backbones import register_architecture
    built = []

    def spy(num_features=512, **_):
        built.append(num_features)
        return torch.nn.Linear(3, num_features)
    state = iresnet18(num_features=64).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    state.pop("fc.bias")
    torch.save(state, tmp_path / "partial.pth")
    with registered():
        register_architecture("spy_test", help="counts its builds")(spy)
        load_backbone("iresnet18", tmp_path / "r18.pth", num_features=64)
        assert built == []
        with pytest.raises(UserError, match="partial.pth"):
            load_backbone("iresnet18", tmp_path / "partial.pth", num_features=64)
        assert built   # the candidates were looked for, the spy among them
