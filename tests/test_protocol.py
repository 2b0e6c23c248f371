"""The two gender-test protocols: ``folders`` against the paper-era computation (commit f6453c5 of the authors'
repository: cv2.imread, cv2.resize to 112x112, BGR -> RGB, (x/255 - 0.5)/0.5, backbone, normalise, layer, no flip,
sklearn's normalize, StratifiedGroupKFold(3) and the three classifiers with probability=True) written out here with
OpenCV and scikit-learn; bad inputs; the plans (``bins`` unchanged byte for byte: test_demo.py)."""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import normalize
from sklearn.svm import SVC

from backbones import ProjectionLayer
from config.loading import load_config
from eval.evalset import evaluate_set, model_templates
from eval.gender_folders import check_and_record_protocol, check_gender_folders, open_protocol_set
from facedata.binfile import write_bin
from helpers import TinyNet, template_cache, tiny_backbone_file
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _face(rng: np.random.Generator, gender: int, identity: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A BGR image whose colours carry the gender and whose pattern carries the identity, plus noise."""
    h, w = shape
    base = cv2.resize(identity, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.float64)
    img = base + rng.normal(0, 20, (h, w, 3)) + np.array([0, 0, 40.0]) * gender
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A folder world (two genders, 24 identities of 4-6 images: most 112x112, some other sizes, PNG and JPEG), a
    2-item insightface-style .bin, a TinyNet backbone and a random privacy layer."""
    root = tmp_path_factory.mktemp("folderworld")
    rng = np.random.default_rng(3)
    folder = root / "faces"
    pair_images = []
    for k in range(24):
        g = k % 2
        ident = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        d = folder / f"{k:04d}_{g}"
        d.mkdir(parents=True)
        for j in range(4 + k % 3):
            shape = (112, 112) if j % 3 else [(128, 100), (96, 140), (250, 250)][k % 3]   # not 112: squeezed
            img = _face(rng, g, ident, shape)
            ext = ".jpg" if (k + j) % 4 == 0 else ".png"
            cv2.imwrite(str(d / f"img{j:02d}{ext}"), img)
            if j < 2 and k < 20:
                pair_images.append(cv2.imencode(".png", _face(rng, g, ident, (112, 112)))[1].tobytes())
    issame = [bool(i % 2) for i in range(len(pair_images) // 2)]
    write_bin(root / "rec" / "faces.bin", pair_images, issame, [], [], [], two_item=True)
    backbone = tiny_backbone_file(root / "backbone.pth")
    torch.manual_seed(1)
    layer = ProjectionLayer(512, 512, 2).eval()
    return {"root": root, "folder": folder, "backbone": backbone, "layer": layer}


def _cfg(world: dict, *extra: str):
    root = world["root"]
    return load_config(None, ["network=tiny", f"output_ori={world['backbone']}",
                              f"rec={root / 'rec'}", f"cache_dir={root / 'cache'}", "num_workers=0", "device=cpu",
                              "test_targets=['faces']", "gender_protocol=folders",
                              f"gender_folders={{'faces': '{world['folder']}'}}", *extra])


@pytest.fixture
def tiny(monkeypatch):
    """TinyNet as backbone 'tiny' for the test's duration."""
    import backbones
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyNet)


def paper_era(folder: Path, backbone: torch.nn.Module, layer: torch.nn.Module | None, flip: bool = False,
              crop: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """The paper-era gender test written out: features, genders, identities and each classifier's BACC (``flip``
    and ``crop`` switch in what the paper-era code did NOT do, to show that the test sees them)."""
    files, genders, ids = [], [], []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            files.append(f)
            ids.append(d.name)
            genders.append(int(d.name.rsplit("_", 1)[1]))
    blobs = []
    for f in files:
        img = cv2.imread(str(f))
        if crop and img.shape[:2] != (112, 112):   # this suite's training loader: short side to 112, centre crop
            h, w = img.shape[:2]
            nh, nw = (112 * h // w, 112) if h > w else (112, 112 * w // h)
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)
            img = img[(nh - 112) // 2:(nh - 112) // 2 + 112, (nw - 112) // 2:(nw - 112) // 2 + 112]
        img = cv2.resize(img, (112, 112))
        blobs.append(np.transpose(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (2, 0, 1)))
    with torch.no_grad():
        x = torch.Tensor(np.stack(blobs))
        x.div_(255).sub_(0.5).div_(0.5)
        feat = backbone(x) + (backbone(x.flip(3)) if flip else 0)
        if layer is not None:
            feat = layer(F.normalize(feat))
    features = normalize(feat.numpy())
    y, groups = np.array(genders), np.array(ids)
    models = {"LogReg": LogisticRegression(), "SVM": SVC(kernel="linear", probability=True),
              "RBF": SVC(kernel="rbf", probability=True)}
    bacc: dict[str, list[float]] = {k: [] for k in models}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # probability=True is deprecated in scikit-learn 1.9; lbfgs may not converge
        for train, test in StratifiedGroupKFold(n_splits=3, shuffle=False).split(features, y, groups):
            for name, model in models.items():
                pred = model.fit(features[train], y[train]).predict(features[test])
                bacc[name].append(balanced_accuracy_score(y[test], pred))
    return features, y, groups, {k: sum(v) / len(v) for k, v in bacc.items()}


@pytest.mark.parametrize("with_layer", [False, True])
def test_folders_protocol_equals_the_paper_era_computation(world, tiny, with_layer):
    cfg = _cfg(world)
    ev = open_protocol_set(template_cache(cfg), cfg, "faces")
    backbone = TinyNet()
    backbone.load_state_dict(torch.load(world["backbone"], weights_only=True))
    backbone.eval()
    layer = world["layer"] if with_layer else None
    features, y, groups, expected = paper_era(world["folder"], backbone, layer)
    _, gen = model_templates(ev, layer)
    ours = gen / np.linalg.norm(gen, axis=1, keepdims=True)
    assert ours.shape == features.shape == (len(y), 512)
    assert np.abs(ours - features).max() < 1e-5            # the same templates, image by image, in the same order
    assert list(ev.gender_labels) == list(y)
    _, ids = np.unique(groups, return_inverse=True)
    assert list(ev.id_labels) == list(ids)
    # the details the test must see: a flip-summed template, or this suite's crop-resize, differs
    flipped, *_ = paper_era(world["folder"], backbone, layer, flip=True)
    cropped, *_ = paper_era(world["folder"], backbone, layer, crop=True)
    assert np.abs(ours - flipped).max() > 1e-3 and np.abs(ours - cropped).max() > 1e-3
    res = evaluate_set(ev, layer)
    for k, v in expected.items():
        assert res[f"BACC-Gender-{k}"] == pytest.approx(v, abs=1e-12), k
    assert res["BACC-Gender-AVG"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_verification_is_the_bins_own_under_either_protocol(world, tiny):
    """Only the gender test moves: EER and TAR come from the same .bin pairs under both protocols."""
    folders = _cfg(world)
    ev_f = open_protocol_set(template_cache(folders), folders, "faces")
    ev_b = open_protocol_set(template_cache(folders), _cfg(world, "gender_protocol=bins"), "faces")
    assert len(ev_b.gender_labels) == 0 and len(ev_f.gender_labels) > 100
    a, b = evaluate_set(ev_f, world["layer"]), evaluate_set(ev_b, world["layer"])
    assert (a["EER"], a["TAR@FAR=0.1%"]) == (b["EER"], b["TAR@FAR=0.1%"])


def test_probability_true_does_not_change_svc_predictions():
    """Why our SVMs skip the authors' probability=True (5 internal fits for Platt scaling): predict() is the same."""
    rng = np.random.default_rng(0)
    x = normalize(rng.normal(size=(300, 32)) + np.outer(rng.integers(0, 2, 300), rng.normal(size=32)) * 0.3)
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kernel in ("linear", "rbf"):
            plain = SVC(kernel=kernel).fit(x[:200], y[:200]).predict(x[200:])
            platt = SVC(kernel=kernel, probability=True).fit(x[:200], y[:200]).predict(x[200:])
            assert np.array_equal(plain, platt)


def _write(folder: Path, names: dict[str, int]) -> Path:
    for name, n in names.items():
        (folder / name).mkdir(parents=True)
        for j in range(n):
            cv2.imwrite(str(folder / name / f"{j}.png"), np.zeros((112, 112, 3), np.uint8))
    return folder


def test_bad_folder_inputs_are_one_paragraph_errors(tmp_path):
    one_gender = _write(tmp_path / "one", {"a_1": 2, "b_1": 2})
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = _write(tmp_path / "noimg", {"a_0": 1, "b_1": 0})

    def cfg(folders: dict, targets=("lfw",)):
        return load_config(None, ["gender_protocol=folders", f"gender_folders={folders!r}",
                                  f"test_targets={list(targets)!r}"])
    cases = [(cfg({}), ["lfw", "gender_folders"]),
             (cfg({"lfw": str(tmp_path / "nowhere")}), ["nowhere", "does not exist", "gender_folders['lfw']"]),
             (cfg({"lfw": str(one_gender)}), ["gender 1 only", "both genders", str(one_gender)]),
             (cfg({"lfw": str(empty)}), ["no identity folders", str(empty)]),
             (cfg({"lfw": str(no_images)}), ["holds no images", "b_1"]),
             (cfg({"lfw": 5}), ["gender_folders['lfw']", "is 5"])]
    for c, words in cases:
        with pytest.raises(UserError) as exc:
            check_gender_folders(c, c.test_targets)
        msg = str(exc.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
    assert check_gender_folders(cfg({}, ()), ()) == {}
    bins = load_config(None, ["test_targets=['lfw']"])
    assert bins.gender_protocol == "bins" and check_gender_folders(bins, ["lfw"]) == {}


def test_a_sweep_folder_keeps_one_protocol(tmp_path):
    folders = _write(tmp_path / "faces", {"a_0": 1, "b_1": 1})
    out, ref = tmp_path / "out", tmp_path / "ref.csv"
    bins = load_config(None, ["test_targets=['lfw']"])
    fold = load_config(None, ["test_targets=['lfw']", "gender_protocol=folders",
                              f"gender_folders={{'lfw': '{folders}'}}"])
    check_and_record_protocol(fold, out, ref, ["lfw"])
    header, line = (out / "protocol.csv").read_text().splitlines()
    # the folder's images by relative name, size and mtime (hashed as the template cache names a folder)
    digest = hashlib.sha256()
    for p in sorted(Path(folders).rglob("*.png")):
        digest.update(f"{p.relative_to(folders).as_posix()}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}\n".encode())
    assert (header, line) == ("Dataset,Protocol,Gender-Test,Images", f"lfw,folders,{folders},{digest.hexdigest()}")
    assert (tmp_path / "ref.csv.protocol.csv").is_file()
    ref.write_text("Dataset\n")   # the sweep computed it
    with pytest.raises(UserError, match="another gender-test protocol.*'lfw'.*folders.*now bins"):
        check_and_record_protocol(bins, out, tmp_path / "other_ref.csv", ["lfw"])
    with pytest.raises(UserError, match="reference file.*PIC would compare two protocols"):
        check_and_record_protocol(bins, tmp_path / "out2", ref, ["lfw"])
    check_and_record_protocol(fold, out, ref, ["lfw"])   # the same protocol again: fine
    # the folder moved together with its results (mtimes kept): the same gender test; changed images are not
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=lambda d, names: ["moved"] if Path(d) == tmp_path else [])
    moved_cfg = load_config(None, ["test_targets=['lfw']", "gender_protocol=folders",
                                   f"gender_folders={{'lfw': '{moved / 'faces'}'}}"])
    check_and_record_protocol(moved_cfg, moved / "out", moved / "ref.csv", ["lfw"])
    assert f"lfw,folders,{moved / 'faces'}," in (moved / "out" / "protocol.csv").read_text()
    image = next((moved / "faces").rglob("*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="'lfw'.*whose images have changed since"):
        check_and_record_protocol(moved_cfg, moved / "out", moved / "ref.csv", ["lfw"])
    # a protocol file written before the Images column compares the folders by path
    (moved / "out" / "protocol.csv").write_text(f"Dataset,Protocol,Gender-Test\nlfw,folders,{folders}\n")
    with pytest.raises(UserError, match="another gender-test protocol"):
        check_and_record_protocol(moved_cfg, moved / "out", moved / "ref2.csv", ["lfw"])
    check_and_record_protocol(fold, moved / "out", moved / "ref2.csv", ["lfw"])
    # results from before protocol.csv existed are the bins protocol's
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run_metrics.csv").write_text("Step\n")
    with pytest.raises(UserError, match="legacy.*another gender-test protocol"):
        check_and_record_protocol(fold, legacy, tmp_path / "ref3.csv", ["lfw"])
    check_and_record_protocol(bins, legacy, tmp_path / "ref3.csv", ["lfw"])
    assert "lfw,bins," in (legacy / "protocol.csv").read_text()
    assert not (tmp_path / "ref3.csv.protocol.csv").exists()   # a reference without one counts as bins


def test_paper_plan_dry_run_names_the_folders(tmp_path, capsys):
    from pipeline.reproduce import main
    assert main(["paper", "--dry-run", "--results", str(tmp_path / "res")]) == 1
    out = capsys.readouterr().out
    assert "gender-test folders (gender_protocol=folders" in out
    for target, folder in (("lfw", "data/train/LFW"), ("agedb_30", "data/train/AgeDB"),
                           ("colorferet", "data/train/ColorFeret"), ("vggface2", "data/train/VGGFace2_sample")):
        assert f"  {target}: {folder}  (" in out
    assert "gender-test folder of vggface2 (gender_protocol=folders): data/train/VGGFace2_sample  (README" in out
    assert "evaluation .bin: data/eval_insightface/lfw.bin" in out   # insightface's 2-item files, as the paper
    assert main(["paper_released", "--dry-run", "--results", str(tmp_path / "res")]) == 1
    released = capsys.readouterr().out
    assert "gender-test folder" not in released and "evaluation .bin" in released


def test_leakage_counts_one_class_per_label_spelling(tmp_path, capsys):
    """Issue 29 item 13: '1' and '1.0', 'f', 'F' and 'f ' are one class each, in the library and the tool."""
    from eval.gender_leakage import leakage_report
    from eval.leakage_cli import main
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(12), 5)
    gender = ids % 2
    x = rng.normal(size=(60, 16)) + np.outer(gender, np.ones(16)) * 0.5
    clean = leakage_report(x, np.where(gender, "m", "f"), ids, n_bootstrap=0).bacc
    messy = np.where(gender, "m", np.array(["f", "F", "f ", "f", "F"] * 12)[: len(ids)]).astype(object)
    assert leakage_report(x, messy, ids, n_bootstrap=0).bacc == clean
    numeric = leakage_report(x, gender, ids, n_bootstrap=0).bacc
    spelled = np.where(gender, np.array(["1", "1.0"] * 30), "0").astype(object)
    assert leakage_report(x, spelled, ids, n_bootstrap=0).bacc == numeric == clean
    np.save(tmp_path / "t.npy", x)
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["identity", "gender"], *zip(ids.tolist(), messy.tolist())])
    assert main(["--templates", str(tmp_path / "t.npy"), "--labels", str(tmp_path / "l.csv"), "--bootstrap", "0",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "'F', 'f' as 'f'" in out and "classes f (30), m (30)" in out


def test_leakage_tool_takes_the_labels_of_a_folder(tmp_path, capsys):
    """--folder DIR: identities and genders of a subjectid_gender folder, images in sorted order, as a labels CSV
    written out by hand gives them; a folder of one gender is refused by name."""
    from eval.leakage_cli import main
    folder = _write(tmp_path / "faces", {f"{k:03d}_{k % 2}": 2 + k % 3 for k in range(12)})
    rows = [(d.name, d.name[-1]) for d in sorted(folder.iterdir()) for _ in sorted(d.iterdir())]
    x = np.random.default_rng(0).normal(size=(len(rows), 8)) + np.array([float(g) for _, g in rows])[:, None]
    np.save(tmp_path / "t.npy", x)
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["identity", "gender"], *rows])
    common = ["--templates", str(tmp_path / "t.npy"), "--bootstrap", "0"]
    assert main([*common, "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--folder", str(folder), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "t_leakage.csv").read_text() == (tmp_path / "b" / "t_leakage.csv").read_text()
    one = _write(tmp_path / "one", {"a_1": 2, "b_1": 2})
    capsys.readouterr()
    assert main([*common, "--folder", str(one)]) == 2
    err = capsys.readouterr().err
    assert "--folder" in err and "gender 1 only" in err and "Traceback" not in err
