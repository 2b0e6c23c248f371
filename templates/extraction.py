"""The backbone pass of the template cache: images decoded in DataLoader workers while the backbone runs, each
image and its flip, the rows written to the row store as they come (pipelined one batch deep on CUDA); under
autocast (amp=bf16) on CUDA and on CPUs with bfloat16 instructions; progress as log lines when there is no
terminal."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from facedata.dataset import ImageDataset, normalize_images, problem_report
from utils.device import autocast_dtype, decode_workers
from utils.errors import UserError
from utils.logs import get_logger
from templates.rowstore import RowStore

log = get_logger(__name__)


class BackboneSource(Protocol):
    """What the cache needs of a backbone (backbones.spec.BackboneSpec is one): what it depends on, and itself."""

    def fingerprint(self) -> dict[str, object]: ...

    def load(self) -> nn.Module: ...


@dataclass(frozen=True)
class ExtractionSettings:
    """How the one-off backbone pass runs: where, in which precision, with how many decoding workers."""
    device: torch.device
    dtype: str = "float32"          # storage of the cached templates: float32 or float16
    batch_size: int = 32
    num_workers: int = 2
    amp: str = "none"               # autocast during extraction: none, bf16 (CUDA, CPUs with bf16), fp16 (CUDA)
    channels_last: bool = False
    progress_every: float = 30.0    # seconds between progress lines when there is no terminal (0: every batch)

    def __post_init__(self) -> None:
        autocast_dtype(self.device, self.amp)   # an amp this device cannot run is refused before any compute

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "ExtractionSettings":
        return cls(device, cfg.cache_dtype, cfg.extract_batch_size, decode_workers(cfg.num_workers), cfg.amp,
                   cfg.channels_last, cfg.progress_every)


@dataclass
class Pass:
    """What one backbone pass did: the images that did not decode (described), the store's files written."""
    problems: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def undecodable(what: str, problems: list[str]) -> UserError:
    """The error listing every image of a pass that did not decode."""
    return UserError(problem_report(f"the {what}", problems, "Replace or remove the files that do not decode, "
                                    "then run again (no templates were cached; the rows of the others are kept and "
                                    "not extracted again)."))


def extract_rows(backbone: nn.Module, items: Sequence, keys: list[bytes], store: RowStore,
                 settings: ExtractionSettings, describe: Callable[[int], str], what: str,
                 on_batch: Callable[[int], object] | None = None, aliases: list[bytes] | None = None) -> Pass:
    """The backbone pass over ``items``: their rows written to ``store`` every CHUNK_ROWS images (neither the images
    nor the templates held in memory); ``on_batch`` called with the number of images done each time a batch's rows
    reach the host; ``aliases``: each row's second key (RowStore.write_chunk). Images that fail to decode are
    listed in the result, not raised.

    On CUDA the pass is pipelined one batch deep: batch k+1 is sent to the GPU before the rows of batch k are
    copied back (asynchronously, into pinned memory) and written, so the GPU does not wait for the host."""
    device, channels_last = settings.device, settings.channels_last
    cuda = device.type == "cuda"
    backbone = backbone.to(device).eval()
    if channels_last:
        # Module.to takes memory_format at run time (torch's _parse_to); its stubs' overloads leave it out
        backbone = backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    amp = autocast_dtype(device, settings.amp)
    loader = DataLoader(ImageDataset(items), batch_size=settings.batch_size, shuffle=False,
                        num_workers=settings.num_workers, pin_memory=cuda,
                        prefetch_factor=4 if settings.num_workers else None)
    result = Pass()
    writer = store.writer(settings.dtype)
    bar = tqdm(total=len(items), desc=f"extracting {what}", unit="img", leave=False, dynamic_ncols=True, disable=None)
    lines = ProgressLines(f"extracting {what}", len(items), settings.progress_every) if bar.disable else None

    checked: list[bool] = []   # the first batch's autocast templates compared with float32's

    def launch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """The device work of one batch: (B, 2, D) normalised templates and (B, 2) norms, on their way to the host."""
        x = normalize_images(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            feats = [backbone(x).float(), backbone(x.flip(3)).float()]
        if amp is not None and not checked:
            check_autocast(backbone, x, feats[0], settings.amp, what)
            checked.append(True)
        # row-wise on contiguous (B, D) outputs: the same arithmetic as F.normalize(backbone(x)) in training
        normed = torch.stack([F.normalize(f, dim=1) for f in feats], dim=1)
        norms = torch.stack([f.norm(dim=1) for f in feats], dim=1)
        if not cuda:
            return normed.cpu(), norms.cpu(), None
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (normed, norms)]
        for h, t in zip(host, (normed, norms)):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))   # the copies' stream: that of ``device``, not the current one
        return host[0], host[1], done

    done_count = 0

    def finish(batch: tuple) -> None:
        """The host side of one launched batch: wait for its rows, keep those of the images that decoded."""
        nonlocal done_count
        (normed, norms, done), idx, was_resized, errors = batch
        if done is not None:
            done.synchronize()
        good = np.array([not e for e in errors])
        writer.add([keys[int(i)] for i, ok in zip(idx, good) if ok], normed.numpy()[good], norms.numpy()[good],
                   was_resized.numpy()[good], None if aliases is None else
                   [aliases[int(i)] for i, ok in zip(idx, good) if ok])
        bar.update(len(idx))
        done_count += len(idx)
        if lines is not None:
            lines.update(done_count)
        if on_batch is not None:
            on_batch(done_count)

    t0 = time.perf_counter()
    in_flight = None
    try:
        with torch.inference_mode():
            for idx, x, was_resized, errors in loader:
                result.problems += [f"{describe(int(i))}: {e}" for i, e in zip(idx, errors) if e]
                launched = (launch(x), idx, was_resized, errors)
                if in_flight is not None:
                    finish(in_flight)
                in_flight = launched
                if not cuda:   # nothing runs ahead on the CPU: finish at once (on_batch then times this batch)
                    finish(in_flight)
                    in_flight = None
            if in_flight is not None:
                finish(in_flight)
        writer.flush()
    finally:
        bar.close()
    result.written, result.seconds = writer.written, time.perf_counter() - t0
    return result


AUTOCAST_MIN_COSINE = 0.999   # the closeness to float32 the README states for amp=bf16


def check_autocast(backbone: nn.Module, x: torch.Tensor, feats: torch.Tensor, amp: str, what: str) -> float:
    """The first batch's autocast templates against float32's (one more forward, once per pass): logged, and a
    warning naming amp=none where the least cosine is below AUTOCAST_MIN_COSINE (an ill-conditioned network, whose
    templates bf16 would move). Returns that cosine."""
    ref = backbone(x).float()
    cos = float(F.cosine_similarity(feats, ref, dim=1).min())
    if cos < AUTOCAST_MIN_COSINE:
        log.warning("amp=%s moves this backbone's templates of the %s away from float32's: least cosine %.4f on "
                    "the first batch (expected >= %s). This network is ill-conditioned under %s; use amp=none for "
                    "numbers you report.", amp, what, cos, AUTOCAST_MIN_COSINE, amp)
    else:
        log.info("amp=%s: the first batch's templates of the %s lie within cosine %.5f of float32's", amp, what, cos)
    return cos


class ProgressLines:
    """Progress of a long pass as log lines, for output that is not a terminal (a job, nohup: the progress bar is
    then off): done / total, images/s and the estimated time left, at most one line per ``every`` seconds of
    ``clock`` (injectable, for tests)."""

    def __init__(self, what: str, total: int, every: float, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.every, self.clock = what, total, every, clock
        self.start = self.last = clock()

    def update(self, done: int) -> str | None:
        """Log (and return) a line when ``every`` seconds have passed since the last one."""
        now = self.clock()
        if now - self.last < self.every:
            return None
        self.last = now
        rate = done / (now - self.start) if now > self.start else 0.0
        left = f"about {duration((self.total - done) / rate)} left" if rate > 0 else "time left unknown yet"
        line = f"{self.what}: {done}/{self.total} ({done / max(self.total, 1):.0%}), {rate:.1f} images/s, {left}"
        log.info(line)
        return line


def duration(seconds: float) -> str:
    """A time span in words: '45 s', '3 min 20 s', '2 h 05 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
