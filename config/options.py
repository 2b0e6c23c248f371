"""Options that carry their own metadata: a default, the allowed values, a one-line doc and whether the option only
changes how a run executes (devices, workers, logging) rather than what it computes.

The core options are the fields of ``config.config.Config``. A component with settings of its own (a privacy
method, an attacker, a backbone, a header) declares them in its own file as a small dataclass built with
``option(...)`` and registers it under the component's name; ``--set NAME.FIELD=VALUE`` then reaches it, the loader
validates it like a core option, ``run.json`` records it, and every settings hash and the report derive from the
same metadata (``settings``, ``settings_hash``).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from utils.errors import UserError

__all__ = ["Option", "option", "option_spec", "register_options", "OPTION_GROUPS", "check_option_value",
           "group_field_types", "settings", "settings_hash", "active_groups", "recorded", "flat"]


@dataclass(frozen=True)
class Option:
    """What an option allows and means (kept in the dataclass field's metadata)."""
    doc: str
    ge: float | None = None          # lowest allowed value, included
    gt: float | None = None          # lowest allowed value, excluded
    le: float | None = None          # highest allowed value, included
    choices: tuple[str, ...] | None = None
    runtime: bool = False            # True: changes how a run executes, never its results
    unique: bool = False             # a list option whose items must all differ (e.g. the sets of test_targets)

    def allowed(self) -> str:
        """The allowed values in words, for error messages and the documentation."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        parts = [f">= {_number(self.ge)}" if self.ge is not None else "",
                 f"> {_number(self.gt)}" if self.gt is not None else "",
                 f"<= {_number(self.le)}" if self.le is not None else ""]
        return " and ".join(p for p in parts if p) or "any value of its type"


def _number(x: float) -> str:
    """A bound as written: whole numbers in full (4294967295, not 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def option(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           choices: Iterable[str] | None = None, runtime: bool = False, unique: bool = False) -> Any:
    """A dataclass field with its default and its metadata (lists are copied per instance)."""
    meta = {"option": Option(doc, ge, gt, le, tuple(choices) if choices is not None else None, runtime, unique)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_spec(cls: type, name: str) -> Option:
    """The metadata of field ``name`` of an options dataclass (a field made without ``option`` allows anything)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("option") or Option(doc="")
    raise KeyError(name)


def check_option_value(qualified: str, value: Any, spec: Option) -> None:
    """A number within its range and a name among its choices, else a UserError naming the option and the range."""
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), spec.choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"config option '{qualified}' is {value!r}; choose one of {', '.join(spec.choices)}.{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bad = not math.isfinite(value) or (spec.ge is not None and value < spec.ge) or \
            (spec.gt is not None and value <= spec.gt) or (spec.le is not None and value > spec.le)
        if bad:
            raise UserError(f"config option '{qualified}' is {value!r}; it must be {spec.allowed()}. Set it with "
                            f"--set {qualified}=VALUE.")
    if spec.unique and isinstance(value, list):
        twice = sorted({str(v) for v in value if value.count(v) > 1})
        if twice:
            raise UserError(f"config option '{qualified}' names {', '.join(repr(v) for v in twice)} more than once "
                            f"({value!r}); list each only once.")


# component name -> its options dataclass (a method registers its own under its name)
OPTION_GROUPS: dict[str, type] = {}


def register_options(group: str, cls: type) -> type:
    """Make ``cls`` (a dataclass of ``option`` fields) the options of component ``group``: ``--set group.field=``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"the options of '{group}' must be a dataclass, got {cls!r}")
    if "." in group or not group:
        raise ValueError(f"option group name {group!r} must be a non-empty name without dots")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"option '{group}.{f.name}' needs a default (use option(default, doc, ...))")
    OPTION_GROUPS[group] = cls
    return cls


def group_field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of an options dataclass."""
    return typing.get_type_hints(cls)


def active_groups(cfg: Any) -> list[str]:
    """The option groups whose component the configuration selects (its method, backbone, header, attackers)."""
    chosen = {cfg.method, cfg.network, cfg.loss, *cfg.attackers}
    return [g for g in sorted(OPTION_GROUPS) if g in chosen]


def recorded(cfg: Any) -> dict[str, Any]:
    """Every option of a run as it is recorded (run.json): the core ones, and under ``groups`` the options of the
    selected components, defaults included."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "groups"}
    out["groups"] = {g: dataclasses.asdict(cfg.group(g)) for g in active_groups(cfg)}
    return out


def flat(cfg: Any) -> dict[str, Any]:
    """``recorded`` with the component options as ``group.field`` columns (the config.csv record)."""
    out = recorded(cfg)
    groups = out.pop("groups")
    return {**out, **{f"{g}.{k}": v for g, values in groups.items() for k, v in values.items()}}


def settings(cfg: Any) -> dict[str, Any]:
    """Every option that can change what a run computes: the core ones, and the options of the selected components
    under ``group.field`` names. Runtime-only options (devices, workers, logging, ...) are left out."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if "option" in f.metadata and not f.metadata["option"].runtime}
    for group in active_groups(cfg):
        values = cfg.group(group)
        for f in dataclasses.fields(values):
            if not option_spec(type(values), f.name).runtime:
                out[f"{group}.{f.name}"] = getattr(values, f.name)
    return out


def settings_hash(cfg: Any, length: int = 12) -> str:
    """A short, stable hash of ``settings(cfg)``: equal for runs that compute the same thing."""
    text = json.dumps(settings(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
