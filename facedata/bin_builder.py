"""Build an evaluation .bin (the authors' 5-item format) from a ``subjectid_gender`` folder.

    python tools/make_bin.py --data-dir DIR --out rec/mydata.bin [--pairs FILE] [--n-pairs 3000]
                             [--n-gender 2000] [--seed 0]

Pairs come from --pairs, either insightface/LFW ``pairs.txt`` style (``name i j`` for a genuine pair,
``name1 i name2 j`` for an impostor pair; ``name`` is a folder name with or without its _0/_1 suffix, ``i`` the
image ``name_000i.*`` or else the i-th image of the folder in sorted order, counted from 1) or a CSV of
``path1,path2,same`` rows (paths relative to --data-dir; same = 1/0/true/false). Without --pairs, --n-pairs
pairs are drawn with --seed, genuine and impostor alternating so that each of the protocol's 10 folds holds
both. The gender test set is --n-gender images drawn evenly from the two genders. Image files are stored as
they are (not re-encoded), so decoding gives the original pixels.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path


import numpy as np

from facedata.binfile import write_bin
from facedata.dataset import TrainIndex, scan_dataset
from utils.errors import UserError, run_cli
from utils.io import check_creatable


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


def _resolve_image(index: TrainIndex, name: str, number: str, where: str) -> int:
    folders = [i for i, f in enumerate(index.folders) if f == name or f.rpartition("_")[0] == name]
    if not folders:
        raise UserError(f"{where}: no folder named '{name}' (or '{name}_0'/'{name}_1') in '{index.root}'.")
    k = folders[0]
    imgs = np.flatnonzero(index.labels == k)
    try:
        i = int(number)
    except ValueError:
        raise UserError(f"{where}: '{number}' is not an image number.") from None
    for j in imgs:
        if index.paths[j].stem == f"{name}_{i:04d}":
            return int(j)
    if not 1 <= i <= len(imgs):
        raise UserError(f"{where}: folder '{index.folders[k]}' has {len(imgs)} images, no image {i}.")
    return int(imgs[i - 1])


def read_pairs(path: Path, index: TrainIndex) -> list[tuple[int, int, bool]]:
    """Pairs from a pairs.txt-style file or a CSV of path1,path2,same."""
    if not path.is_file():
        raise UserError(f"pairs file '{path}' (--pairs) does not exist.")
    pairs = []
    if path.suffix.lower() == ".csv":
        lookup = {p.relative_to(index.root).as_posix(): i for i, p in enumerate(index.paths)}
        with open(path, newline="") as fh:
            for n, row in enumerate(csv.reader(fh), start=1):
                if not row or (n == 1 and row[-1].strip().lower() in ("same", "issame", "label")):
                    continue
                where = f"pairs file '{path}' line {n}"
                if len(row) != 3:
                    raise UserError(f"{where}: expected path1,path2,same; got {row}.")
                flag = row[2].strip().lower()
                if flag not in ("1", "0", "true", "false", "same", "different"):
                    raise UserError(f"{where}: same must be 1/0/true/false, got '{row[2]}'.")
                ids = []
                for rel in row[:2]:
                    if rel.strip() not in lookup:
                        raise UserError(f"{where}: image '{rel.strip()}' is not in '{index.root}'.")
                    ids.append(lookup[rel.strip()])
                pairs.append((ids[0], ids[1], flag in ("1", "true", "same")))
        return pairs
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        where = f"pairs file '{path}' line {n}"
        if not parts or (n == 1 and all(p.isdigit() for p in parts)):
            continue
        if len(parts) == 3:
            pairs.append((_resolve_image(index, parts[0], parts[1], where),
                          _resolve_image(index, parts[0], parts[2], where), True))
        elif len(parts) == 4:
            pairs.append((_resolve_image(index, parts[0], parts[1], where),
                          _resolve_image(index, parts[2], parts[3], where), False))
        else:
            raise UserError(f"{where}: expected 'name i j' or 'name1 i name2 j', got '{line}'.")
    return pairs


def build_bin(data_dir: str | Path, out: str | Path, pairs_file: str | Path | None = None, n_pairs: int = 3000,
              n_gender: int = 2000, seed: int = 0, two_item: bool = False) -> Path:
    """Write a 5-item .bin for the images under ``data_dir``; returns its path."""
    out = Path(out)
    if os.path.lexists(out):
        raise UserError(f"'{out}' already exists; choose another --out (existing files are never overwritten).")
    check_creatable(out, "--out")
    if not pairs_file and n_pairs < 1:
        raise UserError(f"--n-pairs {n_pairs}: the number of verification pairs to draw must be at least 1 (the "
                        f"paper's protocol uses 3000, the default), or give a --pairs file.")
    if not two_item and n_gender < 2:
        raise UserError(f"--n-gender {n_gender}: the gender test needs at least 2 images (one of each gender; the "
                        f"default is 2000); for verification pairs only, write the 2-item format with --two-item.")
    index = scan_dataset(data_dir, option="--data-dir")
    rng = np.random.default_rng(seed)
    pairs = read_pairs(Path(pairs_file), index) if pairs_file else draw_pairs(index, n_pairs, rng)
    if not pairs:
        raise UserError(f"no pairs were read from pairs file '{pairs_file}' (--pairs): it holds no pair lines. "
                        f"Check the file, or leave --pairs out to draw --n-pairs pairs.")
    if not two_item:
        per_gender = {g: int(np.sum(index.genders == g)) for g in (0, 1)}
        if n_gender // 2 > min(per_gender.values()):
            raise UserError(f"--n-gender {n_gender} asks for {n_gender // 2} images of each gender, but "
                            f"'{index.root}' holds {per_gender[0]} of gender 0 and {per_gender[1]} of gender 1. "
                            f"Choose --n-gender {2 * min(per_gender.values())} or less.")
    gender_idx = draw_gender_subset(index, n_gender, rng)
    data = [p.read_bytes() for p in index.paths]
    pair_images = [data[i] for a, b, _ in pairs for i in (a, b)]
    write_bin(out, pair_images, [s for _, _, s in pairs], [data[i] for i in gender_idx],
              index.labels[gender_idx].tolist(), index.genders[gender_idx].tolist(), two_item=two_item)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder of subjectid_gender folders")
    parser.add_argument("--out", required=True, help="the .bin to write (must not exist)")
    parser.add_argument("--pairs", default=None, help="pairs.txt-style file or CSV path1,path2,same")
    parser.add_argument("--n-pairs", type=int, default=3000, help="pairs to draw when --pairs is not given")
    parser.add_argument("--n-gender", type=int, default=2000, help="images of the gender-leakage test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn pairs and gender subset")
    parser.add_argument("--two-item", action="store_true",
                        help="write insightface's 2-item format (verification pairs only, no gender test)")
    args = parser.parse_args(argv)

    def body() -> None:
        out = build_bin(args.data_dir, args.out, args.pairs, args.n_pairs, args.n_gender, args.seed, args.two_item)
        print(f"wrote {out}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
