"""Tests of covreport.stats.diagnostic and `covreport diagnostic`.

Independent references are named at each check: statsmodels'
proportion_confint(method="beta") and scipy's binomtest for Clopper-Pearson;
the log-method formula of Altman et al. (Statistics with Confidence, 2000,
p. 109) and Mercaldo, Lau & Zhou (2007) standard logit formulas recomputed
here from the counts with numpy, written differently from the library.
"""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from covreport.cli import main
from covreport.errors import StatsError
from covreport.stats._util import records
from covreport.stats.diagnostic import MEASURES, clopper_pearson, diagnostic_metrics

TABLES = [(20, 5, 10, 65), (44, 3, 0, 5), (7, 2, 1, 12), (1, 1, 1, 1), (130, 27, 15, 228)]
Z95 = 1.959963984540054


def _by_measure(df):
    return {r.measure: r for r in df.itertuples(index=False)}


def test_columns_and_row_order():
    df = diagnostic_metrics(20, 5, 10, 65)
    assert list(df.columns) == ["measure", "estimate", "ci_low", "ci_high", "method", "note"]
    assert tuple(df["measure"]) == MEASURES == (
        "accuracy", "sensitivity", "specificity", "ppv", "npv", "lr_positive", "lr_negative")


@pytest.mark.parametrize("tp,fp,fn,tn", TABLES)
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_clopper_pearson_matches_statsmodels(tp, fp, fn, tn, alpha):
    # Reference: statsmodels proportion_confint(method="beta") (Clopper-Pearson).
    m = _by_measure(diagnostic_metrics(tp, fp, fn, tn, alpha=alpha))
    for name, x, n in (("sensitivity", tp, tp + fn), ("specificity", tn, fp + tn),
                       ("accuracy", tp + tn, tp + fp + fn + tn)):
        lo, hi = proportion_confint(x, n, alpha=alpha, method="beta")
        assert m[name].estimate == pytest.approx(x / n, abs=1e-15)
        assert m[name].ci_low == pytest.approx(lo, abs=1e-12)
        assert m[name].ci_high == pytest.approx(hi, abs=1e-12)
        assert m[name].method == "Clopper-Pearson exact"


@pytest.mark.parametrize("x,n", [(0, 10), (10, 10), (3, 17), (44, 44), (1, 1)])
def test_clopper_pearson_edges_match_scipy_binomtest(x, n):
    # Reference: scipy.stats.binomtest(...).proportion_ci(method="exact") (Clopper-Pearson).
    ci = sps.binomtest(x, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = clopper_pearson(x, n, 0.05)
    assert lo == pytest.approx(ci.low, abs=1e-12)
    assert hi == pytest.approx(ci.high, abs=1e-12)


@pytest.mark.parametrize("tp,fp,fn,tn", TABLES[:1] + TABLES[2:])
def test_likelihood_ratios_log_method(tp, fp, fn, tn):
    # Reference: log method of Altman et al. 2000 p. 109, recomputed here with numpy:
    # LR+ = Se / (1 - Sp), SE(ln LR+) = sqrt(1/a - 1/(a+b) + 1/c - 1/(c+d)) with
    # a = TP, b = FN, c = FP, d = TN; LR- likewise with b and d in place of a and c.
    a, b, c, d = np.array([tp, fn, fp, tn], dtype=float)
    lrp = (a / (a + b)) / (c / (c + d))
    se_p = np.sqrt(1 / a - 1 / (a + b) + 1 / c - 1 / (c + d))
    lrn = (b / (a + b)) / (d / (c + d))
    se_n = np.sqrt(1 / b - 1 / (a + b) + 1 / d - 1 / (c + d))
    m = _by_measure(diagnostic_metrics(tp, fp, fn, tn))
    assert m["lr_positive"].estimate == pytest.approx(lrp, rel=1e-12)
    assert m["lr_positive"].ci_low == pytest.approx(lrp * np.exp(-Z95 * se_p), rel=1e-12)
    assert m["lr_positive"].ci_high == pytest.approx(lrp * np.exp(Z95 * se_p), rel=1e-12)
    assert m["lr_negative"].estimate == pytest.approx(lrn, rel=1e-12)
    assert m["lr_negative"].ci_low == pytest.approx(lrn * np.exp(-Z95 * se_n), rel=1e-12)
    assert m["lr_negative"].ci_high == pytest.approx(lrn * np.exp(Z95 * se_n), rel=1e-12)
    assert "log method" in m["lr_positive"].method


def _mercaldo_reference(tp, fp, fn, tn, p, z=Z95):
    """Mercaldo, Lau & Zhou (2007), standard logit interval, eqs. for PPV and NPV,
    written from Se, Sp and the prevalence p (the library works from the same
    formulas; here they are coded independently with numpy)."""
    n1, n0 = tp + fn, fp + tn
    se, sp = tp / n1, tn / n0
    ppv = p * se / (p * se + (1 - p) * (1 - sp))
    npv = (1 - p) * sp / ((1 - p) * sp + p * (1 - se))
    v_ppv = (1 - se) / se / n1 + sp / (1 - sp) / n0
    v_npv = se / (1 - se) / n1 + (1 - sp) / sp / n0
    lp, ln = np.log(ppv / (1 - ppv)), np.log(npv / (1 - npv))
    expit = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    return (ppv, expit(lp - z * np.sqrt(v_ppv)), expit(lp + z * np.sqrt(v_ppv)),
            npv, expit(ln - z * np.sqrt(v_npv)), expit(ln + z * np.sqrt(v_npv)))


@pytest.mark.parametrize("tp,fp,fn,tn", [(20, 5, 10, 65), (7, 2, 1, 12), (130, 27, 15, 228)])
def test_predictive_values_mercaldo_logit_sample_prevalence(tp, fp, fn, tn):
    # Reference: Mercaldo et al. 2007 standard logit interval with the sample
    # prevalence (TP+FN)/N, as MedCalc's calculator uses when no prevalence is given.
    p = (tp + fn) / (tp + fp + fn + tn)
    ppv, plo, phi, npv, nlo, nhi = _mercaldo_reference(tp, fp, fn, tn, p)
    m = _by_measure(diagnostic_metrics(tp, fp, fn, tn, predictive_ci="logit"))
    assert ppv == pytest.approx(tp / (tp + fp), rel=1e-12)  # sanity of the reference itself
    assert (m["ppv"].estimate, m["ppv"].ci_low, m["ppv"].ci_high) == pytest.approx((ppv, plo, phi), rel=1e-12)
    assert (m["npv"].estimate, m["npv"].ci_low, m["npv"].ci_high) == pytest.approx((npv, nlo, nhi), rel=1e-12)
    assert "Mercaldo" in m["ppv"].method and "sample prevalence" in m["ppv"].method
    assert "MedCalc" in m["ppv"].method and "original study" in m["ppv"].method


@pytest.mark.parametrize("tp,fp,fn,tn", [(20, 5, 10, 65), (7, 2, 1, 12), (130, 27, 15, 228), (5, 6, 0, 0),
                                         (0, 4, 3, 0)])
def test_predictive_values_clopper_pearson_by_default(tp, fp, fn, tn):
    # Reference: scipy.stats.binomtest(...).proportion_ci(method="exact"), which is
    # R's binom.test interval (Clopper-Pearson), and statsmodels proportion_confint("beta").
    m = _by_measure(diagnostic_metrics(tp, fp, fn, tn))
    for name, x, n in (("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        if n == 0:
            assert math.isnan(m[name].estimate) and m[name].note.startswith("not estimable")
            continue
        ci = binomtest(x, n).proportion_ci(method="exact")
        assert m[name].estimate == pytest.approx(x / n, rel=1e-15)
        assert (m[name].ci_low, m[name].ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10, abs=1e-14)
        assert (m[name].ci_low, m[name].ci_high) == pytest.approx(proportion_confint(x, n, method="beta"),
                                                                    rel=1e-10, abs=1e-14)
        assert m[name].method.startswith("Clopper-Pearson exact") and "binom.test" in m[name].method


def test_issue_example_tp5_fp6_has_a_real_interval():
    # covreport diagnostic --tp 5 --fp 6 --fn 0 --tn 0 used to print PPV 0.4545 (0.4545-0.4545)
    m = _by_measure(diagnostic_metrics(5, 6, 0, 0))
    ci = binomtest(5, 11).proportion_ci(method="exact")   # scipy's Clopper-Pearson = R's binom.test(5, 11)
    assert (m["ppv"].ci_low, m["ppv"].ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert 0.167 < m["ppv"].ci_low < 0.168 and 0.766 < m["ppv"].ci_high < 0.767
    # the logit method degenerates (sensitivity 1, specificity 0): Clopper-Pearson with a note
    lg = _by_measure(diagnostic_metrics(5, 6, 0, 0, predictive_ci="logit"))
    assert (lg["ppv"].ci_low, lg["ppv"].ci_high) == (m["ppv"].ci_low, m["ppv"].ci_high)
    assert "degenerates" in lg["ppv"].note and "sensitivity is 1" in lg["ppv"].note
    assert "specificity is 0" in lg["ppv"].note


def test_unknown_predictive_ci_is_refused():
    with pytest.raises(StatsError, match="predictive_ci must be one of"):
        diagnostic_metrics(1, 2, 3, 4, predictive_ci="wald")


@pytest.mark.parametrize("prevalence", [0.02, 0.3, 0.9])
def test_predictive_values_with_prevalence(prevalence):
    # Reference: Mercaldo et al. 2007 standard logit interval for a known prevalence
    # (independent numpy code above); Bayes' rule for the estimates.
    tp, fp, fn, tn = 20, 5, 10, 65
    ppv, plo, phi, npv, nlo, nhi = _mercaldo_reference(tp, fp, fn, tn, prevalence)
    m = _by_measure(diagnostic_metrics(tp, fp, fn, tn, prevalence=prevalence))
    assert (m["ppv"].estimate, m["ppv"].ci_low, m["ppv"].ci_high) == pytest.approx((ppv, plo, phi), rel=1e-12)
    assert (m["npv"].estimate, m["npv"].ci_low, m["npv"].ci_high) == pytest.approx((npv, nlo, nhi), rel=1e-12)
    assert "Bayes" in m["ppv"].method and f"prevalence {prevalence:g}" in m["ppv"].method
    # Sensitivity, specificity and LRs do not depend on prevalence.
    plain = _by_measure(diagnostic_metrics(tp, fp, fn, tn))
    for name in ("sensitivity", "specificity", "lr_positive", "lr_negative"):
        assert m[name].estimate == plain[name].estimate and m[name].ci_low == plain[name].ci_low


def test_ppv_logit_interval_is_prevalence_odds_times_lr_interval():
    # Reference (algebraic identity, independent of the Mercaldo code path):
    # logit PPV = logit p + ln LR+ and Var(logit PPV) = Var(ln LR+) of the log
    # method, so the PPV limits are the prevalence odds times the LR+ limits
    # (Altman et al. 2000, p. 109 log method).
    tp, fp, fn, tn, p = 30, 8, 6, 90, 0.15
    m = _by_measure(diagnostic_metrics(tp, fp, fn, tn, prevalence=p))
    odds = p / (1 - p)
    to_prob = lambda o: o / (1 + o)  # noqa: E731
    assert m["ppv"].ci_low == pytest.approx(to_prob(odds * m["lr_positive"].ci_low), rel=1e-12)
    assert m["ppv"].ci_high == pytest.approx(to_prob(odds * m["lr_positive"].ci_high), rel=1e-12)
    inv = (1 - p) / p
    assert m["npv"].ci_low == pytest.approx(to_prob(inv / m["lr_negative"].ci_high), rel=1e-12)
    assert m["npv"].ci_high == pytest.approx(to_prob(inv / m["lr_negative"].ci_low), rel=1e-12)


def test_accuracy_with_prevalence_combines_se_and_sp():
    # Reference: statsmodels proportion_confint(method="beta") for the Se and Sp limits.
    tp, fp, fn, tn, p = 20, 5, 10, 65, 0.25
    se_lo, se_hi = proportion_confint(tp, tp + fn, method="beta")
    sp_lo, sp_hi = proportion_confint(tn, fp + tn, method="beta")
    acc = _by_measure(diagnostic_metrics(tp, fp, fn, tn, prevalence=p))["accuracy"]
    assert acc.estimate == pytest.approx(tp / 30 * p + tn / 70 * (1 - p), rel=1e-12)
    assert acc.ci_low == pytest.approx(se_lo * p + sp_lo * (1 - p), rel=1e-12)
    assert acc.ci_high == pytest.approx(se_hi * p + sp_hi * (1 - p), rel=1e-12)
    assert "Se*p + Sp*(1-p)" in acc.method and "Clopper-Pearson" in acc.method


def test_ppv_at_one_falls_back_to_clopper_pearson():
    # Reference: statsmodels proportion_confint(method="beta") on TP/(TP+FP) and TN/(TN+FN).
    m = _by_measure(diagnostic_metrics(12, 0, 3, 9, predictive_ci="logit"))
    lo, hi = proportion_confint(12, 12, method="beta")
    assert m["ppv"].estimate == 1.0
    assert (m["ppv"].ci_low, m["ppv"].ci_high) == pytest.approx((lo, hi), abs=1e-12)
    assert m["ppv"].method.startswith("Clopper-Pearson exact on TP/(TP+FP)")
    assert "specificity is 1" in m["ppv"].note
    m = _by_measure(diagnostic_metrics(5, 4, 0, 0 + 6, predictive_ci="logit"))
    lo, hi = proportion_confint(6, 6, method="beta")
    assert m["npv"].estimate == 1.0 and m["npv"].ci_low == pytest.approx(lo, abs=1e-12)


def test_zero_cells_give_reasons_not_crashes():
    # No positives at all in the reference standard.
    m = _by_measure(diagnostic_metrics(0, 5, 0, 10))
    assert math.isnan(m["sensitivity"].estimate) and "TP + FN = 0" in m["sensitivity"].note
    assert math.isnan(m["lr_positive"].estimate) and "TP + FN = 0" in m["lr_positive"].note
    assert m["ppv"].estimate == 0.0  # 0 of 5 test positives are diseased
    # Perfect specificity: LR+ infinite, with a note; no continuity correction.
    m = _by_measure(diagnostic_metrics(10, 0, 2, 8))
    assert math.isinf(m["lr_positive"].estimate) and "FP = 0" in m["lr_positive"].note
    assert math.isnan(m["lr_positive"].ci_low)
    # Perfect sensitivity: LR- = 0 with no log-method interval.
    m = _by_measure(diagnostic_metrics(10, 3, 0, 8))
    assert m["lr_negative"].estimate == 0.0 and "FN = 0" in m["lr_negative"].note
    assert math.isnan(m["lr_negative"].ci_high)
    # Empty table.
    m = diagnostic_metrics(0, 0, 0, 0)
    assert m["estimate"].isna().all() and (m["note"].str.startswith("not estimable")).all()
    # With a prevalence and an empty margin.
    m = _by_measure(diagnostic_metrics(0, 0, 3, 4, prevalence=0.2))
    assert math.isnan(m["ppv"].estimate) and m["ppv"].note.startswith("not estimable")


def test_likelihood_ratio_of_one_sided_calls_is_never_zero_width():
    # Every case called positive (TP = TP + FN, FP = FP + TN): LR+ = 1 and the log-method SE is 0. The
    # interval is the ratio of the two proportions' Clopper-Pearson limits at alpha/2 (Bonferroni).
    # Reference: statsmodels' proportion_confint(method="beta"), the Clopper-Pearson interval.
    m = _by_measure(diagnostic_metrics(10, 8, 0, 0))
    lr = m["lr_positive"]
    sens_lo, _ = proportion_confint(10, 10, alpha=0.025, method="beta")
    fpr_lo, _ = proportion_confint(8, 8, alpha=0.025, method="beta")
    assert lr.estimate == 1.0
    assert (lr.ci_low, lr.ci_high) == pytest.approx((sens_lo, 1 / fpr_lo), rel=1e-12)
    assert lr.ci_low < 1 < lr.ci_high and "Bonferroni" in lr.method and "zero-width" in lr.note
    # every case called negative: the same for LR- = (FN/(TP+FN)) / (TN/(FP+TN)) = 1
    m = _by_measure(diagnostic_metrics(0, 0, 6, 9))
    lo_fn, _ = proportion_confint(6, 6, alpha=0.025, method="beta")
    lo_tn, _ = proportion_confint(9, 9, alpha=0.025, method="beta")
    assert (m["lr_negative"].ci_low, m["lr_negative"].ci_high) == pytest.approx((lo_fn, 1 / lo_tn), rel=1e-12)


def test_records_turn_missing_and_infinite_into_null_with_note():
    recs = {r["measure"]: r for r in records(diagnostic_metrics(10, 0, 2, 8))}
    assert recs["lr_positive"]["estimate"] is None and recs["lr_positive"]["note"]
    json.dumps(recs, allow_nan=False)
    # A row with no note of its own gets one naming the lost fields.
    import pandas as pd
    out = records(pd.DataFrame({"x": [np.inf, 1.0], "note": ["", ""]}))
    assert out[0] == {"x": None, "note": "x is +inf"} and out[1] == {"x": 1.0, "note": ""}


@pytest.mark.parametrize("bad", [-1, 2.5, "3", None, True, float("nan")])
def test_bad_counts_raise(bad):
    with pytest.raises(StatsError, match="fp must be a non-negative whole number"):
        diagnostic_metrics(1, bad, 1, 1)


def test_whole_float_counts_accepted():
    assert diagnostic_metrics(20.0, 5, 10, 65).equals(diagnostic_metrics(20, 5, 10, 65))


@pytest.mark.parametrize("prev", [0, 1, -0.1, 1.5, "0.2"])
def test_bad_prevalence_raises(prev):
    with pytest.raises(StatsError, match="prevalence must be"):
        diagnostic_metrics(1, 1, 1, 1, prevalence=prev)


@pytest.mark.parametrize("alpha", [0, 1, -0.05, 2])
def test_bad_alpha_raises(alpha):
    with pytest.raises(StatsError, match="alpha must be between 0 and 1"):
        diagnostic_metrics(1, 1, 1, 1, alpha=alpha)


counts = st.integers(min_value=0, max_value=60)


@settings(max_examples=150, deadline=None)
@given(counts, counts, counts, counts,
       st.one_of(st.none(), st.floats(min_value=0.01, max_value=0.99)),
       st.sampled_from([0.01, 0.05, 0.2]), st.sampled_from(["exact", "logit"]))
def test_every_ci_contains_its_estimate(tp, fp, fn, tn, prevalence, alpha, predictive_ci):
    # Property: no crash on any table; every finite interval contains its estimate.
    df = diagnostic_metrics(tp, fp, fn, tn, prevalence=prevalence, alpha=alpha, predictive_ci=predictive_ci)
    for r in df.itertuples(index=False):
        if np.isfinite(r.ci_low) and np.isfinite(r.ci_high):
            assert r.ci_low <= r.estimate * (1 + 1e-12) + 1e-12
            assert r.estimate <= r.ci_high * (1 + 1e-12) + 1e-12
        if np.isnan(r.estimate):
            assert r.note.startswith("not estimable")
        if r.measure in ("accuracy", "sensitivity", "specificity", "ppv", "npv") and np.isfinite(r.estimate):
            assert 0.0 <= r.ci_low <= r.ci_high <= 1.0
    json.dumps(records(df), allow_nan=False)


# --- CLI ---------------------------------------------------------------------


def test_cli_table():
    res = CliRunner().invoke(main, ["diagnostic", "--tp", "20", "--fp", "5", "--fn", "10", "--tn", "65"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "2x2 table: TP=20 FP=5 FN=10 TN=65"
    assert lines[1].split()[:3] == ["measure", "estimate", "95%"]
    assert [ln.split()[0] for ln in lines[2:]] == list(MEASURES)
    assert "sensitivity    0.6667   0.4719 to 0.8271  Clopper-Pearson exact" in res.output


def test_cli_json_matches_library():
    res = CliRunner().invoke(main, ["diagnostic", "--tp", "10", "--fp", "0", "--fn", "2", "--tn", "8",
                                    "--alpha", "0.1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert list(out) == [*MEASURES, "input"]
    lib = _by_measure(diagnostic_metrics(10, 0, 2, 8, alpha=0.1))
    assert out["sensitivity"]["estimate"] == lib["sensitivity"].estimate
    assert out["sensitivity"]["ci_low"] == lib["sensitivity"].ci_low
    assert set(out["sensitivity"]) == {"estimate", "ci_low", "ci_high", "method"}
    assert out["lr_positive"]["estimate"] is None and "FP = 0" in out["lr_positive"]["note"]


def test_cli_json_with_prevalence():
    res = CliRunner().invoke(main, ["diagnostic", "--tp", "20", "--fp", "5", "--fn", "10", "--tn", "65",
                                    "--prevalence", "0.1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    lib = _by_measure(diagnostic_metrics(20, 5, 10, 65, prevalence=0.1))
    assert out["ppv"]["estimate"] == lib["ppv"].estimate
    assert "Bayes" in out["ppv"]["method"]


def test_cli_predictive_ci_option():
    args = ["diagnostic", "--tp", "20", "--fp", "5", "--fn", "10", "--tn", "65", "--json"]
    exact = json.loads(CliRunner().invoke(main, args).output)
    logit = json.loads(CliRunner().invoke(main, [*args, "--predictive-ci", "logit"]).output)
    assert exact["ppv"]["ci_low"] == _by_measure(diagnostic_metrics(20, 5, 10, 65))["ppv"].ci_low
    lib = _by_measure(diagnostic_metrics(20, 5, 10, 65, predictive_ci="logit"))
    assert logit["ppv"]["ci_low"] == lib["ppv"].ci_low and "Mercaldo" in logit["ppv"]["method"]
    res = CliRunner().invoke(main, ["diagnostic", "--tp", "5", "--fp", "6", "--fn", "0", "--tn", "0"])
    assert res.exit_code == 0 and "0.1675 to 0.7662" in res.output


@pytest.mark.parametrize("args,message", [
    (["--tp", "-1", "--fp", "5", "--fn", "1", "--tn", "3"],
     "Error: Invalid value for '--tp': -1 is not in the range x>=0.\n"),
    (["--tp", "1", "--fp", "5", "--fn", "1", "--tn", "3", "--prevalence", "1.2"],
     "Error: Invalid value for '--prevalence': 1.2 is not in the range 0<x<1.\n"),
    (["--tp", "1", "--fp", "5", "--fn", "1", "--tn", "3", "--alpha", "0"],
     "Error: Invalid value for '--alpha': 0.0 is not in the range 0<x<1.\n"),
])
def test_cli_out_of_range_is_a_usage_error_exit_2(args, message):
    # issue 21: every range check of every command is a usage error (exit 2), as `run --permutations -1`
    res = CliRunner().invoke(main, ["diagnostic", *args])
    assert res.exit_code == 2
    assert res.stderr.endswith(message) and res.stderr.startswith("Usage: main diagnostic")


def test_cli_non_integer_is_usage_error():
    res = CliRunner().invoke(main, ["diagnostic", "--tp", "1.5", "--fp", "5", "--fn", "1", "--tn", "3"])
    assert res.exit_code == 2
    assert "Invalid value for '--tp': '1.5' is not a valid integer range." in res.output


def test_kish_design_effect_at_correlation_one():
    # Kish 1965: deff = sum n_i^2 / sum n_i; 3 patients with 1, 2 and 3 pairs -> 14 / 6
    from covreport.stats._util import kish_design_effect

    assert kish_design_effect(["a", "b", "b", "c", "c", "c"]) == (14 / 6, 6)
    assert kish_design_effect(["a", "b", "c"]) == (1.0, 3)      # one pair per patient: no inflation
    assert kish_design_effect([]) == (None, 0)
