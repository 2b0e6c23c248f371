"""Attackers beyond the paper's three, worst-case leakage, bootstrap intervals and the leakage tool."""
from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.svm import SVC

from eval import leakage_cli
from helpers import registered
from eval.attackers import ALL, ATTACKERS, PAPER_ATTACKERS, AttackContext, cosine_similarity, expand_attackers, \
    register_attacker
from eval.gender_leakage import gender_leakage, leakage_report
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
EVERY = expand_attackers([ALL])


def xor_templates(seed: int = 0, n_ids: int = 120, per: int = 4, dim: int = 8):
    """Gender = sign of the product of two coordinates of the identity's centre: no linear boundary exists."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_ids), per)
    centres = rng.uniform(-1, 1, size=(n_ids, 2))
    genders = (centres[:, 0] * centres[:, 1] > 0).astype(int)[ids]
    x = np.concatenate([centres[ids] + 0.05 * rng.normal(size=(len(ids), 2)),
                        0.1 * rng.normal(size=(len(ids), dim - 2))], axis=1)
    return x, genders, ids


def uninformative_templates(seed: int = 0, n_ids: int = 100, per: int = 4, dim: int = 16, classes: int = 2):
    """Identity clusters with labels drawn independently of the templates."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_ids), per)
    labels = rng.permutation(np.arange(n_ids) % classes)[ids]
    x = rng.normal(size=(n_ids, dim))[ids] + 0.3 * rng.normal(size=(len(ids), dim))
    return x, labels, ids


@pytest.fixture(scope="module")
def xor_report():
    x, g, ids = xor_templates()
    return leakage_report(x, g, ids, attackers=EVERY, n_bootstrap=200)


def test_all_names_every_registered_attacker_paper_first():
    assert EVERY[:3] == PAPER_ATTACKERS and set(EVERY) == set(ATTACKERS)
    assert {"MLP", "kNN", "GBDT", "Similarity"} <= set(EVERY)
    assert expand_attackers(["kNN", ALL, "kNN"]) == ("kNN", *[a for a in EVERY if a != "kNN"])
    with registered():
        register_attacker("Toy_all_test")(lambda ctx: LogisticRegression())
        assert expand_attackers([ALL])[-1] == "Toy_all_test"
    assert "Toy_all_test" not in ATTACKERS


def test_nonlinear_gender_escapes_linear_attackers_not_stronger_ones(xor_report):
    r = xor_report
    assert r.bacc["LogReg"] < 0.6 and r.bacc["SVM"] < 0.6
    assert r.bacc["MLP"] > 0.8 and r.bacc["kNN"] > 0.8
    assert r.bacc["GBDT"] > 0.8 and r.bacc["Similarity"] > 0.8
    assert r.worst_bacc == max(r.bacc[a] for a in EVERY) == r.bacc[r.worst_attacker]
    assert r.worst_attacker in EVERY and r.worst_attacker not in ("LogReg", "SVM")
    assert r.bacc["AVG"] == np.mean([r.bacc[a] for a in PAPER_ATTACKERS])   # AVG stays the paper's three
    assert r.worst_ci_low <= r.worst_bacc <= r.worst_ci_high
    for a in EVERY:
        assert r.ci_low[a] <= r.bacc[a] <= r.ci_high[a]
        assert r.fold_bacc[a] and np.mean(r.fold_bacc[a]) == r.bacc[a]


def test_worst_case_names_the_strongest_attacker():
    x, g, ids = xor_templates(seed=3)
    r = leakage_report(x, g, ids, attackers=("LogReg", "kNN"), n_bootstrap=0)
    assert r.worst_attacker == "kNN" and r.worst_bacc == r.bacc["kNN"] > r.bacc["LogReg"]
    assert np.isnan(r.ci_low["kNN"]) and np.isnan(r.worst_ci_high)      # no bootstrap asked
    assert "AVG" not in r.bacc                                           # not all of the paper's three ran


def test_no_information_every_interval_covers_chance():
    x, g, ids = uninformative_templates()
    r = leakage_report(x, g, ids, attackers=EVERY, n_bootstrap=1000)
    for a in (*EVERY, "AVG"):
        assert r.ci_low[a] <= 0.5 <= r.ci_high[a], (a, r.ci_low[a], r.ci_high[a])


@pytest.mark.subprocess
def test_bootstrap_reproducible_and_independent_of_workers():
    x, g, ids = xor_templates(seed=1, n_ids=60)
    one = leakage_report(x, g, ids, attackers=EVERY, n_bootstrap=300, seed=7, n_jobs=1)
    two = leakage_report(x, g, ids, attackers=EVERY, n_bootstrap=300, seed=7, n_jobs=2)
    assert (two.bacc, two.ci_low, two.ci_high) == (one.bacc, one.ci_low, one.ci_high)
    assert (two.worst_attacker, two.worst_ci_low, two.worst_ci_high) == \
        (one.worst_attacker, one.worst_ci_low, one.worst_ci_high)
    assert all(np.array_equal(two.predictions[a], one.predictions[a]) for a in EVERY)
    # the same seed draws the same identities whichever attackers run (paired intervals); another seed others
    again = leakage_report(x, g, ids, attackers=("LogReg",), n_bootstrap=300, seed=7)
    assert (again.ci_low["LogReg"], again.ci_high["LogReg"]) == (one.ci_low["LogReg"], one.ci_high["LogReg"])
    reseeded = leakage_report(x, g, ids, attackers=("LogReg",), n_bootstrap=300, seed=8)
    assert reseeded.bacc["LogReg"] == one.bacc["LogReg"] and reseeded.ci_low["LogReg"] != one.ci_low["LogReg"]


def test_bootstrap_resamples_identities_not_templates():
    """Repeating every template of an identity leaves an identity-level interval unchanged (a template-level one
    would narrow), given the same predictions."""
    register_attacker("Sign_test")(lambda ctx: _SignOfFirst())
    try:
        x, g, ids = uninformative_templates(seed=2, n_ids=60, per=2)
        x[:, 0] += np.where(g == 1, 0.5, -0.5)
        base = leakage_report(x, g, ids, attackers=("Sign_test",), n_bootstrap=500)
        tripled = leakage_report(np.repeat(x, 3, axis=0), np.repeat(g, 3), np.repeat(ids, 3),
                                 attackers=("Sign_test",), n_bootstrap=500)
    finally:
        ATTACKERS.pop("Sign_test")
    assert tripled.bacc == base.bacc
    assert (tripled.ci_low, tripled.ci_high) == pytest.approx((base.ci_low, base.ci_high))
    assert base.ci_high["Sign_test"] - base.ci_low["Sign_test"] > 0.05


class _SignOfFirst:
    """A fixed rule (no fitting): predicts 1 where the first coordinate is positive."""
    def fit(self, x, y):
        return self

    def predict(self, x):
        return (x[:, 0] > 0).astype(int)


def _by_hand(x, y, ids):
    """The paper's protocol written out: normalise, 3 grouped folds, three classifiers at defaults, mean BACC."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = {"LogReg": [], "SVM": [], "RBF": []}
    for train, test in StratifiedGroupKFold(n_splits=3).split(x, y, ids):
        for name, clf in (("LogReg", LogisticRegression()), ("SVM", SVC(kernel="linear")),
                          ("RBF", SVC(kernel="rbf"))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x[train], y[train])
            scores[name].append(balanced_accuracy_score(y[test], clf.predict(x[test])))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["AVG"] = float(np.mean(list(out.values())))
    return out


@pytest.mark.parametrize("seed,dim", [(0, 8), (1, 64), (2, 512)])
@pytest.mark.subprocess
def test_paper_three_give_exactly_the_protocol_values(seed, dim):
    rng = np.random.default_rng(seed)
    n_ids = 40 + 10 * seed
    ids = np.repeat(rng.permutation(n_ids), 3 + seed)
    g = (rng.random(n_ids) < 0.4).astype(int)[ids]
    x = rng.normal(size=(len(ids), dim)) + 0.3 * g[:, None] * rng.normal(size=dim)
    expected = _by_hand(x, g, ids)
    assert gender_leakage(x, g, ids) == expected
    assert leakage_report(x, g, ids, n_bootstrap=100, n_jobs=2).bacc == expected


def test_groups_reach_attackers_that_ask_for_them():
    seen = []

    class Spy:
        def fit(self, x, y, groups):
            seen.append(set(groups))
            self.y = y[0]
            return self

        def predict(self, x):
            return np.full(len(x), self.y)
    with registered():
        register_attacker("Spy_test")(lambda ctx: Spy())
        x, g, ids = xor_templates(n_ids=30)
        r = leakage_report(x, g, ids, attackers=("Spy_test",), n_bootstrap=0)
    assert len(seen) == 3 and r.bacc["Spy_test"] == 0.5
    for f, train_ids in enumerate(seen):
        assert train_ids.isdisjoint(ids[r.fold == f]) and train_ids | set(ids[r.fold == f]) == set(ids)


def test_similarity_attack_uses_the_systems_comparison():
    x, g, ids = xor_templates(seed=4, n_ids=60)
    calls = []

    def system(a, b):
        calls.append((len(a), len(b)))
        return cosine_similarity(a, b)
    own = leakage_report(x, g, ids, attackers=("Similarity",), context=AttackContext(similarity=system),
                         n_bootstrap=0)
    default = leakage_report(x, g, ids, attackers=("Similarity",), n_bootstrap=0)
    assert calls and own.bacc == default.bacc
    # a comparison blind to the two coordinates that carry gender leaves the attack at chance
    blind = leakage_report(x, g, ids, attackers=("Similarity",), n_bootstrap=0,
                           context=AttackContext(similarity=lambda a, b: cosine_similarity(a[:, 2:], b[:, 2:])))
    assert default.bacc["Similarity"] > 0.8 and blind.bacc["Similarity"] < 0.65


def test_multiclass_attribute():
    rng = np.random.default_rng(5)
    n_ids, per = 90, 3
    ids = np.repeat(np.arange(n_ids), per)
    cls = (np.arange(n_ids) % 3)[ids]
    x = rng.normal(size=(len(ids), 12)) + 2.5 * np.eye(12)[cls]
    r = leakage_report(x, cls, ids, attackers=("LogReg", "kNN", "Similarity"), n_bootstrap=200)
    assert all(r.bacc[a] > 0.8 for a in r.attackers)         # chance is 1/3
    for f in range(3):                                        # folds grouped by identity
        test = r.fold == f
        assert set(ids[test]).isdisjoint(ids[~test])
    with pytest.raises(UserError, match=r"at least 3 identities of each gender.*2 of gender 2"):
        keep = (cls != 2) | (ids < 6)
        leakage_report(x[keep], cls[keep], ids[keep], n_bootstrap=0)


# ---- the tool --------------------------------------------------------------------------------------------------------

def _write(tmp_path: Path, x: np.ndarray, ids, attr, columns=("identity", "gender")) -> tuple[Path, Path]:
    np.save(tmp_path / "t.npy", x)
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(zip(ids, attr))
    return tmp_path / "t.npy", tmp_path / "l.csv"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tool_main_binary_and_never_overwrites(tmp_path, capsys):
    x, g, ids = xor_templates(n_ids=48, dim=5)
    t, lab = _write(tmp_path, x.astype(np.float32), [f"person{i}" for i in ids], ["f" if v else "m" for v in g])
    argv = ["--templates", str(t), "--labels", str(lab), "--attackers", "LogReg", "kNN", "--bootstrap", "100",
            "--out", str(tmp_path / "res")]
    assert leakage_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "worst-case" in out and "kNN" in out and "48 identities" in out
    rows = _rows(tmp_path / "res" / "t_leakage.csv")
    assert [(r["Kind"], r["Attacker"]) for r in rows] == [("paper", "LogReg"), ("extra", "kNN"), ("worst-case", "kNN")]
    assert all(float(r["CI_low"]) <= float(r["BACC"]) <= float(r["CI_high"]) for r in rows)
    assert leakage_cli.main(argv) == 0                               # a second run takes a new name
    assert _rows(tmp_path / "res" / "t_leakage.csv") == rows
    assert (tmp_path / "res" / "t_leakage_2.csv").exists()


@pytest.mark.subprocess
def test_tool_subprocess_multiclass_all_attackers(tmp_path):
    rng = np.random.default_rng(6)
    n_ids, per = 45, 3
    ids = np.repeat(np.arange(n_ids), per)
    age = np.array(["young", "middle", "old"])[(np.arange(n_ids) % 3)[ids]]
    x = rng.normal(size=(len(ids), 20))
    x[:, 0] += 2.0 * (age == "young") - 2.0 * (age == "old")
    t, lab = _write(tmp_path, x, ids, age, columns=("subject", "age"))
    run = subprocess.run([sys.executable, str(REPO / "eval" / "leakage.py"), "--templates", str(t), "--labels",
                          str(lab), "--identity-column", "subject", "--attribute-column", "age", "--attackers", "all",
                          "--bootstrap", "50", "--n-jobs", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "chance = 0.333" in run.stdout
    rows = _rows(tmp_path / "t_leakage.csv")
    assert [r["Attacker"] for r in rows] == [*EVERY, "AVG", rows[-1]["Attacker"]]
    assert rows[-1]["Kind"] == "worst-case" and float(rows[-1]["BACC"]) == max(float(r["BACC"]) for r in rows[:-2])
    assert float(rows[0]["BACC"]) > 0.6


def _bad(tmp_path, capsys, argv, *fragments):
    assert leakage_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


def test_tool_bad_inputs(tmp_path, capsys):
    x, g, ids = xor_templates(n_ids=30)
    t, lab = _write(tmp_path, x, ids, g)
    base = ["--labels", str(lab), "--bootstrap", "0", "--out", str(tmp_path / "o")]
    np.save(tmp_path / "short.npy", x[:-1])
    _bad(tmp_path, capsys, ["--templates", str(tmp_path / "short.npy"), *base], "119 templates", "120 label rows")
    nan = x.copy()
    nan[[4, 9]] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    _bad(tmp_path, capsys, ["--templates", str(tmp_path / "nan.npy"), *base], "2 template row(s)", "rows 4, 9")
    np.save(tmp_path / "flat.npy", x[:, 0])
    _bad(tmp_path, capsys, ["--templates", str(tmp_path / "flat.npy"), *base], "(N, D)")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    _bad(tmp_path, capsys, ["--templates", str(tmp_path / "obj.npy"), *base], "obj.npy", "pickle")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    _bad(tmp_path, capsys, ["--templates", str(tmp_path / "junk.npy"), *base], "junk.npy", "could not be read")
    _bad(tmp_path, capsys, ["--templates", str(tmp_path / "missing.npy"), *base], "missing.npy", "does not exist")
    _bad(tmp_path, capsys, ["--templates", str(t), *base, "--attribute-column", "sex"], "no column 'sex'",
         "'identity', 'gender'")
    _bad(tmp_path, capsys, ["--templates", str(t), *base, "--identity-column", "identty"],
         "Did you mean 'identity'")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81\x00garbage")
    _bad(tmp_path, capsys, ["--templates", str(t), "--labels", str(tmp_path / "bin.csv"), "--bootstrap", "0"],
         "bin.csv", "could not be read")
    _bad(tmp_path, capsys, ["--templates", str(t), "--labels", str(tmp_path / "none.csv")], "does not exist")
    few = np.where(ids < 2, 2, g)                                 # class 2: two identities for three folds
    _, lab3 = _write(tmp_path, x, ids, few)
    _bad(tmp_path, capsys, ["--templates", str(t), "--labels", str(lab3), "--bootstrap", "0"],
         "at least 3 identities of each gender", "2 of gender 2")
    _bad(tmp_path, capsys, ["--templates", str(t), *base, "--attackers", "kNNN"], "unknown attacker 'kNNN'",
         "Did you mean 'kNN'")
    assert not (tmp_path / "o").exists()                          # nothing written on an error
