"""The authors' released privacy layers, as unpacked from their download: find every layer, say which backbone and
setting it belongs to (from its folder names, or a mapping file the user edits), and stage it as a run folder the
sweep evaluates like ours (links to the files: the download is never moved or changed).

Mapping file (CSV, written as a template when a layer cannot be placed): ``layer`` (its path inside the folder),
``backbone`` (a name of the plan's BACKBONES), ``setting`` (OneDataset or CrossDataset) and ``dataset`` (the training
dataset for OneDataset; the held-out dataset, or ``all``, for CrossDataset).
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from pipeline.plans import Experiment, safe_name
from utils.errors import UserError
from utils.io import atomic_write_text, extract_state_dict, safe_torch_load

MAPPING_COLUMNS = ["layer", "backbone", "setting", "dataset"]
_STEP = re.compile(r"^(\d+)ftn_layers\.pth$")


def find_layers(root: Path) -> list[Path]:
    """Every privacy layer file under ``root``: ``{step}ftn_layers.pth``, or any .pth whose weights are a privacy
    layer's (keys proj.*), in path order."""
    if not root.is_dir():
        raise UserError(f"--released '{root}' is not a folder; give the folder the authors' download unpacks to.")
    found = []
    for path in sorted(root.rglob("*.pth")):
        if _STEP.match(path.name):
            found.append(path)
            continue
        try:
            state = extract_state_dict(safe_torch_load(path, "released file"), path, "released file")
        except UserError:
            continue   # not a layer (a backbone, a header, another file): left alone
        if state and all(k.removeprefix("module.").startswith("proj.") for k in state):
            found.append(path)
    if not found:
        raise UserError(f"no privacy layer found under --released '{root}' (files named {{step}}ftn_layers.pth, or "
                        f".pth files holding a privacy layer's weights proj.*).")
    return found


def infer(rel: Path, backbones: list[str], datasets: list[str]) -> dict[str, str]:
    """Backbone, setting and dataset read from a layer's folder names ('' where they cannot be read)."""
    parts = [p.lower() for p in rel.parts[:-1]]
    backbone = next((b for b in backbones for p in parts if b.lower() in p), "")
    cross = any("cross" in p for p in parts)
    named = [d for d in datasets if any(d.lower() in p for p in parts)]
    every = cross and (len(named) == len(datasets) or any(p in ("all", "vggface2") for p in parts))
    dataset = named[0] if len(named) == 1 else ("all" if every else "")
    return {"backbone": backbone, "setting": "CrossDataset" if cross else ("OneDataset" if dataset else ""),
            "dataset": dataset}


def read_mapping(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise UserError(f"--mapping '{path}' does not exist; it is the CSV written by the first run (columns "
                        f"{', '.join(MAPPING_COLUMNS)}).")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not set(MAPPING_COLUMNS) <= set(reader.fieldnames or []):
            raise UserError(f"--mapping '{path}' has the columns {reader.fieldnames}; it needs "
                            f"{', '.join(MAPPING_COLUMNS)}.")
        return {r["layer"].strip(): {k: (r[k] or "").strip() for k in MAPPING_COLUMNS[1:]} for r in reader}


def _free(path: Path) -> Path:
    k, out = 1, path
    while out.exists():
        k += 1
        out = path.with_name(f"{path.stem}_{k}{path.suffix}")
    return out


def released_experiments(plan: Any) -> list[dict]:
    """Plan experiments (dicts) of every released layer under ``plan.released_dir``, grouped by run folder: the
    released plan's experiments, and what --released adds to any other plan (its rows beside the plan's own)."""
    if not getattr(plan, "released_dir", None):
        raise UserError("the released plan evaluates the authors' layers: give their folder with --released DIR.")
    missing = [name for name in ("BACKBONES", "TARGETS", "EVAL_SETS", "ALL_TARGET") if not hasattr(plan, name)]
    if missing:
        raise UserError(f"--released places the authors' layers by the plan's {', '.join(missing)}, which this plan "
                        f"does not define; run it with a plan that does (paper, or one with INCLUDE = \"paper\").")
    root = Path(plan.released_dir)
    backbones, datasets = list(plan.BACKBONES), list(plan.TARGETS)
    mapping = read_mapping(Path(plan.mapping)) if plan.mapping else {}
    placed: dict[tuple[str, str, str, str], list[Path]] = {}   # (backbone, setting, dataset, folder) -> layer files
    unplaced: list[tuple[Path, dict[str, str]]] = []            # (layer inside root, what was read of its place)
    for path in find_layers(root):
        rel = path.relative_to(root)
        where = {**infer(rel, backbones, datasets), **{k: v for k, v in mapping.get(rel.as_posix(), {}).items() if v}}
        bad = (where["backbone"] not in backbones or where["setting"] not in ("OneDataset", "CrossDataset")
               or where["dataset"] not in [*datasets, *(["all"] if where["setting"] == "CrossDataset" else [])])
        if bad:
            unplaced.append((rel, where))
        else:
            placed.setdefault((where["backbone"], where["setting"], where["dataset"], rel.parent.as_posix()),
                              []).append(path)
    if unplaced:
        written = _free(Path(plan.results) / "released_mapping.csv")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(MAPPING_COLUMNS)
        for path in find_layers(root):
            rel = path.relative_to(root)
            w = {**infer(rel, backbones, datasets), **mapping.get(rel.as_posix(), {})}
            writer.writerow([rel.as_posix(), w["backbone"], w["setting"], w["dataset"]])
        atomic_write_text(written, buf.getvalue())
        names = ", ".join(r.as_posix() for r, _ in unplaced[:5]) + (" ..." if len(unplaced) > 5 else "")
        raise UserError(f"{len(unplaced)} released layer(s) under '{root}' cannot be placed from their folder names "
                        f"({names}). A mapping file listing every layer is written to '{written}': fill in its empty "
                        f"cells (backbone: one of {', '.join(backbones)}; setting: OneDataset or CrossDataset; "
                        f"dataset: one of {', '.join(datasets)}, or 'all' for the cross-dataset fold trained on all), "
                        f"then run again with --mapping {written}.")
    out = []
    for (backbone, setting, dataset, folder), files in placed.items():
        cross = setting == "CrossDataset"
        targets = ([plan.ALL_TARGET] if dataset == "all" else [plan.TARGETS[dataset]]) if cross else \
            list(plan.EVAL_SETS)
        trained_on = "+".join(d for d in datasets if d != dataset) if cross and dataset != "all" else \
            ("+".join(datasets) if cross else dataset)
        out.append(dict(backbone=backbone, setting="Released", released_setting=setting, trained_on=trained_on,
                        held_out=(dataset if dataset != "all" else "(none)") if cross else "", method="angular",
                        released=[str(p) for p in files],
                        options={**plan.BACKBONES[backbone], "experiment": "Released",
                                 "data": f"{setting}-{dataset}", "run_name": safe_name(folder) if folder != "." else
                                 "released", "test_targets": targets}))
    return out


def stage(exp: Experiment) -> Path:
    """checkpoint_root/<pretrained>/Released/<setting>-<dataset>/<run>/{step}ftn_layers.pth as links to the files
    (<run>: the experiment's run_name; 'released' when a plan's own released experiment names none)."""
    cfg = exp.cfg
    folder = Path(cfg.checkpoint_root) / cfg.pretrained / cfg.experiment / cfg.data / (cfg.run_name or "released")
    folder.mkdir(parents=True, exist_ok=True)
    for k, src in enumerate(exp.released, start=1):
        m = _STEP.match(src.name)
        link = folder / f"{int(m.group(1)) if m else k}ftn_layers.pth"
        target = src.resolve()
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            raise UserError(f"'{link}' already exists and is not a link to '{target}'; move it away (a staged "
                            f"released layer is never overwritten).")
        os.symlink(target, link)
    return folder
