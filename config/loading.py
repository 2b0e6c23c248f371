"""Load the typed configuration: defaults from config/config.py, another module, ``--set`` overrides; types and
value ranges checked, plug-in modules imported, the backbone path derived."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import math
import sys
import types
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin, get_type_hints

from config.config import Config
from runtime.errors import UserError

__all__ = ["Config", "load_config", "config_from_dict", "check_choice", "OVERRIDE_HELP", "RANGES"]

OVERRIDE_HELP = ("--config PATH loads another module of the same form as config/config.py (options it leaves out keep "
                 "their defaults); --set KEY=VALUE [KEY=VALUE ...] overrides single options, values read as Python "
                 "literals when they parse (5, 0.01, True, ['lfw','agedb_30']) and as text otherwise; a list option "
                 "also takes comma-separated names (val_targets=lfw,agedb_30).")

_TYPES = get_type_hints(Config)
_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
             for f in dataclasses.fields(Config)}
# options of the authors' config that have no effect (accepted from their config files, then dropped)
_AUTHORS_ONLY = {"warmup_epoch"}

# (lowest, lowest allowed?, highest or None): every number's allowed range
RANGES: dict[str, tuple[float, bool, float | None]] = {
    "embedding_size": (1, True, None), "n_hidden": (1, True, None), "s": (0, False, None), "m": (0, True, None),
    "sigma": (0, True, None), "alpha": (0, True, None), "beta": (0, True, None), "lr": (0, False, None),
    "headid_lr": (0, False, None), "batch_size": (1, True, None), "num_epoch": (1, True, None),
    "global_step": (0, True, None), "grad_clip": (0, False, None), "seed": (0, True, None),
    "checkpoint_every": (1, True, None), "log_every": (1, True, None), "eval_step": (0, True, None),
    "gender_folds": (2, True, None), "extract_batch_size": (1, True, None), "num_workers": (-1, True, None),
    "bootstrap": (0, True, None), "n_jobs": (-1, True, None),
    "ive_dims_per_round": (1, True, None), "ive_rounds": (1, True, None), "ive_estimators": (1, True, None),
    "pe_miu_block_size": (1, True, None), "inlp_iterations": (1, True, None), "adversarial_weight": (0, True, None),
    "adversarial_hidden": (1, True, None),
}
_CHOICES = {"cache_dtype": ("float32", "float16"), "amp": ("none", "bf16", "fp16")}


def _exec_module(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist (option --config). Pass the path of a Python module "
                        f"written like config/config.py.")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(path)))}", path)
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


def _check(key: str, value: Any, source: str) -> Any:
    if key not in _TYPES:
        close = difflib.get_close_matches(key, list(_TYPES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown config option '{key}' (from {source}).{hint} The options are listed in "
                        f"config/config.py.")
    tp = _TYPES[key]
    if not _conforms(value, tp):
        raise UserError(f"config option '{key}' (from {source}) must be {_type_name(tp)}, got {value!r} "
                        f"({type(value).__name__}). Example: --set {key}={_example(tp)}")
    return value


def _check_range(key: str, value: float) -> None:
    low, inclusive, high = RANGES[key]
    bad = not math.isfinite(value) or value < low or (value == low and not inclusive) or \
        (high is not None and value > high)
    if bad:
        allowed = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise UserError(f"config option '{key}' is {value!r}; it must be {allowed}. Set it with --set {key}=VALUE "
                        f"or in config/config.py.")


def check_choice(key: str, value: str, allowed: Iterable[str]) -> None:
    """A name option (network, method, loss, attackers, ...) must be one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"config option '{key}' is {value!r}; choose one of {', '.join(allowed)}.{hint} (A plug-in "
                        f"registers more names: --set plugins=\"['my_module']\".)")


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read VALUE as a Python literal when it parses, else as text."""
    if "=" not in item:
        raise UserError(f"--set expects KEY=VALUE, got '{item}'. Example: --set alpha=10 val_targets=\"['lfw']\"")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if key in _TYPES and not _conforms(value, _TYPES[key]):
        if _conforms(raw, _TYPES[key]):
            value = raw  # e.g. data=2024 for a text option
        elif get_origin(_TYPES[key]) is list and isinstance(value, str) and value.strip():
            value = [v.strip() for v in value.split(",") if v.strip()]  # e.g. attackers=LogReg,SVM,RBF,MLP
    return key, value


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
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except UserError:
            raise
        except Exception as exc:  # the user's own module: say which one failed and how
            raise UserError(f"plug-in '{item}' (config option plugins) failed to import: {type(exc).__name__}: "
                            f"{exc}. Give an importable module name or the path of a .py file.") from None


def config_from_dict(values: dict[str, Any], source: str) -> Config:
    """A Config from option values (every key and type checked); options left out keep their defaults."""
    checked = {k: _check(k, v, source) for k, v in values.items()}
    cfg = Config(**{**_DEFAULTS, **checked})
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the module at ``path``, then ``--set`` overrides; checked, plug-ins imported, paths derived."""
    values: dict[str, Any] = {}
    if path is not None:
        for key, value in _module_values(_exec_module(Path(path))).items():
            if key in _AUTHORS_ONLY:
                continue
            values[key] = _check(key, value, f"config file '{path}'")
    for item in overrides:
        key, value = parse_override(item)
        values[key] = _check(key, value, f"--set {item}")
    cfg = Config(**{**_DEFAULTS, **values})
    _validate(cfg)
    import_plugins(cfg.plugins)
    if cfg.output_ori is None:
        cfg.output_ori = str(Path(cfg.checkpoint_root) / cfg.pretrained / "reference" / "backbone.pth")
    elif Path(cfg.output_ori).is_dir():  # the authors' config names the folder that holds backbone.pth
        cfg.output_ori = str(Path(cfg.output_ori) / "backbone.pth")
    return cfg


def _validate(cfg: Config) -> None:
    """Every number within its range and every fixed choice known (names of registries: privacy.runs)."""
    for key in RANGES:
        _check_range(key, getattr(cfg, key))
    for key, allowed in _CHOICES.items():
        check_choice(key, getattr(cfg, key), allowed)
    if cfg.n_jobs == 0:
        raise UserError("config option 'n_jobs' is 0; it must be >= 1, or -1 for all cores.")
    if not cfg.attackers:
        raise UserError("config option 'attackers' is empty; name at least one, e.g. \"['LogReg','SVM','RBF']\".")
