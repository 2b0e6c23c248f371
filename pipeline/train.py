"""Fit a privacy method on top of a frozen face-recognition backbone (by default the paper's: a privacy layer
trained with CE + alpha * P1 + beta * P2).

    python finetune.py [--config PATH] [--set KEY=VALUE ...]

The stages read top to bottom: the pre-flight check (every option, name, file and folder checked before any compute),
set-up (run folders, log, run.json, the backbone's templates of the training set and of the validation sets, from
the template cache), fit (the method writes its checkpoints). ``--set cache=False`` runs the backbone in the loop
as the authors did (methods that train a layer); both modes share the same step code.

    torchrun --nproc_per_node=N finetune.py [--set ...]

shares the backbone's template extraction among N processes (GPUs, or machines with torchrun's multi-node options
and a shared file system); the fit then runs in process 0 alone (the privacy layer is small).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


import torch

from backbones import embedding_size_for
from backbones.spec import BackboneSpec
from config.config import Config
from eval.evalset import EvalTemplates, check_bare_backbone, check_bins, open_eval_set, warn_if_few_identities
from eval.overlap import warn_overlap
from privacy import FitContext, FitResult, PrivacyMethod, get_method
from privacy.callbacks import TrainingCallback
from privacy.runs import RunFolders, append_config_row, check_names, choose_run_folders, write_run_description
from templates.cache import TemplateCache, index_inputs
from config.loading import OVERRIDE_HELP, load_config
from templates.entry import Templates
from facedata.dataset import TrainIndex, scan_training_data
from utils.device import select_device
from utils.distributed import Processes, processes
from utils.errors import UserError, run_cli
from utils.io import check_writable
from utils.logs import ROOT, log_to

LOGGER_NAME = ROOT


@dataclass
class CheckedRun:
    """What the pre-flight check established: the method, the data, the backbone, the device, the run folders
    (process 0's alone) and the command's processes."""
    cfg: Config
    method: PrivacyMethod
    index: TrainIndex
    backbone: BackboneSpec
    device: torch.device
    folders: RunFolders | None
    procs: Processes = Processes()

    def main_folders(self) -> RunFolders:
        """The run folders, in process 0: the one that sets the run up and fits it."""
        assert self.folders is not None, "check_run chooses the run folders in process 0"
        return self.folders


@dataclass
class TrainResult(FitResult):
    """Where a run wrote its files, and how its fit ended."""
    checkpoint_dir: Path = Path()
    log_dir: Path = Path()


def check_run(cfg: Config, device: torch.device, procs: Processes = Processes()) -> CheckedRun:
    """Check everything that can be checked before any compute: names, data, weights, validation files, folders.
    ``device``: the one chosen for the command (select_device); each process takes its own GPU of it."""
    check_names(cfg)
    cfg = embedding_size_for(cfg)   # the template size the backbone weights produce
    method = get_method(cfg.method)(cfg)
    method.check()
    if not cfg.cache and not method.trains_in_loop:
        raise UserError(f"config option cache=False runs the backbone in the training loop, which only methods that "
                        f"train a layer do; '{cfg.method}' is fit on the cached templates. Use cache=True.")
    if not cfg.cache and procs.world > 1:
        raise UserError("torchrun shares the backbone's template extraction among processes, and cache=False has "
                        "none (the backbone runs in the training loop of one process): run 'python finetune.py' "
                        "with cache=False, or torchrun with cache=True.")
    device = procs.device(device)
    index = scan_training_data(cfg.data_dir, cfg.rec_genders)
    backbone = BackboneSpec.from_config(cfg)
    backbone.check()
    if len(index) < cfg.batch_size:
        raise UserError(f"the training set {cfg.data_dir} has {len(index)} images, fewer than one batch (batch_size "
                        f"{cfg.batch_size}; incomplete batches are dropped); lower batch_size or add images.")
    if cfg.eval_step:
        check_bins(cfg.rec, cfg.val_targets, "config options rec, val_targets",
                   "validate nothing with --set eval_step=0", "validation")
    folders = None
    if procs.main:   # the other processes only extract: they neither choose nor touch the run folders
        folders = choose_run_folders(cfg, method)
        check_writable(folders.checkpoints, "output / checkpoint_root")
        check_writable(folders.logs, "log_output / log_dir")
    check_writable(cfg.cache_dir, "cache_dir")
    return CheckedRun(cfg, method, index, backbone, device, folders, procs)


def get_templates(run: CheckedRun) -> tuple[Templates | None, list[EvalTemplates]]:
    """The backbone's templates of the training set (cache=True) and of the validation sets, from the template
    cache. Under torchrun every process calls this, in this order: each extracts its share of a miss; then they
    leave the process group."""
    cfg = run.cfg
    cache = TemplateCache.from_config(cfg, run.device, run.procs, run.backbone)
    templates = None
    if cfg.cache:
        templates = cache.get(f"train-{run.index.name}", index_inputs(run.index), run.index.paths,
                              lambda i: str(run.index.paths[i]), what=f"training images of {run.index.where}")
    val_sets = [open_eval_set(cache, cfg.rec, name) for name in cfg.val_targets] if cfg.eval_step else []
    run.procs.leave()
    return templates, val_sets


@contextlib.contextmanager
def set_up(run: CheckedRun, callbacks: list[TrainingCallback]) -> Iterator[FitContext]:
    """Open the run's log, describe the run (config.csv, run.json) and get the templates the method is fit on."""
    cfg, index, folders = run.cfg, run.index, run.main_folders()
    with log_to(folders.logs / "training.log", LOGGER_NAME) as log:
        if not folders.resuming and folders.checkpoints != folders.requested:
            log.info("run folder %s is already used: this run writes to %s (earlier runs are never overwritten)",
                     folders.requested, folders.checkpoints)
        log.info("%s run of method '%s': checkpoints -> %s, logs -> %s, device %s",
                 "resumed" if folders.resuming else "new", cfg.method, folders.checkpoints, folders.logs, run.device)
        if run.procs.world > 1:
            log.info("torchrun: %d processes share the template extraction; process 0 then fits the method alone",
                     run.procs.world)
        log.info("training set %s: %d images of %d identities (%d of gender 0, %d of gender 1)", cfg.data_dir,
                 len(index), index.num_identities, int((index.genders == 0).sum()), int((index.genders == 1).sum()))
        for source in index.sources:
            if len(index.sources) > 1:
                log.info("source %s", source.summary())
            for note in source.notes:
                log.warning("training set %s: %s", source.path, note)
        write_run_description(folders, cfg)
        append_config_row(folders.logs / "config.csv", cfg, {"run_folder": str(folders.checkpoints),
                                                             "resumed": folders.resuming,
                                                             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                             "data_sources": index.summary()})
        templates, val_sets = get_templates(run)
        for ev in val_sets:
            log.info("bare backbone on %s: EER %.4f", ev.name, check_bare_backbone(ev, log))
        warn_overlap(log, index, templates, val_sets)
        warn_if_few_identities(index.num_identities, cfg.embedding_size, run.method.trains_in_loop, log)
        yield FitContext(cfg, index, templates, run.device, folders.checkpoints, folders.resuming, log, val_sets,
                         run.backbone.load, callbacks)


def train(cfg: Config, callbacks: list[TrainingCallback] | None = None) -> TrainResult | None:
    """Run one fit as configured; returns the folders written, the final step and the method's record. Under
    torchrun the processes other than 0 extract their shares of the templates and return None."""
    device = select_device(cfg.device)   # chosen once: the process group's backend and the run's device
    with processes(device) as procs:
        run = check_run(cfg, device, procs)
        if not procs.main:
            get_templates(run)
            return None
        with set_up(run, callbacks or []) as ctx:
            fit = run.method.fit(ctx)
            folders = run.main_folders()
            ctx.log.info("finished at step %d; %d checkpoint(s) in %s", fit.step, len(fit.checkpoints),
                         folders.checkpoints)
    return TrainResult(**vars(fit), checkpoint_dir=folders.checkpoints, log_dir=folders.logs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OVERRIDE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config module (default: config/config.py)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config options")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        result = train(load_config(args.config, args.set))
        if result is not None:
            print(f"checkpoints: {result.checkpoint_dir}\nlogs: {result.log_dir}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
