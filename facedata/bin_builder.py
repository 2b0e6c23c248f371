"""Build an evaluation .bin (the authors' 5-item format) from a ``subjectid_gender`` folder.

    python tools/make_bin.py --data-dir DIR --out rec/mydata.bin [--pairs FILE [--allow-missing]]
                             [--n-pairs 3000] [--n-gender 2000] [--seed 0] [--two-item]

Pairs come from --pairs, either insightface/LFW ``pairs.txt`` style (``name i j`` for a genuine pair,
``name1 i name2 j`` for an impostor pair; ``name`` is a folder name with or without its _0/_1 suffix) or a CSV of
``path1,path2,same`` rows (paths relative to --data-dir; same = 1/0/true/false). Image ``i`` of ``name`` is the
file ``name_000i.*`` (LFW's ``Name_%04d`` naming) and nothing else: a pair naming an image that is not there
(left out by the alignment, say) is never replaced by another one. The run then stops, naming the count; with
--allow-missing those pairs are left out of the .bin. Either way ``<out>.missing.txt`` beside the .bin lists the
missing images with their line numbers and the pairs dropped per fold. Only in a folder none of whose files
follows that naming is ``i`` the i-th image in sorted order, counted from 1 (said in the output).

LFW's pairs.txt is read in its published layout (header ``10 300``: ten folds, each 300 genuine then 300 impostor
lines) and in the regrouped one (all genuine lines, then all impostor lines); both give the same .bin, whose pairs
are in the published order, so that the protocol's 10 folds (consecutive blocks of pairs, KFold without shuffle)
are LFW's folds. Without --pairs, --n-pairs pairs are drawn with --seed, genuine and impostor alternating so that
each of the protocol's 10 folds holds both.

The gender test set is --n-gender images drawn evenly from the two genders. Image files are stored as they are
(not re-encoded), so decoding gives the original pixels. Beside ``<name>.bin``, ``<name>.pairs.csv`` gives each
pair's images (paths relative to --data-dir), subjects and genders (f, m; empty where unknown), for demographic
differentials: columns pair,image_a,image_b,subject_a,subject_b,gender_a,gender_b, pair = 0-based index in the
.bin's pair order. Existing files are never overwritten.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedata.binfile import write_bin
from facedata.dataset import TrainIndex, scan_dataset
from utils.errors import UserError, listing, run_cli
from utils.io import atomic_write_text, check_creatable
from utils.logs import get_logger

log = get_logger(__name__)


def pair_line_names(parts: list[str], where: str) -> list[tuple[str, str]]:
    """The two (name, image number) of an LFW-style pairs line: 'name i j' (a genuine pair) or 'name1 i name2 j'."""
    if len(parts) == 3:
        return [(parts[0], parts[1]), (parts[0], parts[2])]
    if len(parts) == 4:
        return [(parts[0], parts[1]), (parts[2], parts[3])]
    raise UserError(f"{where}: expected 'name i j' or 'name1 i name2 j', got '{' '.join(parts)}'.")

def draw_pairs(index: TrainIndex, n_pairs: int, rng: np.random.Generator) -> list[tuple[int, int, bool]]:
    """Alternating genuine / impostor pairs of image indices."""
    by_id = [np.flatnonzero(index.labels == k) for k in range(index.num_identities)]
    multi = [k for k, imgs in enumerate(by_id) if len(imgs) >= 2]
    if not multi or index.num_identities < 2:
        raise UserError(f"'{index.root}' needs an identity with at least 2 images and at least 2 identities to draw "
                        f"genuine and impostor pairs.")
    pairs = []
    for p in range(n_pairs):
        if p % 2 == 0:
            k = multi[rng.integers(len(multi))]
            a, b = rng.choice(by_id[k], 2, replace=False)
            pairs.append((int(a), int(b), True))
        else:
            k1, k2 = rng.choice(index.num_identities, 2, replace=False)
            pairs.append((int(rng.choice(by_id[k1])), int(rng.choice(by_id[k2])), False))
    return pairs


def draw_gender_subset(index: TrainIndex, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n // 2`` image indices of each gender (without replacement; fewer where a gender has fewer)."""
    picks = []
    for g in (0, 1):
        pool = np.flatnonzero(index.genders == g)
        picks.append(rng.choice(pool, min(len(pool), n // 2), replace=False))
    return np.sort(np.concatenate(picks))


N_FOLDS = 10   # the protocol's folds (eval/verification.py: KFold(10) without shuffle, consecutive blocks of pairs)
SIDECAR_COLUMNS = ("pair", "image_a", "image_b", "subject_a", "subject_b", "gender_a", "gender_b")
GENDER_LETTER = {1: "f", 0: "m"}   # this project's convention: 1 feminine, 0 masculine
MISSING_HEADER = "# Pairs left out of"


@dataclass
class Pair:
    """One pair of the pairs file: its two images (indices into the scanned folder; None where missing)."""
    a: int | None
    b: int | None
    same: bool
    line: int = 0                                        # line number in the pairs file (0: a drawn pair)
    text: str = ""                                       # the line as written, for the report
    missing: list[str] = field(default_factory=list)     # the images it names that are not there

    @property
    def usable(self) -> bool:
        return self.a is not None and self.b is not None


@dataclass
class PairsRead:
    """The pairs of a pairs file, in the .bin's order, and what the reading needs to say."""
    pairs: list[Pair]
    notes: list[str] = field(default_factory=list)


@dataclass
class BuiltBin:
    """What build_bin wrote: the .bin, its sidecar, the missing-image report (or None), and the counts."""
    path: Path
    sidecar: Path
    report: Path | None
    pairs: int
    genuine: int
    gender_images: int
    gender_counts: dict[int, int]
    dropped: int = 0
    notes: list[str] = field(default_factory=list)
    dropped_per_fold: str = ""

    def summary(self) -> str:
        """The lines tools/make_bin.py prints."""
        lines = [(f"wrote {self.path}: {self.pairs} pairs ({self.genuine} genuine, {self.pairs - self.genuine} "
                 f"impostor), {self.gender_images} gender-test images ({self.gender_counts.get(1, 0)} feminine, "
                 f"{self.gender_counts.get(0, 0)} masculine)"),
                 f"pairs with their images' subjects and genders: {self.sidecar}"]
        if self.report is not None:
            lines.append(f"{self.dropped} pairs left out for missing images (--allow-missing; per fold: "
                         f"{self.dropped_per_fold}): listed in {self.report}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


class _Folders:
    """Finds a pairs file's ``name i`` in the scanned folder: the file ``name_%04d`` of the identity ``name``."""

    def __init__(self, index: TrainIndex):
        self.index = index
        self.by_name: dict[str, int] = {}
        for k, folder in enumerate(index.folders):
            self.by_name.setdefault(folder, k)
        for k, folder in enumerate(index.folders):
            self.by_name.setdefault(folder.rpartition("_")[0], k)
        self.images: dict[int, list[int]] = {}
        for j, label in enumerate(index.labels.tolist()):
            self.images.setdefault(label, []).append(j)
        self.fallback: set[str] = set()   # folders read as "the i-th image" (none of their files follows the naming)

    def resolve(self, name: str, number: str, where: str) -> tuple[int | None, str]:
        """(image index, '') or (None, what is missing)."""
        try:
            i = int(number)
        except ValueError:
            raise UserError(f"{where}: '{number}' is not an image number.") from None
        wanted = f"{name}_{i:04d}"
        k = self.by_name.get(name)
        if k is None:
            return None, f"{wanted} (no folder '{name}' or '{name}_0'/'{name}_1')"
        imgs = self.images.get(k, [])
        stems = {self.index.paths[j].stem: j for j in imgs}
        if wanted in stems:
            return stems[wanted], ""
        folder = self.index.folders[k]
        named = re.compile(re.escape(name) + r"_\d+")
        if any(named.fullmatch(s) for s in stems):
            return None, f"{folder}/{wanted}.* (no such image)"
        self.fallback.add(folder)
        if not 1 <= i <= len(imgs):
            return None, f"{folder}: image {i} of {len(imgs)} (no such image)"
        return imgs[i - 1], ""


def _read_csv_pairs(path: Path, index: TrainIndex) -> list[Pair]:
    lookup = {p.relative_to(index.root).as_posix(): i for i, p in enumerate(index.paths)}
    pairs = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for n, row in enumerate(csv.reader(fh), start=1):
                if not row or (n == 1 and row[-1].strip().lower() in ("same", "issame", "label")):
                    continue
                where = f"pairs file '{path}' line {n}"
                if len(row) != 3:
                    raise UserError(f"{where}: expected path1,path2,same; got {row}.")
                flag = row[2].strip().lower()
                if flag not in ("1", "0", "true", "false", "same", "different"):
                    raise UserError(f"{where}: same must be 1/0/true/false, got '{row[2]}'.")
                rels = [r.strip() for r in row[:2]]
                ids = [lookup.get(r) for r in rels]
                pairs.append(Pair(ids[0], ids[1], flag in ("1", "true", "same"), n, ",".join(row),
                                  [f"{r} (no such image)" for r, i in zip(rels, ids) if i is None]))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"pairs file '{path}' (--pairs) is not a readable UTF-8 CSV ({exc}); check the file.") from None
    return pairs


def _lfw_order(pairs: list[Pair], header: list[int], path: Path) -> tuple[list[Pair], list[str]]:
    """LFW's pairs in the published order: a ``folds n`` header means ``folds`` blocks of n genuine then n impostor
    lines (published) or all genuine lines then all impostor lines (regrouped, reordered here)."""
    if len(header) != 2:
        return pairs, []
    folds, n = header
    if len(pairs) != 2 * folds * n:
        raise UserError(f"pairs file '{path}' (--pairs): its header '{folds} {n}' announces {folds} folds of {n} "
                        f"genuine and {n} impostor pairs ({2 * folds * n} lines), but it holds {len(pairs)} pair "
                        f"lines. The file is cut or edited: use LFW's pairs.txt as published.")
    same = [p.same for p in pairs]
    published = [True] * n + [False] * n
    if same == published * folds:
        return pairs, []
    if same == [True] * (folds * n) + [False] * (folds * n):
        genuine, impostor = pairs[:folds * n], pairs[folds * n:]
        ordered = [p for f in range(folds) for p in genuine[f * n:(f + 1) * n] + impostor[f * n:(f + 1) * n]]
        return ordered, [(f"pairs file '{path}' is in the regrouped layout (all {folds * n} genuine lines, then all "
                         f"impostor lines): its pairs are put in the published order ({folds} folds of {n} genuine "
                         f"then {n} impostor pairs), as the protocol's folds expect")]
    raise UserError(f"pairs file '{path}' (--pairs): its header '{folds} {n}' announces LFW's layout, but its lines "
                    f"are neither {folds} blocks of {n} genuine then {n} impostor pairs (as published) nor all "
                    f"genuine then all impostor pairs. The file is reordered or edited: use LFW's pairs.txt as "
                    f"published, or leave out the header line to keep the file's own order.")


def read_pairs(path: Path, index: TrainIndex) -> PairsRead:
    """Pairs from a pairs.txt-style file or a CSV of path1,path2,same, in the .bin's order (module docstring);
    pairs naming a missing image are kept with ``missing`` set (never resolved to another image)."""
    if not path.is_file():
        raise UserError(f"pairs file '{path}' (--pairs) does not exist.")
    if path.suffix.lower() == ".csv":
        return PairsRead(_read_csv_pairs(path, index))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"pairs file '{path}' (--pairs) is not UTF-8 text; check that it is a pairs.txt.") from None
    folders, pairs, header = _Folders(index), [], []   # type: tuple[_Folders, list[Pair], list[int]]
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        where = f"pairs file '{path}' line {n}"
        if not parts:
            continue
        if not pairs and not header and all(p.isdigit() for p in parts):
            header = [int(p) for p in parts]
            continue
        names = pair_line_names(parts, where)
        (a, miss_a), (b, miss_b) = (folders.resolve(name, number, where) for name, number in names)
        pairs.append(Pair(a, b, len(parts) == 3, n, " ".join(parts), [m for m in (miss_a, miss_b) if m]))
    pairs, notes = _lfw_order(pairs, header, path)
    if folders.fallback:
        shown = sorted(folders.fallback)
        notes.append(f"{len(shown)} folders have no file named <name>_<number> (LFW's naming), so image i of a pairs "
                     f"line is their i-th image in sorted order: {listing(shown)}")
    return PairsRead(pairs, notes)


def _fold_counts(pairs: list[Pair]) -> list[int]:
    """Pairs left out in each of the protocol's folds (consecutive blocks of the pairs file's pairs)."""
    return [sum(not pairs[i].usable for i in block) for block in np.array_split(np.arange(len(pairs)), N_FOLDS)]


def _missing_report(pairs: list[Pair], pairs_file: Path, data_dir: Path, out: Path) -> str:
    dropped = [p for p in pairs if not p.usable]
    genuine = sum(p.same for p in dropped)
    folds = ", ".join(f"{k + 1}: {c}" for k, c in enumerate(_fold_counts(pairs)))
    lines = [(f"{MISSING_HEADER} {out.name} by tools/make_bin.py: an image they name is not in '{data_dir}' (never "
             f"replaced by another image)."),
             f"# pairs file: {pairs_file}",
             (f"# {len(dropped)} of {len(pairs)} pairs ({genuine} genuine, {len(dropped) - genuine} impostor); per "
             f"fold of the protocol's {N_FOLDS} (consecutive blocks of pairs): {folds}"),
             "# With pairs left out, the folds of the .bin no longer coincide exactly with the pairs file's folds.",
             "# line\tpair\tmissing image"]
    lines += [f"{p.line}\t{p.text}\t{m}" for p in dropped for m in p.missing]
    return "\n".join(lines) + "\n"


def _sidecar_text(index: TrainIndex, pairs: list[Pair]) -> str:
    """The rows of ``<name>.pairs.csv`` (module docstring)."""
    def subject(i: int | None) -> tuple[str, str, str]:
        assert i is not None, "only usable pairs are written"
        folder = index.folders[int(index.labels[i])]
        name, _, suffix = folder.rpartition("_")
        gender = GENDER_LETTER.get(int(suffix), "") if suffix in ("0", "1") else ""
        return Path(index.paths[i]).relative_to(index.root).as_posix(), name or folder, gender

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SIDECAR_COLUMNS)
    for k, p in enumerate(pairs):
        (img_a, subj_a, g_a), (img_b, subj_b, g_b) = subject(p.a), subject(p.b)
        writer.writerow([k, img_a, img_b, subj_a, subj_b, g_a, g_b])
    return buf.getvalue()


def sidecar_path(out: str | os.PathLike) -> Path:
    """``<name>.pairs.csv`` beside ``<name>.bin``."""
    return Path(out).with_suffix(".pairs.csv")


def missing_report_path(out: str | os.PathLike) -> Path:
    """``<name>.missing.txt`` beside ``<name>.bin``: the pairs left out for missing images."""
    return Path(out).with_suffix(".missing.txt")


def _write_new(path: Path, text: str, what: str) -> None:
    """Write ``text`` atomically to a file that must not exist (one holding exactly ``text`` is left as it is)."""
    if os.path.lexists(path):
        if path.is_file() and not path.is_symlink() and path.read_bytes() == text.encode():
            return
        raise UserError(f"'{path}' ({what}) already exists and differs from what this run writes. Existing files "
                        f"are never overwritten: move it away or choose another --out.")
    atomic_write_text(path, text)


def _write_report(path: Path, text: str) -> None:
    """The missing-image report: a new file, or one this tool wrote before (replaced); never a user's file."""
    if os.path.lexists(path):
        try:
            ours = path.is_file() and not path.is_symlink() and path.read_text().startswith(MISSING_HEADER)
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise UserError(f"'{path}' exists and is not a report of tools/make_bin.py; it is never overwritten. Move "
                            f"it away or choose another --out.")
    atomic_write_text(path, text)


def build_bin(data_dir: str | os.PathLike, out: str | os.PathLike, pairs_file: str | os.PathLike | None = None,
              n_pairs: int = 3000, n_gender: int = 2000, seed: int = 0, two_item: bool = False,
              allow_missing: bool = False) -> Path:
    """Write a 5-item .bin (and its sidecar) for the images under ``data_dir``; returns its path."""
    return make_bin(data_dir, out, pairs_file, n_pairs, n_gender, seed, two_item, allow_missing).path


def make_bin(data_dir: str | os.PathLike, out: str | os.PathLike, pairs_file: str | os.PathLike | None = None,
             n_pairs: int = 3000, n_gender: int = 2000, seed: int = 0, two_item: bool = False,
             allow_missing: bool = False) -> BuiltBin:
    """build_bin, returning what was written and the counts (module docstring)."""
    out = Path(out)
    if os.path.lexists(out):
        raise UserError(f"'{out}' already exists; choose another --out (existing files are never overwritten).")
    check_creatable(out, "--out")
    if out.suffix.lower() != ".bin":
        raise UserError(f"--out '{out}': name the file <name>.bin (its sidecar <name>.pairs.csv goes beside it).")
    if not pairs_file and n_pairs < 1:
        raise UserError(f"--n-pairs {n_pairs}: the number of verification pairs to draw must be at least 1 (the "
                        f"paper's protocol uses 3000, the default), or give a --pairs file.")
    if not two_item and n_gender < 2:
        raise UserError(f"--n-gender {n_gender}: the gender test needs at least 2 images (one of each gender; the "
                        f"default is 2000); for verification pairs only, write the 2-item format with --two-item.")
    index = scan_dataset(data_dir, option="--data-dir")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if pairs_file:
        read = read_pairs(Path(pairs_file), index)
        listed, notes = read.pairs, read.notes
    else:
        listed = [Pair(a, b, s) for a, b, s in draw_pairs(index, n_pairs, rng)]
    if not listed:
        raise UserError(f"no pairs were read from pairs file '{pairs_file}' (--pairs): it holds no pair lines. "
                        f"Check the file, or leave --pairs out to draw --n-pairs pairs.")
    if not two_item:
        per_gender = {g: int(np.sum(index.genders == g)) for g in (0, 1)}
        if n_gender // 2 > min(per_gender.values()):
            raise UserError(f"--n-gender {n_gender} asks for {n_gender // 2} images of each gender, but "
                            f"'{index.root}' holds {per_gender[0]} of gender 0 and {per_gender[1]} of gender 1. "
                            f"Choose --n-gender {2 * min(per_gender.values())} or less.")
    pairs = [p for p in listed if p.usable]
    report, per_fold = None, ""
    stale = missing_report_path(out)
    if len(pairs) == len(listed) and os.path.lexists(stale):
        _write_report(stale, "")   # refuses a user's file of that name; a report of an earlier refused run goes
        stale.unlink()
    if len(pairs) < len(listed):
        report = missing_report_path(out)
        _write_report(report, _missing_report(listed, Path(str(pairs_file)), index.root, out))
        dropped = len(listed) - len(pairs)
        images = len({m for p in listed for m in p.missing})
        per_fold = folds = ", ".join(str(c) for c in _fold_counts(listed))
        if not allow_missing:
            raise UserError(f"{dropped} of the {len(listed)} pairs of pairs file '{pairs_file}' (--pairs) name "
                            f"{images} images that are not in '{index.root}' (per fold: {folds}); they are listed "
                            f"with their line numbers in '{report}'. No .bin was written: an image is never replaced "
                            f"by another. Add the missing images (e.g. align them with another detector), or pass "
                            f"--allow-missing to build the .bin without these pairs."
                            + "".join(f" Note: {n}." for n in notes))
        if not pairs:
            raise UserError(f"none of the {len(listed)} pairs of pairs file '{pairs_file}' (--pairs) has both its "
                            f"images in '{index.root}' (listed in '{report}'); no .bin was written. Check that "
                            f"--data-dir is the folder the pairs file describes.")
    gender_idx = draw_gender_subset(index, n_gender, rng)
    sidecar = sidecar_path(out)
    _write_new(sidecar, _sidecar_text(index, pairs), "the sidecar of the pairs' images and genders")
    data = [Path(p).read_bytes() for p in index.paths]
    pair_images = [data[i] for p in pairs for i in (p.a, p.b) if i is not None]   # all usable: both set
    write_bin(out, pair_images, [p.same for p in pairs], [data[i] for i in gender_idx],
              index.labels[gender_idx].tolist(), index.genders[gender_idx].tolist(), two_item=two_item)
    counts = {g: int(np.sum(index.genders[gender_idx] == g)) for g in (0, 1)} if not two_item else {}
    for note in notes:
        log.info("%s", note)
    return BuiltBin(out, sidecar, report, len(pairs), sum(p.same for p in pairs),
                    0 if two_item else len(gender_idx), counts, len(listed) - len(pairs), notes,
                    per_fold)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder of subjectid_gender folders (no default)")
    parser.add_argument("--out", required=True, help="the <name>.bin to write; must not exist (no default)")
    parser.add_argument("--pairs", default=None,
                        help="pairs.txt-style file or CSV path1,path2,same (default: none, pairs are drawn)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="leave out the pairs naming an image that is not in --data-dir, listed in "
                             "<name>.missing.txt (default: off, such a run writes no .bin)")
    parser.add_argument("--n-pairs", type=int, default=3000,
                        help="pairs to draw when --pairs is not given (default 3000)")
    parser.add_argument("--n-gender", type=int, default=2000,
                        help="images of the gender-leakage test, half of each gender (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn pairs and gender subset (default 0)")
    parser.add_argument("--two-item", action="store_true",
                        help="write insightface's 2-item format (verification pairs only, no gender test; "
                             "default: off, the authors' 5 items)")
    args = parser.parse_args(argv)

    def body() -> None:
        built = make_bin(args.data_dir, args.out, args.pairs, args.n_pairs, args.n_gender, args.seed, args.two_item,
                         args.allow_missing)
        print(built.summary())
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
