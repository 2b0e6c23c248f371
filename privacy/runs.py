"""Runs that describe themselves: the run folders of a training, the ``run.json`` written into them (the method and
the resolved configuration), and reading them back for the sweep and the report. Folder names stay the authors'
(``20L1_1L2``) but nothing parses them for settings."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from backbones import ARCHITECTURES
from config.config import Config
from eval.attackers import ALL, ATTACKERS
from losses import HEADERS
from privacy import METHODS, PrivacyMethod, get_method
from privacy.layer_training import RESUME_FILE, RESUME_KEYS
from config import options
from config.loading import config_from_dict, known_option
from utils.errors import UserError
from utils.io import atomic_write_text, first_free_number, numbered, safe_torch_load
from utils.logs import get_logger

__all__ = ["RUN_FILE", "RunFolders", "check_names", "choose_run_folders", "write_run_description", "SweptRun",
           "find_runs", "append_config_row"]

RUN_FILE = "run.json"
RUN_FORMAT = 1
log = get_logger(__name__)


def check_names(cfg: Config) -> None:
    """Every name option is a registered entry (backbone, header, method, attackers): refused before any compute,
    with the closest registered name."""
    ARCHITECTURES.get(cfg.network)
    HEADERS.get(cfg.loss)
    METHODS.get(cfg.method)
    for name in cfg.attackers:
        if name != ALL and name not in ATTACKERS:
            raise ATTACKERS.unknown(name, extra=(ALL,))


@dataclass(frozen=True)
class RunFolders:
    checkpoints: Path
    logs: Path
    resuming: bool
    requested: Path          # the checkpoint folder the settings name (a new run moves to _2, _3... if it is used)


def choose_run_folders(cfg: Config, method: PrivacyMethod) -> RunFolders:
    """The run's checkpoint and log folders. A new run never reuses an occupied folder: it takes the next free
    ``_2``, ``_3``... name. ``resume`` takes the latest folder of the series that holds a resume state."""
    sub = Path(cfg.pretrained) / cfg.experiment / cfg.data / (cfg.run_name or method.run_name())
    base_ckpt = Path(cfg.output) if cfg.output else Path(cfg.checkpoint_root) / sub
    base_log = Path(cfg.log_output) if cfg.log_output else Path(cfg.log_dir) / sub

    def named(k: int) -> tuple[Path, Path]:
        return numbered(base_ckpt, k, folder=True), numbered(base_log, k, folder=True)
    k = first_free_number([base_ckpt, base_log], folder=True)
    if cfg.resume:
        for j in range(k - 1, 0, -1):
            if (named(j)[0] / RESUME_FILE).is_file():
                check_resume_state(named(j)[0] / RESUME_FILE)
                return RunFolders(*named(j), True, base_ckpt)
        raise UserError(f"resume=True but no resumable run was found at '{base_ckpt}' (or its _2, _3... siblings): "
                        f"there is no {RESUME_FILE} in them. Start a new run with resume=False.")
    return RunFolders(*named(k), False, base_ckpt)


def check_resume_state(path: Path) -> None:
    """A resume state this version can continue (before anything is written into its folder)."""
    state = safe_torch_load(path, "resume state")
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"resume state '{path}' lacks {', '.join(missing)}: it was written by an older version of this "
                        f"code (before run.json existed), which this one cannot continue. Its checkpoints still sweep "
                        f"as they are; to train further, start a new run with resume=False.")


def write_run_description(folders: RunFolders, cfg: Config) -> None:
    """``run.json`` in the checkpoint folder: the method and the configuration the run was trained with (written
    once, atomically, when the run starts; a resumed run keeps the original)."""
    path = folders.checkpoints / RUN_FILE
    if folders.resuming and path.is_file():
        return
    resolved = dataclasses.replace(cfg, output=str(folders.checkpoints), log_output=str(folders.logs))
    doc = {"format": RUN_FORMAT, "method": cfg.method, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "config": options.recorded(resolved)}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")


def append_config_row(path: Path, cfg: Config, extra: dict[str, object]) -> None:
    """config.csv (the authors' record): one row of hyperparameters per run. A file written with other options (an
    older version) is rewritten with the union of the columns, so that every value stays under its name."""
    row = {k: str(v) for k, v in {**options.flat(cfg), **extra}.items()}
    rows, columns = [], list(row)
    if path.is_file():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
        columns = list(reader.fieldnames or []) + [k for k in row if k not in (reader.fieldnames or [])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows + [row])
    atomic_write_text(path, buf.getvalue())


@dataclass
class SweptRun:
    """A run folder as the sweep sees it: its method (with the run's own settings) and its checkpoints."""
    name: str
    folder: Path
    method: PrivacyMethod
    checkpoints: list[tuple[int, Path]]
    described: bool          # False: a folder written before run.json existed (the sweep's config is used)

    @property
    def settings(self) -> str:
        """The run's method and the settings that define it, read from its description."""
        return self.method.describe()


def read_run_config(folder: Path) -> Config | None:
    """The configuration a run recorded in its run.json; None for a folder without one."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        values = doc["config"]
        if not isinstance(values, dict):
            raise TypeError(f"its 'config' is a {type(values).__name__}, not a mapping of option names to values")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"run description '{path}' is not readable ({type(exc).__name__}: {exc}). It is written by "
                        f"finetune.py; restore it, or delete it to sweep the folder with the current config.") from None
    if not isinstance(values, dict):
        raise UserError(f"run description '{path}': its 'config' is a {type(values).__name__}, not a mapping of "
                        f"option names to values. It is written by finetune.py; restore it, or delete it to sweep "
                        f"the folder with the current config.")
    values = {k: v for k, v in values.items() if known_option(k)}   # options of other versions are left out
    cfg = config_from_dict(values, f"run description '{path}'")
    METHODS.get(cfg.method)
    return cfg


def find_runs(base: Path, sweep_cfg: Config, names: Collection[str] | None = None) -> list[SweptRun]:
    """Run folders under ``base`` (only those ``names`` lists, when given) with their method and checkpoints, in name
    order. A folder without run.json (older runs, the authors' released layers) is the paper's method with the
    sweep's own config."""
    if not base.is_dir():
        raise UserError(f"no folder '{base}' (--model-root / --experiment-name). It should hold one folder per run "
                        f"(e.g. 20L1_1L2/) with the checkpoints that finetune.py writes.")
    runs = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and (names is None or p.name in names)):
        run_cfg = read_run_config(folder)
        described = run_cfg is not None
        if run_cfg is None:
            run_cfg = dataclasses.replace(sweep_cfg, method="angular")
        else:  # the backbone and evaluation settings are the sweep's; the method's settings are the run's
            run_cfg = dataclasses.replace(run_cfg, network=sweep_cfg.network, output_ori=sweep_cfg.output_ori,
                                          SE=sweep_cfg.SE, device=sweep_cfg.device)
        method = get_method(run_cfg.method)(run_cfg)
        ckpts = method.list_checkpoints(folder)
        if ckpts:
            runs.append(SweptRun(folder.name, folder, method, ckpts, described))
    if not runs:
        raise UserError(f"no checkpoints found under '{base}': expected run folders holding the checkpoints of a "
                        f"method ({{step}}ftn_layers.pth for the paper's; the authors' released layers work too, "
                        f"placed in such a folder).")
    return runs
