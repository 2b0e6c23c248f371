"""Logging under one root: every library module logs to ``genderprivacy.<module>``, so one command's log file
receives all of it; handlers live only for the duration of one command (no global state left)."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

ROOT = "genderprivacy"


def get_logger(module: str) -> logging.Logger:
    """The logger of a library module (``__name__``), under the root that ``log_to`` records."""
    return logging.getLogger(f"{ROOT}.{module}")


class _LogFile(logging.FileHandler):
    """The command's log file. A write that fails (a full disk, a file-size limit) stops it, with one line on stderr
    naming the folder, instead of logging's traceback for every later record; the log goes on to stderr."""
    stopped = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.stopped:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self.stopped = True
        folder = Path(self.baseFilename).parent
        print(f"warning: cannot write the log file '{self.baseFilename}' any more ({exc.strerror or exc}): the "
              f"disk holding '{folder}' is full or a file-size limit was reached. The log goes on on stderr only; "
              f"free space in '{folder}' (log_dir) for the next runs.", file=sys.stderr)

    def close(self) -> None:
        if self.stopped and self.stream is not None:
            with contextlib.suppress(OSError):   # its unwritten rest: already reported (the file is closed anyway)
                self.stream.close()
            self.stream = None
        super().close()


@contextlib.contextmanager
def log_to(log_file: Path, name: str = ROOT) -> Iterator[logging.Logger]:
    """Send every library logger to stderr and to ``log_file`` (appended) while in the block; yields ``name``'s
    logger (a child of the root, or the root itself)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_LogFile(log_file), logging.StreamHandler(sys.stderr)]
    root = logging.getLogger(ROOT)
    level = root.level
    root.setLevel(logging.INFO)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    try:
        yield logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
