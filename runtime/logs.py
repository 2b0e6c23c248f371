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


@contextlib.contextmanager
def log_to(log_file: Path, name: str = ROOT) -> Iterator[logging.Logger]:
    """Send every library logger to stderr and to ``log_file`` (appended) while in the block; yields ``name``'s
    logger (a child of the root, or the root itself)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.FileHandler(log_file), logging.StreamHandler(sys.stderr)]
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
