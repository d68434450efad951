"""Tests of covreport.stats.effect_sizes (Hodges-Lehmann, rank-biserial r, Hedges' g).

Independent references, named at each check: R 4.2.2's ``wilcox.test(x, y,
conf.int = TRUE)`` and a noncentral-t interval of d computed in R with
``uniroot`` on ``pt(t, df, ncp)`` (tests/fixtures/r_effect_sizes.R wrote
tests/fixtures/r_effect_sizes.json; R is not needed to run these tests);
``pingouin.compute_effsize(eftype='hedges')``; the Mann-Whitney null
distribution counted by brute force over every split; DeLong's variance
from covreport.stats.auc.delong_auc (checked against pROC elsewhere).
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pingouin as pg
import pytest
from scipy import stats as sps

from covreport.stats.auc import delong_auc
from covreport.stats.effect_sizes import (
    hedges_g, hodges_lehmann, logit_interval, mw_null_counts, rank_biserial,
)

REF = json.loads((Path(__file__).parent / "fixtures" / "r_effect_sizes.json").read_text(encoding="utf-8"))
CASES = REF["wilcox_test_conf_int"]


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_hodges_lehmann_matches_r_wilcox_test(case):
    res = hodges_lehmann(case["x"], case["y"])
    # the estimate is the median of the differences (R's exact branch reports the same; its
    # asymptotic branch reports a uniroot root near it, so the fixture holds both)
    assert res["estimate"] == pytest.approx(case["median_of_differences"], abs=1e-12)
    exact = case["method"].endswith("exact test")
    assert res["ci_method"] == ("exact" if exact else "normal approximation with continuity correction")
    # R solves the asymptotic bounds with uniroot(tol = 1e-4); the exact ones are order statistics
    tol = 1e-12 if exact else 2e-4
    assert res["ci_low"] == pytest.approx(case["ci_low"], abs=tol)
    assert res["ci_high"] == pytest.approx(case["ci_high"], abs=tol)
    if res["note"]:   # R then reports 1 - signif(achieved alpha, 2) as the level
        assert float(f"{1 - res['conf_level']:.2g}") == pytest.approx(1 - case["conf_level"], abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_hedges_g_matches_pingouin_and_r_noncentral_t(case):
    res = hedges_g(case["x"], case["y"])
    # reference: pingouin (J = 1 - 3/(4N - 9)) and R
    assert res["g"] == pytest.approx(pg.compute_effsize(case["x"], case["y"], eftype="hedges"), rel=1e-12)
    assert res["g"] == pytest.approx(case["hedges_g"], rel=1e-12)
    # reference: R's uniroot on pt(t, df, ncp) (tol 1e-13)
    assert res["ci_low"] == pytest.approx(case["g_ci_low"], abs=1e-8)
    assert res["ci_high"] == pytest.approx(case["g_ci_high"], abs=1e-8)
    assert res["ci_low"] < res["g"] < res["ci_high"]


def test_hedges_g_undefined_cases():
    assert math.isnan(hedges_g([1.0], [2.0, 3.0])["g"])
    r = hedges_g([1.0, 1.0], [2.0, 2.0])
    assert math.isnan(r["g"]) and "pooled SD is 0" in r["note"]


@pytest.mark.parametrize("m,n", [(1, 1), (2, 3), (3, 3), (4, 2), (5, 4)])
def test_mw_null_counts_by_brute_force(m, n):
    # reference: U counted over every choice of m positions out of m + n
    counts = np.zeros(m * n + 1, dtype=int)
    for chosen in itertools.combinations(range(m + n), m):
        # U of the chosen (group 1): pairs (i in group 1, j in group 2) with value_i > value_j, values = positions
        others = [j for j in range(m + n) if j not in chosen]
        counts[sum(i > j for i in chosen for j in others)] += 1
    assert list(mw_null_counts(m, n)) == counts.tolist()
    assert sum(mw_null_counts(m, n)) == math.comb(m + n, m)


def test_rank_biserial_interval_is_the_logit_interval_of_delong():
    rng = np.random.default_rng(3)
    x, y = rng.normal(0.5, 1, 12), rng.normal(0, 1, 9)
    res = rank_biserial(x, y)
    ref = delong_auc(np.r_[np.ones(12), np.zeros(9)], np.r_[x, y])   # reference: DeLong
    theta = ref["auc"]
    assert res["r"] == pytest.approx(2 * theta - 1, rel=1e-12)
    u = sps.mannwhitneyu(x, y).statistic   # reference: scipy, r = 2U/(n1 n2) - 1
    assert res["r"] == pytest.approx(2 * u / (12 * 9) - 1, rel=1e-12)
    half = sps.t.ppf(0.975, 19) * ref["se"] / (theta * (1 - theta))
    lo = 1 / (1 + math.exp(-(math.log(theta / (1 - theta)) - half)))
    hi = 1 / (1 + math.exp(-(math.log(theta / (1 - theta)) + half)))
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((2 * lo - 1, 2 * hi - 1), rel=1e-10)


def test_rank_biserial_separation_has_the_exact_interval_and_logit_is_never_clipped():
    res = rank_biserial([5.0, 6.0, 7.0], [1.0, 2.0])
    # 2 x (Clopper-Pearson of 2 of 2 comparisons sharing no pair) - 1; reference: scipy binomtest
    exact = sps.binomtest(2, 2).proportion_ci(0.95, method="exact")   # to 3e-14: brentq
    assert res["r"] == 1.0 and "separation" in res["note"]
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((2 * exact.low - 1, 1.0), abs=1e-13)
    lo, hi = logit_interval(0.97, 0.05, 10)
    assert 0 < lo < 0.97 < hi < 1
