"""joblib process pools whose workers end with the process that started them.

joblib's loky workers outlive a parent killed with SIGKILL (they wait for work until their idle timeout, minutes,
holding their memory). Every pool of this project is made here: each worker watches its parent's pid from a daemon
thread and exits as soon as the parent is gone (it is then re-parented, so ``os.getppid()`` changes). Portable
(Linux, macOS), and unlike PR_SET_PDEATHSIG not tied to the thread that happened to spawn the worker.
"""
from __future__ import annotations

import os
import threading
import time

from joblib import Parallel, parallel_config

POLL_SECONDS = 0.5


def _watch_parent(parent: int) -> None:
    """Worker initializer: end this worker when process ``parent`` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parallel(n_jobs: int, **kwargs) -> Parallel:
    """``joblib.Parallel(n_jobs, **kwargs)`` on the loky backend, its workers watching this process. The
    initializer's arguments are the same on every call, so joblib keeps reusing one pool of workers."""
    with parallel_config(backend="loky", initializer=_watch_parent, initargs=(os.getpid(),)):
        return Parallel(n_jobs=n_jobs, **kwargs)
