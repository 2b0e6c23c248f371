"""The comparison methods (privacy/ive, pe_miu, inlp, leace, adversarial): each one's defining property on synthetic
templates fed straight into a template cache (no backbone), their option checks, and one training + sweep run of
them on the synthetic world."""
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.svm import SVC

from pipeline import train as finetune
from pipeline import sweep as evaluation
from eval.gender_leakage import gender_leakage
from eval.verification import evaluate_verification, verification_from_distances
from helpers import demo_cfg, synthetic_world
from privacy import METHODS, FitContext, get_method
from privacy.base import PathMethod
from synthetic.data import identity_basis, population, sample_templates
from templates.entry import write_entry
from config.loading import config_from_dict
from facedata.dataset import TrainIndex
from utils.errors import UserError

LOG = logging.getLogger("test_methods")


@dataclass
class Split:
    """Synthetic templates of some identities: (N, 2, D) unflipped/flipped views, identity and gender per image."""
    templates: np.ndarray
    ids: np.ndarray
    genders: np.ndarray
    identity_gender: np.ndarray

    @property
    def x(self) -> np.ndarray:
        return self.templates[:, 0]


def make_split(n_ids, imgs, rng, direction, basis, strength=0.3, spread=1.5) -> Split:
    """Identities on the sphere with a gender component along ``direction``; the flipped view is another sample."""
    centres, genders = population(n_ids, direction.shape[0], rng, strength, direction, basis)
    views = np.stack([sample_templates(c, 2 * imgs, spread, rng).reshape(imgs, 2, -1) for c in centres])
    return Split(views.reshape(n_ids * imgs, 2, -1).astype(np.float32), np.repeat(np.arange(n_ids), imgs),
                 np.repeat(genders, imgs), genders)


def world(dim, seed=0, direction=None, train_ids=100, test_ids=40, imgs=6, **kw) -> tuple[Split, Split]:
    """A training and a held-out split of one population (identities in a 16-d subspace, gender along one axis)."""
    rng = np.random.default_rng(seed)
    if direction is None:
        direction = rng.normal(size=dim)
        direction /= np.linalg.norm(direction)
    basis = identity_basis(dim, 16, rng)
    return make_split(train_ids, imgs, rng, direction, basis, **kw), make_split(test_ids, imgs, rng, direction, basis,
                                                                                **kw)


def fit(folder: Path, split: Split, method: str, **options):
    """Fit ``method`` on the split's templates, read through a real cache entry under ``folder``; returns the method
    and its FitResult."""
    n, _, dim = split.templates.shape
    ckpt = folder / "checkpoints"
    ckpt.mkdir(parents=True)
    entry = write_entry(folder / "cache", split.templates)
    cfg = config_from_dict({"method": method, "embedding_size": dim, "eval_step": 0, "device": "cpu", **options},
                           "test")
    m = get_method(method)(cfg)
    m.check()
    index = TrainIndex(folder, [folder / f"{i}.png" for i in range(n)], split.ids, split.genders,
                       split.identity_gender)
    return m, m.fit(FitContext(cfg, index, entry, torch.device("cpu"), ckpt, False, LOG))


@torch.no_grad()
def apply(method, path: Path, x: np.ndarray) -> np.ndarray:
    return method.load_transform(path)(torch.from_numpy(np.ascontiguousarray(x))).double().numpy()


def logreg(x, split: Split) -> float:
    return gender_leakage(x, split.genders, split.ids, attackers=("LogReg",))["LogReg"]


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_leace_leaves_linear_attackers_at_chance_on_its_training_data(tmp_path):
    train, held = world(64)
    assert logreg(train.x, train) > 0.85 and logreg(held.x, held) > 0.85
    m, res = fit(tmp_path, train, "leace")
    assert [p.name for p in res.checkpoints] == ["1transform.pth"]
    erased = unit(apply(m, res.checkpoints[0], train.x))   # as the protocol feeds the attackers
    # no linear classifier fit on all of the erased training data beats a constant on it
    for clf in (LogisticRegression(), SVC(kernel="linear")):
        assert balanced_accuracy_score(train.genders, clf.fit(erased, train.genders).predict(erased)) <= 0.55
    # (grouped cross-validation on the same data lands far *below* chance: each held-out fold's gender means sit
    # opposite the training folds', since they sum to the equal means LEACE enforced)
    assert logreg(erased, train) <= 0.55
    # on identities it never saw, linear attackers are near chance too
    assert logreg(apply(m, res.checkpoints[0], held.x), held) < 0.65


def test_inlp_removes_a_rank_k_subspace_and_linear_leakage(tmp_path):
    train, held = world(64)
    bare = logreg(held.x, held)
    m, res = fit(tmp_path, train, "inlp", **{"inlp.iterations": 3})
    assert [p.name for p in res.checkpoints] == ["1transform.pth", "2transform.pth", "3transform.pth"]
    for k, path in enumerate(res.checkpoints, start=1):
        p = m.load_transform(path).projection.double()
        torch.testing.assert_close(p, p.T)
        torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)      # an orthogonal projection ...
        assert torch.linalg.matrix_rank(torch.eye(64, dtype=torch.float64) - p, atol=1e-4) == k  # ... removing k dims
    after = logreg(apply(m, res.checkpoints[-1], held.x), held)
    assert bare > 0.85 and after < bare - 0.2


@pytest.mark.subprocess
def test_ive_removes_the_gender_dimensions_round_by_round(tmp_path):
    dim, n = 512, 8
    direction = np.zeros(dim)
    direction[:n] = 1 / np.sqrt(n)             # gender lives in dimensions 0-7
    train, held = world(dim, direction=direction)
    bare = gender_leakage(held.x, held.genders, held.ids)
    m, res = fit(tmp_path, train, "ive", **{"ive.dims_per_round": n, "ive.rounds": 2, "ive.estimators": 50})
    assert [p.name for p in res.checkpoints] == ["1transform.pth", "2transform.pth"]
    kept = [m.load_transform(p).kept for p in res.checkpoints]
    assert [len(k) for k in kept] == [dim - n, dim - 2 * n]
    assert set(kept[1].tolist()) <= set(kept[0].tolist())
    assert not set(range(n)) & set(kept[0].tolist())   # the first round finds all of them
    out = apply(m, res.checkpoints[-1], held.x)
    assert out.shape == (len(held.x), dim - 2 * n)
    after = gender_leakage(out, held.genders, held.ids)
    assert bare["AVG"] > 0.85 and after["AVG"] < 0.65


def test_pe_miu_keeps_verification_with_its_own_comparison(tmp_path):
    _, split = world(512, test_ids=100, imgs=4, spread=1.6)
    m, res = fit(tmp_path, split, "pe_miu")                  # blocks of 16
    assert [p.name for p in res.checkpoints] == ["1transform.pth"]
    t = m.load_transform(res.checkpoints[0])
    x, xf = (torch.from_numpy(np.ascontiguousarray(split.templates[:, k])) for k in (0, 1))
    with torch.no_grad():
        protected = t(x)
        # the two views of an image share their order, so the flip sum is the protected sum
        torch.testing.assert_close(protected + t(xf), t(x + xf))
    assert not np.allclose(protected.numpy(), x.numpy())
    # pairs: image 4i with 4i+1 (same identity), or with image 1 of the next identity; flip-summed as evaluated
    n = len(x)
    same = np.arange(n // 4) % 2 == 0
    first = np.arange(0, n, 4)
    order = np.stack([first, np.where(same, first + 1, (first + 5) % n)], axis=1).ravel()
    bare = evaluate_verification((x + xf)[order].numpy(), same)
    with torch.no_grad():
        ver = (t(x[order]) + t(xf[order])).numpy()
    own = verification_from_distances(t.pair_distances(ver), same)
    assert abs(own.eer - bare.eer) <= 0.03
    assert evaluate_verification(ver, same).eer > 0.3     # the plain distance of permuted templates fails
    # the comparison finds a template in another order as its best match, with similarity 1
    again = t(x.flip(0)).flip(0).numpy()[:40]
    sims = t.similarity(protected.numpy()[:40], again)
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-6)
    assert (sims.argmax(axis=1) == np.arange(40)).all()
    # a linear attacker loses the gender direction (all but its part that no block order changes)
    assert logreg(protected.numpy(), split) < logreg(split.x, split) - 0.2


def test_adversarial_layer_lowers_gender_leakage(tmp_path):
    train, held = world(64, train_ids=200, test_ids=60, imgs=6)
    common = {"num_epoch": 10, "checkpoint_every": 10, "batch_size": 128, "log_every": 1000}
    control, res0 = fit(tmp_path / "control", train, "adversarial", **{"adversarial.weight": 0.0}, **common)
    m, res = fit(tmp_path / "adversarial", train, "adversarial", **{"adversarial.hidden": 64}, **common)
    step = len(train.x) // 128 * 10
    assert [p.name for p in res.checkpoints] == [f"{step}ftn_layers.pth"] and res.step == step
    assert (res.checkpoints[0].parent / f"{step}header.pth").is_file()
    assert set(res.epoch_losses[-1]) == {"ce", "adv", "adv_acc", "loss"}
    bare = gender_leakage(held.x, held.genders, held.ids)["AVG"]
    identity_only = gender_leakage(apply(control, res0.checkpoints[0], held.x), held.genders, held.ids)["AVG"]
    adversarial = gender_leakage(apply(m, res.checkpoints[0], held.x), held.genders, held.ids)["AVG"]
    assert adversarial < bare - 0.1 and adversarial < identity_only - 0.1


@pytest.mark.parametrize("method, option, value", [
    ("pe_miu", "pe_miu.block_size", 24), ("pe_miu", "pe_miu.block_size", 512), ("inlp", "inlp.iterations", 512),
    ("ive", "ive.rounds", 103), ("leace", "resume", True)])
def test_unusable_settings_are_refused_naming_the_option(method, option, value):
    cfg = config_from_dict({"method": method, option: value}, "test")
    with pytest.raises(UserError, match=option):
        get_method(method)(cfg).check()


def test_methods_train_and_sweep_with_their_own_settings(tmp_path):
    """finetune.py + eval/evaluation.py on the synthetic world: each method's run folder, its checkpoints, and the
    sweep's rows, read back through run.json."""
    synthetic_world(tmp_path, n_train_ids=40, imgs=4)
    runs = {"inlp": (["inlp.iterations=2"], "inlp_2it", ["1", "2"]),
            "pe_miu": (["pe_miu.block_size=128"], "pe_miu_128b", ["1"]),
            "adversarial": (["num_epoch=2", "checkpoint_every=1"], "adversarial_1.0w_256h", ["5", "10"])}
    for method, (extra, folder, _) in runs.items():
        res = finetune.train(demo_cfg(tmp_path, f"method={method}", "eval_step=5", *extra))
        assert res.checkpoint_dir.name == folder and res.history     # validated on the way
        assert json.loads((res.checkpoint_dir / "run.json").read_text())["method"] == method
    out = evaluation.evaluate(demo_cfg(tmp_path), tmp_path / "res", tmp_path / "ckpt" / "Demo", "Exp/Synth",
                              tmp_path / "res" / "reference.csv")
    with open(tmp_path / "res" / "reference.csv", newline="") as fh:
        ref = next(csv.DictReader(fh))
    for method, (_, folder, steps) in runs.items():
        with open(out / f"{folder}_metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["Step"] for r in rows] == steps, method
        assert all(0 <= float(r["EER"]) <= 0.5 and 0 <= float(r["BACC-Gender-AVG"]) <= 1 for r in rows)
    with open(out / "pe_miu_128b_metrics.csv", newline="") as fh:   # swept with its own comparison
        assert float(next(csv.DictReader(fh))["EER"]) < float(ref["EER"]) + 0.1
    # the report's comparison table: the bare backbone first, then each run's last and best-PIC checkpoints, with the
    # method's settings and the comparison it used; and the trade-off plot of every run
    table = (out / "report.md").read_text().split("### synth_a")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert rows[0].startswith("| bare backbone")
    for method, (_, folder, steps) in runs.items():
        mine = [r for r in rows if r.startswith(f"| {folder} |")]
        assert len(mine) == 2 and f"last (step {steps[-1]})" in mine[0] and "best PIC" in mine[1], method
        assert f"| {method}" in mine[0]
    assert "PE-MIU block assignment" in [r for r in rows if "pe_miu" in r][0]
    assert (out / "tradeoff.png").stat().st_size > 10_000


@pytest.mark.parametrize("method", [n for n in METHODS.names() if issubclass(METHODS[n], PathMethod)])
def test_a_foreign_checkpoint_is_refused_naming_the_file(method, tmp_path):
    path = tmp_path / "3transform.pth"
    torch.save({"proj.0.weight": torch.zeros(2, 2)}, path)
    m = get_method(method)(config_from_dict({"method": method}, "test"))
    assert m.list_checkpoints(tmp_path) == [(3, path)]
    with pytest.raises(UserError, match="3transform.pth"):
        m.load_transform(path)


# ---------------------------------------------------------------------------------------------------------------
# the defaults are the reference implementations' settings, each checked against the reference's computation
# written out here with scikit-learn, scipy and concept-erasure directly
# ---------------------------------------------------------------------------------------------------------------
def test_pe_miu_default_aligns_blocks_by_unsquared_euclidean_distance():
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    from privacy.pe_miu import BlockPermutation
    method = get_method("pe_miu")(config_from_dict({"method": "pe_miu"}, "test"))
    assert (method.opts.block_size, method.opts.cost) == (16, "euclidean")
    rng = np.random.default_rng(0)
    ver = unit(rng.normal(size=(2 * 30, 512)))
    ours = BlockPermutation(16, 0, method.opts.cost).pair_distances(ver)
    squared = BlockPermutation(16, 0, "squared").pair_distances(ver)
    reference, by_inner_product = [], []
    for a, b in zip(ver[0::2].reshape(30, 32, 16), ver[1::2].reshape(30, 32, 16)):
        rows, cols = linear_sum_assignment(cdist(a, b))                 # the reference's cost: block distances
        reference.append(((a[rows] - b[cols]) ** 2).sum())
        rows, cols = linear_sum_assignment(a @ b.T, maximize=True)
        by_inner_product.append(((a[rows] - b[cols]) ** 2).sum())
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    np.testing.assert_allclose(squared, by_inner_product, atol=1e-12)
    assert np.abs(np.asarray(reference) - np.asarray(by_inner_product)).max() > 1e-4   # the two costs differ here


@pytest.mark.subprocess
def test_ive_default_is_the_reference_example_first_round(tmp_path):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.preprocessing import StandardScaler
    train, _ = world(64)
    m, res = fit(tmp_path, train, "ive", **{"ive.rounds": 1})
    o = m.opts
    assert (o.dims_per_round, o.rounds, o.estimators, o.class_weight, o.standardize) == (5, 1, 30, "none", True)
    forest = RandomForestClassifier(n_estimators=30, random_state=m.cfg.seed + 1, n_jobs=1)
    forest.fit(StandardScaler().fit_transform(train.x), train.genders)
    removed = np.argsort(-forest.feature_importances_, kind="stable")[:5]
    kept = m.load_transform(res.checkpoints[0]).kept.numpy()
    assert sorted(set(range(64)) - set(kept.tolist())) == sorted(removed.tolist())


def test_inlp_default_classifier_is_the_reference_gender_setting(tmp_path):
    from sklearn.svm import LinearSVC
    train, _ = world(64)
    m, res = fit(tmp_path, train, "inlp", **{"inlp.iterations": 1})
    assert (m.opts.C, m.opts.fit_intercept, m.opts.class_weight) == (1.0, False, "none")
    clf = LinearSVC(fit_intercept=False, class_weight=None, dual=False, random_state=m.cfg.seed)
    clf.fit(train.x.astype(np.float64), train.genders)
    w = clf.coef_[0] / np.linalg.norm(clf.coef_[0])
    expected = np.eye(64) - np.outer(w, w)
    np.testing.assert_allclose(m.load_transform(res.checkpoints[0]).projection.double().numpy(), expected, atol=1e-6)


def test_leace_default_is_the_package_default_with_shrinkage(tmp_path):
    from concept_erasure import LeaceFitter
    train, held = world(64)
    m, res = fit(tmp_path, train, "leace")
    assert m.opts.shrinkage is True
    fitter = LeaceFitter(64, 1, dtype=torch.float64)      # the package's defaults
    x = torch.from_numpy(unit(train.x.astype(np.float64)))
    fitter.update(x, torch.as_tensor(train.genders, dtype=torch.float64))
    probe = torch.from_numpy(unit(held.x.astype(np.float64)))
    expected = fitter.eraser(probe).numpy()
    np.testing.assert_allclose(apply(m, res.checkpoints[0], probe.float().numpy()), expected, atol=1e-5)
