"""Backbones (iresnet, SFNet-20, ONNX files), the privacy layer, and a strict, safe weights loader."""
from __future__ import annotations

import dataclasses
from typing import Any

from backbones.architectures import ARCHITECTURES, register_architecture
from backbones.iresnet import iresnet18, iresnet34, iresnet50, iresnet100, iresnet200
from backbones.onnx import OnnxArchitecture
from backbones.projection import FinetunedModel, FrozenBackbone, ProjectionLayer
from backbones.sfnet import SFNET_LAYOUTS, sfnet20, sfnet20_deprecated, sfnet20_deprecated_v0
from backbones.spec import BackboneSpec
from backbones.weights import (architecture_shapes, candidate_architectures, describe_candidate, get_backbone,
                               load_backbone, load_projection, settings_for, template_size)
from utils.errors import UserError
from utils.logs import get_logger

__all__ = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "sfnet20", "sfnet20_deprecated",
           "sfnet20_deprecated_v0", "SFNET_LAYOUTS", "architecture_shapes", "candidate_architectures",
           "describe_candidate", "settings_for", "template_size", "embedding_size_for", "register_architecture",
           "ProjectionLayer", "FrozenBackbone", "FinetunedModel", "ARCHITECTURES", "BackboneSpec", "get_backbone",
           "load_backbone", "load_projection"]

log = get_logger(__name__)
register_architecture("onnx", OnnxArchitecture(),
                      help="a face network shipped as an ONNX file (--set onnx.model=PATH), run by onnxruntime")


def embedding_size_for(cfg: Any) -> Any:
    """``cfg`` with embedding_size set to the template size of its backbone weights (config options network,
    output_ori, SE), logged when it changes; ``cfg`` unchanged when the weights are absent, do not fit the network
    or do not say (the loader's error then names embedding_size). Pre-flight of training and of the sweep."""
    spec = BackboneSpec.from_config(cfg)
    path = spec.weights
    if cfg.network not in ARCHITECTURES or not path.is_file():
        return cfg
    try:
        size = spec.template_size()
    except UserError:
        return cfg
    if size is None or size == cfg.embedding_size:
        return cfg
    log.warning("backbone weights '%s' produce %d-d templates (read from the file): embedding_size set to %d "
                "(it was %d); set --set embedding_size=%d to silence this.", path, size, size, cfg.embedding_size,
                size)
    return dataclasses.replace(cfg, embedding_size=size)
