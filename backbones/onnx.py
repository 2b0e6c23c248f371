"""network=onnx: a face network shipped as an ONNX file (insightface's model zoo and most recent releases), run by
onnxruntime (on the CPU, or with its CUDA provider when that is installed).

The suite's images reach a backbone as RGB 112x112 batches normalised as (pixel/255 - 0.5)/0.5; ``OnnxBackbone``
gives the model its own input instead (size, channel order, mean and std: ``--set onnx.FIELD=...``, insightface's
conventions by default) and returns its templates. ``OnnxSpec`` is the backbone's description for the loader and
the template cache: its weights are the ONNX file (the cache's key holds the file's content hash and the input
options), and the template size is read from the model's output.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbones.spec import BackboneSpec
from config.options import option, register_options
from utils.errors import UserError
from utils.io import sha256_file

IMAGE = 112   # the suite's aligned faces are 112x112


@dataclass
class OnnxOptions:
    """``--set onnx.FIELD=VALUE``: the model file and the input it expects (insightface's conventions by default:
    its ArcFace models, e.g. buffalo_l/w600k_r50.onnx, take 112x112 RGB as (pixel - 127.5) / 127.5)."""
    model: Optional[str] = option(None, "network=onnx: the .onnx file, e.g. insightface's buffalo_l/w600k_r50.onnx")
    height: int = option(0, "model input height; 0: the model's own (112 where the file leaves it open)", ge=0)
    width: int = option(0, "model input width; 0: the model's own (112 where the file leaves it open)", ge=0)
    channels: str = option("RGB", "channel order the model expects (insightface's: RGB)", choices=("RGB", "BGR"))
    mean: float = option(127.5, "subtracted from every 0-255 pixel (insightface's 127.5; mxnet-converted models 0)")
    std: float = option(127.5, "then divided by (insightface's 127.5; mxnet-converted models 1)", gt=0)
    fit: str = option("crop", "a 112x112 face into another input size: crop (the centre, e.g. 112x96 models' "
                      "columns 8-103) or resize (bilinear)", choices=("crop", "resize"))


register_options("onnx", OnnxOptions)


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime_ns: int, threads: int) -> Any:
    """onnxruntime's session of the file (one per file and version): its CUDA provider first when installed."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads    # the threads torch uses, so that both share the cores alike
    opts.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:   # onnxruntime's errors have no common class
        raise UserError(f"ONNX backbone '{path}' (config option onnx.model) cannot be loaded by onnxruntime: "
                        f"{str(e).strip()[:300]}. Check that it is a complete .onnx file (download it again) of a "
                        f"face recognition network.") from None


def session(path: Path) -> Any:
    return _session(str(Path(path).resolve()), Path(path).stat().st_mtime_ns, torch.get_num_threads())


def model_io(path: Path) -> tuple[Any, Any]:
    """The model's one input and one output (name, shape, type); anything else is refused by name."""
    s = session(path)
    ins, outs = s.get_inputs(), s.get_outputs()
    if len(ins) != 1 or len(outs) < 1 or len(ins[0].shape) != 4:
        raise UserError(f"ONNX backbone '{path}' has inputs {[(i.name, i.shape) for i in ins]} and outputs "
                        f"{[(o.name, o.shape) for o in outs]}: network=onnx needs one image input (N, 3, H, W) and "
                        f"templates (N, D) as the first output.")
    return ins[0], outs[0]


def dim(value: Any) -> int | None:
    """A fixed dimension of a shape, or None for a symbolic one ('N', None)."""
    return value if isinstance(value, int) and value > 0 else None


class OnnxBackbone(nn.Module):
    """An ONNX face network as a backbone: the suite's normalised RGB 112x112 batches in, float32 templates out
    (on the input's device). No parameters: the weights are onnxruntime's."""

    def __init__(self, path: Path, opts: OnnxOptions):
        super().__init__()
        self.path, self.opts = Path(path), opts
        inp, out = model_io(self.path)
        self.input_name, self.output_name = inp.name, out.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.size = (opts.height or dim(inp.shape[2]) or IMAGE, opts.width or dim(inp.shape[3]) or IMAGE)
        fixed = (dim(inp.shape[2]), dim(inp.shape[3]))
        if any(f is not None and f != s for f, s in zip(fixed, self.size)):
            raise UserError(f"ONNX backbone '{path}' takes {fixed[0]}x{fixed[1]} images but onnx.height/onnx.width "
                            f"ask for {self.size[0]}x{self.size[1]}: set them to 0 (the model's own).")
        if opts.fit == "crop" and max(self.size) > IMAGE:
            raise UserError(f"ONNX backbone '{path}' takes {self.size[0]}x{self.size[1]} images, larger than the "
                            f"suite's {IMAGE}x{IMAGE} faces: set onnx.fit=resize.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.opts
        x = x.float()
        if o.channels == "BGR":
            x = x.flip(1)
        h, w = self.size
        if (h, w) != tuple(x.shape[2:]):
            if o.fit == "crop":
                top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
                x = x[:, :, top:top + h, left:left + w]
            else:
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        # x = (pixel - 127.5) / 127.5, so (pixel - mean) / std = x * 127.5 / std + (127.5 - mean) / std: with
        # insightface's mean and std this is x itself, the same numbers a torch backbone receives
        if (o.mean, o.std) != (127.5, 127.5):
            x = x * (127.5 / o.std) + (127.5 - o.mean) / o.std
        blob = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self.input_dtype)
        out = session(self.path).run([self.output_name], {self.input_name: blob})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(len(blob), -1)).to(x.device)


@functools.lru_cache(maxsize=8)
def _output_size(path: str, mtime_ns: int, height: int, width: int) -> int:
    out = model_io(Path(path))[1]
    if len(out.shape) == 2 and dim(out.shape[1]):
        return int(out.shape[1])
    # a symbolic template size: run the model once on a blank face
    net = OnnxBackbone(Path(path), OnnxOptions(model=path, height=height, width=width))
    return int(net(torch.zeros(1, 3, IMAGE, IMAGE)).shape[1])


@dataclass(frozen=True)
class OnnxSpec(BackboneSpec):
    """A backbone whose weights are an ONNX file (network=onnx), with the input options it is run with."""
    options: OnnxOptions = dataclasses.field(default_factory=OnnxOptions)

    @classmethod
    def from_config(cls, cfg: Any) -> "OnnxSpec":
        opts = cfg.group("onnx")
        return cls("onnx", Path(opts.model or ""), False, int(cfg.embedding_size), opts)

    def check(self) -> None:
        if not self.options.model:
            raise UserError("network=onnx needs the model file: --set onnx.model=PATH (e.g. insightface's "
                            "buffalo_l/w600k_r50.onnx; README: 'ONNX backbones').")
        if not self.weights.is_file():
            raise UserError(f"ONNX backbone not found: '{self.weights}' (config option onnx.model). Download it "
                            f"(README: 'ONNX backbones') or correct the path.")

    def load(self) -> nn.Module:
        self.check()
        return OnnxBackbone(self.weights, self.options).eval()

    def template_size(self) -> int | None:
        self.check()
        return _output_size(str(self.weights.resolve()), self.weights.stat().st_mtime_ns, self.options.height,
                            self.options.width)

    def fingerprint(self) -> dict[str, object]:
        """The file's content and every input option (the model path itself is not: a moved file keeps its rows)."""
        self.check()
        inputs = {k: v for k, v in dataclasses.asdict(self.options).items() if k != "model"}
        return {"arch": "onnx", "onnx_sha256": sha256_file(self.weights), "input": inputs}


class OnnxArchitecture:
    """The registry's entry of network=onnx: built from its file (OnnxSpec), never randomly initialised."""
    spec_from_config = staticmethod(OnnxSpec.from_config)

    def __call__(self, num_features: int = 512, use_se: bool = False) -> nn.Module:
        raise UserError("network=onnx is built from its file, not from a state dict: set --set onnx.model=PATH "
                        "(README: 'ONNX backbones').")
