import numpy as np
import pytest

from helpers import registered
from scipy import interpolate
from scipy.optimize import brentq
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

from utils.errors import UserError
from eval.evalset import pic
from eval.gender_leakage import gender_leakage
from eval.verification import evaluate_verification


def synthetic_pairs(rng, n_pairs=600, dim=32, noise=0.9):
    issame = np.arange(n_pairs) % 3 != 0
    emb = np.empty((2 * n_pairs, dim))
    for p in range(n_pairs):
        a = rng.normal(size=dim)
        b = a if issame[p] else rng.normal(size=dim)
        emb[2 * p] = a + noise * rng.normal(size=dim)
        emb[2 * p + 1] = b + noise * rng.normal(size=dim)
    return emb, issame


def oracle(emb, issame):
    """The insightface protocol written out with per-threshold loops, scipy's interp1d for the EER."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.sum(np.square(e[0::2] - e[1::2]), 1)
    folds = list(KFold(n_splits=10, shuffle=False).split(np.arange(len(issame))))
    thr = np.arange(0, 4, 0.01)
    tprs, fprs = np.zeros((10, len(thr))), np.zeros((10, len(thr)))
    for f, (_, te) in enumerate(folds):
        for i, t in enumerate(thr):
            pred = np.less(dist[te], t)
            act = issame[te]
            tp, fp = np.sum(pred & act), np.sum(pred & ~act)
            tn, fn = np.sum(~pred & ~act), np.sum(~pred & act)
            tprs[f, i] = tp / (tp + fn)
            fprs[f, i] = fp / (fp + tn)
    tpr, fpr = tprs.mean(0), fprs.mean(0)
    eer = brentq(lambda x: 1.0 - x - interpolate.interp1d(fpr, tpr)(x), 0.0, 1.0)
    vthr = np.arange(0, 4, 0.001)
    tars = []
    for tr, te in folds:
        far = np.array([np.sum(np.less(dist[tr], t) & ~issame[tr]) / np.sum(~issame[tr]) for t in vthr])
        if far.max() >= 1e-3:
            order = np.argsort(far, kind="stable")
            t = np.interp(1e-3, far[order], vthr[order])
        else:
            t = 0.0
        pred = np.less(dist[te], t)
        tars.append(np.sum(pred & issame[te]) / np.sum(issame[te]))
    return eer, float(np.mean(tars)), dist


@pytest.mark.parametrize("seed", [0, 1])
def test_verification_equals_the_protocol_written_out(seed):
    rng = np.random.default_rng(seed)
    emb, issame = synthetic_pairs(rng)
    res = evaluate_verification(emb, issame)
    eer, tar, dist = oracle(emb, issame)
    assert res.eer == pytest.approx(eer, abs=1e-12)
    assert res.tar == pytest.approx(tar, abs=1e-12)
    # and within the grid resolution of the exact, pooled EER of sklearn's ROC
    fpr, tpr, _ = roc_curve(issame, -dist)
    k = np.argmin(np.abs(fpr - (1 - tpr)))
    assert res.eer == pytest.approx((fpr[k] + 1 - tpr[k]) / 2, abs=0.02)
    assert 0.01 < res.eer < 0.5 and 0 < res.tar < 1


def test_perfect_separation_and_fold_checks():
    rng = np.random.default_rng(0)
    emb, issame = synthetic_pairs(rng, noise=0.01)
    res = evaluate_verification(emb, issame)
    assert res.eer == pytest.approx(0.0, abs=1e-9) and res.tar == 1.0 and res.accuracy == 1.0
    with pytest.raises(UserError, match="no impostor pair"):
        evaluate_verification(emb[:40], np.ones(20, dtype=bool))
    blocks = np.array([True] * 300 + [False] * 300)
    with pytest.raises(UserError, match="fold 1 of 10 has no impostor"):
        evaluate_verification(emb, blocks)
    bad = emb.copy()
    bad[3] = np.nan
    with pytest.raises(UserError, match="NaN"):
        evaluate_verification(bad, issame)


def test_leakage_separable_random_and_grouped():
    rng = np.random.default_rng(0)
    n_ids, per = 60, 4
    genders = np.repeat(np.arange(n_ids) % 2, per)
    ids = np.repeat(np.arange(n_ids), per)
    x = rng.normal(size=(n_ids * per, 16))
    x[:, 0] += np.where(genders == 1, 5.0, -5.0)
    sep = gender_leakage(x, genders, ids)
    assert sep == {"LogReg": 1.0, "SVM": 1.0, "RBF": 1.0, "AVG": 1.0}
    # each identity has its own feature vector and a random gender: grouped CV cannot learn gender from it,
    # while identities shared between training and test splits would be memorised
    centres = rng.normal(size=(n_ids, 16))
    rand_gender = np.repeat(rng.permutation(np.arange(n_ids) % 2), per)
    xs = centres[ids] + 0.01 * rng.normal(size=(n_ids * per, 16))
    res = gender_leakage(xs, rand_gender, ids)
    assert abs(res["AVG"] - 0.5) < 0.15
    assert res["AVG"] == pytest.approx(np.mean([res["LogReg"], res["SVM"], res["RBF"]]))
    with pytest.raises(UserError, match="at least 3 identities"):
        gender_leakage(x[:8], genders[:8], ids[:8])


def test_leakage_is_identical_with_probability_true():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(40), 3)
    genders = ids % 2
    x = rng.normal(size=(120, 8))
    x[:, 0] += genders * 1.2
    import warnings
    from sklearn.svm import SVC
    from eval.attackers import register_attacker
    with registered():
        register_attacker("SVM-prob")(lambda ctx: SVC(kernel="linear", probability=True))  # the authors' setting
        register_attacker("RBF-prob")(lambda ctx: SVC(kernel="rbf", probability=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn >= 1.9 deprecates probability=True
            theirs = gender_leakage(x, genders, ids, attackers=("SVM-prob", "RBF-prob"))
    ours = gender_leakage(x, genders, ids)
    assert (ours["SVM"], ours["RBF"]) == (theirs["SVM-prob"], theirs["RBF-prob"])


def test_pic_by_hand():
    pre = {"EER": 0.05, "BACC-Gender-LogReg": 0.9, "BACC-Gender-SVM": 0.8, "BACC-Gender-RBF": 1.0}
    post = {"EER": 0.06, "BACC-Gender-LogReg": 0.6, "BACC-Gender-SVM": 0.5, "BACC-Gender-RBF": 0.7}
    # BACC_pre 0.9, BACC_post 0.6: privacy gain (0.4 - 0.1) / 0.1 = 3; identity loss 0.01 / 0.05 = 0.2
    assert pic(post, pre) == pytest.approx(2.8)
    assert pic(pre, pre) == pytest.approx(0.0)
    assert pic(post, {**pre, "EER": 0.0}) is None
