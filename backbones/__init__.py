"""Backbones (iresnet, SFNet-20, the demo decoder), the privacy layer, and a strict, safe weights loader."""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn

from backbones.demo import demo_decoder
from backbones.iresnet import iresnet18, iresnet34, iresnet50, iresnet100, iresnet200
from backbones.projection import FinetunedModel, FrozenBackbone, ProjectionLayer
from backbones.sfnet import sfnet20, sfnet20_deprecated
from utils.errors import UserError
from utils.io import extract_state_dict, safe_torch_load

__all__ = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "sfnet20", "sfnet20_deprecated",
           "demo_decoder", "ProjectionLayer", "FrozenBackbone", "FinetunedModel", "ARCHITECTURES",
           "get_backbone", "load_backbone", "load_projection"]

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18, "iresnet34": iresnet34, "iresnet50": iresnet50, "iresnet100": iresnet100,
    "iresnet200": iresnet200, "sfnet20": sfnet20, "sfnet20_deprecated": sfnet20_deprecated,
    "demo_decoder": demo_decoder,
}
_SFNET = ("sfnet20", "sfnet20_deprecated")


def get_backbone(name: str, num_features: int = 512, use_se: bool = False) -> nn.Module:
    """Build an architecture by name (config.network), randomly initialised."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown backbone '{name}' (config option 'network'); choose one of "
                        f"{', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name](num_features=num_features, use_se=use_se)


def _shapes(name: str, num_features: int, use_se: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = get_backbone(name, num_features, use_se)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _identify(state: dict[str, torch.Tensor]) -> str | None:
    """Name the architecture (and SE option) whose keys and shapes equal the file's, if any."""
    have = {k: tuple(v.shape) for k, v in state.items()}
    dims = {v.shape[0] for k, v in state.items() if k in ("fc.bias", "readout.bias")} or {512}
    for name in ARCHITECTURES:
        for use_se in ((False, True) if name.startswith("iresnet") else (False,)):
            for nf in dims:
                if _shapes(name, nf, use_se) == have:
                    return name + (" with SE blocks" if use_se else "") + ("" if nf == 512 else f" ({nf}-d)")
    return None


def load_backbone(name: str, path: str | os.PathLike, num_features: int = 512, use_se: bool = False) -> nn.Module:
    """Load pretrained weights strictly into architecture ``name``; a mismatch is one clear error.

    Safe (weights_only), strips a DataParallel ``module.`` prefix, and picks the SFNet-20 variant from the keys.
    """
    state = extract_state_dict(safe_torch_load(path, "backbone weights"), path, "backbone weights")
    if name in _SFNET:
        for variant in _SFNET:
            if _shapes(variant, num_features, False) == {k: tuple(v.shape) for k, v in state.items()}:
                if variant != name:
                    log.info("'%s' holds OpenSphere's %s variant; using it instead of %s", path, variant, name)
                name = variant
                break
    expected = _shapes(name, num_features, use_se) if name in ARCHITECTURES else None
    if expected is None:
        get_backbone(name)  # raises the unknown-name error
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        found = _identify(state)
        what = f"this file holds an {found}; " if found else ""
        setting = f"config.network is {name}" + (" with SE=True" if use_se else "")

        def _few(keys: list[str], shapes: bool = False) -> str:
            items = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" if shapes else k for k in keys[:5]]
            return ", ".join(items) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
                 f"{len(misshaped)} of another shape ({_few(misshaped, True)})" if misshaped else ""]
        fix = (f"set network to match the file (--set network={found.split()[0]})" if found
               else "check that the file is a backbone of this architecture and was downloaded completely")
        raise UserError(f"backbone weights '{path}' do not fit {name}: {what}{setting}. Keys: "
                        f"{'; '.join(p for p in parts if p)}. Fix: {fix}.")
    net = get_backbone(name, num_features, use_se)
    net.load_state_dict(state, strict=True)
    return net.eval()


def load_projection(path: str | os.PathLike, embedding_size: int = 512, n_hidden: int = 2) -> ProjectionLayer:
    """Load a privacy layer (``*ftn_layers.pth``; the authors' released files load unchanged)."""
    state = extract_state_dict(safe_torch_load(path, "privacy-layer checkpoint"), path, "privacy-layer checkpoint")
    layer = ProjectionLayer(embedding_size, embedding_size, n_hidden)
    expected = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if have != expected:
        raise UserError(f"privacy-layer checkpoint '{path}' does not fit ProjectionLayer({embedding_size}, "
                        f"{embedding_size}, n_hidden={n_hidden}): the file has {sorted(have.items())[:4]}, expected "
                        f"{sorted(expected.items())[:4]}. Set embedding_size / n_hidden to match the file, or "
                        f"remove the file from the run folder if it is not a privacy layer.")
    layer.load_state_dict(state, strict=True)
    return layer.eval()
