import logging
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones
from helpers import TinyNet, template_cache, tiny_backbone_file, write_png
from facedata.bin_builder import build_bin
from facedata.binfile import load_bin
from templates.cache import folder_inputs
from config.loading import load_config
from facedata.dataset import balanced_epoch, decode_image, scan_dataset, to_tensor
from utils.errors import UserError


def rand_img(rng, h=112, w=112, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8) if c else rng.integers(0, 256, (h, w), dtype=np.uint8)


def make_folder(root, spec, rng):
    """spec: {folder: n_images}"""
    for name, n in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            write_png(root / name / f"{j:03d}.png", rand_img(rng))
    return root


def test_scan_assigns_sorted_labels_and_genders(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path, {"b_1": 2, "a_0": 3, "c_x_1": 1, ".hidden_0": 2}, rng)
    (tmp_path / "a_0" / ".DS_Store").write_text("x")
    idx = scan_dataset(tmp_path)
    assert idx.folders == ["a_0", "b_1", "c_x_1"]
    assert idx.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert idx.genders.tolist() == [0, 0, 0, 1, 1, 1]
    assert idx.identity_gender.tolist() == [0, 1, 1]


def test_broken_dataset_reports_every_problem_at_once(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path, {"0001_1": 2, "0002_0": 2, "abc": 1, "0003_2": 1}, rng)
    (tmp_path / "0004_0").mkdir()
    (tmp_path / "0005_1").mkdir()
    (tmp_path / "0005_1" / "notes.txt").write_text("hello")
    (tmp_path / "0005_1" / "zero.png").write_bytes(b"")
    with pytest.raises(UserError) as err:
        scan_dataset(tmp_path)
    msg = str(err.value)
    for needle in ("'abc'", "'0003_2'", "'0004_0': holds no images", "0005_1/notes.txt", "0005_1/zero.png",
                   "empty (0 bytes)", str(tmp_path)):
        assert needle in msg, needle


def test_missing_empty_and_single_gender_roots(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no identity folders"):
        scan_dataset(tmp_path / "empty")
    make_folder(tmp_path / "one", {"a_1": 1, "b_1": 1}, np.random.default_rng(0))
    with pytest.raises(UserError, match="only gender 1"):
        scan_dataset(tmp_path / "one")


def test_sampler_balances_genders_on_unbalanced_data():
    genders = np.array([0] * 900 + [1] * 100)
    counts = np.zeros(2)
    for epoch in range(20):
        idx, flips = balanced_epoch(genders, seed=0, epoch=epoch)
        assert len(idx) == 1000
        counts += np.bincount(genders[idx.numpy()], minlength=2)
        assert 0.4 < flips.float().mean() < 0.6
    assert counts[1] / counts.sum() == pytest.approx(0.5, abs=0.02)
    a, _ = balanced_epoch(genders, 0, 3)
    b, _ = balanced_epoch(genders, 0, 3)
    assert torch.equal(a, b)


def test_decoding_converts_like_imread_color(tmp_path):
    rng = np.random.default_rng(0)
    for name, img in {"gray.png": rand_img(rng, c=0), "rgba.png": rand_img(rng, c=4),
                      "deep.png": rng.integers(0, 65536, (112, 112, 3), dtype=np.uint16)}.items():
        path = write_png(tmp_path / name, img)
        got, resized = decode_image(path.read_bytes())
        want = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert not resized and got.dtype == np.uint8 and np.array_equal(got, want), name
    path = write_png(tmp_path / "big.png", rand_img(rng, 150, 120))
    got, resized = decode_image(path.read_bytes())
    assert resized and got.shape == (112, 112, 3)
    x = to_tensor(got)
    assert x.shape == (3, 112, 112) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, (torch.from_numpy(got).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)


def decoded(data):
    return decode_image(data)[0]


def test_bins_round_trip_pixel_identical(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "d", {f"{k:03d}_{k % 2}": 3 for k in range(12)}, rng)
    out = build_bin(tmp_path / "d", tmp_path / "x.bin", n_pairs=40, n_gender=10, seed=1)
    es = load_bin(out)
    idx = scan_dataset(tmp_path / "d")
    originals = [decoded(p.read_bytes()) for p in idx.paths]
    assert len(es.pair_images) == 80 and len(es.issame) == 40 and len(es.gender_images) == 10
    assert es.issame[0::2].all() and not es.issame[1::2].any()
    for data in es.pair_images + es.gender_images:
        img = decoded(data)
        assert any(np.array_equal(img, o) for o in originals)
    assert sorted(np.bincount(es.gender_labels).tolist()) == [5, 5]
    with pytest.raises(UserError, match="already exists"):
        build_bin(tmp_path / "d", out)
    # pairs from a CSV and from a pairs.txt
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("path1,path2,same\n000_0/000.png,000_0/001.png,1\n000_0/000.png,001_1/002.png,0\n")
    es2 = load_bin(build_bin(tmp_path / "d", tmp_path / "c.bin", pairs_file=csv_file, n_gender=4))
    assert es2.issame.tolist() == [True, False]
    assert np.array_equal(decoded(es2.pair_images[3]), decoded((tmp_path / "d/001_1/002.png").read_bytes()))
    es2b = load_bin(build_bin(tmp_path / "d", tmp_path / "two.bin", pairs_file=csv_file, two_item=True))
    assert not es2b.has_gender and es2b.issame.tolist() == [True, False]
    assert [decoded(d).tobytes() for d in es2b.pair_images] == [decoded(d).tobytes() for d in es2.pair_images]
    txt = tmp_path / "pairs.txt"
    txt.write_text("1\t1\n000 1 3\n000 1 001 3\n")
    es3 = load_bin(build_bin(tmp_path / "d", tmp_path / "t.bin", pairs_file=txt, n_gender=4))
    assert es3.issame.tolist() == [True, False]
    assert np.array_equal(decoded(es3.pair_images[1]), decoded((tmp_path / "d/000_0/002.png").read_bytes()))
    assert np.array_equal(decoded(es3.pair_images[3]), decoded((tmp_path / "d/001_1/002.png").read_bytes()))


def py2_pickle(images, flags):
    """A pickle as Python 2 wrote insightface's bins: str (BINSTRING) images and a list of bools."""
    out = b"\x80\x02(](" + b"".join(b"T" + len(d).to_bytes(4, "little") + d for d in images) + b"e](" \
        + b"".join(b"\x88" if f else b"\x89" for f in flags) + b"et."
    return out


def test_two_item_python2_and_numpy1_bins_load(tmp_path, caplog):
    rng = np.random.default_rng(0)
    imgs = [cv2.imencode(".png", rand_img(rng))[1].tobytes() for _ in range(4)]
    p2 = tmp_path / "lfw.bin"
    p2.write_bytes(py2_pickle(imgs, [True, False]))
    with caplog.at_level(logging.WARNING):
        es = load_bin(p2)
    assert es.issame.tolist() == [True, False] and not es.has_gender and "verification only" in caplog.text
    assert np.array_equal(decoded(es.pair_images[2]), decoded(imgs[2]))
    # numpy-1 pickles name numpy.core.multiarray; under numpy 2 that module is numpy._core
    arrs = [np.frombuffer(d, dtype=np.uint8) for d in imgs]
    data = pickle.dumps((arrs, [True, False], arrs[:2], np.array([0, 1]), np.array([1, 0])), protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    p1 = tmp_path / "np1.bin"
    p1.write_bytes(data)
    es = load_bin(p1)
    assert es.gender_labels.tolist() == [1, 0] and np.array_equal(decoded(es.pair_images[0]), decoded(imgs[0]))


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "eval", "subprocess"])
def test_malicious_bin_is_refused_and_never_runs(tmp_path, kind):
    target = tmp_path / "pwned"
    import subprocess
    payload = {"os.system": Evil(os.system, f"touch {target}"),
               "eval": Evil(eval, f"open({str(target)!r}, 'w').close()"),
               "subprocess": Evil(subprocess.call, ["touch", str(target)])}[kind]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [payload]), protocol=2))
    with pytest.raises(UserError, match="refused"):
        load_bin(path)
    assert not target.exists()


def test_bin_structure_errors(tmp_path):
    cases = {
        "dict.bin": pickle.dumps({"a": 1}),
        "three.bin": pickle.dumps(([b"a"], [True], [b"x"])),
        "lengths.bin": pickle.dumps(([b"a", b"b", b"c"], [True])),
        "gender.bin": pickle.dumps(([b"a", b"b"], [True], [b"x", b"y"], [0], [1, 0])),
        "labels.bin": pickle.dumps(([b"a", b"b"], [True], [b"x"], [0], [3])),
    }
    full = pickle.dumps(([b"a" * 100, b"b" * 100], [True]))
    cases["truncated.bin"] = full[: len(full) // 2]
    msgs = {"dict.bin": "expected the authors' 5 items", "three.bin": "3-item", "lengths.bin": "two images per flag",
            "gender.bin": "same length", "labels.bin": "0 or 1", "truncated.bin": "truncated"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=msgs[name]) as err:
            load_bin(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_bin(tmp_path / "missing.bin")


@pytest.fixture
def tiny_arch(monkeypatch):
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyNet)


def test_cache_equals_direct_backbone_and_invalidates(tmp_path, tiny_arch, caplog):
    rng = np.random.default_rng(0)
    root = make_folder(tmp_path / "d", {f"{k}_{k % 2}": 3 for k in range(4)}, rng)
    weights = tiny_backbone_file(tmp_path / "w.pth")
    cfg = load_config(None, ["network=tiny", f"output_ori={weights}", f"cache_dir={tmp_path / 'cache'}",
                             "num_workers=0", "extract_batch_size=5"])
    idx = scan_dataset(root)
    net = backbones.load_backbone("tiny", weights)

    def get():
        return template_cache(cfg).get("train", folder_inputs(root, idx.paths), idx.paths)
    t = get()
    x = torch.stack([to_tensor(decoded(p.read_bytes())) for p in idx.paths])
    with torch.no_grad():
        direct, direct_flip = net(x), net(x.flip(3))
    np.testing.assert_allclose(t.templates[:, 0], F.normalize(direct).numpy(), atol=1e-5)
    np.testing.assert_allclose(t.templates[:, 1], F.normalize(direct_flip).numpy(), atol=1e-5)
    np.testing.assert_allclose(t.raw(slice(None), 1).numpy(), direct_flip.numpy(), rtol=1e-5, atol=1e-5)
    g = t.gather(torch.tensor([3, 0, 3]), torch.tensor([True, False, False]))
    np.testing.assert_allclose(g.numpy(), np.stack([t.templates[3, 1], t.templates[0, 0], t.templates[3, 0]]))
    with caplog.at_level(logging.INFO):
        again = get()
    assert "template cache hit" in caplog.text and again.path == t.path
    # one changed image -> another key
    write_png(idx.paths[0], rand_img(rng))
    os.utime(idx.paths[0], ns=(1, 1))
    changed = get()
    assert changed.path != t.path and not np.allclose(changed.templates[0], t.templates[0])
    np.testing.assert_array_equal(changed.templates[1:], t.templates[1:])
    # other weights -> another key
    tiny_backbone_file(weights, seed=1)
    assert get().path not in (t.path, changed.path)


def test_undecodable_image_is_named_and_nothing_is_cached(tmp_path, tiny_arch):
    rng = np.random.default_rng(0)
    root = make_folder(tmp_path / "d", {"a_0": 2, "b_1": 2}, rng)
    (root / "b_1" / "broken.png").write_bytes(b"\x89PNG not really")
    good = (root / "a_0" / "000.png").read_bytes()
    (root / "a_0" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "a_0" / "text.jpg").write_text("this is not a JPEG")
    weights = tiny_backbone_file(tmp_path / "w.pth")
    cfg = load_config(None, ["network=tiny", f"output_ori={weights}", f"cache_dir={tmp_path / 'cache'}",
                             "num_workers=0"])
    idx = scan_dataset(root)
    with pytest.raises(UserError, match="3 problem") as err:
        template_cache(cfg).get("train", folder_inputs(root, idx.paths), idx.paths)
    for name in ("broken.png", "truncated.png", "text.jpg"):
        assert name in str(err.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".rows"]   # finished rows only, no entry


def test_float16_cache_is_close_to_float32(tmp_path, tiny_arch):
    rng = np.random.default_rng(0)
    root = make_folder(tmp_path / "d", {"a_0": 3, "b_1": 3}, rng)
    weights = tiny_backbone_file(tmp_path / "w.pth")
    idx = scan_dataset(root)
    out = {}
    for dtype in ("float32", "float16"):
        cfg = load_config(None, ["network=tiny", f"output_ori={weights}", f"cache_dir={tmp_path / 'c'}",
                                 f"cache_dtype={dtype}", "num_workers=0"])
        t = template_cache(cfg).get("train", folder_inputs(root, idx.paths), idx.paths)
        out[dtype] = t
    assert out["float16"].templates.dtype == np.float16 and out["float16"].path != out["float32"].path
    np.testing.assert_allclose(out["float16"].templates.astype(np.float32), out["float32"].templates, atol=1e-3)
