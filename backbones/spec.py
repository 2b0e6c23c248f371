"""The one description of a backbone (architecture, weights file, SE option, template size) that both the loader
and the template cache's key use, so the two can never drift apart; and the registry of architectures."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import Callable

from torch import nn

from config.options import register_options
from utils.errors import UserError
from utils.io import sha256_file
from utils.registry import Registry

# config option ``network``: every architecture, by name: ``builder(num_features=..., use_se=...) -> nn.Module``
Builder = Callable[..., nn.Module]
ARCHITECTURES: Registry[Builder] = Registry("backbone", "network", on_options=register_options)


def register_architecture(name: str, builder: Builder | None = None, *, options: type | None = None,
                          help: str = "") -> Callable[[Builder], Builder] | Builder:
    """Decorator: make ``builder(num_features=..., use_se=...)`` the architecture ``name`` (config option
    network). ``register_architecture(name, builder)``, the call of earlier versions, registers at once."""
    if builder is not None:
        ARCHITECTURES.add(name, builder, options, help)
        return builder
    return ARCHITECTURES.register(name, options, help)


@dataclass(frozen=True)
class BackboneSpec:
    network: str
    weights: Path
    use_se: bool = False
    num_features: int = 512

    @classmethod
    def from_config(cls, cfg) -> "BackboneSpec":
        """The backbone of config options network, output_ori, SE and embedding_size."""
        return cls(cfg.network, Path(cfg.output_ori), bool(cfg.SE), int(cfg.embedding_size))

    def check(self) -> None:
        """The weights file exists (before any compute)."""
        if not self.weights.is_file():
            raise UserError(f"backbone weights not found: '{self.weights}' (config option output_ori, by default "
                            f"checkpoint_root/pretrained/reference/backbone.pth). Download the pretrained backbone "
                            f"there (README: 'Pretrained backbones') or set output_ori.")

    def fingerprint(self) -> dict[str, object]:
        """What the templates depend on: architecture, options and the weights' content."""
        self.check()
        return {"arch": self.network, "use_se": self.use_se, "num_features": self.num_features,
                "weights_sha256": sha256_file(self.weights)}
