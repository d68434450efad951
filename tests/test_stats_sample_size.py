"""covreport/stats/sample_size.py: each formula against a reference package's value or an independent computation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import integrate
from scipy import stats as sps

from covreport.errors import StatsError
from covreport.stats import sample_size as ss

EPIR = json.loads((Path(__file__).parent / "fixtures" / "r_epir_ssdxsesp.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", EPIR["cases"], ids=lambda c: c["call"][13:60])
def test_diagnostic_n_matches_epir(case):
    # Reference: R epiR 2.0.57 epi.ssdxsesp (Buderer 1996), tests/fixtures/r_epir_ssdxsesp.R; each case names its call.
    share = case["Py"] if case["type"] == "se" else 1 - case["Py"]
    assert ss.diagnostic_n(case["test"], share, case["epsilon"]) == pytest.approx(case["n"], rel=1e-13)


def test_diagnostic_n_gives_the_half_width():
    # Independent: at the returned size the Wald half-width on the cases is the target.
    n = ss.diagnostic_n(0.8, 0.3, 0.04)
    cases = 0.3 * n
    assert sps.norm.ppf(0.975) * math.sqrt(0.8 * 0.2 / cases) == pytest.approx(0.04, rel=1e-12)


# pmsampsize 1.1.3, tests/testthat/test_bin.R ("Test 4.1" to "4.4"; the first is Riley et al. BMJ 2020's
# example): (rsquared, parameters, prevalence) -> sample size of criteria 1, 2, 3 and the final, and the
# events per parameter (rounded to 2 decimals there).
PMSAMPSIZE = [
    ((0.288, 24, 0.174), (623, 668, 221, 668), (4.52, 4.84, 1.6, 4.84)),
    ((0.55, 24, 0.174), (255, 532, 221, 532), (1.85, 3.86, 1.6, 3.86)),
    ((0.288, 36, 0.174), (934, 1002, 221, 1002), (4.51, 4.84, 1.07, 4.84)),
    ((0.288, 24, 0.25), (623, 583, 289, 623), (6.49, 6.07, 3.01, 6.49)),
]


@pytest.mark.parametrize("args, sizes, epp", PMSAMPSIZE)
def test_riley_binary_matches_pmsampsize(args, sizes, epp):
    res = ss.riley_binary(*args)
    assert [c["n"] for c in res["criteria"]] + [res["n"]] == list(sizes)
    got = [c["events_per_parameter"] for c in res["criteria"]] + [res["events_per_parameter"]]
    assert [round(x, 2) for x in got] == list(epp)


def test_riley_binary_refuses_impossible_r2():
    with pytest.raises(StatsError, match="above the largest possible"):
        ss.riley_binary(0.7, 10, 0.174)
    with pytest.raises(StatsError, match="below the R-squared"):
        ss.riley_binary(0.5, 10, 0.5, shrinkage=0.4)
    with pytest.raises(StatsError, match="whole number"):
        ss.riley_binary(0.2, 2.5, 0.3)


def test_noether_matches_wmwssp():
    # Reference: R WMWssp 0.4, tests/testthat (WMWssp_noether(alpha = 0.05, power = 0.8, t = 1/2, p = 0.349)
    # gives N = 114.74467, tolerance 1e-4 there).
    assert ss.noether_n(0.349, 0.5, alpha=0.05, power=0.8) == pytest.approx(114.74467, abs=1e-4)


def test_noether_power_inverts_noether_n():
    n = ss.noether_n(0.7, 0.3, alpha=0.01, power=0.9)
    assert ss.noether_power(0.7, 0.3, n, alpha=0.01) == pytest.approx(0.9, abs=1e-12)
    assert ss.noether_power(0.3, 0.3, n, alpha=0.01) == pytest.approx(0.9, abs=1e-12)  # symmetric in theta
    with pytest.raises(StatsError, match="no effect"):
        ss.noether_n(0.5, 0.5)


def test_noether_power_close_to_simulated_mann_whitney_power():
    # Independent: the power of scipy's Mann-Whitney test on normal samples shifted so that
    # P(X > Y) = 0.7, 60 vs 40, by simulation (4,000 replicates; Monte Carlo SE about 0.007).
    rng = np.random.default_rng(5)
    shift = math.sqrt(2) * sps.norm.ppf(0.7)
    x = rng.normal(shift, 1, (4000, 60))
    y = rng.normal(0, 1, (4000, 40))
    p = sps.mannwhitneyu(x, y, axis=1, method="asymptotic").pvalue
    simulated = float(np.mean(p < 0.05))
    assert ss.noether_power(0.7, 0.6, 100, alpha=0.05) == pytest.approx(simulated, abs=0.03)


def test_hanley_mcneil_q_terms_match_exponential_integrals():
    # Independent: Hanley & McNeil's Q1 = A/(2-A) and Q2 = 2A^2/(1+A) are exact for exponential scores;
    # with negatives Y ~ Exp(1) and positives X ~ Exp(rate r), A = P(X > Y) = 1/(1 + r); compute
    # Q1 = P(two positives both beat one negative) and Q2 = P(one positive beats two negatives) by quadrature.
    r = 0.25
    a = 1 / (1 + r)
    q1 = integrate.quad(lambda y: math.exp(-2 * r * y) * math.exp(-y), 0, np.inf)[0]
    q2 = integrate.quad(lambda x: (1 - math.exp(-x)) ** 2 * r * math.exp(-r * x), 0, np.inf)[0]
    assert q1 == pytest.approx(a / (2 - a), rel=1e-10)
    assert q2 == pytest.approx(2 * a * a / (1 + a), rel=1e-10)


def test_hanley_mcneil_se_matches_simulated_variance():
    # Independent: the Monte Carlo SD of the Mann-Whitney AUC for exponential scores (20,000 replicates of
    # 20 positives and 30 negatives; relative Monte Carlo error of an SD about 0.5%).
    rng = np.random.default_rng(11)
    r = 0.25
    x = rng.exponential(1 / r, (20000, 20))
    y = rng.exponential(1.0, (20000, 30))
    auc = (x[:, :, None] > y[:, None, :]).mean(axis=(1, 2))
    assert ss.hanley_mcneil_se(1 / (1 + r), 20, 30) == pytest.approx(auc.std(ddof=1), rel=0.02)


def test_auc_n_solves_the_half_width():
    n = ss.auc_n(0.85, 0.3, 0.05)
    z = sps.norm.ppf(0.975)
    assert z * ss.hanley_mcneil_se(0.85, 0.3 * n, 0.7 * n) == pytest.approx(0.05, rel=1e-12)
    assert ss.auc_n(0.85, 0.3, 0.025) > 3.5 * n  # about 4 times for half the width


def test_cstatistic_to_r2_matches_a_large_logistic_fit():
    # Independent: Riley, Van Calster & Collins 2021's construction fitted as pmsampsize does, a logistic
    # regression (statsmodels) of the outcome on a simulated binormal linear predictor (400,000 draws).
    rng = np.random.default_rng(2)
    for c, prev in ((0.8, 0.2), (0.7, 0.5), (0.9, 0.846)):
        n = 400_000
        k = int(prev * n)
        mu = math.sqrt(2) * sps.norm.ppf(c)
        lp = np.concatenate([rng.normal(mu, 1, k), rng.normal(0, 1, n - k)])
        y = np.concatenate([np.ones(k), np.zeros(n - k)])
        fit = sm.Logit(y, sm.add_constant(lp)).fit(disp=0)
        r2 = 1 - math.exp(-2 * (fit.llf - fit.llnull) / n)
        assert ss.cstatistic_to_r2(c, prev) == pytest.approx(r2, abs=3e-3)
        assert ss.cstatistic_to_r2(c, prev) < ss.max_r2(prev)
    assert ss.cstatistic_to_r2(0.5, 0.3) == pytest.approx(0.0, abs=1e-12)


def test_conservative_value_is_the_ci_point_nearest_one_half():
    assert ss.conservative_value(0.6, 0.9) == 0.6
    assert ss.conservative_value(0.05, 0.3) == 0.3
    assert ss.conservative_value(0.4, 0.7) == 0.5  # the interval holds 1/2
    assert ss.conservative_value(0.87, 1.0) == 0.87
    assert ss.conservative_value(None, 0.3) is None


def test_noether_at_complete_separation():
    # theta 1 is a valid planning value (Noether's formula needs only theta != 1/2).
    n = ss.noether_n(1.0, 0.5)
    assert n == pytest.approx((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) ** 2 / (12 * 0.25 * 0.25), rel=1e-12)
