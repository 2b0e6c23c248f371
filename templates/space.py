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

Only what the cache made is ever removed: a build folder is the cache's when its name has the cache's pattern
(``.building-<entry>-<pid>-<6 hex digits>``) and it holds the cache's owner.json; anything else in the folder (a
user's ``.building-notes``, a link) is listed as not the cache's and left alone. Damaged files (a row chunk that
does not read, an owner.json or link that is broken) are reported by name, never a traceback; a store with a
damaged chunk is not pruned unless ``--remove-damaged`` is given, which removes those chunks (their images are
extracted again when next needed).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import UserError, run_cli
from templates.cache import BUILDING, OWNER
from templates.entry import read_meta
from templates.rowstore import UNREADABLE_CHUNK, RowStore

GRACE_HOURS = 24.0
# the name templates.cache gives a build folder: BUILDING + "<entry>-<pid>-<6 hex digits>"
# (TemplateCache._make_build_folder)
BUILD_NAME = re.compile(re.escape(BUILDING) + r".+-\d+-[0-9a-f]{6}")


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
    damaged: list[str] = field(default_factory=list)   # broken links, an unreadable owner.json


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
    damaged: list[tuple[Path, str]] = field(default_factory=list)   # chunks that do not read, and why


@dataclass
class Space:
    folder: Path
    entries: list[Entry]
    builds: list[Build]
    stores: list[Store]
    aside: list[tuple[Path, int]]
    foreign: list[Path] = field(default_factory=list)   # names like a build folder's that the cache did not make

    @property
    def unknown_rows(self) -> bool:
        return any(e.rows is None for e in self.entries)


def check_grace(grace_hours: float) -> None:
    """Refuse a grace that is not a finite number of hours, 0 or more (NaN would make every build look old)."""
    if not isinstance(grace_hours, (int, float)) or not math.isfinite(grace_hours) or grace_hours < 0:
        raise UserError(f"--grace-hours {grace_hours}: must be a finite number of hours, 0 or more (the default is "
                        f"{GRACE_HOURS:g}); a build folder of another machine counts as in use while younger.")


def survey(folder: str | os.PathLike, grace_hours: float = GRACE_HOURS) -> Space:
    """What the cache folder ``folder`` holds, with sizes and what is in use (module docstring)."""
    check_grace(grace_hours)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"template cache folder '{folder}' does not exist (config option cache_dir, or --cache-dir): "
                        f"name the folder the cache was written to.")
    entries, builds, aside, foreign = [], [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(BUILDING):
            if _is_build(path):
                builds.append(_build(path, grace_hours))
            else:
                foreign.append(path)
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
        keys, damaged = [], []
        for chunk in store.chunks():
            try:
                keys += _chunk_keys(chunk)
            except UNREADABLE_CHUNK as exc:
                damaged.append((chunk, _why(chunk, exc)))
        tmp = sorted(path.glob("*.tmp"))
        in_use = store.name in building or None in building or _locked(store.lock_path)
        unneeded = 0 if any(e.rows is None for e in entries) else sum(k not in needed for k in keys)
        stores.append(Store(store, _size(path), len(store.chunks()), len(keys), unneeded, tmp,
                            sum(_file_size(p) for p in tmp), in_use, damaged))
    return Space(folder, entries, builds, stores, aside, foreign)


def _why(chunk: Path, exc: BaseException) -> str:
    size = _file_size(chunk)
    if chunk.is_symlink() and not chunk.exists():
        return "a broken symbolic link"
    return "empty (0 bytes)" if size == 0 else f"not a readable row chunk ({type(exc).__name__}: {str(exc)[:80]})"


@dataclass
class Pruned:
    builds: list[Path] = field(default_factory=list)
    tmp: int = 0
    rows: int = 0
    freed: int = 0
    skipped: list[str] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)   # damaged chunks removed (--remove-damaged)


def prune(folder: str | os.PathLike, grace_hours: float = GRACE_HOURS, remove_damaged: bool = False) -> Pruned:
    """Reclaim what no one needs: build folders not in use, and in the stores not in use their ``.tmp`` chunks and
    the rows no entry holds. A store is pruned under its exclusive lock, so a command starting meanwhile waits. A
    store with damaged chunks is left as it is, unless ``remove_damaged``: then those chunks go first."""
    space = survey(folder, grace_hours)
    done = Pruned()
    for path in space.foreign:
        done.skipped.append(f"{path.name}: not a build folder of the cache (its name or owner.json is not the "
                            f"cache's); never removed")
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
            if s.damaged and not remove_damaged:
                done.skipped.append(f"row store {s.store.name}: {len(s.damaged)} damaged chunk(s) (listed below); "
                                    f"run --prune --remove-damaged to remove them (their images are extracted again "
                                    f"when next needed), then the store is pruned")
                continue
            for chunk, _ in s.damaged:
                done.freed += _file_size(chunk)
                chunk.unlink()
                done.damaged.append(chunk)
            keep = ({k for c in s.store.chunks() for k in _chunk_keys(c)} if keep_all else
                    set().union(*(e.keys for e in space.entries if e.rows == s.store.name)))
            try:
                dropped, freed = s.store.prune(keep)
            except UNREADABLE_CHUNK as exc:   # damaged beyond its keys; each chunk's rewrite is atomic, so what
                # was done before is whole and the rest is as it was
                done.skipped.append(f"row store {s.store.name}: stopped, a file did not read while pruning "
                                    f"({type(exc).__name__}: {str(exc)[:100]}); the rest of the store was kept")
                continue
            done.tmp += len(s.tmp)
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
            lines += [f"    damaged: {d}" for d in b.damaged]
    if space.foreign:
        lines.append(f"not made by the cache (a build folder's name prefix, but not its name pattern and owner.json; "
                     f"never removed): {len(space.foreign)}")
        lines += [f"  {p.name}" for p in space.foreign]
    rows = sum(s.size for s in space.stores)
    lines.append(f"row store: {len(space.stores)} store(s), {_human(rows)}")
    for s in space.stores:
        lines.append(f"  {s.store.name}  {_human(s.size)}  {s.rows} rows in {s.chunks} chunks, {s.unneeded} held by no "
                     f"entry" + (f", {len(s.tmp)} temporary chunk(s) of killed runs ({_human(s.tmp_size)})"
                                 if s.tmp else "") + ("  in use" if s.in_use else ""))
        if s.damaged:
            lines.append(f"    {len(s.damaged)} damaged chunk(s), whose rows cannot be used (--prune --remove-damaged "
                         f"removes them; their images are extracted again when next needed):")
            lines += [f"    damaged: {c.name}: {why}" for c, why in s.damaged]
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
    parser.add_argument("--remove-damaged", action="store_true",
                        help="with --prune: remove the row chunks that do not read (default: off, they are reported "
                             "and their store is left as it is)")
    parser.add_argument("--grace-hours", type=float, default=GRACE_HOURS,
                        help=f"a build folder of another machine, or naming no process, counts as in use while "
                             f"younger than this (default {GRACE_HOURS:g})")
    args = parser.parse_args(argv)

    def body() -> None:
        check_grace(args.grace_hours)
        if args.remove_damaged and not args.prune:
            raise UserError("--remove-damaged goes with --prune (it removes the damaged row chunks --status lists).")
        folder = args.cache_dir
        if folder is None:
            from config.loading import load_config
            folder = load_config(args.config, args.set).cache_dir
        if args.prune:
            done = prune(folder, args.grace_hours, args.remove_damaged)
            print(f"pruned '{folder}': {len(done.builds)} build folder(s), {done.tmp} temporary chunk(s), "
                  f"{done.rows} row(s) no entry holds" + (f", {len(done.damaged)} damaged chunk(s)" if done.damaged
                                                           else "") + f"; {_human(done.freed)} freed")
            for s in done.skipped:
                print(f"  kept {s}")
        print(describe(survey(folder, args.grace_hours)))
    return run_cli(body)


def _entry(path: Path, meta: dict) -> Entry:
    """An entry; one whose keys.npy does not read counts as of an unknown store (every row is then kept)."""
    keys: set[bytes] = set()
    rows = meta.get("rows") if (path / "keys.npy").is_file() else None
    if rows is not None:
        try:
            keys = set(np.load(path / "keys.npy").tolist())
        except (*UNREADABLE_CHUNK, TypeError):   # TypeError: an array of unhashable objects
            rows = None
    rows = rows if isinstance(rows, str) or rows is None else None
    count = meta.get("count", 0)
    return Entry(path, _size(path), count if isinstance(count, int) else 0, _locked(path / "meta.json"), rows, keys)


def _is_build(path: Path) -> bool:
    """Whether ``path`` is a build folder the cache made: its name pattern and its owner.json (a real folder)."""
    return (BUILD_NAME.fullmatch(path.name) is not None and not path.is_symlink() and path.is_dir()
            and os.path.lexists(path / OWNER))


def _build(path: Path, grace_hours: float) -> Build:
    """A build folder, and whether it is in use (module docstring)."""
    damaged = [f"{p.relative_to(path)}: a broken symbolic link" for p in _files(path)
               if p.is_symlink() and not p.exists()]
    age = time.time() - max([path.lstat().st_mtime, *(_mtime(p) for p in path.iterdir())])
    try:
        owner = json.loads((path / OWNER).read_text())
        owner = owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        owner = {}
    if not owner or not isinstance(owner.get("rows", ""), str):
        damaged.append(f"{OWNER}: not the cache's owner record (unreadable, or not a JSON object of its fields)")
        owner = {k: v for k, v in owner.items() if k != "rows"}   # a store it cannot name: see survey()
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        alive = _alive(pid)
        why = f"process {pid} of this machine {'is running' if alive else 'has ended'}"
        return Build(path, _size(path), age, owner, alive, why, damaged)
    young = age < grace_hours * 3600
    whose = f"process {pid} of {host}" if host else "no recorded process"
    return Build(path, _size(path), age, owner, young,
                 f"{whose}, last written {age / 3600:.1f} h ago ({'within' if young else 'beyond'} the "
                 f"{grace_hours:g} h grace)", damaged)


def _mtime(path: Path) -> float:
    """The modification time of ``path`` itself (a link's own, even a broken one's)."""
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _files(folder: Path) -> list[Path]:
    """Every entry under ``folder`` that is not a folder (links not followed)."""
    return [Path(d) / f for d, dirs, files in os.walk(folder) for f in files + [x for x in dirs
                                                                                  if os.path.islink(Path(d) / x)]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # OverflowError: no process has such a number
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
    """The row keys of a chunk; a file that is not a whole chunk (all four arrays) raises one of UNREADABLE_CHUNK."""
    with np.load(chunk) as z:
        missing = {"keys", "templates", "norms", "resized"} - set(z.files)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        return z["keys"].tolist()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (links neither followed nor counted)."""
    if path.is_symlink():
        return 0
    return _file_size(path) if path.is_file() else sum(_file_size(p) for p in _files(path) if not p.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
