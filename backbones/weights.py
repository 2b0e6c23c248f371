"""Weights files into architectures: strict, safe loading (a mismatch is one clear error naming the file and the
architectures its keys fit), the template size a file's tensors imply, and the privacy layer's loader."""
from __future__ import annotations

import functools
import os
from typing import Callable, Mapping

import torch
from torch import nn

from backbones.architectures import ARCHITECTURES
from backbones.projection import ProjectionLayer
from backbones.sfnet import SFNET_LAYOUTS
from utils.errors import UserError
from utils.io import extract_state_dict, safe_torch_load
from utils.logs import get_logger

log = get_logger("backbones")


def get_backbone(name: str, num_features: int = 512, use_se: bool = False) -> nn.Module:
    """Build an architecture by name (config.network), randomly initialised."""
    return ARCHITECTURES.get(name)(num_features=num_features, use_se=use_se)


def architecture_shapes(name: str, num_features: int = 512, use_se: bool = False
                        ) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of architecture ``name``'s state dict (built on the meta device: nothing is allocated)."""
    return _builder_shapes(ARCHITECTURES[name], num_features, use_se)


@functools.lru_cache(maxsize=None)
def _builder_shapes(builder: Callable[..., nn.Module], num_features: int, use_se: bool
                    ) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = builder(num_features=num_features, use_se=use_se)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def template_size(name: str, state: Mapping[str, torch.Tensor], use_se: bool = False) -> int | None:
    """The template size of architecture ``name`` holding ``state``, for any registered architecture: the
    num_features at which its keys and shapes equal the file's (read from the file's tensors whose shapes follow
    num_features), or, for a builder that ignores num_features, the size of its output on a (meta) input; None
    when the file does not fit the architecture at any size or the size cannot be known."""
    builder = ARCHITECTURES[name]
    have = {k: tuple(v.shape) for k, v in state.items()}
    try:
        a, b = _builder_shapes(builder, 512, use_se), _builder_shapes(builder, 256, use_se)
    except Exception:   # a plug-in builder that cannot be built at these sizes: nothing to read
        return None
    if a == b:   # num_features changes nothing: the network's own output says
        size = _output_size(builder, use_se)
        return size if size is not None and a == have else None
    for key in a:
        if a[key] != b[key] and key in have and len(have[key]) == len(a[key]):
            axis = next(i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y)
            if a[key][axis] != 512 or b[key][axis] != 256:
                continue
            size = have[key][axis]
            try:
                return size if _builder_shapes(builder, size, use_se) == have else None
            except Exception:
                return None
    return None


@functools.lru_cache(maxsize=None)
def _output_size(builder: Callable[..., nn.Module], use_se: bool) -> int | None:
    """The output size of ``builder``'s network on a 112x112 RGB input, computed on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            net = builder(num_features=512, use_se=use_se).eval()
            out = net(torch.empty(2, 3, 112, 112))
        return int(out.shape[-1]) if out.dim() == 2 else None
    except Exception:
        return None


def candidate_architectures(state: Mapping[str, torch.Tensor]) -> list[tuple[str, bool, int]]:
    """Every (network, use_se, num_features) whose keys and shapes equal those of ``state`` (plain keys), the
    template size read from the file (template_size) for any registered architecture, plug-ins included.

    The one test of which layouts a file can hold, shared by the loader and tools/identify_backbone.py. An SE
    option that changes no key is listed once, as False; several entries mean the keys cannot tell them apart.
    """
    found = []
    for name in ARCHITECTURES:
        for use_se in (False, True):
            try:
                if use_se and architecture_shapes(name, 512, True) == architecture_shapes(name, 512, False):
                    continue
            except Exception:
                continue
            size = template_size(name, state, use_se)
            if size is not None:
                found.append((name, use_se, size))
    return found


def describe_candidate(name: str, use_se: bool, num_features: int) -> str:
    """Human name of a candidate, e.g. 'iresnet100 with SE blocks' or 'sfnet20 (128-d)'."""
    return name + (" with SE blocks" if use_se else "") + ("" if num_features == 512 else f" ({num_features}-d)")


def settings_for(name: str, use_se: bool, num_features: int) -> str:
    """The --set options that select a candidate."""
    return f"network={name} SE={use_se} embedding_size={num_features}"


@functools.lru_cache(maxsize=8)
def file_template_size(network: str, path: str, use_se: bool, mtime_ns: int) -> int | None:
    state = extract_state_dict(safe_torch_load(path, "backbone weights"), path, "backbone weights")
    return template_size(network, state, use_se)


def _same_keys_warning(path: str | os.PathLike, chosen: str, others: list[str]) -> str:
    """One line: the file's keys fit several layouts, which one is used and how to choose another."""
    names = [chosen, *others]
    what = " and ".join(f"{n} ({SFNET_LAYOUTS[n]})" if n in SFNET_LAYOUTS else n for n in names)
    return (f"backbone weights '{path}' fit both {what}: their keys are identical, so the file cannot tell; "
            f"using {chosen} as configured. Choose with --set network=" + " or network=".join(names) +
            f"; python tools/identify_backbone.py {path} --bin rec/lfw.bin prints each one's EER.")


def load_backbone(name: str, path: str | os.PathLike, num_features: int = 512, use_se: bool = False) -> nn.Module:
    """Load pretrained weights strictly into architecture ``name``; a mismatch is one clear error.

    Safe (weights_only), strips a DataParallel ``module.`` prefix. Only ``name`` is built while its keys fit the
    file (one warning line when another SFNet-20 layout, whose keys are the same by design, fits too); the
    architectures the file could hold are looked for only when it does not fit. An SFNet-20 file whose keys fit
    exactly one other SFNet-20 layout is loaded into that one, with a warning line.
    """
    state = extract_state_dict(safe_torch_load(path, "backbone weights"), path, "backbone weights")
    ARCHITECTURES.get(name)   # an unknown name: the error with the closest one
    have = {k: tuple(v.shape) for k, v in state.items()}
    if architecture_shapes(name, num_features, use_se) == have:
        twins = [n for n in SFNET_LAYOUTS if name in SFNET_LAYOUTS and n != name and n in ARCHITECTURES
                 and architecture_shapes(n, num_features, False) == have]
        if twins:
            log.warning(_same_keys_warning(path, name, twins))
    else:
        fits = candidate_architectures(state)
        layouts = [n for n, _, nf in fits if n in SFNET_LAYOUTS and nf == num_features]
        if name not in SFNET_LAYOUTS or len(layouts) != 1:
            raise _mismatch_error(name, path, num_features, use_se, have, fits)
        log.warning("backbone weights '%s' hold the %s layout (%s), whose keys differ from %s's; using %s (set "
                    "network=%s to silence this).", path, layouts[0], SFNET_LAYOUTS[layouts[0]], name, layouts[0],
                    layouts[0])
        name = layouts[0]
    net = get_backbone(name, num_features, use_se)
    net.load_state_dict(state, strict=True)
    return net.eval()



def _mismatch_error(name: str, path: str | os.PathLike, num_features: int, use_se: bool,
                    have: dict[str, tuple[int, ...]], fits: list[tuple[str, bool, int]]) -> UserError:
    """The error for a file that does not fit ``name``: what the file holds, which keys differ, what to set."""
    expected = architecture_shapes(name, num_features, use_se)
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(have) if have[k] != expected[k])

    def few(keys: list[str], shapes: bool = False) -> str:
        items = [f"{k} {have[k]} vs {expected[k]}" if shapes else k for k in keys[:5]]
        return ", ".join(items) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
             f"{len(misshaped)} of another shape ({few(misshaped, True)})" if misshaped else ""]
    what = f"this file holds an {' or '.join(describe_candidate(*c) for c in fits)}; " if fits else ""
    setting = f"config.network is {name}" + (" with SE=True" if use_se else "")
    if len(fits) > 1:
        fix = ("set network to the layout the file was trained with (--set " +
               " or --set ".join(settings_for(*c) for c in fits) + "; their keys are identical: "
               f"python tools/identify_backbone.py {path} --bin rec/lfw.bin prints each one's EER)")
    elif fits:
        fix = f"set network to match the file (--set {settings_for(*fits[0])})"
    else:
        fix = ("check that the file is a backbone of this architecture and was downloaded completely, and that "
               f"embedding_size ({num_features}) is the file's template size (it could not be read from the file)")
    return UserError(f"backbone weights '{path}' do not fit {name}: {what}{setting}. Keys: "
                     f"{'; '.join(p for p in parts if p)}. Fix: {fix}.")


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
