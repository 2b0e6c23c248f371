"""What a template cache folder holds, and reclaiming the space that killed or finished runs leave
(``tools/cache.py --status / --prune``).

A cache folder holds entries (``<set>-<key>``), hidden build folders (``.building-*``, an entry being assembled),
entries set aside as unreadable (``*.unreadable-*``, never removed here), and the row store (``.rows/<store>``:
chunk files, and ``.tmp`` chunks a killed run was writing).

In use, and never touched by ``prune``:
- an entry, while a process has it open (``open_entry`` holds a shared lock on its meta.json);
- a build folder, while its process runs: on this machine, while its pid (in its owner.json) is alive; for a build
  of another machine, or one that names no process, while it is younger than ``grace_hours``;
- a row store, while a command builds an entry from it (it holds the store's lock, on this machine) or while a
  build folder of it is in use.

``prune`` removes the build folders not in use, the ``.tmp`` chunks of stores not in use, and the rows of stores
not in use that no entry holds (entries record their images' row keys). An entry written before entries recorded
their keys keeps every row of every store (its store cannot be told). Entries themselves are never removed.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import UserError, run_cli
from templates.cache import BUILDING, OWNER
from templates.entry import read_meta
from templates.rowstore import RowStore

GRACE_HOURS = 24.0


@dataclass
class Entry:
    path: Path
    size: int
    count: int
    in_use: bool
    rows: str | None            # the row store its images came from; None: written before entries recorded it
    keys: set[bytes] = field(default_factory=set, repr=False)


@dataclass
class Build:
    path: Path
    size: int
    age_s: float
    owner: dict
    in_use: bool
    why: str


@dataclass
class Store:
    store: RowStore
    size: int
    chunks: int
    rows: int
    unneeded: int               # rows that no entry holds (all rows count as needed when an entry is of unknown store)
    tmp: list[Path]
    tmp_size: int
    in_use: bool


@dataclass
class Space:
    folder: Path
    entries: list[Entry]
    builds: list[Build]
    stores: list[Store]
    aside: list[tuple[Path, int]]

    @property
    def unknown_rows(self) -> bool:
        return any(e.rows is None for e in self.entries)


def survey(folder: str | os.PathLike, grace_hours: float = GRACE_HOURS) -> Space:
    """What the cache folder ``folder`` holds, with sizes and what is in use (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"template cache folder '{folder}' does not exist (config option cache_dir, or --cache-dir): "
                        f"name the folder the cache was written to.")
    entries, builds, aside = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(BUILDING) and path.is_dir():
            builds.append(_build(path, grace_hours))
        elif ".unreadable-" in path.name:
            aside.append((path, _size(path)))
        elif not path.name.startswith(".") and path.is_dir() and (meta := read_meta(path)) is not None:
            entries.append(_entry(path, meta))
    building = {b.owner.get("rows") for b in builds if b.in_use}
    stores = []
    rows_root = folder / ".rows"
    for path in sorted(p for p in rows_root.iterdir() if p.is_dir()) if rows_root.is_dir() else []:
        store = RowStore(path)
        needed = set().union(*(e.keys for e in entries if e.rows == store.name))
        keys = [k for chunk in store.chunks() for k in _chunk_keys(chunk)]
        tmp = sorted(path.glob("*.tmp"))
        in_use = store.name in building or None in building or _locked(store.lock_path)
        unneeded = 0 if any(e.rows is None for e in entries) else sum(k not in needed for k in keys)
        stores.append(Store(store, _size(path), len(store.chunks()), len(keys), unneeded, tmp,
                            sum(_file_size(p) for p in tmp), in_use))
    return Space(folder, entries, builds, stores, aside)


@dataclass
class Pruned:
    builds: list[Path] = field(default_factory=list)
    tmp: int = 0
    rows: int = 0
    freed: int = 0
    skipped: list[str] = field(default_factory=list)


def prune(folder: str | os.PathLike, grace_hours: float = GRACE_HOURS) -> Pruned:
    """Reclaim what no one needs: build folders not in use, and in the stores not in use their ``.tmp`` chunks and
    the rows no entry holds. A store is pruned under its exclusive lock, so a command starting meanwhile waits."""
    space = survey(folder, grace_hours)
    done = Pruned()
    for b in space.builds:
        if b.in_use:
            done.skipped.append(f"{b.path.name}: {b.why}")
            continue
        done.freed += b.size
        shutil.rmtree(b.path)
        done.builds.append(b.path)
    keep_all = space.unknown_rows
    for s in space.stores:
        with _exclusive(s.store.lock_path) as got:
            if s.in_use or got is False:
                done.skipped.append(f"row store {s.store.name}: in use (an entry is being built from it)")
                continue
            keep = ({k for c in s.store.chunks() for k in _chunk_keys(c)} if keep_all else
                    set().union(*(e.keys for e in space.entries if e.rows == s.store.name)))
            done.tmp += len(s.tmp)
            dropped, freed = s.store.prune(keep)
            done.rows += dropped
            done.freed += freed
    return done


def describe(space: Space) -> str:
    """The report of ``tools/cache.py --status``."""
    lines = [f"template cache '{space.folder}'"]
    total = sum(e.size for e in space.entries)
    lines.append(f"entries: {len(space.entries)}, {_human(total)}")
    for e in space.entries:
        lines.append(f"  {e.path.name}  {_human(e.size)}  {e.count} images" + ("  in use" if e.in_use else ""))
    if space.builds:
        lines.append(f"build folders (entries being built, or left by killed runs): {len(space.builds)}")
        for b in space.builds:
            lines.append(f"  {b.path.name}  {_human(b.size)}  {'in use' if b.in_use else 'leftover'}: {b.why}")
    rows = sum(s.size for s in space.stores)
    lines.append(f"row store: {len(space.stores)} store(s), {_human(rows)}")
    for s in space.stores:
        lines.append(f"  {s.store.name}  {_human(s.size)}  {s.rows} rows in {s.chunks} chunks, {s.unneeded} held by no "
                     f"entry" + (f", {len(s.tmp)} temporary chunk(s) of killed runs ({_human(s.tmp_size)})"
                                 if s.tmp else "") + ("  in use" if s.in_use else ""))
    if space.unknown_rows:
        lines.append("  (entries written before entries recorded their rows: --prune keeps every row)")
    if space.aside:
        lines.append(f"set aside as unreadable (never removed by --prune; delete them by hand once not needed): "
                     f"{len(space.aside)}")
        lines += [f"  {p.name}  {_human(n)}" for p, n in space.aside]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="report entries, build folders and row stores (default)")
    action.add_argument("--prune", action="store_true", help="reclaim what is not in use (see above)")
    parser.add_argument("--cache-dir", default=None, help="the cache folder (default: config option cache_dir)")
    parser.add_argument("--config", default=None, help="config module (default: config/config.py)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config options")
    parser.add_argument("--grace-hours", type=float, default=GRACE_HOURS,
                        help=f"a build folder of another machine, or naming no process, counts as in use while "
                             f"younger than this (default {GRACE_HOURS:g})")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.grace_hours < 0:
            raise UserError(f"--grace-hours {args.grace_hours}: must be 0 or more (hours).")
        folder = args.cache_dir
        if folder is None:
            from config.loading import load_config
            folder = load_config(args.config, args.set).cache_dir
        if args.prune:
            done = prune(folder, args.grace_hours)
            print(f"pruned '{folder}': {len(done.builds)} build folder(s), {done.tmp} temporary chunk(s), "
                  f"{done.rows} row(s) no entry holds; {_human(done.freed)} freed")
            for s in done.skipped:
                print(f"  kept {s}")
        print(describe(survey(folder, args.grace_hours)))
    return run_cli(body)


def _entry(path: Path, meta: dict) -> Entry:
    keys: set[bytes] = set()
    rows = meta.get("rows") if (path / "keys.npy").is_file() else None
    if rows is not None:
        try:
            keys = set(np.load(path / "keys.npy").tolist())
        except (OSError, ValueError):
            rows = None
    return Entry(path, _size(path), int(meta.get("count", 0)), _locked(path / "meta.json"), rows, keys)


def _build(path: Path, grace_hours: float) -> Build:
    """A build folder, and whether it is in use (module docstring)."""
    age = time.time() - max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir())])
    try:
        owner = json.loads((path / OWNER).read_text())
        owner = owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        owner = {}
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        alive = _alive(pid)
        why = f"process {pid} of this machine {'is running' if alive else 'has ended'}"
        return Build(path, _size(path), age, owner, alive, why)
    young = age < grace_hours * 3600
    whose = f"process {pid} of {host}" if host else "no recorded process"
    return Build(path, _size(path), age, owner, young,
                 f"{whose}, last written {age / 3600:.1f} h ago ({'within' if young else 'beyond'} the "
                 f"{grace_hours:g} h grace)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _locked(path: Path) -> bool:
    """Whether a process holds a lock on ``path`` (an exclusive lock cannot be had now)."""
    with _exclusive(path, create=False) as got:
        return got is False


@contextlib.contextmanager
def _exclusive(path: Path, create: bool = True):
    """Try the exclusive lock of ``path`` without waiting: yields True (held for the block), False (another process
    holds it) or None (no such file, or a file system without locks)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            yield False if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            return
        yield True
    finally:
        os.close(fd)


def _chunk_keys(chunk: Path) -> list[bytes]:
    with np.load(chunk) as z:
        return z["keys"].tolist()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size(path: Path) -> int:
    return _file_size(path) if path.is_file() else sum(_file_size(p) for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
