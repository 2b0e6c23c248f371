"""The row store: every extracted image's row (templates, norms, whether it was resized), kept whatever set it was
part of, in files of a few thousand rows written atomically, keyed by the image (a file's path, size and mtime; a
record's file and key; an encoded image's content). A pass that stops, or a set that changes, reruns only the
images not yet stored; entries are assembled from it.

One store per backbone and dtype: ``<cache folder>/.rows/<store name>/chunk-*.npz``, and beside it
``<store name>.lock``, which a command building an entry from the store holds (shared) so that
``templates.space`` never prunes a store in use.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from facedata.dataset import RecordImage
from templates.entry import KEY_DTYPE, EntryWriter

CHUNK_ROWS = 4096   # rows per file of the row store: a killed pass loses at most this many

Row = tuple[Path, int]   # (chunk file, row in it)


def item_key(item: Path | RecordImage | bytes) -> bytes:
    """The row store's key of an image: a file's path, size and mtime; a record's file (size, mtime) and key; an
    encoded image's content. A file that cannot be read gets a key of its path alone (it is then reported). An item
    with ``row_item()`` (eval.gender_folders) is keyed as the file or bytes it stands for."""
    item = item.row_item() if hasattr(item, "row_item") else item
    if isinstance(item, Path):
        try:
            st = item.stat()
            name = f"file:{item.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            name = f"unreadable:{item}"
    elif isinstance(item, RecordImage):
        st = item.records.rec_path.stat()
        name = f"rec:{item.records.rec_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{item.key}"
    else:
        name = "bytes:" + hashlib.sha256(item).hexdigest()
    return hashlib.sha256(name.encode()).hexdigest()[:32].encode()


class RowStore:
    """The rows of one backbone and dtype, in the folder ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def chunks(self) -> list[Path]:
        return sorted(self.path.glob("chunk-*.npz")) if self.path.is_dir() else []

    def find(self, also: Sequence[Path] = ()) -> dict[bytes, Row]:
        """Where each stored image is: its key -> (chunk file, row). ``also``: chunk files known to be there (other
        processes', which a network file system may not list yet)."""
        found: dict[bytes, Row] = {}
        for chunk in sorted(set(self.chunks()) | set(also)):
            with np.load(chunk) as z:
                found.update((k, (chunk, r)) for r, k in enumerate(z["keys"].tolist()))
        return found

    def missing(self, keys: Sequence[bytes]) -> list[int]:
        """Positions of the images not yet stored (the first of each image listed twice), in order."""
        found = self.find()
        first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in found}
        return sorted(first.values())

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the store's shared lock for the block: an entry is being built from it (see templates.space)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            with contextlib.suppress(OSError):   # a file system without locks: pruning then relies on build folders
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def write_chunk(self, keys: list[bytes], templates: np.ndarray, norms: np.ndarray, resized: np.ndarray) -> Path:
        """One file of the store, written under a temporary name and renamed: never read half-written, and no
        temporary file left when the write fails (a full disk)."""
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / f"chunk-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}.npz"
        tmp = final.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=np.array(keys, dtype=KEY_DTYPE), templates=templates, norms=norms, resized=resized)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return final

    def writer(self, dtype: str) -> "RowWriter":
        return RowWriter(self, dtype)

    def assemble(self, keys: list[bytes], out: Path, dtype: str, also: Sequence[Path] = ()) -> dict:
        """Write the entry of the images ``keys``, in order, to ``out`` from the store (``also``: chunk files known to
        be there), chunk by chunk; returns its metadata (meta.json written last)."""
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        found = self.find(also)
        for pos, k in enumerate(keys):
            chunk, row = found[k]
            by_chunk.setdefault(chunk, []).append((pos, row))
        writer = None
        resized = 0
        for chunk, pairs in by_chunk.items():
            with np.load(chunk) as z:
                templates, norms, flags = z["templates"], z["norms"], z["resized"]
            if writer is None:
                writer = EntryWriter(out, len(keys), templates.shape[2], dtype)
            pos, row = (np.array(v) for v in zip(*pairs))
            writer.templates[pos], writer.norms[pos] = templates[row], norms[row]
            resized += int(flags[row].sum())
        return writer.finish(keys, self.name, resized)

    def prune(self, keep: set[bytes]) -> tuple[int, int]:
        """Drop the stored rows whose key is not in ``keep``, and leftover temporary chunks: a chunk with no row
        to keep is removed, one with some is rewritten with those alone (new file first, then the old one removed).
        Only for a store not in use. Returns (rows dropped, bytes freed)."""
        dropped = freed = 0
        for tmp in self.path.glob("*.tmp"):
            freed += tmp.stat().st_size
            tmp.unlink()
        seen: set[bytes] = set()
        for chunk in self.chunks():
            with np.load(chunk) as z:
                parts = {name: z[name] for name in ("keys", "templates", "norms", "resized")}
            keys = parts["keys"].tolist()
            wanted = np.array([k in keep and k not in seen for k in keys], dtype=bool)
            seen.update(keys)
            if wanted.all():
                continue
            size = chunk.stat().st_size
            if wanted.any():
                new = self.write_chunk([k for k, w in zip(keys, wanted) if w], *(parts[n][wanted] for n in
                                                                                  ("templates", "norms", "resized")))
                size -= new.stat().st_size
            chunk.unlink()
            dropped += int((~wanted).sum())
            freed += size
        return dropped, freed


class RowWriter:
    """The rows of a pass, written to the store every CHUNK_ROWS images (and at the end)."""

    def __init__(self, store: RowStore, dtype: str):
        self.store, self.dtype = store, dtype
        self.keys: list[bytes] = []
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.written: list[Path] = []

    def add(self, keys: list[bytes], normed: np.ndarray, norms: np.ndarray, resized: np.ndarray) -> None:
        self.keys += keys
        self.parts.append((np.ascontiguousarray(normed, dtype=self.dtype), np.ascontiguousarray(norms, np.float32),
                           resized))
        if len(self.keys) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            self.written.append(self.store.write_chunk(self.keys, *(np.concatenate(p) for p in zip(*self.parts))))
            self.keys, self.parts = [], []
