"""What a plan file may define, and the checks that turn a plan file's mistakes into one-paragraph errors naming the
plan and the name at fault (a plan is the user's own Python: its errors are theirs to fix, never a traceback).
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from utils.errors import UserError

__all__ = ["PLAN_NAMES", "RELEASED_NAMES", "check_names", "check_released_names", "call_plan", "check_spec",
           "plan_failure"]

SEE = "see plans/paper.py for a plan written out"
# the names the plan runner reads: name -> (accepted types, what it must be)
PLAN_NAMES: dict[str, tuple[tuple[type, ...], str]] = {
    "INCLUDE": ((str, Path, type(None)), "a plan name or the path of a plan file, e.g. INCLUDE = \"paper\""),
    "SET": ((Mapping,), "a dict of options applied to every experiment, e.g. SET = {\"num_epoch\": 50}"),
    "EXPERIMENTS": ((list, tuple), "a list of experiment dicts"),
    "GENERATED_ROOT": ((str, Path, type(None)), "the folder prepare() writes to"),
}
CALLABLES = {"experiments": "def experiments(plan) -> list[dict]", "prepare": "def prepare(plan) -> None"}
# the names `--released DIR` reads from the plan (pipeline/released.py), as plans/paper.py defines them
RELEASED_NAMES: dict[str, tuple[tuple[type, ...], str]] = {
    "BACKBONES": ((Mapping,), "backbone label -> its options (network, output_ori, ...)"),
    "TARGETS": ((Mapping,), "dataset name -> its evaluation set"),
    "ALL_TARGET": ((str,), "the evaluation set of the cross-dataset setting"),
    "EVAL_SETS": ((list, tuple), "the evaluation sets of the one-dataset setting"),
}


def plan_failure(path: Path, what: str, exc: BaseException) -> UserError:
    """The error for a plan file (or one of its functions) that raised or exited: where, and the line of the plan."""
    if isinstance(exc, SystemExit):
        return UserError(f"plan file '{path}': {what} called sys.exit({exc.code!r}); a plan only defines names (and "
                         f"the functions experiments(plan) and prepare(plan)). Remove the exit.")
    line = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == Path(path).resolve():
            line = f" at line {frame.lineno} ({(frame.line or '').strip()})"
            break
    return UserError(f"plan file '{path}': {what} failed{line}: {type(exc).__name__}: {exc}. Fix the plan; {SEE}.")


def call_plan(path: Path, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call one of the plan's own functions; whatever it raises (or an exit) becomes an error naming the plan."""
    try:
        return fn(*args)
    except UserError:
        raise
    except (Exception, SystemExit) as exc:
        raise plan_failure(path, what, exc) from None


def _check(path: Path, name: str, value: Any, kinds: tuple[type, ...], what: str) -> None:
    if not isinstance(value, kinds):
        raise UserError(f"plan file '{path}': {name} is {type(value).__name__} ({value!r:.80}); it must be {what}. "
                        f"{SEE[0].upper() + SEE[1:]}.")


def check_names(path: Path, values: Mapping[str, Any]) -> None:
    """The plan runner's names in one plan file (before inclusion), each of the right kind."""
    for name, (kinds, what) in PLAN_NAMES.items():
        if name in values:
            _check(path, name, values[name], kinds, what)
    for name, signature in CALLABLES.items():
        if name in values and not callable(values[name]):
            raise UserError(f"plan file '{path}': {name} is {type(values[name]).__name__}; it must be a function "
                            f"({signature}).")
    for key in values.get("SET", {}) or {}:
        if not isinstance(key, str):
            raise UserError(f"plan file '{path}': SET has the key {key!r}; its keys are option names (text).")


def check_released_names(path: Path, namespace: Any) -> None:
    """``--released DIR`` places the layers by the plan's backbones and datasets: the plan must define them."""
    for name, (kinds, what) in RELEASED_NAMES.items():
        if not hasattr(namespace, name):
            raise UserError(f"--released needs a plan that defines {', '.join(RELEASED_NAMES)} (as plans/paper.py "
                            f"does); plan file '{path}' has no {name} ({what}). Use `reproduce.py paper --released "
                            f"DIR`, or a plan that includes paper.")
        _check(path, name, getattr(namespace, name), kinds, what)


SPEC_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "options": ((Mapping,), "a dict of options, e.g. options={\"alpha\": 20}"),
    "backbone": ((str,), "a label (text)"),
    "setting": ((str,), "OneDataset, CrossDataset, Ablation or Released"),
    "trained_on": ((str,), "dataset names joined by '+'"),
    "held_out": ((str,), "a dataset name"),
    "method": ((str,), "a method name"),
    "label": ((str,), "text"),
    "released_setting": ((str,), "OneDataset or CrossDataset"),
    "released": ((list, tuple), "a list of layer files"),
}


def check_spec(spec: Mapping[str, Any], where: str) -> None:
    """One experiment dict's values, each of the right kind (the keys are checked by the plan loader)."""
    for key, (kinds, what) in SPEC_KINDS.items():
        if key in spec and not isinstance(spec[key], kinds):
            raise UserError(f"{where}: '{key}' is {type(spec[key]).__name__} ({spec[key]!r:.80}); it must be {what}.")
    for key in spec.get("options", {}) or {}:
        if not isinstance(key, str):
            raise UserError(f"{where}: options has the key {key!r}; its keys are option names (text).")
