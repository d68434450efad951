"""Tests of covreport.stats.prediction (LOPO prediction and its permutation test).

Independent references, named at each check: scikit-learn's
``feature_selection.chi2`` (per fold, on the training rows only) and
``LogisticRegression`` (with lbfgs's tolerance tightened to reach the same
unique optimum, and with its defaults); the literal fold-by-fold pipeline
written in this file with those two functions; the permutation p-value
recomputed here by brute force (Phipson & Smyth 2010: p = (1 + b) / (1 + N)).
"""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special
from sklearn.feature_selection import chi2
from sklearn.linear_model import LogisticRegression

from covreport.constants import IMPROVED, STABLE, WORSE
from covreport.errors import StatsError
from covreport.stats.diagnostic import MEASURES
from covreport.stats.prediction import (
    _Lopo,
    _newton_batch,
    lopo_predict,
    permutation_p,
    permuted_outcomes,
    predict_outcome,
)

# lbfgs driven to the optimum: the fast solver must agree with this to 1e-6
TIGHT = {"tol": 1e-12, "max_iter": 100_000}


def _study(seed=0, n_patients=10, n_features=30, signal=0.8, max_pairs=3):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_pairs + 1, n_patients)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], sizes)
    n = len(groups)
    y = (rng.random(n) < 0.55).astype(int)
    y[0], y[-1] = 1, 0
    X = rng.gamma(2.0, 0.5, (n, n_features))
    X[:, :5] *= 1 + signal * y[:, None]
    X[rng.random(X.shape) < 0.1] = 0.0          # some exact zeros, as after ReLU
    return X, y, groups


def _sk_pipeline(X, y, groups, protocol, logreg=None, alpha=0.05):
    """The pipeline written out with scikit-learn only (reference)."""
    prob = np.empty(len(y))
    sel_global = None
    if protocol == "global":
        p = np.where(np.isnan(chi2(X, y)[1]), np.inf, chi2(X, y)[1])
        sel_global = np.flatnonzero(p < alpha) if (p < alpha).any() else np.array([np.argmin(p)])
    for g in sorted(set(groups)):
        test, train = groups == g, groups != g
        if len(set(y[train])) == 1:
            prob[test] = float(y[train][0])
            continue
        if protocol == "global":
            cols = sel_global
        else:
            p = chi2(X[train], y[train])[1]
            p = np.where(np.isnan(p), np.inf, p)
            cols = np.flatnonzero(p < alpha) if (p < alpha).any() else np.array([np.argmin(p)])
        model = LogisticRegression(**(logreg or {})).fit(X[train][:, cols], y[train])
        prob[test] = model.predict_proba(X[test][:, cols])[:, 1]
    return prob


# --------------------------------------------------------------------------- chi2 per fold


def test_fast_chi2_equals_sklearn_per_fold():
    X, y, groups = _study(1, n_patients=9, n_features=40)
    # awkward columns: all-zero; non-zero in one patient only; one patient holding most of the mass
    X[:, 10] = 0.0
    X[:, 11] = 0.0
    X[groups == "P03", 11] = [0.3, 1.7, 2.9][: (groups == "P03").sum()]
    X[groups == "P05", 12] += 100.0
    codes = np.unique(groups, return_inverse=True)[1]
    lopo = _Lopo(X, codes, codes.max() + 1)
    folds = np.arange(codes.max() + 1)
    stats = np.concatenate([s for _, s in lopo.fold_statistics(y.astype(float), folds, chunk=4)])
    for g in folds:
        train = codes != g
        ref_stat, ref_p = chi2(X[train], y[train])     # reference: scikit-learn, training rows only
        assert np.array_equal(np.isnan(stats[g]), np.isnan(ref_stat))
        ok = ~np.isnan(ref_stat)
        np.testing.assert_allclose(stats[g][ok], ref_stat[ok], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(special.chdtrc(1, stats[g][ok]), ref_p[ok], rtol=1e-8, atol=1e-15)
    # the column non-zero only in P03: its fold sees an all-zero column (NaN, as scikit-learn)
    assert np.isnan(stats[3, 11]) and np.isnan(stats[:, 10]).all()


def test_selection_rule_and_fallback_to_lowest_p():
    X, y, groups = _study(2, n_patients=8, n_features=25, signal=0.0)
    codes = np.unique(groups, return_inverse=True)[1]
    lopo = _Lopo(X, codes, codes.max() + 1)
    folds = np.arange(codes.max() + 1)
    sel = lopo.select_folds(y.astype(float), folds, 0.05)
    strict = lopo.select_folds(y.astype(float), folds, 1e-9)
    for g in folds:
        p = chi2(X[codes != g], y[codes != g])[1]       # reference: scikit-learn
        p = np.where(np.isnan(p), np.inf, p)
        assert np.array_equal(np.flatnonzero(sel[g]), np.flatnonzero(p < 0.05) if (p < 0.05).any()
                              else [np.argmin(p)])
        # nothing passes at 1e-9: exactly the one feature with the lowest p
        assert np.flatnonzero(strict[g]).tolist() == [int(np.argmin(p))]


# --------------------------------------------------------------------------- solver


@pytest.mark.parametrize("n,k", [(80, 6), (60, 25), (30, 70)])   # the last one solves in the dual
def test_newton_reaches_sklearns_optimum(n, k):
    rng = np.random.default_rng(n + k)
    X = rng.gamma(2.0, 0.5, (n, k))
    y = (rng.random(n) < special.expit(X[:, :3].sum(1) - 3)).astype(float)
    y[:2] = [0, 1]
    Xa = np.concatenate([X, np.ones((n, 1))], axis=1)[None]
    w, conv = _newton_batch(Xa, y, np.ones((1, n)), np.zeros((1, k + 1)))
    assert conv.all()
    p = special.expit(Xa[0] @ w[0])
    tight = LogisticRegression(**TIGHT).fit(X, y)          # reference: scikit-learn, tight lbfgs
    np.testing.assert_allclose(p, tight.predict_proba(X)[:, 1], atol=1e-6)
    np.testing.assert_allclose(w[0, :-1], tight.coef_[0], atol=1e-5)
    default = LogisticRegression().fit(X, y)              # reference: scikit-learn's defaults
    pd_ = default.predict_proba(X)[:, 1]
    assert np.abs(p - pd_).max() < 2e-3                    # lbfgs stops at tol=1e-4, short of the optimum
    clear = np.abs(p - 0.5) > 2e-3
    assert np.array_equal((p >= 0.5)[clear], (pd_ >= 0.5)[clear])


def test_newton_row_weights_drop_rows():
    rng = np.random.default_rng(7)
    X = rng.random((40, 4))
    y = (rng.random(40) < 0.5).astype(float)
    m = np.ones((1, 40))
    m[0, :5] = 0.0
    Xa = np.concatenate([X, np.ones((40, 1))], axis=1)[None]
    w, _ = _newton_batch(Xa, y, m, np.zeros((1, 5)))
    ref = LogisticRegression(**TIGHT).fit(X[5:], y[5:])     # reference: fit without those rows
    np.testing.assert_allclose(w[0, :-1], ref.coef_[0], atol=1e-5)
    np.testing.assert_allclose(w[0, -1], ref.intercept_[0], atol=1e-5)


# --------------------------------------------------------------------------- LOPO


@pytest.mark.parametrize("protocol", ["nested", "global"])
@pytest.mark.parametrize("solver", ["fast", "newton", "chord"])
def test_lopo_matches_sklearn_pipeline(protocol, solver):
    X, y, groups = _study(3, n_patients=9, n_features=30)
    fast = lopo_predict(X, y, groups, protocol=protocol, solver=solver)
    ref = _sk_pipeline(X, y, groups, protocol, logreg=TIGHT)   # reference: scikit-learn pipeline
    np.testing.assert_allclose(fast["probabilities"], ref, atol=1e-6)
    assert np.array_equal(fast["predicted"], (ref >= 0.5).astype(int))
    conf = fast["confusion"]
    assert conf == {"tp": int(((ref >= 0.5) & (y == 1)).sum()), "fp": int(((ref >= 0.5) & (y == 0)).sum()),
                    "fn": int(((ref < 0.5) & (y == 1)).sum()), "tn": int(((ref < 0.5) & (y == 0)).sum())}
    # the library's own scikit-learn path (LogisticRegression() defaults) agrees to lbfgs's tolerance
    lib_ref = lopo_predict(X, y, groups, protocol=protocol, solver="sklearn")
    assert np.abs(lib_ref["probabilities"] - fast["probabilities"]).max() < 2e-3
    assert lib_ref["selected_features"] == fast["selected_features"]


@pytest.mark.parametrize("protocol", ["nested", "global"])
def test_chord_on_many_pairs_reaches_the_newton_optimum(protocol):
    # 500 patients: most folds share one feature set and its Hessian (_chord_shared, which stops on the
    # extrapolated remaining steps); reference: exact damped Newton fold by fold (solver="newton"), itself
    # tied to scikit-learn above
    X, y, groups = _study(11, n_patients=500, n_features=40, signal=0.3)
    chord = lopo_predict(X, y, groups, protocol=protocol, solver="chord")
    newton = lopo_predict(X, y, groups, protocol=protocol, solver="newton")
    assert chord["engine"] == "chord" and newton["engine"] == "newton"
    np.testing.assert_allclose(chord["probabilities"], newton["probabilities"], atol=1e-8)


def test_chord_folds_whose_set_fit_differs_from_the_all_pairs_fit_need_no_newton(monkeypatch):
    # Issue 23.4: folds sharing a feature set other than the all-pairs selection start from that set's own
    # all-pairs fit; with the all-pairs selection's Hessian there the chord steps stalled (one fold of this
    # study, 216 of 5,000 at 10,000 pairs: exact Newton each, 97 s instead of 8 s). With the set's own Hessian
    # every fold converges by chord, to scikit-learn's optimum.
    from covreport.stats import lopo

    rng = np.random.default_rng(0)    # benchmarks/bench_lopo.py's correlated design, 1,500 patients
    n_pat, n, p = 1500, 3000, 1024
    sizes = 1 + rng.multinomial(n - n_pat, np.full(n_pat, 1 / n_pat))
    groups = np.repeat(np.arange(n_pat), sizes)
    risk = rng.normal(size=n_pat)
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.4 + risk[groups])))).astype(int)
    y[0], y[-1] = 1, 0
    latent, loadings = rng.normal(size=(n, 8)), rng.normal(size=(8, p)) * 0.5
    X = np.logaddexp(0.0, latent @ loadings + 0.4 * (rng.random(p) < 0.3) * y[:, None]
                     + rng.normal(size=(n, p)) * 0.7)
    calls = []
    newton_targets = lopo._Lopo._newton_targets
    monkeypatch.setattr(lopo._Lopo, "_newton_targets", lambda self, *a: calls.append(len(a[2])) or
                        newton_targets(self, *a))
    chord = lopo_predict(X, y, groups, protocol="nested", solver="chord", final_model=False)
    assert chord["engine"] == "chord" and calls == []
    # reference for 12 folds: scikit-learn chi2 and LogisticRegression (Newton-Cholesky, tol 1e-12) on the fold
    from sklearn.linear_model import LogisticRegression

    for g in rng.choice(n_pat, 12, replace=False):
        test, train = groups == g, groups != g
        sel = chi2(X[train], y[train])[1] < 0.05
        fit = LogisticRegression(solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(X[train][:, sel], y[train])
        ref = fit.predict_proba(X[test][:, sel])[:, 1]
        np.testing.assert_allclose(chord["probabilities"][test], ref, atol=1e-7)


def test_large_chord_products_split_over_threads_give_the_same_bits(monkeypatch):
    # Issue 23.4: the chord passes' large products run as row blocks on the BLAS threads the caller had
    # (_logistic._matmul); the blocks never depend on the threads, so neither do the results (results.json
    # must be byte-identical for any number of workers: tests/test_parallel.py). Reference: numpy's a @ b.
    from threadpoolctl import threadpool_limits

    from covreport._threads import available_cpus
    from covreport.stats import _logistic

    monkeypatch.setattr(_logistic, "_SPLIT_MIN", 1000)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(403, 57)), rng.normal(size=(57, 29))
    with threadpool_limits(1, user_api="blas"):
        with _logistic._blas_limits():
            assert _logistic._split_threads == 1        # a worker's capped BLAS: no threads of its own
            one = _logistic._matmul(a, b)
    with threadpool_limits(2, user_api="blas"):
        with _logistic._blas_limits():
            assert _logistic._split_threads == min(2, available_cpus())
            with _logistic._blas_limits():               # nested: the outermost caller's threads
                assert _logistic._split_threads == min(2, available_cpus())
            two = _logistic._matmul(a, b)
    assert _logistic._split_threads == 1              # restored on exit
    assert np.array_equal(one, two)
    np.testing.assert_allclose(one, a @ b, rtol=1e-13, atol=1e-13)
    small = rng.normal(size=(3, 4))
    assert np.array_equal(_logistic._matmul(small, small.T), small @ small.T)
    # and the fit on a study whose chord products are split: the same bits on one thread as on two
    X, y, groups = _study(11, n_patients=500, n_features=40, signal=0.3)
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            runs.append(lopo_predict(X, y, groups, protocol="nested", solver="chord")["probabilities"])
    assert np.array_equal(runs[0], runs[1])


def test_unique_rows_is_numpys_unique_of_the_rows():
    # _logistic._unique_rows replaces np.unique(idx, axis=0, return_inverse=True) (reference) on the folds'
    # feature sets: the same distinct rows in the same order, and the same inverse
    from covreport.stats._logistic import _unique_rows

    rng = np.random.default_rng(5)
    for shape in [(0, 3), (1, 3), (60, 4), (700, 2)]:
        idx = rng.integers(0, 3, shape)
        sets, inverse = np.unique(idx, axis=0, return_inverse=True)
        got_sets, got_inverse = _unique_rows(idx)
        assert np.array_equal(got_sets, sets) and np.array_equal(got_inverse, inverse.reshape(-1))


def test_selected_feature_counts_match_sklearn():
    X, y, groups = _study(4, n_patients=8, n_features=30)
    res = lopo_predict(X, y, groups, protocol="nested")
    counts = {}
    for g in sorted(set(groups)):
        tr = groups != g
        p = chi2(X[tr], y[tr])[1]                           # reference: scikit-learn
        for j in np.flatnonzero(p < 0.05) if (p < 0.05).any() else [np.nanargmin(p)]:
            counts[f"feat_{j:04d}"] = counts.get(f"feat_{j:04d}", 0) + 1
    assert res["selected_features"] == counts
    glob = lopo_predict(X, y, groups, protocol="global")
    p = chi2(X, y)[1]
    assert glob["selected_features"] == {f"feat_{j:04d}": 8 for j in np.flatnonzero(p < 0.05)}


@pytest.mark.parametrize("solver", ["fast", "sklearn"])
def test_fold_hook_sees_disjoint_patient_folds(solver):
    X, y, groups = _study(5, n_patients=7)
    seen = []

    def hook(train, test):
        seen.append((np.asarray(train), np.asarray(test)))

    lopo_predict(X, y, groups, fold_hook=hook, solver=solver)
    assert len(seen) == 7
    tested = []
    for train, test in seen:
        assert len(np.intersect1d(train, test)) == 0
        assert len(train) + len(test) == len(y)
        assert len(set(groups[test])) == 1                   # one patient per fold ...
        assert (groups[train] != groups[test][0]).all()      # ... and none of its pairs in training
        assert set(np.flatnonzero(groups == groups[test][0])) == set(test)
        tested.extend(test)
    assert sorted(tested) == list(range(len(y)))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 100_000), flip=st.integers(0, 5))
def test_held_out_labels_never_reach_selection_or_fitting(seed, flip):
    # nested protocol: changing the held-out patient's outcomes cannot change its own
    # out-of-fold probabilities (they reach neither the chi2 selection nor the fit)
    X, y, groups = _study(seed, n_patients=6, n_features=20)
    patient = sorted(set(groups))[flip]
    rows = groups == patient
    base = lopo_predict(X, y, groups, protocol="nested")["probabilities"]
    y2 = y.copy()
    y2[rows] = 1 - y2[rows]
    other = lopo_predict(X, y2, groups, protocol="nested")["probabilities"]
    np.testing.assert_allclose(other[rows], base[rows], atol=1e-9)


def test_global_protocol_does_leak():
    # the same intervention under the global protocol moves the held-out probabilities
    # (selection saw the held-out labels): the property above has power
    X, y, groups = _study(11, n_patients=6, n_features=20)
    moved = 0.0
    for patient in sorted(set(groups)):
        rows = groups == patient
        y2 = y.copy()
        y2[rows] = 1 - y2[rows]
        a = lopo_predict(X, y, groups, protocol="global")["probabilities"][rows]
        b = lopo_predict(X, y2, groups, protocol="global")["probabilities"][rows]
        moved = max(moved, np.abs(a - b).max())
    assert moved > 1e-3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_row_order_invariance(seed):
    X, y, groups = _study(seed % 1000, n_patients=7, n_features=25)
    perm = np.random.default_rng(seed).permutation(len(y))
    for protocol in ("nested", "global"):
        a = lopo_predict(X, y, groups, protocol=protocol)
        b = lopo_predict(X[perm], y[perm], groups[perm], protocol=protocol)
        np.testing.assert_allclose(b["probabilities"], a["probabilities"][perm], atol=1e-9)
        assert a["selected_features"] == b["selected_features"]
        assert a["confusion"] == b["confusion"]


@pytest.mark.parametrize("solver", ["fast", "sklearn"])
def test_one_class_training_fold_predicts_that_class(solver):
    X, y, groups = _study(6, n_patients=6)
    y[:] = 1
    only_improved = groups == "P02"
    y[only_improved] = 0                     # leaving P02 out leaves only Worse pairs
    res = lopo_predict(X, y, groups, solver=solver)
    assert (res["probabilities"][only_improved] == 1.0).all()
    assert res["one_class_folds"] == 1
    # its fold selects nothing: every count is at most the 5 two-class folds
    assert max(res["selected_features"].values()) <= 5
    y[:] = 0
    y[only_improved] = 1                     # mirror image: predicts Improved, probability 0.0
    res = lopo_predict(X, y, groups, solver=solver)
    assert (res["probabilities"][only_improved] == 0.0).all()
    assert (res["predicted"][only_improved] == 0).all()


def test_dataframe_names_and_errors():
    X, y, groups = _study(7, n_patients=5, n_features=16)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(16)])
    res = lopo_predict(df, y, groups)
    assert set(res["selected_features"]) <= set(df.columns)
    bad = X.copy()
    bad[3, 12] = -0.25
    with pytest.raises(StatsError) as err:
        lopo_predict(bad, y, groups)
    assert str(err.value) == (
        "feature column 'feat_0012' has a negative value (-0.25 in row 3, counting from 0); "
        "chi-square feature selection needs non-negative features, as the DenseNet's pooled ReLU "
        "outputs are: check that the feat_* columns hold those pooled features")
    with pytest.raises(StatsError, match="feature column 'f12' has a negative value"):
        lopo_predict(pd.DataFrame(bad, columns=df.columns), y, groups)
    nan = X.copy()
    nan[2, 4] = np.nan
    with pytest.raises(StatsError, match="'feat_0004' has a missing or infinite value in row 2"):
        lopo_predict(nan, y, groups)
    with pytest.raises(StatsError, match="0 \\(Improved\\) and 1 \\(Worse\\)"):
        lopo_predict(X, np.where(y == 1, 2, 0), groups)
    with pytest.raises(StatsError, match="at least 2 patients"):
        lopo_predict(X, y, ["P1"] * len(y))
    with pytest.raises(StatsError, match="protocol must be one of"):
        lopo_predict(X, y, groups, protocol="leaky")


# --------------------------------------------------------------------------- permutations


def test_permuted_outcomes_move_whole_patients_within_strata():
    X, y, groups = _study(8, n_patients=10)
    sizes = pd.Series(groups).value_counts()
    vectors = {g: tuple(y[groups == g]) for g in sizes.index}
    for yp in permuted_outcomes(y, groups, 20, seed=3):
        received = {g: tuple(yp[groups == g]) for g in sizes.index}
        for size in set(sizes):
            pats = sorted(sizes.index[sizes == size])
            assert sorted(received[g] for g in pats) == sorted(vectors[g] for g in pats)
    a = list(permuted_outcomes(y, groups, 5, seed=3))
    b = list(permuted_outcomes(y, groups, 5, seed=3))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("protocol", ["nested", "global"])
def test_permutation_p_brute_force(protocol):
    X, y, groups = _study(9, n_patients=6, n_features=8, signal=1.5)
    n_perm = 8
    # brute force: the documented scheme written out here -- patients sorted by id, grouped
    # by their number of pairs (increasing); per permutation and stratum, rng.permutation
    # says whose vector each patient receives -- then the scikit-learn pipeline each time
    rng = np.random.default_rng(4)
    patients = sorted(set(groups))
    sizes = {p: int((groups == p).sum()) for p in patients}
    # (global: the selection on all pairs is rerun on each permuted vector)
    observed = ((_sk_pipeline(X, y, groups, protocol, TIGHT) >= 0.5) == (y == 1)).sum()
    at_least = 0
    for _ in range(n_perm):
        yp = np.empty_like(y)
        for size in sorted(set(sizes.values())):
            stratum = [p for p in patients if sizes[p] == size]
            donors = [stratum[i] for i in rng.permutation(len(stratum))]
            for p, d in zip(stratum, donors):
                yp[groups == p] = y[groups == d]
        acc = ((_sk_pipeline(X, yp, groups, protocol, TIGHT) >= 0.5) == (yp == 1)).sum()
        at_least += acc >= observed
    res = permutation_p(X, y, groups, protocol=protocol, n_permutations=n_perm, seed=4)
    assert res["p"] == (1 + at_least) / (1 + n_perm)
    assert res["observed_accuracy"] == observed / len(y)
    assert res["n_permutations"] == n_perm and res["n_at_least_observed"] == at_least
    assert "1 + #" in res["method"]
    skipped = permutation_p(X, y, groups, protocol="nested", n_permutations=0)
    assert skipped["p"] is None and skipped["n_permutations"] == 0


# --------------------------------------------------------------------------- results block


def test_predict_outcome_block():
    rng = np.random.default_rng(10)
    X, y, groups = _study(10, n_patients=8, n_features=20, signal=1.2)
    outcome = np.where(y == 1, WORSE, IMPROVED).astype(object)
    outcome[[1, 4]] = STABLE
    first = pd.DataFrame(X, columns=[f"feat_{i:04d}" for i in range(20)])
    second = pd.DataFrame(rng.gamma(2.0, 0.5, X.shape), columns=first.columns)
    pair_ids = [f"{g}-{i}" for i, g in enumerate(groups)]
    out = predict_outcome(first, second, outcome, groups, pair_ids, n_permutations=5, seed=1)
    # the default headline is the primary penalised protocol (issue 19)
    assert (out["headline"], out["positive_class"], out["negative_class"]) == ("penalised", WORSE, IMPROVED)
    assert out["primary"] == "penalised"
    keep = outcome != STABLE
    for key, protocol, source in (("penalised", "penalised", "first"), ("nested", "nested", "first"),
                                  ("global", "global", "first"), ("reversed", "penalised", "second")):
        block = out[key]
        assert (block["protocol"], block["features_from"]) == (protocol, source)
        assert block["n_pairs"] == keep.sum() and block["n_patients"] == len(set(groups[keep]))
        assert set(block["metrics"]) == set(MEASURES) | {"balanced_accuracy"}
        m = block["metrics"]
        assert m["balanced_accuracy"]["estimate"] == pytest.approx(
            (m["sensitivity"]["estimate"] + m["specificity"]["estimate"]) / 2, rel=1e-15)
        for rec in block["metrics"].values():
            assert set(rec) >= {"estimate", "ci_low", "ci_high", "method", "note"}
        assert set(block["auc"]) >= {"auc", "se", "ci_low", "ci_high", "method", "note"}
        feats = block["selected_features"]
        assert feats == sorted(feats, key=lambda r: (-r["folds_selected"], r["feature"]))
        assert all(r["fraction"] == r["folds_selected"] / block["n_patients"] for r in feats)
        # pairs in canonical order: patient, then pair id (no content keys given)
        kept = sorted((g, pid) for g, pid, k in zip(groups, pair_ids, keep) if k)
        assert [(p["patient_id"], p["pair_id"]) for p in block["pairs"]] == kept
        # the pairs agree with lopo_predict on the kept rows (reference: the function itself)
        Xs = (first if source == "first" else second)[keep]
        ref = lopo_predict(Xs, y[keep], groups[keep], protocol=protocol)
        by_id = {p["pair_id"]: p for p in block["pairs"]}
        kept_ids = [pid for pid, k in zip(pair_ids, keep) if k]
        np.testing.assert_allclose([by_id[i]["probability"] for i in kept_ids], ref["probabilities"], atol=1e-9)
        assert block["confusion"] == ref["confusion"]
        assert [by_id[i]["predicted"] for i in kept_ids] == [WORSE if v else IMPROVED for v in ref["predicted"]]
        # every protocol has its permutation p (the global one reruns its selection each time), but a
        # reversed-order control that is not informative (here: random second-CXR features) is not tested
        if key == "reversed" and block["informative"] is False:
            assert block["permutation_p"] is None and block["permutation_note"].startswith("no permutation test")
        else:
            assert block["permutation_p"] is not None and block["permutations"] == 5
        per_fold = block["features_selected"]["per_fold"]
        assert len(per_fold) == block["n_patients"] - block["one_class_folds"]
        assert block["features_selected"]["median"] == np.median(per_fold)
        assert sum(per_fold) == sum(r["folds_selected"] for r in feats)
        assert block["unit"] == "pair" and block["auc_clustered"]["unit"] == "patient"
        assert block["solver"] in block["method"] or "Newton" in block["method"]
        assert block["role"] == {"penalised": "primary", "reversed": "control"}.get(key, "replication")
        assert block["label"] and block["reference"] and block["cv_intervals"] is None
    # AUC agrees with scikit-learn's roc_auc_score (reference)
    from sklearn.metrics import roc_auc_score
    probs = [p["probability"] for p in out["nested"]["pairs"]]
    assert out["nested"]["auc"]["auc"] == pytest.approx(roc_auc_score(y[keep], probs))
    assert "chi-square" in out["nested"]["method"] and "optimistic" in out["global"]["method"]
    # the headline switches the permutation test and the reversed control's protocol
    glob = predict_outcome(first, second, outcome, groups, pair_ids, headline="global", n_permutations=0)
    assert glob["reversed"]["protocol"] == "global" and glob["global"]["permutation_p"] is None
    # the reversed control is descriptive: accuracy beside the majority rate
    n_worse = int((y[keep] == 1).sum())
    assert out["reversed"]["majority_rate"] == max(n_worse, keep.sum() - n_worse) / keep.sum()


def test_predict_outcome_row_order_and_errors():
    X, y, groups = _study(12, n_patients=6, n_features=12)
    outcome = np.where(y == 1, WORSE, IMPROVED)
    ids = [f"pair{i}" for i in range(len(y))]
    a = predict_outcome(X, X, outcome, groups, ids, n_permutations=4)
    perm = np.random.default_rng(0).permutation(len(y))
    b = predict_outcome(X[perm], X[perm], outcome[perm], groups[perm], [ids[i] for i in perm], n_permutations=4)
    assert a["nested"]["permutation_p"] == b["nested"]["permutation_p"]
    pa = {p["pair_id"]: p["probability"] for p in a["nested"]["pairs"]}
    pb = {p["pair_id"]: p["probability"] for p in b["nested"]["pairs"]}
    assert all(math.isclose(pa[k], pb[k], abs_tol=1e-9) for k in pa)
    bad = outcome.astype(object)
    bad[2] = "Better"
    with pytest.raises(StatsError, match="pair 'pair2' has outcome 'Better'"):
        predict_outcome(X, X, bad, groups, ids)
    with pytest.raises(StatsError, match="second CXR's features have"):
        predict_outcome(X, X[:-1], outcome, groups, ids)


def test_predict_outcome_too_few_patients_is_a_note_not_a_crash():
    X, y, groups = _study(13, n_patients=4, n_features=10)
    outcome = np.full(len(y), STABLE, dtype=object)
    keep = groups == "P01"
    outcome[keep] = np.where(y[keep] == 1, WORSE, IMPROVED)
    out = predict_outcome(X, X, outcome, groups, np.arange(len(y)), n_permutations=3)
    for key in ("nested", "global", "reversed"):
        block = out[key]
        assert block["confusion"] is None and block["permutation_p"] is None
        assert "at least 2 patients" in block["note"] and block["n_patients"] == 1
        assert len(block["pairs"]) == keep.sum()


def test_a_reversed_control_that_is_not_informative_gets_no_permutation_test():
    # second CXR's features constant: every fold predicts the majority class, so the control is not
    # informative and testing it against the labels alone answers nothing (issue 19, section 6)
    X, y, groups = _study(21, n_patients=8, n_features=12)
    outcome = np.where(y == 1, WORSE, IMPROVED)
    ids = [f"p{i}" for i in range(len(y))]
    res = predict_outcome(X, np.ones_like(X), outcome, groups, ids, n_permutations=6, n_jobs=1)
    rev = res["reversed"]
    assert rev["informative"] is False
    assert rev["permutation_p"] is None and rev["permutations"] == 0
    assert rev["permutation_note"].startswith("no permutation test: the reversed-order control is not informative")
    assert res["penalised"]["permutation_p"] is not None and res["nested"]["permutation_p"] is not None
