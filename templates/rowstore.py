"""The row store: every extracted image's row (templates, norms, whether it was resized), kept whatever set it was
part of, in files of a few thousand rows written atomically, keyed by the image (a file's path, size and mtime; a
record's file and key; an encoded image's content). A pass that stops, or a set that changes, reruns only the
images not yet stored; entries are assembled from it.

An image file not found by its path is looked up by its content before it is extracted, and its row is stored
under its content (with its path key as an alias, so that the next lookup needs no read): the same bytes met as a
file of a training folder and as an image of a .bin (make_bin.py copies the files' bytes) are extracted once,
whichever comes first.

One store per backbone and dtype: ``<cache folder>/.rows/<store name>/chunk-*.npz``, and beside it
``<store name>.lock``, which a command building an entry from the store holds (shared) so that
``templates.space`` never prunes a store in use.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from facedata.dataset import RecordImage
from templates.entry import KEY_DTYPE, EntryWriter
from utils.errors import UserError

CHUNK_ROWS = 4096   # rows per file of the row store: a killed pass loses at most this many

Row = tuple[Path, int]   # (chunk file, row in it)


# what reading a chunk file that is not a whole chunk raises (truncated, emptied, overwritten, a broken link)
UNREADABLE_CHUNK = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError)


@contextlib.contextmanager
def read_chunk(chunk: Path) -> Iterator[Any]:
    """A chunk's arrays (np.load's lazy archive) for the block; a damaged chunk is a UserError naming it and the
    cache tool's repair, never a traceback."""
    try:
        with np.load(chunk) as z:
            yield z
    except UNREADABLE_CHUNK as exc:
        cache_dir = chunk.parent.parent.parent   # <cache folder>/.rows/<store>/chunk-*.npz
        raise UserError(f"row chunk '{chunk}' of the template cache cannot be read ({type(exc).__name__}: "
                        f"{str(exc)[:80]}): it was damaged after it was written (a full disk, a copy cut short, a "
                        f"file edited by hand). Run `python tools/cache.py --prune --remove-damaged --cache-dir "
                        f"{cache_dir}` to remove the damaged chunks (their images are extracted again by the next "
                        f"run), or move that file away.") from None


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


def content_key(item: Path | RecordImage | bytes) -> bytes | None:
    """The key of an image file's content: that of the same bytes given as an encoded image (a .bin's). None for
    other items (their key already is, or cannot be, their content) and for a file that cannot be read."""
    if not isinstance(item, Path):
        return None
    try:
        return item_key(item.read_bytes())
    except OSError:
        return None


def row_key(item: Path | RecordImage | bytes) -> bytes:
    """The key an image's new row is stored under: its content's for a file (content_key), else item_key."""
    return content_key(item) or item_key(item)


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

    def find(self, also: Sequence[Path] = (), aliases: bool = False) -> dict[bytes, Row]:
        """Where each stored image is: its key (and with ``aliases`` a file row's path key too) -> (chunk file, row).
        ``also``: chunk files known to be there (other processes', which a network file system may not list yet)."""
        found: dict[bytes, Row] = {}
        for chunk in sorted(set(self.chunks()) | set(also)):
            with read_chunk(chunk) as z:
                if aliases and "aliases" in z.files:
                    found.update((a, (chunk, r)) for r, a in enumerate(z["aliases"].tolist()) if a)
                found.update((k, (chunk, r)) for r, k in enumerate(z["keys"].tolist()))
        return found

    def missing(self, keys: list[bytes], content: Callable[[int], bytes | None] | None = None) -> list[int]:
        """Positions of the images not yet stored (the first of each image listed twice), in order. ``content(i)``:
        the content key of image i (content_key), tried where ``keys[i]`` is not stored; where there is one,
        ``keys[i]`` becomes it (the key its row is found or stored under)."""
        found = self.find(aliases=True)
        if content is not None:
            for i, k in enumerate(keys):
                if k not in found and (c := content(i)) is not None:
                    keys[i] = c
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

    def write_chunk(self, keys: list[bytes], templates: np.ndarray, norms: np.ndarray, resized: np.ndarray,
                    aliases: list[bytes] | None = None) -> Path:
        """One file of the store, written under a temporary name and renamed: never read half-written, and no
        temporary file left when the write fails (a full disk). ``aliases``: a second key per row (b"": none)."""
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / f"chunk-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}.npz"
        tmp = final.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as fh:
                # Any: mypy cannot tell that a dict of arrays passed as np.savez's **kwds holds no allow_pickle
                arrays: dict[str, Any] = {"keys": np.array(keys, dtype=KEY_DTYPE), "templates": templates,
                                          "norms": norms, "resized": resized}
                if aliases and any(aliases):
                    arrays["aliases"] = np.array(aliases, dtype=KEY_DTYPE)
                np.savez(fh, **arrays)
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
        be there), chunk by chunk; returns its metadata (meta.json written last). The entry records each row's own
        key (a row found by its alias is recorded by its key), the keys templates.space keeps rows by."""
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        found = self.find(also, aliases=True)
        for pos, k in enumerate(keys):
            chunk, row = found[k]
            by_chunk.setdefault(chunk, []).append((pos, row))
        writer = None
        resized = 0
        own = list(keys)
        for chunk, pairs in by_chunk.items():
            with read_chunk(chunk) as z:
                templates, norms, flags, stored = z["templates"], z["norms"], z["resized"], z["keys"]
            if writer is None:
                writer = EntryWriter(out, len(keys), templates.shape[2], dtype)
            positions, rows = (np.array(v) for v in zip(*pairs))
            writer.templates[positions], writer.norms[positions] = templates[rows], norms[rows]
            resized += int(flags[rows].sum())
            for p, r in pairs:
                own[p] = stored[r].item()
        assert writer is not None, "the callers assemble entries of at least one image"
        return writer.finish(own, self.name, resized)

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
            with np.load(chunk) as z:   # a damaged chunk raises UNREADABLE_CHUNK: the cache tool reports it
                parts = {name: z[name] for name in ("keys", "templates", "norms", "resized")}
                aliases = z["aliases"] if "aliases" in z.files else None
            keys = parts["keys"].tolist()
            wanted = np.array([k in keep and k not in seen for k in keys], dtype=bool)
            seen.update(keys)
            if wanted.all():
                continue
            size = chunk.stat().st_size
            if wanted.any():
                new = self.write_chunk([k for k, w in zip(keys, wanted) if w], parts["templates"][wanted],
                                       parts["norms"][wanted], parts["resized"][wanted],
                                       None if aliases is None else aliases[wanted].tolist())
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
        self.aliases: list[bytes] = []
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.written: list[Path] = []

    def add(self, keys: list[bytes], normed: np.ndarray, norms: np.ndarray, resized: np.ndarray,
            aliases: list[bytes] | None = None) -> None:
        self.keys += keys
        self.aliases += aliases if aliases is not None else [b""] * len(keys)
        self.parts.append((np.ascontiguousarray(normed, dtype=self.dtype), np.ascontiguousarray(norms, np.float32),
                           resized))
        if len(self.keys) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            templates, norms, resized = (np.concatenate(p) for p in zip(*self.parts))
            self.written.append(self.store.write_chunk(self.keys, templates, norms, resized, self.aliases))
            self.keys, self.aliases, self.parts = [], [], []
