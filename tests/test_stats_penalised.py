"""The primary penalised protocol (issue 19): scikit-learn reference, scale invariance, intervals, control."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covreport.stats import prediction as pr
from covreport.stats.lopo import lopo_predict
from covreport.stats.penalised import PENALTY_GRID, Penalised, _sk_tune, inner_folds, restrict


def _study(n_patients, n_features, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_patients)
    groups = np.repeat(np.arange(n_patients), sizes)
    risk = rng.normal(size=n_patients)[groups]
    y = (rng.random(len(groups)) < 1 / (1 + np.exp(-(0.3 + risk)))).astype(int)
    y[0], y[-1] = 1, 0
    X = rng.gamma(2.0, 1.0, (len(y), n_features))
    X[:, :3] += signal * y[:, None]
    X[:, 4] = 3.0                                   # constant: dropped in every fold
    return X, y, groups


TIGHT = {"tol": 1e-10, "max_iter": 10000}


# inner leave-one-patient-out (4 training patients < 2 x 5), then GroupKFold (INNER_FOLDS set to 2 to keep the
# reference fast: scikit-learn's fits cost ~0.1 s each on this machine)
@pytest.mark.parametrize("n_patients, folds", [(5, 5), (7, 2)])
def test_fast_path_matches_scikit_learn_fold_by_fold(n_patients, folds, monkeypatch):
    # reference: the literal StandardScaler + LogisticRegression(C, lbfgs) in every inner and outer fit
    from covreport.stats import penalised
    from covreport.stats.lopo import _group_codes, _reference_run

    monkeypatch.setattr(penalised, "INNER_FOLDS", folds)
    X, y, groups = _study(n_patients, 6, seed=n_patients)
    codes0, _ = _group_codes(groups, len(y))
    # the inner folds: one fixed partition of all patients, restricted to the training set
    n_inner = len(restrict(inner_folds(codes0), np.flatnonzero(codes0 != 0)))
    assert n_inner == (n_patients - 1 if folds == 5 else 2)
    fast = lopo_predict(X, y, groups, protocol="penalised")
    codes, pats = _group_codes(groups, len(y))
    ref = _reference_run(X, y.astype(float), codes, len(pats), "penalised", 0.05, logreg=TIGHT)
    assert fast["penalty_per_fold"] == list(ref.penalty)
    assert fast["nonzero_per_fold"] == [int(k) for k in ref.per_fold]
    assert all(k in (0, 5) for k in fast["nonzero_per_fold"])          # 6 features, the constant one dropped
    np.testing.assert_allclose(fast["probabilities"], ref.prob, atol=1e-6)
    assert fast["engine"] == "newton-reduced"


def test_inner_folds_are_groupkfold_and_lopo_below_ten_patients():
    from sklearn.model_selection import GroupKFold

    codes = np.repeat(np.arange(12), [1, 2, 3, 4] * 3)
    want = [t for _, t in GroupKFold(5).split(np.zeros((len(codes), 1)), groups=codes)]
    assert [list(t) for t in inner_folds(codes)] == [list(t) for t in want]
    few = np.repeat(np.arange(6), 2)
    assert len(inner_folds(few)) == 6 and inner_folds(np.zeros(3, int)) == []


def test_inner_partition_is_fixed_and_never_holds_the_outer_patient():
    codes = np.repeat(np.arange(12), [1, 2, 3, 4] * 3)
    part = inner_folds(codes)
    for g in range(12):
        train = np.flatnonzero(codes != g)
        folds = restrict(part, train)
        assert len(folds) == 5 and sorted(np.concatenate(folds)) == list(range(len(train)))
        for local in folds:                  # each fold is one of the partition's, less the outer patient
            assert any(set(train[local]) == set(t) - set(np.flatnonzero(codes == g)) for t in part)


def _shared_study(n_patients, seed):
    X, y, groups = _study(n_patients, 7, seed=seed)
    # a feature constant but for one patient: constant on that patient's outer training set (dropped there)
    X[:, 5] = 1.0
    X[groups == 3, 5] = 2.5
    return X, y, groups


@pytest.mark.parametrize("n_patients, seed", [(24, 1), (31, 2)])
def test_shared_fits_give_the_exact_engines_fits(n_patients, seed, monkeypatch):
    # reference: the exact engine (each fold fitted anew in its row space), itself checked against
    # scikit-learn above and below; the shared-fit engine solves the same problems from six shared fits
    from covreport.stats import penalised

    X, y, groups = _shared_study(n_patients, seed)
    monkeypatch.setattr(penalised, "SHARED_MIN_ROWS", 10**9)
    exact = lopo_predict(X, y, groups, protocol="penalised")
    monkeypatch.setattr(penalised, "SHARED_MIN_ROWS", 0)
    shared = lopo_predict(X, y, groups, protocol="penalised")
    assert Penalised(X.astype(float), groups, n_patients).shared is not None
    assert (exact["engine"], shared["engine"]) == ("newton-reduced", "newton-shared")
    assert "conjugate gradients" in pr._penalised_method("first", shared["engine"])
    np.testing.assert_allclose(shared["probabilities"], exact["probabilities"], atol=1e-9)
    assert shared["penalty_per_fold"] == exact["penalty_per_fold"]
    assert shared["nonzero_per_fold"] == exact["nonzero_per_fold"]
    assert shared["nonzero_per_fold"][3] == 5                # the feature constant there is dropped
    assert shared["selected_features"] == exact["selected_features"]
    fe, fs = exact["final_model"], shared["final_model"]
    assert fs["C"] == fe["C"] and (fs["kept"] == fe["kept"]).all()
    np.testing.assert_allclose(fs["coefficients"], fe["coefficients"], atol=1e-9)
    np.testing.assert_allclose(fs["inner_deviance"], fe["inner_deviance"], rtol=1e-9)
    assert fs["intercept"] == pytest.approx(fe["intercept"], abs=1e-9)


def test_shared_fits_match_scikit_learn_fold_by_fold(monkeypatch):
    # reference: the literal StandardScaler + LogisticRegression(C, lbfgs) in every inner and outer fit
    from covreport.stats import penalised
    from covreport.stats.lopo import _group_codes, _reference_run

    monkeypatch.setattr(penalised, "SHARED_MIN_ROWS", 0)
    X, y, groups = _shared_study(12, 4)
    fast = lopo_predict(X, y, groups, protocol="penalised", final_model=False)
    codes, pats = _group_codes(groups, len(y))
    ref = _reference_run(X, y.astype(float), codes, len(pats), "penalised", 0.05, logreg=TIGHT)
    assert fast["penalty_per_fold"] == list(ref.penalty)
    assert fast["nonzero_per_fold"] == [int(k) for k in ref.per_fold]
    np.testing.assert_allclose(fast["probabilities"], ref.prob, atol=1e-6)


def test_shared_fits_handle_one_class_sets_and_targets(monkeypatch):
    # a patient holding the only Improved pairs: its outer training set is one class (predicts Worse)
    from covreport.stats import penalised

    X, y, groups = _study(14, 5, seed=6)
    y[:] = 1
    y[groups == 2] = 0
    monkeypatch.setattr(penalised, "SHARED_MIN_ROWS", 10**9)
    exact = lopo_predict(X, y, groups, protocol="penalised")
    monkeypatch.setattr(penalised, "SHARED_MIN_ROWS", 0)
    shared = lopo_predict(X, y, groups, protocol="penalised")
    assert shared["one_class_folds"] == exact["one_class_folds"] == 1
    assert shared["penalty_per_fold"] == exact["penalty_per_fold"] and shared["penalty_per_fold"][2] is None
    np.testing.assert_allclose(shared["probabilities"], exact["probabilities"], atol=1e-9)


def test_final_model_is_scikit_learns_fit_at_the_tuned_penalty():
    # reference: sklearn's inner CV on all pairs picks the same C; LogisticRegression at that C on the
    # standardised features gives the same intercept and coefficients
    from sklearn.linear_model import LogisticRegression

    X, y, groups = _study(11, 6, seed=3)
    res = lopo_predict(X, y, groups, protocol="penalised")
    fm = res["final_model"]
    from covreport.stats.lopo import _group_codes

    codes, _ = _group_codes(groups, len(y))
    ci, _curve = _sk_tune(X, y.astype(float), codes, TIGHT)
    assert fm["C"] == PENALTY_GRID[ci]
    keep = fm["kept"]
    assert not keep[4] and keep.sum() == 5
    Xs = (X[:, keep] - X[:, keep].mean(0)) / X[:, keep].std(0)
    sk = LogisticRegression(C=fm["C"], **TIGHT).fit(Xs, y)
    np.testing.assert_allclose(fm["coefficients"][keep], sk.coef_[0], atol=1e-6)
    assert fm["intercept"] == pytest.approx(sk.intercept_[0], abs=1e-6)
    assert fm["features"][0] == "feat_0000"


_SCALE_X, _SCALE_Y, _SCALE_G = _study(14, 12, seed=5)
_SCALE_BASE = lopo_predict(_SCALE_X, _SCALE_Y, _SCALE_G, protocol="penalised", final_model=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=12, max_size=12))
def test_out_of_fold_probabilities_do_not_depend_on_feature_units(factors):
    # property: multiplying any feature by a positive constant leaves every probability (and C) unchanged
    res = lopo_predict(_SCALE_X * np.array(factors), _SCALE_Y, _SCALE_G, protocol="penalised", final_model=False)
    np.testing.assert_allclose(res["probabilities"], _SCALE_BASE["probabilities"], atol=1e-8, rtol=0)
    assert res["penalty_per_fold"] == _SCALE_BASE["penalty_per_fold"]


def test_penalised_block_records_tuning_epv_and_model():
    X, y, groups = _study(12, 8, seed=7)
    outcome = np.where(y == 1, "Worse", "Improved")
    out = pr.predict_outcome(X, X, outcome, groups, np.arange(len(y)), n_permutations=0)
    b = out["penalised"]
    assert b["role"] == "primary" and out["nested"]["role"] == out["global"]["role"] == "replication"
    assert "replication" in out["nested"]["label"] and "Steyerberg" in b["method"]
    tuning = b["tuning"]
    assert len(tuning["per_fold"]) == b["n_patients"] and tuning["grid"] == list(PENALTY_GRID)
    assert all(f["C"] in PENALTY_GRID for f in tuning["per_fold"] if f["C"] is not None)
    epv = b["events_per_candidate_predictor"]
    assert epv["candidate_predictors"] == 7                          # 8 features, one constant
    assert epv["value"] == pytest.approx(min(y.sum(), len(y) - y.sum()) / 7)
    model = b["final_model"]
    assert model["n_coefficients"] == 7 and model["dropped_constant"] == ["feat_0004"]
    assert len(model["coefficients"]) == 8 and model["C"] in PENALTY_GRID
    # the model predicts from original units: intercept_original_units + sum(coef_orig * x) = the logit
    coef = np.array([c["coefficient_original_units"] for c in model["coefficients"]])
    mean = np.array([c["mean"] for c in model["coefficients"]])
    sd = np.array([c["sd"] or 1.0 for c in model["coefficients"]])
    std = np.array([c["coefficient"] for c in model["coefficients"]])
    z_std = model["intercept"] + ((X - mean) / sd) @ std
    np.testing.assert_allclose(model["intercept_original_units"] + X @ coef, z_std, atol=1e-9)


def test_primary_permutations_are_capped_and_say_so(monkeypatch):
    monkeypatch.setattr(pr, "PRIMARY_MAX_PERMUTATIONS", 3)
    X, y, groups = _study(8, 6, seed=2)
    outcome = np.where(y == 1, "Worse", "Improved")
    out = pr.predict_outcome(X, X, outcome, groups, np.arange(len(y)), n_permutations=5, n_jobs=1)
    assert out["penalised"]["permutations"] == 3 and out["penalised"]["permutations_requested"] == 5
    assert "3 of the 5" in out["penalised"]["permutation_note"]
    assert out["nested"]["permutations"] == 5 and "permutations_requested" not in out["nested"]


# --------------------------------------------------------------------------- intervals


def test_degenerate_interval_is_clopper_pearson_on_the_effective_sample_size():
    # reference: statsmodels' Clopper-Pearson ("beta") with n = patients (deff at ICC 1 = 2 pairs each)
    from statsmodels.stats.proportion import proportion_confint

    y = np.ones(20, dtype=bool)
    groups = np.repeat(np.arange(10), 2)
    lo, hi, info = pr._degenerate_interval("sensitivity", 1.0, y, y, groups, 0.05)
    ref = proportion_confint(10, 10, alpha=0.05, method="beta")
    assert (lo, hi) == pytest.approx(ref, abs=1e-12)
    assert info == {"design_effect": 2.0, "effective_n": 10.0}
    assert 0 < lo < hi == 1.0


def test_cv_bootstrap_never_gives_a_zero_width_interval():
    # a perfectly separable study: every resample predicts every pair right (accuracy 1.0 each time)
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 2)
    y = np.tile([1, 0], 10)
    X = rng.gamma(2.0, 0.1, (20, 4))
    X[:, 0] += 5.0 * y
    ci = pr.cv_bootstrap(X, y, groups, protocol="nested", n_resamples=20, seed=1)
    acc = ci["accuracy"]
    assert acc["estimate"] == 1.0 and acc["degenerate"] and acc["ci_high"] == 1.0 and acc["ci_low"] < 1.0
    assert "Clopper-Pearson" in acc["method"] and acc["unit"] == "patient"
    assert all(rec["ci_high"] - rec["ci_low"] > 0 for rec in ci.values() if rec["ci_low"] is not None)


z95 = 1.959963984540054


def test_cv_bootstrap_refits_and_is_reproducible():
    X, y, groups = _study(10, 6, seed=4)
    a = pr.cv_bootstrap(X, y, groups, protocol="nested", n_resamples=15, seed=3)
    b = pr.cv_bootstrap(X, y, groups, protocol="nested", n_resamples=15, seed=3)
    assert a == b
    # reference: resample 0 by hand (SeedSequence(3).spawn(15)[0]), the protocol rerun from scratch
    child = np.random.SeedSequence(3).spawn(15)[0]
    pick = np.sort(np.random.default_rng(child).integers(0, 10, size=10))
    rows = np.concatenate([np.flatnonzero(groups == g) for g in pick])
    prob = lopo_predict(X[rows], y[rows], groups[rows], protocol="nested")["probabilities"]
    m = pr._measures(y[rows], prob)
    from sklearn.metrics import roc_auc_score

    assert m["auc"] == pytest.approx(roc_auc_score(y[rows], prob))
    assert a["accuracy"]["estimate"] == pytest.approx(pr._measures(y, lopo_predict(X, y, groups)["probabilities"])
                                                      ["accuracy"])
    # The interval from the resamples' SE, written out (Korn & Graubard 1998; scipy.stats.beta as the reference
    # for Clopper-Pearson): n_eff = p(1 - p)/SE^2, at most the pairs, then the exact interval on n_eff.
    from scipy.stats import beta

    rec = a["accuracy"]
    p, se = rec["estimate"], rec["bootstrap_se"]
    n_eff = min(len(y), p * (1 - p) / se ** 2)
    assert rec["effective_n"] == pytest.approx(n_eff) and rec["design_effect"] == pytest.approx(len(y) / n_eff)
    assert rec["ci_low"] == pytest.approx(beta.ppf(0.025, p * n_eff, n_eff - p * n_eff + 1), rel=1e-12)
    assert rec["ci_high"] == pytest.approx(beta.ppf(0.975, p * n_eff + 1, n_eff - p * n_eff), rel=1e-12)
    # never narrower than the exact interval on the pairs (the design effect is at least 1)
    k = round(p * len(y))
    assert rec["ci_low"] <= beta.ppf(0.025, k, len(y) - k + 1) + 1e-12
    assert rec["ci_high"] >= beta.ppf(0.975, k + 1, len(y) - k) - 1e-12
    auc = a["auc"]
    if 0 < auc["estimate"] < 1:   # logit-transformed, inside (0, 1)
        t, h = math.log(auc["estimate"] / (1 - auc["estimate"])), z95 * auc["bootstrap_se"] / (
            auc["estimate"] * (1 - auc["estimate"]))
        assert (auc["ci_low"], auc["ci_high"]) == pytest.approx((1 / (1 + math.exp(h - t)), 1 / (1 + math.exp(-t - h))))


# --------------------------------------------------------------------------- reversed control


def test_one_class_or_below_chance_auc_is_marked_not_informative():
    block = {"auc": {"auc": 0.175}}
    pr._informative(block, np.ones(10, int))
    assert block["informative"] is False
    assert "predicts Worse for every pair" in block["not_informative"] and "below chance" in block["not_informative"]
    assert "artefact" in block["informative_method"]
    ok = {"auc": {"auc": 0.71}}
    pr._informative(ok, np.array([0, 1, 1]))
    assert ok["informative"] is True and ok["not_informative"] is None


def test_predict_outcome_intervals_for_every_first_cxr_protocol():
    X, y, groups = _study(10, 6, seed=8)
    outcome = np.where(y == 1, "Worse", "Improved")
    out = pr.predict_outcome(X, X, outcome, groups, np.arange(len(y)), n_permutations=0, n_bootstrap=4)
    for key in ("penalised", "nested", "global"):
        ci = out[key]["cv_intervals"]
        assert set(ci) == set(pr.CV_MEASURES) and all(r["resamples"] == 4 for r in ci.values())
        assert not math.isnan(ci["accuracy"]["estimate"])
    assert out["reversed"]["cv_intervals"] is None
    assert out["penalised"]["cv_bootstrap_requested"] == 4


def test_penalised_reduced_design_rebuilds_the_training_gram():
    # the reduced columns U S reproduce Xs Xs' of the training rows (the kernel identity the fast path uses)
    X, y, groups = _study(8, 30, seed=9)
    P = Penalised(X.astype(float), groups, 8)
    _idx, A, mask = P.batches["outer"]
    mean, sd, keep, train, _m = P.bases[[t for t, task in enumerate(P.tasks) if task[1] == "outer"][0]]
    Xs = (X[np.ix_(train, np.flatnonzero(keep))] - mean[keep]) / sd[keep]
    D = A[0][train, :-1]
    np.testing.assert_allclose(D @ D.T, Xs @ Xs.T, atol=1e-8 * np.abs(Xs @ Xs.T).max())


def test_cv_interval_rules_written_out():
    # Proportions: Clopper-Pearson on n_eff = p(1-p)/SE^2 (Korn & Graubard 1998), n_eff at most n;
    # reference: scipy.stats.beta quantiles.
    from scipy.stats import beta

    lo, hi, extra = pr._cv_interval("sensitivity", 0.9, 0.01, [0.8, 1.0], 40, 0.05)
    n_eff = 40.0                                   # 0.9 * 0.1 / 0.01^2 = 900, capped at the 40 pairs
    assert (lo, hi) == pytest.approx((beta.ppf(0.025, 36, 5), beta.ppf(0.975, 37, 4)))
    assert extra["effective_n"] == n_eff and extra["design_effect"] == 1.0
    lo, hi, extra = pr._cv_interval("specificity", 0.75, 0.1, [0.5, 0.9], 40, 0.05)
    n_eff = 0.75 * 0.25 / 0.01                     # 18.75 < 40: the bootstrap SE is wider than binomial
    x = 0.75 * n_eff
    assert (lo, hi) == pytest.approx((beta.ppf(0.025, x, n_eff - x + 1), beta.ppf(0.975, x + 1, n_eff - x)))
    # At 0 or 1: the resamples' percentile interval, never a clipped one.
    assert pr._cv_interval("auc", 1.0, 0.02, [0.93, 1.0], None, 0.05)[:2] == (0.93, 1.0)
    # Balanced accuracy: logit, its SE at least the binomial SE of (Se + Sp)/2.
    floor = pr._balanced_se({"sensitivity": 0.9, "specificity": 0.6}, np.r_[np.ones(30), np.zeros(10)])
    assert floor == pytest.approx(0.5 * math.sqrt(0.9 * 0.1 / 30 + 0.6 * 0.4 / 10))
    lo, hi, extra = pr._cv_interval("balanced_accuracy", 0.75, 0.01, [0.7, 0.8], None, 0.05, floor)
    h = z95 * floor / (0.75 * 0.25)
    assert (lo, hi) == pytest.approx((1 / (1 + math.exp(h - math.log(3))), 1 / (1 + math.exp(-math.log(3) - h))))
    assert "binomial" in extra["interval"]


def test_cv_interval_at_an_estimate_of_one_is_never_narrower_than_exact_on_pairs():
    # Reviewer: a nested AUC of 1 had the percentile interval (0.991, 1.000), narrower than the exact bound for
    # its 8 negatives. Reference: Clopper-Pearson of N of N, lower bound (alpha/2)^(1/N) (scipy beta quantile).
    from scipy.stats import beta

    lo, hi, extra = pr._cv_interval("auc", 1.0, 0.002, [0.991, 1.0], None, 0.05, n_exact=8)
    assert lo == pytest.approx(beta.ppf(0.025, 8, 1), abs=1e-15) and hi == 1.0
    assert extra["interval"].startswith("the wider of")
    lo, hi, _ = pr._cv_interval("sensitivity", 1.0, 0.01, [0.80, 1.0], 44.0, 0.05, n_exact=44.0)
    assert (lo, hi) == (0.80, 1.0)  # the percentile interval is already the wider
    lo, hi, _ = pr._cv_interval("specificity", 0.0, 0.01, [0.0, 0.02], 10.0, 0.05, n_exact=10.0)
    assert lo == 0.0 and hi == pytest.approx(1 - beta.ppf(0.025, 10, 1), abs=1e-15)
    # a zero-width percentile interval is left for the degenerate rule (the largest design effect)
    assert pr._cv_interval("auc", 1.0, 0.0, [1.0, 1.0], None, 0.05, n_exact=8)[:2] == (1.0, 1.0)
