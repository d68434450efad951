"""Tests of covreport.stats.groups (group comparisons of the label changes).

Independent references, named at each check: scipy.stats.mannwhitneyu (U, p,
with the method the library reports passed explicitly); pingouin's mwu (RBC)
and compute_effsize (Cohen's d); Cohen's d and its Hedges & Olkin (1985)
normal-approximation CI recomputed here with numpy, written differently from
the library; statsmodels' multipletests for Holm and Benjamini-Hochberg; the
worked example of Shier (2004) quoted in scipy's documentation.
"""

import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from covreport.constants import CONTRASTS, IMPROVED, STABLE, WORSE
from covreport.errors import StatsError
from covreport.stats.groups import GROUP_COLUMNS, cohens_d, compare_groups, mannwhitney_method

LABELS = ["Lung Opacity", "Edema", "Consolidation", "Pneumonia"]
Z95 = 1.959963984540054


def _changes(seed=0, sizes=(30, 9, 12), ties=False):
    rng = np.random.default_rng(seed)
    outcome = [WORSE] * sizes[0] + [STABLE] * sizes[1] + [IMPROVED] * sizes[2]
    shift = {WORSE: 0.15, STABLE: 0.0, IMPROVED: -0.1}
    df = pd.DataFrame({"outcome": outcome})
    for j, label in enumerate(LABELS):
        v = rng.normal(size=len(df)) * 0.2 + np.array([shift[o] for o in outcome]) * (j % 2 == 0)
        df[label] = np.round(v, 1) if ties else v
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _numpy_d(x, y):
    """Cohen's d from first principles: sum of squares pooled over both groups."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ss = np.sum((x - x.mean()) ** 2) + np.sum((y - y.mean()) ** 2)
    return (x.mean() - y.mean()) / math.sqrt(ss / (len(x) + len(y) - 2))


def _pg_col(df, *names):
    for name in names:
        if name in df.columns:
            return df[name].iloc[0]
    raise KeyError(f"none of {names} in pingouin's columns {list(df.columns)}")


def test_columns_and_rows():
    out = compare_groups(_changes(), LABELS)
    assert list(out.columns) == list(GROUP_COLUMNS)
    assert len(out) == len(CONTRASTS) * len(LABELS)
    expected = [(f"{a} vs {b}", label) for a, b in CONTRASTS for label in LABELS]
    assert list(zip(out["contrast"], out["label"])) == expected
    assert list(out["contrast"].unique()) == ["Worse vs Improved", "Worse vs Stable", "Stable vs Improved"]
    assert out["method"].str.contains("Mann-Whitney").all()
    assert out["d_method"].str.contains("Hedges & Olkin").all()


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_against_scipy_pingouin_and_numpy(seed, ties):
    df = _changes(seed, ties=ties)
    out = compare_groups(df, LABELS)
    for row in out.itertuples(index=False):
        x = df.loc[df.outcome == row.group1, row.label].to_numpy()
        y = df.loc[df.outcome == row.group2, row.label].to_numpy()
        assert (row.n1, row.n2) == (len(x), len(y))
        assert row.median1 == pytest.approx(np.median(x), abs=1e-15)
        assert row.mean2 == pytest.approx(np.mean(y), abs=1e-15)
        # reference: R's wilcox.test rule (exact when both n < 50 and no ties, else the
        # normal approximation with continuity correction), run through scipy explicitly
        tied = len(np.unique(np.r_[x, y])) < len(x) + len(y)
        rule = "exact" if (len(x) < 50 and len(y) < 50 and not tied) else "asymptotic"
        assert row.mw_method == ("exact" if rule == "exact" else
                                 "normal approximation with continuity correction")
        assert "wilcox.test" in row.mw_rule and row.unit == "pair"
        ref = sps.mannwhitneyu(x, y, alternative="two-sided", method=rule, use_continuity=True)
        assert row.U == pytest.approx(ref.statistic, abs=1e-12)
        assert row.p == pytest.approx(ref.pvalue, rel=1e-12, abs=0)
        # reference: pingouin.mwu (RBC, same sign convention) -- column names pinned
        pmw = pg.mwu(x, y, alternative="two-sided")
        assert row.rank_biserial == pytest.approx(_pg_col(pmw, "RBC"), abs=1e-12)
        assert row.U == pytest.approx(_pg_col(pmw, "U_val", "U-val"), abs=1e-12)
        if rule == "asymptotic" and min(len(x), len(y)) > 8:   # pingouin follows scipy's auto rule
            assert row.p == pytest.approx(_pg_col(pmw, "p_val", "p-val"), rel=1e-9)
        # reference: numpy Cohen's d from sums of squares, and pingouin.compute_effsize
        d = _numpy_d(x, y)
        assert row.cohen_d == pytest.approx(d, rel=1e-12)
        assert row.cohen_d == pytest.approx(pg.compute_effsize(x, y, paired=False, eftype="cohen"), rel=1e-9)
        # Hedges & Olkin (1985) large-sample variance: (n1+n2)/(n1 n2) + d^2 / (2 (n1+n2))
        n1, n2 = len(x), len(y)
        se = math.sqrt(1 / n1 + 1 / n2 + d * d / (2 * (n1 + n2)))
        assert row.d_ci_low == pytest.approx(d - Z95 * se, rel=1e-12)
        assert row.d_ci_high == pytest.approx(d + Z95 * se, rel=1e-12)
        assert row.d_ci_low < row.cohen_d < row.d_ci_high


def test_adjustment_matches_statsmodels():
    df = _changes(3)
    out = compare_groups(df, LABELS)
    for contrast, block in out.groupby("contrast", sort=False):
        # reference: statsmodels multipletests within each contrast
        assert np.allclose(block["p_holm"], multipletests(block["p"], method="holm")[1], rtol=1e-14, atol=0)
        assert np.allclose(block["p_bh"], multipletests(block["p"], method="fdr_bh")[1], rtol=1e-14, atol=0)
        assert (block["p_holm"] >= block["p"] - 1e-15).all()


def test_shier_worked_example_exact():
    # Shier (2004), quoted in scipy's mannwhitneyu docs: U_males = 17, exact p = 0.1111
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    df = pd.DataFrame({"outcome": [WORSE] * 5 + [IMPROVED] * 4, "age": males + females})
    row = compare_groups(df, ["age"], contrasts=[(WORSE, IMPROVED)]).iloc[0]
    assert row.U == 17.0
    assert row.mw_method == "exact"
    assert row.p == pytest.approx(0.1111111111111111, rel=1e-12)
    assert row.rank_biserial == pytest.approx(2 * 17 / 20 - 1)
    # reversed contrast: U is the first-named group's, d changes sign
    rev = compare_groups(df, ["age"], contrasts=[(IMPROVED, WORSE)]).iloc[0]
    assert rev.U == 3.0
    assert rev.cohen_d == pytest.approx(-row.cohen_d)
    assert rev.p == pytest.approx(row.p)


def test_mannwhitney_method_follows_r_wilcox_test_rule():
    exact, normal = "exact", "normal approximation with continuity correction"
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=8), rng.normal(size=30)
    assert mannwhitney_method(a, b) == exact
    assert mannwhitney_method(rng.normal(size=49), rng.normal(size=49)) == exact
    assert mannwhitney_method(rng.normal(size=50), rng.normal(size=3)) == normal   # n >= 50
    assert mannwhitney_method(np.r_[a[:7], a[0]], b) == normal                    # a tie
    assert mannwhitney_method([1.0, 2.0], [2.0, 3.0]) == normal                   # tie across groups


def test_exact_p_for_9_vs_9_is_r_wilcox_test():
    # R 4.x: wilcox.test(1:9, 10:18)$p.value = 4.113534e-05 = 2 / choose(18, 9) (exact);
    # scipy's auto rule took the normal approximation here (p = 4.1e-4)
    df = pd.DataFrame({"outcome": [WORSE] * 9 + [IMPROVED] * 9, "v": np.arange(1.0, 19.0)})
    row = compare_groups(df, ["v"], contrasts=[(WORSE, IMPROVED)]).iloc[0]
    assert row.mw_method == "exact"
    assert row.U == 0.0
    assert row.p == pytest.approx(2 / math.comb(18, 9), rel=1e-12)
    assert row.p == pytest.approx(4.113534e-05, rel=1e-6)
    # with a tie R takes the normal approximation with continuity correction:
    # wilcox.test(c(1:8, 8), 10:18, exact=FALSE, correct=TRUE); reference: scipy asymptotic
    df.loc[8, "v"] = 8.0
    row = compare_groups(df, ["v"], contrasts=[(WORSE, IMPROVED)]).iloc[0]
    assert row.mw_method == "normal approximation with continuity correction"
    x, y = df.v[:9].to_numpy(), df.v[9:].to_numpy()
    ref = sps.mannwhitneyu(x, y, method="asymptotic", use_continuity=True)
    assert row.p == pytest.approx(ref.pvalue, rel=1e-12)
    # hand-computed: sigma with tie correction, |U - n1 n2 / 2| - 1/2
    n = 18
    sigma = math.sqrt(81 / 12 * ((n + 1) - (2 ** 3 - 2) / (n * (n - 1))))
    assert row.p == pytest.approx(2 * sps.norm.sf((40.5 - 0.5) / sigma), rel=1e-12)


def test_small_group_gives_nan_with_reason():
    df = _changes(4, sizes=(10, 1, 6))
    out = compare_groups(df, LABELS)
    small = out[out.contrast.str.contains("Stable")]
    assert small[["U", "p", "rank_biserial", "cohen_d", "d_ci_low", "d_ci_high", "p_holm", "p_bh"]].isna().all().all()
    assert small["note"].str.contains("Stable has n = 1").all()
    assert small["mw_method"].isna().all()
    ok = out[out.contrast == "Worse vs Improved"]
    assert ok["p"].notna().all() and ok["note"].isna().all()
    # an empty group: no crash, medians missing
    df2 = df[df.outcome != STABLE]
    out2 = compare_groups(df2, LABELS)
    empty = out2[out2.contrast == "Worse vs Stable"]
    assert (empty["n2"] == 0).all() and empty["median2"].isna().all()
    assert empty["note"].str.contains("Stable has n = 0").all()


def test_zero_pooled_sd_and_missing_values():
    df = pd.DataFrame({"outcome": [WORSE] * 3 + [IMPROVED] * 3, "x": [0.1] * 6,
                       "y": [0.1, np.nan, 0.3, 0.0, 0.2, -0.1]})
    out = compare_groups(df, ["x", "y"], contrasts=[(WORSE, IMPROVED)])
    x = out.iloc[0]
    # a constant label is not tested (R's wilcox.test gives NaN; scipy used to give p = 1 here)
    assert math.isnan(x.cohen_d) and math.isnan(x.p) and math.isnan(x.p_holm)
    assert x.status == "not tested: constant" and "not tested: constant" in x.note
    y = out.iloc[1]
    assert (y.n1, y.n2) == (2, 3)
    assert "1 missing change(s) left out" in y.note


def test_missing_column_is_an_error():
    with pytest.raises(StatsError, match=r"lacks column\(s\) \['Nope'\]"):
        compare_groups(_changes(), ["Nope"])
    with pytest.raises(StatsError, match="'group'"):
        compare_groups(_changes(), LABELS, outcome_column="group")


def test_cohens_d_helper_alpha():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 3.5, 5.0]
    d, lo, hi, note = cohens_d(x, y, alpha=0.10)
    se = math.sqrt(7 / 12 + d * d / 14)
    z90 = sps.norm.ppf(0.95)   # reference: scipy normal quantile
    assert (lo, hi) == pytest.approx((d - z90 * se, d + z90 * se), rel=1e-12)
    assert note is None


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_row_order_does_not_matter(seed):
    df = _changes(seed % 50, sizes=(7, 5, 9), ties=seed % 2 == 0)
    a = compare_groups(df, LABELS)
    b = compare_groups(df.sample(frac=1.0, random_state=seed).reset_index(drop=True), LABELS)
    num = [c for c in GROUP_COLUMNS if c not in ("contrast", "label", "group1", "group2",
                                                  "mw_method", "mw_rule", "unit", "d_method", "method", "note",
                                                  "status", "analysis", "hl_ci_method", "hl_method", "rb_method",
                                                  "g_method")]
    assert np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-12, atol=1e-14, equal_nan=True)


def test_effect_sizes_beside_each_test_match_r_and_pingouin():
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "fixtures" / "r_effect_sizes.json").read_text(encoding="utf-8"))
    case = ref["wilcox_test_conf_int"][0]   # R's ?wilcox.test example (Hollander & Wolfe 1973, p. 69f.)
    df = pd.DataFrame({"outcome": [WORSE] * len(case["x"]) + [IMPROVED] * len(case["y"]),
                       "A": case["x"] + case["y"]})
    row = compare_groups(df, ["A"], contrasts=[(WORSE, IMPROVED)]).iloc[0]
    # reference: R wilcox.test(x, y, conf.int = TRUE)
    assert row.hl_shift == pytest.approx(case["estimate"], abs=1e-12)
    assert (row.hl_ci_low, row.hl_ci_high) == pytest.approx((case["ci_low"], case["ci_high"]), abs=1e-12)
    assert row.hl_ci_method == "exact" and "Bauer 1972" in row.hl_method
    # reference: pingouin's Hedges' g; R's noncentral-t interval (uniroot on pt)
    assert row.hedges_g == pytest.approx(pg.compute_effsize(case["x"], case["y"], eftype="hedges"), rel=1e-12)
    assert (row.g_ci_low, row.g_ci_high) == pytest.approx((case["g_ci_low"], case["g_ci_high"]), abs=1e-8)
    # the old keys still hold Cohen's d and the rank-biserial r; its CI brackets it
    assert row.cohen_d == pytest.approx(_numpy_d(case["x"], case["y"]), rel=1e-12)
    assert row.rb_ci_low < row.rank_biserial < row.rb_ci_high
    assert row.status == "tested" and row.analysis.startswith("secondary")
