"""What a privacy method is: fit on the training set's templates, it writes checkpoints along its privacy/utility
path, each of which loads as a transform of templates (normalised backbone outputs -> protected templates).

A transform is an ``nn.Module``. It may also define ``pair_distances(ver) -> (P,)`` (its own comparison of the
consecutive pairs of flip-summed templates, on the squared-Euclidean scale [0, 4]) and ``similarity(a, b)``
(higher = more alike): verification and comparison-based attackers then use them (eval/evalset.py).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, TypeVar, overload

import numpy as np
import torch
from torch import nn

from config.config import Config
from config.options import register_options
from eval.evalset import EvalTemplates
from privacy.callbacks import CallBackVerification, TrainingCallback
from templates.entry import Templates
from facedata.dataset import TrainIndex
from utils.errors import UserError, listing
from utils.io import atomic_torch_save, extract_state_dict, safe_torch_load
from utils.registry import Registry

__all__ = ["METHODS", "register_method", "PrivacyMethod", "PathMethod", "FitContext", "FitResult",
           "training_templates", "checkpoint_tensor"]


@dataclass
class FitContext:
    """Everything a method is fit with: the data, its templates, where to write, how to validate and log."""
    cfg: Config
    index: TrainIndex                   # training images: identity labels, genders, identity genders
    templates: Templates | None         # the training set's cached templates (None only when cache=False)
    device: torch.device
    checkpoint_dir: Path
    resuming: bool
    log: logging.Logger
    val_sets: list[EvalTemplates] = field(default_factory=list)
    backbone: Callable[[], nn.Module] | None = None   # the frozen backbone, for the in-the-loop mode
    callbacks: list[TrainingCallback] = field(default_factory=list)  # epoch callbacks (benchmarks, research)

    def cached(self) -> Templates:
        """The training set's cached templates, for a fit that reads them (a run with cache=True; pipeline/train.py
        refuses cache=False for the methods that read no backbone in the loop)."""
        assert self.templates is not None, "cache=True gives the context the training set's templates"
        return self.templates


@dataclass
class FitResult:
    """How a fit ended: the final step, the checkpoints written, per-epoch means of the method's loss terms, and
    the validation history."""
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float | str]] = field(default_factory=list)


class PrivacyMethod:
    """Base of the privacy methods (see privacy/__init__.py). ``name`` and ``Options`` are set by
    ``register_method``."""
    name: ClassVar[str] = ""
    checkpoint_suffix: ClassVar[str] = "transform.pth"   # checkpoints are {step}{checkpoint_suffix}
    trains_in_loop: ClassVar[bool] = False               # True: cache=False runs the backbone in the loop
    comparison: ClassVar[str] = "squared Euclidean"      # how its templates are compared (the report says it)
    Options: ClassVar[type | None] = None                # the method's own options (a dataclass of option fields)
    settings_options: ClassVar[tuple[str, ...]] = ()     # core options that define a run (always in the report)
    varied_options: ClassVar[tuple[str, ...]] = ("seed",)  # core options the report names when not at their default

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def opts(self):
        """This run's values of the method's own options (``--set NAME.OPTION=``)."""
        return self.cfg.group(self.name)

    def run_name(self) -> str:
        """The run folder's default name (config option run_name overrides it)."""
        return self.name

    def check(self) -> None:
        """Refuse unusable settings before any compute (UserError naming the option)."""

    def describe(self) -> str:
        """The method and the settings of this run, e.g. ``angular (alpha=20, beta=1)`` or ``ive (ive.rounds=20,
        ...)``: its core settings, its own options, and the core options it varies from their defaults."""
        default = type(self.cfg)()
        shown = [(k, getattr(self.cfg, k)) for k in self.settings_options]
        if self.Options is not None:
            shown += [(f"{self.name}.{f.name}", getattr(self.opts, f.name)) for f in dataclasses.fields(self.Options)]
        shown += [(k, getattr(self.cfg, k)) for k in self.varied_options
                  if k not in self.settings_options and getattr(self.cfg, k) != getattr(default, k)]
        return self.name + (f" ({', '.join(f'{k}={v!r}' for k, v in shown)})" if shown else "")

    def fit(self, ctx: FitContext) -> FitResult:
        raise NotImplementedError

    def build_transform(self, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        """The transform held by a checkpoint's state dict (``path`` only names the file in errors)."""
        raise NotImplementedError

    # ---- checkpoints: the same for every method ------------------------------------------------------------------
    def checkpoint_path(self, folder: Path, step: int) -> Path:
        return folder / f"{step}{self.checkpoint_suffix}"

    def save_checkpoint(self, folder: Path, step: int, transform: nn.Module) -> Path:
        """Write the transform's state dict (CPU tensors) atomically as ``{step}{suffix}``."""
        path = self.checkpoint_path(folder, step)
        atomic_torch_save({k: v.detach().cpu() for k, v in transform.state_dict().items()}, path)
        return path

    def list_checkpoints(self, folder: Path) -> list[tuple[int, Path]]:
        """(step, path) of the method's checkpoints ``{step}{suffix}`` in ``folder``, in step order; files with other
        suffixes are not the method's. A name with the suffix whose prefix is not a step, or a step written twice
        (``0006ftn_layers.pth`` beside ``6ftn_layers.pth``), is refused naming the files: never silently dropped
        or merged."""
        suffix = self.checkpoint_suffix
        by_step: dict[int, list[Path]] = {}
        strange = []
        for p in sorted(folder.iterdir()):
            if not p.name.endswith(suffix) or p.name.startswith("."):
                continue
            prefix = p.name[:-len(suffix)]
            if prefix.isascii() and prefix.isdigit():
                by_step.setdefault(int(prefix), []).append(p)
            else:
                strange.append(p.name)
        twice = [" and ".join(p.name for p in paths) for paths in by_step.values() if len(paths) > 1]
        problems = [*(f"'{n}' (not a step number before '{suffix}')" for n in strange),
                    *(f"{names} (the same step)" for names in twice)]
        if problems:
            raise UserError(f"run folder '{folder}' holds checkpoint names that do not each name one step: "
                            f"{listing(problems)}. A {self.name} checkpoint is named {{step}}{suffix} (e.g. "
                            f"12{suffix}); rename or move the other files out of the folder, then run again.")
        return sorted((step, paths[0]) for step, paths in by_step.items())

    def load_transform(self, path: Path) -> nn.Module:
        """Load a checkpoint safely (weights only) into the method's transform, in eval mode. A method implements
        build_transform, or overrides this when its checkpoints have a loader of their own (the layer methods)."""
        what = f"{self.name} checkpoint"
        state = extract_state_dict(safe_torch_load(path, what), path, what)
        return self.build_transform(state, path).eval()


# config option ``method``: every privacy method, by name; a method's options are reached with --set NAME.OPTION=
METHODS: Registry[type[PrivacyMethod]] = Registry("privacy method", "method", on_options=register_options)


M = TypeVar("M", bound=PrivacyMethod)   # a registered class keeps its own type


@overload
def register_method(name: type[M]) -> type[M]: ...


@overload
def register_method(name: str, options: type | None = None, help: str = "") -> Callable[[type[M]], type[M]]: ...


def register_method(name: str | type[M], options: type | None = None, help: str = ""
                    ) -> Callable[[type[M]], type[M]] | type[M]:
    """Class decorator: make the class the privacy method ``name`` (config option method), with its ``options``
    dataclass (``--set NAME.OPTION=``) and a help line; the class then knows its ``name`` and ``Options``.

    ``@register_method`` without arguments, on a class that sets ``name`` (and ``Options``) itself, is the form of
    earlier versions, still accepted."""
    if isinstance(name, type):
        cls = name
        if not cls.name:
            raise ValueError(f"{cls.__name__} needs a class attribute 'name'")
        doc = (cls.__doc__ or "").strip().splitlines()
        return register_method(cls.name, cls.Options, doc[0] if doc else "")(cls)

    def add(cls: type[M]) -> type[M]:
        METHODS.add(name, cls, options, help)   # refused before the class is touched
        cls.name, cls.Options = name, options
        return cls
    return add


def training_templates(ctx: FitContext) -> tuple[np.ndarray, np.ndarray]:
    """The training set's unflipped cached templates (N, D) as float32 and their genders (N,): what the one-pass
    methods are fit on (the view the gender attacker sees)."""
    return ctx.cached().normalized(slice(None), 0).numpy(), np.asarray(ctx.index.genders, dtype=np.int64)


class PathMethod(PrivacyMethod):
    """A method fit in one pass on the cached templates: ``path`` yields (step, transform) along its
    privacy/utility path; each point becomes a checkpoint and is validated on ``val_targets`` (when eval_step > 0)."""

    def check(self) -> None:
        if self.cfg.resume:
            raise UserError(f"config option resume=True: method '{self.name}' is fit in one pass on the cached "
                            f"templates and has nothing to resume; start a new run with resume=False.")

    def path(self, ctx: FitContext) -> Iterator[tuple[int, nn.Module]]:
        """(step, transform) for each point of the method's path, in step order."""
        raise NotImplementedError

    def fit(self, ctx: FitContext) -> FitResult:
        val = CallBackVerification(self.cfg.eval_step, ctx.val_sets, self.cfg.gender_folds, ctx.log,
                                   self.cfg.attackers, self.cfg.seed)
        result = FitResult(0)
        for step, transform in self.path(ctx):
            transform.eval()
            result.checkpoints.append(self.save_checkpoint(ctx.checkpoint_dir, step, transform))
            ctx.log.info("%s step %d: saved %s", self.name, step, result.checkpoints[-1])
            val(step, transform, force=True)
            result.step = step
        result.history = val.history
        return result


def checkpoint_tensor(state: dict[str, torch.Tensor], key: str, path: Path, what: str) -> torch.Tensor:
    """A named tensor of a checkpoint, or a UserError naming the file and the missing entry."""
    if key not in state:
        raise UserError(f"{what} checkpoint '{path}' has no entry '{key}' (it has {sorted(state)[:4]}): it was not "
                        f"written by this method. Remove it from the run folder or sweep it with its own method.")
    return state[key]
