"""Tests of covreport.stats.calibration.

Independent references: scikit-learn's ``brier_score_loss``; the calibration
slope from scikit-learn's unpenalised ``LogisticRegression`` on logit(p); the
calibration intercept as the root of the score equation sum(y - expit(a +
logit p)) = 0 (scipy.optimize.brentq); the standard errors from statsmodels'
``Logit`` (a different estimation path from the GLM the code uses).
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


def test_probabilities_of_zero_and_one_are_clipped_with_a_note():
    y, p = _data(4, n=40)
    p[:3] = [0.0, 1.0, 1.0]
    res = calibration(y, p)
    assert res["clipped"] == 3 and "clipped" in res["note"]
    assert math.isfinite(res["slope"])


def test_degenerate_inputs_give_notes_not_crashes():
    res = calibration([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(res["slope"]) and "one class" in res["note"]
    res = calibration([0, 1, 1, 0], [0.1, 0.9, 0.9, 0.1])   # perfect separation
    assert math.isnan(res["slope"]) and "not estimable" in res["note"]
    with pytest.raises(StatsError, match="between 0 and 1"):
        calibration([0, 1], [0.2, 1.2])
    with pytest.raises(StatsError, match="aligned"):
        calibration([0, 1], [0.2])
