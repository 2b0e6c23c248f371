"""Pick the compute device (CUDA, then Apple MPS, then CPU, unless the config names one) and the number of
image-decoding workers."""
from __future__ import annotations

import os

import torch

from utils.errors import UserError


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"config option 'device' is '{name}'; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config option 'device' is '{name}' but this machine has no usable CUDA GPU; use "
                        f"--set device=auto or device=cpu.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"config option 'device' is '{name}' but Apple MPS is not available here; use device=auto.")
    return dev


MAX_AUTO_WORKERS = 8   # one decoding worker keeps up with ~4,000 112x112 JPEGs/s; an H100 runs iresnet50 at ~7,000


def decode_workers(requested: int) -> int:
    """Decoding workers of this process: ``requested``, or for -1 (auto) its share of the machine's cores (torchrun's
    LOCAL_WORLD_SIZE processes share them) less one for the process itself, between 2 and MAX_AUTO_WORKERS."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(MAX_AUTO_WORKERS, max(2, share - 1))
