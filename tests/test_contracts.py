"""Contracts every registered component keeps, parametrised over the registries: registering a method, an attacker
or a backbone (in the code the tests import) puts it under the same tests as the built-in ones."""
import csv
import json

import numpy as np
import pytest
import torch

import synthetic  # noqa: F401  (registers the demo backbone, itself a registered architecture)
from backbones import ARCHITECTURES, get_backbone, load_backbone
from eval.attackers import ATTACKERS
from eval.leakage import leakage_report
from helpers import demo_cfg, synthetic_world
from pipeline import sweep, train
from privacy import METHODS, get_method
from privacy.base import PathMethod
from privacy.layer_training import RESUME_FILE
from utils.errors import UserError

# small settings so that each method fits in about a second on the tiny world; a method not named here is run
# with its defaults plus the layer settings (a plug-in registered in the tests' imports is tested that way)
QUICK = {"ive": ["ive.rounds=2", "ive.estimators=10"], "inlp": ["inlp.iterations=2"],
         "pe_miu": ["pe_miu.block_size=128"]}
LAYER = ["num_epoch=2", "checkpoint_every=1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Every registered method trained on the synthetic world, and one sweep over all their runs."""
    root = tmp_path_factory.mktemp("contracts")
    synthetic_world(root, n_train_ids=16, imgs=3, n_test_ids=24, pairs=200, gender=96)
    results = {name: train.train(demo_cfg(root, f"method={name}", *QUICK.get(name, LAYER))) for name in METHODS}
    out = sweep.evaluate(demo_cfg(root, "n_jobs=1", "bootstrap=0"), root / "res", root / "ckpt" / "Demo",
                         "Exp/Synth", root / "ref.csv")
    return root, results, out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_checkpoints_are_listed_loaded_and_swept(name, swept):
    root, results, out = swept
    res = results[name]
    method = get_method(name)(demo_cfg(root, f"method={name}", *QUICK.get(name, LAYER)))
    listed = method.list_checkpoints(res.checkpoint_dir)
    assert sorted(p for _, p in listed) == sorted(res.checkpoints) and len(listed) >= 1
    assert [s for s, _ in listed] == sorted({s for s, _ in listed})
    x = torch.nn.functional.normalize(torch.randn(5, method.cfg.embedding_size), dim=1)
    for _, path in listed:
        with torch.no_grad():
            y = method.load_transform(path)(x)
        assert y.shape[0] == 5 and torch.isfinite(y).all()
    doc = json.loads((res.checkpoint_dir / "run.json").read_text())
    assert doc["method"] == name
    assert set(doc["config"]["groups"]) == ({name} if method.Options is not None else set())
    with open(out / f"{res.checkpoint_dir.name}_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["Step"]) for r in rows] == [s for s, _ in listed]
    for r in rows:
        assert 0 <= float(r["EER"]) <= 1 and 0 <= float(r["BACC-Gender-AVG"]) <= 1 and np.isfinite(float(r["PIC"]))
    assert name in (out / "report.md").read_text()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_refuses_a_checkpoint_it_did_not_write(name, tmp_path):
    method = get_method(name)(demo_cfg(tmp_path, f"method={name}"))
    path = method.checkpoint_path(tmp_path, 7)
    torch.save({"something.else": torch.zeros(3, 3)}, path)
    assert method.list_checkpoints(tmp_path) == [(7, path)]
    with pytest.raises(UserError, match=path.name):
        method.load_transform(path)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_resumes_or_refuses_to(name, swept):
    """A one-pass method refuses resume=True by name; a trained one leaves a resume state that continues."""
    root, results, _ = swept
    cfg = demo_cfg(root, f"method={name}", "resume=True", *QUICK.get(name, LAYER))
    method = get_method(name)(cfg)
    if isinstance(method, PathMethod):
        with pytest.raises(UserError, match="resume"):
            method.check()
        return
    assert (results[name].checkpoint_dir / RESUME_FILE).is_file()
    more = train.train(demo_cfg(root, f"method={name}", "resume=True", "num_epoch=3", "checkpoint_every=1"))
    assert more.checkpoint_dir == results[name].checkpoint_dir and more.step > results[name].step


@pytest.mark.parametrize("name", sorted(ATTACKERS))
def test_attacker_finds_a_plain_signal_and_no_more_than_chance_without_one(name):
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(60), 3)
    genders = ids % 2
    x = rng.normal(size=(len(ids), 8))
    signal = x.copy()
    signal[:, 0] += np.where(genders == 1, 4.0, -4.0)
    found = leakage_report(signal, genders, ids, attackers=(name,), n_bootstrap=0).bacc[name]
    shuffled = rng.permutation(60)[ids] % 2        # labels unrelated to the templates, still per identity
    chance = leakage_report(x, shuffled, ids, attackers=(name,), n_bootstrap=0).bacc[name]
    assert found >= 0.9, f"{name} misses a 4-sigma gender axis: BACC {found:.3f}"
    assert 0.3 <= chance <= 0.7, f"{name} finds a signal that is not there: BACC {chance:.3f}"


# the architectures built from a state dict (network=onnx is built from its own file: tests/test_onnx_backbone.py)
@pytest.mark.parametrize("name", sorted(n for n in ARCHITECTURES if not hasattr(ARCHITECTURES[n], "spec_from_config")))
def test_backbone_builds_maps_faces_to_templates_and_reloads_strictly(name, tmp_path):
    torch.manual_seed(0)
    net = get_backbone(name, num_features=128).train()   # batch statistics: a deep net at random init stays finite
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        out = net(faces)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    with torch.no_grad():
        assert torch.equal(load_backbone(name, path, num_features=128).train()(faces), out)
    state = net.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="partial.pth"):
        load_backbone(name, tmp_path / "partial.pth", num_features=128)
