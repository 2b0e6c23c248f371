import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones
from pipeline import train as finetune
from backbones import load_projection
from helpers import TinyNet, demo_cfg, synthetic_world, tiny_backbone_file
from losses import ArcFace
from facedata.dataset import decode_image, scan_dataset, to_tensor
from utils.errors import UserError


def tensors(path):
    return torch.load(path, weights_only=True)


def same_weights(a, b, atol=0.0):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol:
            torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0)
        else:
            assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synthetic_world(root, n_train_ids=60, imgs=4)
    return root


@pytest.fixture
def tiny_world(tmp_path, monkeypatch):
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyNet)
    synthetic_world(tmp_path, n_train_ids=8, imgs=4, test_sets=())
    tiny_backbone_file(tmp_path / "tiny.pth")
    return tmp_path


def centroid_angle(z, genders):
    z = F.normalize(z.double(), dim=1)
    c = F.normalize(torch.stack([z[genders == g].mean(0) for g in (0, 1)]), dim=1)
    return math.degrees(torch.acos((c[0] @ c[1]).clamp(-1, 1)).item())


def test_training_lowers_loss_aligns_genders_and_keeps_identities(world, tmp_path):
    cfg = demo_cfg(world, f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}", "num_epoch=40",
                   "checkpoint_every=40")
    res = finetune.train(cfg)
    first, last = res.epoch_losses[0], res.epoch_losses[-1]
    assert last["loss"] < 0.5 * first["loss"] and last["ce"] < first["ce"]
    # the layer's outputs on the training templates
    index = scan_dataset(cfg.data_dir)
    x = F.normalize(backbones.load_backbone("demo_decoder", cfg.output_ori)(torch.stack(
        [to_tensor(decode_image(np.fromfile(p, dtype=np.uint8))[0]) for p in index.paths])).detach())
    layer = load_projection(res.checkpoints[-1])
    with torch.no_grad():
        z = layer(x)
    g = torch.as_tensor(index.genders)
    before, after = centroid_angle(x, g), centroid_angle(z, g)
    assert before > 15 and after < before / 3, (before, after)
    header = ArcFace(512, index.num_identities)
    header.load_state_dict(tensors(Path(res.checkpoint_dir) / f"{res.step}header.pth"))
    with torch.no_grad():
        acc = (header(z, torch.as_tensor(index.labels)).argmax(1) == torch.as_tensor(index.labels)).float().mean()
    assert acc > 0.9
    assert (Path(res.log_dir) / "training.log").read_text().count("single-gender batches") >= 1


def test_cached_and_in_the_loop_training_give_the_same_checkpoints(tiny_world):
    common = ["network=tiny", f"output_ori={tiny_world / 'tiny.pth'}", "batch_size=8", "num_epoch=50",
              "checkpoint_every=50", "eval_step=0"]
    a = finetune.train(demo_cfg(tiny_world, *common, "cache=True", f"checkpoint_root={tiny_world / 'a'}"))
    b = finetune.train(demo_cfg(tiny_world, *common, "cache=False", f"checkpoint_root={tiny_world / 'b'}"))
    assert a.step == b.step == 200
    same_weights(a.checkpoints[-1], b.checkpoints[-1], atol=1e-4)
    same_weights(Path(a.checkpoint_dir) / "200header.pth", Path(b.checkpoint_dir) / "200header.pth", atol=1e-4)
    # the in-the-loop run's weights really moved from their seeded initialisation (so the comparison above is
    # between two trained layers, not two copies of the initial one)
    torch.manual_seed(0)
    init = backbones.ProjectionLayer(512, 512, 2).state_dict()
    trained = tensors(b.checkpoints[-1])
    assert all((trained[k] - init[k]).abs().max() > 1e-2 for k in init)


def test_backbone_and_its_statistics_never_change(tiny_world, monkeypatch):
    """In-the-loop training (the model put in train mode by every step, as the authors' loop did) leaves the
    backbone's weights and BatchNorm statistics exactly as loaded."""
    seen = []
    real = backbones.FrozenBackbone.__init__

    def spy(self, net):
        real(self, net)
        seen.append((self, {k: v.clone() for k, v in net.state_dict().items()}))
    monkeypatch.setattr(backbones.FrozenBackbone, "__init__", spy)
    cfg = demo_cfg(tiny_world, "network=tiny", f"output_ori={tiny_world / 'tiny.pth'}", "batch_size=8", "cache=False",
                   "num_epoch=2", "checkpoint_every=1")
    res = finetune.train(cfg)
    assert res.step == 8 and len(seen) == 1
    frozen, before = seen[0]
    after = frozen.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not frozen.backbone.bn.training
    model = backbones.FinetunedModel(frozen, backbones.ProjectionLayer())
    model.train()
    assert not frozen.backbone.bn.training


def test_same_seed_bit_identical_and_resume_equals_uninterrupted(world, tmp_path):
    base = ["num_epoch=6", "checkpoint_every=2"]
    a = finetune.train(demo_cfg(world, *base, f"checkpoint_root={tmp_path / 'a'}", f"log_dir={tmp_path / 'la'}"))
    b = finetune.train(demo_cfg(world, *base, f"checkpoint_root={tmp_path / 'b'}", f"log_dir={tmp_path / 'lb'}"))
    same_weights(a.checkpoints[-1], b.checkpoints[-1])
    # interrupted after epoch 4, then resumed to epoch 6
    part = ["checkpoint_every=2", f"checkpoint_root={tmp_path / 'r'}", f"log_dir={tmp_path / 'lr'}"]
    first = finetune.train(demo_cfg(world, "num_epoch=4", *part))
    resumed = finetune.train(demo_cfg(world, "num_epoch=6", "resume=True", *part))
    assert resumed.checkpoint_dir == first.checkpoint_dir and resumed.step == a.step
    same_weights(resumed.checkpoints[-1], a.checkpoints[-1])
    same_weights(Path(resumed.checkpoint_dir) / f"{a.step}header.pth", Path(a.checkpoint_dir) / f"{a.step}header.pth")
    assert "resumed from" in (Path(resumed.log_dir) / "training.log").read_text()
    c = finetune.train(demo_cfg(world, *base, "seed=1", f"checkpoint_root={tmp_path / 'c'}",
                                f"log_dir={tmp_path / 'lc'}"))
    assert not torch.equal(tensors(c.checkpoints[-1])["proj.0.weight"], tensors(a.checkpoints[-1])["proj.0.weight"])


def test_resume_with_a_generator_state_of_another_device(world, tmp_path):
    """A CUDA run's margin-noise generator state (16 bytes) does not fit a CPU generator and back: the run resumes
    with the generator as seeded, and says so."""
    part = ["checkpoint_every=1", f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}"]
    first = finetune.train(demo_cfg(world, "num_epoch=1", *part))
    resume = Path(first.checkpoint_dir) / "resume.pth"
    state = tensors(resume)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)   # a CUDA (Philox) generator's state
    torch.save(state, resume)
    resumed = finetune.train(demo_cfg(world, "num_epoch=2", "resume=True", *part))
    assert resumed.step == 2 * first.step
    assert "saved on another kind of device" in (Path(resumed.log_dir) / "training.log").read_text()


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_leaves_the_first_untouched(world, tmp_path):
    args = (f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}", "num_epoch=2")
    first = finetune.train(demo_cfg(world, *args))
    snap_ckpt, snap_log = digest(first.checkpoint_dir), digest(first.log_dir)
    second = finetune.train(demo_cfg(world, *args))
    assert second.checkpoint_dir == first.checkpoint_dir.with_name(first.checkpoint_dir.name + "_2")
    assert second.log_dir.name.endswith("_2")
    assert digest(first.checkpoint_dir) == snap_ckpt and digest(first.log_dir) == snap_log
    assert "already used" in (second.log_dir / "training.log").read_text()
    rows = (first.log_dir / "config.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("pretrained,")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    import privacy.angular
    real = privacy.angular.privacy_terms
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        t = real(*a, **k)
        return t._replace(p2=t.p2 * float("nan")) if calls["n"] == 13 else t
    monkeypatch.setattr(privacy.angular, "privacy_terms", flaky)
    cfg = demo_cfg(world, f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}", "num_epoch=6",
                   "checkpoint_every=1")
    with pytest.raises(UserError,
                       match=r"step 13: the loss term\(s\) p2, loss became non-finite.*last good checkpoint"):
        finetune.train(cfg)
    ckpts = sorted((tmp_path / "c").rglob("*ftn_layers.pth"))
    assert [p.name for p in ckpts] == ["7ftn_layers.pth"]  # 7 steps per epoch; step 13 broke
    for p in ckpts:
        assert all(torch.isfinite(v).all() for v in tensors(p).values())


def test_weights_gone_non_finite_on_an_epochs_last_step_are_never_saved(world, tmp_path, monkeypatch):
    """Step 14 ends epoch 2 with finite loss terms but an update that leaves a weight infinite: no term of that
    step can show it, so the check before the checkpoint must."""
    import privacy.layer_training as lt
    real, calls = lt.train_step, {"n": 0}

    def step(x, ids, genders, layer, *a, **k):
        out = real(x, ids, genders, layer, *a, **k)
        calls["n"] += 1
        if calls["n"] == 14:
            with torch.no_grad():
                next(layer.parameters()).view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(lt, "train_step", step)
    cfg = demo_cfg(world, f"checkpoint_root={tmp_path / 'c'}", f"log_dir={tmp_path / 'l'}", "num_epoch=4",
                   "checkpoint_every=1")
    with pytest.raises(UserError, match=r"at step 14 the weights .* are non-finite .*last good checkpoint is .*7ftn"):
        finetune.train(cfg)
    assert [p.name for p in sorted((tmp_path / "c").rglob("*ftn_layers.pth"))] == ["7ftn_layers.pth"]


def test_steps_leave_the_loss_terms_on_the_device(world, tmp_path, monkeypatch):
    """No host read per step: during training, the project's code reads a tensor on the host (tolist, item, cpu,
    float, bool, int; each one a wait for the GPU on CUDA) only at the fetch points (every log_every steps, at
    epoch ends) and to write checkpoints; torch's own host-side reads (Adam's step counters) are not counted. With
    log_every=1 the same counter sees a read at every step, as every step of the previous design made."""
    import privacy.layer_training as lt
    repo, here = str(Path(lt.__file__).resolve().parents[1]), str(Path(__file__).resolve())
    seen = {"on": False, "reads": 0, "steps": 0}

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if seen["on"] and caller.startswith(repo) and caller != here and "site-packages" not in caller:
                seen["reads"] += 1
            return real(self, *a, **k)
        return read
    for name in ("tolist", "item", "cpu", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    real_step, real_train = lt.train_step, lt.train_layer

    def step(*a, **k):
        seen["on"] = True
        seen["steps"] += 1
        return real_step(*a, **k)

    def train(*a, **k):
        try:
            return real_train(*a, **k)
        finally:
            seen["on"] = False
    monkeypatch.setattr(lt, "train_step", step)
    monkeypatch.setattr(lt, "train_layer", train)

    def run(log_every, name):
        seen.update(reads=0, steps=0)
        res = finetune.train(demo_cfg(world, "num_epoch=3", "checkpoint_every=3", f"log_every={log_every}",
                                      f"checkpoint_root={tmp_path / name}", f"log_dir={tmp_path / ('l' + name)}"))
        header = Path(res.checkpoint_dir) / f"{res.step}header.pth"
        per_checkpoint = len(tensors(res.checkpoints[0])) + len(tensors(header))
        return res, seen["reads"], seen["steps"], per_checkpoint
    res, reads, steps, per_checkpoint = run(1000, "a")
    assert steps == res.step == 21 and len(res.checkpoints) == 1
    # one fetch per epoch, and at the checkpoint one check of the weights and their own copies
    assert 0 < reads <= steps // 1000 + 3 + 1 + per_checkpoint < steps
    res, reads, steps, _ = run(1, "b")
    assert reads >= steps == 21


def test_unwritable_output_is_detected_before_any_compute(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = demo_cfg(world, f"checkpoint_root={blocker}", f"cache_dir={tmp_path / 'fresh_cache'}")
    with pytest.raises(UserError, match="cannot write"):
        finetune.train(cfg)
    assert not (tmp_path / "fresh_cache").exists()
    with pytest.raises(UserError, match="validation file"):
        finetune.train(demo_cfg(world, "eval_step=5", "val_targets=['nope']"))


def test_main_prints_a_one_paragraph_error(tmp_path, capsys):
    code = finetune.main(["--set", f"data_dir={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: training data folder") and "Traceback" not in err


def test_in_the_loop_mode_reports_every_undecodable_image_before_training(tiny_world, tmp_path):
    first, second = sorted((tiny_world / "train").iterdir())[:2]
    (first / "bad.png").write_bytes(b"not an image")
    (second / "worse.png").write_bytes(b"\x89PNG\r\n")
    cfg = demo_cfg(tiny_world, "network=tiny", f"output_ori={tiny_world / 'tiny.pth'}", "cache=False",
                   f"checkpoint_root={tmp_path / 'c'}")
    with pytest.raises(UserError, match="2 problem.*bad.png.*worse.png|2 problem.*worse.png.*bad.png"):
        finetune.train(cfg)
    assert not list((tmp_path / "c").rglob("*.pth"))
