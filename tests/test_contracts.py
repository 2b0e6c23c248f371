"""Contracts every registered component keeps, parametrised over the registries' names(): registering a method, an
attacker, a backbone, an identity header or a landmark source (in the code the tests import) puts it under the same
tests as the built-in ones (as timm's list_models)."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import synthetic  # noqa: F401  (registers the demo backbone, itself a registered architecture)
from backbones import ARCHITECTURES, get_backbone, load_backbone
from eval.attackers import ATTACKERS
from eval.gender_leakage import leakage_report
from facedata.align.detectors import DETECTORS, DetectorSpec, Face, build_detector
from helpers import demo_cfg, synthetic_world
from losses import HEADERS, get_header
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
    results = {name: train.train(demo_cfg(root, f"method={name}", *QUICK.get(name, LAYER)))
               for name in METHODS.names()}
    out = sweep.evaluate(demo_cfg(root, "n_jobs=1", "bootstrap=0"), root / "res", root / "ckpt" / "Demo",
                         "Exp/Synth", root / "ref.csv")
    return root, results, out


@pytest.mark.parametrize("name", METHODS.names())
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


@pytest.mark.parametrize("name", METHODS.names())
def test_method_refuses_a_checkpoint_it_did_not_write(name, tmp_path):
    method = get_method(name)(demo_cfg(tmp_path, f"method={name}"))
    path = method.checkpoint_path(tmp_path, 7)
    torch.save({"something.else": torch.zeros(3, 3)}, path)
    assert method.list_checkpoints(tmp_path) == [(7, path)]
    with pytest.raises(UserError, match=path.name):
        method.load_transform(path)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_resumes_or_refuses_to(name, swept, tmp_path):
    """A one-pass method refuses resume=True by name; a trained one leaves a resume state that continues. The run
    continued is a copy: the module's runs stay as trained, whatever order the tests run in."""
    root, results, _ = swept
    cfg = demo_cfg(root, f"method={name}", "resume=True", *QUICK.get(name, LAYER))
    method = get_method(name)(cfg)
    if isinstance(method, PathMethod):
        with pytest.raises(UserError, match="resume"):
            method.check()
        return
    run = shutil.copytree(results[name].checkpoint_dir, tmp_path / "run")
    assert (run / RESUME_FILE).is_file()
    more = train.train(demo_cfg(root, f"method={name}", "resume=True", "num_epoch=3", "checkpoint_every=1",
                                f"output={run}", f"log_output={tmp_path / 'logs'}"))
    assert more.checkpoint_dir == run and more.step > results[name].step
    trained = method.list_checkpoints(results[name].checkpoint_dir)
    assert sorted(p for _, p in trained) == sorted(results[name].checkpoints)   # the module's run is untouched


@pytest.mark.parametrize("name", ATTACKERS.names())
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
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES.names()
                                  if not hasattr(ARCHITECTURES[n], "spec_from_config")])
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


@pytest.mark.parametrize("name", HEADERS.names())
def test_header_gives_the_normalised_softmax_logits_less_a_margin_on_the_target_class(name):
    """Every header: logits s * cos(theta) on the other classes; on the target class s * cos(theta) with m = 0 and
    no spread, and strictly less with a margin (a per-sample one drawn around m = 0.3 with a small spread)."""
    torch.manual_seed(0)
    z, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    plain = get_header(name, 16, 5, 64.0, 0.0, 0.0)
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(plain.kernel, dim=0)
    assert torch.allclose(plain(z, labels, torch.Generator().manual_seed(1)), 64.0 * cos, atol=1e-3)
    margin = get_header(name, 16, 5, 64.0, 0.3, 0.01)
    margin.kernel.data.copy_(plain.kernel.data)
    logits = margin(z, labels, torch.Generator().manual_seed(1))
    target = torch.nn.functional.one_hot(labels, 5).bool()
    assert logits.shape == (6, 5) and torch.isfinite(logits).all()
    assert torch.allclose(logits[~target], 64.0 * cos[~target], atol=1e-3)
    assert (logits[target] < 64.0 * cos[target] - 1.0).all()
    logits.sum().backward()
    assert margin.kernel.grad is not None and torch.isfinite(margin.kernel.grad).all()


@pytest.mark.parametrize("name", DETECTORS.names())
def test_landmark_source_builds_or_refuses_by_name_and_finds_faces_as_five_points(name):
    """Every landmark source, built with no model or landmark file: a UserError naming what is missing, or a
    detector whose faces (none on a flat grey image) come as five (x, y) points and a box."""
    try:
        det = build_detector(DetectorSpec(name))
    except UserError as exc:
        assert str(exc)
        return
    assert isinstance(det.source, str) and det.source and isinstance(det.needs_pixels, bool)
    faces = det.faces(np.full((160, 160, 3), 128, np.uint8), "grey.jpg")
    assert isinstance(faces, list)
    for face in faces:
        assert isinstance(face, Face) and np.shape(face.points) == (5, 2) and np.shape(face.box) == (4,)
