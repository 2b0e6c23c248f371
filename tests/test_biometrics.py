"""Verification as ISO/IEC 19795-1 / -10 ask (eval/biometrics.py): FNMR@FMR, the pooled EER and its bootstrap
interval, score files, demographic differentials, the pairs sidecar, the command line and the sweep's files."""
import csv

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from eval import biometrics as bm
from utils.errors import UserError


# ---- independent computations (sklearn's ROC, plain loops) ---------------------------------------------------------

def sk_fnmr_at_fmr(scores, genuine, fmr):
    """FNMR at the most lenient ROC point whose FMR does not exceed ``fmr``, from sklearn's full ROC."""
    fpr, tpr, _ = roc_curve(genuine, scores, drop_intermediate=False)
    return 1 - tpr[fpr <= fmr + 1e-12].max()


def sk_eer(scores, genuine):
    """Where FNMR = 1 - TPR meets FMR on sklearn's ROC, linear between its two neighbouring points."""
    fpr, tpr, _ = roc_curve(genuine, scores, drop_intermediate=False)
    fpr, tpr = np.r_[0.0, fpr], np.r_[0.0, tpr]
    diff = fpr - (1 - tpr)
    i = int(np.flatnonzero(diff >= 0)[0])
    if diff[i] == 0:
        return fpr[i]
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    return fpr[i - 1] + w * (fpr[i] - fpr[i - 1])


def random_scores(seed=0, n_gen=400, n_imp=3000):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(0.6, 0.15, n_gen), rng.normal(0.1, 0.12, n_imp)].round(3)   # rounding makes ties
    genuine = np.r_[np.ones(n_gen, bool), np.zeros(n_imp, bool)]
    order = rng.permutation(len(scores))
    return scores[order], genuine[order]


# ---- FNMR@FMR and the EER -------------------------------------------------------------------------------------------

def test_fnmr_at_fmr_and_eer_on_a_hand_worked_case():
    # 4 genuine, 30 impostor scores; FMR 10%: k = 3 false matches allowed, the threshold is the 4th highest impostor
    genuine_scores = [0.9, 0.8, 0.7, 0.45]
    impostor = [0.75, 0.6, 0.5, 0.45] + [0.3 - 0.01 * i for i in range(26)]
    scores = np.array(genuine_scores + impostor)
    genuine = np.array([True] * 4 + [False] * 30)
    assert bm.fmr_threshold(np.array(impostor), 0.1) == 0.45
    rep = bm.verification_report(scores, genuine, fmrs=(0.1, 0.2), n_bootstrap=0)
    # matches are s > 0.45: 3 impostors (FMR 0.1), and 0.45 of the genuine pairs is a non-match (a tie goes there)
    assert rep.fnmr[0.1] == 0.25
    # FMR 20%: k = 6, threshold 0.28 (the 7th highest impostor score), every genuine score is above it
    assert rep.fnmr[0.2] == 0.0
    assert (rep.n_genuine, rep.n_impostor) == (4, 30)
    # EER: from the top, genuine 0.9, 0.8, impostor 0.75, genuine 0.7, impostors 0.6, 0.5, then the tie at 0.45.
    # FNMR = 1/4 on [0.7, 0.75) where FMR = 1/30; at 0.45 one genuine and one impostor enter together: the ROC goes
    # from (FMR 3/30, FNMR 1/4) to (4/30, 0) and crosses FMR = FNMR at t with 3/30 + t/30 = 1/4 - t/4
    t = (1 / 4 - 3 / 30) / (1 / 30 + 1 / 4)
    assert rep.eer == pytest.approx(3 / 30 + t / 30, abs=1e-12)
    assert rep.eer == pytest.approx(sk_eer(scores, genuine), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fnmr_at_fmr_and_eer_equal_sklearns_roc(seed):
    scores, genuine = random_scores(seed)
    rep = bm.verification_report(scores, genuine, fmrs=(1e-2, 1e-3), n_bootstrap=0)
    for f in (1e-2, 1e-3):
        assert rep.fnmr[f] == pytest.approx(sk_fnmr_at_fmr(scores, genuine, f), abs=1e-12)
        t = bm.fmr_threshold(scores[~genuine], f)
        assert np.mean(scores[~genuine] > t) <= f   # the FMR reached never exceeds the target
    assert rep.eer == pytest.approx(sk_eer(scores, genuine), abs=1e-12)


def test_rule_of_three_leaves_an_empty_cell_with_a_note():
    scores, genuine = random_scores(0, n_gen=50, n_imp=1500)
    rep = bm.verification_report(scores, genuine, n_bootstrap=0)
    cells = rep.cells()
    assert cells["FNMR@FMR=1%"] != "" and float(cells["FNMR@FMR=1%"]) == rep.fnmr[1e-2]
    assert cells["FNMR@FMR=0.1%"] == "" and cells["FNMR@FMR=0.01%"] == ""   # 3000 and 30000 impostors needed
    assert "FNMR@FMR=0.1% empty: the rule of three needs 3000 impostor comparisons, there are 1500" in cells["Note"]
    assert "30000" in cells["Note"]
    assert "nan" not in ",".join(cells.values()).lower()
    # exactly 3 / FMR impostor comparisons are enough
    assert bm.rule_of_three(300, 0.01) and not bm.rule_of_three(299, 0.01)


def test_eer_interval_is_a_subject_bootstrap_recomputed_independently():
    rng = np.random.default_rng(3)
    subjects = np.repeat([f"s{i}" for i in range(12)], 8)   # 12 subjects with 8 pairs each, as probes
    genuine = np.tile([True, False, False, False], 24)
    quality = rng.normal(0, 0.3, 12)[np.repeat(np.arange(12), 8)]   # subjects differ: pairs are not independent
    scores = np.where(genuine, 0.5 + quality, 0.1) + rng.normal(0, 0.2, 96)
    meta = bm.PairMeta(np.array([[f"i{p}a", f"i{p}b"] for p in range(96)], dtype=object),
                       np.stack([subjects, subjects], 1).astype(object), np.full((96, 2), "", dtype=object), "test")
    meta.subjects[~genuine, 1] = "other"
    n = 150
    rep = bm.verification_report(scores, genuine, meta, fmrs=(0.1,), n_bootstrap=n, seed=7)
    assert rep.bootstrap_unit == "subjects"
    # the same draws (documented: blocks of 100 replicates, each drawing as many subjects as there are), each
    # replicate's pairs written out in full and its EER taken from sklearn's ROC
    draw = np.random.default_rng(7)
    units, unit_of_pair = np.unique(subjects, return_inverse=True)
    eers = []
    for start in range(0, n, bm.BOOTSTRAP_BLOCK):
        for row in draw.integers(0, len(units), size=(min(bm.BOOTSTRAP_BLOCK, n - start), len(units))):
            picked = np.concatenate([np.flatnonzero(unit_of_pair == u) for u in row])
            if genuine[picked].all() or not genuine[picked].any():
                continue
            eers.append(sk_eer(scores[picked], genuine[picked]))
    low, high = np.quantile(eers, [0.025, 0.975])
    assert rep.eer_ci == pytest.approx((low, high), abs=1e-12)
    assert low <= rep.eer <= high
    # hand-worked: genuine always above impostor, so every replicate's EER is 0
    clean = bm.verification_report(np.where(genuine, 1.0, 0.0), genuine, meta, fmrs=(0.1,), n_bootstrap=50)
    assert clean.eer == 0 and clean.eer_ci == (0.0, 0.0)
    # without subject ids the pairs are drawn, and the result says so
    unknown = bm.verification_report(scores, genuine, None, fmrs=(0.1,), n_bootstrap=50, seed=7)
    assert unknown.bootstrap_unit == "pairs" and "subject ids unknown" in unknown.cells()["Note"]
    again = bm.verification_report(scores, genuine, None, fmrs=(0.1,), n_bootstrap=50, seed=7)
    assert again.eer_ci == unknown.eer_ci   # seeded


def test_weighted_eer_equals_the_eer_of_the_repeated_pairs_with_ties():
    scores, genuine = random_scores(4, n_gen=60, n_imp=200)
    scores = scores.round(1)   # many ties, across genuine and impostor pairs
    weights = np.random.default_rng(5).integers(0, 3, size=(6, len(scores))).astype(float)
    got = bm._weighted_eer(scores, genuine, weights)
    for w, eer in zip(weights, got):
        reps = np.repeat(np.arange(len(scores)), w.astype(int))
        assert eer == pytest.approx(sk_eer(scores[reps], genuine[reps]), abs=1e-12)


def test_bad_scores_and_fmrs_are_refused():
    scores, genuine = random_scores(0, 20, 40)
    with pytest.raises(UserError, match="NaN or infinite"):
        bm.verification_report(np.r_[np.nan, scores[1:]], genuine)
    with pytest.raises(UserError, match="no genuine pairs"):
        bm.verification_report(scores, np.zeros(60, bool))
    with pytest.raises(UserError, match="no impostor pairs"):
        bm.verification_report(scores, np.ones(60, bool))
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(UserError, match="strictly between 0 and 1"):
            bm.verification_report(scores, genuine, fmrs=(bad,))


# ---- demographic differentials ---------------------------------------------------------------------------------------

def differential_case():
    """2000 impostor pairs (1000 same-gender, 1000 cross-gender) where the highest impostor scores are cross-gender,
    and 100 genuine pairs of each gender, 10 of the women's and 2 of the men's scoring low."""
    cross_top, same_top = 0.74 - 0.01 * np.arange(15), 0.49 - 0.01 * np.arange(10)   # 0.74..0.60, 0.49..0.40
    cross = np.r_[cross_top, np.linspace(0.0, 0.3, 985)]
    same = np.r_[same_top, np.linspace(-0.2, 0.3, 990)]
    women = np.r_[np.full(10, 0.2), np.full(90, 0.9)]
    men = np.r_[np.full(2, 0.3), np.full(98, 0.9)]
    scores = np.r_[cross, same, women, men]
    genuine = np.r_[np.zeros(2000, bool), np.ones(200, bool)]
    half = np.array(["f", "m"] * 500)
    genders = np.r_[np.stack([half, half[::-1]], 1),                        # cross-gender impostors (f-m, m-f)
                    np.stack([half, half], 1),                              # same-gender impostors
                    np.full((100, 2), "f"), np.full((100, 2), "m")].astype(object)
    images = np.array([[f"{p}a", f"{p}b"] for p in range(2200)], dtype=object)
    return scores, genuine, bm.PairMeta(images, np.full((2200, 2), "", dtype=object), genders, "test")


def test_differentials_show_cross_gender_impostors_scoring_higher():
    scores, genuine, meta = differential_case()
    rep = bm.verification_report(scores, genuine, meta, fmrs=(0.01,), differential_fmr=0.01, n_bootstrap=0)
    # k = 20 false matches allowed: the 15 cross-gender and the top 5 same-gender impostors; threshold 0.44
    assert rep.threshold == pytest.approx(0.44)
    assert (rep.impostor_same, rep.impostor_cross) == (1000, 1000)
    assert rep.fmr_cross == 15 / 1000 and rep.fmr_same == 5 / 1000
    assert rep.fmr_ratio == pytest.approx(3.0)
    assert rep.genuine_by_gender == {"f": 100, "m": 100}
    assert rep.fnmr_by_gender == {"f": 0.10, "m": 0.02}
    assert rep.fnmr_ratio == pytest.approx(5.0)
    cells = rep.cells()
    assert float(cells["FMR-Cross-Gender"]) == 0.015 and float(cells["Differential-FMR"]) == 0.01
    # at the default FMR 0.1%, 2000 impostors are too few (3000 needed): the smallest FMR allowed, 3/2000, is used
    low = bm.verification_report(scores, genuine, meta, fmrs=(0.01,), n_bootstrap=0)
    assert low.differential_fmr == pytest.approx(3 / 2000) and "differentials at FMR=0.15%" in low.cells()["Note"]
    assert low.fmr_cross == 3 / 1000 and low.fmr_same == 0 and low.cells()["FMR-Ratio-Cross/Same"] == ""


def test_report_warns_when_the_layer_raises_cross_gender_false_matches(tmp_path):
    scores, genuine, meta = differential_case()
    before = scores.copy()
    before[:15] -= 0.5          # the bare backbone: the cross-gender impostors do not stand out
    bare = bm.verification_report(before, genuine, meta, differential_fmr=0.01, n_bootstrap=0)
    after = bm.verification_report(scores, genuine, meta, differential_fmr=0.01, n_bootstrap=0)
    assert after.fmr_cross > bare.fmr_cross
    bm._upsert(tmp_path / "bare_backbone_verification.csv", bm.BARE_VERIFICATION_COLUMNS,
               [{"Dataset": "set", **bare.cells()}], ["Dataset"])
    bm._upsert(tmp_path / "run_verification.csv", bm.VERIFICATION_COLUMNS,
               [{"Step": "10", "Dataset": "set", **bare.cells()}, {"Step": "20", "Dataset": "set", **after.cells()}],
               ["Step", "Dataset"])
    bm.write_score_file(bm.score_path(tmp_path, None, "set"), before, genuine, meta)
    bm.write_score_file(bm.score_path(tmp_path, "run", "set", 20), scores, genuine, meta)
    lines = bm.verification_section(tmp_path, pd.DataFrame(), ["run"])
    text = "\n".join(lines)
    warning = [ln for ln in lines if ln.startswith("- **Warning** (run on set)")]
    assert len(warning) == 1 and "step 20" in warning[0] and "15 of 1000" in warning[0]
    assert "1 of the run's 2 checkpoints" in warning[0]
    assert "| run (step 20) |" in text and "| bare backbone |" in text
    assert (tmp_path / "det_set.png").read_bytes()[:4] == b"\x89PNG"
    # a layer that does not raise them: no warning
    bm._upsert(tmp_path / "run_verification.csv", bm.VERIFICATION_COLUMNS,
               [{"Step": "20", "Dataset": "set", **bare.cells()}], ["Step", "Dataset"])
    assert not [ln for ln in bm.verification_section(tmp_path, pd.DataFrame(), ["run"])
                if "Warning" in ln]


# ---- score files -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("known", [True, False])
def test_score_file_recomputes_the_same_numbers(tmp_path, known):
    scores, genuine, meta = differential_case()
    if known:   # subjects: genuine pairs one person, impostor pairs two
        subj = np.array([[f"p{p}", f"p{p}" if g else f"q{p}"] for p, g in enumerate(genuine)], dtype=object)
        meta = bm.PairMeta(meta.images, subj, meta.genders, "test")
    else:
        meta = None
    rep = bm.verification_report(scores, genuine, meta, fmrs=(0.01,), n_bootstrap=0)
    path = bm.write_score_file(tmp_path / "s.csv", scores, genuine,
                               meta or bm.PairMeta.unknown(len(scores), "set"))
    # a few lines of independent code: bob.bio.base's rule (genuine = the two subject ids agree), numpy only
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == bm.SCORE_COLUMNS
    s = np.array([float(r["score"]) for r in rows])
    same = np.array([r["probe_subject_id"] == r["bio_ref_subject_id"] for r in rows])
    assert (same == genuine).all() and (np.array([r["genuine"] for r in rows]) == np.where(genuine, "1", "0")).all()
    imp = np.sort(s[~same])[::-1]
    threshold = imp[int(0.01 * len(imp))]
    assert np.mean(s[same] <= threshold) == rep.fnmr[0.01]
    assert sk_eer(s, same) == pytest.approx(rep.eer, abs=1e-12)
    genders = [[r["probe_gender"], r["bio_ref_gender"]] for r in rows]
    assert genders == (meta.genders.tolist() if known else [["", ""]] * len(rows))


# ---- where subjects and genders come from ----------------------------------------------------------------------------

def write_sidecar(path, rows, header=",".join(bm.SIDECAR_COLUMNS)):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_pairs_sidecar_is_read_and_a_missing_one_means_unknown(tmp_path):
    issame = np.array([True, False, True])
    write_sidecar(tmp_path / "x.pairs.csv", ["2,c/1.png,c/2.png,c,c,m,m", "0,a/1.png,a/2.png,a,a,f,f",
                                             "1,a/1.png,b/1.png,a,b,f,"])
    meta = bm.pair_meta_for_bin(tmp_path / "x.bin", issame)
    assert meta.subjects.tolist() == [["a", "a"], ["a", "b"], ["c", "c"]]
    assert meta.genders.tolist() == [["f", "f"], ["f", ""], ["m", "m"]]
    assert meta.images[1].tolist() == ["a/1.png", "b/1.png"] and meta.subjects_known
    assert meta.genders_known.tolist() == [True, False, True]
    none = bm.pair_meta_for_bin(tmp_path / "y.bin", issame)
    assert none.source == "unknown" and not none.subjects_known and not none.genders_known.any()


@pytest.mark.parametrize("rows, message", [
    (["0,a,a2,a,a,f,f", "1,a,b,a,b,x,m", "2,c,c2,c,c,m,m"], "line 3: gender_a is 'x'"),
    (["0,a,a2,a,a,f,f", "2,c,c2,c,c,m,m"], "lists 2 of the .bin's 3 pairs"),
    (["0,a,a2,a,a,f,f", "1,a,b,a,b,f,m", "3,c,c2,c,c,m,m"], "line 4: pair '3' is not a pair index from 0 to 2"),
    (["0,a,a2,a,a,f,f", "0,a,b,a,b,f,m", "2,c,c2,c,c,m,m"], "line 3: pair 0 is listed twice"),
    (["0,a,a2,a,a,f,f", "1,a,b,a,a,f,m", "2,c,c2,c,c,m,m"], "line 3: subjects 'a' and 'a' for a impostor pair"),
    (["0,a,a2,a,a,f,f", "1,a,b,a,b,f", "2,c,c2,c,c,m,m"], "line 3: 6 fields, the header has 7"),
])
def test_malformed_sidecar_names_file_and_line(tmp_path, rows, message):
    write_sidecar(tmp_path / "x.pairs.csv", rows)
    with pytest.raises(UserError, match="x.pairs.csv") as err:
        bm.pair_meta_for_bin(tmp_path / "x.bin", np.array([True, False, True]))
    assert message in str(err.value)


def test_sidecar_without_its_columns_is_refused(tmp_path):
    write_sidecar(tmp_path / "x.pairs.csv", ["0,a,b,a,a"], header="pair,image_a,image_b,subject_a,subject_b")
    with pytest.raises(UserError, match=r"line 1: .* lacks \['gender_a', 'gender_b'\]"):
        bm.pair_meta_for_bin(tmp_path / "x.bin", np.array([True]))


def test_lfw_pairs_txt_with_the_gender_lists(tmp_path):
    (tmp_path / "lfw.pairs.txt").write_text("1\t2\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBob_Ray\t3\n")
    (tmp_path / "female_names.txt").write_text("Ann_Lee_0001.jpg\nAnn_Lee_0002.jpg\n")
    (tmp_path / "male_names.txt").write_text("Bob_Ray_0001.jpg\n")
    meta = bm.pair_meta_for_bin(tmp_path / "lfw.bin", np.array([True, False]))
    assert meta.images.tolist() == [["Ann_Lee_0001", "Ann_Lee_0002"], ["Ann_Lee_0001", "Bob_Ray_0003"]]
    assert meta.subjects.tolist() == [["Ann_Lee", "Ann_Lee"], ["Ann_Lee", "Bob_Ray"]]
    assert meta.genders.tolist() == [["f", "f"], ["f", ""]]   # Bob_Ray_0003 is in neither list
    with pytest.raises(UserError, match="lists 2 pairs, the .bin 3"):
        bm.pair_meta_for_bin(tmp_path / "lfw.bin", np.array([True, False, True]))


# ---- the command line ------------------------------------------------------------------------------------------------

def cli_world(tmp_path, n_ids=40, per=4, seed=0):
    """Templates of ``n_ids`` people (``per`` each, the first half women), a pairs CSV of all genuine pairs and as
    many impostor pairs, and an ids file."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, 16))
    x = np.repeat(centres, per, axis=0) + 0.6 * rng.normal(size=(n_ids * per, 16))
    subject = np.repeat(np.arange(n_ids), per)
    gender = np.where(subject < n_ids // 2, "f", "m")
    rows = [(a, b, 1) for a in range(len(x)) for b in range(a + 1, len(x)) if subject[a] == subject[b]]
    rows += [(a, b, 0) for a, b in rng.integers(0, len(x), size=(4 * len(rows), 2)) if subject[a] != subject[b]]
    np.save(tmp_path / "t.npy", x)
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_a", "image_b", "genuine", "subject_a", "subject_b", "gender_a", "gender_b"])
        w.writerows([a, b, g, subject[a], subject[b], gender[a], gender[b]] for a, b, g in rows)
    (tmp_path / "ids.txt").write_text("".join(f"img{i}\n" for i in range(len(x))))
    return x, rows


def test_cli_writes_the_report_score_file_and_det(tmp_path, capsys):
    x, rows = cli_world(tmp_path)
    argv = ["--templates", str(tmp_path / "t.npy"), "--pairs", str(tmp_path / "pairs.csv"), "--fmr", "0.01",
            "--bootstrap", "50", "--out", str(tmp_path)]
    assert bm.main(argv) == 0
    out = capsys.readouterr().out
    assert "FNMR@FMR=1%" in out and "t_verification.csv" in out
    with open(tmp_path / "t_verification.csv", newline="") as fh:
        result = list(csv.DictReader(fh))
    assert len(result) == 1 and list(result[0]) == bm.report_columns((0.01,))
    assert result[0]["Bootstrap-Unit"] == "subjects" and result[0]["FMR-Cross-Gender"] != ""
    # the scores are the cosine similarities of the named templates
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = np.array([u[a] @ u[b] for a, b, _ in rows])
    genuine = np.array([g == 1 for _, _, g in rows])
    s, g = bm.read_score_file(tmp_path / "t_scores.csv")
    assert s == pytest.approx(cos, abs=1e-12) and (g == genuine).all()
    assert float(result[0]["FNMR@FMR=1%"]) == pytest.approx(sk_fnmr_at_fmr(s, g, 0.01), abs=1e-12)
    assert (tmp_path / "t_det.png").read_bytes()[:4] == b"\x89PNG"
    # by id, and a second run takes new names instead of replacing the first results
    ids_pairs = tmp_path / "pairs_ids.csv"
    ids_pairs.write_text("image_a,image_b,genuine\n" + "".join(f"img{a},img{b},{g}\n" for a, b, g in rows))
    assert bm.main([*argv[:3], str(ids_pairs), *argv[4:], "--ids", str(tmp_path / "ids.txt")]) == 0
    with open(tmp_path / "t_verification_2.csv", newline="") as fh:
        by_id = next(csv.DictReader(fh))
    assert by_id["FNMR@FMR=1%"] == result[0]["FNMR@FMR=1%"] and by_id["Bootstrap-Unit"] == "pairs"


@pytest.mark.parametrize("case, message", [
    ("unknown_row", "line 3: image_b '999' is not a template row from 0 to 159"),
    ("unknown_id", "image_a 'nobody' is not an id of the --ids file"),
    ("fmr_zero", "--fmr: every FMR must lie strictly between 0 and 1"),
    ("fmr_one", "--fmr: every FMR must lie strictly between 0 and 1"),
    ("no_genuine", "there are no genuine pairs"),
    ("no_impostor", "there are no impostor pairs"),
    ("nan", "template row(s) 3 (counting from 0) hold NaN"),
    ("bad_flag", "genuine 'maybe' must be 1/0"),
    ("missing_column", "has no column(s) ['genuine']"),
])
def test_cli_bad_inputs_get_one_paragraph_errors(tmp_path, capsys, case, message):
    x, rows = cli_world(tmp_path, n_ids=40)
    pairs = tmp_path / "pairs.csv"
    argv = ["--templates", str(tmp_path / "t.npy"), "--pairs", str(pairs), "--bootstrap", "0", "--out", str(tmp_path)]
    head = "image_a,image_b,genuine\n"
    if case == "unknown_row":
        pairs.write_text(head + "0,1,1\n0,999,0\n")
    elif case == "unknown_id":
        pairs.write_text(head + "nobody,img1,1\n")
        argv += ["--ids", str(tmp_path / "ids.txt")]
    elif case == "fmr_zero":
        argv += ["--fmr", "0"]
    elif case == "fmr_one":
        argv += ["--fmr", "0.01", "1"]
    elif case == "no_genuine":
        pairs.write_text(head + "".join(f"{a},{b},0\n" for a, b, g in rows if not g))
    elif case == "no_impostor":
        pairs.write_text(head + "".join(f"{a},{b},1\n" for a, b, g in rows if g))
    elif case == "nan":
        x[3, 0] = np.nan
        np.save(tmp_path / "t.npy", x)
    elif case == "bad_flag":
        pairs.write_text(head + "0,1,maybe\n")
    elif case == "missing_column":
        pairs.write_text("image_a,image_b\n0,1\n")
    assert bm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t_verification.csv").exists()


def test_fmr_threshold_counts_false_matches_exactly():
    imp = np.array([0.1 * i for i in range(100)])[::-1]
    assert bm.fmr_threshold(imp, 0.29) == pytest.approx(7.0)   # 29 allowed: 9.9 ... 7.1 match, 7.0 does not
    assert bm.fmr_threshold(imp, 0.999) == 0.0                 # 99 allowed: all but the lowest
    assert bm.fmr_threshold(imp, 0.001) == pytest.approx(9.9)  # none allowed: nothing above the highest matches


# ---- in the sweep ----------------------------------------------------------------------------------------------------

def synthetic_sidecar(root, name="synth_a", n_pairs=600, seed=0):
    """The sidecar of a synthetic world's .bin: its pairs drawn again as build_bin drew them (same seed), each image's
    subject and gender read from its subjectid_gender folder (1 feminine, 0 masculine). Left alone where the .bin's
    builder wrote one already."""
    from facedata.bin_builder import draw_pairs
    from facedata.dataset import scan_dataset
    path = root / "rec" / f"{name}.pairs.csv"
    if path.exists():
        return path
    index = scan_dataset(root / "test" / name)
    pairs = draw_pairs(index, n_pairs, np.random.default_rng(seed))
    lines = []
    for p, (a, b, _) in enumerate(pairs):
        sides = [(index.paths[i].parent.name.rpartition("_"), index.paths[i]) for i in (a, b)]
        lines.append([p, *(f"{f.parent.name}/{f.name}" for _, f in sides), *(s[0] for s, _ in sides),
                      *("f" if s[2] == "1" else "m" for s, _ in sides)])
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([bm.SIDECAR_COLUMNS, *lines])
    return path


def test_sweep_writes_the_verification_csv_score_files_and_report(tmp_path):
    from helpers import demo_cfg, synthetic_world
    from pipeline import sweep as evaluation
    from pipeline import train as finetune
    root = tmp_path / "world"
    synthetic_world(root, n_train_ids=40, imgs=4, pairs=600, gender=96)
    synthetic_sidecar(root)
    finetune.train(demo_cfg(root, "num_epoch=4", "checkpoint_every=2"))
    cfg = demo_cfg(root, "bootstrap=200")
    out = evaluation.evaluate(cfg, tmp_path / "res", root / "ckpt" / "Demo", "Exp/Synth", tmp_path / "ref.csv")
    (run,) = [p.name.removesuffix("_metrics.csv") for p in out.glob("*_metrics.csv")]
    with open(out / f"{run}_verification.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == bm.VERIFICATION_COLUMNS
    with open(out / f"{run}_metrics.csv", newline="") as fh:
        assert [(r["Step"], r["Dataset"]) for r in rows] == [(r["Step"], r["Dataset"]) for r in csv.DictReader(fh)]
    for r in rows:
        assert int(r["Genuine"]) + int(r["Impostor"]) == 600 and int(r["Impostor"]) == 300
        assert r["FNMR@FMR=1%"] != "" and r["FNMR@FMR=0.1%"] == "" and "rule of three" in r["Note"]
        assert r["Bootstrap-Unit"] == "subjects" and float(r["EER-CI-Low"]) <= float(r["EER-Pooled"])
        assert int(r["Genuine-f"]) + int(r["Genuine-m"]) == 300 and r["FMR-Cross-Gender"] != ""
        assert int(r["Impostor-Same-Gender"]) + int(r["Impostor-Cross-Gender"]) == 300
        assert bm.score_path(out, run, "synth_a", int(r["Step"])).is_file()
    # the bare backbone's pooled EER is the diagnostics' threshold-free EER, and its score file recomputes it
    with open(out / "bare_backbone_verification.csv", newline="") as fh:
        bare = next(csv.DictReader(fh))
    with open(out / "bare_backbone_diagnostics.csv", newline="") as fh:
        diag = next(csv.DictReader(fh))
    assert float(bare["EER-Pooled"]) == pytest.approx(float(diag["EER-Threshold-Free"]), abs=1e-9)
    s, g = bm.read_score_file(bm.score_path(out, None, "synth_a"))
    assert sk_eer(s, g) == pytest.approx(float(bare["EER-Pooled"]), abs=1e-12)
    report = (out / "report.md").read_text()
    assert "## Verification as ISO/IEC 19795-1" in report and "det_synth_a.png" in report
    assert (out / "det_synth_a.png").read_bytes()[:4] == b"\x89PNG"
    # a second sweep changes nothing, and a foreign file where a verification CSV goes is refused, not replaced
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "evaluate.log"}
    evaluation.evaluate(cfg, tmp_path / "res", root / "ckpt" / "Demo", "Exp/Synth", tmp_path / "ref.csv")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "evaluate.log"} == before
    (out / f"{run}_verification.csv").write_text("mine,not,yours\n")
    with pytest.raises(UserError, match="not one of this tool's files"):
        evaluation.evaluate(cfg, tmp_path / "res", root / "ckpt" / "Demo", "Exp/Synth", tmp_path / "ref.csv")
    assert (out / f"{run}_verification.csv").read_text() == "mine,not,yours\n"
