"""Evaluation of a model on one .bin from cached templates: shared by validation during training, the
evaluation sweep, the demo and the tests.

The backbone's templates of a .bin come from the template cache (computed once); a privacy layer is applied
to them directly, which equals running layer(normalize(backbone(x))) on the images. Verification uses
net(x) + net(flip(x)); the gender test uses net(x) alone; the bare backbone sums its raw outputs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from utils.binfile import load_bin
from utils.cache import Templates, bin_key, get_templates
from utils.leakage import gender_leakage
from utils.verification import evaluate_verification

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["EER", "TAR@FAR=0.1%", "BACC-Gender-LogReg", "BACC-Gender-SVM", "BACC-Gender-RBF",
                  "BACC-Gender-AVG"]
BACC_COLUMNS = METRIC_COLUMNS[2:5]


@dataclass
class EvalTemplates:
    """One evaluation set: cached backbone templates of its pair images followed by its gender images."""
    name: str
    templates: Templates
    issame: np.ndarray
    id_labels: np.ndarray
    gender_labels: np.ndarray

    @property
    def num_pair_images(self) -> int:
        return 2 * len(self.issame)


def open_eval_set(cfg, name: str, device: torch.device, load_backbone: Callable[[], nn.Module]) -> EvalTemplates:
    """Read rec/<name>.bin and get its templates from the cache (extracting them on the first use)."""
    path = Path(cfg.rec) / f"{name}.bin"
    es = load_bin(path)
    items = es.pair_images + es.gender_images
    n_pairs = len(es.pair_images)

    def describe(i: int) -> str:
        return f"{path} bins[{i}]" if i < n_pairs else f"{path} bins_gender[{i - n_pairs}]"
    key = bin_key(cfg, es.sha256)  # hashed from the bytes load_bin already read
    t = get_templates(cfg.cache_dir, f"bin-{name}", key, items, load_backbone, device, dtype=cfg.cache_dtype,
                      batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers, amp=cfg.amp,
                      channels_last=cfg.channels_last, describe=describe, what=f"images of {path.name}")
    return EvalTemplates(name, t, es.issame, es.id_labels, es.gender_labels)


@torch.no_grad()
def model_templates(ev: EvalTemplates, layer: nn.Module | None) -> tuple[np.ndarray, np.ndarray]:
    """(2P, D) verification templates (flip-summed) and (G, D) gender templates (unflipped) of the model."""
    n = ev.num_pair_images
    if layer is None:
        ver = ev.templates.raw(slice(0, n), 0) + ev.templates.raw(slice(0, n), 1)
        gen = ev.templates.raw(slice(n, None), 0)
    else:
        layer.eval()
        dev = next(layer.parameters()).device
        t = ev.templates
        ver = layer(t.normalized(slice(0, n), 0).to(dev)) + layer(t.normalized(slice(0, n), 1).to(dev))
        gen = layer(t.normalized(slice(n, None), 0).to(dev))
    return ver.double().cpu().numpy(), gen.double().cpu().numpy()


def evaluate_set(ev: EvalTemplates, layer: nn.Module | None, gender_folds: int = 3) -> dict[str, float]:
    """EER, TAR@FAR=0.1% and the gender balanced accuracies of ``layer`` (None: the bare backbone)."""
    ver, gen = model_templates(ev, layer)
    res = evaluate_verification(ver, ev.issame, name=f"'{ev.name}'")
    out = {"EER": res.eer, "TAR@FAR=0.1%": res.tar}
    if len(gen):
        bacc = gender_leakage(gen, ev.gender_labels, ev.id_labels, gender_folds, name=f"'{ev.name}'")
        out.update({f"BACC-Gender-{k}": v for k, v in bacc.items()})
    else:
        out.update({c: float("nan") for c in METRIC_COLUMNS[2:]})
    return out


def pic(post: dict[str, float], pre: dict[str, float]) -> float | None:
    """PIC = relative privacy gain minus relative identity loss; None where undefined (no gender test, EER_pre=0).

    PIC = ((1 - BACC_post) - (1 - BACC_pre)) / (1 - BACC_pre) - (EER_post - EER_pre) / EER_pre, with BACC the
    mean of the three classifiers' balanced accuracies.
    """
    b_post = float(np.mean([post[c] for c in BACC_COLUMNS]))
    b_pre = float(np.mean([pre[c] for c in BACC_COLUMNS]))
    e_post, e_pre = post["EER"], pre["EER"]
    if not all(math.isfinite(v) for v in (b_post, b_pre, e_post, e_pre)) or e_pre == 0 or b_pre == 1:
        return None
    return ((1 - b_post) - (1 - b_pre)) / (1 - b_pre) - (e_post - e_pre) / e_pre
