"""Name the architectures and layouts a backbone file can hold, and, given an evaluation .bin, each one's EER.

    python tools/identify_backbone.py PATH [--bin rec/lfw.bin] [--max-pairs 1000] [--device auto]
                                      [--set plugins="['my_arch.py']"]

Lists every network (with its SE option and template size) whose state-dict keys and shapes equal the file's,
the same test the loader uses. Where several fit (OpenSphere's current sfnet20 and v0's sfnet20_deprecated have
identical keys), only the outputs can tell: with --bin, each candidate's EER is computed with the evaluation's
protocol (template = net(x) + net(flip(x)), 10 folds), and an EER near chance (above 0.2) is flagged: a wrong
layout, a wrong input normalisation or a misaligned .bin. --max-pairs takes that many pairs evenly spread over
the file (0: all) to keep a CPU run short.

An ONNX file (``.onnx``, network=onnx) is described by its input and output instead: names, shapes and types, the
template size, and with --bin its EER with both channel orders under the input options given with --set onnx.*
(insightface's by default), so a wrong channel order or normalisation shows as the worse EER.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


import numpy as np
import torch

from backbones import (ARCHITECTURES, SFNET_LAYOUTS, architecture_shapes, candidate_architectures,
                       describe_candidate, get_backbone, settings_for)
from eval.verification import evaluate_verification
from facedata.binfile import load_bin
from facedata.dataset import DecodeError, decode_image, normalize_images
from config.loading import load_config
from utils.device import select_device
from utils.errors import UserError, run_cli
from utils.io import extract_state_dict, safe_torch_load

NEAR_CHANCE_EER = 0.2


CLOSEST_SHARE = 0.5   # a layout is offered as "closest" only when at least this share of all keys fits


def _closest(have: dict[str, tuple[int, ...]]) -> str | None:
    """The registered architecture sharing the most (key, shape) entries with the file, for the error message; None
    when even the best shares less than CLOSEST_SHARE of the keys of the two together (nothing close to name)."""
    scores = []
    for name in ARCHITECTURES:
        for use_se in (False, True):
            try:
                want = architecture_shapes(name, 512, use_se)
            except Exception:   # a plug-in that cannot be built at this size
                continue
            agree = sum(have.get(k) == s for k, s in want.items())
            scores.append((agree / len(set(want) | set(have)), agree, name, use_se, len(want)))
    if not scores:
        return None
    share, agree, name, use_se, n = max(scores)
    if share < CLOSEST_SHARE:
        return None
    return f"{describe_candidate(name, use_se, 512)} ({agree} of its {n} keys and shapes agree)"


def identify(path: str | Path) -> tuple[dict[str, torch.Tensor], list[tuple[str, bool, int]]]:
    """The file's state dict and every (network, use_se, num_features) it fits; a UserError if it fits none."""
    state = extract_state_dict(safe_torch_load(path, "backbone weights"), path, "backbone weights")
    found = candidate_architectures(state)
    if not found:
        have = {k: tuple(v.shape) for k, v in state.items()}
        first = ", ".join(f"{k} {s}" for k, s in list(have.items())[:3])
        closest = _closest(have)
        near = (f"the closest is {closest}" if closest else f"no registered architecture shares even "
                f"{CLOSEST_SHARE:.0%} of its keys and shapes")
        raise UserError(f"backbone weights '{path}' fit no known architecture: none of {', '.join(ARCHITECTURES)} "
                        f"(with or without SE blocks, at the file's template size) has its {len(have)} keys and "
                        f"shapes (first: {first}); {near}. The file may be of another family (a plug-in "
                        f"architecture is seen with --set plugins=\"['my_arch.py']\"), hold a whole training state "
                        f"rather than the backbone's state dict, or be damaged; export the backbone with "
                        f"torch.save(backbone.state_dict(), path).")
    return state, found


def pair_images(bin_path: str | Path, max_pairs: int) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded uint8 pair images (2P, 3, 112, 112) of a .bin and their P same/different flags."""
    es = load_bin(bin_path, option="--bin")
    pairs = np.arange(len(es.issame))
    if 0 < max_pairs < len(pairs):
        pairs = np.unique(np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int))
    images = []
    for p in pairs:
        for i in (2 * p, 2 * p + 1):
            try:
                img, _ = decode_image(es.pair_images[i])
            except DecodeError:
                raise UserError(f"evaluation file '{bin_path}': bins[{i}] is not a decodable image; rebuild the "
                                f"file with tools/make_bin.py.") from None
            images.append(torch.from_numpy(img).permute(2, 0, 1))
    return torch.stack(images), es.issame[pairs]


@torch.no_grad()
def templates(net: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """net(x) + net(flip(x)) for uint8 images, normalised as everywhere else: the verification protocol's input."""
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize_images(images[start:start + batch_size].to(device))
        out.append((net(x) + net(torch.flip(x, dims=[3]))).float().cpu())
    return torch.cat(out).numpy()


def report(path: str | Path, bin_path: str | Path | None = None, max_pairs: int = 1000,
           device: str = "auto") -> list[tuple[str, bool, int, float | None]]:
    """Print the candidates (and their EERs on ``bin_path``); return them as (network, use_se, dim, EER)."""
    state, found = identify(path)
    rows: list[tuple[str, bool, int, float | None]] = [(n, se, nf, None) for n, se, nf in found]
    scored: list[tuple[str, bool, int, float]] = []   # the same with their EERs on bin_path, when it is given
    if bin_path is not None:
        dev = select_device(device)
        images, issame = pair_images(bin_path, max_pairs)
        for name, use_se, nf in found:
            net = get_backbone(name, nf, use_se)
            net.load_state_dict(state, strict=True)
            measured = evaluate_verification(templates(net.eval().to(dev), images, dev), issame, str(bin_path)).eer
            scored.append((name, use_se, nf, measured))
        rows = list(scored)
    print(f"backbone weights '{path}': {len(state)} tensors; {len(found)} architecture(s) fit its keys and shapes")
    eer_head = f"  EER on {Path(bin_path).name} ({len(issame)} pairs)" if bin_path is not None else ""
    print(f"  {'network':<24}{'SE':<7}{'template':<10}{eer_head}".rstrip())
    for name, use_se, nf, eer in rows:
        line = f"  {name:<24}{str(use_se):<7}{nf:<10}"
        if eer is not None:
            line += f"  {eer:.4f}" + (f"  <- near chance (> {NEAR_CHANCE_EER}): not this layout, or the "
                                      f"input/.bin is off" if eer > NEAR_CHANCE_EER else "")
        print(line.rstrip())
    for name, _, _, _ in rows:
        if name in SFNET_LAYOUTS:
            print(f"  {name}: {SFNET_LAYOUTS[name]}")
    if len(rows) > 1:
        how = ("give --bin to compare their EERs" if bin_path is None else
               "the one with the lowest EER is the layout the file was trained with")
        print(f"their keys are identical, so only the outputs tell them apart: {how}.")
    best = min(scored, key=lambda r: r[3]) if bin_path is not None else rows[0]
    print(f"settings: --set {settings_for(*best[:3])}" + (" (first candidate)" if len(rows) > 1 and bin_path is None
                                                          else ""))
    return rows


def report_onnx(path: str | Path, cfg, bin_path: str | Path | None = None, max_pairs: int = 1000,
                device: str = "auto") -> list[tuple[str, float | None]]:
    """Print an ONNX file's input and output (and with ``bin_path`` the EER with each channel order under the
    options of ``cfg``'s onnx group); return (channel order, EER) rows."""
    from backbones.onnx import OnnxBackbone, OnnxSpec, model_io
    spec = OnnxSpec.from_config(dataclasses.replace(cfg, groups={**cfg.groups, "onnx": dataclasses.replace(
        cfg.group("onnx"), model=str(path))}))
    spec.check()
    inp, out = model_io(spec.weights)
    size = spec.template_size()
    print(f"ONNX backbone '{path}'")
    print(f"  input  {inp.name}: shape {inp.shape}, {inp.type}")
    print(f"  output {out.name}: shape {out.shape}, {out.type}; templates of {size} values")
    o = spec.options
    print(f"  run with: {o.channels}, (pixel - {o.mean:g}) / {o.std:g}, fit {o.fit}")
    rows: list[tuple[str, float | None]] = [(o.channels, None)]
    if bin_path is not None:
        dev = select_device(device)
        images, issame = pair_images(bin_path, max_pairs)
        rows = []
        for order in ("RGB", "BGR"):
            net = OnnxBackbone(spec.weights, dataclasses.replace(o, channels=order))
            eer = evaluate_verification(templates(net, images, dev), issame, str(bin_path)).eer
            rows.append((order, eer))
            print(f"  EER on {Path(bin_path).name} ({len(issame)} pairs) with onnx.channels={order}: {eer:.4f}" +
                  (f"  <- near chance (> {NEAR_CHANCE_EER})" if eer > NEAR_CHANCE_EER else ""))
    best = min(rows, key=lambda r: r[1] if r[1] is not None else float("inf"))
    print(f"settings: --set network=onnx onnx.model={path} onnx.channels={best[0]} embedding_size={size}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="backbone weights (a state dict, with or without DataParallel's 'module.'), "
                                     "or an .onnx file")
    parser.add_argument("--bin", default=None, help="evaluation .bin (5-item or 2-item) to compute each EER on")
    parser.add_argument("--max-pairs", type=int, default=1000, help="pairs of --bin to use, evenly spread (0: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config options; plugins=\"['my_arch.py']\" registers plug-in architectures first")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(None, args.set)   # imports the plug-ins, which register their architectures
        if Path(args.path).suffix.lower() == ".onnx":
            report_onnx(args.path, cfg, args.bin, args.max_pairs, args.device)
        else:
            report(args.path, args.bin, args.max_pairs, args.device)
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
