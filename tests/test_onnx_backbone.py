"""network=onnx: an ONNX face network run by onnxruntime gives the templates of the same network in torch (the
project's iresnet18 exported with torch.onnx.export), in training's extraction and in the sweep; its input options
(channel order, mean/std, the column crop of 112x96 models) and its errors."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import backbones
from backbones.onnx import OnnxBackbone, OnnxOptions
from backbones.spec import BackboneSpec
from helpers import demo_cfg, synthetic_world
from pipeline import train as finetune
from pipeline.identify_backbone import report_onnx
from pipeline.sweep import evaluate
from templates.entry import open_entry
from utils.errors import UserError

pytest.importorskip("onnxruntime")


def export(net: nn.Module, path, size=(112, 112)) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(2, 3, *size),), str(path), dynamo=False, input_names=["data"],
                          output_names=["fc1"], dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    synthetic_world(root, n_train_ids=6, imgs=2, n_test_ids=8, test_imgs=2, pairs=20, gender=8)
    torch.manual_seed(0)
    net = backbones.iresnet18()
    torch.save(net.state_dict(), root / "r18.pth")
    export(net, root / "r18.onnx")
    return root


def configs(world, tmp_path, *extra):
    common = [f"checkpoint_root={tmp_path / 'ckpt'}", "num_epoch=1", "checkpoint_every=1", "batch_size=4",
              "extract_batch_size=5", "eval_step=100", "plugins=[]", *extra]
    torch_cfg = demo_cfg(world, "network=iresnet18", f"output_ori={world / 'r18.pth'}",
                         f"cache_dir={tmp_path / 'torch'}", *common)
    onnx_cfg = demo_cfg(world, "network=onnx", f"onnx.model={world / 'r18.onnx'}", f"cache_dir={tmp_path / 'onnx'}",
                        *common)
    return torch_cfg, onnx_cfg


def test_onnx_iresnet18_gives_the_torch_templates_in_training_and_in_the_sweep(world, tmp_path):
    torch_cfg, onnx_cfg = configs(world, tmp_path)
    got = {}
    for name, cfg in (("torch", torch_cfg), ("onnx", onnx_cfg)):
        plan = finetune.check_run(cfg, torch.device("cpu"))
        assert plan.cfg.embedding_size == 512     # read from the model's output for onnx
        train, val = finetune.get_templates(plan)
        got[name] = np.array(train.templates), np.array(val[0].templates.templates)
    for a, b in zip(got["torch"], got["onnx"]):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    # the sweep (its own pre-flight and cache): a run trained on the torch templates, swept through each backbone
    run = finetune.train(dataclasses.replace(torch_cfg, eval_step=0))
    reference = {}
    for name, cfg in (("torch", torch_cfg), ("onnx", onnx_cfg)):
        out = evaluate(cfg, tmp_path / f"results_{name}", run.checkpoint_dir.parents[2], "Exp/Synth",
                       tmp_path / f"results_{name}" / "reference.csv")
        entry = open_entry(next((tmp_path / name).glob("bin-synth_a-*")))
        reference[name] = (np.array(entry.templates), (out / f"{run.checkpoint_dir.name}_metrics.csv").read_text())
    assert np.abs(reference["torch"][0] - reference["onnx"][0]).max() < 1e-5
    assert reference["torch"][1] == reference["onnx"][1]    # the same metrics, to the CSV's last digit


class Crop96(nn.Module):
    """A 112x96-input network: what the column crop feeds it is checked against the same crop done by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.fc = nn.Linear(4 * 27 * 23, 32)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_input_options_channel_order_normalisation_and_column_crop(tmp_path):
    torch.manual_seed(1)
    net = Crop96().eval()
    export(net, tmp_path / "crop96.onnx", size=(112, 96))
    x = torch.rand(3, 3, 112, 112) * 2 - 1          # the suite's normalised RGB faces
    opts = OnnxOptions(model=str(tmp_path / "crop96.onnx"), channels="BGR", mean=0.0, std=1.0)
    got = OnnxBackbone(tmp_path / "crop96.onnx", opts)(x)
    pixels = x * 127.5 + 127.5                       # back to 0-255, then what such a model expects, by hand
    with torch.no_grad():
        want = net(pixels.flip(1)[:, :, :, 8:104])
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    spec = BackboneSpec.from_config(demo_cfg(tmp_path, "network=onnx", f"onnx.model={tmp_path / 'crop96.onnx'}"))
    assert spec.template_size() == 32 and spec.fingerprint()["input"]["channels"] == "RGB"


def test_the_cache_key_holds_the_files_content_and_the_input_options(world, tmp_path):
    _, cfg = configs(world, tmp_path)
    spec = BackboneSpec.from_config(cfg)
    moved = tmp_path / "moved.onnx"
    moved.write_bytes((world / "r18.onnx").read_bytes())
    bgr = BackboneSpec.from_config(configs(world, tmp_path, "onnx.channels=BGR")[1])
    same = BackboneSpec.from_config(configs(world, tmp_path, f"onnx.model={moved}")[1])
    assert spec.fingerprint() == same.fingerprint() != bgr.fingerprint()
    moved.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot be loaded by onnxruntime"):
        same.load()


def test_missing_model_option_and_file_are_named(tmp_path):
    with pytest.raises(UserError, match=r"onnx.model=PATH"):
        BackboneSpec.from_config(demo_cfg(tmp_path, "network=onnx")).check()
    with pytest.raises(UserError, match=r"ONNX backbone not found: .*onnx.model"):
        BackboneSpec.from_config(demo_cfg(tmp_path, "network=onnx", f"onnx.model={tmp_path / 'x.onnx'}")).check()
    with pytest.raises(UserError, match="built from its file"):
        backbones.get_backbone("onnx")


def test_identify_backbone_reports_the_onnx_input_and_output(world, capsys):
    rows = report_onnx(world / "r18.onnx", demo_cfg(world), world / "rec" / "synth_a.bin", max_pairs=0,
                       device="cpu")
    out = capsys.readouterr().out
    assert "input  data: shape ['n', 3, 112, 112], tensor(float)" in out
    assert "output fc1: shape ['n', 512]" in out and "templates of 512 values" in out
    assert [r[0] for r in rows] == ["RGB", "BGR"] and all(0 <= r[1] <= 1 for r in rows)


def test_in_the_loop_training_runs_the_onnx_backbone(world, tmp_path):
    """cache=False: the ONNX network runs inside every step; its checkpoint is the torch network's up to Adam's
    amplification of the templates' last-bit differences (BENCHMARKS.md, numerical notes): almost every weight
    within 1e-4, none further than the steps times the learning rate."""
    torch_cfg, onnx_cfg = configs(world, tmp_path, "cache=False", "eval_step=0")
    states = []
    for k, cfg in enumerate((torch_cfg, onnx_cfg)):
        run = finetune.train(dataclasses.replace(cfg, checkpoint_root=str(tmp_path / f"loop{k}")))
        states.append(torch.load(run.checkpoints[-1], weights_only=True))
    steps = int(run.checkpoints[-1].name.split("ftn")[0])
    for key in states[0]:
        diff = (states[0][key] - states[1][key]).abs()
        assert diff.max() <= steps * torch_cfg.lr and (diff < 1e-4).float().mean() > 0.999, key
