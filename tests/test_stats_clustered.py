"""Tests of covreport.stats.clustered (patient-clustered inference).

Independent references, named at each check: Obuchowski's (1997) formulas
written out plainly in this file (double loops over units and clusters);
DeLong's variance (covreport.stats.auc.delong_auc, itself checked against
pROC) for the one-unit-per-cluster identity; scipy.stats.mannwhitneyu for
theta = U/(n1 n2); statsmodels multipletests for Holm and BH; the bootstrap
quantities recomputed here from each resample's expanded sample (np.repeat),
with numpy's median and Cohen's d from its definition.
"""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from covreport.constants import CONTRASTS, IMPROVED, STABLE, WORSE
from covreport.errors import StatsError
from covreport.stats.auc import delong_auc, delong_test
from covreport.stats.clustered import (
    BOOTSTRAP_METRICS,
    cluster_bootstrap,
    group_differences_clustered,
    obuchowski_auc,
    obuchowski_compare,
    bca_interval,
    primary_analysis,
    resample_counts,
)
from covreport.stats.table1 import table_one_patients


def _plain_obuchowski(x, cx, y, cy, parts=False):
    """Obuchowski 1997, section 2, written out with loops (reference).

    With ``parts`` also the Welch-Satterthwaite df of S10/N (I10 - 1 df) and S01/M (I01 - 1 df),
    at most I - 2 (Satterthwaite 1946, his equation for a linear combination of variance estimates).
    """
    def psi(a, b):
        return 1.0 if a > b else (0.5 if a == b else 0.0)

    N, M = len(x), len(y)
    theta = sum(psi(a, b) for a in x for b in y) / (N * M)
    clusters = sorted(set(cx) | set(cy))
    V10 = {c: 0.0 for c in clusters}
    V01 = {c: 0.0 for c in clusters}
    n = {c: 0 for c in clusters}
    m = {c: 0 for c in clusters}
    for a, c in zip(x, cx):
        V10[c] += sum(psi(a, b) for b in y) / M
        n[c] += 1
    for b, c in zip(y, cy):
        V01[c] += sum(psi(a, b) for a in x) / N
        m[c] += 1
    I10 = sum(1 for c in clusters if n[c] > 0)
    I01 = sum(1 for c in clusters if m[c] > 0)
    I = len(clusters)
    S10 = I10 / ((I10 - 1) * N) * sum((V10[c] - n[c] * theta) ** 2 for c in clusters if n[c] > 0)
    S01 = I01 / ((I01 - 1) * M) * sum((V01[c] - m[c] * theta) ** 2 for c in clusters if m[c] > 0)
    S11 = I / (I - 1) * sum((V10[c] - n[c] * theta) * (V01[c] - m[c] * theta) for c in clusters)
    var = S10 / N + S01 / M + 2 * S11 / (M * N)
    if not parts:
        return theta, var
    a, b = S10 / N, S01 / M
    return theta, var, min((a + b) ** 2 / (a ** 2 / (I10 - 1) + b ** 2 / (I01 - 1)), I - 2)


def _clustered_data(seed, n_patients=15, ties=False):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        effect = rng.normal()
        for _ in range(rng.integers(1, 4)):
            y = int(rng.random() < 0.5)
            s = effect + y + rng.normal()
            rows.append((f"P{i:02d}", y, round(s, 1) if ties else s))
    df = pd.DataFrame(rows, columns=["patient", "y", "score"])
    df.loc[0, "y"], df.loc[1, "y"] = 1, 0
    return df


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
def test_obuchowski_matches_formulas_written_out(seed, ties):
    df = _clustered_data(seed, ties=ties)
    res = obuchowski_auc(df.y, df.score, df.patient)
    pos, neg = df[df.y == 1], df[df.y == 0]
    theta, var, dof = _plain_obuchowski(pos.score.tolist(), pos.patient.tolist(), neg.score.tolist(),
                                        neg.patient.tolist(), parts=True)
    assert 1 <= dof <= df.patient.nunique() - 2
    assert res["auc"] == pytest.approx(theta, rel=1e-12)
    assert res["se"] == pytest.approx(math.sqrt(var), rel=1e-10)
    # theta = U / (n1 n2) (reference: scipy.stats.mannwhitneyu)
    u = sps.mannwhitneyu(pos.score, neg.score).statistic
    assert res["auc"] == pytest.approx(u / (len(pos) * len(neg)), rel=1e-12)
    z = (theta - 0.5) / math.sqrt(var)
    assert res["z"] == pytest.approx(z, rel=1e-10)
    assert res["p"] == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    # logit-transformed interval, t on the Welch-Satterthwaite df, written out (reference: scipy's t quantile)
    half = sps.t.ppf(0.975, dof) * math.sqrt(var) / (theta * (1 - theta))
    logit = math.log(theta / (1 - theta))
    assert res["ci_low"] == pytest.approx(1 / (1 + math.exp(half - logit)), rel=1e-10)
    assert res["ci_high"] == pytest.approx(1 / (1 + math.exp(-half - logit)), rel=1e-10)
    assert res["clusters"] == df.patient.nunique() and res["unit"] == "patient"
    assert "Obuchowski" in res["method"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=4, max_size=40))
def test_one_unit_per_cluster_equals_delong(units):
    # The identity of Obuchowski 1997: with one unit per cluster S11 = 0 and the
    # clustered variance is DeLong's (reference: covreport.stats.auc.delong_auc, checked
    # against pROC's var(method="delong") in test_stats_auc.py).
    y = np.array([u[0] for u in units])
    s = np.array([u[1] for u in units], dtype=float)     # small integers: many ties
    if y.sum() < 2 or (1 - y).sum() < 2:
        return
    ours = obuchowski_auc(y, s, [f"id{i}" for i in range(len(y))])
    ref = delong_auc(y, s)
    assert ours["auc"] == pytest.approx(ref["auc"], rel=1e-13, abs=1e-15)
    if ref["se"] == 0:
        assert ours["se"] == pytest.approx(0.0, abs=1e-12)
    else:
        assert ours["se"] == pytest.approx(ref["se"], rel=1e-10)


def test_obuchowski_errors_and_too_few_clusters():
    with pytest.raises(StatsError, match="both classes"):
        obuchowski_auc([1, 1], [0.2, 0.3], ["a", "b"])
    with pytest.raises(StatsError, match="patient id missing"):
        obuchowski_auc([1, 0], [0.2, 0.3], ["a", None])
    res = obuchowski_auc([1, 0, 0], [0.9, 0.1, 0.2], ["a", "b", "b"])   # one cluster per group
    assert math.isnan(res["se"]) and "at least 2 patients" in res["note"]


def _changes(seed=0, n_patients=20):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        for _ in range(rng.integers(1, 4)):
            outcome = rng.choice([WORSE, STABLE, IMPROVED])
            shift = {WORSE: 0.2, STABLE: 0.0, IMPROVED: -0.2}[outcome]
            rows.append({"patient_id": f"P{i:02d}", "outcome": outcome,
                         "A": shift + rng.normal(0, 0.2), "B": rng.normal(0, 0.2),
                         "C": np.round(rng.normal(0, 0.2), 1)})
    return pd.DataFrame(rows)


def test_group_differences_clustered_against_written_out_formulas():
    df = _changes(1)
    out = group_differences_clustered(df, ["A", "B", "C"], df["patient_id"])
    assert list(zip(out.contrast, out.label)) == [(f"{a} vs {b}", lab) for a, b in CONTRASTS
                                                 for lab in ("A", "B", "C")]
    for r in out.itertuples(index=False):
        x = df[df.outcome == r.group1]
        y = df[df.outcome == r.group2]
        theta, var, dof = _plain_obuchowski(x[r.label].tolist(), x.patient_id.tolist(),
                                            y[r.label].tolist(), y.patient_id.tolist(), parts=True)
        assert r.theta == pytest.approx(theta, rel=1e-12)
        assert r.se == pytest.approx(math.sqrt(var), rel=1e-10)
        assert r.p_wald == pytest.approx(2 * sps.norm.sf(abs(theta - 0.5) / math.sqrt(var)), rel=1e-9)
        assert 0 < r.ci_low < theta < r.ci_high < 1 and r.df == pytest.approx(dof, rel=1e-10)
        half = sps.t.ppf(0.975, dof) * math.sqrt(var) / (theta * (1 - theta))
        assert r.ci_low == pytest.approx(1 / (1 + math.exp(half - math.log(theta / (1 - theta)))), rel=1e-10)
        assert 1 / 10000 <= r.p <= 1 and r.p_method.startswith("cluster permutation")
        assert (r.n1, r.n2) == (len(x), len(y))
        assert r.clusters1 == x.patient_id.nunique() and r.clusters2 == y.patient_id.nunique()
        assert r.clusters == pd.concat([x, y]).patient_id.nunique()
        assert r.unit == "patient"
    for _, block in out.groupby("contrast", sort=False):
        # reference: statsmodels multipletests within each contrast
        assert np.allclose(block.p_holm, multipletests(block.p, method="holm")[1], rtol=1e-14)
        assert np.allclose(block.p_bh, multipletests(block.p, method="fdr_bh")[1], rtol=1e-14)


def test_group_differences_clustered_empty_group_is_a_note():
    df = _changes(2)
    df = df[df.outcome != STABLE]
    out = group_differences_clustered(df, ["A"], df["patient_id"])
    row = out[out.contrast == "Worse vs Stable"].iloc[0]
    assert math.isnan(row.theta) and "has no pair" in row.note


# --------------------------------------------------------------------------- bootstrap


def test_resample_counts_draw_whole_clusters_reproducibly():
    c = resample_counts(7, 1200, seed=3)
    assert c.shape == (1200, 7) and (c.sum(axis=1) == 7).all()
    assert np.array_equal(c, resample_counts(7, 1200, seed=3))
    assert not np.array_equal(c, resample_counts(7, 1200, seed=4))
    # each cluster is drawn 7 * 1/7 = 1 time on average
    assert abs(c.mean() - 1.0) < 0.05


def _expanded(df, counts_row, patients):
    """The resample as an explicit table: each patient's rows repeated as often as it was drawn."""
    parts = [df[df.patient_id == p] for p, k in zip(patients, counts_row) for _ in range(int(k))]
    return pd.concat(parts) if parts else df.iloc[:0]


def _d(x, y):
    if len(x) < 2 or len(y) < 2:
        return math.nan
    sp = math.sqrt(((len(x) - 1) * np.var(x, ddof=1) + (len(y) - 1) * np.var(y, ddof=1)) / (len(x) + len(y) - 2))
    return (np.mean(x) - np.mean(y)) / sp if sp > 0 else math.nan


def test_cluster_bootstrap_against_explicit_resamples():
    df = _changes(3, n_patients=12)
    rng = np.random.default_rng(0)
    pred = df[df.outcome != STABLE].copy()
    pred["y"] = pred.outcome == WORSE
    pred["hit"] = rng.random(len(pred)) < 0.6
    B, seed = 150, 11
    res = cluster_bootstrap(df.patient_id, {"nested": {"patient_id": pred.patient_id, "outcome": pred.y,
                                                       "predicted": pred.hit}},
                            df, ["A", "C"], n_resamples=B, seed=seed)
    assert res["resamples"] == B and res["seed"] == seed and res["unit"] == "patient"
    patients = sorted(set(df.patient_id))
    counts = resample_counts(len(patients), B, seed)
    # reference: each resample built explicitly and its quantities computed directly
    ref = {m: [] for m in BOOTSTRAP_METRICS}
    gd = {}
    for row in counts:
        p = _expanded(pred, row, patients)
        tp = int((p.hit & p.y).sum()); fp = int((p.hit & ~p.y).sum())
        fn = int((~p.hit & p.y).sum()); tn = int((~p.hit & ~p.y).sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            se, sp = np.float64(tp) / (tp + fn), np.float64(tn) / (tn + fp)
            vals = {"accuracy": np.float64(tp + tn) / len(p), "sensitivity": se, "specificity": sp,
                    "ppv": np.float64(tp) / (tp + fp), "npv": np.float64(tn) / (tn + fn),
                    "balanced_accuracy": (se + sp) / 2, "lr_positive": se / (1 - sp),
                    "lr_negative": (1 - se) / sp}
        for k, v in vals.items():
            ref[k].append(v)
        e = _expanded(df, row, patients)
        for g1, g2 in CONTRASTS:
            for lab in ("A", "C"):
                x = e.loc[e.outcome == g1, lab].to_numpy()
                y = e.loc[e.outcome == g2, lab].to_numpy()
                gd.setdefault((f"{g1} vs {g2}", lab, "cohen_d"), []).append(_d(x, y))
                # Hedges' g = J d, J = 1 - 3/(4 N - 9) with N the resample's pairs (Hedges & Olkin 1985)
                gd.setdefault((f"{g1} vs {g2}", lab, "hedges_g"), []).append(
                    (1 - 3 / (4 * (len(x) + len(y)) - 9)) * _d(x, y))
                md = np.median(x) - np.median(y) if len(x) and len(y) else math.nan
                gd.setdefault((f"{g1} vs {g2}", lab, "median_difference"), []).append(md)
    for metric in BOOTSTRAP_METRICS:
        v = np.array(ref[metric], dtype=float)
        ok = np.isfinite(v)
        got = res["prediction"]["nested"][metric]
        assert got["not_estimable"] == int((~ok).sum())
        lo, hi = np.percentile(v[ok], [2.5, 97.5])
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), rel=1e-12, abs=1e-12)
    assert len(res["group_differences"]) == len(CONTRASTS) * 2 * 3

    def quantity(q, x, y):
        return {"cohen_d": lambda: _d(x, y), "hedges_g": lambda: (1 - 3 / (4 * (len(x) + len(y)) - 9)) * _d(x, y),
                "median_difference": lambda: np.median(x) - np.median(y)}[q]()

    for rec in res["group_differences"]:
        v = np.array(gd[(rec["contrast"], rec["label"], rec["quantity"])], dtype=float)
        ok = np.isfinite(v)
        assert rec["not_estimable"] == int((~ok).sum()), rec
        lo, hi = np.percentile(v[ok], [2.5, 97.5])
        assert (rec["percentile_low"], rec["percentile_high"]) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
        g1, g2 = rec["contrast"].split(" vs ")
        sub = df[df.outcome.isin([g1, g2])]
        x = sub.loc[sub.outcome == g1, rec["label"]].to_numpy()
        y = sub.loc[sub.outcome == g2, rec["label"]].to_numpy()
        est = quantity(rec["quantity"], x, y)
        assert rec["estimate"] == pytest.approx(est, rel=1e-12)
        # BCa written out (Efron & Tibshirani 1993, eqs 14.10, 14.14 and 14.15): the jackknife leaves out
        # each patient of the contrast in turn
        jack = []
        for pid in sorted(set(sub.patient_id)):
            rest = sub[sub.patient_id != pid]
            jack.append(quantity(rec["quantity"], rest.loc[rest.outcome == g1, rec["label"]].to_numpy(),
                                 rest.loc[rest.outcome == g2, rec["label"]].to_numpy()))
        jack = np.array([j for j in jack if np.isfinite(j)])
        w = v[ok]
        z0 = sps.norm.ppf(min(max((np.sum(w < est) + 0.5 * np.sum(w == est)) / len(w), 1 / (len(w) + 1)),
                              len(w) / (len(w) + 1)))
        dev = jack.mean() - jack
        acc = (dev ** 3).sum() / (6 * ((dev ** 2).sum()) ** 1.5)
        a1, a2 = (sps.norm.cdf(z0 + (z0 + zz) / (1 - acc * (z0 + zz))) for zz in (-1.959963984540054,
                                                                               1.959963984540054))
        blo, bhi = np.percentile(w, [100 * a1, 100 * a2])
        assert (rec["bca_low"], rec["bca_high"]) == pytest.approx((blo, bhi), rel=1e-9, abs=1e-12)
        assert rec["acceleration"] == pytest.approx(acc, rel=1e-9, abs=1e-14)
        # d and g take the BCa interval, the difference of medians the percentile one
        bca = rec["quantity"] != "median_difference"
        assert rec["interval"] == ("BCa" if bca else "percentile")
        assert (rec["ci_low"], rec["ci_high"]) == ((rec["bca_low"], rec["bca_high"]) if bca else (lo, hi))
        assert rec["unit"] == "patient" and "cluster bootstrap" in rec["method"]
        assert ("BCa" in rec["method"]) == bca


def test_bca_interval_equals_scipy_bootstrap():
    # reference: scipy.stats.bootstrap(method="BCa") on its own resamples of a skewed sample
    rng = np.random.default_rng(1)
    x = rng.exponential(size=25)
    ref = sps.bootstrap((x,), np.mean, method="BCa", n_resamples=3000, random_state=np.random.default_rng(5))
    jack = np.array([np.delete(x, i).mean() for i in range(len(x))])
    lo, hi, bad, z0, acc = bca_interval(ref.bootstrap_distribution, float(x.mean()), jack, 0.05)
    assert (lo, hi) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)
    assert bad == 0 and acc > 0            # a right-skewed mean accelerates
    # non-finite draws are counted and left out; equal jackknife values give acceleration 0
    lo2, hi2, bad2, _, acc2 = bca_interval(np.r_[ref.bootstrap_distribution, np.nan], float(x.mean()),
                                           np.ones(5), 0.05)
    assert bad2 == 1 and acc2 == 0.0 and lo2 < hi2


def test_cluster_bootstrap_counts_not_estimable_resamples():
    # one Improved patient: about (1 - 1/4)^4 = 32% of resamples draw no Improved pair
    # (and a few draw only it, so no Worse pair)
    df = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "outcome": [WORSE, WORSE, WORSE, IMPROVED],
                       "A": [0.1, 0.2, 0.3, -0.1]})
    res = cluster_bootstrap(df.patient_id, None, df, ["A"], n_resamples=400, seed=0)
    md = [r for r in res["group_differences"]
          if r["quantity"] == "median_difference" and r["contrast"] == "Worse vs Improved"][0]
    counts = resample_counts(4, 400, 0)
    assert md["not_estimable"] == int(((counts[:, 3] == 0) | (counts[:, 3] == 4)).sum()) > 0
    with pytest.raises(StatsError, match="at least 1 resample"):
        cluster_bootstrap(df.patient_id, None, df, ["A"], n_resamples=0)


def test_bootstrap_does_not_depend_on_row_order():
    df = _changes(4)
    shuffled = df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    a = cluster_bootstrap(df.patient_id, None, df, ["A"], n_resamples=100, seed=2)
    b = cluster_bootstrap(shuffled.patient_id, None, shuffled, ["A"], n_resamples=100, seed=2)
    for ra, rb in zip(a["group_differences"], b["group_differences"]):
        assert ra["not_estimable"] == rb["not_estimable"]
        for k in ("estimate", "ci_low", "ci_high"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-12, abs=1e-15) or (ra[k] != ra[k] and rb[k] != rb[k])


# --------------------------------------------------------------------------- Table 1, primary


def test_table_one_patients_counts_each_patient_once_per_group():
    pairs = pd.DataFrame({
        "patient_id": ["a", "a", "b", "c", "c", "d"],
        "outcome": [WORSE, IMPROVED, WORSE, STABLE, STABLE, IMPROVED],
        "age": [50, 51, 60, 70, 71, 40], "sex": ["M", "M", "F", "M", "M", "F"],
    })
    t = table_one_patients(pairs).set_index("group")
    assert t.loc["All patients", "patients"] == 4 and t.loc["All patients", "pairs"] == 6
    # age of the first pair: a 50, b 60, c 70, d 40
    assert t.loc["All patients", "age_mean"] == pytest.approx(np.mean([50, 60, 70, 40]))
    assert t.loc["Worse", "patients"] == 2 and t.loc["Worse", "pairs"] == 2
    assert t.loc["Stable", "patients"] == 1 and t.loc["Stable", "pairs"] == 2
    assert t.loc["Improved", "patients"] == 2
    assert (t["counted_by"] == "patient").all() and (t["unit"] == "patient").all()
    assert "1 patient has pairs in more than one outcome group" in t.loc["Worse", "note"]
    # Worse (a 50, b 60) vs patients without a Worse pair (c 70, d 40): reference scipy ttest_ind
    assert t.loc["Worse", "p_age"] == pytest.approx(sps.ttest_ind([50, 60], [70, 40]).pvalue, rel=1e-12)


def test_primary_analysis():
    assert primary_analysis(["a", "b", "c"])["unit"] == "pair"
    res = primary_analysis(["a", "a", "b"])
    assert res["unit"] == "patient" and "1 of 2 patients" in res["reason"]


# --------------------------------------------------------------------------- issue 20: small samples, edge cases


def _brute_cluster_p(values, in1, patients):
    """Exact cluster permutation p by enumeration (reference for the Monte Carlo p).

    Every assignment of the patients' label multisets to patients of the same size,
    each in every order within the patient, equally likely.
    """
    from itertools import permutations, product

    values = np.asarray(values, float)
    in1 = np.asarray(in1, bool)
    patients = np.asarray(patients)
    ranks = sps.rankdata(values)
    n1, n2 = in1.sum(), (~in1).sum()

    def stat(lab):
        return abs(ranks[lab].sum() - n1 * (n1 + 1) / 2 - n1 * n2 / 2)

    ids = sorted(set(patients))
    units = {p: np.flatnonzero(patients == p) for p in ids}
    by_size = {}
    for p in ids:
        by_size.setdefault(len(units[p]), []).append(p)
    options = []   # per size: every (assignment of label vectors, within orders)
    for k, members in by_size.items():
        per = []
        for perm in permutations(members):
            vecs = [in1[units[q]] for q in perm]
            for orders in product(*[list(permutations(range(k)))] * len(members)):
                lab = {}
                for p, v, o in zip(members, vecs, orders):
                    lab[p] = v[list(o)]
                per.append(lab)
        options.append(per)
    obs = stat(in1)
    hits = total = 0
    for combo in product(*options):
        lab = np.zeros(len(values), bool)
        for part in combo:
            for p, v in part.items():
                lab[units[p]] = v
        total += 1
        hits += stat(lab) >= obs - 1e-9
    return hits / total


def test_cluster_permutations_keep_the_design_and_match_enumeration():
    from covreport.stats.clustered import cluster_permutations, clustered_mw_permutation_p

    patients = np.array(["a", "a", "b", "b", "c", "d", "e", "e"])
    codes = pd.factorize(patients, sort=True)[0]
    in1 = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)
    values = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.3, 0.05])
    perms = cluster_permutations(codes, in1, 500, np.random.default_rng(0))
    for row in perms:
        assert row.sum() == in1.sum()
        # the multiset of patient compositions (pairs in group 1 per patient, by size) is kept
        comp = sorted((int((codes == c).sum()), int(row[codes == c].sum())) for c in range(5))
        assert comp == sorted((int((codes == c).sum()), int(in1[codes == c].sum())) for c in range(5))
    exact = _brute_cluster_p(values, in1, patients)
    mc = clustered_mw_permutation_p(values, in1, codes, 20000, np.random.default_rng(1))
    # Monte Carlo p of 20,000 draws within 4 binomial SEs of the enumerated p
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4


def _edge_changes():
    rng = np.random.default_rng(5)
    rows = []
    for i in range(12):
        for j in range(1 + i % 2):
            outcome = WORSE if i < 6 else IMPROVED
            rows.append({"patient_id": f"P{i:02d}", "outcome": outcome,
                         "const": 0.25,                                              # same change everywhere
                         "sep": (0.5 if outcome == WORSE else -0.5) + rng.normal(0, 0.05),   # separated
                         "A": rng.normal(0, 0.2), "B": rng.normal(0.1 * (outcome == WORSE), 0.2)})
    return pd.DataFrame(rows)


def test_constant_label_is_not_tested_and_separation_stays_in_the_family():
    from covreport.stats.groups import compare_groups

    df = _edge_changes()
    labels = ["const", "sep", "A", "B"]
    contrasts = [(WORSE, IMPROVED)]
    pair = compare_groups(df, labels, contrasts=contrasts).set_index("label")
    clus = group_differences_clustered(df, labels, df["patient_id"], contrasts=contrasts,
                                       n_permutations=4999, seed=3).set_index("label")
    for out in (pair, clus):
        c = out.loc["const"]
        assert c.status == "not tested: constant" and math.isnan(c.p) and math.isnan(c.p_holm)
        assert "not tested: constant" in c.note
        s = out.loc["sep"]
        assert s.status == "tested" and 0 < s.p < 0.01 and np.isfinite(s.p_holm)
        # the family is the three tested labels (reference: statsmodels multipletests)
        tested = out.loc[["sep", "A", "B"]]
        assert np.allclose(tested.p_holm, multipletests(tested.p, method="holm")[1], rtol=1e-14)
        assert np.allclose(tested.p_bh, multipletests(tested.p, method="fdr_bh")[1], rtol=1e-14)
    # pair level, separation: the exact Mann-Whitney p (reference: scipy exact)
    x, y = df.loc[df.outcome == WORSE, "sep"], df.loc[df.outcome == IMPROVED, "sep"]
    assert pair.loc["sep", "p"] == pytest.approx(sps.mannwhitneyu(x, y, method="exact").pvalue, rel=1e-12)
    # clustered, separation: SE 0, no Wald p, but the permutation p (>= 1/(B+1)) and the exact interval
    # of the 6 comparisons of 12 distinct patients (6 Worse, 6 Improved); reference: scipy's Clopper-Pearson
    s = clus.loc["sep"]
    exact = sps.binomtest(6, 6).proportion_ci(0.95, method="exact")
    assert s.theta == 1.0 and s.se == 0 and math.isnan(s.p_wald)
    assert (s.ci_low, s.ci_high) == pytest.approx((exact.low, exact.high), abs=1e-13)   # binomtest's root finder: 3e-14
    assert "Clopper-Pearson interval of 6 of 6 comparisons that share no patient" in s.note
    assert s.p >= 1 / 5000 and "stays in the family" in s.note
    assert clus.loc["sep", "analysis"].startswith("primary")


def test_clustered_permutation_p_is_reproducible_and_seeded():
    df = _changes(4)
    a = group_differences_clustered(df, ["A", "B"], df["patient_id"], n_permutations=999, seed=7)
    b = group_differences_clustered(df, ["A", "B"], df["patient_id"], n_permutations=999, seed=7)
    c = group_differences_clustered(df, ["A", "B"], df["patient_id"], n_permutations=999, seed=8)
    assert a.p.tolist() == b.p.tolist() and a.p.tolist() != c.p.tolist()
    assert (a.permutations == 999).all() and a.method.str.contains("999").all()
    with pytest.raises(StatsError, match="at least 1 permutation"):
        group_differences_clustered(df, ["A"], df["patient_id"], n_permutations=0)


def test_interval_is_not_clipped_near_zero():
    # the case: theta near 0.16 with 15 patients; the old Wald interval was clipped at 0
    rng = np.random.default_rng(11)
    rows = [{"patient_id": f"P{i:02d}", "outcome": STABLE if i < 8 else IMPROVED,
             "A": rng.normal(-0.6 if i < 8 else 0.0, 0.4)} for i in range(15)]
    rows.append({"patient_id": "P00", "outcome": STABLE, "A": -0.5})
    df = pd.DataFrame(rows)
    r = group_differences_clustered(df, ["A"], df["patient_id"], contrasts=[(STABLE, IMPROVED)]).iloc[0]
    assert r.theta < 0.3 and 0 < r.ci_low < r.theta < r.ci_high < 1
    assert r.theta - 1.959963984540054 * r.se < 0 < r.ci_low     # where a clipped Wald interval would sit at 0


def test_disjoint_comparisons_is_the_largest_patient_disjoint_matching():
    # Brute force: the most comparisons (a in group 1, b in group 2, a != b) that use each patient once.
    from itertools import product

    from covreport.stats.effect_sizes import disjoint_comparisons

    for mask in product((0, 1, 2, 3), repeat=5):   # each of 5 patients: in neither, group 1, group 2, both
        g1 = frozenset(i for i, m in enumerate(mask) if m in (1, 3))
        g2 = frozenset(i for i, m in enumerate(mask) if m in (2, 3))
        assert disjoint_comparisons(len(g1), len(g2), len(g1 | g2)) == _matching(g1, g2), mask


def _matching(g1, g2):
    """Maximum matching of group-1 to group-2 patients, no patient twice (exhaustive search)."""
    best = 0

    def go(left, used, count):
        nonlocal best
        best = max(best, count)
        for i, a in enumerate(left):
            if a in used:
                continue
            for b in g2:
                if b != a and b not in used:
                    go(left[i + 1:], used | {a, b}, count + 1)
    go(sorted(g1), frozenset(), 0)
    return best


# --- two correlated clustered AUCs (issue 22.3) -----------------------------------------------------


def _obuchowski_two_explicit(y, a, b, clusters):
    """Obuchowski 1997 (section 2, two tests on the same units) written out with O(N M) kernels:
    per test k the cluster sums V10^k(X_i.), V01^k(Y_i.); covariance of tests k and l
    S10 = I10/((I10-1)N) sum_i (V10^k_i - n_i t_k)(V10^l_i - n_i t_l), S01 likewise over M,
    S11 = I/(I-1) sum_i (V10^k_i - n_i t_k)(V01^l_i - m_i t_l), cov = S10/N + S01/M + (S11^kl + S11^lk)/(NM)."""
    y = np.asarray(y, bool)
    ids = sorted(set(clusters))
    cl = np.array([ids.index(c) for c in clusters])
    out = []
    for s in (np.asarray(a, float), np.asarray(b, float)):
        x, w = s[y], s[~y]
        psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        t = psi.mean()
        A = np.array([v10[cl[y] == i].sum() - t * (cl[y] == i).sum() for i in range(len(ids))])
        B = np.array([v01[cl[~y] == i].sum() - t * (cl[~y] == i).sum() for i in range(len(ids))])
        out.append((t, A, B))
    N, M, n_i = y.sum(), (~y).sum(), len(ids)
    i10, i01 = len(set(cl[y])), len(set(cl[~y]))

    def cov(k, l):
        s10 = i10 / ((i10 - 1) * N) * out[k][1] @ out[l][1]
        s01 = i01 / ((i01 - 1) * M) * out[k][2] @ out[l][2]
        s11 = n_i / (n_i - 1) * (out[k][1] @ out[l][2] + out[l][1] @ out[k][2])
        return s10 / N + s01 / M + s11 / (N * M)

    return out[0][0] - out[1][0], math.sqrt(cov(0, 0) + cov(1, 1) - 2 * cov(0, 1))


def test_obuchowski_compare_matches_the_formulas_written_out():
    rng = np.random.default_rng(8)
    clusters = [f"P{i}" for i in range(25) for _ in range(1 + i % 3)]
    n = len(clusters)
    patient = {c: rng.normal() for c in set(clusters)}
    y = np.array([int(patient[c] + rng.normal() > 0) for c in clusters])
    a = np.round(y + rng.normal(0, 1, n), 2)
    b = np.round(0.5 * a + rng.normal(0, 1, n), 1)  # correlated with a, with ties
    res = obuchowski_compare(y, a, b, clusters)
    diff, se = _obuchowski_two_explicit(y, a, b, clusters)
    assert res["difference"] == pytest.approx(diff, abs=1e-14)
    assert res["se"] == pytest.approx(se, rel=1e-12)
    assert res["z"] == pytest.approx(diff / se, rel=1e-12)
    assert res["p"] == pytest.approx(2 * sps.norm.sf(abs(diff / se)), rel=1e-12)
    assert res["ci_low"] == pytest.approx(diff - sps.norm.ppf(0.975) * se, rel=1e-12)
    assert res["clusters"] == 25 and res["unit"] == "patient"


def test_obuchowski_compare_is_paired_delong_with_one_pair_per_patient():
    # Reference: with one unit per cluster Obuchowski's covariance is DeLong's (Obuchowski 1997, section 2),
    # and covreport's delong_test is tied to pROC's roc.test (test_stats_auc.py).
    rng = np.random.default_rng(9)
    y = np.array([1] * 20 + [0] * 25)
    a = y + rng.normal(0, 1, 45)
    b = 0.7 * a + rng.normal(0, 0.8, 45)
    res = obuchowski_compare(y, a, b, [f"P{i}" for i in range(45)])
    ref = delong_test(y, a, b)
    for key in ("difference", "se", "z", "p"):
        assert res[key] == pytest.approx(ref[key], rel=1e-12)


def test_obuchowski_compare_refuses_or_explains():
    with pytest.raises(StatsError, match="both classes"):
        obuchowski_compare([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], ["a", "b", "c"])
    res = obuchowski_compare([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], [0.9, 0.1, 0.8, 0.2], ["a", "a", "b", "b"])
    assert res["difference"] == 0 and math.isnan(res["p"]) and "zero" in res["note"]
