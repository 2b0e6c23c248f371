"""Template cache: the frozen backbone's templates of every image, computed once and memory-mapped.

For each image the cache holds normalize(backbone(x)) and normalize(backbone(flip(x))) as an (N, 2, D) array
(float32, or float16 on request) plus the (N, 2) norms, so the raw backbone outputs are recoverable for the
bare-backbone reference. The folder name carries a hash of everything the templates depend on: format version,
architecture, weights-file content, and the inputs (a training folder's relative paths, sizes and mtimes; a
record file's size, mtime, index and keys; a .bin's content). Extraction writes into a hidden folder and renames it
into place when complete, so a killed extraction never leaves a cache that is later read.

No extracted row is thrown away: rows are also kept, a few thousand per file written atomically, in a store inside
the cache folder (``<cache folder>/.rows/<backbone key>``) keyed by each image (a file's path, size and mtime; a
record's file and key; an encoded image's content), so a pass that stops (an undecodable file, a killed process)
or a training set that changes (files removed, replaced or added) reruns only the images not yet in the store.

Under torchrun the processes share a miss: process 0 lists the images not yet in the store, each process extracts
its contiguous share into the store, and once all shares are in, process 0 assembles and publishes the entry (the
same rename); one process is the same protocol alone. A killed process stops them all; the rerun finds the finished
rows in the store and extracts the rest.
"""
from __future__ import annotations

import hashlib
import json
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

from facedata.dataset import ImageDataset, RecordImage, RecordImages, TrainIndex, normalize_images, problem_report
from runtime.device import decode_workers
from runtime.distributed import Processes
from runtime.errors import UserError
from runtime.io import sha256_file
from facedata.recordio import RecordFile
from runtime.logs import get_logger

log = get_logger(__name__)

CACHE_VERSION = 1
CHUNK_ROWS = 4096   # rows per file of the row store: a killed pass loses at most this many


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
        return cls(device, cfg.cache_dtype, cfg.extract_batch_size, decode_workers(cfg.num_workers), cfg.amp,
                   cfg.channels_last)


class TemplateCache:
    """The templates of one backbone under ``folder``, keyed by the backbone's fingerprint, the inputs' and dtype."""

    def __init__(self, folder: str | os.PathLike, backbone: BackboneSource, settings: ExtractionSettings,
                 processes: Processes = Processes()):
        self.folder, self.backbone, self.settings, self.processes = Path(folder), backbone, settings, processes

    def key(self, inputs: str) -> str:
        """Hash of everything the templates depend on; ``inputs`` names the images (see folder_inputs, bin_inputs)."""
        parts = {"version": CACHE_VERSION, **self.backbone.fingerprint(), "inputs": inputs,
                 "dtype": self.settings.dtype}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def rows(self) -> Path:
        """The row store of this backbone and dtype: every image's extracted row, whatever set it was part of; in
        the cache folder's hidden ``.rows`` (its visible folders are complete entries only)."""
        return self.folder / ".rows" / self.key("")

    def get(self, name: str, inputs: str, items: Sequence[Path] | Sequence[bytes],
            describe: Callable[[int], str] | None = None, what: str = "images") -> Templates:
        """The cached templates of ``items``; extracted (once) with the backbone on a miss.

        Under torchrun every process calls this, in the same order: process 0 decides (a hit, or the images missing
        from the row store), each process extracts its share of those into the store, and once all shares are in,
        process 0 assembles and publishes the entry, which every process then opens. The processes agree on the
        outcome of each step, so a failure anywhere stops them all; the decoding problems of all shares are
        reported together, by process 0. A single process runs the same steps, each collective one a no-op."""
        if describe is None:
            def describe(i: int) -> str:
                return str(items[i]) if isinstance(items[i], Path) else f"image {i}"
        final = self.folder / f"{name}-{self.key(inputs)}"
        procs, rows = self.processes, self.rows()
        plan: tuple[str, np.ndarray] | None = None
        keys: list[bytes] = []
        work: Path | None = None
        failure: BaseException | None = None
        if procs.main:
            try:
                entry = open_entry(final)
                if entry is not None and len(entry) == len(items):
                    log.info("template cache hit: %s (%d %s)", final, len(entry), what)
                    plan = ("", np.zeros(0, np.int64))
                else:
                    work = self._start_miss(final, len(items), what)
                    keys = [item_key(item) for item in items]
                    todo = missing_rows(keys, rows)
                    _log_already_extracted(keys, todo, what, rows)
                    if procs.world > 1:
                        log.info("%d %s to extract, shared by %d processes", len(todo), what, procs.world)
                    plan = (str(work), np.asarray(todo, dtype=np.int64))   # sent once, compactly
            except Exception as exc:   # the others learn of it and stop too
                failure = exc
        try:
            work_name, todo = procs.from_main(plan, failure, f"planning the extraction of the {what}")
            if work_name:
                work = Path(work_name)
                problems: list[str] = []
                written: list[Path] = []
                try:
                    if not work.is_dir():
                        raise UserError(f"process {procs.rank} cannot see the folder '{work}' that process 0 made in "
                                        f"cache_dir '{self.folder}': with torchrun on several machines, cache_dir (and "
                                        f"the data) must be on a file system all machines share, under the same "
                                        f"path. Set --set cache_dir=<shared folder>.")
                    mine = todo[procs.share(len(todo), self.settings.batch_size)].tolist()
                    if mine:
                        problems, written, seconds = _extract_rows(
                            self.backbone.load(), [items[i] for i in mine],
                            [keys[i] for i in mine] if keys else [item_key(items[i]) for i in mine], rows,
                            self.settings, lambda j: describe(mine[j]), what)
                        log.info("%sextracted %d %s in %.1fs (%.1f images/s, each with its flip)",
                                 f"process {procs.rank} " if procs.world > 1 else "", len(mine), what, seconds,
                                 len(mine) / seconds)
                except Exception as exc:
                    failure = exc
                shares = procs.agree((problems, [str(p) for p in written]), failure,
                                     f"extracting its share of the {what}")
                problems = [p for share_problems, _ in shares for p in share_problems]
                if problems and procs.main:
                    raise _undecodable(what, problems)
                if problems:   # process 0 lists them all; one copy of the list is enough
                    raise UserError(f"process {procs.rank}: {len(problems)} of the {what} do not decode; process "
                                    f"0's message lists them.")
                if procs.main:
                    try:
                        publish(keys, rows, work, self.settings.dtype, what,
                                also=[Path(p) for _, files in shares for p in files])
                        try:
                            os.rename(work, final)
                        except OSError:
                            if open_entry(final) is None:  # another command published it first, else it is real
                                raise
                    except Exception as exc:
                        failure = exc
                procs.agree(None, failure, f"publishing the cache entry of the {what}")
        finally:
            if procs.main and work is not None:
                _remove_folder(work)
        entry = open_entry(final)
        missing = None if entry is not None else UserError(
            f"process {procs.rank} cannot read the template cache '{final}' that process 0 wrote: with torchrun on "
            f"several machines, cache_dir must be on a file system all machines share, under the same path. Set "
            f"--set cache_dir=<shared folder>.")
        procs.agree(None, missing, f"opening the cache entry of the {what}")
        return entry

    def _start_miss(self, final: Path, count: int, what: str) -> Path:
        """Move an unreadable entry aside (never deleted) and make the hidden folder the new entry is built in."""
        if final.exists():
            aside = final.with_name(f"{final.name}.unreadable-{int(time.time())}")
            log.warning("template cache %s is incomplete or unreadable; moved aside to %s and rebuilding", final, aside)
            final.rename(aside)
        log.info("template cache miss: extracting %d %s into %s", count, what, final)
        work = self.folder / f".building-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        work.mkdir(parents=True)
        return work


def _remove_folder(folder: Path) -> None:
    """Remove a hidden build folder of the cache (only ever one this process made)."""
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def _undecodable(what: str, problems: list[str]) -> UserError:
    return UserError(problem_report(f"the {what}", problems, "Replace or remove the files that do not decode, "
                                    "then run again (no templates were cached; the rows of the others are kept and "
                                    "not extracted again)."))


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


def item_key(item: Path | RecordImage | bytes) -> bytes:
    """The row store's key of an image: a file's path, size and mtime; a record's file (size, mtime) and key; an
    encoded image's content. A file that cannot be read gets a key of its path alone (it is then reported)."""
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


def stored_rows(rows: Path, also: Sequence[Path] = ()) -> dict[bytes, tuple[Path, int]]:
    """Where each image of the row store is: its key -> (chunk file, row). ``also``: chunk files known to be
    there (other processes', which a network file system may not list yet)."""
    found: dict[bytes, tuple[Path, int]] = {}
    listed = set(rows.glob("chunk-*.npz")) if rows.is_dir() else set()
    for chunk in sorted(listed | set(also)):
        with np.load(chunk) as z:
            found.update((k, (chunk, r)) for r, k in enumerate(z["keys"].tolist()))
    return found


def missing_rows(keys: Sequence[bytes], rows: Path) -> list[int]:
    """Positions of the images not yet in the row store ``rows`` (the first of each image listed twice), in order."""
    found = stored_rows(rows)
    first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in found}
    return sorted(first.values())


def _log_already_extracted(keys: Sequence[bytes], todo: Sequence[int], what: str, rows: Path) -> None:
    """Say how many distinct images were found in the row store (an image listed twice, as a .bin's pair and gender
    images often are, counts once)."""
    unique = len(set(keys))
    if len(todo) < unique:
        log.info("%d of %d distinct %s already extracted (row store %s)", unique - len(todo), unique, what, rows)


def _write_chunk(rows: Path, keys: list[bytes], parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """One file of the row store, written under a temporary name and renamed: never read half-written."""
    rows.mkdir(parents=True, exist_ok=True)
    final = rows / f"chunk-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}.npz"
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, keys=np.array(keys, dtype="S32"), templates=np.concatenate([p[0] for p in parts]),
                 norms=np.concatenate([p[1] for p in parts]), resized=np.concatenate([p[2] for p in parts]))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def extract(backbone: nn.Module, items: Sequence[Path] | Sequence[bytes], out: Path, settings: ExtractionSettings,
            describe: Callable[[int], str] = str, what: str = "images", rows: Path | None = None,
            on_batch: Callable[[int], object] | None = None) -> dict:
    """Run the backbone over the ``items`` not yet in the row store ``rows`` (and their flips), keep their rows
    there, and write templates.npy, norms.npy, meta.json of all ``items`` to ``out``.

    Images are decoded in DataLoader workers while the backbone runs; rows go to the store every CHUNK_ROWS images,
    so neither the image set nor the templates are held in memory. Every image that fails to decode is reported
    at the end, all at once, and no cache is written (the rows of the others stay in the store). ``rows`` None:
    a store inside ``out``, removed once the entry is written. ``on_batch``: called with the number of images done
    each time a batch's rows reach the host (progress, timing). Returns the metadata.
    """
    own_store = rows is None
    rows = out / ".rows" if rows is None else rows
    keys = [item_key(item) for item in items]
    todo = missing_rows(keys, rows)
    _log_already_extracted(keys, todo, what, rows)
    if todo:
        problems, _, seconds = _extract_rows(backbone, [items[i] for i in todo], [keys[i] for i in todo], rows,
                                             settings, lambda j: describe(todo[j]), what,
                                             on_batch)
        if problems:
            raise _undecodable(what, problems)
        log.info("extracted %d %s in %.1fs (%.1f images/s, each with its flip)", len(todo), what, seconds,
                 len(todo) / seconds)
    meta = publish(keys, rows, out, settings.dtype, what)
    if own_store:
        _remove_folder(rows)
    return meta


def publish(keys: list[bytes], rows: Path, out: Path, dtype: str, what: str, also: Sequence[Path] = ()) -> dict:
    """Assemble the entry of the images ``keys`` in ``out`` from the row store (``also``: chunk files known to be
    there) and write its meta.json last; returns the metadata."""
    meta = _assemble(keys, stored_rows(rows, also), out, dtype)
    if meta["resized"]:
        log.warning("%d of %d %s were not 112x112: short side resized to 112 (bicubic) and centre-cropped",
                    meta["resized"], len(keys), what)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _allocate(out: Path, count: int, dim: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The entry's templates.npy and norms.npy in ``out``, allocated as writable memory maps."""
    return (np.lib.format.open_memmap(out / "templates.npy", mode="w+", dtype=np.dtype(dtype), shape=(count, 2, dim)),
            np.lib.format.open_memmap(out / "norms.npy", mode="w+", dtype=np.float32, shape=(count, 2)))


class _RowWriter:
    """The rows of a pass, written to the store every CHUNK_ROWS images (and at the end)."""

    def __init__(self, rows: Path, dtype: str):
        self.rows, self.dtype = rows, dtype
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
            self.written.append(_write_chunk(self.rows, self.keys, self.parts))
            self.keys, self.parts = [], []


def _extract_rows(backbone: nn.Module, items: Sequence, keys: list[bytes], rows: Path, settings: ExtractionSettings,
                  describe: Callable[[int], str], what: str, on_batch: Callable[[int], object] | None = None
                  ) -> tuple[list[str], list[Path], float]:
    """The backbone pass over ``items``: their rows written to the store as they come (``on_batch`` called with the
    number of images done each time a batch's rows reach the host); returns the decoding problems, the store's
    files written and the seconds taken.

    On CUDA the pass is pipelined one batch deep: batch k+1 is sent to the GPU before the rows of batch k are
    copied back (asynchronously, into pinned memory) and written, so the GPU does not wait for the host."""
    device, channels_last = settings.device, settings.channels_last
    cuda = device.type == "cuda"
    backbone = backbone.to(device).eval()
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp) if cuda else None
    loader = DataLoader(ImageDataset(items), batch_size=settings.batch_size, shuffle=False,
                        num_workers=settings.num_workers, pin_memory=cuda,
                        prefetch_factor=4 if settings.num_workers else None)
    problems: list[str] = []
    writer = _RowWriter(rows, settings.dtype)
    bar = tqdm(total=len(items), desc=f"extracting {what}", unit="img", leave=False, dynamic_ncols=True, disable=None)

    def launch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """The device work of one batch: (B, 2, D) normalised templates and (B, 2) norms, on their way to the host."""
        x = normalize_images(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats = [backbone(x).float(), backbone(x.flip(3)).float()]
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

    def finish(batch: tuple) -> None:
        """The host side of one launched batch: wait for its rows, keep those of the images that decoded."""
        (normed, norms, done), idx, was_resized, errors = batch
        if done is not None:
            done.synchronize()
        good = np.array([not e for e in errors])
        writer.add([keys[int(i)] for i, ok in zip(idx, good) if ok], normed.numpy()[good], norms.numpy()[good],
                   was_resized.numpy()[good])
        bar.update(len(idx))
        done_count[0] += len(idx)
        if on_batch is not None:
            on_batch(done_count[0])

    t0 = time.perf_counter()
    done_count = [0]
    in_flight = None
    with torch.inference_mode():
        for idx, x, was_resized, errors in loader:
            problems += [f"{describe(int(i))}: {e}" for i, e in zip(idx, errors) if e]
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
    bar.close()
    return problems, writer.written, time.perf_counter() - t0


def _assemble(keys: list[bytes], found: dict[bytes, tuple[Path, int]], out: Path, dtype: str) -> dict:
    """templates.npy and norms.npy of the images ``keys``, in order, copied from the row store chunk by chunk;
    returns the entry's metadata (without meta.json, which the caller writes last)."""
    by_chunk: dict[Path, list[tuple[int, int]]] = {}
    for pos, k in enumerate(keys):
        chunk, row = found[k]
        by_chunk.setdefault(chunk, []).append((pos, row))
    t = n = None
    resized = 0
    for chunk, pairs in by_chunk.items():
        with np.load(chunk) as z:
            templates, norms, flags = z["templates"], z["norms"], z["resized"]
        if t is None:
            t, n = _allocate(out, len(keys), templates.shape[2], dtype)
        pos, row = (np.array(v) for v in zip(*pairs))
        t[pos], n[pos] = templates[row], norms[row]
        resized += int(flags[row].sum())
    for arr in (t, n):
        arr.flush()
    for name in ("templates.npy", "norms.npy"):
        with open(out / name, "rb+") as fh:
            os.fsync(fh.fileno())
    dim = t.shape[2]
    del t, n
    return {"version": CACHE_VERSION, "count": len(keys), "dim": int(dim), "dtype": dtype, "resized": resized,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
