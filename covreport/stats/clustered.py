"""Inference with the patient as the cluster: Obuchowski's clustered AUC and a cluster bootstrap.

A patient contributes several pairs, which are not independent. The
pair-level results (which replicate the original study) stay; beside them:

- :func:`obuchowski_auc`: the nonparametric AUC (probability of superiority)
  with Obuchowski's (1997) clustered variance, a logit-transformed interval
  with a t reference on Welch-Satterthwaite df (at most patients - 2; never clipped) and the z test
  against 1/2;
- :func:`group_differences_clustered`: for each label and contrast of the
  change in probability, theta with that interval and a cluster permutation
  p (:func:`cluster_permutations`: each patient's outcome vector moves whole
  to another patient with as many pairs), adjusted by Holm and
  Benjamini-Hochberg within each contrast; the z test is kept as ``p_wald``
  (anti-conservative with few patients: ``benchmarks/bench_clustered_null.py``);
- :func:`cluster_bootstrap`: patients drawn with replacement, each with all
  its pairs; percentile intervals of the prediction metrics (the out-of-fold
  predictions resampled, not refitted) and the difference in medians, BCa
  intervals (:func:`bca_interval`) of Cohen's d and Hedges' g;
- :func:`primary_analysis`: which unit the report leads with.

References
----------
.. [1] Obuchowski NA. Nonparametric analysis of clustered ROC curve data.
   Biometrics 1997;53:567-578.
.. [2] DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two
   or more correlated receiver operating characteristic curves.
   Biometrics 1988;44:837-845 (the unclustered case).
.. [3] Davison AC, Hinkley DV. Bootstrap Methods and their Application.
   Cambridge University Press, 1997, section 3.8 (resampling clusters).
.. [4] Field CA, Welsh AH. Bootstrapping clustered data. J R Stat Soc B
   2007;69:369-390.
.. [5] Efron B. Better bootstrap confidence intervals. J Am Stat Assoc
   1987;82:171-185 (BCa).
.. [6] Satterthwaite FE. An approximate distribution of estimates of variance
   components. Biometrics Bull 1946;2:110-114.
"""

import math

import numpy as np
import pandas as pd
from scipy import stats as _sps

from covreport import progress
from covreport.constants import CONTRAST_NAMES, CONTRASTS, IMPROVED, WORSE
from covreport.errors import StatsError
from covreport.stats._util import check_alpha, z_quantile
from covreport.stats.effect_sizes import SEPARATION_CI, disjoint_comparisons, logit_interval, separation_interval
from covreport.stats.groups import NOT_TESTED_CONSTANT, TESTED, adjust_within, check_changes, is_constant

OBUCHOWSKI_METHOD = (
    "nonparametric AUC (probability of superiority, ties count 1/2) with Obuchowski's clustered "
    "variance (Obuchowski 1997, Biometrics 53:567-578), the patient as the cluster; "
    "95% logit-transformed interval expit(logit(AUC) +/- t(df) SE/(AUC(1-AUC))), not clipped "
    "(Qin & Hotilovac 2008), df the Welch-Satterthwaite df (Satterthwaite 1946) of the two groups' variance "
    "terms, at most patients - 2; at AUC 0 or 1 (complete separation, SE 0) the exact Clopper-Pearson interval "
    "of N of N comparisons that share no patient, N = min(patients with positives, with negatives, half the "
    "patients rounded down); z = (AUC - 1/2)/SE"
)

SEPARATION_NOTE = "complete separation of the groups (theta = 0 or 1, zero standard error)"

#: Cluster permutations of :func:`group_differences_clustered` (Monte Carlo, p = (1 + b)/(1 + B)).
N_CLUSTER_PERMUTATIONS = 9999

CLUSTER_PERMUTATION_DESIGN = (
    "cluster permutation: the pairs of the two groups keep their changes; each patient's outcomes (its "
    "pairs of the contrast) move together to another patient with the same number of pairs in the contrast "
    "and are shuffled among that patient's pairs (uniformly, numpy default_rng seeded per contrast from "
    "SeedSequence(seed), the same permutations for every label); valid when, under the null, a patient's "
    "outcomes are independent of "
    "its changes given its number of pairs and the pairs of a patient are exchangeable (a patient may have "
    "pairs in both groups: each patient keeps its mix of outcomes)"
)

CLUSTERED_MW_METHOD = (
    "clustered Mann-Whitney test: theta = U/(n1 n2) = P(change in group 1 > change in group 2) + "
    "P(tie)/2 with Obuchowski's clustered variance (Obuchowski 1997), the patient as the cluster; "
    "95% logit-transformed interval expit(logit(theta) +/- t(df) SE/(theta(1-theta))), not clipped, df the "
    "Welch-Satterthwaite df (Satterthwaite 1946) of the two groups' variance terms, at most patients - 2; "
    "at theta 0 or 1 (complete separation, SE 0) the exact Clopper-Pearson interval of N of N comparisons "
    "that share no patient, N = min(patients in group 1, in group 2, half the patients "
    "rounded down); "
    "two-sided p = (1 + #{|theta* - 1/2| >= |theta - 1/2|})/(1 + B) over B = "
    "{B} " + CLUSTER_PERMUTATION_DESIGN + "; p_wald: the z test (theta - 1/2)/SE, for reference only; "
    "p adjusted across labels within the contrast by Holm and by Benjamini-Hochberg (statsmodels "
    "multipletests); a label whose change is the same in every pair of the contrast is not tested and not "
    "in the family"
)

CLUSTERED_COLUMNS = (
    "contrast", "label", "group1", "group2", "n1", "n2", "clusters1", "clusters2", "clusters",
    "theta", "se", "ci_low", "ci_high", "z", "p", "p_holm", "p_bh", "unit", "method", "note",
    "df", "p_wald", "p_method", "permutations", "status", "analysis",
)

#: ``analysis`` values of the clustered records: the primary contrast and the others.
PRIMARY = "primary: the change of each label, {contrast}, patients as clusters"
SECONDARY = "secondary: other contrasts, patients as clusters"

#: Prediction metrics of :func:`cluster_bootstrap`, in order.
BOOTSTRAP_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy",
                     "lr_positive", "lr_negative")


COMPARE_METHOD = ("difference of two correlated nonparametric AUCs of the same units (probability of superiority, "
                  "ties count 1/2) with Obuchowski's clustered variance of the difference (Obuchowski 1997, "
                  "Biometrics 53:567-578), the patient as the cluster; z = difference / SE, two-sided normal p; "
                  "95% Wald interval of the difference, not clipped; with one unit per cluster it is DeLong's "
                  "paired test")


def _both_classes(y):
    """``y`` (0/1) as booleans, checked to hold both classes."""
    if not np.isin(y, (0, 1)).all():
        raise StatsError("y_true must hold 0 (negative) and 1 (positive) only")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise StatsError(f"the AUC needs both classes, but all {len(y)} units are "
                         f"{'positive' if y.all() else 'negative'}")
    return y


def _codes(clusters, n):
    clusters = pd.Series(np.asarray(clusters, dtype=object))
    if len(clusters) != n:
        raise StatsError(f"clusters (patient ids) must have one value per unit ({n}), got {len(clusters)}")
    if clusters.isna().any():
        i = int(np.flatnonzero(clusters.isna().to_numpy())[0])
        raise StatsError(f"patient id missing at position {i}; every pair needs its patient id")
    codes, _ = pd.factorize(clusters.astype(str), sort=True)
    return codes


def obuchowski_components(x, cx, y, cy):
    """theta and Obuchowski's clustered variance for scores ``x`` (group 1) and ``y`` (group 2).

    Parameters
    ----------
    x, y : ndarray of float
        Scores of the units of group 1 (e.g. diseased) and group 2.
    cx, cy : ndarray of int
        Cluster code of each unit (codes shared between the groups).

    Returns
    -------
    dict
        ``theta``, ``var`` (NaN when fewer than 2 clusters hold a unit of a
        group), ``df`` (:func:`satterthwaite_df`), ``n1``, ``n2``, ``clusters1`` (I10), ``clusters2`` (I01),
        ``clusters`` (I).

    Notes
    -----
    With psi(X, Y) = 1, 1/2, 0 for X >, =, < Y, N units of group 1 and M of
    group 2: V10(X_ik) = sum_Y psi(X_ik, Y) / M, V01(Y_ij) = sum_X psi(X, Y_ij) / N,
    theta = sum V10 / N; per cluster i the sums V10(X_i.), V01(Y_i.) and the
    counts n_i, m_i;
    S10 = I10 / ((I10 - 1) N) sum_i (V10(X_i.) - n_i theta)^2,
    S01 = I01 / ((I01 - 1) M) sum_i (V01(Y_i.) - m_i theta)^2,
    S11 = I / (I - 1) sum_i (V10(X_i.) - n_i theta)(V01(Y_i.) - m_i theta),
    var = S10 / N + S01 / M + 2 S11 / (N M) (Obuchowski 1997, section 2).
    With one unit per cluster S11 = 0 and the variance is DeLong's.
    Computed in O((N + M) log(N + M)) from sorted scores.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    N, M = len(x), len(y)
    used, inv = np.unique(np.concatenate([cx, cy]), return_inverse=True)
    ix, iy = inv[:N], inv[N:]
    n_clusters = len(used)
    theta, a, b = _cluster_sums(x, ix, y, iy, n_clusters)
    i10, i01 = len(np.unique(ix)), len(np.unique(iy))
    var, df = math.nan, math.nan
    if i10 >= 2 and i01 >= 2:
        var, v10, v01 = _clustered_var(a, b, N, M, i10, i01, n_clusters, parts=True)
        df = satterthwaite_df(v10, v01, i10, i01, n_clusters)
    return {"theta": theta, "var": var, "df": df, "n1": N, "n2": M, "clusters1": i10, "clusters2": i01,
            "clusters": n_clusters}


def _cluster_sums(x, cx, y, cy, n_clusters):
    """theta and the centred per-cluster sums V10(X_i.) - n_i theta and V01(Y_i.) - m_i theta, from sorted scores."""
    N, M = len(x), len(y)
    ys, xs = np.sort(y), np.sort(x)
    lo, hi = np.searchsorted(ys, x, "left"), np.searchsorted(ys, x, "right")
    v10 = (lo + 0.5 * (hi - lo)) / M
    lo, hi = np.searchsorted(xs, y, "left"), np.searchsorted(xs, y, "right")
    v01 = ((N - hi) + 0.5 * (hi - lo)) / N
    theta = float(v10.sum() / N)
    a = np.bincount(cx, weights=v10, minlength=n_clusters) - theta * np.bincount(cx, minlength=n_clusters)
    b = np.bincount(cy, weights=v01, minlength=n_clusters) - theta * np.bincount(cy, minlength=n_clusters)
    return theta, a, b


def _clustered_var(a, b, N, M, i10, i01, n_clusters, parts=False):
    """Obuchowski's S10 / N + S01 / M + 2 S11 / (N M) from the centred cluster sums (see obuchowski_components).

    With ``parts`` also the two groups' terms S10 / N and S01 / M (for :func:`satterthwaite_df`).
    """
    s10 = i10 / ((i10 - 1) * N) * float(a @ a)
    s01 = i01 / ((i01 - 1) * M) * float(b @ b)
    s11 = n_clusters / (n_clusters - 1) * float(a @ b)
    var = s10 / N + s01 / M + 2.0 * s11 / (N * M)
    return (var, s10 / N, s01 / M) if parts else var


def satterthwaite_df(var10, var01, i10, i01, n_clusters):
    """Welch-Satterthwaite degrees of freedom of the clustered variance, at most patients - 2.

    ``(v10 + v01)^2 / (v10^2 / (I10 - 1) + v01^2 / (I01 - 1))`` with v10 = S10 / N
    estimated from the I10 patients of group 1 and v01 = S01 / M from the I01 of
    group 2 (the covariance term is left out of the df); it falls towards
    I10 - 1 when one group's patients carry the variance. At 5 or 8 patients in
    one group against 28 the logit-t interval covers 94.7-96.2% with these df
    and 92.3-95.5% with patients - 2 (``benchmarks/bench_clustered_few.py``).
    """
    den = var10 ** 2 / (i10 - 1) + var01 ** 2 / (i01 - 1)
    if not den > 0:
        return float(n_clusters - 2)
    return float(min((var10 + var01) ** 2 / den, n_clusters - 2))


def obuchowski_auc(y_true, y_score, clusters, *, alpha=0.05):
    """Nonparametric AUC with Obuchowski's (1997) clustered standard error.

    Parameters
    ----------
    y_true : array_like of 0/1
        1 = positive (its scores are group 1).
    y_score : array_like of float
    clusters : array_like
        Cluster (patient) of each unit.
    alpha : float
        1 - confidence level.

    Returns
    -------
    dict
        ``auc``, ``se``, ``ci_low``, ``ci_high`` (logit-transformed, t on
        Welch-Satterthwaite df, at most patients - 2, not clipped), ``z`` and
        ``p`` (two-sided Wald, of AUC = 1/2), ``n_pos``, ``n_neg``,
        ``clusters``, ``clusters_pos``, ``clusters_neg``, ``unit``
        ("patient"), ``method``, ``note`` (None, or why the SE is missing).

    Raises
    ------
    StatsError
        One class only, missing values or misaligned inputs.

    References
    ----------
    Obuchowski NA. Biometrics 1997;53:567-578.

    Examples
    --------
    >>> r = obuchowski_auc([1, 1, 0, 0, 1, 0], [0.9, 0.8, 0.3, 0.4, 0.2, 0.1], ["a", "a", "b", "b", "c", "c"])
    >>> round(r["auc"], 4)
    0.7778
    """
    alpha = check_alpha(alpha)
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise StatsError(f"y_true and y_score must be one-dimensional and aligned, got {y.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise StatsError("y_score has missing or infinite values; drop those units first")
    y = _both_classes(y)
    codes = _codes(clusters, len(y))
    comp = obuchowski_components(s[y], codes[y], s[~y], codes[~y])
    out = _wald(comp, alpha)
    return {"auc": comp["theta"], "se": out["se"], "ci_low": out["ci_low"], "ci_high": out["ci_high"],
            "z": out["z"], "p": out["p"], "n_pos": comp["n1"], "n_neg": comp["n2"],
            "clusters": comp["clusters"], "clusters_pos": comp["clusters1"],
            "clusters_neg": comp["clusters2"], "unit": "patient", "method": OBUCHOWSKI_METHOD,
            "note": out["note"]}


def obuchowski_compare(y_true, score_a, score_b, clusters, *, alpha=0.05):
    """Compare two correlated AUCs measured on the same clustered units (Obuchowski 1997).

    The variance of theta_a - theta_b is Obuchowski's clustered variance of
    the difference of the two tests' structural components: with ``d10_i`` and
    ``d01_i`` the per-cluster sums of V10 and V01 of test a minus those of
    test b (each centred at its theta), ``var = S10(d)/N + S01(d)/M + 2 S11(d)/(N M)``
    as in :func:`obuchowski_components`, which is ``var_a + var_b - 2 cov_ab``.

    Parameters
    ----------
    y_true : array_like of 0/1
    score_a, score_b : array_like of float
        The two scores of every unit (e.g. the combined and the clinical model).
    clusters : array_like
        Cluster (patient) of each unit.
    alpha : float

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``difference`` (a - b), ``se``, ``z``, ``p``,
        ``ci_low``, ``ci_high``, ``n_pos``, ``n_neg``, ``clusters``,
        ``clusters_pos``, ``clusters_neg``, ``unit`` ("patient"), ``method``,
        ``note`` (None, or why there is no test).

    References
    ----------
    Obuchowski NA. Biometrics 1997;53:567-578.
    """
    alpha = check_alpha(alpha)
    y = np.asarray(y_true)
    a = np.asarray(score_a, dtype=float)
    b = np.asarray(score_b, dtype=float)
    if y.ndim != 1 or a.shape != y.shape or b.shape != y.shape:
        raise StatsError(f"y_true, score_a and score_b must be one-dimensional and aligned, got {y.shape}, "
                         f"{a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StatsError("score_a or score_b has missing or infinite values; drop those units first")
    y = _both_classes(y)
    codes = _codes(clusters, len(y))
    k = int(codes.max()) + 1
    cx, cy = codes[y], codes[~y]
    ta, a10, a01 = _cluster_sums(a[y], cx, a[~y], cy, k)
    tb, b10, b01 = _cluster_sums(b[y], cx, b[~y], cy, k)
    n, m = int(y.sum()), int((~y).sum())
    i10, i01 = len(np.unique(cx)), len(np.unique(cy))
    diff = ta - tb
    out = {"auc_a": ta, "auc_b": tb, "difference": diff, "se": math.nan, "z": math.nan, "p": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "n_pos": n, "n_neg": m, "clusters": k,
           "clusters_pos": i10, "clusters_neg": i01, "unit": "patient", "method": COMPARE_METHOD, "note": None}
    if i10 < 2 or i01 < 2:
        out["note"] = (f"no test: Obuchowski's variance needs at least 2 patients in each group "
                       f"(got {i10} and {i01})")
        return out
    var = _clustered_var(a10 - b10, a01 - b01, n, m, i10, i01, k)
    if not var > 0:
        out["note"] = "no test: the variance of the difference is zero (the two scores rank the units alike)"
        return out
    se = math.sqrt(var)
    q = z_quantile(alpha)
    out.update(se=se, z=diff / se, p=float(2.0 * _sps.norm.sf(abs(diff / se))), ci_low=diff - q * se,
               ci_high=diff + q * se)
    return out


def _wald(comp, alpha):
    var = comp["var"]
    theta = comp["theta"]
    if not math.isfinite(var):
        return {"se": math.nan, "ci_low": math.nan, "ci_high": math.nan, "z": math.nan, "p": math.nan,
                "df": math.nan,
                "note": (f"no standard error: Obuchowski's variance needs at least 2 patients in each "
                         f"group (got {comp['clusters1']} and {comp['clusters2']})")}
    se = math.sqrt(max(var, 0.0))
    df = comp["df"]
    low, high = logit_interval(theta, se, df, alpha)
    if theta in (0.0, 1.0):
        n = disjoint_comparisons(comp["clusters1"], comp["clusters2"], comp["clusters"])
        low, high = separation_interval(theta, n, alpha)
        return {"se": se, "ci_low": low, "ci_high": high, "z": math.nan, "p": math.nan, "df": df,
                "note": SEPARATION_NOTE + ": the interval is " + SEPARATION_CI.format(unit="patient", n=n)
                + "; no z test"}
    if se == 0.0:
        return {"se": se, "ci_low": math.nan, "ci_high": math.nan, "z": math.nan, "p": math.nan, "df": df,
                "note": "zero standard error: no logit interval and no z test"}
    note = None if math.isfinite(low) else f"no interval: {comp['clusters']} patients leave no t degrees of freedom"
    z = (theta - 0.5) / se
    return {"se": se, "ci_low": low, "ci_high": high, "z": z, "p": float(2.0 * _sps.norm.sf(abs(z))),
            "df": df, "note": note}


def cluster_permutations(codes, groups, n_permutations, rng):
    """Permuted group labels: each cluster's label vector moved whole to a cluster of the same size.

    Parameters
    ----------
    codes : ndarray of int
        Cluster of each unit; a cluster's units are taken in the order given.
    groups : ndarray
        Group label of each unit.
    n_permutations : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, shape (n_permutations, n_units)
        Row b holds the labels of permutation b: the units of cluster c get
        the labels of cluster pi_b(c), pi_b a uniform permutation of the
        clusters with as many units as c, in a uniformly shuffled order. The
        number of units of each group, and the multiset of the clusters'
        mixes of groups, is kept.

    Notes
    -----
    Valid (exchangeable under the null) when the clusters' labels are
    independent of their values given the cluster sizes and the units of a
    cluster are exchangeable; the labels may differ within a cluster.
    Without the shuffle within clusters the test was conservative with 15
    patients (3.7% at the 5% level; ``benchmarks/bench_clustered_null.py``).
    """
    groups = np.asarray(groups)
    codes = np.asarray(codes)
    out = np.empty((n_permutations, len(groups)), dtype=groups.dtype)
    _, first, sizes = np.unique(codes, return_index=True, return_counts=True)
    order = np.argsort(codes, kind="stable")        # units grouped by cluster, in given order
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for k in np.unique(sizes):
        which = np.flatnonzero(sizes == k)
        pos = order[starts[which][:, None] + np.arange(k)]          # (m, k) unit indices
        perms = np.argsort(rng.random((n_permutations, len(which))), axis=1)
        moved = groups[pos][perms]                                  # (B, m, k)
        if k > 1:   # and shuffled within the cluster
            moved = np.take_along_axis(moved, np.argsort(rng.random(moved.shape), axis=2), axis=2)
        out[:, pos.ravel()] = moved.reshape(n_permutations, -1)
    return out


def clustered_mw_permutation_p(values, in1, codes, n_permutations, rng, perms=None):
    """Two-sided cluster permutation p of theta = U/(n1 n2) (see :func:`cluster_permutations`).

    ``values`` are the units of both groups, ``in1`` marks group 1; ``perms``
    (optional) are permutations already drawn for this design. Returns
    ``(1 + #{|theta* - 1/2| >= |theta - 1/2|}) / (1 + B)``.
    """
    in1 = np.asarray(in1, dtype=bool)
    ranks = _sps.rankdata(values)
    n1 = int(in1.sum())
    n2 = len(in1) - n1
    if perms is None:
        perms = cluster_permutations(codes, in1, n_permutations, rng)
    n_permutations = len(perms)
    observed = abs(float(ranks[in1].sum()) - n1 * (n1 + 1) / 2 - n1 * n2 / 2)
    stats_ = np.abs(perms.astype(float) @ ranks - n1 * (n1 + 1) / 2 - n1 * n2 / 2)
    hits = int((stats_ >= observed - 1e-9 * max(1.0, observed)).sum())
    return (1 + hits) / (1 + n_permutations)


def group_differences_clustered(changes, labels, clusters, *, outcome_column="outcome",
                                contrasts=CONTRASTS, alpha=0.05, n_permutations=N_CLUSTER_PERMUTATIONS,
                                seed=0, primary=(WORSE, IMPROVED)):
    """Clustered Mann-Whitney test of the label changes, for each label and contrast.

    Parameters
    ----------
    changes : pandas.DataFrame
        One row per pair: the outcome and one column per label (change in
        probability), as for :func:`covreport.stats.compare_groups`.
    labels : sequence of str
    clusters : array_like
        Patient id of each row of ``changes``.
    outcome_column : str
    contrasts : sequence of (str, str)
    alpha : float
        1 - confidence level.
    n_permutations : int
        Cluster permutations per contrast, shared by its labels (>= 1).
    seed : int
        Seed of ``numpy.random.SeedSequence``; one child stream per contrast,
        whose permutations are shared by the labels with the same pairs.
        Pass the rows in canonical order (``pipeline.canonical_pairs``):
        a patient's pairs are permuted in the order given.
    primary : (str, str)
        The contrast labelled primary in ``analysis``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CLUSTERED_COLUMNS`: theta = P(change in group 1 >
        change in group 2) + P(tie)/2 (= U/(n1 n2)) with Obuchowski's
        clustered SE, its logit-t CI on ``df`` (:func:`satterthwaite_df`), z =
        (theta - 1/2)/SE with its normal ``p_wald``, and ``p`` the cluster
        permutation p, Holm and BH adjusted within each contrast; ``unit``
        "patient". A constant label has ``status`` "not tested: constant"
        and no p; complete separation keeps its permutation p.

    References
    ----------
    Obuchowski 1997; Holm 1979; Benjamini & Hochberg 1995.
    """
    alpha = check_alpha(alpha)
    labels = check_changes(changes, labels, outcome_column)
    codes = _codes(clusters, len(changes))
    n_permutations = int(n_permutations)
    if n_permutations < 1:
        raise StatsError(f"the cluster permutation test needs at least 1 permutation, got {n_permutations}")
    outcome = changes[outcome_column].to_numpy()
    streams = iter(np.random.SeedSequence(seed).spawn(len(contrasts)))
    method = CLUSTERED_MW_METHOD.replace("{B}", f"{n_permutations:,}")
    rows = []
    for group1, group2 in contrasts:
        contrast = f"{group1} vs {group2}"
        analysis = PRIMARY.format(contrast=contrast) if (group1, group2) == tuple(primary) else SECONDARY
        rng = np.random.default_rng(next(streams))
        drawn = {}   # the permutations of one design (pairs with a change), shared by the labels
        block = []
        in1, in2 = outcome == group1, outcome == group2
        for label in labels:
            v = pd.to_numeric(changes[label], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(v)
            m1, m2 = in1 & ok, in2 & ok
            row = {"contrast": contrast, "label": label, "group1": group1, "group2": group2,
                   "n1": int(m1.sum()), "n2": int(m2.sum()),
                   "clusters1": len(np.unique(codes[m1])), "clusters2": len(np.unique(codes[m2])),
                   "clusters": len(np.unique(codes[m1 | m2])),
                   "theta": math.nan, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                   "z": math.nan, "p": math.nan, "p_holm": math.nan, "p_bh": math.nan,
                   "unit": "patient", "method": method, "note": None,
                   "df": math.nan, "p_wald": math.nan, "p_method": None, "permutations": n_permutations,
                   "status": TESTED, "analysis": analysis}
            notes = []
            bad = int(((in1 | in2) & ~ok).sum())
            if bad:
                notes.append(f"{bad} missing change(s) left out")
            if row["n1"] == 0 or row["n2"] == 0:
                notes.append(f"not computed: {group1 if row['n1'] == 0 else group2} has no pair")
                row["status"] = "not tested: a group has no pair"
            elif is_constant(v[m1], v[m2]):
                notes.append("not tested: constant (the change is the same in every pair of the contrast); "
                             "left out of the Holm/BH family")
                row["status"] = NOT_TESTED_CONSTANT
            else:
                comp = obuchowski_components(v[m1], codes[m1], v[m2], codes[m2])
                res = _wald(comp, alpha)
                row["theta"] = comp["theta"]
                row.update({k: res[k] for k in ("se", "ci_low", "ci_high", "z", "df")})
                row["p_wald"] = res["p"]
                both = m1 | m2
                key = both.tobytes()
                if key not in drawn:
                    drawn[key] = cluster_permutations(codes[both], m1[both], n_permutations, rng)
                row["p"] = clustered_mw_permutation_p(v[both], m1[both], codes[both], n_permutations, rng,
                                                      perms=drawn[key])
                row["p_method"] = f"cluster permutation, {n_permutations:,} Monte Carlo permutations"
                if res["note"]:
                    notes.append(res["note"] + ("; the permutation p is valid and stays in the family"
                                                if "separation" in res["note"] else ""))
            row["note"] = "; ".join(notes) if notes else None
            block.append(row)
        adjust_within(block)
        rows.extend(block)
    return pd.DataFrame(rows, columns=list(CLUSTERED_COLUMNS))


# --------------------------------------------------------------------------- bootstrap


def resample_counts(n_clusters, n_resamples, seed, desc=None):
    """How many times each cluster is drawn in each resample: an (n_resamples, n_clusters) array.

    Each resample draws ``n_clusters`` clusters with replacement
    (``numpy.random.default_rng(seed).integers``, 500 resamples at a time),
    clusters in the order given.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, n_clusters))
    chunks = range(0, n_resamples, 500)
    for s in progress.bar(chunks, total=len(chunks), desc=desc, unit="500 resamples") if desc else chunks:
        b = min(500, n_resamples - s)
        draws = rng.integers(0, n_clusters, size=(b, n_clusters))
        flat = (np.arange(b)[:, None] * n_clusters + draws).ravel()
        counts[s:s + b] = np.bincount(flat, minlength=b * n_clusters).reshape(b, n_clusters)
    return counts


def _percentile(values, alpha):
    """Percentile interval of the finite values, and how many were not finite."""
    finite = np.isfinite(values)
    bad = int((~finite).sum())
    if finite.sum() == 0:
        return math.nan, math.nan, bad
    lo, hi = np.percentile(values[finite], [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), bad


def _metric_draws(tp, fp, fn, tn):
    """Prediction metrics of each resample from its 2x2 cells (NaN or inf where undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tp + fp + fn + tn
        se = tp / (tp + fn)
        sp = tn / (tn + fp)
        return {
            "accuracy": (tp + tn) / n, "sensitivity": se, "specificity": sp,
            "ppv": tp / (tp + fp), "npv": tn / (tn + fn), "balanced_accuracy": (se + sp) / 2,
            "lr_positive": se / (1 - sp), "lr_negative": (1 - se) / sp,
        }


def _weighted_medians(values, weights):
    """Median of each row's expanded sample: ``values`` (sorted, n) repeated ``weights`` (B, n) times."""
    total = weights.sum(axis=1)
    cum = np.cumsum(weights, axis=1)
    k1 = np.floor((total - 1) / 2)
    k2 = np.floor(total / 2)
    i1 = (cum > k1[:, None]).argmax(axis=1)
    i2 = (cum > k2[:, None]).argmax(axis=1)
    med = (values[i1] + values[i2]) / 2.0
    med[total == 0] = np.nan
    return med


def _per_cluster(codes, n_clusters, values=None):
    return np.bincount(codes, weights=values, minlength=n_clusters)


BOOTSTRAP_METHOD = (
    "patient-level cluster bootstrap: patients drawn with replacement (numpy default_rng(seed)), "
    "each with all its pairs, {n:,} resamples; percentile {level:g}% intervals over the resamples in "
    "which the quantity is estimable (Davison & Hinkley 1997, section 3.8); the out-of-fold "
    "predictions are resampled, the model is not refitted; a resample is not estimable when the "
    "quantity is undefined or infinite in it (e.g. no Improved pair drawn)"
)


#: How Cohen's d and Hedges' g get their cluster-bootstrap interval (added to BOOTSTRAP_METHOD for them).
BCA_NOTE = (
    "for Cohen's d and Hedges' g the bias-corrected and accelerated (BCa) interval (Efron 1987) instead of the "
    "percentile one: bias z0 from the share of resamples below the estimate, acceleration from the "
    "leave-one-patient-out jackknife; with 5 or 8 patients in one group it covered 89.0-93.8% against 86.5-93.0% "
    "for the percentile interval (benchmarks/bench_clustered_few.py), so it is not shown in the patient-clustered "
    "table"
)

#: What covreport's benchmarks measured for the clustered test and intervals (the report's Methods cite it):
#: benchmarks/bench_clustered_null.py (15 and 40 patients) and bench_clustered_few.py (5 or 8 against 28).
SIMULATION_CHECK = {
    "design": ("15 or 40 patients with 1 to 5 pairs each, or 5 or 8 patients with an Improved pair against 28 "
               "with Worse pairs only, normal or skewed changes, intra-patient correlation 0.5, 2,000 studies "
               "per design"),
    "few_design": ("5 or 8 patients with an Improved pair against 28 with Worse pairs only (normal or skewed "
                   "changes, intra-patient correlation 0.5, 2,000 studies per design)"),
    "size": "4.4-5.8%",
    "coverage": "94.5-96.6%",
    "g_bca": "89.0-93.8%",
}


def cluster_bootstrap(patients, prediction=None, changes=None, labels=(), *, n_resamples=2000, seed=0,
                      alpha=0.05, contrasts=CONTRASTS, outcome_column="outcome"):
    """Patient-level cluster bootstrap of the prediction metrics and the group differences.

    Parameters
    ----------
    patients : array_like
        Patient ids of the study (every analysed patient; the resampling
        unit). Patients are put in sorted order (as text) before drawing, so
        that the draws do not depend on row order.
    prediction : dict, optional
        ``{protocol: {"patient_id", "outcome" (1 = Worse), "predicted" (1 = Worse)}}``
        of arrays, one entry per pair (out-of-fold predictions).
    changes : pandas.DataFrame, optional
        One row per pair with ``patient_id``, the outcome column and the
        label change columns.
    labels : sequence of str
    n_resamples : int
        Number of resamples (>= 1).
    seed : int
    alpha : float
        1 - level of the percentile intervals.

    Returns
    -------
    dict
        ``{"resamples", "seed", "unit": "patient", "method", "prediction":
        {protocol: {metric: {"ci_low", "ci_high", "not_estimable"}}},
        "group_differences": [{"contrast", "label", "quantity", "estimate",
        "ci_low", "ci_high", "not_estimable", "interval", "unit", "method"}]}``;
        quantity is ``cohen_d`` (pooled SD, ddof 1), ``hedges_g`` or
        ``median_difference`` (median of group 1 minus median of group 2);
        ``interval`` is "percentile" for the prediction metrics and the
        difference of medians (which covered 93.6-96.3% in
        ``benchmarks/bench_clustered_few.py``) and "BCa" for d and g; each
        group record keeps both (``percentile_low``, ``percentile_high``,
        ``bca_low``, ``bca_high``, ``bias_z0``, ``acceleration``).

    References
    ----------
    Davison & Hinkley 1997, section 3.8; Field & Welsh 2007.
    """
    alpha = check_alpha(alpha)
    n_resamples = int(n_resamples)
    if n_resamples < 1:
        raise StatsError(f"the bootstrap needs at least 1 resample, got {n_resamples}")
    ids = pd.Series(np.asarray(patients, dtype=object)).astype(str)
    order = np.array(sorted(set(ids)), dtype=object)
    lookup = {p: i for i, p in enumerate(order)}
    G = len(order)
    level = round(100 * (1 - alpha), 6)
    method = BOOTSTRAP_METHOD.format(n=n_resamples, level=level)
    counts = resample_counts(G, n_resamples, seed, desc="Cluster bootstrap")

    def code(values):
        return np.array([lookup[str(v)] for v in values], dtype=np.int64)

    pred_out = {}
    for protocol, block in (prediction or {}).items():
        c = code(block["patient_id"])
        y = np.asarray(block["outcome"], dtype=bool)
        hit = np.asarray(block["predicted"], dtype=bool)
        cells = [_per_cluster(c, G, (hit & y).astype(float)), _per_cluster(c, G, (hit & ~y).astype(float)),
                 _per_cluster(c, G, (~hit & y).astype(float)), _per_cluster(c, G, (~hit & ~y).astype(float))]
        tp, fp, fn, tn = (counts @ cell for cell in cells)
        draws = _metric_draws(tp, fp, fn, tn)
        pred_out[protocol] = {}
        for metric in BOOTSTRAP_METRICS:
            lo, hi, bad = _percentile(draws[metric], alpha)
            pred_out[protocol][metric] = {"ci_low": lo, "ci_high": hi, "not_estimable": bad}

    groups_out = []
    if changes is not None and len(labels):
        c_all = code(changes["patient_id"])
        outcome = changes[outcome_column].to_numpy()
        for group1, group2 in contrasts:
            for label in labels:
                v = pd.to_numeric(changes[label], errors="coerce").to_numpy(dtype=float)
                ok = np.isfinite(v)
                sides = []
                for g in (group1, group2):
                    m = (outcome == g) & ok
                    vals, cg = v[m], c_all[m]
                    srt = np.argsort(vals, kind="stable")
                    sides.append((vals, cg, vals[srt], cg[srt]))
                groups_out.extend(_group_draws(counts, G, sides, group1, group2, label, alpha, method))
    return {"resamples": n_resamples, "seed": int(seed), "unit": "patient", "method": method,
            "prediction": pred_out, "group_differences": groups_out}


def _group_stats(counts, G, sides):
    """Cohen's d, Hedges' g and the difference in medians of each weighting of the clusters.

    ``counts`` (R, G) says how often each cluster is taken in each row (a
    bootstrap resample, a leave-one-cluster-out jackknife row, or ones for the
    sample itself); ``sides`` are the two groups' (values, codes, sorted
    values, their codes). Undefined values are NaN.
    """
    (x, cx, xs, cxs), (y, cy, ys, cys) = sides
    # Cohen's d from per-patient sums (n, sum, sum of squares) of values centred on the
    # pooled mean (d does not change; the sums of squares lose less to cancellation)
    centre = float(np.concatenate([x, y]).mean()) if len(x) + len(y) else 0.0
    xc, yc = x - centre, y - centre
    k1 = counts @ _per_cluster(cx, G)
    k2 = counts @ _per_cluster(cy, G)
    s1, s2 = counts @ _per_cluster(cx, G, xc), counts @ _per_cluster(cy, G, yc)
    q1, q2 = counts @ _per_cluster(cx, G, xc * xc), counts @ _per_cluster(cy, G, yc * yc)
    with np.errstate(divide="ignore", invalid="ignore"):
        ss = (q1 - s1 * s1 / k1) + (q2 - s2 * s2 / k2)
        pooled = ss / (k1 + k2 - 2)
        d = (s1 / k1 - s2 / k2) / np.sqrt(pooled)
        scale = (q1 + q2) / np.maximum(k1 + k2, 1)
        # a pooled SD of 0 (all values equal within each group) leaves d undefined
        d[(k1 < 2) | (k2 < 2) | ~(pooled > 1e-12 * scale)] = np.nan
        # Hedges' g = J d, J = 1 - 3/(4(n1 + n2) - 9) (Hedges & Olkin 1985), J from each row's pairs
        g = (1.0 - 3.0 / (4.0 * (k1 + k2) - 9.0)) * d
    if len(xs) and len(ys):   # difference in medians: weighted medians of the sorted values
        md = _weighted_medians(xs, counts[:, cxs]) - _weighted_medians(ys, counts[:, cys])
    else:
        md = np.full(len(counts), np.nan)
    return {"cohen_d": d, "hedges_g": g, "median_difference": md}


def bca_interval(draws, estimate, jackknife, alpha):
    """Bias-corrected and accelerated (BCa) bootstrap interval (Efron 1987; Davison & Hinkley 1997, 5.3.2).

    Parameters
    ----------
    draws : ndarray
        The statistic in each resample (non-finite values are left out).
    estimate : float
        The statistic in the sample.
    jackknife : ndarray
        The statistic with each resampling unit (here: patient) left out in turn.
    alpha : float

    Returns
    -------
    (low, high, not_estimable, z0, a)
        z0 = Phi^-1(#{draw < estimate} + #{draw = estimate}/2) / B), the
        proportion kept within [1/(B + 1), B/(B + 1)];
        a = sum(m - j_i)^3 / (6 (sum(m - j_i)^2)^(3/2)), m the mean of the
        jackknife values j_i (0 when they are all equal); the bounds are the
        Phi(z0 + (z0 + z)/(1 - a (z0 + z))) quantiles of the draws, z = -+z_(1-alpha/2).
    """
    finite = np.isfinite(draws)
    bad = int((~finite).sum())
    v = np.asarray(draws)[finite]
    jack = np.asarray(jackknife, dtype=float)
    jack = jack[np.isfinite(jack)]
    if not len(v) or not math.isfinite(estimate):
        return math.nan, math.nan, bad, math.nan, math.nan
    B = len(v)
    share = (np.sum(v < estimate) + 0.5 * np.sum(v == estimate)) / B
    z0 = float(_sps.norm.ppf(min(max(share, 1.0 / (B + 1)), B / (B + 1.0))))
    dev = jack.mean() - jack if len(jack) else np.zeros(1)
    ssq = float(dev @ dev)
    acc = float((dev ** 3).sum() / (6.0 * ssq ** 1.5)) if ssq > 0 else 0.0
    z = z_quantile(alpha)
    qs = []
    for zz in (-z, z):
        w = z0 + zz
        qs.append(float(_sps.norm.cdf(z0 + w / (1.0 - acc * w))))
    lo, hi = np.percentile(v, [100 * qs[0], 100 * qs[1]])
    return float(lo), float(hi), bad, z0, acc


def _group_draws(counts, G, sides, group1, group2, label, alpha, method):
    x, y = sides[0][0], sides[1][0]
    base = {"contrast": f"{group1} vs {group2}", "label": label, "unit": "patient", "method": method}
    draws = _group_stats(counts, G, sides)
    present = np.unique(np.concatenate([sides[0][1], sides[1][1]]))
    leave_out = np.ones((len(present), G))
    leave_out[np.arange(len(present)), present] = 0.0
    jack = _group_stats(leave_out, G, sides)
    est_d = math.nan
    if len(x) >= 2 and len(y) >= 2:
        pv = ((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2)
        if pv > 0:
            est_d = float((x.mean() - y.mean()) / math.sqrt(pv))
    n = len(x) + len(y)
    estimates = {"cohen_d": est_d,
                 "hedges_g": (1.0 - 3.0 / (4.0 * n - 9.0)) * est_d if n > 2 else math.nan,
                 "median_difference": float(np.median(x) - np.median(y)) if len(x) and len(y) else math.nan}
    out = []
    for quantity, est in estimates.items():
        lo, hi, bad = _percentile(draws[quantity], alpha)
        blo, bhi, _, z0, acc = bca_interval(draws[quantity], est, jack[quantity], alpha)
        rec = {**base, "quantity": quantity, "estimate": est, "ci_low": lo, "ci_high": hi, "not_estimable": bad,
               "interval": "percentile", "percentile_low": lo, "percentile_high": hi, "bca_low": blo,
               "bca_high": bhi, "bias_z0": z0, "acceleration": acc}
        if quantity != "median_difference":   # BCa for the standardised differences (see BCA_NOTE)
            rec.update(ci_low=blo, ci_high=bhi, interval="BCa", method=method + "; " + BCA_NOTE)
        out.append(rec)
    return out


def primary_analysis(patient_ids, contrast=None):
    """The primary endpoint: which contrast, and at which unit the report leads with it.

    The unit is the patient (clustered analyses) when any patient has several
    pairs, else the pair; the contrast is the one the authors declared
    (``study.toml`` ``primary_contrast``), by default Worse vs Improved, the
    comparison of the original study.

    Parameters
    ----------
    patient_ids : array_like
        Patient id of each analysed pair.
    contrast : str, optional
        ``"Worse vs Improved"`` (default), ``"Worse vs Stable"`` or ``"Stable vs Improved"``.

    Returns
    -------
    dict
        ``{"unit": "patient" | "pair", "reason": str, "contrast": str,
        "contrast_source": "study.toml" | "default", "endpoint": str}``.
    """
    source = "default" if contrast is None else "study.toml"
    contrast = CONTRAST_NAMES[0] if contrast is None else contrast
    if contrast not in CONTRAST_NAMES:
        raise StatsError(f"primary contrast {contrast!r} is not one of {', '.join(CONTRAST_NAMES)}")
    ids = pd.Series(np.asarray(patient_ids, dtype=object)).astype(str)
    per = ids.value_counts()
    several = int((per > 1).sum())
    if several:
        unit = "patient"
        reason = (f"{several} of {len(per)} patients contribute more than one analysed pair "
                  f"({len(ids)} pairs), so pairs are not independent: the patient-clustered "
                  "analyses (Obuchowski's clustered AUC and Mann-Whitney test, the patient-level "
                  "cluster bootstrap, Table 1 per patient) are primary; the pair-level results, "
                  "which replicate the original study, are secondary")
    else:
        unit = "pair"
        reason = (f"each of the {len(per)} patients contributes one analysed pair, so pairs are "
                  "independent and the pair-level analyses are primary (the clustered ones "
                  "coincide with them)")
    endpoint = (f"the change of each label's probability between the two CXRs, {contrast}, "
                + ("patients as clusters" if unit == "patient" else "pairs as units")
                + "; Holm adjustment across the labels of that contrast")
    return {"unit": unit, "reason": reason, "contrast": contrast, "contrast_source": source,
            "endpoint": endpoint}


__all__ = [
    "BOOTSTRAP_METRICS", "cluster_bootstrap", "cluster_permutations", "clustered_mw_permutation_p",
    "group_differences_clustered", "obuchowski_auc",
    "obuchowski_components", "primary_analysis", "resample_counts", "satterthwaite_df", "bca_interval",
]
