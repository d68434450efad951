"""Tests of covreport.stats.mixed (mixed model sensitivity analysis, projection counts, trend test).

Independent references, named at each check: R 4.2.2 with nlme 3.1-162,
``lme(change ~ outcome + log(interval_days) + projection_change, random = ~ 1 |
patient_id, method = "REML")`` on tests/fixtures/mixed_data.csv
(tests/fixtures/r_mixed.R wrote tests/fixtures/r_mixed.json; R is not needed
to run these tests); pandas value counts for the projection table; the
Jonckheere-Terpstra statistic, its exact null distribution and its variance
with ties computed by brute force over every distinct labelling, and R's
kSamples 1.2-9 ``jt.test`` (exact and asymptotic; tests/fixtures/r_trend.R
wrote tests/fixtures/r_trend.json).
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from covreport.constants import IMPROVED, STABLE, WORSE
from covreport.stats.mixed import (
    jonckheere_terpstra, jt_statistic, mixed_model_contrasts, projection_changes,
)

FIX = Path(__file__).parent / "fixtures"
REF = json.loads((FIX / "r_mixed.json").read_text(encoding="utf-8"))


def _data():
    return pd.read_csv(FIX / "mixed_data.csv")


def test_mixed_model_contrasts_match_r_nlme():
    out = mixed_model_contrasts(_data(), ["change"]).set_index("contrast")
    for contrast, (est, se) in REF["contrasts"].items():
        row = out.loc[contrast]
        # reference: nlme's fixef and vcov (REML); nlme stops at its own tolerance (measured 5e-9 apart)
        assert row.estimate == pytest.approx(est, rel=1e-7)
        assert row.se == pytest.approx(se, rel=1e-7)
        # t on nlme's between/within DF (summary(fit)$tTable[, "DF"]) and its two-sided p
        assert row.df == REF["df"]["outcomeWorse"] == REF["df"]["outcomeStable"]
        assert row.t == pytest.approx(est / se, rel=1e-4)
        assert row.p == pytest.approx(REF["p_t"][contrast], rel=1e-6)
        assert row.ci_low == pytest.approx(est - sps.t.ppf(0.975, row.df) * se, rel=1e-4)
        assert row.random_effect_variance == pytest.approx(REF["random_effect_variance"], rel=1e-4)
        assert row.residual_variance == pytest.approx(REF["residual_variance"], rel=1e-7)
        assert row.n_pairs == REF["n"] and row.unit == "patient" and row.converged
        assert "np.log(interval_days)" in row.formula and "projection_change" in row.formula
        assert row.formula in row.method and row.analysis.startswith("sensitivity")


def test_the_reml_profile_is_statsmodels_loglike():
    # reference: statsmodels MixedLM.loglike(params, profile_fe=True) with reml=True at the same variance
    # ratio, and the best of statsmodels' own fits (three optimisers) is not higher than ours
    import warnings

    from statsmodels.regression.mixed_linear_model import MixedLM, MixedLMParams

    from covreport.stats.mixed import _best_fit, _design, _reml_profile

    df, formula, _ = _design(_data(), "change", "outcome")
    model = MixedLM.from_formula(formula, data=df, groups=df["patient_id"])
    fit, note = _best_fit(model)
    gamma = float(fit.cov_re.iloc[0, 0] / fit.scale)
    profile = _reml_profile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = max(model.fit(reml=True, method=m).llf for m in (["bfgs"], ["powell", "lbfgs"], ["nm", "lbfgs"]))
    model.reml, model.cov_pen, model.fe_pen = True, None, None     # what MixedLM.fit sets before loglike
    for g in (gamma, 1.5 * gamma, 0.3, 1e-6):     # (statsmodels answers inf at exactly 0)
        params = MixedLMParams.from_components(fe_params=np.zeros(model.k_fe), cov_re=np.array([[g]]))
        assert profile(g)[2] == pytest.approx(model.loglike(params, profile_fe=True), rel=1e-12, abs=1e-12)
    assert fit.llf >= theirs - 1e-12 and note is None and fit.converged


def test_a_between_patient_outcome_takes_nlmes_outer_df():
    # reference: the same lme with each patient's outcome set to that of its first pair (r_mixed.R)
    d = _data()
    d["outcome"] = d.groupby("patient_id")["outcome"].transform("first")
    out = mixed_model_contrasts(d, ["change"])
    assert (out.df == REF["df_between_outcome"]["outcomeWorse"]).all()
    assert REF["df_between_outcome"]["outcomeWorse"] < REF["df_between_outcome"]["log(interval_days)"]
    assert "t test" in out.method[0] and "Pinheiro & Bates" in out.method[0]


def test_terms_that_cannot_be_estimated_are_left_out_and_said():
    d = _data()
    d["first_view"] = d["second_view"] = "AP"
    row = mixed_model_contrasts(d, ["change"]).iloc[0]
    assert "projection_change" not in row.formula and "every pair is 'same'" in row.terms_left_out
    d = _data().drop(columns=["interval_days"])
    row = mixed_model_contrasts(d, ["change"]).iloc[0]
    assert "interval" not in row.formula and "no interval" in row.terms_left_out
    d = _data()
    d.loc[0, "interval_days"] = 0
    row = mixed_model_contrasts(d, ["change"]).iloc[0]
    assert "np.log1p(interval_days)" in row.formula and math.isfinite(row.estimate)
    d = _data()
    d["change"] = 0.1
    row = mixed_model_contrasts(d, ["change"]).iloc[0]
    assert math.isnan(row.estimate) and row.note.startswith("not fitted")


def test_projection_changes_counts():
    d = _data()
    d.loc[0, "second_view"] = None
    out = projection_changes(d)
    for outcome in (WORSE, STABLE, IMPROVED, "All"):
        sub = d if outcome == "All" else d[d.outcome == outcome]
        got = out[out.outcome == outcome]
        assert got.pairs.sum() == len(sub)
        # reference: pandas counts of (first, second) projections
        ref = sub.fillna({"second_view": "not recorded"}).groupby(["first_view", "second_view"]).size()
        for r in got.itertuples():
            assert r.pairs == ref[(r.first_view, r.second_view)]
            expected = ("unknown" if r.second_view == "not recorded"
                        else "same" if r.first_view == r.second_view else "changed")
            assert r.projection_change == expected
    assert (out.unit == "pair").all()


def _brute_j(x, g):
    return sum((x[i] < x[j]) + 0.5 * (x[i] == x[j]) for i in range(len(x)) for j in range(len(x)) if g[i] < g[j])


def _labellings(sizes):
    base = np.repeat(np.arange(len(sizes)), sizes)
    return [np.array(p) for p in set(itertools.permutations(base))]


def test_jonckheere_exact_p_matches_brute_force():
    rng = np.random.default_rng(4)
    x = rng.normal(size=9) + np.repeat([0.0, 1.0, 2.0], 3)
    df = pd.DataFrame({"outcome": [IMPROVED] * 3 + [STABLE] * 3 + [WORSE] * 3, "A": x})
    row = jonckheere_terpstra(df, ["A"]).iloc[0]
    g = np.repeat([0, 1, 2], 3)
    assert row.J == _brute_j(x, g) == jt_statistic(x, g)
    # reference: the exact null distribution by enumerating the 1,680 distinct labellings
    null = np.array([_brute_j(x, lab) for lab in _labellings([3, 3, 3])])
    p = 2 * min(np.mean(null <= row.J), np.mean(null >= row.J))
    assert row.p == pytest.approx(min(1.0, p), rel=1e-12) and row.p_method.startswith("exact")
    assert row["mean"] == pytest.approx(null.mean(), rel=1e-12) and row.sd == pytest.approx(null.std(), rel=1e-12)


def test_jonckheere_tie_corrected_variance_matches_brute_force():
    x = np.array([0.1, 0.1, 0.2, 0.3, 0.3, 0.3, 0.5, 0.6, 0.6, 0.7])
    sizes = [3, 3, 4]
    df = pd.DataFrame({"outcome": [IMPROVED] * 3 + [STABLE] * 3 + [WORSE] * 4, "A": x})
    row = jonckheere_terpstra(df, ["A"]).iloc[0]
    null = np.array([_brute_j(x, lab) for lab in _labellings(sizes)])   # reference: every labelling
    assert row.sd == pytest.approx(null.std(), rel=1e-12)
    assert row["mean"] == pytest.approx(null.mean(), rel=1e-12)
    assert row.p_method.startswith("normal approximation with the tie-corrected variance")


def test_jonckheere_clustered_p_with_one_pair_per_patient_is_the_permutation_p():
    rng = np.random.default_rng(9)
    x = rng.normal(size=9) + np.repeat([0.0, 0.4, 0.8], 3)
    df = pd.DataFrame({"outcome": [IMPROVED] * 3 + [STABLE] * 3 + [WORSE] * 3, "A": x,
                       "patient_id": [f"P{i}" for i in range(9)]})
    out = jonckheere_terpstra(df, ["A"], df["patient_id"], n_permutations=20000, seed=1)
    pair, patient = out.iloc[0], out.iloc[1]
    assert (pair.unit, patient.unit) == ("pair", "patient")
    # reference: enumeration; two-sided |J - E J| permutation p
    null = np.array([_brute_j(x, lab) for lab in _labellings([3, 3, 3])])
    exact = np.mean(np.abs(null - null.mean()) >= abs(pair.J - null.mean()) - 1e-9)
    assert abs(patient.p - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4


def test_jonckheere_constant_label_is_not_tested():
    df = pd.DataFrame({"outcome": [IMPROVED, STABLE, WORSE] * 2, "A": [0.2] * 6})
    row = jonckheere_terpstra(df, ["A"]).iloc[0]
    assert math.isnan(row.p) and row.note == "not tested: constant"


def test_a_variance_at_the_boundary_is_reached_and_said():
    # Reference: statsmodels OLS of the same formula. When the REML random-intercept variance is 0, the
    # fixed effects are those of ordinary least squares. On this draw (no patient effect) statsmodels'
    # default optimiser stops short (lower REML log-likelihood, fixed effects 0.007 off OLS); the
    # profiled search includes the boundary and reaches it.
    import warnings

    import statsmodels.formula.api as smf
    from statsmodels.regression.mixed_linear_model import MixedLM

    from covreport.stats.mixed import _best_fit

    rng = np.random.default_rng(2)
    pid = np.repeat(np.arange(40), rng.integers(1, 3, 40))
    n = len(pid)
    out = rng.choice(["Worse", "Stable", "Improved"], n, p=[0.6, 0.2, 0.2])
    iv = rng.integers(1, 9, n).astype(float)
    change = np.where(out == "Worse", 0.3, np.where(out == "Improved", -0.2, 0.0)) + rng.normal(0, 0.3, n)
    df = pd.DataFrame({"change": change, "outcome": out, "interval_days": iv, "patient_id": pid.astype(str)})
    formula = "change ~ C(outcome, Treatment('Improved')) + np.log(interval_days)"
    model = MixedLM.from_formula(formula, data=df, groups=df["patient_id"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = model.fit(reml=True)
    fit, note = _best_fit(model)
    ols = smf.ols(formula, data=df).fit()
    assert fit.llf > default.llf + 0.1
    assert np.abs(fit.fe_params.to_numpy() - ols.params.to_numpy()).max() < 1e-6
    assert np.abs(default.fe_params.to_numpy() - ols.params.to_numpy()).max() > 1e-3
    assert note == ("the random-intercept variance is estimated at 0 (the boundary), so the fit equals ordinary "
                    "least squares of the pairs")


TREND = json.loads((Path(__file__).parent / "fixtures" / "r_trend.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("rec", TREND["jt_test"], ids=lambda r: r["case"])
def test_jonckheere_terpstra_matches_r_ksamples(rec):
    # Reference: R kSamples::jt.test (one-sided tails; the record names the call).
    groups = [(IMPROVED, rec["improved"]), (STABLE, rec["stable"]), (WORSE, rec["worse"])]
    df = pd.DataFrame([{"outcome": g, "A": v} for g, vals in groups for v in vals])
    row = jonckheere_terpstra(df, ["A"]).iloc[0]
    assert row["J"] == pytest.approx(rec["J"], abs=1e-12)
    assert row["mean"] == pytest.approx(rec["mu"], abs=1e-12)
    assert row["sd"] == pytest.approx(rec["sig"], rel=1e-12)
    assert ("exact" in row["p_method"]) == (rec["method"] == "exact")
    assert row["p"] == pytest.approx(min(1.0, 2 * min(rec["p_lower"], rec["p_upper"])), rel=1e-10)
