"""tools/make_bin.py (facedata/bin_builder.py): pairs exactly as named, LFW's two pairs.txt layouts, the sidecar."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import KFold

from facedata.bin_builder import main, make_bin
from facedata.binfile import load_bin
from utils.errors import UserError

PEOPLE = {"Ann_Lee": (1, 4), "Bob_Ray": (0, 3), "Cid_Roe": (0, 2), "Dee_Fox": (1, 3)}   # name: (gender, images)


def lfw_folder(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """A prepared LFW-like folder: Name_g/Name_000i.jpg, each file's bytes distinct; ``skip``: files left out."""
    for name, (gender, n) in PEOPLE.items():
        folder = root / f"{name}_{gender}"
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            if f"{name}_{i:04d}" not in skip:
                (folder / f"{name}_{i:04d}.jpg").write_bytes(f"image of {name} number {i}".encode())
    return root


def named(root: Path, name: str, i: int) -> bytes:
    return (root / f"{name}_{PEOPLE[name][0]}" / f"{name}_{i:04d}.jpg").read_bytes()


def test_a_pair_naming_a_missing_image_is_refused_then_dropped_never_substituted(tmp_path):
    root = lfw_folder(tmp_path / "lfw", skip=("Ann_Lee_0002",))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("Ann_Lee\t1\t2\nAnn_Lee\t1\t3\nAnn_Lee\t1\tBob_Ray\t2\nGone_Guy\t1\tBob_Ray\t1\n")
    out = tmp_path / "eval" / "lfw.bin"
    with pytest.raises(UserError, match=r"2 of the 4 pairs.*2 images.*--allow-missing") as err:
        make_bin(root, out, pairs, n_gender=4)
    assert "per fold" in str(err.value) and not out.exists() and not out.with_suffix(".pairs.csv").exists()
    report = out.with_suffix(".missing.txt").read_text()
    rows = [line.split("\t") for line in report.splitlines() if not line.startswith("#")]
    assert [(r[0], r[2]) for r in rows] == [("1", "Ann_Lee_1/Ann_Lee_0002.* (no such image)"),
                                           ("4", "Gone_Guy_0001 (no folder 'Gone_Guy' or 'Gone_Guy_0'/'Gone_Guy_1')")]
    # per fold of 10 consecutive blocks of the 4 pairs: blocks [0], [1], [2], [3], then empty ones
    assert "1: 1, 2: 0, 3: 0, 4: 1, 5: 0" in report

    built = make_bin(root, out, pairs, n_gender=4, allow_missing=True)
    assert (built.pairs, built.genuine, built.dropped) == (2, 1, 2)
    with open(out, "rb") as fh:   # the .bin's own bytes: exactly the named files, nothing in place of the missing
        bins, issame = pickle.load(fh)[:2]
    assert [bytes(b) for b in bins] == [named(root, "Ann_Lee", 1), named(root, "Ann_Lee", 3),
                                        named(root, "Ann_Lee", 1), named(root, "Bob_Ray", 2)]
    assert issame == [True, False]
    assert out.with_suffix(".missing.txt").read_text() == report   # the report stays beside the .bin


def test_a_users_file_where_the_report_goes_is_never_overwritten(tmp_path):
    root = lfw_folder(tmp_path / "lfw", skip=("Ann_Lee_0002",))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("Ann_Lee 1 2\nAnn_Lee 1 3\n")
    mine = tmp_path / "lfw.missing.txt"
    mine.write_bytes(b"my notes\n")
    with pytest.raises(UserError, match="never overwritten"):
        make_bin(root, tmp_path / "lfw.bin", pairs, n_gender=4, allow_missing=True)
    assert mine.read_bytes() == b"my notes\n" and not (tmp_path / "lfw.bin").exists()


def test_the_ith_image_only_in_folders_without_the_naming_and_said(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    other = root / "Eve_Kim_1"
    other.mkdir()
    for name in ("b.jpg", "a.jpg", "c.jpg"):
        (other / name).write_bytes(name.encode())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("Eve_Kim 1 3\nEve_Kim 2 Ann_Lee 4\n")
    built = make_bin(root, tmp_path / "x.bin", pairs, n_gender=4)
    assert [bytes(b) for b in load_bin(built.path).pair_images] == [b"a.jpg", b"c.jpg", b"b.jpg",
                                                                     named(root, "Ann_Lee", 4)]
    assert any("Eve_Kim_1" in n and "i-th image" in n for n in built.notes)
    assert "Eve_Kim_1" in built.summary()


def lfw_pairs(folds: int, n: int, rng: np.random.Generator) -> list[tuple[list[str], list[str]]]:
    """Per fold: n genuine and n impostor pairs.txt lines (every pair distinct enough to tell apart)."""
    names = list(PEOPLE)
    blocks = []
    for _ in range(folds):
        genuine, impostor = [], []
        for _ in range(n):
            name = names[rng.integers(len(names))]
            i, j = rng.choice(PEOPLE[name][1], 2, replace=False) + 1
            genuine.append(f"{name}\t{i}\t{j}")
            a, b = rng.choice(len(names), 2, replace=False)
            impostor.append(f"{names[a]}\t{rng.integers(PEOPLE[names[a]][1]) + 1}\t"
                            f"{names[b]}\t{rng.integers(PEOPLE[names[b]][1]) + 1}")
        blocks.append((genuine, impostor))
    return blocks


def test_both_lfw_layouts_give_the_same_bin_whose_folds_are_lfws(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    blocks = lfw_pairs(10, 3, np.random.default_rng(0))
    published = tmp_path / "pairs.txt"
    published.write_text("10\t3\n" + "".join("\n".join(g + i) + "\n" for g, i in blocks))
    regrouped = tmp_path / "pairs_regrouped.txt"
    regrouped.write_text("10 3\n" + "\n".join(line for g, _ in blocks for line in g) + "\n"
                         + "\n".join(line for _, i in blocks for line in i) + "\n")
    a = make_bin(root, tmp_path / "a.bin", published, n_gender=4)
    b = make_bin(root, tmp_path / "b.bin", regrouped, n_gender=4)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sidecar.read_bytes() == b.sidecar.read_bytes()
    assert any("regrouped" in n for n in b.notes) and not a.notes
    # the protocol's folds (KFold(10) without shuffle over the pair order) are exactly LFW's folds
    es = load_bin(a.path)
    for k, (_, test) in enumerate(KFold(n_splits=10, shuffle=False).split(es.issame)):
        genuine, impostor = blocks[k]
        expected = []
        for line in genuine + impostor:
            p = line.split("\t")
            ends = [(p[0], p[1]), (p[0], p[2])] if len(p) == 3 else [(p[0], p[1]), (p[2], p[3])]
            expected += [named(root, name, int(i)) for name, i in ends]
        got = [es.pair_images[2 * t + s] for t in test for s in (0, 1)]
        assert got == expected and es.issame[test].tolist() == [True] * 3 + [False] * 3


def test_a_header_that_does_not_fit_the_lines_is_refused(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 1\n")
    with pytest.raises(UserError, match="announces 2 folds"):
        make_bin(root, tmp_path / "x.bin", pairs, n_gender=4)
    pairs.write_text("1\t2\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 1\nAnn_Lee 1 3\nAnn_Lee 1 Bob_Ray 2\n")
    with pytest.raises(UserError, match="neither"):
        make_bin(root, tmp_path / "x.bin", pairs, n_gender=4)


def test_the_sidecar_rows_are_the_bins_pairs(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    for pairs_file in (None, tmp_path / "pairs.csv"):
        if pairs_file is not None:
            pairs_file.write_text("path1,path2,same\nAnn_Lee_1/Ann_Lee_0001.jpg,Ann_Lee_1/Ann_Lee_0004.jpg,1\n"
                                  "Cid_Roe_0/Cid_Roe_0002.jpg,Dee_Fox_1/Dee_Fox_0003.jpg,0\n")
        out = tmp_path / f"set{pairs_file is None}.bin"
        built = make_bin(root, out, pairs_file, n_pairs=12, n_gender=4, seed=3)
        es = load_bin(out)
        with open(out.with_suffix(".pairs.csv"), newline="") as fh:
            reader = csv.reader(fh)
            assert next(reader) == ["pair", "image_a", "image_b", "subject_a", "subject_b", "gender_a", "gender_b"]
            rows = list(reader)
        assert len(rows) == len(es.issame) == built.pairs
        for k, (pair, img_a, img_b, subj_a, subj_b, g_a, g_b) in enumerate(rows):
            assert int(pair) == k
            assert (root / img_a).read_bytes() == es.pair_images[2 * k]
            assert (root / img_b).read_bytes() == es.pair_images[2 * k + 1]
            for img, subj, g in ((img_a, subj_a, g_a), (img_b, subj_b, g_b)):
                folder = Path(img).parts[0]
                assert subj == folder[:-2] and g == {"1": "f", "0": "m"}[folder[-1]]
            assert (subj_a == subj_b) == bool(es.issame[k])


def test_a_sidecar_already_there_is_never_overwritten(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    side = tmp_path / "x.pairs.csv"
    side.write_bytes(b"mine")
    with pytest.raises(UserError, match="never overwritten"):
        make_bin(root, tmp_path / "x.bin", None, n_pairs=4, n_gender=4)
    assert side.read_bytes() == b"mine" and not (tmp_path / "x.bin").exists()


def test_make_bin_prints_the_counts_and_help_shows_every_default(tmp_path, capsys):
    root = lfw_folder(tmp_path / "lfw")
    assert main(["--data-dir", str(root), "--out", str(tmp_path / "x.bin"), "--n-pairs", "10", "--n-gender", "4"]) == 0
    out = capsys.readouterr().out
    assert "10 pairs (5 genuine, 5 impostor), 4 gender-test images (2 feminine, 2 masculine)" in out
    assert "x.pairs.csv" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default 3000)", "(default 2000)", "(default 0)", "(default: none, pairs are drawn)",
                    "(default: off, such a run writes no .bin)"):
        assert default in text
