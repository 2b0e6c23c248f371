"""Training a privacy layer on top of the frozen backbone: shared by every method whose transform is a trained
layer (the paper's angular constraints, the adversarial baseline).

A method supplies an ``Objective``: the parameters it trains beside the layer (an identity header, an adversary)
and the named loss terms of a batch. This module does the rest, identically for all of them: the template source
(the cache, or the backbone in the loop), gender-balanced epochs, the optimisers, gradient clipping, logging,
validation, checkpoints, resume, and stopping on a non-finite term.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

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
from utils.dataset import ImageDataset, balanced_epoch, normalize_images, problem_report
from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load

RESUME_FILE = "resume.pth"
RESUME_KEYS = ("step", "epoch", "layer", "objective", "optimizers", "generator", "torch_rng")
EpochSource = Callable[[torch.Tensor, torch.Tensor, int, int], Iterator[torch.Tensor]]


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
    """Templates from the cache: the flipped or unflipped row of each sampled image, batch by batch."""
    cache, device = ctx.templates, ctx.device
    gather = cache.gather
    if device.type == "cuda" and 4 * cache.templates.size * 4 < torch.cuda.mem_get_info(device)[0]:
        resident = cache.to_device(device)  # the same float32 values, gathered on the GPU without host reads
        ctx.log.info("template cache held on %s (%.2f GB)", device, resident.numel() * 4 / 1e9)
        gather = lambda idx, flips: resident[idx.to(device), flips.to(device).long()]  # noqa: E731

    def epoch(indices: torch.Tensor, flips: torch.Tensor, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        for b in range(steps):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            yield gather(indices[sl], flips[sl]).to(device, non_blocking=True)
    return epoch


def in_loop_source(ctx: FitContext) -> EpochSource:
    """Templates computed by the frozen backbone on every step (the authors' design), images decoded by
    DataLoader workers."""
    cfg, paths, device = ctx.cfg, ctx.index.paths, ctx.device
    dataset = ImageDataset(paths)
    # the cached mode finds undecodable files during its extraction pass; here one decoding pass finds them all
    problems = []
    for idx, _, _, errors in DataLoader(dataset, batch_size=256, num_workers=cfg.num_workers):
        problems += [f"{paths[int(i)]}: {e}" for i, e in zip(idx, errors) if e]
    if problems:
        raise UserError(problem_report(f"the training images of {cfg.data_dir}", problems,
                                       "Replace or remove the files that do not decode, then run again."))
    backbone = FrozenBackbone(ctx.backbone()).to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)

    def epoch(indices: torch.Tensor, flips: torch.Tensor, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        batches = [indices[b * batch_size:(b + 1) * batch_size].tolist() for b in range(steps)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
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
def train_step(x: torch.Tensor, ids: torch.Tensor, genders: torch.Tensor, layer: nn.Module, objective: Objective,
               opts: tuple[torch.optim.Optimizer, ...], grad_clip: float, generator: torch.Generator,
               step: int) -> dict[str, float]:
    """The objective's terms on z = normalize(layer(x)), x = normalize(backbone(image)); one optimiser step.
    A non-finite term raises FloatingPointError naming the step and the term."""
    terms = objective(F.normalize(layer(x)), ids, genders, generator)
    names = list(terms)
    values = dict(zip(names, torch.stack([terms[k].detach().to(torch.float32) for k in names]).tolist()))  # 1 sync
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: the loss term(s) {', '.join(bad)} became non-finite "
                                 f"({', '.join(f'{k}={v}' for k, v in values.items())})")
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=grad_clip)
    for opt in opts:
        opt.step()
    return values


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(method: PrivacyMethod, folder: Path, step: int, epoch: int, layer: nn.Module,
                    objective: Objective, opts: tuple[torch.optim.Optimizer, ...],
                    generator: torch.Generator) -> Path:
    """The layer as ``{step}ftn_layers.pth``, the objective's extra files, and the resume state; each atomic."""
    path = method.save_checkpoint(folder, step, layer)
    for suffix, state in objective.checkpoint_files().items():
        atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, folder / f"{step}{suffix}")
    state = {"step": step, "epoch": epoch, "layer": layer.state_dict(), "objective": objective.state_dict(),
             "optimizers": [o.state_dict() for o in opts], "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state()}
    atomic_torch_save(state, folder / RESUME_FILE)
    return path


def load_resume(folder: Path, layer: nn.Module, objective: Objective, opts: tuple[torch.optim.Optimizer, ...],
                generator: torch.Generator) -> tuple[int, int]:
    """Restore everything a run needs to continue exactly; returns (step, epoch)."""
    state = safe_torch_load(folder / RESUME_FILE, "resume state")
    try:
        layer.load_state_dict(state["layer"])
        objective.load_state_dict(state["objective"])
        for opt, s in zip(opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"resume state '{folder / RESUME_FILE}' does not fit this configuration ({exc}). Resume with "
                        f"the settings of the original run (its run.json), or start a new run.") from None
    return int(state["step"]), int(state["epoch"])


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
def train_layer(method: PrivacyMethod, ctx: FitContext, make_objective: Callable[[], Objective]) -> FitResult:
    """Train ProjectionLayer + the objective (built after the layer, from the same seed) for cfg.num_epoch gender-balanced epochs; checkpoints every
    cfg.checkpoint_every epochs and at the end."""
    cfg, device, log = ctx.cfg, ctx.device, ctx.log
    source = cached_source(ctx) if cfg.cache else in_loop_source(ctx)
    torch.manual_seed(cfg.seed)
    layer = ProjectionLayer(cfg.embedding_size, cfg.embedding_size, cfg.n_hidden).to(device)
    objective = make_objective().to(device)
    opts = (torch.optim.Adam(layer.parameters(), lr=cfg.lr),)
    if any(True for _ in objective.parameters()):
        opts += (torch.optim.Adam(objective.parameters(), lr=cfg.headid_lr),)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    step, start_epoch = cfg.global_step, 0
    if ctx.resuming:
        step, start_epoch = load_resume(ctx.checkpoint_dir, layer, objective, opts, generator)
        log.info("resumed from %s at step %d (epoch %d)", ctx.checkpoint_dir / RESUME_FILE, step, start_epoch)

    labels, genders = torch.as_tensor(ctx.index.labels), torch.as_tensor(ctx.index.genders)
    steps_per_epoch = len(ctx.index) // cfg.batch_size
    log_cb = CallBackLogging(cfg.log_every, cfg.batch_size, log, objective.describe)
    val_cb = CallBackVerification(cfg.eval_step, ctx.val_sets, cfg.gender_folds, log, cfg.attackers, cfg.seed)
    result = FitResult(step)
    layer.train()
    objective.train()
    bar = tqdm(total=(cfg.num_epoch - start_epoch) * steps_per_epoch, desc=f"finetune ({method.name})", unit="step",
               dynamic_ncols=True, disable=None, leave=False)
    for epoch in range(start_epoch, cfg.num_epoch):
        indices, flips = balanced_epoch(ctx.index.genders, cfg.seed, epoch)
        sums: dict[str, float] = {}
        for cb in ctx.callbacks:
            getattr(cb, "on_epoch_start", lambda e: None)(epoch)
        for b, x in enumerate(source(indices, flips, steps_per_epoch, cfg.batch_size)):
            idx = indices[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            try:
                terms = train_step(x, labels[idx].to(device), genders[idx].to(device), layer, objective, opts,
                                   cfg.grad_clip, generator, step + 1)
            except FloatingPointError as exc:
                last = method.list_checkpoints(ctx.checkpoint_dir)
                keep = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
                log.error("training stopped: %s; %s", exc, keep)
                raise UserError(f"training stopped: {exc}; {keep}. Lower lr/headid_lr or the weights of the "
                                f"method's terms, or check the training data, then resume or start again.") from None
            step += 1
            sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
            log_cb(step, epoch, terms)
            val_cb(step, layer)
            bar.update(1)
            bar.set_postfix_str(objective.describe(terms))
        result.epoch_losses.append({k: v / steps_per_epoch for k, v in sums.items()})
        for cb in ctx.callbacks:
            getattr(cb, "on_epoch_end", lambda e: None)(epoch)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.num_epoch:
            result.checkpoints.append(save_checkpoint(method, ctx.checkpoint_dir, step, epoch + 1, layer, objective,
                                                      opts, generator))
            log.info("epoch %d done: saved %s", epoch + 1, result.checkpoints[-1])
    bar.close()
    result.step = step
    result.history = val_cb.history
    return result

