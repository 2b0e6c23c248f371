"""The registry of architectures (config option ``network``): a builder per name, each built from a state dict's
weights by backbones/weights.py, or (a network built from its own file, e.g. ``onnx``) describing itself."""
from __future__ import annotations

from typing import Callable

from torch import nn

from config.options import register_options
from utils.registry import Registry

__all__ = ["ARCHITECTURES", "Builder", "register_architecture"]

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
