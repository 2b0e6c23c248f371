"""Console + file logging for the duration of one command (handlers removed afterwards: no global state left)."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

LIBRARY_LOGGERS = ("utils", "backbones")  # cache hits, extraction, backbone variants


@contextlib.contextmanager
def log_to(log_file: Path, name: str) -> Iterator[logging.Logger]:
    """Send logger ``name`` and the library loggers to stderr and to ``log_file`` (appended) while in the block."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.FileHandler(log_file), logging.StreamHandler(sys.stderr)]
    loggers = [logging.getLogger(n) for n in (name, *LIBRARY_LOGGERS)]
    for h in handlers:
        h.setFormatter(fmt)
        for lg in loggers:
            lg.addHandler(h)
            lg.setLevel(logging.INFO)
    try:
        yield loggers[0]
    finally:
        for h in handlers:
            for lg in loggers:
                lg.removeHandler(h)
            h.close()
