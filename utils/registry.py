"""One registry helper for every kind of named component (privacy methods, attackers, backbones, alignment
detectors, identity headers): a decorator that takes the name, the component's options dataclass and a help line;
``names()`` and ``get()`` with a "did you mean" error; the file each entry was registered from.

Duplicate names: the same definition registered again (the same class or function of the same file: a module
imported twice) replaces itself; a built-in name (registered by a module of this checkout) cannot be taken by any
other definition, which is refused naming both files; a plug-in (a file loaded through the ``plugins`` option, or
any file outside the checkout) that takes another plug-in's name wins, with a warning naming both files.

A registry is also a read-only-looking mapping name -> component (``name in METHODS``, ``METHODS[name]``,
``list(METHODS)``); item assignment goes through the same duplicate rule as the decorator.
"""
from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from utils.errors import UserError
from utils.logs import get_logger

__all__ = ["Registry", "Entry", "CHECKOUT"]

T = TypeVar("T")
log = get_logger(__name__)

CHECKOUT = Path(__file__).resolve().parent.parent   # the folder the suite runs from
PLUGIN_PREFIX = "_plugin_"   # module names of plug-in files loaded by path (config.loading.import_plugins)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: what it is, its options dataclass (or None), its help line and origin file."""
    name: str
    component: T
    options: type | None
    help: str
    origin: str

    @property
    def builtin(self) -> bool:
        """Registered by a module of this checkout (tests and plug-in files excepted)."""
        return _is_builtin(self.component, self.origin)


def _module_of(component: Any) -> Any:
    return sys.modules.get(getattr(component, "__module__", None) or "")


def origin_of(component: Any) -> str:
    """The file a component was defined in (its module's file; '<unknown>' for objects without one)."""
    module = _module_of(component)
    path = getattr(module, "__file__", None)
    if path is None:
        try:
            path = inspect.getfile(component)
        except TypeError:
            return "<unknown>"
    if not Path(path).is_file():   # code made at run time ('<string>', a function sent to a worker process)
        return str(path)
    return str(Path(path).resolve())


def _is_builtin(component: Any, origin: str) -> bool:
    module = _module_of(component)
    if module is not None and module.__name__.startswith(PLUGIN_PREFIX):
        return False
    path = Path(origin)
    return (path.is_absolute() and path.is_relative_to(CHECKOUT) and not path.is_relative_to(CHECKOUT / "tests")
            and path.is_file())


def _definition(component: Any, origin: str) -> tuple[str, str]:
    """What makes two registrations the same one: the module (or, without one, the file) and the class or function's
    qualified name (a module imported twice, or a function sent to a worker process and registered there again,
    defines new objects of the same names)."""
    module = getattr(component, "__module__", None) or origin
    return module, getattr(component, "__qualname__", None) or repr(component)


def _shown(origin: str, component: Any) -> str:
    """A definition in messages: its file (relative to the checkout where it lies inside it) and its name."""
    path = Path(origin)
    where = str(path.relative_to(CHECKOUT)) if path.is_relative_to(CHECKOUT) else origin
    return f"{where} ({getattr(component, '__qualname__', None) or type(component).__name__})"


class Registry(MutableMapping, Generic[T]):
    """The components of one kind, by name. ``kind`` names them in messages ("privacy method"); ``option`` is the
    config option or command-line flag that selects one ("method", "--detector"); ``on_options(name, cls)`` is
    called with a component's options dataclass when it has one (config.options.register_options)."""

    def __init__(self, kind: str, option: str | None = None,
                 on_options: Callable[[str, type], object] | None = None):
        self.kind, self.option, self.on_options = kind, option, on_options
        self._entries: dict[str, Entry[T]] = {}

    # ---- registering ------------------------------------------------------------------------------------------
    def register(self, name: str, options: type | None = None, help: str = "") -> Callable[[T], T]:
        """Decorator: make the decorated class or function the component ``name`` (``options``: its options
        dataclass, reached with ``--set NAME.OPTION=``; ``help``: one line for listings)."""
        def add(component: T) -> T:
            self.add(name, component, options, help)
            return component
        return add

    def add(self, name: str, component: T, options: type | None = None, help: str = "") -> None:
        """Register ``component`` as ``name`` (the decorator's work), applying the duplicate rule."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        origin = origin_of(component)
        old = self._entries.get(name)
        if old is not None and _definition(old.component, old.origin) != _definition(component, origin):
            before, after = _shown(old.origin, old.component), _shown(origin, component)
            if old.builtin:
                raise UserError(f"{self.kind} '{name}' is built in ({before}) and cannot be replaced by {after}: a "
                                f"plug-in would silently change what '{name}' computes. Register the plug-in's "
                                f"{self.kind} under a name of its own.")
            log.warning("%s '%s' of %s is replaced by the one of %s (the plug-in loaded last wins); give one of them "
                        "another name to keep both.", self.kind, name, before, after)
        if options is not None and self.on_options is not None:
            self.on_options(name, options)
        self._entries[name] = Entry(name, component, options, help, origin)

    # ---- looking up -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._entries)

    def get(self, name: str, *default: Any) -> T:
        """The component ``name``, or a UserError listing the names and the closest one (with a ``default``, the
        mapping's get: the default for an unknown name)."""
        if default and name not in self._entries:
            return default[0]
        return self.entry(name).component

    def entry(self, name: str) -> Entry[T]:
        """Everything registered under ``name`` (component, options, help, origin), or the unknown-name error."""
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def unknown(self, name: object, extra: tuple[str, ...] = ()) -> UserError:
        """The error for a name that is not registered: the choices (and ``extra`` names the option also takes)
        and the closest one."""
        choices = [*self._entries, *extra]
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if self.option is None or self.option.startswith("-"):   # a command-line flag, or no option at all
            where = f" ({self.option})" if self.option else ""
            return UserError(f"unknown {self.kind} {name!r}{where}; choose one of {', '.join(choices)}.{hint}")
        return UserError(f"config option '{self.option}' is {name!r}; choose one of {', '.join(choices)}.{hint} (A "
                         f"plug-in registers more {self.kind}s: --set plugins=\"['my_module']\".)")

    def help(self, name: str) -> str:
        return self.entry(name).help

    def origin(self, name: str) -> str:
        return self.entry(name).origin

    def snapshot(self) -> dict[str, Entry[T]]:
        """Every entry as it is now, for ``restore`` (tests that register components of their own)."""
        return dict(self._entries)

    def restore(self, snapshot: dict[str, Entry[T]]) -> None:
        """The entries of an earlier ``snapshot``, and no others."""
        self._entries = dict(snapshot)

    # ---- the mapping view -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[name].component

    def __setitem__(self, name: str, component: T) -> None:
        old = self._entries.get(name)
        if old is not None and old.component is component:   # the same entry again: keep its options and help
            self.add(name, component, old.options, old.help)
        else:
            self.add(name, component)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
