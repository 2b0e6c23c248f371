"""The one exception type the command-line tools turn into a clear message instead of a traceback, and the
translation of a full disk into one."""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

# no space left, a file over the size limit (ulimit -f, or the file system's), a disk quota exceeded
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class UserError(Exception):
    """Bad input or settings: the message names the file, folder or option and says how to fix it."""


def run_cli(body) -> int:
    """Run a command's body; a UserError becomes one 'error: ...' paragraph on stderr and exit status 2."""
    import sys
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def disk_full_error(folder: str | os.PathLike, what: str, exc: OSError) -> UserError:
    """The error of a full disk (or a file-size limit) met while writing under ``folder`` (``what``: the option or
    role of the folder, e.g. "cache_dir")."""
    return UserError(f"cannot write to '{folder}' ({what}): the disk is full or a file-size limit was reached "
                     f"({exc.strerror or exc}). Everything completed before was kept and no partial file was left. "
                     f"Free space there (or raise the limit, ulimit -f) or choose a folder on another disk for "
                     f"{what}, then run again.")


@contextlib.contextmanager
def full_disk_named(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a full disk met in the block into a UserError naming ``folder``; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(folder, what, exc) from None
        raise


MAX_LISTED = 20   # problems listed one by one in an error message; the rest are counted


def listing(items: list[str], limit: int = MAX_LISTED) -> str:
    """``items`` joined for an error message: the first ``limit`` of them, then how many more there are."""
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more
