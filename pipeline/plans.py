"""Plans: the paper's experiments written down as files (``plans/<name>.py``), loaded, expanded into configurations
and matched to earlier results by their settings.

A plan is a plain Python module. The names it may define (all optional but the experiments):

    INCLUDE = "paper"           # start from another plan: its names are the defaults of this one
    SET = {"num_epoch": 50}     # options applied to every experiment (merged over the included plan's SET)
    EXPERIMENTS = [ {...}, ...] # or: def experiments(plan) -> list[dict], reading the plan's other names
    def prepare(plan): ...      # makes inputs the plan generates itself (the synthetic world), idempotently
    GENERATED_ROOT = "work_dirs/synthetic"   # where prepare() writes (the dry run counts those inputs as made)

Each experiment is a dict: ``backbone`` (a label for the tables), ``setting`` (OneDataset, CrossDataset, Ablation,
Released), ``trained_on`` (dataset names joined by '+'), ``held_out`` (cross-dataset folds), ``method``, and
``options`` (config option values). Unless ``options`` names them, ``experiment`` is the setting, ``data`` the
training datasets and ``method`` the method. The options are applied in this order: ``CONFIG`` (a config module, as
--config takes, or a dict of option values; default config/config.py), the experiment's, the plan's ``SET``, then
the command line's ``--set`` (which thus reaches every experiment). A plan's option values reach the config as values
(a ``Path`` is a path, 5 is 5), never as text read back; a value of the wrong type is refused naming the option, the
plan and the experiment.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from backbones.spec import BackboneSpec
from config.config import Config
from config.loading import load_config
from privacy import get_method   # importing the registry declares the built-in methods' options (ive.rounds, ...)
from pipeline.plan_file import call_plan, check_names, check_released_names, check_spec, plan_failure
from utils.errors import UserError

from config.options import settings, settings_hash   # runtime-only options (device, workers, ...) left out
from eval.gender_folders import protocol_inputs

__all__ = ["PLANS_DIR", "Experiment", "Plan", "load_plan", "settings", "settings_hash", "digest", "training_key",
           "EVALUATION_ONLY", "SETTINGS"]

PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"
SETTINGS = ("OneDataset", "CrossDataset", "Ablation", "Released")
# options that change what the sweep measures but not the training: a new sweep, never a new training
EVALUATION_ONLY = {"test_targets", "attackers", "bootstrap", "gender_folds", "run_name", "output", "log_output",
                   "resume", "gender_protocol", "gender_folders"}
# options that only name folders: the same training, wherever its run folder lies (the ablation's default point is
# the one-dataset training, a run made by finetune.py is the plan's experiment of the same settings)
FOLDER_ONLY = {"experiment"}
_KEYS = {"backbone", "setting", "trained_on", "held_out", "method", "options", "released", "released_setting",
         "label"}


def digest(values: Any) -> str:
    """A short, stable hash of JSON-able values."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_key(cfg: Config) -> str:
    """What identifies a training: its settings without the evaluation-only ones (and never the runtime-only)."""
    return digest({k: v for k, v in settings(cfg).items() if k not in EVALUATION_ONLY | FOLDER_ONLY})


@dataclass
class Experiment:
    """One training (or, for released layers, none) and its sweep, with the labels the tables show."""
    backbone: str
    setting: str
    trained_on: str
    method: str
    cfg: Config
    held_out: str = ""
    label: str = ""                     # the method column of the tables (default: the method's description)
    released: tuple[Path, ...] = ()     # released layer files (setting Released): swept, never trained
    released_setting: str = ""          # the setting a released layer belongs to (OneDataset, CrossDataset)

    @property
    def key(self) -> str:
        """Matches an experiment to its earlier state, whatever folder or plan it ran from."""
        if self.released:
            return digest({"released": [_file_digest(p) for p in self.released],
                           "backbone": {k: settings(self.cfg).get(k) for k in ("network", "SE", "output_ori")}})
        return training_key(self.cfg)

    @property
    def sweep_key(self) -> str:
        return digest([self.key, {k: settings(self.cfg).get(k) for k in sorted(EVALUATION_ONLY | {"rec", "seed"})}])

    @property
    def name(self) -> str:
        held = f" held out {self.held_out}" if self.held_out else ""
        return f"{self.backbone} {self.setting} {self.trained_on}{held} {self.label or self.method}"

    @property
    def group(self) -> tuple:
        """Experiments of one group share their backbone and training data (their template cache entries)."""
        return (self.cfg.pretrained, str(BackboneSpec.from_config(self.cfg).weights), str(self.cfg.data_dir))

    @property
    def alpha_beta(self) -> tuple[float, float] | None:
        return (self.cfg.alpha, self.cfg.beta) if self.method == "angular" and not self.released else None


@dataclass
class Plan:
    """A loaded plan: its name, its namespace (after inclusion) and its experiments."""
    name: str
    path: Path
    namespace: types.SimpleNamespace
    experiments: list[Experiment] = field(default_factory=list)

    @property
    def generated_root(self) -> Path | None:
        root = getattr(self.namespace, "GENERATED_ROOT", None)
        return Path(root) if root else None

    def prepare(self) -> None:
        """Make the inputs the plan generates (idempotent); nothing for a plan of downloaded data."""
        fn = getattr(self.namespace, "prepare", None)
        if callable(fn):
            call_plan(self.path, "prepare(plan)", fn, self.namespace)


def plan_path(name: str | Path) -> Path:
    """A plan by name (plans/<name>.py) or by path."""
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"plan file '{path}' does not exist. Give a plan name ({', '.join(known_plans())}) or "
                            f"the path of a .py file written like those in plans/.")
        return path
    candidate = PLANS_DIR / f"{name}.py"
    if not candidate.is_file():
        raise UserError(f"no plan named '{name}': the plans are {', '.join(known_plans())} (files in {PLANS_DIR}), "
                        f"or give the path of your own plan file (.py).")
    return candidate


def known_plans() -> list[str]:
    return sorted(p.stem for p in PLANS_DIR.glob("*.py") if not p.name.startswith("_"))


def _execute(path: Path) -> dict[str, Any]:
    name = f"_plan_{path.stem}_{digest(str(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, "plan_path gives a .py file, which the source loader reads"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses and pickling look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except (Exception, SystemExit) as exc:   # the user's own plan: say where it broke
        raise plan_failure(path, "running the file", exc) from None
    finally:
        sys.modules.pop(name, None)
    return {k: v for k, v in vars(module).items() if not k.startswith("__")}


def load_namespace(name: str | Path, seen: tuple[Path, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The plan's names, over those of the plan it includes (SET merged option by option)."""
    path = plan_path(name).resolve()
    if path in seen:
        raise UserError(f"plan '{path}' includes itself (through {' -> '.join(str(p) for p in seen)}); remove the "
                        f"INCLUDE that closes the circle.")
    own = _execute(path)
    check_names(path, own)
    values: dict[str, Any] = {}
    if own.get("INCLUDE"):
        included = own["INCLUDE"]
        if isinstance(included, str) and not included.endswith(".py") and (path.parent / f"{included}.py").is_file():
            included = path.parent / f"{included}.py"   # a plan beside this one first, then plans/
        _, values = load_namespace(included, (*seen, path))
    merged_set = {**values.get("SET", {}), **own.get("SET", {})}
    values.update(own)
    values["SET"] = merged_set
    return path, values


def load_plan(name: str | Path, overrides: Iterable[str] = (), extra: dict[str, Any] | None = None,
              added: Callable[[types.SimpleNamespace], list[dict]] | None = None) -> Plan:
    """Load a plan, expand its experiments and resolve each one's configuration (every option checked). ``extra``
    replaces names of the plan (the command line's --released, --results, ...); ``added`` makes more experiments
    from the plan's names (the authors' released layers beside the plan's own rows)."""
    path, values = load_namespace(name)
    ns = types.SimpleNamespace(**{"released_dir": None, "mapping": None, "results": "work_dirs/results",
                                  "CONFIG": None, **values, **(extra or {})})
    plan = Plan(Path(name).stem, path, ns)
    items = getattr(ns, "experiments", None)
    if callable(items):
        items = call_plan(path, "experiments(plan)", items, ns)
        if not isinstance(items, (list, tuple)):
            raise UserError(f"plan file '{path}': experiments(plan) returned {type(items).__name__}; it must return "
                            f"a list of experiment dicts (see plans/paper.py).")
    elif items is None:
        items = getattr(ns, "EXPERIMENTS", None)
    if items is None:
        raise UserError(f"plan '{path}' defines neither EXPERIMENTS nor experiments(plan); see plans/paper.py.")
    items = list(items)
    if added is not None and not any("released" in spec for spec in items if isinstance(spec, dict)):
        check_released_names(path, ns)
        items += added(ns)
    overrides = list(overrides)
    common = (as_values(ns.SET, f"plan '{path}', SET"), f"plan '{path}', SET")
    for k, spec in enumerate(items):
        plan.experiments.append(_experiment(spec, ns.CONFIG, common, overrides, f"plan '{path}', experiment {k + 1}"))
    _refuse_repeated(path, plan.experiments)
    _unique_run_names(plan.experiments)
    return plan


def as_values(options: Any, where: str) -> dict[str, Any]:
    """Option values as the config takes them: a path (``Path``, any os.PathLike) as its text, in lists too; other
    values as they are (the config checks their types, naming the option and ``where``)."""
    if not isinstance(options, dict):
        raise UserError(f"{where}: the options are a {type(options).__name__}; give a dict of option names to values, "
                        f"e.g. {{'num_epoch': 50}}.")

    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return {str(k): plain(v) for k, v in options.items()}


def _experiment(spec: dict, config: str | Path | dict | None, common: tuple[dict, str], overrides: list[str],
                where: str) -> Experiment:
    if not isinstance(spec, dict):
        raise UserError(f"{where} is {type(spec).__name__}; each experiment is a dict (see plans/paper.py).")
    unknown = set(spec) - _KEYS
    if unknown:
        raise UserError(f"{where} has unknown key(s) {sorted(unknown)}; the keys are {sorted(_KEYS)}.")
    check_spec(spec, where)
    setting = spec.get("setting", "OneDataset")
    if setting not in SETTINGS:
        raise UserError(f"{where}: setting '{setting}' is not one of {', '.join(SETTINGS)}.")
    options = as_values(spec.get("options", {}), where)
    trained_on = str(spec.get("trained_on", options.get("data", "")))
    named = {"experiment": setting, "data": trained_on, "method": spec.get("method", "")}
    defaults = {k: str(v) for k, v in named.items() if k not in options and v}
    base = []
    if isinstance(config, dict):   # a configuration's values (tools/cross_dataset.py passes its --config, --set)
        base, config = [(config, f"{where} (the command's configuration)")], None
    cfg = load_config(config, overrides, [*base, (defaults, where), (options, where), common])
    return Experiment(backbone=str(spec.get("backbone", cfg.pretrained)), setting=setting, trained_on=trained_on,
                      method=cfg.method, cfg=cfg, held_out=str(spec.get("held_out", "")), label=spec.get("label", ""),
                      released=tuple(Path(p) for p in spec.get("released", ())),
                      released_setting=str(spec.get("released_setting", "")))


def _refuse_repeated(path: Path, experiments: list[Experiment]) -> None:
    """The same experiment twice in one plan (same settings, same place in the tables) would be listed twice: name
    both instead."""
    seen: dict[tuple, int] = {}
    for k, exp in enumerate(experiments, start=1):
        ident = (exp.sweep_key, exp.backbone, exp.setting, exp.trained_on, exp.held_out, exp.label or exp.method,
                 exp.released_setting)
        if ident in seen:
            raise UserError(f"plan '{path}' lists the same experiment twice (experiments {seen[ident]} and {k}: "
                            f"{exp.name}, same settings); remove one of them.")
        seen[ident] = k


def _unique_run_names(experiments: list[Experiment]) -> None:
    """Two trainings of a plan that would share a run folder (same method name, other settings, e.g. seeds) each get
    their own name, so that no two experiments race for the same folder."""
    folders: dict[tuple, list[Experiment]] = {}
    for exp in experiments:
        if exp.released:
            continue
        cfg = exp.cfg
        run = cfg.run_name or get_method(cfg.method)(cfg).run_name()
        folders.setdefault((cfg.checkpoint_root, cfg.pretrained, cfg.experiment, cfg.data, run), []).append(exp)
    for (*_, run), exps in folders.items():
        if len({e.key for e in exps}) > 1:
            for e in exps:
                e.cfg = dataclasses.replace(e.cfg, run_name=f"{run}_{e.key[:6]}")


def safe_name(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def bin_path(cfg: Config, target: str) -> Path:
    return Path(cfg.rec) / f"{target}.bin"


def inputs(exp: Experiment) -> list[tuple[str, Path, str]]:
    """(what, expected path, README section) of every input an experiment needs."""
    cfg = exp.cfg
    weights = BackboneSpec.from_config(cfg).weights   # output_ori, or the model file of network=onnx
    out = [("backbone weights", weights, "Running on real data / 1. Pretrained backbones")]
    if exp.released:
        out += [("released layer", p, "Reproducing the paper (released layers)") for p in exp.released]
    else:
        dirs = cfg.data_dir if isinstance(cfg.data_dir, list) else [cfg.data_dir]
        out += [("training data", Path(d), "Running on real data / Preparing the datasets") for d in dirs]
    out += [("evaluation .bin", bin_path(cfg, t), "Running on real data / 2. Evaluation files")
            for t in cfg.test_targets]
    return out + protocol_inputs(cfg)   # gender_protocol=folders: each target's gender-test folder


def _file_digest(path: Path) -> str:
    """Content hash of a (small) released layer file; its path when it cannot be read (reported elsewhere)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return str(path)

