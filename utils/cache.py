"""Template cache: the frozen backbone's templates of every image, computed once and memory-mapped.

For each image the cache holds normalize(backbone(x)) and normalize(backbone(flip(x))) as an (N, 2, D) array
(float32, or float16 on request) plus the (N, 2) norms, so the raw backbone outputs are recoverable for the
bare-backbone reference. The folder name carries a hash of everything the templates depend on: format version,
architecture, weights-file content, and the inputs (a training folder's relative paths, sizes and mtimes; a
record file's size, mtime, index and keys; a .bin's content). Extraction writes into a hidden folder and renames it
into place when complete, so a killed extraction never leaves a cache that is later read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.dataset import ImageDataset, RecordImages, TrainIndex, normalize_images, problem_report
from utils.errors import UserError
from utils.io import sha256_file
from utils.recordio import RecordFile

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def folder_fingerprint(root: Path, paths: Sequence[Path]) -> str:
    """Hash of the relative paths, sizes and mtimes of a training set's images."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class Templates:
    """A cache entry: memory-mapped arrays for sequential reads, positioned reads for random batches."""
    templates: np.ndarray   # (N, 2, D): [:, 0] unflipped, [:, 1] flipped, L2-normalised (memory-mapped)
    norms: np.ndarray       # (N, 2): L2 norms of the raw backbone outputs
    path: Path

    def __len__(self) -> int:
        return self.templates.shape[0]

    def gather(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """float32 templates of the given images, flipped where ``flips`` is true.

        Reads only those rows with os.pread: random access through a memory map makes the kernel map (and count
        in the process's RSS) far more of the file than the rows read, up to the whole file over a few hundred
        steps; positioned reads keep the memory flat whatever the cache size.
        """
        if not hasattr(self, "_fd"):
            self._fd = os.open(self.path / "templates.npy", os.O_RDONLY)
            self._offset = self.templates.offset
        dim, dtype = self.templates.shape[2], self.templates.dtype
        row = dim * dtype.itemsize
        rows = (indices.numpy().astype(np.int64) * 2 + flips.numpy().astype(np.int64))
        out = np.empty((len(rows), dim), dtype=dtype)
        for k, r in enumerate(rows):
            out[k] = np.frombuffer(os.pread(self._fd, row, self._offset + int(r) * row), dtype=dtype)
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def to_device(self, device: torch.device) -> torch.Tensor:
        """The whole (N, 2, D) array as one tensor on ``device``, copied in chunks (for GPU-resident training)."""
        out = torch.empty(self.templates.shape, dtype=torch.float32, device=device)
        step = 1 << 16
        for i in range(0, len(self), step):
            out[i:i + step] = torch.from_numpy(np.array(self.templates[i:i + step], dtype=np.float32)).to(device)
        return out

    def __del__(self) -> None:
        if hasattr(self, "_fd"):
            os.close(self._fd)

    def normalized(self, sl: slice = slice(None), flip: int = 0) -> torch.Tensor:
        return torch.from_numpy(np.array(self.templates[sl, flip], dtype=np.float32))

    def raw(self, sl: slice = slice(None), flip: int = 0) -> torch.Tensor:
        return self.normalized(sl, flip) * torch.from_numpy(np.array(self.norms[sl, flip], np.float32))[:, None]


def open_entry(folder: Path) -> Templates | None:
    """Open a complete cache folder (meta.json written last), or None if it is not one."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        t = np.load(folder / "templates.npy", mmap_mode="r")
        n = np.load(folder / "norms.npy", mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if t.shape != (meta["count"], 2, meta["dim"]) or n.shape != (meta["count"], 2):
        return None
    return Templates(t, n, folder)


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
    amp: str = "none"               # CUDA autocast during extraction: none, bf16, fp16
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "ExtractionSettings":
        return cls(device, cfg.cache_dtype, cfg.extract_batch_size, cfg.num_workers, cfg.amp, cfg.channels_last)


class TemplateCache:
    """The templates of one backbone under ``folder``, keyed by the backbone's fingerprint, the inputs' and dtype."""

    def __init__(self, folder: str | os.PathLike, backbone: BackboneSource, settings: ExtractionSettings):
        self.folder, self.backbone, self.settings = Path(folder), backbone, settings

    def key(self, inputs: str) -> str:
        """Hash of everything the templates depend on; ``inputs`` names the images (see folder_inputs, bin_inputs)."""
        parts = {"version": CACHE_VERSION, **self.backbone.fingerprint(), "inputs": inputs,
                 "dtype": self.settings.dtype}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def get(self, name: str, inputs: str, items: Sequence[Path] | Sequence[bytes],
            describe: Callable[[int], str] | None = None, what: str = "images") -> Templates:
        """The cached templates of ``items``; extracted (once) with the backbone on a miss."""
        if describe is None:
            def describe(i: int) -> str:
                return str(items[i]) if isinstance(items[i], Path) else f"image {i}"
        key = self.key(inputs)
        final = self.folder / f"{name}-{key}"
        entry = open_entry(final)
        if entry is not None and len(entry) == len(items):
            log.info("template cache hit: %s (%d %s)", final, len(entry), what)
            return entry
        if final.exists():
            aside = final.with_name(f"{final.name}.unreadable-{int(time.time())}")
            log.warning("template cache %s is incomplete or unreadable; moved aside to %s and rebuilding", final, aside)
            final.rename(aside)
        log.info("template cache miss: extracting %d %s into %s", len(items), what, final)
        work = self.folder / f".building-{name}-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        work.mkdir(parents=True)
        try:
            extract(self.backbone.load(), items, work, self.settings, describe=describe, what=what)
            try:
                os.rename(work, final)
            except OSError:
                if open_entry(final) is None:  # another process won the race with a complete entry, else it is real
                    raise
        finally:
            if work.exists():
                for f in work.iterdir():
                    f.unlink()
                work.rmdir()
        entry = open_entry(final)
        assert entry is not None
        return entry


def folder_inputs(root: Path, paths: Sequence[Path]) -> str:
    """The cache's name for a training folder's images: their relative paths, sizes and mtimes."""
    return "folder:" + folder_fingerprint(root, paths)


def record_inputs(records: RecordFile, keys: np.ndarray) -> str:
    """The cache's name for images of a record file: its size and mtime, its .idx's content and the keys used."""
    st = records.rec_path.stat()
    h = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}\0{sha256_file(records.idx_path)}\0".encode())
    h.update(np.ascontiguousarray(keys, dtype=np.int64).tobytes())
    return "rec:" + h.hexdigest()


def index_inputs(index: TrainIndex) -> str:
    """The cache's name for a training set's images: its source's (folder_inputs, record_inputs), or with several
    sources all of theirs in order (one folder alone keeps the name it always had)."""
    parts = [record_inputs(s.items.records, s.items.keys) if isinstance(s.items, RecordImages)
             else folder_inputs(s.path, s.items) for s in index.sources]
    return parts[0] if len(parts) == 1 else "sources:" + "|".join(parts)


def bin_inputs(content_sha256: str) -> str:
    """The cache's name for a .bin's images: the file's content hash."""
    return "bin:" + content_sha256


def extract(backbone: nn.Module, items: Sequence[Path] | Sequence[bytes], out: Path, settings: ExtractionSettings,
            describe: Callable[[int], str] = str, what: str = "images") -> dict:
    """Run the backbone over ``items`` (and their flips) and write templates.npy, norms.npy, meta.json to ``out``.

    Images are decoded in DataLoader workers while the backbone runs, and the templates are appended to the files
    batch by batch: neither the image set nor the templates are held in memory. Every image that fails to decode
    is reported at the end, all at once, and no cache is written. Returns the metadata.
    """
    device, dtype, channels_last = settings.device, settings.dtype, settings.channels_last
    n = len(items)
    backbone = backbone.to(device).eval()
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp) if device.type == "cuda" \
        else None
    loader = DataLoader(ImageDataset(items), batch_size=settings.batch_size, shuffle=False,
                        num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda")
    problems: list[str] = []
    resized = 0
    dim = None
    bar = tqdm(total=n, desc=f"extracting {what}", unit="img", leave=False, dynamic_ncols=True, disable=None)
    t_file, n_file = open(out / "templates.npy", "wb"), open(out / "norms.npy", "wb")
    _npy_header(n_file, np.dtype(np.float32), (n, 2))
    t0 = time.perf_counter()
    with t_file, n_file, torch.inference_mode():
        for idx, x, was_resized, errors in loader:
            resized += int(was_resized.sum())
            problems += [f"{describe(int(i))}: {e}" for i, e in zip(idx, errors) if e]
            x = normalize_images(x.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                feats = [backbone(x).float(), backbone(x.flip(3)).float()]
            # row-wise on contiguous (B, D) outputs: the same arithmetic as F.normalize(backbone(x)) in training
            normed = torch.stack([F.normalize(f, dim=1) for f in feats], dim=1).cpu().numpy()   # (B, 2, D)
            row_norms = torch.stack([f.norm(dim=1) for f in feats], dim=1).cpu().numpy()        # (B, 2)
            if dim is None:
                dim = normed.shape[2]
                _npy_header(t_file, np.dtype(dtype), (n, 2, dim))
            t_file.write(np.ascontiguousarray(normed, dtype=dtype).tobytes())
            n_file.write(np.ascontiguousarray(row_norms, dtype=np.float32).tobytes())
            bar.update(len(idx))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        for fh in (t_file, n_file):
            fh.flush()
            os.fsync(fh.fileno())
    bar.close()
    if problems:
        raise UserError(problem_report(f"the {what}", problems, "Replace or remove the files that do not decode, "
                                       "then run again (no templates were cached)."))
    if resized:
        log.warning("%d of %d %s were not 112x112: short side resized to 112 (bicubic) and centre-cropped",
                    resized, n, what)
    meta = {"version": CACHE_VERSION, "count": n, "dim": int(dim), "dtype": dtype, "resized": resized,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    log.info("extracted %d %s in %.1fs (%.1f images/s, each with its flip)", n, what, seconds, n / seconds)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _npy_header(fh, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """The .npy header of a C-order array whose data is then appended batch by batch."""
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                              "shape": shape})
