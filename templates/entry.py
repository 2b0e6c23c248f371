"""A cache entry: one set's templates as a folder of templates.npy (N, 2, D), norms.npy (N, 2), keys.npy (the row
store's key of each image) and meta.json, written last, so a folder without meta.json is never read.

``EntryWriter`` is the one writer of entries (the cache's assembly from its row store, and ``write_entry`` for
templates already in memory: benchmarks, tests); ``open_entry`` the one reader; ``publish`` renames a finished
build folder into place.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.logs import get_logger

log = get_logger(__name__)

CACHE_VERSION = 1
KEY_DTYPE = "S32"   # a row store key (templates.rowstore.item_key)


@dataclass
class Templates:
    """A cache entry: memory-mapped arrays for sequential reads, positioned reads for random batches. While it is
    open it holds a shared lock on its meta.json, which is how ``templates.space`` tells an entry in use."""
    templates: np.memmap    # (N, 2, D): [:, 0] unflipped, [:, 1] flipped, L2-normalised
    norms: np.memmap        # (N, 2): L2 norms of the raw backbone outputs
    path: Path

    def __post_init__(self) -> None:
        try:
            self._lock = os.open(self.path / "meta.json", os.O_RDONLY)
            fcntl.flock(self._lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:   # a file system without locks: the entry is simply not reported as in use
            pass

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

    def __getstate__(self) -> dict:
        # file descriptors belong to this process: a copy in another process opens its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock", "_offset")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __del__(self) -> None:
        for name in ("_fd", "_lock"):
            if hasattr(self, name):
                os.close(getattr(self, name))

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
        shape = (meta["count"], 2, meta["dim"])
    except (OSError, ValueError, KeyError, TypeError):   # json.JSONDecodeError is a ValueError
        return None
    if t.shape != shape or n.shape != shape[:2]:
        return None
    return Templates(t, n, folder)


def open_written(folder: Path) -> Templates:
    """An entry just written (or found complete): one that must open."""
    entry = open_entry(folder)
    assert entry is not None, f"the template cache entry {folder} was written but does not open"
    return entry


def read_meta(folder: Path) -> dict | None:
    """An entry's metadata, or None where meta.json is missing or not a JSON object."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


class EntryWriter:
    """Writes one entry into ``folder``: the arrays are allocated on disk in full at the start (a full disk shows
    here, not later as a crash in a memory-mapped write), filled by the caller, and ``finish`` writes meta.json
    last."""

    def __init__(self, folder: Path, count: int, dim: int, dtype: str):
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "meta.json").exists():
            raise FileExistsError(f"'{folder}' already holds a cache entry")
        self.folder, self.dtype = folder, dtype
        self.templates = _allocate(folder / "templates.npy", np.dtype(dtype), (count, 2, dim))
        self.norms = _allocate(folder / "norms.npy", np.dtype(np.float32), (count, 2))

    def finish(self, keys: list[bytes] | None = None, rows: str = "", resized: int = 0) -> dict:
        """Flush the arrays to disk, write keys.npy (the images' row store keys, when known, and the row store
        ``rows`` they came from) and meta.json last; returns the metadata."""
        count, _, dim = self.templates.shape
        for arr in (self.templates, self.norms):
            arr.flush()
        del self.templates, self.norms
        for name in ("templates.npy", "norms.npy"):
            with open(self.folder / name, "rb+") as fh:
                os.fsync(fh.fileno())
        meta = {"version": CACHE_VERSION, "count": int(count), "dim": int(dim), "dtype": self.dtype,
                "resized": int(resized), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        if keys is not None:
            with open(self.folder / "keys.npy", "wb") as fh:
                np.save(fh, np.array(keys, dtype=KEY_DTYPE))
                fh.flush()
                os.fsync(fh.fileno())
            meta["rows"] = rows
        with open(self.folder / "meta.json", "w") as fh:
            fh.write(json.dumps(meta, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        return meta


def write_entry(folder: Path, templates: np.ndarray, norms: np.ndarray | None = None,
                dtype: str = "float32") -> Templates:
    """A complete cache entry of templates already in memory: ``templates`` (N, 2, D), L2-normalised along D;
    ``norms`` (N, 2) the raw outputs' norms (ones if None). Returns the entry, opened."""
    templates = np.asarray(templates)
    if templates.ndim != 3 or templates.shape[1] != 2:
        raise ValueError(f"templates must be (N, 2, D), got {templates.shape}")
    norms = np.ones(templates.shape[:2], np.float32) if norms is None else np.asarray(norms, np.float32)
    writer = EntryWriter(Path(folder), templates.shape[0], templates.shape[2], dtype)
    writer.templates[:], writer.norms[:] = templates, norms
    writer.finish()
    return open_written(Path(folder))


def publish(work: Path, final: Path) -> None:
    """Rename a finished build folder into place; another command that published the same entry first wins."""
    try:
        os.rename(work, final)
    except OSError:
        if open_entry(final) is None:   # not a concurrent publication: a real failure
            raise


def _allocate(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A writable memory map of a new .npy file whose blocks are reserved now (posix_fallocate): writes through a
    memory map into a sparse file on a full disk end the process with SIGBUS instead of raising."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = arr.offset + arr.nbytes
    if size and hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as fh:
            os.posix_fallocate(fh.fileno(), 0, size)
    return arr
