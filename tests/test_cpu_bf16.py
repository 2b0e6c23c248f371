"""bfloat16 extraction on the CPU (amp=bf16): used when asked, close to float32, refused by name where the processor
has no bfloat16 instructions; and the extraction's progress lines when there is no terminal."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import backbones
import utils.device
from backbones.spec import BackboneSpec
from helpers import demo_cfg, registered, synthetic_world, write_png
from templates.cache import TemplateCache
from templates.extraction import ExtractionSettings, ProgressLines, duration
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
needs_bf16 = pytest.mark.skipif(not utils.device.cpu_bf16_instructions(),
                                reason="this processor has no bfloat16 instructions")
SEEN: list[torch.dtype] = []   # the dtype of every convolution's output, recorded by a forward hook


class SmallNet(nn.Module):
    """Two convolutions with BatchNorm and PReLU, then a linear layer: iresnet's kinds of layers, small."""

    def __init__(self, num_features: int = 64, **_):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.PReLU(16), nn.Flatten())
        self.fc = nn.Linear(16 * 28 * 28, num_features)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda mod, inp, out: SEEN.append(out.dtype))

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    items = [write_png(tmp_path / "img" / f"{i}.png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
             for i in range(24)]
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        for m in net.body:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "small.pth")
    with registered():
        backbones.register_architecture("small", SmallNet)
        yield items, tmp_path


def extract(tmp_path, items, name, **kw):
    SEEN.clear()
    cache = TemplateCache(tmp_path / name, BackboneSpec("small", tmp_path / "small.pth", num_features=64),
                          ExtractionSettings(torch.device("cpu"), batch_size=8, num_workers=0, **kw))
    return np.array(cache.get("set", "bf16-test", items).templates, dtype=np.float64), list(SEEN)


@needs_bf16
def test_bf16_extraction_runs_in_bf16_and_stays_within_the_stated_cosine(small):
    items, tmp_path = small
    ref, seen32 = extract(tmp_path, items, "f32")
    bf16, seen16 = extract(tmp_path, items, "bf16", amp="bf16", channels_last=True)
    # bf16 in every extraction forward (3 batches, image and flip, 2 convolutions); float32 only in the one check
    # of the first batch against float32 (check_autocast)
    assert seen32 == [torch.float32] * 12
    assert seen16.count(torch.bfloat16) == 12 and seen16.count(torch.float32) == 2
    cos = (ref * bf16).sum(-1)                      # rows are unit vectors: image and flip
    assert cos.min() >= 0.999 and not np.array_equal(ref, bf16)


@needs_bf16
def test_bf16_templates_have_a_cache_entry_of_their_own(small):
    items, tmp_path = small
    spec = BackboneSpec("small", tmp_path / "small.pth", num_features=64)
    keys = {amp: TemplateCache(tmp_path, spec, ExtractionSettings(torch.device("cpu"), amp=amp)).key("x")
            for amp in ("none", "bf16")}
    assert keys["none"] != keys["bf16"]


def test_bf16_is_refused_by_name_where_the_processor_has_no_bf16(monkeypatch):
    monkeypatch.setattr(utils.device, "cpu_bf16_instructions", lambda: ())
    with pytest.raises(UserError, match=r"'amp' is bf16 .*no bfloat16 instructions.*amp=none"):
        ExtractionSettings(torch.device("cpu"), amp="bf16")
    with pytest.raises(UserError, match=r"'amp' is fp16, which runs on CUDA only"):
        ExtractionSettings(torch.device("cpu"), amp="fp16")
    assert ExtractionSettings(torch.device("cpu")).amp == "none"     # float32 stays the default


def test_bf16_detection_reads_the_processor_flags(monkeypatch):
    """Where PyTorch's cpuinfo does not say, /proc/cpuinfo's flags are read."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)
    monkeypatch.setattr(utils.device.Path, "read_text", lambda self: "flags\t: fpu avx512f avx512_bf16 sse\n")
    utils.device.cpu_bf16_instructions.cache_clear()
    try:
        assert utils.device.cpu_bf16_instructions() == ("avx512_bf16",)
    finally:
        utils.device.cpu_bf16_instructions.cache_clear()


def test_progress_lines_at_a_steady_interval_of_the_clock():
    now = [0.0]
    lines = ProgressLines("extracting images", 1000, every=30.0, clock=lambda: now[0])
    said = []
    for done in range(100, 1001, 100):     # 100 images every 10 s: 10 images/s
        now[0] += 10.0
        said.append(lines.update(done))
    assert [s is not None for s in said] == [False, False, True, False, False, True, False, False, True, False]
    assert said[2] == "extracting images: 300/1000 (30%), 10.0 images/s, about 1 min 10 s left"
    assert duration(7325) == "2 h 02 min" and duration(44.6) == "45 s"


def test_progress_lines_appear_with_output_redirected_to_a_file(tmp_path):
    """finetune.py's extraction, output to a file (no terminal): a line per batch with progress_every=0."""
    synthetic_world(tmp_path, n_train_ids=8, imgs=4, pairs=20, gender=16)
    cfg = demo_cfg(tmp_path)   # the same settings on the command line
    out = tmp_path / "out.txt"
    args = ["plugins=['synthetic']", "network=demo_decoder", "pretrained=Demo", f"data_dir={cfg.data_dir}",
            f"output_ori={cfg.output_ori}", f"checkpoint_root={tmp_path / 'ckpt'}", f"log_dir={tmp_path / 'logs'}",
            f"cache_dir={tmp_path / 'cache'}", "num_epoch=1", "eval_step=0", "val_targets=[]", "num_workers=0",
            "device=cpu", "batch_size=8", "extract_batch_size=8", "progress_every=0"]
    with open(out, "w") as fh:
        subprocess.run([sys.executable, str(REPO / "finetune.py"), "--set", *args],
                       stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True, cwd=tmp_path)
    lines = [m for m in re.findall(r"INFO extracting training images of \S+: (\d+/\d+) .*", out.read_text())]
    assert lines == ["8/32", "16/32", "24/32", "32/32"], out.read_text()[-2000:]
    lines = re.findall(r"INFO extracting training images of .*", out.read_text())
    assert "images/s" in lines[0] and "left" in lines[0]
    # the sweep's extraction of the .bin's images (pairs and gender test), output to a file as well
    sweep = tmp_path / "sweep.txt"
    with open(sweep, "w") as fh:
        subprocess.run([sys.executable, str(REPO / "eval" / "evaluation.py"), "--log-root", str(tmp_path / "res"),
                        "--model-root", str(tmp_path / "ckpt" / "Demo"), "--experiment-name", "OneDataset/ColorFeret",
                        "--reference-pth", str(tmp_path / "res" / "reference.csv"), "--set", *args,
                        f"rec={cfg.rec}", "test_targets=['synth_a']", "n_jobs=1"],
                       stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True, cwd=tmp_path)
    done = re.findall(r"INFO extracting images of synth_a.bin: (\d+)/(\d+) ", sweep.read_text())
    assert len(done) >= 2 and done[-1][0] == done[-1][1], sweep.read_text()[-2000:]


class OffsetNet(SmallNet):
    """SmallNet whose output passes through a large offset: exact in float32, while bfloat16 (8 bits of mantissa)
    keeps little of it; an ill-conditioned network in miniature."""

    def forward(self, x):
        return (self.fc(self.body(x)) + 4096.0) - 4096.0


@needs_bf16
def test_a_network_bf16_moves_is_named_in_a_warning(small, caplog):
    items, tmp_path = small
    backbones.register_architecture("offset", OffsetNet)
    cache = TemplateCache(tmp_path / "offset", BackboneSpec("offset", tmp_path / "small.pth", num_features=64),
                          ExtractionSettings(torch.device("cpu"), batch_size=8, num_workers=0, amp="bf16"))
    with caplog.at_level("INFO", logger="genderprivacy"):
        cache.get("set", "offset", items)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "amp=bf16 moves" in r.getMessage()]
    assert len(warned) == 1 and "use amp=none" in warned[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="genderprivacy"):
        extract(tmp_path, items, "fine", amp="bf16")
    assert any("lie within cosine" in r.getMessage() for r in caplog.records)
    assert not any("amp=bf16 moves" in r.getMessage() for r in caplog.records)
