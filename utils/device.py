"""Pick the compute device: CUDA, then Apple MPS, then CPU, unless the config names one."""
from __future__ import annotations

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
