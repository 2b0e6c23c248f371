"""Load config/config.py (or another module of the same form) and apply ``--set KEY=VALUE`` overrides."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import types
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin, get_type_hints

from utils.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.py"
OVERRIDE_HELP = ("--config PATH loads another module of the same form as config/config.py (options it leaves out keep "
                 "their defaults); --set KEY=VALUE [KEY=VALUE ...] overrides single options, values read as Python "
                 "literals when they parse (5, 0.01, True, ['lfw','agedb_30']) and as text otherwise.")


class Config(types.SimpleNamespace):
    """The resolved options of one run; attribute access like the authors' EasyDict."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @property
    def run_name(self) -> str:
        return f"{self.alpha}L1_{self.beta}L2"


def _exec_module(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist (option --config). Pass the path of a Python module "
                        f"written like config/config.py.")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's own module: report where it broke
        raise UserError(f"config file '{path}' failed to run: {type(exc).__name__}: {exc}. Fix that line.") from None
    return module


def _module_values(module: types.ModuleType) -> dict[str, Any]:
    """Option values of a config module: plain module-level names, or the items of an authors'-style ``config``."""
    names = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and not inspect.ismodule(v) and not callable(v)
             and not (get_origin(v) is not None or type(v).__module__ == "typing")}
    if "config" in names and isinstance(names["config"], dict):
        return dict(names["config"])
    return names


def _conforms(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is list or origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(key: str, value: Any, types_: dict[str, Any], source: str) -> Any:
    if key not in types_:
        close = difflib.get_close_matches(key, list(types_), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown config option '{key}' (from {source}).{hint} The options are listed in "
                        f"config/config.py.")
    tp = types_[key]
    if not _conforms(value, tp):
        raise UserError(f"config option '{key}' (from {source}) must be {_type_name(tp)}, got {value!r} "
                        f"({type(value).__name__}). Example: --set {key}={_example(tp)}")
    return value


def _example(tp: Any) -> str:
    return {int: "5", float: "0.01", bool: "True", str: "text", list: "\"['lfw','agedb_30']\""}.get(tp, "None")


def parse_override(item: str, types_: dict[str, Any]) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read VALUE as a Python literal when it parses, else as text."""
    if "=" not in item:
        raise UserError(f"--set expects KEY=VALUE, got '{item}'. Example: --set alpha=10 val_targets=\"['lfw']\"")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if key in types_ and not _conforms(value, types_[key]) and _conforms(raw, types_[key]):
        value = raw  # e.g. data=2024 for a text option
    return key, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults from config/config.py, then the module at ``path``, then ``--set`` overrides, then derived paths."""
    default_module = _exec_module(DEFAULT_CONFIG)
    types_ = get_type_hints(default_module)
    values = {k: v for k, v in _module_values(default_module).items() if k in types_}
    if path is not None:
        for key, value in _module_values(_exec_module(Path(path))).items():
            values[key] = _check(key, value, types_, f"config file '{path}'")
    for item in overrides:
        key, value = parse_override(item, types_)
        values[key] = _check(key, value, types_, f"--set {item}")
    cfg = Config(**values)
    return resolve_derived(cfg)


def resolve_derived(cfg: Config) -> Config:
    """Fill the derived paths (output, log_output, output_ori) that were left at None, and check a few values."""
    sub = Path(cfg.pretrained) / cfg.experiment / cfg.data / cfg.run_name
    if cfg.output is None:
        cfg.output = str(Path(cfg.checkpoint_root) / sub)
    if cfg.log_output is None:
        cfg.log_output = str(Path(cfg.log_dir) / sub)
    if cfg.output_ori is None:
        cfg.output_ori = str(Path(cfg.checkpoint_root) / cfg.pretrained / "reference" / "backbone.pth")
    elif Path(cfg.output_ori).is_dir():  # the authors' config names the folder that holds backbone.pth
        cfg.output_ori = str(Path(cfg.output_ori) / "backbone.pth")
    choices = {"loss": ("ArcFace", "CosFace", "ElasticArcFace", "ElasticCosFace", "ElasticFace-Arc", "ElasticFace-Cos"),
               "cache_dtype": ("float32", "float16"), "amp": ("none", "bf16", "fp16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"config option '{key}' is {getattr(cfg, key)!r}; choose one of {', '.join(allowed)}.")
    for key in ("batch_size", "num_epoch", "checkpoint_every", "log_every", "extract_batch_size", "gender_folds"):
        if getattr(cfg, key) < 1:
            raise UserError(f"config option '{key}' must be at least 1, got {getattr(cfg, key)}.")
    if cfg.num_workers < 0 or cfg.eval_step < 0:
        raise UserError("config options 'num_workers' and 'eval_step' must not be negative.")
    return cfg
