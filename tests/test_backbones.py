import json
import pickle
from pathlib import Path

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
}


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


def test_sfnet_variants_differ_in_residual_order():
    torch.manual_seed(0)
    new, old = get_backbone("sfnet20"), get_backbone("sfnet20_deprecated")
    block_new, block_old = new.layer1[1], old.layer1[1]
    block_old.load_state_dict(block_new.state_dict())
    x = torch.randn(1, 64, 8, 8)
    a, b = block_new(x), block_old(x)
    c1 = block_new.conv2(torch.relu(block_new.conv1(x)))
    assert torch.allclose(a, torch.relu(x + c1), atol=1e-6)
    assert torch.allclose(b, x + torch.relu(c1), atol=1e-6)
    assert new(torch.randn(2, 3, 112, 112)).shape == (2, 512)


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


def test_sfnet_variant_recognised_from_keys(tmp_path):
    path = tmp_path / "sf.pth"
    torch.save({"module." + k: v for k, v in get_backbone("sfnet20_deprecated").state_dict().items()}, path)
    net = load_backbone("sfnet20", path)
    assert "layer1.0.conv.weight" in net.state_dict()


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
    import finetune
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
        finetune.load_resume(tmp_path / "run", None, None, None, None)
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
