"""Tests of covreport.stats.calibration.

Independent references: scikit-learn's ``brier_score_loss``; the calibration
slope from scikit-learn's unpenalised ``LogisticRegression`` on logit(p); the
calibration intercept as the root of the score equation sum(y - expit(a +
logit p)) = 0 (scipy.optimize.brentq); the standard errors from statsmodels'
``Logit`` (a different estimation path from the GLM the code uses); ICI, E50,
E90 and Emax computed directly from statsmodels' ``lowess``; the fits without
the one-class folds' pairs from statsmodels' GLM (Binomial, logit offset).
"""

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import optimize, special
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from covreport.errors import StatsError
from covreport.stats.calibration import calibration

Z95 = 1.959963984540054


def _data(seed, n=120, slope=0.7, shift=0.3):
    rng = np.random.default_rng(seed)
    lp = rng.normal(0, 1.5, n)
    y = (rng.random(n) < special.expit(shift + slope * lp)).astype(int)
    return y, special.expit(lp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_scipy_and_statsmodels_logit(seed):
    y, p = _data(seed)
    res = calibration(y, p)
    assert res["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    lp = special.logit(p)
    sk = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(lp[:, None], y)
    assert res["slope"] == pytest.approx(sk.coef_[0, 0], rel=1e-6)
    a = optimize.brentq(lambda a: np.sum(y - special.expit(a + lp)), -10, 10, xtol=1e-14)
    assert res["intercept"] == pytest.approx(a, abs=1e-8)
    logit = sm.Logit(y, sm.add_constant(lp)).fit(disp=0)
    se = logit.bse[1]
    assert res["slope_ci_low"] == pytest.approx(logit.params[1] - Z95 * se, rel=1e-6)
    assert res["slope_ci_high"] == pytest.approx(logit.params[1] + Z95 * se, rel=1e-6)
    # intercept SE with the slope fixed at 1: 1 / sqrt(sum p(1-p)) at the fitted intercept
    q = special.expit(a + lp)
    se_a = 1 / math.sqrt(np.sum(q * (1 - q)))
    assert res["intercept_ci_low"] == pytest.approx(a - Z95 * se_a, abs=1e-6)
    assert res["unit"] == "pair" and "Cox 1958" in res["method"]


def test_bins_are_equal_count_groups_by_predicted_probability():
    y, p = _data(3, n=47)
    res = calibration(y, p)
    bins = res["bins"]
    assert len(bins) == 9 and sum(b["n"] for b in bins) == 47
    order = np.argsort(p, kind="stable")
    start = 0
    for b in bins:
        idx = order[start:start + b["n"]]
        assert b["predicted"] == pytest.approx(p[idx].mean(), rel=1e-12)
        assert b["observed"] == pytest.approx(y[idx].mean(), rel=1e-12)
        start += b["n"]
    assert [b["predicted"] for b in bins] == sorted(b["predicted"] for b in bins)


def test_one_class_fold_pairs_are_flagged_and_left_out_of_the_slope_fit_not_clipped():
    # Reference: statsmodels GLM (Binomial, logit link) on the pairs of the two-class folds only,
    # the intercept with logit(p) as an offset (Van Calster 2019). The old code clipped the 0/1
    # probabilities of one-class folds to 1e-8 and fitted every pair, which moves the slope.
    y, p = _data(4, n=60)
    folds = np.repeat(np.arange(1, 31), 2)
    groups = np.array([f"P{f:02d}" for f in folds], dtype=object)
    flagged = np.isin(folds, [3, 17])
    p = p.copy()
    p[flagged] = np.where(y[flagged] == 1, 0.0, 1.0)          # each the opposite class: a strong lever if clipped
    res = calibration(y, p, groups=groups, folds=folds, one_class=flagged, n_resamples=0)
    keep = ~flagged
    lp = special.logit(p[keep])
    slope = sm.GLM(y[keep], sm.add_constant(lp), family=sm.families.Binomial()).fit()
    inter = sm.GLM(y[keep], np.ones((keep.sum(), 1)), family=sm.families.Binomial(), offset=lp).fit()
    assert res["slope"] == pytest.approx(slope.params[1], rel=1e-8)
    assert res["slope_ci_high"] == pytest.approx(slope.params[1] + Z95 * slope.bse[1], rel=1e-8)
    assert res["intercept"] == pytest.approx(inter.params[0], rel=1e-8)
    assert res["n_fit"] == 56 and res["excluded_from_fit"] == 4 and res["one_class_pairs"] == 4
    assert res["one_class_folds"] == [{"fold": 3, "patient_id": "P03", "pairs": 2},
                                      {"fold": 17, "patient_id": "P17", "pairs": 2}]
    assert "fold(s) 3, 17" in res["note"] and "left out" in res["note"]
    assert res["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)   # every pair stays in the Brier
    clipped = np.clip(p, 1e-8, 1 - 1e-8)
    old = sm.GLM(y, sm.add_constant(special.logit(clipped)), family=sm.families.Binomial()).fit()
    assert abs(old.params[1] - res["slope"]) > 0.05             # clipping would have distorted the slope


def test_ici_e50_e90_emax_against_statsmodels_lowess():
    # Reference: Austin & Steyerberg 2019's definitions computed directly from statsmodels' lowess
    # (frac 0.75, no robustness iterations) fitted at the pairs' probabilities.
    from statsmodels.nonparametric.smoothers_lowess import lowess

    for seed in (5, 6):
        y, p = _data(seed, n=150, slope=0.6, shift=-0.4)
        res = calibration(y, p, n_resamples=0)
        fit = lowess(y.astype(float), p, frac=0.75, it=0, return_sorted=False)
        err = np.abs(p - fit)
        assert res["ici"] == pytest.approx(err.mean(), rel=1e-10)
        assert res["e50"] == pytest.approx(np.median(err), rel=1e-10)
        assert res["e90"] == pytest.approx(np.percentile(err, 90), rel=1e-10)
        assert res["emax"] == pytest.approx(err.max(), rel=1e-10)
        at = p[np.argmax(err)]
        assert res["emax_probability"] == at and res["emax_beyond"] == min((p < at).sum(), (p > at).sum())
        assert res["ici"] > 0.02                                   # miscalibrated by construction
        grid = np.asarray(res["curve"]["probability"])
        assert grid[0] == pytest.approx(p.min()) and grid[-1] == pytest.approx(p.max())
        order = np.argsort(p)
        assert res["curve"]["observed"][10] == pytest.approx(np.interp(grid[10], p[order], fit[order]), rel=1e-10)


def test_a_well_calibrated_model_has_a_small_ici():
    # Reference: by construction y ~ Bernoulli(p), so the smoothed observed proportion tracks p.
    rng = np.random.default_rng(11)
    p = rng.uniform(0.05, 0.95, 4000)
    y = (rng.random(4000) < p).astype(int)
    res = calibration(y, p, n_resamples=0)
    assert res["ici"] < 0.02 and res["slope"] == pytest.approx(1, abs=0.15)


def test_patient_bootstrap_band_and_intervals_are_seeded_and_cover_the_estimates():
    y, p = _data(7, n=80)
    groups = np.repeat([f"P{i:02d}" for i in range(40)], 2)
    a = calibration(y, p, groups=groups, n_resamples=60, seed=3)
    b = calibration(y, p, groups=groups, n_resamples=60, seed=3)
    c = calibration(y, p, groups=groups, n_resamples=60, seed=4)
    assert a["curve"] == b["curve"] and a["ici_ci_low"] == b["ici_ci_low"]
    assert a["ici_ci_low"] != c["ici_ci_low"]
    for key in ("brier", "ici", "e50", "e90"):
        assert a[f"{key}_ci_low"] <= a[f"{key}_ci_high"]
    # Emax is a maximum: no bootstrap interval (Bickel & Freedman 1981), but where it lies
    assert math.isnan(a["emax_ci_low"]) and math.isnan(a["emax_ci_high"]) and "Bickel & Freedman" in a["method"]
    lo, hi, obs = (np.array([np.nan if v is None else v for v in a["curve"][k]], float)
                   for k in ("lower", "upper", "observed"))
    ok = np.isfinite(lo) & np.isfinite(hi)
    assert ok.mean() > 0.8 and np.all(lo[ok] <= hi[ok])
    assert np.mean((lo[ok] <= obs[ok] + 1e-12) & (obs[ok] <= hi[ok] + 1e-12)) > 0.9
    assert a["interval_unit"] == "patient" and "SeedSequence(3)" in a["method"]
    # patients are the unit: a patient's two pairs are drawn together (duplicated pairs give the pair-level band)
    single = calibration(y[::2], p[::2], n_resamples=60, seed=3)
    doubled = calibration(np.repeat(y[::2], 2), np.repeat(p[::2], 2), groups=groups, n_resamples=60, seed=3)
    assert doubled["brier_ci_low"] == pytest.approx(single["brier_ci_low"], rel=1e-12)


def test_no_panel_when_the_model_predicts_one_class_or_the_slope_is_not_estimable():
    y, p = _data(8, n=40)
    res = calibration(y, p, predicted=np.ones(40), n_resamples=0)
    assert res["drawable"] is False and "predicts one class" in res["not_drawn"]
    res = calibration([0, 1, 1, 0, 1, 0], [0.1, 0.9, 0.8, 0.2, 0.95, 0.05], n_resamples=0)   # separation
    assert res["drawable"] is False and "slope is not estimable" in res["not_drawn"]
    assert calibration(y, p, predicted=(p >= 0.5), n_resamples=0)["drawable"] is True


def test_calibration_rows_hold_every_measure_with_its_interval():
    from covreport.stats.calibration import calibration_rows

    y, p = _data(9, n=60)
    res = calibration(y, p, groups=np.repeat(np.arange(30), 2), n_resamples=20)
    rows = calibration_rows("any-protocol", res)
    assert [r["measure"] for r in rows] == ["Brier score", "calibration intercept", "calibration slope", "ICI",
                                            "E50", "E90", "Emax"]
    assert all(r["protocol"] == "any-protocol" and r["method"] and r["reference"] for r in rows)
    assert rows[2]["estimate"] == res["slope"] and rows[2]["interval"] == "Wald (GLM)"
    assert rows[3]["ci_low"] == res["ici_ci_low"] and "bootstrap" in rows[3]["interval"]


def test_degenerate_inputs_give_notes_not_crashes():
    res = calibration([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(res["slope"]) and "one class" in res["note"] and res["drawable"] is False
    res = calibration([0, 1, 1, 0], [0.1, 0.9, 0.9, 0.1])   # perfect separation
    assert math.isnan(res["slope"]) and "not estimable" in res["note"]
    with pytest.raises(StatsError, match="between 0 and 1"):
        calibration([0, 1], [0.2, 1.2])
    with pytest.raises(StatsError, match="aligned"):
        calibration([0, 1], [0.2])
