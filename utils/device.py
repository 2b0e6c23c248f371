"""Pick the compute device (CUDA, then Apple MPS, then CPU, unless the config names one) and the number of
image-decoding workers."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16", "bf16")   # x86's two, and ARM's (/proc/cpuinfo "Features")


@functools.lru_cache(maxsize=1)
def cpu_bf16_instructions() -> tuple[str, ...]:
    """The processor's native bfloat16 instructions, as read from CPUID by PyTorch's cpuinfo
    (``torch.cpu.get_capabilities()``: avx512_bf16, amx_bf16), else from /proc/cpuinfo's flags (x86) or
    features (ARM's bf16). Empty: none found, and bf16 would only be emulated (slower than float32)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    caps = get() if get is not None else {}
    found = tuple(k for k in BF16_INSTRUCTIONS[:2] if caps.get(k))
    if found or any(k in caps for k in BF16_INSTRUCTIONS[:2]):
        return found
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}
    except OSError:
        return ()
    return tuple(k for k in BF16_INSTRUCTIONS if k in flags)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of config option amp on ``device`` (None: float32). bf16 runs on CUDA and on processors
    with native bfloat16 instructions; anything else is refused by name rather than ignored or emulated."""
    if amp == "none":
        return None
    if device.type == "cuda":
        return AMP_DTYPES[amp]
    if device.type == "cpu" and amp == "bf16":
        if cpu_bf16_instructions():
            return torch.bfloat16
        raise UserError(f"config option 'amp' is bf16 but this processor ({_cpu_name()}) has no bfloat16 "
                        f"instructions (none of {', '.join(BF16_INSTRUCTIONS)} found): bf16 would be emulated, "
                        f"slower than float32. Use amp=none (the default) on this machine.")
    where = "on CUDA and on CPUs with bfloat16 instructions" if amp == "bf16" else "on CUDA only"
    hint = " (on the CPU: amp=bf16, where the processor has bfloat16 instructions)" if device.type == "cpu" else ""
    raise UserError(f"config option 'amp' is {amp}, which runs {where}{hint}; the device is {device}. Use "
                    f"amp=none here.")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"
