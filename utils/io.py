"""Atomic file writes, safe checkpoint loading, pre-flight checks on output folders, and free `_2` names."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from utils.errors import UserError, full_disk_named

_UMASK = os.umask(0)
os.umask(_UMASK)
_HASHES: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Content hash of a file, remembered per (path, size, mtime) within the process."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; results get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike, what: str = "checkpoint_root") -> None:
    """``torch.save`` through a temporary file and a rename. A full disk (or file-size limit) is a UserError naming
    the folder (``what``: its option) and leaves the previous file, if any, and no temporary one."""
    path = Path(path)
    with full_disk_named(path.parent, what), atomic_path(path) as tmp, open(tmp, "wb") as fh:
        out = _WriteErrors(fh)
        try:
            torch.save(obj, out)  # type: ignore[arg-type]  # write and flush are all torch.save uses
        except RuntimeError:
            # torch reports a failed write as "unexpected pos ..." and drops the cause; raise the cause itself
            if out.error is not None:
                raise out.error from None
            raise


class _WriteErrors:
    """A file object for torch.save that remembers the OSError of a failed write."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def safe_torch_load(path: str | os.PathLike, what: str) -> Any:
    """Load a checkpoint with ``weights_only=True``; turn every failure into a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: '{path}' does not exist. Check the path (or the config option that "
                        f"points to it) and download or copy the file there.")
    if path.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty (0 bytes): the download or copy was interrupted. "
                        f"Fetch the file again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{what} '{path}' is not a plain state dict: it asks to run or build Python objects that a safe load "
            f"refuses ({str(exc).splitlines()[0][:200]}). If it holds a whole pickled model from a source you "
            f"trust, re-save it with torch.save(model.state_dict(), path) and use that file.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{what} '{path}' could not be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                        f"The file is truncated or not a PyTorch checkpoint: download or copy it again.") from None


def extract_state_dict(obj: Any, path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Return the tensor mapping held by a loaded checkpoint: the checkpoint itself, or the one under the container
    keys people save with (``state_dict``, ``net_state_dict``, ``model_state_dict``, ``model``, ``backbone``, ``net``,
    nested up to three deep; the key used is logged), with DataParallel's ``module.`` prefixes removed. Anything
    else is refused with its top-level keys and their types listed."""
    from utils.logs import get_logger   # same rank; imported here to keep this module's imports minimal

    containers = ("state_dict", "net_state_dict", "model_state_dict", "model", "backbone", "net")

    def tensors(o: Any) -> bool:
        return isinstance(o, Mapping) and bool(o) and all(isinstance(v, torch.Tensor) for v in o.values())

    def describe(o: Any) -> str:
        if tensors(o):
            return f"{len(o)} tensors"
        if isinstance(o, Mapping):
            return f"dict of {len(o)}"
        if isinstance(o, (list, tuple)):
            return f"{type(o).__name__} of {len(o)}"
        return f"{type(o).__name__}" + (f" {tuple(o.shape)}" if isinstance(o, torch.Tensor) else "")

    found, keys = obj, list[str]()
    while not tensors(found) and isinstance(found, Mapping) and len(keys) < 3:
        key = next((k for k in containers if k in found and isinstance(found[k], Mapping)), None)
        if key is None:
            break
        found = found[key]
        keys.append(key)
    if not tensors(found):
        if isinstance(obj, Mapping) and obj:
            items = list(obj.items())
            listed = ", ".join(f"'{k}' ({describe(v)})" for k, v in items[:12])
            more = f" and {len(items) - 12} more" if len(items) > 12 else ""
            held = f"a dict whose top-level keys are {listed}{more}"
        else:
            held = "an empty dict" if isinstance(obj, Mapping) else describe(obj)
        raise UserError(f"{what} '{path}' does not hold a state dict (a mapping of names to tensors), nor one under "
                        f"the keys {', '.join(containers)}, but {held}. Save the weights with "
                        f"torch.save(model.state_dict(), path), or re-save the entry that holds them.")
    if keys:
        get_logger("utils.io").info("%s '%s': weights read from the checkpoint's entry %s", what, path,
                                      "".join(f"['{k}']" for k in keys))
    state = dict(found)
    while state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """Fail before any compute when ``folder`` cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to '{folder}' ({option}): {exc.strerror or exc}. Choose a folder you can "
                        f"write to, or fix its permissions, before starting.") from None


def in_use(path: str | os.PathLike, folder: bool = False) -> bool:
    """Whether ``path`` is taken: anything there (a dangling link too); for a ``folder``, an empty folder is free."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    if folder and path.is_dir() and not path.is_symlink():
        with os.scandir(path) as it:
            return next(it, None) is not None
    return True


def numbered(path: str | os.PathLike, k: int, folder: bool = False) -> Path:
    """``path`` for k = 1, else its k-th sibling name: ``name_k.ext`` for a file, ``name_k`` for a ``folder``
    (whose name may hold dots: run names such as ``lr0.1``)."""
    path = Path(path)
    if k == 1:
        return path
    return path.with_name(f"{path.name}_{k}" if folder or not path.suffix else f"{path.stem}_{k}{path.suffix}")


def first_free_number(paths: Sequence[str | os.PathLike], folder: bool = False) -> int:
    """The smallest k >= 1 for which ``numbered(p, k, folder)`` is free (not ``in_use``) for every path of
    ``paths``: the one rule by which results, runs and demos take ``_2``, ``_3``... names instead of replacing
    earlier ones (several paths: a run's checkpoint and log folders share their number)."""
    k = 1
    while any(in_use(numbered(p, k, folder), folder) for p in paths):
        k += 1
    return k


def free_path(path: str | os.PathLike, folder: bool = False) -> Path:
    """``path`` if it is free, else the first free ``_2``, ``_3``... sibling (an earlier result is never replaced)."""
    return numbered(path, first_free_number([path], folder), folder)


def check_creatable(path: str | os.PathLike, option: str) -> None:
    """Fail before any work when ``path`` cannot be created because one of its parents is a file, not a folder."""
    for parent in Path(path).parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UserError(f"{option} '{path}' cannot be created: '{parent}' is a file, not a folder. Choose a "
                                f"path under a folder.")
            return
