"""Measure this project's speed against the authors' design, side by side on this machine, in one run.

    python bench/run.py [--quick] [--out bench_results] [--device auto]

1. finetune end to end: template-cache training vs backbone-in-the-loop training (same synthetic 112x112 images,
   iresnet50, settings); a few epochs measured, projected to the paper's 100 epochs as set-up + first epoch +
   99 x the later epochs' mean (the first epoch carries one-off costs). Target >= 40x.
2. evaluation sweep, 10 checkpoints x 2 sets: cached templates vs running the backbone for every checkpoint.
   Target >= 5x. (The authors' design is timed on some of the checkpoints and scaled to 10: each costs the same.)
   And a sweep's evaluations (10 checkpoints x 2 sets, cached random templates of a realistic size) on all cores
   against n_jobs=1. Target >= 1.5x on 2 cores, identical metrics.
3. extraction throughput (decoding included) vs the raw forward throughput on tensors in memory. Target >= 90%.
4. gender-leakage evaluation with our settings vs probability=True, BACC compared. Target >= 3x, identical BACC;
   and the cost of every registered attacker next to the paper's three (no target).
5. peak RSS of a few hundred training steps on a memory-mapped cache of 1,000,000 templates. Target < 3 GB.
6. face alignment (tools/align_faces.py, dlib): images/s with one worker per core against one worker on the same
   250x250 photographs, and the cost per image against decoding alone. Target >= 1.7x on 2 cores. Skipped (and
   said) when requirements-align.txt or scikit-image is not installed.
Writes results.csv and results.md to --out and prints the table. Targets missed are reported, not hidden.
"""
from __future__ import annotations
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.svm import SVC

from pipeline import train as finetune
from backbones import FinetunedModel, ProjectionLayer, iresnet50, load_backbone
from backbones.spec import BackboneSpec
from eval.attackers import ALL, ATTACKERS, expand_attackers, register_attacker
from eval.evalset import EvalTemplates, evaluate_set, open_eval_set
from pipeline.sweep import evaluate_all
from eval.gender_leakage import gender_leakage, leakage_report
from eval.verification import evaluate_verification
from facedata.bin_builder import build_bin
from facedata.binfile import load_bin
from templates.cache import TemplateCache
from templates.entry import EntryWriter, write_entry
from templates.extraction import ExtractionSettings
from config.loading import load_config
from facedata.dataset import decode_image, scan_dataset, to_tensor
from utils.device import decode_workers, select_device

SIZES = {  # "gpu" is used instead of "full" on CUDA: the CPU sizes leave a GPU idle behind fixed costs
    "full": {"align": 400, "train_ids": 128, "imgs": 4, "epochs": 2, "test_ids": 24, "test_imgs": 4, "pairs": 60,
             "gender": 48, "authors_ckpts": 2, "leak_n": 3000, "sweep_gender": 3000, "rss_n": 1_000_000,
             "rss_steps": 300, "batch": 32},
    "quick": {"align": 96, "train_ids": 16, "imgs": 4, "epochs": 1, "test_ids": 12, "test_imgs": 3, "pairs": 20,
              "gender": 24, "authors_ckpts": 1, "leak_n": 1200, "sweep_gender": 400, "rss_n": 1_000_000,
              "rss_steps": 100, "batch": 32},
    "gpu": {"align": 400, "train_ids": 1024, "imgs": 8, "epochs": 2, "test_ids": 400, "test_imgs": 6, "pairs": 3000,
            "gender": 1000, "authors_ckpts": 3, "leak_n": 3000, "sweep_gender": 1000, "rss_n": 1_000_000,
            "rss_steps": 300, "batch": 128},
}
WORKERS = decode_workers(-1)   # the default rule: the cores less one, 2 to 8


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_images(root: Path, n_ids: int, per_id: int, rng: np.random.Generator) -> None:
    """Random-texture 112x112 PNG faces in subjectid_gender folders."""
    for k in range(n_ids):
        folder = root / f"{k:04d}_{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        for j in range(per_id):
            noise = rng.integers(-20, 21, base.shape)
            cv2.imwrite(str(folder / f"{j}.png"), np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


class EpochTimer:
    """A training callback that records when each epoch starts and ends (timing stays in the benchmark)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.starts.append(time.perf_counter())

    def on_epoch_end(self, epoch: int) -> None:
        self.ends.append(time.perf_counter())

    @property
    def set_up_seconds(self) -> float:   # run folders, the one-off extraction on a cache miss
        return self.starts[0] - self.t0

    @property
    def epoch_seconds(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends)]


def bench_finetune(work: Path, size: dict, device: str) -> dict:
    overrides = ["network=iresnet50", f"output_ori={work / 'r50.pth'}", f"data_dir={work / 'train'}",
                 f"checkpoint_root={work / 'ckpt'}", f"log_dir={work / 'logs'}", f"cache_dir={work / 'cache'}",
                 f"batch_size={size['batch']}", f"num_epoch={size['epochs']}", "eval_step=0", "log_every=1000",
                 f"num_workers={WORKERS}", f"device={device}", f"extract_batch_size={size['batch']}"]
    cached, loop = EpochTimer(), EpochTimer()
    finetune.train(load_config(None, overrides + ["cache=True", "pretrained=cached"]), callbacks=[cached])
    finetune.train(load_config(None, overrides + ["cache=False", "pretrained=loop"]), callbacks=[loop])

    def steady(t: EpochTimer) -> float:  # epochs after the first, which carries one-off costs (kernel set-up)
        return float(np.mean(t.epoch_seconds[1:] or t.epoch_seconds))

    def projected(t: EpochTimer) -> float:
        return t.set_up_seconds + t.epoch_seconds[0] + 99 * steady(t)
    return {"extract_s": cached.set_up_seconds, "epoch_cache_s": steady(cached), "epoch_loop_s": steady(loop),
            "measured_cache_s": cached.set_up_seconds + sum(cached.epoch_seconds),
            "measured_loop_s": loop.set_up_seconds + sum(loop.epoch_seconds),
            "proj_cache_s": projected(cached), "proj_loop_s": projected(loop), "epochs": size["epochs"]}


def bench_extraction_vs_raw(work: Path, n_images: int, device: torch.device, batch: int) -> dict:
    """The extraction loop's forwards/s (decoding included) vs raw forwards/s at the same batch size on tensors
    already in memory; both after a first batch that carries the one-off set-up. The loop is timed from the moments
    each batch's rows reach the host (nothing added to it: on CUDA it keeps a batch in flight)."""
    stamps: list[tuple[float, int]] = []
    cache = TemplateCache(work / "extraction_timing", BackboneSpec("iresnet50", work / "r50.pth"),
                          ExtractionSettings(device, batch_size=batch, num_workers=WORKERS))
    cache.get("timing", "bench", scan_dataset(work / "train").paths,
              on_batch=lambda done, s=stamps: s.append((time.perf_counter(), done)))
    net = load_backbone("iresnet50", work / "r50.pth").to(device).eval()
    (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
    extraction = 2 * (n_last - n_first) / (t_last - t_first)    # forwards: each image and its flip
    x = torch.randn(batch, 3, 112, 112, device=device)
    with torch.inference_mode():
        net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = max(4, min(16, n_images * 2 // batch))
        for _ in range(reps):
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        raw = reps * batch / (time.perf_counter() - t0)
    return {"extraction_ips": extraction, "raw_ips": raw}


def bench_shared_extraction(work: Path, size: dict, device: torch.device) -> tuple | None:
    """finetune.py's template extraction (bench/shared_extraction.py) on N torchrun processes against one process,
    the same images, backbone and machine, one run: N = the GPUs (at least 2), or 2 on the CPU (each process then
    gets its share of the cores as threads). None with a single GPU."""
    procs = torch.cuda.device_count() if device.type == "cuda" else 2
    if procs < 2:
        return None
    cores = os.cpu_count() or 2
    base = ["network=iresnet50", f"output_ori={work / 'r50.pth'}", f"data_dir={work / 'train'}", "eval_step=0",
            f"checkpoint_root={work / 'shared_ckpt'}", f"log_dir={work / 'shared_logs'}", f"device={device.type}",
            f"extract_batch_size={size['batch']}", f"batch_size={size['batch']}"]
    rates = {}
    for n in (1, procs):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] \
            if n > 1 else [sys.executable]
        run = subprocess.run([*launcher, str(Path(__file__).resolve().parent / "shared_extraction.py"), *base,
                              f"cache_dir={work / f'shared_cache_{n}'}"], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))})
        if run.returncode:
            raise RuntimeError(f"bench/shared_extraction.py on {n} process(es) failed:\n{run.stderr[-3000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        rates[n] = result["images"] / result["seconds"]
    return (f"sharded extraction, {procs} processes (img/s)", rates[procs], rates[1], None,
            f"images/s of finetune.py's extraction (bench/shared_extraction.py: start-up, decoding, both forwards, "
            f"the row store and the entry's assembly) under torchrun --nproc_per_node={procs} against one process; "
            f"{size['train_ids'] * size['imgs']} images, iresnet50, batch {size['batch']}, "
            f"{'one GPU each' if device.type == 'cuda' else f'{max(1, cores // procs)} thread(s) each vs {cores}'}")


def bench_sweep(work: Path, size: dict, device: torch.device) -> dict:
    """10 checkpoints x 2 .bin files: cached templates vs the backbone run for every checkpoint."""
    rng = np.random.default_rng(1)
    for name in ("set_a", "set_b"):
        write_images(work / "test" / name, size["test_ids"], size["test_imgs"], rng)
        build_bin(work / "test" / name, work / "rec" / f"{name}.bin", n_pairs=size["pairs"], n_gender=size["gender"])
    torch.manual_seed(0)
    layers = [ProjectionLayer() for _ in range(10)]
    cfg = load_config(None, ["network=iresnet50", f"output_ori={work / 'r50.pth'}", f"rec={work / 'rec'}",
                             f"cache_dir={work / 'sweep_cache'}", f"num_workers={WORKERS}",
                             f"extract_batch_size={size['batch']}"])
    t0 = time.perf_counter()
    cache = TemplateCache.from_config(cfg, device)
    sets = [open_eval_set(cache, cfg.rec, n) for n in ("set_a", "set_b")]
    for layer in layers:
        for ev in sets:
            evaluate_set(ev, layer)
    ours = time.perf_counter() - t0
    # the authors' design: images decoded once per set, the finetuned model (backbone included) run per checkpoint
    backbone = load_backbone("iresnet50", cfg.output_ori).to(device)
    decoded = {}
    for name in ("set_a", "set_b"):
        es = load_bin(work / "rec" / f"{name}.bin")
        decoded[name] = (es, torch.stack([to_tensor(decode_image(d)[0]) for d in es.pair_images]),
                         torch.stack([to_tensor(decode_image(d)[0]) for d in es.gender_images]))
    n = size["authors_ckpts"]
    t0 = time.perf_counter()
    for layer in layers[:n]:
        model = FinetunedModel(backbone, layer.to(device)).eval()
        for es, pairs, gender in decoded.values():
            with torch.inference_mode():
                bs = size["batch"]
                ver = torch.cat([model(b.to(device)) + model(b.flip(3).to(device)) for b in pairs.split(bs)])
                gen = torch.cat([model(b.to(device)) for b in gender.split(bs)])
            evaluate_verification(ver.double().cpu().numpy(), es.issame)
            gender_leakage(gen.double().cpu().numpy(), es.gender_labels, es.id_labels)
    authors = (time.perf_counter() - t0) * 10 / n
    return {"ours_s": ours, "authors_s": authors, "authors_measured": n}


def synthetic_eval_set(folder: Path, name: str, pairs: int, gender: int, seed: int) -> EvalTemplates:
    """An evaluation set of random templates with a gender signal, written as a cache entry (no backbone pass)."""
    rng = np.random.default_rng(seed)
    n_ids = gender // 4
    ids = np.repeat(np.arange(n_ids), 4)
    genders = ids % 2
    n = 2 * pairs + gender
    raw = rng.normal(size=(n, 2, 512)).astype(np.float32)
    raw[2 * pairs:] += 0.08 * genders[:, None, None] * rng.normal(size=512).astype(np.float32)
    norms = np.linalg.norm(raw, axis=2)
    entry = write_entry(folder, raw / norms[:, :, None], norms)
    return EvalTemplates(name, entry, rng.integers(0, 2, pairs).astype(bool), ids, genders)


def bench_parallel_sweep(work: Path, device: torch.device, gender: int) -> tuple:
    """The sweep's evaluations, 10 checkpoints x 2 sets of cached templates with ``gender`` gender images each,
    with n_jobs=1 against all cores (n_jobs=-1, at least 2 workers), the metrics compared for equality."""
    sets = [synthetic_eval_set(work / f"parallel_{k}", f"set_{k}", 600, gender, k) for k in range(2)]
    torch.manual_seed(0)
    layers = [ProjectionLayer().eval() for _ in range(10)]
    tasks = [(lambda layer=layer: layer, ev) for layer in layers for ev in sets]
    jobs = max(2, os.cpu_count() or 1)
    seconds, results = {}, {}
    for n_jobs in (1, jobs):
        t0 = time.perf_counter()
        results[n_jobs] = [r.metrics for r in evaluate_all(tasks, 3, ("LogReg", "SVM", "RBF"), 0, 0, n_jobs, device)]
        seconds[n_jobs] = time.perf_counter() - t0
    return (f"sweep evaluations, {jobs} jobs vs 1", seconds[jobs], seconds[1], 1.5,
            f"10 checkpoints x 2 sets of 600 pairs + {gender} gender templates (random, cached), the paper's 3 "
            f"attackers; n_jobs={jobs} (whole command, worker start included) against n_jobs=1; metrics identical: "
            f"{results[1] == results[jobs]}")


def multiply_adds(net: torch.nn.Module, size: tuple[int, int] = (112, 112)) -> int:
    """Multiply-adds of one image through ``net``'s convolutions and linear layers (the rest, BatchNorm, PReLU and
    the additions of the residuals, is a few percent and not counted), counted once with forward hooks."""
    total = [0]

    def count(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, torch.nn.Conv2d):
            total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total[0] += out.numel() * mod.in_features
    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                        torch.nn.Linear))]
    try:
        with torch.inference_mode():
            net.eval()(torch.zeros(1, 3, *size))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def mm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """The processor's practical peak in FLOP/s for ``dtype``: a large square torch.mm on the threads torch uses,
    the best of ``reps`` (a multiply-add counts as 2 FLOP). On a shared machine one short measurement can fall in
    a busy moment: bench_bf16 takes the best over its rounds."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def bench_bf16(work: Path, device: torch.device, batch: int, n_images: int, rounds: int = 2) -> list[tuple]:
    """amp=bf16 against float32 on the same images and batch (both channels_last): the extraction's images/s
    (decoding included, after the first batch), and on the CPU each dtype's raw forward rate as a share of the
    processor's practical peak (mm_peak). Alternated rounds, the best of each: the machine may be shared. [] where
    bf16 cannot run (the reason is printed)."""
    from utils.device import autocast_dtype
    from utils.errors import UserError
    try:
        autocast_dtype(device, "bf16")
    except UserError as e:
        print(f"bf16 rows not measured: {e}", file=sys.stderr)
        return []
    items = scan_dataset(work / "train").paths[:min(n_images, 4 * batch)]   # 4 batches: a short run
    net = load_backbone("iresnet50", work / "r50.pth").to(device).eval().to(memory_format=torch.channels_last)
    macs = multiply_adds(load_backbone("iresnet50", work / "r50.pth"))
    x = torch.randn(batch, 3, 112, 112, device=device).contiguous(memory_format=torch.channels_last)
    extraction: dict[str, float] = {}
    raw: dict[str, float] = {}
    peak = {"none": 0.0, "bf16": 0.0}
    for r in range(rounds):
        for amp in ("none", "bf16"):
            stamps: list[tuple[float, int]] = []
            cache = TemplateCache(work / f"bf16_timing_{amp}_{r}", BackboneSpec("iresnet50", work / "r50.pth"),
                                  ExtractionSettings(device, batch_size=batch, num_workers=WORKERS, amp=amp,
                                                     channels_last=True))
            cache.get("timing", "bench", items, on_batch=lambda done, s=stamps: s.append((time.perf_counter(), done)))
            (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
            extraction[amp] = max(extraction.get(amp, 0.0), (n_last - n_first) / (t_last - t_first))
            dtype = torch.bfloat16 if amp == "bf16" else torch.float32
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp == "bf16"):
                net(x)
                t0 = time.perf_counter()
                for _ in range(2):
                    net(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                raw[amp] = max(raw.get(amp, 0.0), 2 * batch / (time.perf_counter() - t0))
            if device.type == "cpu":   # the peak beside each forward's timing, in the same moment of the machine
                peak[amp] = max(peak[amp], mm_peak(torch.bfloat16 if amp == "bf16" else torch.float32))
    rows = [("bf16 extraction vs float32 (img/s)", extraction["bf16"], extraction["none"], 2.0,
             f"finetune.py's extraction (decoding, image and flip, the row store), images/s after the first batch; "
             f"{len(items)} images, iresnet50, batch {batch}, channels_last on both sides; best of {rounds} "
             f"alternated rounds")]
    if device.type != "cpu":   # the peak is measured on the CPU (not written for a GPU, where none was at hand)
        return rows
    for amp, name in (("none", "float32"), ("bf16", "bf16")):
        achieved = 2 * macs * raw[amp]
        rows.append((f"arithmetic rate, {name} forward (GFLOP/s)", achieved / 1e9, peak[amp] / 1e9, 0,
                     f"iresnet50's {macs / 1e9:.2f} G multiply-adds per image (convolutions and linear layers, "
                     f"counted once with forward hooks) x {raw[amp]:.1f} images/s of the raw forward (batch {batch}, "
                     f"channels_last), against a 2048x2048 torch.mm in {name} on the same {torch.get_num_threads()} "
                     f"threads, the best of 10 in each round (the practical peak)"))
    return rows


def bench_alignment(work: Path, n_images: int) -> tuple | None:
    """tools/align_faces.py's work (dlib detection, warp, JPEG writing) on ``n_images`` LFW-sized photographs made of
    scikit-image's astronaut (moved, scaled, turned), one worker per core against one worker; and decoding alone.
    Large photographs (CelebA's largest, 1200x1805): the command's speed, and the search on the shrunk copy against
    the same search at full resolution (time per image, landmarks compared)."""
    from facedata.align.detectors import DetectorSpec, build_detector, dlib68
    from facedata.align.run import LANDMARKS_NAME, default_workers, read_journal
    try:
        from skimage.data import astronaut
    except ImportError:
        return None
    if not dlib68.available():
        return None
    face = np.ascontiguousarray(astronaut()[20:240, 110:330, ::-1])
    rng = np.random.default_rng(0)
    src = work / "align_src"
    for i in range(n_images):
        m = cv2.getRotationMatrix2D((110, 110), rng.uniform(-10, 10), rng.uniform(0.75, 0.95))
        m[:, 2] += rng.uniform(5, 35, 2)
        path = src / f"Person_{i // 4:03d}" / f"Person_{i // 4:03d}_{i % 4 + 1:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.warpAffine(face, m, (250, 250), borderMode=cv2.BORDER_REFLECT))
    files = sorted(src.rglob("*.jpg"))
    t0 = time.perf_counter()
    for path in files:
        cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    decode_s = (time.perf_counter() - t0) / len(files)
    workers = max(2, default_workers())
    script = str(Path(__file__).resolve().parent.parent / "tools" / "align_faces.py")
    seconds, aligned = {}, {}
    for n in (1, workers):   # the command line as a user runs it (its workers import the light CLI, not this file)
        out = work / f"align_out_{n}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, script, str(src), str(out), "--detector", "dlib", "--workers", str(n)],
                       check=True, capture_output=True)
        seconds[n] = time.perf_counter() - t0
        aligned[n] = sum(1 for r in read_journal(out / LANDMARKS_NAME).values() if r.status == "aligned")
    per_image = seconds[1] / len(files)
    # large photographs: the astronaut's face at about 500 px in a 1200x1805 frame
    whole = np.ascontiguousarray(astronaut()[:, :, ::-1])
    large_src, large = work / "align_large", []
    for i in range(max(4, n_images // 8)):
        m = cv2.getRotationMatrix2D((256, 256), rng.uniform(-10, 10), rng.uniform(2.0, 2.4))
        m[:, 2] += [600 - 256 + rng.uniform(-80, 80), 900 - 256 + rng.uniform(-120, 120)]
        large.append(cv2.warpAffine(whole, m, (1200, 1805), borderMode=cv2.BORDER_REFLECT))
        path = large_src / "Large" / f"Large_{i + 1:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), large[-1])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, script, str(large_src), str(work / "align_large_out"), "--detector", "dlib",
                    "--workers", str(workers)], check=True, capture_output=True)
    large_cmd = time.perf_counter() - t0
    large_aligned = sum(1 for r in read_journal(work / "align_large_out" / LANDMARKS_NAME).values()
                        if r.status == "aligned")
    detector = build_detector(DetectorSpec("dlib"))
    detector.faces(large[0], "warm-up")   # loads the models
    search, points = {}, {}
    for side in (dlib68.DETECT_SIDE, 10 ** 6):   # shrunk copy (the tool) against full resolution
        saved, dlib68.DETECT_SIDE = dlib68.DETECT_SIDE, side
        try:
            t0 = time.perf_counter()
            points[side] = [detector.faces(image, "large") for image in large]
            search[side] = (time.perf_counter() - t0) / len(large)
        finally:
            dlib68.DETECT_SIDE = saved
    pairs = [(a[0].points, b[0].points) for a, b in zip(points[dlib68.DETECT_SIDE], points[10 ** 6]) if a and b]
    gap = max((float(np.abs(a - b).max()) for a, b in pairs), default=float("nan"))
    return (f"face alignment, {workers} workers vs 1", seconds[workers], seconds[1], 1.7,
            f"{len(files)} photos 250x250, dlib 68-point, JPEG out: {len(files) / seconds[workers]:.0f} vs "
            f"{len(files) / seconds[1]:.0f} images/s (whole command, worker start included), {aligned[1]} and "
            f"{aligned[workers]} aligned; one worker: {per_image * 1000:.1f} ms per image = "
            f"{per_image / decode_s:.0f}x decoding alone ({decode_s * 1000:.2f} ms); large photos 1200x1805: "
            f"{len(large) / large_cmd:.1f} images/s with {workers} workers ({large_aligned} of {len(large)} aligned), "
            f"search on a {dlib68.DETECT_SIDE} px copy {search[dlib68.DETECT_SIDE] * 1000:.0f} ms against "
            f"{search[10 ** 6] * 1000:.0f} ms at full resolution per image, landmarks within {gap:.1f} px "
            f"({len(pairs)} faces found by both)")


def bench_leakage(size: dict) -> dict:
    rng = np.random.default_rng(0)
    n = size["leak_n"]
    ids = np.repeat(np.arange(n // 4), 4)
    genders = ids % 2
    x = rng.normal(size=(n, 512)) + 0.08 * genders[:, None] * rng.normal(size=512)[None]
    t0 = time.perf_counter()
    ours = gender_leakage(x, genders, ids)
    t_ours = time.perf_counter() - t0
    # the authors' classifiers: the SVMs with probability=True (same predictions, slower fit)
    register_attacker("SVM-authors")(lambda ctx: SVC(kernel="linear", probability=True))
    register_attacker("RBF-authors")(lambda ctx: SVC(kernel="rbf", probability=True))
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn >= 1.9 deprecates probability=True
            theirs = gender_leakage(x, genders, ids, attackers=("LogReg", "SVM-authors", "RBF-authors"))
    finally:   # the benchmark's own entries are not attackers of the suite ("all" must not run them)
        ATTACKERS.pop("SVM-authors"), ATTACKERS.pop("RBF-authors")
    t_theirs = time.perf_counter() - t0
    identical = [ours[k] for k in ("LogReg", "SVM", "RBF")] == [theirs[k] for k in ("LogReg", "SVM-authors",
                                                                                  "RBF-authors")]
    return {"ours_s": t_ours, "authors_s": t_theirs, "identical": identical, "bacc": ours["AVG"], "n": n}


def bench_attackers(size: dict) -> tuple:
    """Cost of every registered attacker next to the paper's three, one sequential run each on the leakage
    benchmark's templates: what turning on attackers=['all'] adds to a sweep (no target; the row reports it)."""
    rng = np.random.default_rng(0)
    n = size["leak_n"]
    ids = np.repeat(np.arange(n // 4), 4)
    genders = ids % 2
    x = rng.normal(size=(n, 512)) + 0.08 * genders[:, None] * rng.normal(size=512)[None]
    every = expand_attackers([ALL])
    t0 = time.perf_counter()
    paper = gender_leakage(x, genders, ids)
    t_paper = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = leakage_report(x, genders, ids, attackers=every, n_bootstrap=0)
    t_all = time.perf_counter() - t0
    return (f"gender leakage, paper's 3 vs all {len(every)} attackers", t_paper, t_all, 0,
            f"{n} templates, 1 worker; the second time column is all attackers ({', '.join(every)}), ratio = its "
            f"cost over the paper's three; BACC AVG {paper['AVG']:.3f}, worst case {res.worst_attacker} "
            f"{res.worst_bacc:.3f}")


LFW_IMAGES, LFW_IDENTITIES = 13_000, 5_700          # the folder protocol's leakage test on LFW (13,233 / 5,749)
FOLDER_LEAK_N = {"quick": 1_200, "full": 3_000, "gpu": LFW_IMAGES}   # measured; smaller sizes are extrapolated
PAPER_SWEEPS = 10 * 4 * 126                          # checkpoints x evaluation sets x experiments of the paper plan


def lfw_like_templates(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n random unit templates of 512 with LFW's shape (n x 5,700/13,000 identities, most with one image, a few with
    many; 23% women) and a weak gender direction (BACC 0.63 at 3,000, 0.79 at 13,000: as after a privacy layer,
    where most templates become support vectors and the SVMs are slowest)."""
    rng = np.random.default_rng(seed)
    n_ids = max(6, round(n * LFW_IDENTITIES / LFW_IMAGES))
    ids = np.concatenate([np.arange(n_ids), rng.integers(0, max(1, n_ids // 8), n - n_ids)])
    women = (rng.random(n_ids) < 0.23).astype(np.int64)
    direction = rng.normal(size=512) / np.sqrt(512)
    x = rng.normal(size=(n_ids, 512))[ids] + 0.7 * rng.normal(size=(n, 512)) + 3.0 * women[ids, None] * direction
    return x / np.linalg.norm(x, axis=1, keepdims=True), women[ids], ids


def _paper_era_leakage(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[dict[str, list], float]:
    """The authors' paper-era fit (SVMs with probability=True), timed; per classifier its test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    models = {"LogReg": lambda: LogisticRegression(), "SVM": lambda: SVC(kernel="linear", probability=True),
              "RBF": lambda: SVC(kernel="rbf", probability=True)}
    preds: dict[str, list] = {k: [] for k in models}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # probability=True is deprecated from scikit-learn 1.9; lbfgs may warn
        for train, test in StratifiedGroupKFold(n_splits=3, shuffle=False).split(x, y, groups):
            for k, make in models.items():
                preds[k].append(make().fit(x[train], y[train]).predict(x[test]))
    return preds, time.perf_counter() - t0


def bench_folder_leakage(mode: str) -> tuple:
    """Issue 31 item 4: the folder protocol's leakage test at LFW's size, our fit against the authors' paper-era one
    (same folds and classifiers, their SVMs with probability=True), one worker, per (checkpoint, set); measured at n
    and n/2 and extrapolated to 13,000 templates by the measured growth when n is smaller; then what the paper
    plan's 10 checkpoints x 4 sets x 126 experiments cost on 2 and on 16 cores (one (checkpoint, set) per core)."""
    n = FOLDER_LEAK_N[mode]
    times: dict[int, tuple[float, float]] = {}
    identical = True
    for size in sorted({n // 2, n}):
        x, y, groups = lfw_like_templates(size)
        t0 = time.perf_counter()
        res = leakage_report(x, y, groups, n_bootstrap=0)
        ours = time.perf_counter() - t0
        preds, theirs = _paper_era_leakage(x, y, groups)
        for k, folds in preds.items():   # the same predictions, template by template, fold by fold
            identical &= np.array_equal(np.concatenate(folds), np.concatenate(
                [res.predictions[k][res.fold == f] for f in range(3)]))
        times[size] = (ours, theirs)
    (o1, a1), (o2, a2) = times[n // 2], times[n]
    grow_o, grow_a = np.log2(o2 / o1), np.log2(a2 / a1)
    ours_13k = o2 * (LFW_IMAGES / n) ** grow_o
    theirs_13k = a2 * (LFW_IMAGES / n) ** grow_a
    how = "measured" if n == LFW_IMAGES else f"extrapolated from {n} (n^{grow_o:.2f} ours, n^{grow_a:.2f} theirs)"

    def total(sec: float, cores: int) -> str:
        return f"{PAPER_SWEEPS * sec / cores / 3600:.0f} h"
    return (f"folder-protocol leakage, LFW-sized, per checkpoint and set ({how})", ours_13k, theirs_13k, 3,
            f"{LFW_IMAGES} templates of 512, {LFW_IDENTITIES} identities, BACC AVG {res.bacc['AVG']:.2f}; at {n}: "
            f"ours {o2:.1f}s, theirs {a2:.1f}s; {PAPER_SWEEPS} (checkpoint, set) of the paper plan: ours "
            f"{total(ours_13k, 2)} on 2 cores, {total(ours_13k, 16)} on 16; theirs {total(theirs_13k, 2)} and "
            f"{total(theirs_13k, 16)}; predictions identical: {identical}")


RSS_SCRIPT = """
import sys, time, numpy as np, torch
from pathlib import Path
from templates.entry import open_entry
from facedata.dataset import balanced_epoch
from backbones import ProjectionLayer
from privacy.angular import AngularObjective
from privacy.layer_training import train_step
from config.loading import load_config
cfg = load_config()
entry = open_entry(Path({folder!r}))
n = len(entry)
n_ids = 10000
labels = torch.as_tensor(np.arange(n) % n_ids)
genders = torch.as_tensor((np.arange(n) % n_ids) % 2)
identity_gender = torch.as_tensor(np.arange(n_ids) % 2)
torch.manual_seed(0)
layer = ProjectionLayer()
objective = AngularObjective(cfg, n_ids, identity_gender)
opts = (torch.optim.Adam(layer.parameters(), lr=0.01), torch.optim.Adam(objective.parameters(), lr=0.01))
idx, flips = balanced_epoch(genders.numpy(), 0, 0)
t0 = time.perf_counter()
for s in range({steps}):
    sl = slice(s * 128, (s + 1) * 128)
    x = entry.gather(idx[sl], flips[sl])
    train_step(x, labels[idx[sl]], genders[idx[sl]], layer, objective, opts, cfg.grad_clip, torch.Generator())
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(int(hwm) * 1024, time.perf_counter() - t0)
"""


def bench_rss(work: Path, size: dict) -> dict:
    """Write a (n, 2, 512) float32 cache in chunks, then train on it in a fresh process and read its peak RSS."""
    n = size["rss_n"]
    folder = work / "rss_cache"
    writer = EntryWriter(folder, n, 512, "float32")
    rng = np.random.default_rng(0)
    for i in range(0, n, 50_000):
        chunk = rng.standard_normal((min(50_000, n - i), 2, 512), dtype=np.float32)
        writer.templates[i:i + len(chunk)] = chunk / np.linalg.norm(chunk, axis=2, keepdims=True)
        writer.norms[i:i + len(chunk)] = 1.0
    writer.finish()
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(folder=str(folder),
                                                                    steps=size["rss_steps"])],
                         capture_output=True, text=True, check=True)
    peak, secs = out.stdout.split()
    for f in folder.iterdir():  # this run's own scratch file (4 GB)
        f.unlink()
    folder.rmdir()
    return {"peak_rss_gb": int(peak) / 1e9, "n": n, "steps": size["rss_steps"], "cache_gb": n * 2 * 512 * 4 / 1e9,
            "seconds": float(secs)}


def bench_step(device: torch.device | str, batch: int = 128, n: int = 10_000, n_ids: int = 2_000, epochs: int = 6,
               rounds: int = 2) -> tuple:
    """ms per step of the cached training step: the real loop (train_layer, the paper's angular objective) on a cache
    entry of ``n`` random templates x 512 of ``n_ids`` identities (held on the GPU on CUDA, read with positioned
    reads from the page cache on the CPU), against the same loop fetching the loss terms to the host at every step
    (log_every=1), as the previous design did. Epochs after the first; the best of ``rounds`` alternated runs."""
    import logging
    from privacy import FitContext, get_method
    from facedata.dataset import TrainIndex
    device = torch.device(device)
    log = logging.getLogger("bench.step")
    log.disabled = True
    with tempfile.TemporaryDirectory(prefix="gp-step-") as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        ids = np.arange(n) % n_ids
        raw = rng.standard_normal((n, 2, 512), dtype=np.float32)
        entry = write_entry(work / "cache", raw / np.linalg.norm(raw, axis=2, keepdims=True))
        index = TrainIndex(work, [work / f"{i}.png" for i in range(n)], ids, ids % 2, np.arange(n_ids) % 2)
        best: dict[int, float] = {}
        for r in range(rounds):
            for log_every in (1000, 1):
                cfg = load_config(None, ["method=angular", f"batch_size={batch}", f"num_epoch={epochs}",
                                         f"checkpoint_every={epochs}", "eval_step=0", f"log_every={log_every}"])
                ckpt = work / f"ckpt_{r}_{log_every}"
                ckpt.mkdir()
                timer = EpochTimer()
                get_method("angular")(cfg).fit(FitContext(cfg, index, entry, device, ckpt, False, log,
                                                          callbacks=[timer]))
                ms = 1000 * float(np.mean(timer.epoch_seconds[1:])) / (n // batch)
                best[log_every] = min(best.get(log_every, ms), ms)
    return (f"cached train step, batch {batch} (ms)", best[1000], best[1], 1.0,
            f"ms per step (the time columns are ms), the real loop with the angular objective on {n:,} templates x "
            f"512 of {n_ids:,} identities, {'held on the GPU' if device.type == 'cuda' else 'read from the page cache'}"
            f"; second column: the same loop reading the loss terms on the host at every step (log_every=1, the "
            f"previous design's per-step wait); epochs 2-{epochs}, best of {rounds} alternated runs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (about 2 minutes on 2 cores)")
    parser.add_argument("--out", default="bench_results", help="folder for results.csv and results.md")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--only", choices=("bf16",), default=None,
                        help="only these rows, a short run (e.g. on a shared machine): bf16 = the bf16 and arithmetic-"
                             "rate rows")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    mode = "quick" if args.quick else ("gpu" if device.type == "cuda" else "full")
    size = SIZES[mode]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gp-bench-") as tmp:
        work = Path(tmp)
        write_images(work / "train", size["train_ids"], size["imgs"], np.random.default_rng(0))
        torch.manual_seed(0)
        torch.save(iresnet50().state_dict(), work / "r50.pth")
        n_train = size["train_ids"] * size["imgs"]
        import logging
        logging.disable(logging.INFO)

        rows += bench_bf16(work, device, size["batch"], n_train)   # first: --only bf16 stops after these
        if args.only is None:
            fin = bench_finetune(work, size, str(device))
            rows.append(("finetune, 100 epochs (projected)", fin["proj_cache_s"], fin["proj_loop_s"], 40,
                         f"{n_train} images, iresnet50, batch {size['batch']}; measured {fin['epochs']} epoch(s): "
                         f"cache {fin['measured_cache_s']:.1f}s (extraction {fin['extract_s']:.1f}s, later epochs "
                         f"{fin['epoch_cache_s']:.3f}s)"
                         f", in the loop {fin['measured_loop_s']:.1f}s (later epochs {fin['epoch_loop_s']:.1f}s)"))
            ext = bench_extraction_vs_raw(work, n_train, device, size["batch"])
            rows.append(("extraction throughput (img/s)", ext["extraction_ips"], ext["raw_ips"], 0.9,
                         f"forwards/s after the first batch: extraction loop with decoding (images and flips) vs raw "
                         f"forward on "
                         f"in-memory tensors, batch {size['batch']}"))
            sw = bench_sweep(work, size, device)
            rows.append(("eval sweep, 10 ckpts x 2 sets", sw["ours_s"], sw["authors_s"], 5,
                         f"{size['pairs']} pairs + {size['gender']} gender images per set; authors' design timed on "
                         f"{sw['authors_measured']} checkpoint(s) x 2 sets and scaled to 10"))
            rows.append(bench_parallel_sweep(work, device, size["sweep_gender"]))
            lk = bench_leakage(size)
            rows.append(("gender leakage (3 classifiers)", lk["ours_s"], lk["authors_s"], 3,
                         f"{lk['n']} templates; BACC identical: {lk['identical']}"))
            rows.append(bench_attackers(size))
            rows.append(bench_folder_leakage(mode))
            rss = bench_rss(work, size)
            rows.append(("peak RSS, mmap cache (GB)", rss["peak_rss_gb"], rss["cache_gb"], 3.0,
                         f"{rss['n']:,} templates ({rss['cache_gb']:.1f} GB file), {rss['steps']} steps of batch 128 "
                         f"in "
                         f"{rss['seconds']:.1f}s"))
            rows.append(bench_step(device))
            shared = bench_shared_extraction(work, size, device)
            if shared is not None:
                rows.append(shared)
            alignment = bench_alignment(work, size["align"])
            if alignment is None:
                print("face alignment not measured: pip install -r requirements-align.txt scikit-image",
                      file=sys.stderr)
            else:
                rows.append(alignment)
    table = []
    for what, ours, theirs, target, note in rows:
        if what.startswith("bf16 extraction"):
            ratio, met = ours / theirs, ours / theirs >= target
            cells = (f"{ours:.1f}", f"{theirs:.1f} (float32)", f"{ratio:.2f}x", f">= {target}x")
        elif what.startswith("arithmetic rate"):
            ratio, met = ours / theirs, None
            cells = (f"{ours:.0f}", f"{theirs:.0f} (torch.mm peak)", f"{ratio:.0%} of peak", "-")
        elif what.startswith("sharded extraction"):
            ratio, met = ours / theirs, None
            cells = (f"{ours:.1f}", f"{theirs:.1f} (1 process)", f"{ratio:.2f}x", "-")
        elif what.startswith("cached train step"):
            ratio = theirs / ours
            met = ratio >= target * 0.95 and (device.type != "cuda" or ours < 1.0)
            cells = (f"{ours:.2f} ms", f"{theirs:.2f} ms", f"{ratio:.2f}x",
                     "no slower" + (", < 1 ms" if device.type == "cuda" else ""))
        elif what.startswith("extraction"):
            ratio, met = ours / theirs, ours / theirs >= target
            cells = (f"{ours:.1f}", f"{theirs:.1f} (raw)", f"{ratio:.0%}", f">= {target:.0%}")
        elif what.startswith("peak RSS"):
            ratio, met = theirs / ours, ours < target
            cells = (f"{ours:.2f}", f"{theirs:.1f} (whole cache)", f"{ratio:.1f}x smaller", f"< {target} GB")
        else:
            ratio, met = theirs / ours, theirs / ours >= target
            if what.startswith("gender"):
                met = met and lk["identical"]
            if what.startswith("folder-protocol leakage"):
                met = met and note.endswith("identical: True")
            if what.startswith("sweep evaluations"):
                met = met and note.endswith("identical: True")
            cells = (f"{ours:.2f}s", f"{theirs:.2f}s", f"{ratio:.1f}x", f">= {target}x")
        table.append((what, *cells, "-" if met is None else "yes" if met else "NO", note))
    header = ("what", "ours", "authors' design", "ratio", "target", "met?", "notes")
    md = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads)"
          + (f", GPU {info['gpu']}" if "gpu" in info else "") + f", device {device}; mode "
          f"{mode}; total {time.perf_counter() - t_all:.0f}s.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in table]
    (out / "results.md").write_text("\n".join(md) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*header, "device", "cpu", "cores", "torch"])
        for r in table:
            w.writerow([*r, str(device), info["cpu"], info["cores"], info["torch"]])
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
