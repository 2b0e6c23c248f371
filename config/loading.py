"""Load the typed configuration: defaults from config/config.py, another module, ``--set`` overrides; types and
value ranges checked, plug-in modules imported, the backbone path derived."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin, get_type_hints

from config.config import Config
from config.options import OPTION_GROUPS, check_option_value, group_field_types, option_spec
from utils.errors import UserError
from utils.logs import get_logger

__all__ = ["Config", "load_config", "config_from_dict", "OVERRIDE_HELP", "option_names",
           "known_option"]

OVERRIDE_HELP = ("--config PATH loads another module of the same form as config/config.py (options it leaves out keep "
                 "their defaults); --set KEY=VALUE [KEY=VALUE ...] overrides single options, values read as Python "
                 "literals when they parse (5, 0.01, True, ['lfw','agedb_30']) and as text otherwise; a list option "
                 "also takes comma-separated names (val_targets=lfw,agedb_30). A component's own options are reached "
                 "by its name: --set ive.rounds=20.")

_TYPES = {k: v for k, v in get_type_hints(Config).items() if k != "groups"}
_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
             for f in dataclasses.fields(Config) if f.name != "groups"}
# options of the authors' config that have no effect (accepted from their config files, then dropped)
_AUTHORS_ONLY = {"warmup_epoch"}
log = get_logger(__name__)


def _exec_module(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist (option --config). Pass the path of a Python module "
                        f"written like config/config.py.")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(path)))}", path)
    assert spec is not None and spec.loader is not None   # a .py file always has both
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's own module: report where it broke
        raise UserError(f"config file '{path}' failed to run: {type(exc).__name__}: {exc}. Fix that line.") from None
    finally:
        sys.modules.pop(spec.name, None)
    return module


def _module_values(module: types.ModuleType) -> dict[str, Any]:
    """Options set by a config module: an authors'-style ``config`` mapping, the fields of a ``Config`` dataclass
    (a copy of config/config.py), or plain module-level names."""
    names = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and not inspect.ismodule(v) and not callable(v)
             and not (get_origin(v) is not None or type(v).__module__ == "typing")}
    if "config" in names and isinstance(names["config"], dict):
        return dict(names["config"])
    cls = vars(module).get("Config")
    if inspect.isclass(cls) and dataclasses.is_dataclass(cls):
        return {k: v for k, v in dataclasses.asdict(cls()).items()}
    return names


def _conforms(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is list or origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if tp is dict or origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _example(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return _example(next(a for a in get_args(tp) if a is not type(None)))
    if get_origin(tp) is list:
        return "\"['lfw','agedb_30']\""
    if get_origin(tp) is dict or tp is dict:
        return "\"{'rank': 4}\""
    return {int: "5", float: "0.01", bool: "True", str: "text"}.get(tp, "None")


def option_names() -> list[str]:
    """Every option name --set accepts now: the core ones and ``group.field`` of each registered component."""
    return [*_TYPES, *(f"{g}.{f.name}" for g, cls in sorted(OPTION_GROUPS.items()) for f in dataclasses.fields(cls))]


def known_option(key: str) -> bool:
    """Whether ``key`` names an option now: a core one, a component's ``group.field``, or its deprecated flat name."""
    if key in _TYPES or key == "groups":
        return True
    try:
        _resolve_group_key(key, "", warn=False)
    except UserError:
        return False
    return True


def _unknown(key: str, source: str) -> UserError:
    close = difflib.get_close_matches(key, option_names(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config option '{key}' (from {source}).{hint} The core options are listed in "
                     f"config/config.py; a component's own options are NAME.OPTION (e.g. ive.rounds), declared in its "
                     f"file, and a plug-in's become known once it is listed in plugins.")


def _check_type(key: str, value: Any, tp: Any, source: str) -> Any:
    if not _conforms(value, tp):
        raise UserError(f"config option '{key}' (from {source}) must be {_type_name(tp)}, got {value!r} "
                        f"({type(value).__name__}). Example: --set {key}={_example(tp)}")
    return value


def _coerce(value: Any, raw: str | None, tp: Any) -> Any:
    """A --set value read as a literal, given the option's type: text where the type is text (data=2024), a list
    from comma-separated names (attackers=LogReg,SVM)."""
    if raw is None or _conforms(value, tp):
        return value
    if _conforms(raw, tp):
        return raw
    if get_origin(tp) is list and isinstance(value, str) and value.strip():
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def parse_override(item: str) -> tuple[str, Any, str]:
    """Split ``KEY=VALUE`` and read VALUE as a Python literal when it parses, else as text (the raw text too)."""
    if "=" not in item:
        raise UserError(f"--set expects KEY=VALUE, got '{item}'. Example: --set alpha=10 val_targets=\"['lfw']\"")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value, raw


def import_plugins(plugins: Iterable[str]) -> None:
    """Import each plug-in (a module name, or a path to a .py file) so that it registers its entries."""
    for item in plugins:
        try:
            if item.endswith(".py"):
                path = Path(item)
                if not path.is_file():
                    raise UserError(f"plug-in file '{path}' (config option plugins) does not exist.")
                name = f"_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None   # a .py file always has both
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:   # a plug-in that failed is not loaded: a later load runs it again
                    sys.modules.pop(name, None)
                    raise
            else:
                importlib.import_module(item)
        except UserError:
            raise
        except SystemExit as exc:  # a module that exits while imported would end the command silently
            raise UserError(f"plug-in '{item}' (config option plugins) called sys.exit({exc.code!r}) while being "
                            f"imported, so nothing it registers could be used. A plug-in should only define and "
                            f"register its entries; move the exit under `if __name__ == \"__main__\":`.") from None
        except Exception as exc:  # the user's own module: say which one failed and how
            raise UserError(f"plug-in '{item}' (config option plugins) failed to import: {type(exc).__name__}: "
                            f"{exc}. Give an importable module name or the path of a .py file.") from None


class _Values:
    """Option values in the order they were given, each with where it came from, before they are checked."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, str | None, str]] = []   # key, value, raw --set text, source

    def add(self, key: str, value: Any, source: str, raw: str | None = None) -> None:
        if key not in _AUTHORS_ONLY:
            self.items.append((key, value, raw, source))

    def add_mapping(self, values: dict[str, Any], source: str) -> None:
        """Options of a mapping; its ``groups`` entry ({"ive": {"rounds": 20}}, as run.json records it) holds
        component options."""
        for key, value in values.items():
            if key != "groups":
                self.add(key, value, source)
                continue
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise UserError(f"{source}: 'groups' must map each component's name to a mapping of its options, "
                                f"e.g. {{'ive': {{'rounds': 20}}}}; got {value!r}.")
            for group, fields in value.items():
                for name, v in fields.items():
                    self.add(f"{group}.{name}", v, source)

    def core(self) -> dict[str, Any]:
        out = {}
        for key, value, raw, source in self.items:
            if key in _TYPES:
                out[key] = _check_type(key, _coerce(value, raw, _TYPES[key]), _TYPES[key], source)
        return out

    def grouped(self) -> dict[str, dict[str, Any]]:
        """The component options given (``group.field``, or the deprecated flat ``group_field``), checked; call
        once the plug-ins that declare them are imported."""
        out: dict[str, dict[str, Any]] = {}
        for key, value, raw, source in self.items:
            if key in _TYPES:
                continue
            group, name = _resolve_group_key(key, source)
            tp = group_field_types(OPTION_GROUPS[group])[name]
            value = _check_type(f"{group}.{name}", _coerce(value, raw, tp), tp, source)
            check_option_value(f"{group}.{name}", value, option_spec(OPTION_GROUPS[group], name))
            out.setdefault(group, {})[name] = value
        return out


def _resolve_group_key(key: str, source: str, warn: bool = True) -> tuple[str, str]:
    """``ive.rounds`` -> (ive, rounds); the flat ``ive_rounds`` of earlier versions too, with a deprecation line."""
    if "." in key:
        group, name = key.split(".", 1)
        if group in OPTION_GROUPS and name in {f.name for f in dataclasses.fields(OPTION_GROUPS[group])}:
            return group, name
        raise _unknown(key, source)
    for group in sorted(OPTION_GROUPS, key=len, reverse=True):
        name = key[len(group) + 1:]
        if key.startswith(group + "_") and name in {f.name for f in dataclasses.fields(OPTION_GROUPS[group])}:
            if warn:
                log.warning("config option '%s' (from %s) is now '%s.%s'; the old name still works in this release and "
                            "will be removed in the next.", key, source, group, name)
            return group, name
    raise _unknown(key, source)


def _build(values: _Values, import_plugins_first: bool) -> Config:
    cfg = Config(**{**_DEFAULTS, **values.core()})
    _validate(cfg)
    if import_plugins_first:
        import_plugins(cfg.plugins)
    cfg.groups = {g: OPTION_GROUPS[g](**v) for g, v in values.grouped().items()}
    return cfg


def config_from_dict(values: dict[str, Any], source: str) -> Config:
    """A Config from option values (every key and type checked); options left out keep their defaults. A
    ``groups`` entry ({"ive": {"rounds": 20}}, as run.json records it) sets component options."""
    given = _Values()
    given.add_mapping(values, source)
    return _build(given, import_plugins_first=False)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                values: Iterable[tuple[dict[str, Any], str]] = ()) -> Config:
    """Defaults, then the module at ``path``, then ``values`` (option values as values, each mapping with where it
    comes from: a plan), then ``--set`` overrides; checked, plug-ins imported, paths derived."""
    given = _Values()
    if path is not None:
        given.add_mapping(_module_values(_exec_module(Path(path))), f"config file '{path}'")
    for mapping, source in values:
        given.add_mapping(mapping, source)
    for item in overrides:
        key, value, raw = parse_override(item)
        given.add(key, value, f"--set {item}", raw)
    cfg = _build(given, import_plugins_first=True)
    if cfg.output_ori is None:
        cfg.output_ori = str(Path(cfg.checkpoint_root) / cfg.pretrained / "reference" / "backbone.pth")
    elif Path(cfg.output_ori).is_dir():  # the authors' config names the folder that holds backbone.pth
        cfg.output_ori = str(Path(cfg.output_ori) / "backbone.pth")
    return cfg


def _validate(cfg: Config) -> None:
    """Every core option within its allowed values (its metadata; names of registries: privacy.runs)."""
    for f in dataclasses.fields(Config):
        if "option" in f.metadata:
            check_option_value(f.name, getattr(cfg, f.name), f.metadata["option"])
    if cfg.n_jobs == 0:
        raise UserError("config option 'n_jobs' is 0; it must be >= 1, or -1 for all cores.")
    if not cfg.attackers:
        raise UserError("config option 'attackers' is empty; name at least one, e.g. \"['LogReg','SVM','RBF']\".")
