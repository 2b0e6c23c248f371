"""Train the privacy layer (and its identity header) on top of a frozen face-recognition backbone.

    python finetune.py [--config PATH] [--set KEY=VALUE ...]

Loss per gender-balanced batch: CE(header(z), identity) + alpha * P1 + beta * P2 with
z = normalize(layer(normalize(backbone(x)))). By default the backbone's templates come from the template cache
(computed once per image and flip); ``--set cache=False`` runs the backbone in the loop as the authors did.
Both modes share the same step code and give the same checkpoints.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from backbones import FrozenBackbone, ProjectionLayer, load_backbone  # noqa: E402
from losses import get_header, privacy_terms  # noqa: E402
from utils.cache import backbone_key_parts, folder_key, get_templates  # noqa: E402
from utils.callbacks import CallBackLogging, CallBackVerification  # noqa: E402
from utils.config import OVERRIDE_HELP, Config, load_config  # noqa: E402
from utils.dataset import (ImageDataset, TrainIndex, balanced_epoch, normalize_images, problem_report,  # noqa: E402,E501
                           scan_dataset)  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.evaluate import open_eval_set  # noqa: E402
from utils.logs import log_to  # noqa: E402
from utils.io import atomic_torch_save, atomic_write_text, check_writable, safe_torch_load  # noqa: E402

LOGGER_NAME = "genderprivacy"
RESUME_FILE = "resume.pth"


@dataclass
class TrainResult:
    """Where a run wrote its files and how it ended."""
    checkpoint_dir: Path
    log_dir: Path
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    single_gender_batches: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_losses: list[dict[str, float]] = field(default_factory=list)   # mean CE, P1, P2, loss per epoch
    source_seconds: float = 0.0          # preparing the templates (the one-off extraction on a cache miss)
    epoch_seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# run folders and logging
# ---------------------------------------------------------------------------------------------------------------
def _occupied(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


def choose_run_folders(cfg: Config) -> tuple[Path, Path, bool]:
    """(checkpoint folder, log folder, resuming). A new run never reuses an occupied folder: it takes the next
    free ``_2``, ``_3``... name. ``resume`` takes the latest folder of the series that holds a resume state."""
    base_ckpt, base_log = Path(cfg.output), Path(cfg.log_output)

    def named(k: int) -> tuple[Path, Path]:
        suffix = "" if k == 1 else f"_{k}"
        return base_ckpt.with_name(base_ckpt.name + suffix), base_log.with_name(base_log.name + suffix)
    k = 1
    while _occupied(named(k)[0]) or _occupied(named(k)[1]):
        k += 1
    if cfg.resume:
        for j in range(k - 1, 0, -1):
            if (named(j)[0] / RESUME_FILE).is_file():
                return named(j)[0], named(j)[1], True
        raise UserError(f"resume=True but no resumable run was found at '{base_ckpt}' (or its _2, _3... siblings): "
                        f"there is no {RESUME_FILE} in them. Start a new run with resume=False.")
    return named(k)[0], named(k)[1], False


def append_config_row(path: Path, cfg: Config, extra: dict[str, object]) -> None:
    """config.csv: one row of hyperparameters per run; the header is written once."""
    row = {**cfg.as_dict(), **extra}
    old = path.read_text() if path.is_file() else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    if not old:
        writer.writeheader()
    writer.writerow({k: str(v) for k, v in row.items()})
    atomic_write_text(path, old + buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# template sources: the cache, or the backbone in the loop
# ---------------------------------------------------------------------------------------------------------------
EpochSource = Callable[[torch.Tensor, torch.Tensor, int, int], Iterator[torch.Tensor]]


def cached_source(cfg: Config, index: TrainIndex, device: torch.device,
                  backbone_loader: Callable[[], nn.Module]) -> EpochSource:
    """Templates from the cache: the flipped or unflipped row of each sampled image, batch by batch."""
    key = folder_key(cfg, index.root, index.paths)
    cache = get_templates(cfg.cache_dir, f"train-{Path(cfg.data_dir).name}", key, index.paths, backbone_loader,
                          device, dtype=cfg.cache_dtype, batch_size=cfg.extract_batch_size,
                          num_workers=cfg.num_workers, amp=cfg.amp, channels_last=cfg.channels_last,
                          describe=lambda i: str(index.paths[i]), what=f"training images of {cfg.data_dir}")

    gather = cache.gather
    if device.type == "cuda" and 4 * cache.templates.size * 4 < torch.cuda.mem_get_info(device)[0]:
        resident = cache.to_device(device)  # the same float32 values, gathered on the GPU without host reads
        logging.getLogger(LOGGER_NAME).info("template cache held on %s (%.2f GB)", device,
                                            resident.numel() * 4 / 1e9)
        gather = lambda idx, flips: resident[idx.to(device), flips.to(device).long()]  # noqa: E731

    def epoch(indices: torch.Tensor, flips: torch.Tensor, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        for b in range(steps):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            yield gather(indices[sl], flips[sl]).to(device, non_blocking=True)
    return epoch


def in_loop_source(cfg: Config, index: TrainIndex, device: torch.device,
                   backbone_loader: Callable[[], nn.Module]) -> EpochSource:
    """Templates computed by the frozen backbone on every step (the authors' design), images decoded by
    DataLoader workers."""
    dataset = ImageDataset(index.paths)
    # the cached mode finds undecodable files during its extraction pass; here one decoding pass finds them all
    problems = []
    for idx, _, _, errors in DataLoader(dataset, batch_size=256, num_workers=cfg.num_workers):
        problems += [f"{index.paths[int(i)]}: {e}" for i, e in zip(idx, errors) if e]
    if problems:
        raise UserError(problem_report(f"the training images of {cfg.data_dir}", problems,
                                       "Replace or remove the files that do not decode, then run again."))
    backbone = FrozenBackbone(backbone_loader()).to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)

    def epoch(indices: torch.Tensor, flips: torch.Tensor, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        batches = [indices[b * batch_size:(b + 1) * batch_size].tolist() for b in range(steps)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda")
        for b, (_, x, _, errors) in enumerate(loader):
            bad = [f"{index.paths[i]}: {e}" for i, e in zip(batches[b], errors) if e]
            if bad:
                raise UserError(f"training images that do not decode: {'; '.join(bad[:10])}. Replace or remove "
                                f"them.")
            fl = flips[b * batch_size:(b + 1) * batch_size]
            x[fl] = x[fl].flip(3)
            x = normalize_images(x.to(device, non_blocking=True))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield F.normalize(backbone(x).float())
    epoch.backbone = backbone  # type: ignore[attr-defined]
    return epoch


# ---------------------------------------------------------------------------------------------------------------
# one optimisation step (the same code for both template sources)
# ---------------------------------------------------------------------------------------------------------------
def train_step(x: torch.Tensor, ids: torch.Tensor, genders: torch.Tensor, layer: nn.Module, header: nn.Module,
               identity_gender: torch.Tensor, opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
               cfg: Config, margin_rng: torch.Generator, step: int) -> tuple[dict[str, float], bool]:
    """CE + alpha*P1 + beta*P2 on templates ``x`` = normalize(backbone(image)); returns the terms and whether the
    batch held one gender only. A non-finite term stops training with the step and the term named."""
    z = F.normalize(layer(x))
    ce = F.cross_entropy(header(z, ids, margin_rng), ids)
    terms = privacy_terms(z, genders, header.kernel, identity_gender)
    loss = ce + cfg.alpha * terms.p1 + cfg.beta * terms.p2
    stacked = torch.stack([ce, terms.p1, terms.p2, loss, terms.single_gender.to(loss.dtype)]).tolist()  # one sync
    values = dict(zip(("ce", "p1", "p2", "loss"), stacked[:4]))
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: the loss term(s) {', '.join(bad)} became non-finite "
                                 f"({', '.join(f'{k}={v}' for k, v in values.items())})")
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=cfg.grad_clip)
    for opt in opts:
        opt.step()
    return values, bool(stacked[4])


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, step: int, epoch: int, layer: nn.Module, header: nn.Module,
                    opts: tuple[torch.optim.Optimizer, ...], margin_rng: torch.Generator, single_gender: int) -> Path:
    """``{step}ftn_layers.pth``, ``{step}header.pth`` (CPU tensors) and the resume state, each written atomically."""
    atomic_torch_save({k: v.detach().cpu() for k, v in layer.state_dict().items()}, folder / f"{step}ftn_layers.pth")
    atomic_torch_save({k: v.detach().cpu() for k, v in header.state_dict().items()}, folder / f"{step}header.pth")
    state = {"step": step, "epoch": epoch, "batch": 0, "layer": layer.state_dict(), "header": header.state_dict(),
             "opt_layer": opts[0].state_dict(), "opt_header": opts[1].state_dict(),
             "margin_rng": margin_rng.get_state(), "torch_rng": torch.get_rng_state(),
             "single_gender": single_gender}
    atomic_torch_save(state, folder / RESUME_FILE)
    return folder / f"{step}ftn_layers.pth"


def load_resume(folder: Path, layer, header, opts, margin_rng) -> tuple[int, int, int]:
    state = safe_torch_load(folder / RESUME_FILE, "resume state")
    try:
        layer.load_state_dict(state["layer"])
        header.load_state_dict(state["header"])
        opts[0].load_state_dict(state["opt_layer"])
        opts[1].load_state_dict(state["opt_header"])
        margin_rng.set_state(state["margin_rng"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"resume state '{folder / RESUME_FILE}' does not fit this configuration ({exc}). Resume with "
                        f"the settings of the original run (its config.csv), or start a new run.") from None
    return int(state["step"]), int(state["epoch"]), int(state["single_gender"])


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def train(cfg: Config) -> TrainResult:
    """Run one finetuning as configured; returns the folders written and the final step."""
    # 1. everything that can be checked is checked before any compute
    device = select_device(cfg.device)
    index = scan_dataset(cfg.data_dir)
    backbone_key_parts(cfg)  # the backbone weights exist
    if len(index) < cfg.batch_size:
        raise UserError(f"the training set {cfg.data_dir} has {len(index)} images, fewer than one batch (batch_size "
                        f"{cfg.batch_size}; incomplete batches are dropped); lower batch_size or add images.")
    val_paths = [Path(cfg.rec) / f"{name}.bin" for name in cfg.val_targets] if cfg.eval_step else []
    missing = [str(p) for p in val_paths if not p.is_file()]
    if missing:
        raise UserError(f"validation file(s) {', '.join(missing)} not found (config options rec, val_targets). Put "
                        f"them there, or validate nothing with --set eval_step=0.")
    ckpt_dir, log_dir, resuming = choose_run_folders(cfg)
    check_writable(ckpt_dir, "output / checkpoint_root")
    check_writable(log_dir, "log_output / log_dir")
    check_writable(cfg.cache_dir, "cache_dir")

    with log_to(log_dir / "training.log", LOGGER_NAME) as log:
        if not resuming and ckpt_dir != Path(cfg.output):
            log.info("run folder %s is already used: this run writes to %s (earlier runs are never overwritten)",
                     cfg.output, ckpt_dir)
        log.info("%s run: checkpoints -> %s, logs -> %s, device %s", "resumed" if resuming else "new", ckpt_dir,
                 log_dir, device)
        log.info("training set %s: %d images of %d identities (%d of gender 0, %d of gender 1)", cfg.data_dir,
                 len(index), index.num_identities, int((index.genders == 0).sum()), int((index.genders == 1).sum()))
        append_config_row(log_dir / "config.csv", cfg, {"run_folder": str(ckpt_dir), "resumed": resuming,
                                                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})

        def backbone_loader() -> nn.Module:
            return load_backbone(cfg.network, cfg.output_ori, cfg.embedding_size, cfg.SE)
        make_source = cached_source if cfg.cache else in_loop_source
        t_source = time.perf_counter()
        source = make_source(cfg, index, device, backbone_loader)
        t_source = time.perf_counter() - t_source
        val_sets = [open_eval_set(cfg, name, device, backbone_loader) for name in cfg.val_targets] \
            if cfg.eval_step else []

        # 2. model, header, optimisers: seeded
        torch.manual_seed(cfg.seed)
        layer = ProjectionLayer(cfg.embedding_size, cfg.embedding_size, cfg.n_hidden).to(device)
        header = get_header(cfg.loss, cfg.embedding_size, index.num_identities, cfg.s, cfg.m, cfg.sigma).to(device)
        opts = (torch.optim.Adam(layer.parameters(), lr=cfg.lr), torch.optim.Adam(header.parameters(), lr=cfg.headid_lr))
        margin_rng = torch.Generator().manual_seed(cfg.seed + 1)
        step, start_epoch, single_gender = cfg.global_step, 0, 0
        if resuming:
            step, start_epoch, single_gender = load_resume(ckpt_dir, layer, header, opts, margin_rng)
            log.info("resumed from %s at step %d (epoch %d)", ckpt_dir / RESUME_FILE, step, start_epoch)

        labels = torch.as_tensor(index.labels)
        genders = torch.as_tensor(index.genders)
        identity_gender = torch.as_tensor(index.identity_gender, device=device)
        steps_per_epoch = len(index) // cfg.batch_size
        log_cb = CallBackLogging(cfg.log_every, cfg.batch_size, log)
        val_cb = CallBackVerification(cfg.eval_step, val_sets, cfg.gender_folds, log)
        result = TrainResult(ckpt_dir, log_dir, step, source_seconds=t_source)
        layer.train()
        header.train()
        bar = tqdm(total=(cfg.num_epoch - start_epoch) * steps_per_epoch, desc="finetune", unit="step",
                   dynamic_ncols=True, disable=None, leave=False)
        tic = time.time()
        for epoch in range(start_epoch, cfg.num_epoch):
            indices, flips = balanced_epoch(index.genders, cfg.seed, epoch)
            sums = dict.fromkeys(("ce", "p1", "p2", "loss"), 0.0)
            t_epoch = time.perf_counter()
            for b, x in enumerate(source(indices, flips, steps_per_epoch, cfg.batch_size)):
                idx = indices[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                try:
                    terms, single = train_step(x, labels[idx].to(device), genders[idx].to(device), layer, header,
                                               identity_gender, opts, cfg, margin_rng, step + 1)
                except FloatingPointError as exc:
                    last = sorted(ckpt_dir.glob("*ftn_layers.pth"), key=lambda p: int(p.name.split("ftn")[0]))
                    keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
                    log.error("training stopped: %s; %s", exc, keep)
                    raise UserError(f"training stopped: {exc}; {keep}. Lower lr/headid_lr or alpha/beta, or check "
                                    f"the training data, then resume or start again.") from None
                step += 1
                single_gender += int(single)
                sums = {k: v + terms[k] for k, v in sums.items()}
                log_cb(step, epoch, terms, single_gender)
                val_cb(step, layer)
                bar.update(1)
                bar.set_postfix_str(f"CE {terms['ce']:.3f} P1 {math.degrees(terms['p1']):.1f}deg "
                                    f"P2 {terms['p2']:.3f} {bar.n * cfg.batch_size / max(time.time() - tic, 1e-9):.0f}"
                                    f" samples/s")
            result.epoch_losses.append({k: v / steps_per_epoch for k, v in sums.items()})
            result.epoch_seconds.append(time.perf_counter() - t_epoch)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.num_epoch:
                result.checkpoints.append(save_checkpoint(ckpt_dir, step, epoch + 1, layer, header, opts, margin_rng,
                                                          single_gender))
                log.info("epoch %d done: saved %s", epoch + 1, result.checkpoints[-1])
        bar.close()
        result.step, result.single_gender_batches = step, single_gender
        result.history = [{"step": s, "dataset": n, **m} for s, n, m in val_cb.history]
        log.info("finished at step %d; %d single-gender batches in this run's log", step, single_gender)
    return result


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
        print(f"checkpoints: {result.checkpoint_dir}\nlogs: {result.log_dir}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
