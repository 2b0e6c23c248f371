"""The one description of a backbone (architecture, weights file, SE option, template size) that both the loader
and the template cache's key use, so the two can never drift apart."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from backbones.architectures import ARCHITECTURES
from backbones.weights import file_template_size, load_backbone
from utils.errors import UserError
from utils.io import sha256_file


@dataclass(frozen=True)
class BackboneSpec:
    network: str
    weights: Path
    use_se: bool = False
    num_features: int = 512

    @classmethod
    def from_config(cls, cfg) -> "BackboneSpec":
        """The backbone of config options network, output_ori, SE and embedding_size; a registered network that is
        built from its own file (network=onnx) gives its own description."""
        own = getattr(ARCHITECTURES.get(cfg.network), "spec_from_config", None)
        if own is not None:
            return own(cfg)
        return cls(cfg.network, Path(cfg.output_ori), bool(cfg.SE), int(cfg.embedding_size))

    def check(self) -> None:
        """The weights file exists (before any compute)."""
        if not self.weights.is_file():
            raise UserError(f"backbone weights not found: '{self.weights}' (config option output_ori, by default "
                            f"checkpoint_root/pretrained/reference/backbone.pth). Download the pretrained backbone "
                            f"there (README: 'Pretrained backbones') or set output_ori.")

    def load(self) -> nn.Module:
        """The pretrained backbone, loaded strictly and safely, in eval mode."""
        return load_backbone(self.network, self.weights, self.num_features, self.use_se)

    def template_size(self) -> int | None:
        """The template size read from the weights file (None: the file does not say or does not fit)."""
        return file_template_size(self.network, str(self.weights.resolve()), self.use_se,
                                   self.weights.stat().st_mtime_ns)

    def fingerprint(self) -> dict[str, object]:
        """What the templates depend on: architecture, options and the weights' content."""
        self.check()
        return {"arch": self.network, "use_se": self.use_se, "num_features": self.num_features,
                "weights_sha256": sha256_file(self.weights)}
