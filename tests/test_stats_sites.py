"""Performance by site and its random-effects meta-analysis (issue 22, section 4).

References: R metafor ``rma`` (tests/fixtures/r_metafor_rma.R wrote r_metafor_rma.json, the call in each
case), statsmodels ``combine_effects`` for DerSimonian-Laird, scikit-learn's ``roc_auc_score`` and a
statsmodels logistic regression for the per-site AUC and calibration slope.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import special
from sklearn.metrics import roc_auc_score

from covreport.errors import StatsError
from covreport.stats.auc import delong_auc
from covreport.stats.sites import NOT_RECORDED, meta_analysis, site_analysis, site_performance

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "r_metafor_rma.json").read_text(encoding="utf-8"))
NAMES = {"DL": "DerSimonian-Laird", "PM": "Paule-Mandel"}


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"{c['case']}-{c['method']}")
def test_meta_analysis_matches_metafor(case):
    res = meta_analysis(case["yi"], case["vi"], estimator=NAMES[case["method"]])
    for key in ("estimate", "se", "ci_low", "ci_high", "tau2", "q", "q_p", "pi_low", "pi_high"):
        if case[key] is None:
            assert res[key] is None, key
        else:
            assert res[key] == pytest.approx(case[key], rel=1e-10, abs=1e-12), key
    # I^2 from Q (Higgins & Thompson 2002): metafor's for DerSimonian-Laird; for Paule-Mandel metafor
    # reports tau^2/(tau^2 + typical variance) instead, so the Q-based value is checked by its formula
    q, k = case["q"], len(case["yi"])
    assert res["i2"] == pytest.approx(max(0.0, (q - (k - 1)) / q), abs=1e-12)
    if case["method"] == "DL":
        assert res["i2"] == pytest.approx(case["i2"], abs=1e-12)
    assert sum(res["weights"]) == pytest.approx(1.0)


def test_dersimonian_laird_matches_statsmodels_combine_effects():
    from statsmodels.stats.meta_analysis import combine_effects

    for case in FIXTURE["cases"]:
        if case["method"] != "DL" or case["tau2"] == 0:
            continue      # statsmodels leaves a negative moment estimate untruncated
        ref = combine_effects(np.array(case["yi"]), np.array(case["vi"]), method_re="chi2")
        res = meta_analysis(case["yi"], case["vi"], estimator="DerSimonian-Laird")
        assert res["tau2"] == pytest.approx(ref.tau2, rel=1e-12)
        assert res["estimate"] == pytest.approx(ref.mean_effect_re, rel=1e-12)
        assert res["se"] == pytest.approx(ref.sd_eff_w_re, rel=1e-12)


def test_meta_analysis_refuses_what_it_cannot_pool():
    with pytest.raises(StatsError, match="at least 2 sites"):
        meta_analysis([1.0], [0.1])
    with pytest.raises(StatsError, match="positive finite variance"):
        meta_analysis([1.0, 2.0], [0.1, 0.0])
    with pytest.raises(StatsError, match="estimator must be one of"):
        meta_analysis([1.0, 2.0], [0.1, 0.2], estimator="REML")


def _records(seed=3):
    rng = np.random.default_rng(seed)
    recs, sites = [], []
    for site, n, shift in (("A", 40, 0.9), ("B", 30, 0.7), ("C", 30, 0.1), (None, 6, 0.5)):
        y = rng.random(n) < 0.5
        y[:2], y[2:4] = True, False
        lp = shift * (2 * y - 1) + rng.normal(0, 1.2, n)
        p = special.expit(lp)
        for i in range(n):
            recs.append({"patient_id": f"{site}{i // 2}", "outcome": "Worse" if y[i] else "Improved",
                         "probability": float(p[i]), "predicted": "Worse" if p[i] >= 0.5 else "Improved"})
            sites.append(site)
    return recs, sites


def test_site_performance_against_scikit_learn_and_statsmodels():
    recs, sites = _records()
    rows = site_performance(recs, sites)
    assert [r["site"] for r in rows] == ["A", "B", "C", NOT_RECORDED]
    assert [r["n_pairs"] for r in rows] == [40, 30, 30, 6]
    assert rows[-1]["pooled"] is False and "not pooled" in rows[-1]["note"]
    for row in rows[:3]:
        sub = [r for r, s in zip(recs, sites) if s == row["site"]]
        y = np.array([r["outcome"] == "Worse" for r in sub], dtype=int)
        p = np.array([r["probability"] for r in sub])
        hit = p >= 0.5
        assert row["n_pos"] == y.sum() and row["n_patients"] == len({r["patient_id"] for r in sub})
        assert row["accuracy"] == pytest.approx(np.mean(hit == y))
        assert row["sensitivity"] == pytest.approx(hit[y == 1].mean())
        assert row["auc"] == pytest.approx(roc_auc_score(y, p))
        se = delong_auc(y, p)["se"]
        a = row["auc"]
        assert row["logit_auc"] == pytest.approx(np.log(a / (1 - a)))
        assert row["logit_auc_se"] == pytest.approx(se / (a * (1 - a)))
        # Newton (Logit) against covreport's IRLS (GLM, stopped on the deviance at 1e-8): 1e-4 apart at most
        fit = sm.Logit(y, sm.add_constant(np.log(p / (1 - p)))).fit(disp=0, tol=1e-12)
        assert row["slope"] == pytest.approx(fit.params[1], rel=1e-4)
        assert row["slope_se"] == pytest.approx(fit.bse[1], rel=1e-4)


def test_site_analysis_pools_the_logit_auc_and_the_slope():
    recs, sites = _records()
    res = site_analysis(recs, sites, column="source", protocol="penalised")
    assert res["n_sites"] == 3 and res["column"] == "source"
    auc = res["meta"]["auc"]
    assert auc["sites"] == ["A", "B", "C"] and auc["primary"] == "Paule-Mandel"
    rows = res["rows"][:3]
    ref = meta_analysis([r["logit_auc"] for r in rows], [r["logit_auc_se"] ** 2 for r in rows],
                        estimator="Paule-Mandel")
    pm = auc["estimators"]["Paule-Mandel"]
    assert pm["estimate_logit"] == pytest.approx(ref["estimate"])
    assert pm["estimate"] == pytest.approx(special.expit(ref["estimate"]))
    assert pm["pi_low"] == pytest.approx(special.expit(ref["pi_low"]))
    slope = res["meta"]["calibration_slope"]["estimators"]["DerSimonian-Laird"]
    assert slope["estimate"] == pytest.approx(
        meta_analysis([r["slope"] for r in rows], [r["slope_se"] ** 2 for r in rows],
                      estimator="DerSimonian-Laird")["estimate"])


def test_a_site_with_one_class_is_described_but_not_pooled():
    recs, sites = _records()
    recs = [dict(r, outcome="Worse") if s == "C" else r for r, s in zip(recs, sites)]
    res = site_analysis(recs, sites, column="source")
    c = next(r for r in res["rows"] if r["site"] == "C")
    assert c["logit_auc"] is None and c["slope"] is None and "one class only" in c["note"]
    assert res["meta"]["auc"]["sites"] == ["A", "B"]
    assert res["meta"]["auc"]["estimators"]["Paule-Mandel"]["pi_low"] is None


def test_internal_external_cross_validation_matches_scikit_learn_site_by_site():
    """Reference: for each site, the literal StandardScaler + LogisticRegression(C, lbfgs) with C tuned by the
    inner patient-grouped CV (scikit-learn) on the other sites' pairs, then applied to the site's pairs."""
    from covreport.stats.lopo import _group_codes, iecv_predict, lopo_predict
    from covreport.stats.penalised import PENALTY_GRID, _sk_model, _sk_tune

    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(6), [2, 1, 2, 2, 1, 2])
    sites = np.array(["north", "south", "east"])[groups % 3]
    y = (rng.random(len(groups)) < 0.5).astype(int)
    y[:2], y[2:4] = 1, 0
    X = rng.gamma(2.0, 1.0, (len(y), 5))
    X[:, :2] += 1.2 * y[:, None]
    tight = {"tol": 1e-10, "max_iter": 10000}
    fast = iecv_predict(X, y, groups, sites, protocol="penalised")
    assert fast["sites"] == ["east", "north", "south"]
    codes, _ = _group_codes(groups, len(y))
    ref = np.empty(len(y))
    for site in fast["sites"]:
        test, train = np.flatnonzero(sites == site), np.flatnonzero(sites != site)
        ci, _loss = _sk_tune(X[train], y[train], codes[train], tight)
        model = _sk_model(PENALTY_GRID[ci], tight).fit(X[train], y[train])
        ref[test] = model.predict_proba(X[test])[:, 1]
    np.testing.assert_allclose(fast["probabilities"], ref, atol=1e-6)
    # the replication protocols have no inner tuning: leave-one-site-out is LOPO with the sites as groups
    nested = iecv_predict(X, y, groups, sites, protocol="nested")
    np.testing.assert_allclose(nested["probabilities"],
                               lopo_predict(X, y, sites, protocol="nested", final_model=False)["probabilities"])
    with pytest.raises(StatsError, match="at least 2 sites"):
        iecv_predict(X, y, groups, ["one"] * len(y))
