"""The gender test's images under either protocol (config option ``gender_protocol``).

``bins`` (the released code's, the default): the gender part of each ``rec/<name>.bin``. ``folders`` (the code that
produced the paper's tables, commit f6453c5 of the authors' repository): every image of a ``subjectid_gender``
folder per evaluation target (option ``gender_folders``), identities = the folders, gender = the suffix after the
last ``_``, images in sorted order; verification still uses the .bin (insightface's 2-item files, as the paper did).

The paper-era code read each image with ``cv2.imread`` and squeezed it to 112x112 with ``cv2.resize`` (bilinear, no
crop, aspect not kept) before BGR -> RGB, where this suite's loader resizes the short side and crops. An image that
is already 112x112 is the same either way and keeps the file's own cache row (shared with training's extraction);
any other is resized here as the paper-era code did and enters the cache as that 112x112 image (lossless PNG, cache
row keyed by its pixels). Everything after the pixels is the suite's one pipeline: (x/255 - 0.5)/0.5, the backbone
once per image (template cache), L2 normalisation, the privacy layer on the unflipped template, L2 normalisation,
identity-grouped 3-fold leakage (eval/leakage.py). Which protocol made a sweep folder's rows is kept in its
``protocol.csv`` (and beside a reference CSV the sweep computed under folders), and a sweep under the other protocol
is refused.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np

from eval.evalset import EvalTemplates, open_eval_set
from facedata.binfile import load_bin
from facedata.dataset import IMAGE_SIZE, TrainIndex, scan_dataset
from templates.cache import TemplateCache, bin_inputs, folder_fingerprint
from utils.errors import UserError
from utils.io import atomic_write_text
from utils.logs import get_logger

__all__ = ["PROTOCOLS", "PaperFolderImage", "paper_era_pixels", "folder_index", "check_gender_folders",
           "open_protocol_set", "protocol_inputs", "protocol_tag", "PROTOCOL_FILE", "PROTOCOL_COLUMNS",
           "check_and_record_protocol", "protocol_lines"]

log = get_logger(__name__)

PROTOCOLS = ("bins", "folders")
PROTOCOL_FILE = "protocol.csv"   # in a sweep folder: which protocol (and which images) made each dataset's rows
# Images: under folders, the fingerprint of the folder's images (relative names, sizes, mtimes), so that a folder
# moved or copied with its results (rsync -a, cp -p) is the same gender test; files without it compare by path
PROTOCOL_COLUMNS = ["Dataset", "Protocol", "Gender-Test", "Images"]
FOLDER_SECTION = "Gender-test protocols"   # the README section that explains the folders


def paper_era_pixels(path: Path) -> np.ndarray | None:
    """112x112 BGR uint8 pixels as the paper-era code read an image: cv2.imread, then cv2.resize to (112, 112)
    (bilinear, no crop); None where OpenCV cannot read it."""
    img = cv2.imread(str(path))
    if img is None:
        return None
    return img if img.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE))


@dataclass(frozen=True)
class PaperFolderImage:
    """One image of a gender-test folder, standing for the image the template cache extracts (``row_item``): the
    file itself when it is 112x112, else its paper-era resize as lossless PNG bytes (read when needed, so a cache
    hit reads no image)."""
    path: Path

    def row_item(self) -> Path | bytes:
        """What the cache decodes and keys: the file, or the PNG of its 112x112 resize (b'' when unreadable, which
        the extraction then reports under this file's name)."""
        img = cv2.imread(str(self.path))
        if img is None:
            return b""
        if img.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
            return self.path
        ok, png = cv2.imencode(".png", cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE)))
        return png.tobytes() if ok else b""

    def __str__(self) -> str:
        return str(self.path)


def _option(name: str) -> str:
    return f"gender_folders['{name}']"


def folder_index(name: str, folder: str | Path, option: str | None = None) -> TrainIndex:
    """The images, identities and genders of target ``name``'s folder; a folder that does not exist, holds no
    identity or image, breaks the layout or lacks one gender is refused in one paragraph naming it and ``option``
    (default: its gender_folders entry)."""
    option = option or _option(name)
    if not isinstance(folder, (str, Path)) or not str(folder):
        raise UserError(f"config option {option} is {folder!r}; give the path of a subjectid_gender folder "
                        f"(one folder per identity, e.g. 0001_1/, 0002_0/, with its face images inside).")
    index = scan_dataset(folder, option=option, check_genders=False)
    genders = sorted(set(index.identity_gender.tolist()))
    if len(genders) < 2:
        raise UserError(f"image folder '{folder}' ({option}) holds identities of gender {genders[0]} only "
                        f"({index.num_identities} folders ending in _{genders[0]}); the gender test needs both "
                        f"genders (folders ending in _0 and in _1). Point {option} at the whole evaluation set.")
    return index


def check_gender_folders(cfg: Any, targets: Sequence[str]) -> dict[str, TrainIndex]:
    """Pre-flight of gender_protocol=folders (nothing under bins): every target has a folder of both genders; the
    folders' indexes by target. Every problem of every target is reported at once."""
    if cfg.gender_protocol != "folders":
        return {}
    folders = cfg.gender_folders
    missing = [t for t in targets if t not in folders]
    if missing:
        example = ", ".join(f"'{t}': 'data/train/...'" for t in missing[:2])
        raise UserError(f"gender_protocol=folders needs an image folder for every evaluation target, but "
                        f"gender_folders names none for {', '.join(map(repr, missing))} (it has "
                        f"{sorted(folders) or 'no entry'}). Add them, e.g. --set gender_folders=\"{{{example}}}\", or "
                        f"use gender_protocol=bins (the gender part of the .bin files).")
    out, errors = {}, []
    for t in targets:
        try:
            out[t] = folder_index(t, folders[t])
        except UserError as exc:
            errors.append(str(exc))
    if errors:
        raise UserError(" ".join(errors))
    return out


def open_protocol_set(cache: TemplateCache, cfg: Any, name: str) -> EvalTemplates:
    """Evaluation set ``name`` under the configured protocol: the .bin alone (bins), or the .bin's pairs followed by
    every image of the target's folder as its gender test (folders), templates from the cache either way."""
    if cfg.gender_protocol != "folders":
        return open_eval_set(cache, cfg.rec, name)
    path = Path(cfg.rec) / f"{name}.bin"
    es = load_bin(path)
    if es.has_gender:
        log.info("%s: its gender part is not used (gender_protocol=folders: the gender test is every image of %s)",
                 path, cfg.gender_folders[name])
    index = folder_index(name, cfg.gender_folders[name])
    root = Path(cfg.gender_folders[name])
    n_pairs = len(es.pair_images)
    items = [*es.pair_images, *(PaperFolderImage(Path(p)) for p in index.paths)]

    def describe(i: int) -> str:
        return f"{path} bins[{i}]" if i < n_pairs else str(index.paths[i - n_pairs])
    inputs = f"{bin_inputs(es.sha256)}|paper-folder:{folder_fingerprint(root, list(index.paths))}"
    t = cache.get(f"folders-{name}", inputs, items, describe, what=f"images of {path.name} and {root}")
    return EvalTemplates(name, t, es.issame, np.asarray(index.labels), np.asarray(index.genders))


def protocol_inputs(cfg: Any) -> list[tuple[str, Path, str]]:
    """(what, path, README section) of the gender-test folders an experiment needs (none under bins; a target
    without a folder is named with the path it lacks, so that a dry run lists it)."""
    if cfg.gender_protocol != "folders":
        return []
    training = {str(Path(d)) for d in (cfg.data_dir if isinstance(cfg.data_dir, list) else [cfg.data_dir])}
    folders = [(t, Path(str(cfg.gender_folders.get(t, f"<gender_folders['{t}'] not set>")))) for t in cfg.test_targets]
    return [(f"gender-test folder of {t} (gender_protocol=folders)", folder, FOLDER_SECTION)
            for t, folder in folders if str(folder) not in training]   # a training folder is listed as such


def protocol_tag(cfg: Any) -> str:
    """'' under bins; under folders '-folders-<hash of the folders>', for names of files and folders whose content
    depends on the protocol (sweep folders, reference CSVs), so that the two never share one."""
    if cfg.gender_protocol != "folders":
        return ""
    text = json.dumps({t: str(cfg.gender_folders.get(t)) for t in cfg.test_targets}, sort_keys=True)
    return "-folders-" + hashlib.sha256(text.encode()).hexdigest()[:8]


Mark = tuple[str, str, str]   # (protocol, the gender test's images: the .bin or the folder, their fingerprint)


def _marks(protocol: str, cfg: Any, targets: Iterable[str],
           indexes: Mapping[str, TrainIndex] | None = None) -> dict[str, Mark]:
    """Per target: (protocol, the .bin or the folder, the folder's image fingerprint ('' under bins));
    ``indexes``: the folders already scanned (check_gender_folders), not scanned again."""
    if protocol == "folders":
        out = {}
        for t in targets:
            root = Path(cfg.gender_folders[t])
            index = indexes[t] if indexes and t in indexes else folder_index(t, root)
            out[t] = ("folders", str(root.resolve()), folder_fingerprint(root, list(index.paths)))
        return out
    return {t: ("bins", str(Path(cfg.rec) / f"{t}.bin"), "") for t in targets}


def _read_marks(path: Path) -> dict[str, Mark] | None:
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames not in (PROTOCOL_COLUMNS, PROTOCOL_COLUMNS[:3]):   # 3: written before Images
                raise ValueError(f"columns {reader.fieldnames}, expected {PROTOCOL_COLUMNS}")
            return {r["Dataset"]: (r["Protocol"], r["Gender-Test"], r.get("Images") or "") for r in reader}
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"protocol file '{path}' cannot be read ({exc}); it records which gender-test protocol made "
                        f"the results beside it. Restore it, or move the folder's results away.") from None


def _write_marks(path: Path, marks: dict[str, Mark]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PROTOCOL_COLUMNS)
    writer.writerows([name, *mark] for name, mark in sorted(marks.items()))
    if not path.is_file() or path.read_text() != buf.getvalue():
        atomic_write_text(path, buf.getvalue())


def _same_test(have: Mark, want: Mark) -> bool:
    """One gender test: the same protocol and, under folders, the same images (by fingerprint where both have one,
    so that a moved folder is the same test; else by path)."""
    if have[0] != want[0]:
        return False
    if want[0] != "folders":
        return True   # under bins the .bin is part of the sweep's settings like any other input
    return have[2] == want[2] if have[2] and want[2] else have[1] == want[1]


def _conflicts(have: dict[str, Mark], want: dict[str, Mark]) -> list[str]:
    """The targets whose protocol differs, or whose gender-test images differ under folders."""
    return [f"'{t}' (made under {have[t][0]} from {have[t][1]}; now {want[t][0]} from {want[t][1]}"
            f"{'' if have[t][1] != want[t][1] else ', whose images have changed since'})"
            for t in want if t in have and not _same_test(have[t], want[t])]


def check_and_record_protocol(cfg: Any, out_dir: Path, reference: Path, targets: Sequence[str],
                              indexes: Mapping[str, TrainIndex] | None = None) -> None:
    """Refuse a sweep whose protocol (or gender-test images) differs from the one that made the rows already in
    ``out_dir`` or the reference CSV, then record it: ``out_dir/protocol.csv`` and, for a reference the sweep is
    about to compute under folders, ``<reference>.protocol.csv`` beside it. A folder of results from before this file
    existed counts as bins (the only protocol then); so does an existing reference without a protocol file.
    ``indexes``: the gender-test folders as check_gender_folders scanned them."""
    want = _marks(cfg.gender_protocol, cfg, targets, indexes)
    where, side = out_dir / PROTOCOL_FILE, reference.with_name(reference.name + ".protocol.csv")

    def recorded(marks: Path, has_results: bool) -> dict | None:
        """The protocol marks recorded beside results (results without marks were made under bins)."""
        have = _read_marks(marks)
        return _marks("bins", cfg, targets) if have is None and has_results else have
    have = recorded(where, any(out_dir.glob("*_metrics.csv")))
    if bad := _conflicts(have or {}, want):
        raise UserError(f"sweep folder '{out_dir}' holds results of another gender-test protocol for "
                        f"{', '.join(bad)}; its rows would be mixed. Sweep into another --log-root (the plan runner "
                        f"keeps one folder per protocol), or move that folder's results away.")
    if bad := _conflicts(recorded(side, reference.is_file()) or {}, want):
        raise UserError(f"reference file '{reference}' (--reference-pth) holds the bare backbone's results of "
                        f"another gender-test protocol for {', '.join(bad)}: PIC would compare two protocols. Give "
                        f"another --reference-pth (it is then computed under this protocol), or move it away.")
    _write_marks(where, {**(have or {}), **want})
    if not reference.is_file() and cfg.gender_protocol == "folders":   # a reference without one counts as bins
        _write_marks(side, want)


def protocol_lines(experiments: Sequence[Any], generated: Path | None = None) -> list[str]:
    """Dry-run lines: the gender-test folders the experiments need under gender_protocol=folders, each once with
    how many experiments use it and whether it is missing (a folder under ``generated`` is made by the plan)."""
    need: dict[tuple[str, str], int] = {}
    bins = 0
    for exp in experiments:
        cfg = exp.cfg
        if cfg.gender_protocol != "folders":
            bins += 1
            continue
        for t in cfg.test_targets:
            key = (t, str(cfg.gender_folders.get(t, "(not set in gender_folders)")))
            need[key] = need.get(key, 0) + 1
    if not need:
        return []
    head = (f"gender-test folders (gender_protocol=folders, README '{FOLDER_SECTION}'; {bins} experiment(s) use "
            f"the .bin files' gender part):")
    lines = [head]
    for (t, folder), n in sorted(need.items()):
        made = generated is not None and Path(folder).resolve().is_relative_to(Path(generated).resolve())
        state = "" if Path(folder).is_dir() else "  [made by the plan]" if made else "  [missing]"
        lines.append(f"  {t}: {folder}  ({n} experiment(s)){state}")
    return lines
