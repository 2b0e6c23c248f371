"""Template cache: the frozen backbone's templates of every image, computed once and memory-mapped.

For each image the cache holds normalize(backbone(x)) and normalize(backbone(flip(x))) as an (N, 2, D) array
(float32, or float16 on request) plus the (N, 2) norms, so the raw backbone outputs are recoverable for the
bare-backbone reference. The folder name carries a hash of everything the templates depend on: format version,
architecture, weights-file content, the autocast (amp) when one is used, and the inputs (a training folder's relative
paths, sizes and mtimes; a record file's size, mtime, index and keys; a .bin's content). Extraction writes into a
hidden folder and renames it into place when complete, so a killed extraction never leaves a cache that is later read.

No extracted row is thrown away: rows are also kept in the row store (templates.rowstore), so a pass that stops (an
undecodable file, a killed process, a full disk) or a training set that changes reruns only the images not yet
stored.

One process reads a miss as: start the build (the images not yet in the row store), extract them into the store,
publish the entry (assembled from the store, renamed into place). Under torchrun the same steps are wrapped in the
collective protocol: process 0 starts the build, each process extracts its contiguous share into the store, and once
all shares are in, process 0 publishes. A killed process stops them all; the rerun finds the finished rows in the
store and extracts the rest.

Modules: templates.entry (an entry's files, reader, writer), templates.rowstore (the row store),
templates.extraction (the backbone pass), templates.space (what the cache folder holds, and pruning it), this one
(the cache's keys and its protocol).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from backbones.spec import BackboneSpec
from facedata.dataset import RecordImages, TrainIndex
from facedata.recordio import RecordFile
from utils.distributed import Processes
from utils.errors import UserError, full_disk_named
from utils.io import sha256_file
from utils.logs import get_logger
from templates.entry import CACHE_VERSION, Templates, open_entry, open_written, publish
from templates.extraction import BackboneSource, ExtractionSettings, extract_rows, undecodable
from templates.rowstore import RowStore, content_key, item_key, row_key

log = get_logger(__name__)

BUILDING = ".building-"   # prefix of the hidden folder an entry is assembled in
OWNER = "owner.json"      # in a build folder: the machine and process building it, and its row store


@dataclass
class _Build:
    """An entry being built, started by process 0 and sent to every process: the hidden folder the entry is built in
    (None on a hit) and the positions of the images not yet in the row store. Process 0 keeps what it alone needs:
    every image's row key (the others compute their share's) and the row store's lock, held until the entry is
    published or abandoned."""
    work: Path | None
    todo: np.ndarray
    keys: list[bytes] | None = None
    lock: contextlib.ExitStack | None = None

    def __getstate__(self) -> dict:   # sent once, compactly
        return {"work": self.work, "todo": self.todo, "keys": None, "lock": None}

    def close(self) -> None:
        """Remove the build folder (only ever one this process made) and release the store's lock."""
        if self.work is not None and self.work.exists():
            for f in self.work.iterdir():
                f.unlink()
            self.work.rmdir()
        if self.lock is not None:
            self.lock.close()


class TemplateCache:
    """The templates of one backbone under ``folder``, keyed by the backbone's fingerprint, the inputs' and dtype."""

    def __init__(self, folder: str | os.PathLike, backbone: BackboneSource, settings: ExtractionSettings,
                 processes: Processes = Processes()):
        self.folder, self.backbone, self.settings, self.processes = Path(folder), backbone, settings, processes

    @classmethod
    def from_config(cls, cfg, device, processes: Processes = Processes(),
                    backbone: BackboneSource | None = None) -> "TemplateCache":
        """The cache of config options cache_dir, the backbone's (network, output_ori, SE, embedding_size unless
        ``backbone`` is given) and the extraction's (cache_dtype, extract_batch_size, num_workers, amp,
        channels_last), extracting on ``device``."""
        return cls(cfg.cache_dir, BackboneSpec.from_config(cfg) if backbone is None else backbone,
                   ExtractionSettings.from_config(cfg, device), processes)

    def key(self, inputs: str) -> str:
        """Hash of everything the templates depend on; ``inputs`` names the images (see folder_inputs, bin_inputs)."""
        parts = {"version": CACHE_VERSION, **self.backbone.fingerprint(), "inputs": inputs,
                 "dtype": self.settings.dtype}
        if self.settings.amp != "none":   # autocast's templates are not float32's (float32 keeps its keys)
            parts["amp"] = self.settings.amp
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def store(self) -> RowStore:
        """The row store of this backbone and dtype: every image's extracted row, whatever set it was part of; in
        the cache folder's hidden ``.rows`` (its visible folders are complete entries only)."""
        return RowStore(self.folder / ".rows" / self.key(""))

    def get(self, name: str, inputs: str, items: Sequence, describe: Callable[[int], str] | None = None,
            what: str = "images", on_batch: Callable[[int], object] | None = None) -> Templates:
        """The cached templates of ``items`` (image files, record images or encoded images); extracted (once) with
        the backbone on a miss. ``on_batch``: called with the number of images done as the pass goes (timing).

        Under torchrun every process calls this, in the same order (``_get_shared``)."""
        describe = describe or (lambda i: str(items[i]) if isinstance(items[i], Path) else f"image {i}")
        final = self.folder / f"{name}-{self.key(inputs)}"
        if self.processes.world > 1:
            return self._get_shared(final, items, describe, what, on_batch)
        build = self._start(final, items, what)
        if build.work is not None:
            try:
                problems, written = self._extract(build, build.todo.tolist(), items, describe, what, on_batch)
                if problems:
                    raise undecodable(what, problems)
                self._publish(build, written, final, what)
            finally:
                build.close()
        return open_written(final)

    def _get_shared(self, final: Path, items: Sequence, describe: Callable[[int], str], what: str,
                    on_batch: Callable[[int], object] | None) -> Templates:
        """``get``'s steps as the collective protocol of several processes: each step is collective, so a failure
        anywhere stops them all."""
        procs = self.processes
        # 1. process 0: a hit, or the build of a miss (the images missing from the row store)
        build = procs.decide(lambda: self._start(final, items, what), f"planning the extraction of the {what}")
        work = build.work
        if work is not None:
            try:
                # 2. every process: its share of the missing images, into the row store
                def share() -> tuple[list[str], list[str]]:
                    self._check_visible(work)
                    mine = build.todo[procs.share(len(build.todo), self.settings.batch_size)].tolist()
                    return self._extract(build, mine, items, describe, what, on_batch)
                shares = procs.each(share, f"extracting its share of the {what}")
                # 3. the images that did not decode, of all shares, stop every process
                self._refuse_undecodable([p for problems, _ in shares for p in problems], what)
                # 4. process 0: the entry assembled from the store and renamed into place
                written = [f for _, files in shares for f in files]
                procs.each(lambda: self._publish(build, written, final, what) if procs.main else None,
                           f"publishing the cache entry of the {what}")
            finally:
                if procs.main:
                    build.close()
        # 5. every process: the published entry
        procs.each(lambda: self._check_readable(final), f"opening the cache entry of the {what}")
        return open_written(final)

    def _start(self, final: Path, items: Sequence, what: str) -> _Build:
        """Process 0: a hit (no build folder) or the build of a miss (the build folder made, the store locked)."""
        entry = open_entry(final)
        if entry is not None and len(entry) == len(items):
            log.info("template cache hit: %s (%d %s)", final, len(entry), what)
            return _Build(None, np.zeros(0, np.int64))
        store = self.store()
        build = _Build(None, np.zeros(0, np.int64))
        try:
            with full_disk_named(self.folder, "cache_dir"):
                build.lock = contextlib.ExitStack()
                build.lock.enter_context(store.in_use())
                build.work = self._make_build_folder(final, store, len(items), what)
            build.keys = [item_key(item) for item in items]
            by_path = list(build.keys)
            # an image file not stored under its path may be under its content (a .bin's image): read only those
            build.todo = np.asarray(store.missing(build.keys, lambda i: content_key(items[i])), dtype=np.int64)
        except BaseException:
            build.close()
            raise
        distinct = len(set(build.keys))    # an image listed twice (a .bin's pair and gender images) counts once
        if len(build.todo) < distinct:
            log.info("%d of %d distinct %s already extracted (row store %s)", distinct - len(build.todo), distinct,
                     what, store.path)
            todo = set(build.todo.tolist())
            same = sum(a != b and i not in todo for i, (a, b) in enumerate(zip(by_path, build.keys)))
            if same:
                log.info("%d of them found by their content (the same bytes extracted before, e.g. as images of a "
                         ".bin)", same)
        if self.processes.world > 1:
            log.info("%d %s to extract, shared by %d processes", len(build.todo), what, self.processes.world)
        return build

    def _make_build_folder(self, final: Path, store: RowStore, count: int, what: str) -> Path:
        """Move an unreadable entry aside (never deleted) and make the hidden folder the new entry is built in,
        with a note of who builds it (templates.space reads it)."""
        if final.exists():
            aside = final.with_name(f"{final.name}.unreadable-{int(time.time())}")
            log.warning("template cache %s is incomplete or unreadable; moved aside to %s and rebuilding", final, aside)
            final.rename(aside)
        log.info("template cache miss: extracting %d %s into %s", count, what, final)
        work = self.folder / f"{BUILDING}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        work.mkdir(parents=True)
        (work / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "rows": store.name,
                                              "started": time.time()}))
        return work

    def _extract(self, build: _Build, mine: list[int], items: Sequence, describe: Callable[[int], str], what: str,
                 on_batch: Callable[[int], object] | None) -> tuple[list[str], list[str]]:
        """The backbone pass over the images at positions ``mine`` (this process's share of the missing ones), into
        the row store; returns their decoding problems and the store's files it wrote."""
        procs = self.processes
        if not mine:
            return [], []
        # a file's row under its content's key, its path key as the alias (the next lookup then reads nothing)
        keys = [build.keys[i] for i in mine] if build.keys else [row_key(items[i]) for i in mine]
        aliases = [item_key(items[i]) if isinstance(items[i], Path) else b"" for i in mine]
        with full_disk_named(self.folder, "cache_dir"):
            done = extract_rows(self.backbone.load(), [items[i] for i in mine], keys, self.store(), self.settings,
                                lambda j: describe(mine[j]), what, on_batch, aliases)
        log.info("%sextracted %d %s in %.1fs (%.1f images/s, each with its flip)",
                 f"process {procs.rank} " if procs.world > 1 else "", len(mine), what, done.seconds,
                 len(mine) / done.seconds)
        return done.problems, [str(p) for p in done.written]

    def _check_visible(self, work: Path) -> None:
        """Every process sees the build folder process 0 made (a file system all machines share)."""
        if not work.is_dir():
            raise UserError(f"process {self.processes.rank} cannot see the folder '{work}' that process 0 made in "
                            f"cache_dir '{self.folder}': with torchrun on several machines, cache_dir (and the data) "
                            f"must be on a file system all machines share, under the same path. Set --set "
                            f"cache_dir=<shared folder>.")

    def _refuse_undecodable(self, problems: list[str], what: str) -> None:
        """Every process: stop if an image of any share did not decode (process 0's error lists them all)."""
        if problems and self.processes.main:
            raise undecodable(what, problems)
        if problems:   # one copy of the list is enough
            raise UserError(f"process {self.processes.rank}: {len(problems)} of the {what} do not decode; process "
                            f"0's message lists them.")

    def _publish(self, build: _Build, written: list[str], final: Path, what: str) -> None:
        """Process 0: assemble the entry in the build folder from the row store (``written``: the chunk files the
        shares wrote, which a network file system may not list yet) and rename it into place."""
        assert build.keys is not None and build.work is not None, "process 0's build of a miss: _start set both"
        with full_disk_named(self.folder, "cache_dir"):
            meta = self.store().assemble(build.keys, build.work, self.settings.dtype, also=[Path(f) for f in written])
            (build.work / OWNER).unlink()   # an entry's folder holds the entry alone
            publish(build.work, final)
        if meta["resized"]:
            log.warning("%d of %d %s were not 112x112: short side resized to 112 (bicubic) and centre-cropped",
                        meta["resized"], len(build.keys), what)

    def _check_readable(self, final: Path) -> None:
        if open_entry(final) is None:
            raise UserError(f"process {self.processes.rank} cannot read the template cache '{final}' that process 0 "
                            f"wrote: with torchrun on several machines, cache_dir must be on a file system all "
                            f"machines share, under the same path. Set --set cache_dir=<shared folder>.")


def folder_fingerprint(root: Path, paths: Sequence[Path]) -> str:
    """Hash of the relative paths, sizes and mtimes of a training set's images."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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

