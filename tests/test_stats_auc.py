"""Tests of covreport.stats.auc.

Independent references: scikit-learn's roc_auc_score and roc_curve for the
AUC; DeLong's variance and covariance recomputed here by brute force, O(n^2),
from the structural components of DeLong et al. (1988), without ranks.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from covreport.chexpert import read_chexpert_csv
from covreport.errors import ScoresError, StatsError
from covreport.stats.auc import (
    delong_auc,
    delong_test,
    roc_curve_points,
    validation_auc,
)

Z95 = 1.959963984540054


def _brute_delong(y, scores):
    """DeLong et al. 1988 by definition: psi(x, y) = 1 if x > y, 1/2 if x == y, else 0;
    V10(x_i) = mean_j psi(x_i, y_j), V01(y_j) = mean_i psi(x_i, y_j);
    S10, S01 = sample covariances (denominator m-1, n-1); Cov = S10/m + S01/n."""
    y = np.asarray(y)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    k = scores.shape[0]
    v10, v01, aucs = [], [], []
    for r in range(k):
        x = scores[r][y == 1]
        w = scores[r][y == 0]
        psi = (x[:, None] > w[None, :]).astype(float) + 0.5 * (x[:, None] == w[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.array([[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)]
                    for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)]
                    for a in range(k)])
    return np.array(aucs), s10 / m + s01 / n


def _data(seed, n=80, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2], y[2:4] = 1, 0
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn_and_variance_matches_bruteforce(seed, ties):
    y, s = _data(seed, ties=ties)
    res = delong_auc(y, s)
    # Reference: scikit-learn roc_auc_score.
    assert res["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # Reference: O(n^2) DeLong structural components (written above).
    aucs, cov = _brute_delong(y, s)
    assert res["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    # Reference: the logit-transformed Wald interval written out (Pepe 2003, section 5.2.3).
    a, se = aucs[0], res["se"]
    half = Z95 * se / (a * (1 - a))
    logit = math.log(a / (1 - a))
    assert res["ci_low"] == pytest.approx(1 / (1 + math.exp(-(logit - half))), rel=1e-12)
    assert res["ci_high"] == pytest.approx(1 / (1 + math.exp(-(logit + half))), rel=1e-12)
    assert (res["n_pos"], res["n_neg"]) == (int(y.sum()), int((1 - y).sum()))
    assert "DeLong" in res["method"] and "logit" in res["method"] and res["note"] == ""
    wald = delong_auc(y, s, ci="wald")
    assert wald["ci_low"] == pytest.approx(max(0.0, a - Z95 * se), rel=1e-12)
    assert wald["ci_high"] == pytest.approx(min(1.0, a + Z95 * se), rel=1e-12)
    assert "clipped" in wald["method"]


def test_logit_ci_stays_inside_unit_interval_where_wald_is_clipped():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.4, 0.35])
    wald = delong_auc(y, s, ci="wald")
    assert wald["auc"] == pytest.approx(roc_auc_score(y, s))  # reference: scikit-learn
    assert wald["ci_high"] == 1.0 and wald["auc"] + Z95 * wald["se"] > 1.0
    res = delong_auc(y, s)
    assert 0.0 < res["ci_low"] < res["auc"] < res["ci_high"] < 1.0


def test_perfect_separation_gives_the_exact_interval_of_disjoint_comparisons():
    res = delong_auc([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9])
    assert res["auc"] == 1.0 and res["se"] == 0.0
    # Reference: the Clopper-Pearson interval of 2 of 2 (min(positives, negatives) comparisons sharing no
    # case), lower bound Beta(0.025; 2, 1) by scipy (binomtest's root finder agrees to 3e-14 only).
    low = sps.beta.ppf(0.025, 2, 1)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((low, 1.0), abs=1e-15)
    assert res["note"] == ("complete separation (AUC = 1) makes DeLong's SE 0: the interval is the exact "
                           "Clopper-Pearson interval of 2 of 2 comparisons that share no case (conservative)")
    zero = delong_auc([0, 0, 0, 1, 1], [0.9, 0.8, 0.7, 0.2, 0.1])
    assert zero["auc"] == 0.0 and (zero["ci_low"], zero["ci_high"]) == pytest.approx((0.0, 1 - low), abs=1e-15)
    wald = delong_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], ci="wald")  # pROC's interval, kept for replication
    assert wald["ci_low"] == wald["ci_high"] == 1.0


def test_bad_ci_raises():
    with pytest.raises(StatsError, match="ci must be one of logit, wald, got 'exact'"):
        delong_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], ci="exact")


def test_single_positive_gives_auc_without_se():
    res = delong_auc([0, 0, 0, 1], [0.1, 0.5, 0.3, 0.4])
    assert res["auc"] == pytest.approx(roc_auc_score([0, 0, 0, 1], [0.1, 0.5, 0.3, 0.4]))
    assert math.isnan(res["se"]) and "at least 2 positives and 2 negatives" in res["note"]


@pytest.mark.parametrize("y,msg", [
    ([1, 1, 1], "the AUC needs both classes, but all 3 cases are positive (1)"),
    ([0, 0], "the AUC needs both classes, but all 2 cases are negative (0)"),
    ([0, 1, 2], "y_true must hold 0 (negative) and 1 (positive) only; position 2 holds 2"),
    ([0, 1, np.nan], "y_true has missing values (first at position 2); drop those rows first"),
])
def test_bad_truth_raises(y, msg):
    with pytest.raises(StatsError) as exc:
        delong_auc(y, np.arange(len(y), dtype=float))
    assert str(exc.value) == msg


def test_bad_scores_raise():
    with pytest.raises(StatsError, match=r"y_score has missing values \(first at position 1\)"):
        delong_auc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(StatsError, match="y_score has 2 values but y_true has 3"):
        delong_auc([0, 1, 1], [0.1, 0.3])


def test_bool_truth_accepted():
    y, s = _data(7)
    assert delong_auc(y.astype(bool), s) == delong_auc(y, s)


@pytest.mark.parametrize("seed", range(3))
def test_delong_test_matches_bruteforce(seed):
    rng = np.random.default_rng(100 + seed)
    y, a = _data(seed, n=60, ties=True)
    b = a + rng.normal(scale=1.0, size=len(a))
    res = delong_test(y, a, b)
    # Reference: O(n^2) structural components; two-sided normal p from scipy.
    aucs, cov = _brute_delong(y, np.vstack([a, b]))
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = (aucs[0] - aucs[1]) / se
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)  # reference: scikit-learn
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert res["difference"] == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    assert res["se"] == pytest.approx(se, rel=1e-9)
    assert res["z"] == pytest.approx(z, rel=1e-9)
    assert res["p"] == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    swapped = delong_test(y, b, a)
    assert swapped["z"] == pytest.approx(-res["z"]) and swapped["p"] == pytest.approx(res["p"])


def test_delong_test_identical_scores_has_no_z():
    y, s = _data(3)
    res = delong_test(y, s, s)
    assert res["difference"] == 0.0 and math.isnan(res["z"]) and math.isnan(res["p"])
    assert "variance of the difference is zero" in res["note"]


def test_roc_curve_points_area_equals_auc():
    y, s = _data(5, ties=True)
    fpr, tpr = roc_curve_points(y, s)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # Reference: trapezoidal area of the curve = scikit-learn roc_auc_score.
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    assert trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


binary = st.lists(st.integers(0, 1), min_size=4, max_size=40).filter(lambda v: 2 <= sum(v) <= len(v) - 2)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_properties(data):
    y = np.array(data.draw(binary))
    s = np.array(data.draw(st.lists(st.integers(-5, 5), min_size=len(y), max_size=len(y))), dtype=float)
    res = delong_auc(y, s)
    # AUC(y, s) = 1 - AUC(y, -s), with the same SE.
    neg = delong_auc(y, -s)
    assert neg["auc"] == pytest.approx(1 - res["auc"], abs=1e-12)
    assert neg["se"] == pytest.approx(res["se"], abs=1e-12)
    # The interval contains the estimate strictly inside (0, 1); at separation it is the exact one;
    # otherwise there is none and the note says why.
    if res["se"] > 0 and 0 < res["auc"] < 1:
        assert 0.0 < res["ci_low"] <= res["auc"] <= res["ci_high"] < 1.0 and res["note"] == ""
    elif res["auc"] in (0.0, 1.0):
        assert res["ci_low"] <= res["auc"] <= res["ci_high"] and 0 < res["ci_high"] - res["ci_low"] < 1
        assert res["note"].startswith("complete separation")
    else:
        assert math.isnan(res["ci_low"]) and math.isnan(res["ci_high"]) and res["note"].startswith("no interval")
    # Row order does not matter.
    perm = np.random.default_rng(len(y)).permutation(len(y))
    shuffled = delong_auc(y[perm], s[perm])
    for key in ("auc", "se", "ci_low", "ci_high"):
        assert shuffled[key] == pytest.approx(res[key], abs=1e-12, nan_ok=True)
    # Reference: scikit-learn roc_auc_score.
    assert res["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# --- validation AUCs -----------------------------------------------------------


def _validation_frames():
    rng = np.random.default_rng(11)
    n = 40
    truth = pd.DataFrame({
        "Path": [f"CheXpert-v1.0-small/valid/patient{i:05d}/study1/view1_frontal.jpg" for i in range(n)],
        "Edema": rng.integers(0, 2, n).astype(float),
        "Lung Lesion": [1.0] + [0.0] * (n - 1),
        "Atelectasis": rng.integers(0, 2, n).astype(float),
    })
    truth.loc[[3, 4, 5], "Atelectasis"] = -1.0
    truth.loc[[6, 7], "Atelectasis"] = np.nan
    scores = pd.DataFrame({
        "image": truth["Path"],
        "Edema": rng.random(n) + 0.3 * truth["Edema"],
        "Lung Lesion": rng.random(n),
        "Atelectasis": rng.random(n),
    })
    return truth, scores


def test_validation_auc_rows():
    truth, scores = _validation_frames()
    labels = ["Edema", "Lung Lesion", "Atelectasis"]
    df = validation_auc(truth, scores, labels)
    assert list(df.columns) == ["label", "n_pos", "n_neg", "auc", "se", "ci_low", "ci_high", "method", "note"]
    assert list(df["label"]) == labels
    ed = df.iloc[0]
    # Reference: scikit-learn roc_auc_score on the same rows.
    assert ed["auc"] == pytest.approx(roc_auc_score(truth["Edema"], scores["Edema"]), abs=1e-12)
    assert ed["note"] == ""
    les = df.iloc[1]
    assert (les["n_pos"], les["n_neg"]) == (1, 39) and math.isnan(les["auc"])
    assert les["note"] == "not estimable: 1 positive(s) and 39 negative(s); at least 2 of each are needed"
    at = df.iloc[2]
    keep = truth["Atelectasis"].isin([0, 1])
    assert at["n_pos"] + at["n_neg"] == 35
    assert at["auc"] == pytest.approx(roc_auc_score(truth.loc[keep, "Atelectasis"],
                                                    scores.loc[keep, "Atelectasis"]), abs=1e-12)
    assert at["note"] == "left out: 3 uncertain (-1), 2 blank"
    direct = delong_auc(truth.loc[keep, "Atelectasis"], scores.loc[keep, "Atelectasis"])
    assert at["se"] == direct["se"]


def test_validation_auc_unscored_rows_left_out():
    truth, scores = _validation_frames()
    scores.loc[0, "Edema"] = np.nan
    row = validation_auc(truth, scores, ["Edema"]).iloc[0]
    assert row["n_pos"] + row["n_neg"] == 39 and row["note"] == "left out: 1 without a score"


def test_validation_auc_errors():
    truth, scores = _validation_frames()
    with pytest.raises(ScoresError, match=r"validation scores lack label column\(s\) \['Edema'\]"):
        validation_auc(truth, scores.drop(columns="Edema"), ["Edema"])
    with pytest.raises(ScoresError, match="validation truth has 40 rows but the scores have 39"):
        validation_auc(truth, scores.iloc[:-1], ["Edema"])
    bad = truth.copy()
    bad["Edema"] = bad["Edema"].astype(object)
    bad.loc[2, "Edema"] = "yes"
    with pytest.raises(ScoresError, match=r"validation truth column 'Edema', row 2: 'yes' is not"):
        validation_auc(bad, scores, ["Edema"])
    bad.loc[2, "Edema"] = 2.0
    with pytest.raises(ScoresError, match="row 2: 2.0 is not 1"):
        validation_auc(bad, scores, ["Edema"])


def test_read_chexpert_csv(tmp_path):
    truth, _ = _validation_frames()
    path = tmp_path / "valid.csv"
    truth.to_csv(path, index=False)
    df = read_chexpert_csv(path, labels=["Edema", "Atelectasis"])
    assert list(df.columns) == ["Path", "Edema", "Atelectasis"]
    assert df["Atelectasis"].isna().sum() == 2 and (df["Atelectasis"] == -1).sum() == 3
    # By default every CheXpert label column present is kept.
    assert list(read_chexpert_csv(path).columns) == ["Path", "Lung Lesion", "Edema", "Atelectasis"]
    with pytest.raises(ScoresError) as exc:
        read_chexpert_csv(path, labels=["Edema", "Cardiomegaly"])
    assert str(exc.value) == (f"{str(path)!r} lacks column(s) ['Cardiomegaly']; a CheXpert label CSV "
                              "has 'Path' and one column per label")
    truth.drop(columns="Path").to_csv(path, index=False)
    with pytest.raises(ScoresError, match=r"lacks column\(s\) \['Path'\]"):
        read_chexpert_csv(path)
    truth.loc[5, "Edema"] = 3
    truth.to_csv(path, index=False)
    with pytest.raises(ScoresError, match="column 'Edema', data row 6: 3.0 is not 1, 0, -1 or blank"):
        read_chexpert_csv(path)
    with pytest.raises(ScoresError, match="cannot read the CheXpert label CSV"):
        read_chexpert_csv(tmp_path / "nope.csv")


PROC = json.loads((Path(__file__).parent / "fixtures" / "r_proc_auc.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("rec", PROC["delong"], ids=lambda r: r["case"])
def test_delong_matches_proc(rec):
    # Reference: R pROC 1.18.0 (tests/fixtures/r_proc_auc.R; each record names the call).
    y, s = np.array(rec["y"]), np.array(rec["s"])
    wald = delong_auc(y, s, ci="wald")
    assert wald["auc"] == pytest.approx(rec["auc"], abs=1e-14)
    assert wald["se"] ** 2 == pytest.approx(rec["var"], abs=1e-14)
    assert (wald["ci_low"], wald["ci_high"]) == pytest.approx((rec["wald_low"], rec["wald_high"]), abs=1e-14)
    res = delong_auc(y, s)
    # At AUC 1 pROC warns its 1-1 interval "can be misleading"; the fixture holds R's binom.test(N, N) there.
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((rec["logit_low"], rec["logit_high"]), abs=1e-14)


PROC_TEST = json.loads((Path(__file__).parent / "fixtures" / "r_proc_roctest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", PROC_TEST["cases"], ids=lambda c: c["case"])
def test_delong_test_matches_proc_roc_test(case):
    # Reference: R pROC 1.18.0 roc.test(method = "delong", paired = TRUE), tests/fixtures/r_proc_roctest.R.
    res = delong_test(case["y"], case["a"], case["b"])
    assert res["auc_a"] == pytest.approx(case["auc_a"], abs=1e-14)
    assert res["auc_b"] == pytest.approx(case["auc_b"], abs=1e-14)
    assert res["z"] == pytest.approx(case["z"], abs=1e-13)
    assert res["p"] == pytest.approx(case["p"], abs=1e-13)
