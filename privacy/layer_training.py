"""Training a privacy layer on top of the frozen backbone: shared by every method whose transform is a trained
layer (the paper's angular constraints, the adversarial baseline).

A method supplies an ``Objective``: the parameters it trains beside the layer (an identity header, an adversary)
and the named loss terms of a batch. This module does the rest, identically for all of them: the template source
(the cache, or the backbone in the loop), gender-balanced epochs, the optimisers, gradient clipping, logging,
validation, checkpoints, resume, and stopping on a non-finite term.

The steps never wait for the device (when the cache is held on it; a cache too large for the GPU is read on the
host, and its rows go to the GPU through pinned memory): labels, genders and each epoch's draws are on it, the loss
terms are summed there and read by the host only every log_every steps, before validation and at epoch ends, where
a non-finite term stops the run naming the first step it appeared at; before a checkpoint the weights are checked
too, so none is written from a model gone non-finite.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones import FrozenBackbone, ProjectionLayer, load_projection
from config.config import Config
from losses import get_header
from privacy.base import FitContext, FitResult, PrivacyMethod
from privacy.callbacks import CallBackLogging, CallBackVerification
from facedata.dataset import ImageDataset, balanced_epoch, normalize_images, problem_report
from utils.device import decode_workers
from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load

RESUME_FILE = "resume.pth"
RESUME_KEYS = ("step", "epoch", "layer", "objective", "optimizers", "generator", "torch_rng")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class EpochDraws(NamedTuple):
    """One epoch's sampled images and flips: drawn on the host (balanced_epoch: the same draws on every device and
    across resume) and copied to the training device once, where the steps slice them."""
    indices: torch.Tensor           # host
    flips: torch.Tensor             # host
    device_indices: torch.Tensor    # the same on the training device (on the CPU, the very same tensors)
    device_flips: torch.Tensor

    @classmethod
    def draw(cls, genders, seed: int, epoch: int, device: torch.device) -> "EpochDraws":
        indices, flips = balanced_epoch(genders, seed, epoch)
        return cls(indices, flips, to_device(indices, device), to_device(flips, device))


EpochSource = Callable[[EpochDraws, int, int], Iterator[torch.Tensor]]


class Objective(nn.Module):
    """The loss of a layer method. ``forward`` returns named scalar terms, ``loss`` (what is minimised) among
    them; its own parameters are trained with Adam at ``lr`` (config headid_lr by default)."""

    def forward(self, z: torch.Tensor, ids: torch.Tensor, genders: torch.Tensor,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self, terms: dict[str, float]) -> str:
        """One log line of averaged terms."""
        return "  ".join(f"{k} {v:.4f}" for k, v in terms.items())

    def checkpoint_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """Extra files saved beside each layer checkpoint, by file-name suffix (e.g. the authors' header.pth)."""
        return {}


class IdentityObjective(Objective):
    """An objective with the paper's identity header (config loss, s, m, sigma), saved beside each layer checkpoint
    as the authors' ``{step}header.pth``."""

    def __init__(self, cfg: Config, n_identities: int):
        super().__init__()
        self.header = get_header(cfg.loss, cfg.embedding_size, n_identities, cfg.s, cfg.m, cfg.sigma)

    def identity_loss(self, z: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(self.header(z, ids, generator), ids)

    def checkpoint_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"header.pth": self.header.state_dict()}


class LayerMethod(PrivacyMethod):
    """A method whose transform is the paper's privacy layer trained with an objective: checkpoints
    ``{step}ftn_layers.pth`` (the authors' format), the backbone in the loop possible (cache=False)."""
    checkpoint_suffix = "ftn_layers.pth"
    trains_in_loop = True
    varied_options = ("lr", "headid_lr", "batch_size", "num_epoch", "n_hidden", "loss", "s", "m", "sigma", "grad_clip",
                      "seed")

    def objective(self, ctx: FitContext) -> Objective:
        """The method's loss (built after the layer, from the same seed)."""
        raise NotImplementedError

    def fit(self, ctx: FitContext) -> FitResult:
        return train_layer(self, ctx, lambda: self.objective(ctx))

    def load_transform(self, path: Path) -> nn.Module:
        return load_projection(path, self.cfg.embedding_size, self.cfg.n_hidden)


# ---------------------------------------------------------------------------------------------------------------
# template sources: the cache, or the backbone in the loop
# ---------------------------------------------------------------------------------------------------------------
def cached_source(ctx: FitContext) -> EpochSource:
    """Templates from the cache: the flipped or unflipped row of each sampled image, batch by batch. On a GPU with
    room for it the whole cache is copied there once and gathered with the epoch's device indices (no host round
    trip); otherwise rows are read on the host with positioned reads and copied."""
    cache, device = ctx.cached(), ctx.device
    resident = None
    if device.type == "cuda" and 4 * cache.templates.size * 4 < torch.cuda.mem_get_info(device)[0]:
        resident = cache.to_device(device)  # the same float32 values, gathered on the GPU without host reads
        ctx.log.info("template cache held on %s (%.2f GB)", device, resident.numel() * 4 / 1e9)

    def epoch(draws: EpochDraws, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        batches = (slice(b * batch_size, (b + 1) * batch_size) for b in range(steps))
        if resident is not None:
            flips = draws.device_flips.long()
            for sl in batches:
                yield resident[draws.device_indices[sl], flips[sl]]
        else:
            for sl in batches:
                yield to_device(cache.gather(draws.indices[sl], draws.flips[sl]), device)
    return epoch


def in_loop_source(ctx: FitContext) -> EpochSource:
    """Templates computed by the frozen backbone on every step (the authors' design), images decoded by
    DataLoader workers."""
    cfg, paths, device = ctx.cfg, ctx.index.paths, ctx.device
    dataset = ImageDataset(paths)
    # the cached mode finds undecodable files during its extraction pass; here one decoding pass finds them all
    problems = []
    workers = decode_workers(cfg.num_workers)
    for idx, _, _, errors in DataLoader(dataset, batch_size=256, num_workers=workers):
        problems += [f"{paths[int(i)]}: {e}" for i, e in zip(idx, errors) if e]
    if problems:
        raise UserError(problem_report(f"the training images of {cfg.data_dir}", problems,
                                       "Replace or remove the files that do not decode, then run again."))
    assert ctx.backbone is not None, "a training run gives the context its backbone's loader (pipeline/train.py)"
    backbone = FrozenBackbone(ctx.backbone()).to(device)
    if cfg.channels_last:
        # Module.to takes memory_format at run time (torch's _parse_to); its stubs' overloads leave it out
        backbone = backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def epoch(draws: EpochDraws, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        indices, flips = draws.indices, draws.flips   # the host's: the workers decode, the host flips
        batches = [indices[b * batch_size:(b + 1) * batch_size].tolist() for b in range(steps)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                            pin_memory=device.type == "cuda")
        for b, (_, x, _, errors) in enumerate(loader):
            bad = [f"{paths[i]}: {e}" for i, e in zip(batches[b], errors) if e]
            if bad:
                raise UserError(f"training images that do not decode: {'; '.join(bad[:10])}. Replace or remove "
                                f"them.")
            fl = flips[b * batch_size:(b + 1) * batch_size]
            x[fl] = x[fl].flip(3)
            x = normalize_images(x.to(device, non_blocking=True))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield F.normalize(backbone(x).float())
    return epoch


# ---------------------------------------------------------------------------------------------------------------
# one optimisation step (the same code for both template sources and every objective)
# ---------------------------------------------------------------------------------------------------------------
class StepTerms(NamedTuple):
    names: tuple[str, ...]
    values: torch.Tensor     # (len(names),) float32 on the training device, detached


def train_step(x: torch.Tensor, ids: torch.Tensor, genders: torch.Tensor, layer: nn.Module, objective: Objective,
               opts: tuple[torch.optim.Optimizer, ...], grad_clip: float, generator: torch.Generator) -> StepTerms:
    """The objective's terms on z = normalize(layer(x)), x = normalize(backbone(image)); one optimiser step.

    Returns the terms stacked on the device, unread (no wait for the GPU): the loop sums them with TermSums, which
    also finds a non-finite term (that step's update is made, and never saved)."""
    terms = objective(F.normalize(layer(x)), ids, genders, generator)
    names = tuple(terms)
    values = torch.stack([terms[k].detach().to(torch.float32) for k in names])
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=grad_clip)
    for opt in opts:
        opt.step()
    return StepTerms(names, values)


class Fetched(NamedTuple):
    """The terms as the host sees them at a fetch: summed over the ``steps`` steps since the previous fetch, and
    over the ``epoch_steps`` steps of the epoch so far."""
    sums: dict[str, float]
    steps: int
    epoch_sums: dict[str, float]
    epoch_steps: int

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


class TermSums:
    """The loss terms of the steps, kept on the training device: sums since the last fetch and over the epoch, and
    the first step at which a term was not finite, with that step's terms.

    ``add`` only launches a few small kernels (it never waits for the GPU); ``fetch`` copies it all to the host in
    one read and raises FloatingPointError naming the first non-finite step and its terms. The sums are float64
    (float32 on MPS, which has no float64) added step by step: on the CPU exactly the floats of a per-step sum."""

    def __init__(self, device: torch.device, step: int):
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.names: tuple[str, ...] = ()
        self.steps = self.epoch_steps = 0
        self.step = torch.full((), step, dtype=torch.int64, device=device)   # the step counted on the device

    def add(self, terms: StepTerms) -> None:
        if not self.names:
            self.names = terms.names
            zeros = torch.zeros(len(self.names), dtype=self.dtype, device=self.device)
            self.sums, self.epoch_sums, self.bad_values = zeros.clone(), zeros.clone(), terms.values.clone()
            self.bad_step = torch.zeros((), dtype=torch.int64, device=self.device)
            self.found = torch.zeros((), dtype=torch.bool, device=self.device)
        values = terms.values.to(self.dtype)
        self.sums += values
        self.epoch_sums += values
        self.step += 1
        first = torch.isfinite(terms.values).all().logical_not() & self.found.logical_not()
        self.found |= first
        self.bad_step = torch.where(first, self.step, self.bad_step)
        self.bad_values = torch.where(first, terms.values, self.bad_values)
        self.steps += 1
        self.epoch_steps += 1

    def new_epoch(self) -> None:
        if self.names:
            self.epoch_sums.zero_()
        self.epoch_steps = 0

    def fetch(self) -> Fetched:
        """One host read of everything (raises FloatingPointError if a term went non-finite since the start); the
        sums since the last fetch start again from zero."""
        if not self.names:
            return Fetched({}, 0, {}, 0)
        n = len(self.names)
        host = torch.cat([self.sums, self.epoch_sums, self.bad_values.to(self.dtype),
                          self.found.to(self.dtype)[None]]).tolist()   # the one wait for the device
        if host[-1]:
            bad = dict(zip(self.names, host[2 * n:3 * n]))
            names = [k for k, v in bad.items() if not math.isfinite(v)]
            raise FloatingPointError(f"step {int(self.bad_step)}: the loss term(s) {', '.join(names)} became "
                                     f"non-finite ({', '.join(f'{k}={v}' for k, v in bad.items())})")
        out = Fetched(dict(zip(self.names, host[:n])), self.steps, dict(zip(self.names, host[n:2 * n])),
                      self.epoch_steps)
        self.sums.zero_()
        self.steps = 0
        return out


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------
def load_resume(folder: Path, layer: nn.Module, objective: Objective, opts: tuple[torch.optim.Optimizer, ...],
                generator: torch.Generator, log: logging.Logger | None = None) -> tuple[int, int]:
    """Restore everything a run needs to continue exactly; returns (step, epoch).

    The margin-noise generator is on the GPU in a CUDA run and on the CPU otherwise; a state saved by a run on the
    other kind of device does not fit it, and it then keeps its seed (said in the log)."""
    state = safe_torch_load(folder / RESUME_FILE, "resume state")
    try:
        layer.load_state_dict(state["layer"])
        objective.load_state_dict(state["objective"])
        for opt, s in zip(opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        if state["generator"].numel() == generator.get_state().numel():
            generator.set_state(state["generator"])
        elif log is not None:
            log.warning("the resume state's margin-noise generator was saved on another kind of device than %s: it "
                        "starts again from its seed (only the ElasticFace headers draw from it)", generator.device)
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"resume state '{folder / RESUME_FILE}' does not fit this configuration ({exc}). Resume with "
                        f"the settings of the original run (its run.json), or start a new run.") from None
    return int(state["step"]), int(state["epoch"])


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
def train_layer(method: PrivacyMethod, ctx: FitContext, make_objective: Callable[[], Objective]) -> FitResult:
    """Train ProjectionLayer + the objective (built after the layer, from the same seed) for cfg.num_epoch
    gender-balanced epochs; checkpoints every cfg.checkpoint_every epochs and at the end."""
    run = LayerTraining(method, ctx, make_objective)
    try:
        for epoch in range(run.start_epoch, ctx.cfg.num_epoch):
            run.epoch(epoch)
            if (epoch + 1) % ctx.cfg.checkpoint_every == 0 or epoch + 1 == ctx.cfg.num_epoch:
                run.checkpoint(epoch + 1)
    finally:
        run.bar.close()
    run.result.step = run.step
    run.result.history = run.val_cb.history
    return run.result


class LayerTraining:
    """One training of a layer method, in three steps: set-up (``__init__``: template source, seeded layer and
    objective, optimisers, resume state, callbacks), ``epoch`` (its steps, logged and validated) and
    ``checkpoint`` (the layer, the objective's files and the resume state, written only from finite weights)."""

    def __init__(self, method: PrivacyMethod, ctx: FitContext, make_objective: Callable[[], Objective]):
        cfg, device = ctx.cfg, ctx.device
        self.method, self.ctx, self.cfg, self.device, self.log = method, ctx, cfg, device, ctx.log
        self.source = cached_source(ctx) if cfg.cache else in_loop_source(ctx)
        torch.manual_seed(cfg.seed)
        self.layer = ProjectionLayer(cfg.embedding_size, cfg.embedding_size, cfg.n_hidden).to(device)
        self.objective = make_objective().to(device)
        self.opts: tuple[torch.optim.Optimizer, ...] = (torch.optim.Adam(self.layer.parameters(), lr=cfg.lr),)
        if any(True for _ in self.objective.parameters()):
            self.opts += (torch.optim.Adam(self.objective.parameters(), lr=cfg.headid_lr),)
        # the ElasticFace margin noise is drawn where it is used (a CPU generator elsewhere than on CUDA)
        self.generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(cfg.seed + 1)
        self.step, self.start_epoch = cfg.global_step, 0
        if ctx.resuming:
            self.step, self.start_epoch = load_resume(ctx.checkpoint_dir, self.layer, self.objective, self.opts,
                                                      self.generator, self.log)
            self.log.info("resumed from %s at step %d (epoch %d)", ctx.checkpoint_dir / RESUME_FILE, self.step,
                          self.start_epoch)
        self.labels = torch.as_tensor(ctx.index.labels).to(device)     # on the device for the whole run
        self.genders = torch.as_tensor(ctx.index.genders).to(device)
        self.steps_per_epoch = len(ctx.index) // cfg.batch_size
        self.log_cb = CallBackLogging(cfg.log_every, cfg.batch_size, self.log, self.objective.describe)
        self.val_cb = CallBackVerification(cfg.eval_step, ctx.val_sets, cfg.gender_folds, self.log, cfg.attackers,
                                           cfg.seed)
        self.terms = TermSums(device, self.step)
        self.result = FitResult(self.step)
        self.layer.train()
        self.objective.train()
        self.bar = tqdm(total=(cfg.num_epoch - self.start_epoch) * self.steps_per_epoch,
                        desc=f"finetune ({method.name})", unit="step", dynamic_ncols=True, disable=None, leave=False)

    def epoch(self, epoch: int) -> None:
        """One gender-balanced epoch of steps; its mean loss terms are recorded (the callbacks frame it)."""
        cfg = self.cfg
        draws = EpochDraws.draw(self.ctx.index.genders, cfg.seed, epoch, self.device)
        self.terms.new_epoch()
        for cb in self.ctx.callbacks:
            cb.on_epoch_start(epoch)
        for b, x in enumerate(self.source(draws, self.steps_per_epoch, cfg.batch_size)):
            idx = draws.device_indices[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            self.terms.add(train_step(x, self.labels[idx], self.genders[idx], self.layer, self.objective, self.opts,
                                      cfg.grad_clip, self.generator))
            self.step += 1
            self.bar.update(1)
            if self.step % cfg.log_every == 0 or self.val_cb.due(self.step):
                self.fetch(epoch)    # validation runs on a model whose terms were all finite
            self.val_cb(self.step, self.layer)
        got = self.fetch(epoch)      # before the checkpoint: none is written from a model gone non-finite
        self.result.epoch_losses.append({k: v / got.epoch_steps for k, v in got.epoch_sums.items()})
        for cb in self.ctx.callbacks:
            cb.on_epoch_end(epoch)

    def checkpoint(self, epochs_done: int) -> Path:
        """The layer as the method's ``{step}ftn_layers.pth``, the objective's extra files (``{step}header.pth``)
        and the resume state, each atomic; refused (the run stops) when a weight is not finite."""
        weights = [*self.layer.named_parameters(), *self.objective.named_parameters()]
        finite = torch.stack([torch.isfinite(w).all() for _, w in weights]).tolist()   # one read
        broken = [name for (name, _), ok in zip(weights, finite) if not ok]   # finite terms, non-finite update
        if broken:
            raise self.stop(f"at step {self.step} the weights {', '.join(broken)} are non-finite (the loss terms "
                            f"were finite)")
        folder, step = self.ctx.checkpoint_dir, self.step
        path = self.method.save_checkpoint(folder, step, self.layer)
        for suffix, state in self.objective.checkpoint_files().items():
            atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, folder / f"{step}{suffix}")
        resume = {"step": step, "epoch": epochs_done, "layer": self.layer.state_dict(),
                  "objective": self.objective.state_dict(), "optimizers": [o.state_dict() for o in self.opts],
                  "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
        atomic_torch_save(resume, folder / RESUME_FILE)
        self.result.checkpoints.append(path)
        self.log.info("epoch %d done: saved %s", epochs_done, path)
        return path

    def fetch(self, epoch: int) -> Fetched:
        """The host's one read of the terms: checked (a non-finite one stops the run), logged, shown."""
        try:
            got = self.terms.fetch()
        except FloatingPointError as exc:
            raise self.stop(str(exc)) from None
        if got.steps:
            self.log_cb(self.step, epoch, got.sums, got.steps)
            self.bar.set_postfix_str(self.objective.describe(got.mean()))
        return got

    def stop(self, reason: str) -> UserError:
        """The error that ends a run gone non-finite, naming the last good checkpoint (also logged)."""
        last = self.method.list_checkpoints(self.ctx.checkpoint_dir)
        keep = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
        self.log.error("training stopped: %s; %s", reason, keep)
        return UserError(f"training stopped: {reason}; {keep}. Lower lr/headid_lr or the weights of the method's "
                         f"terms, or check the training data, then resume or start again.")
