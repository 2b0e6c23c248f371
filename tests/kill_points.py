"""Deterministic kill points for the tests that kill a real process (no sleeps, no races).

Imported in a child process (as a plug-in: ``--set plugins=['.../tests/kill_points.py']``, or by a test's script),
it makes that process end itself with SIGKILL -- no clean-up, as a power cut or the OOM killer would -- the n-th
time it reaches the point that the environment variable KILL_POINT names:

    KILL_POINT=<event>:<name>:<n>

    replace    before os.replace / os.rename moves a file onto a path whose file name contains <name>
               (an atomic write whose temporary file is complete but not yet in place)
    replaced   just after such a rename
    load       before torch.load reads a file whose name contains <name>
    step       after a step of the first optimizer that steps (torch's global step hook; one count per training
               step when a second optimizer, e.g. a header's, steps with it; <name> is ignored)

With KILL_POINT_CHILDREN=<file> set too, the process first writes the ids of its live child processes there, one
a line, so that a test can check what becomes of them (they are no longer its children once it is gone).

Counting is per process and in program order, so the same command dies at the same place on every machine
whatever its speed. Without KILL_POINT the module does nothing; importing it twice installs nothing twice.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ENV = "KILL_POINT"
CHILDREN_ENV = "KILL_POINT_CHILDREN"
EVENTS = ("replace", "replaced", "load", "step")


def point(event: str, name: str = "", n: int = 1) -> str:
    """The KILL_POINT value for the n-th ``event`` on a file whose name contains ``name``."""
    assert event in EVENTS and n >= 1
    return f"{event}:{name}:{n}"


def children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, from /proc (Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # ended while we looked
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _die() -> None:
    note = os.environ.get(CHILDREN_ENV)
    if note:
        Path(note).write_text("".join(f"{c}\n" for c in children(os.getpid())))
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(target: str) -> Callable[[Any], None]:
    """A function that kills this process on its n-th call whose path argument's file name contains the name."""
    _, name, n = target.split(":")
    seen = [0]

    def reached(path: Any) -> None:
        if name in Path(os.fsdecode(path)).name:
            seen[0] += 1
            if seen[0] == int(n):
                _die()
    return reached


def _install(target: str) -> None:
    event = target.split(":")[0]
    if event not in EVENTS:
        raise ValueError(f"{ENV}={target!r}: the event must be one of {EVENTS}")
    reached = _counter(target) if event != "step" else None
    if event in ("replace", "replaced"):
        for fname in ("replace", "rename"):
            plain = getattr(os, fname)

            def moved(src, dst, *args, _plain=plain, **kwargs):
                if event == "replace":
                    reached(dst)
                out = _plain(src, dst, *args, **kwargs)
                if event == "replaced":
                    reached(dst)
                return out
            setattr(os, fname, moved)
    elif event == "load":
        plain_load = torch.load

        def load(f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                reached(f)
            return plain_load(f, *args, **kwargs)
        torch.load = load
    else:
        first: list[object] = []
        steps = [0, int(target.split(":")[2])]

        def stepped(optimizer, args, kwargs) -> None:
            first[:] = first or [optimizer]
            if optimizer is first[0]:
                steps[0] += 1
                if steps[0] == steps[1]:
                    _die()
        register_optimizer_step_post_hook(stepped)


if os.environ.get(ENV) and not getattr(os, "_kill_point_installed", False):
    os._kill_point_installed = True   # a second import (a plug-in is imported once per config load) adds nothing
    _install(os.environ[ENV])
