"""Area under the ROC curve with DeLong's variance, and per-label validation AUCs.

References
----------
DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more
correlated receiver operating characteristic curves: a nonparametric approach.
Biometrics 1988;44:837-845.

Sun X, Xu W. Fast implementation of DeLong's algorithm for comparing the areas
under correlated receiver operating characteristic curves. IEEE Signal
Processing Letters 2014;21:1389-1393.

Robin X et al. pROC: an open-source package for R and S+ to analyze and
compare ROC curves. BMC Bioinformatics 2011;12:77 (``ci.auc(method="delong")``
clips the Wald interval to [0, 1]: ``ci="wald"`` here, kept for replication).

Pepe MS. The Statistical Evaluation of Medical Tests for Classification and
Prediction. Oxford University Press 2003, section 5.2.3 (the logit-transformed
interval of the AUC, ``ci="logit"``, the default).
"""

import math

import numpy as np
import pandas as pd
from scipy import stats as _sps

from covreport.constants import DEFAULT_LABELS
from covreport.errors import ScoresError, StatsError
from covreport.stats._util import check_alpha, show, z_quantile

AUC_METHOD = ("DeLong (Sun & Xu 2014 fast algorithm); logit-transformed Wald CI "
              "expit(logit(AUC) +/- z SE/(AUC(1-AUC))), inside (0, 1) without clipping (Pepe 2003, 5.2.3); "
              "at AUC 0 or 1 (complete separation, SE 0) the exact Clopper-Pearson interval of N of N "
              "comparisons that share no case, N = min(positives, negatives)")
AUC_WALD_METHOD = "DeLong (Sun & Xu 2014 fast algorithm); Wald CI clipped to [0, 1] (as pROC ci.auc)"
AUC_CI_METHODS = {"logit": AUC_METHOD, "wald": AUC_WALD_METHOD}
SEPARATION_NOTE = ("complete separation (AUC = {auc:g}) makes DeLong's SE 0: the interval is the exact "
                   "Clopper-Pearson interval of {n:,} of {n:,} comparisons that share no case (conservative)")
ZERO_SE_NOTE = "no interval: DeLong's SE is 0 (the scores do not vary between the cases)"
TEST_METHOD = "DeLong test for two correlated AUCs (Sun & Xu 2014 fast algorithm), two-sided"

VALIDATION_COLUMNS = ("label", "n_pos", "n_neg", "auc", "se", "ci_low", "ci_high", "method", "note")


def _as_truth(y_true, name="y_true"):
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise StatsError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int8)
    try:
        yf = y.astype(float)
    except (TypeError, ValueError):
        raise StatsError(f"{name} must hold 0 (negative) and 1 (positive) only") from None
    if np.isnan(yf).any():
        i = int(np.flatnonzero(np.isnan(yf))[0])
        raise StatsError(f"{name} has missing values (first at position {i}); drop those rows first")
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StatsError(f"{name} must hold 0 (negative) and 1 (positive) only; "
                         f"position {i} holds {show(y[i])}")
    return yf.astype(np.int8)


def _as_score(score, n, name):
    s = np.asarray(score)
    if s.ndim != 1:
        raise StatsError(f"{name} must be one-dimensional, got shape {s.shape}")
    try:
        s = s.astype(float)
    except (TypeError, ValueError):
        raise StatsError(f"{name} must be numeric") from None
    if len(s) != n:
        raise StatsError(f"{name} has {len(s)} values but y_true has {n}; they must be aligned")
    if np.isnan(s).any():
        i = int(np.flatnonzero(np.isnan(s))[0])
        raise StatsError(f"{name} has missing values (first at position {i}); drop those rows first")
    return s


def _check_classes(y):
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        only = "positive (1)" if n_neg == 0 else "negative (0)"
        raise StatsError(f"the AUC needs both classes, but all {len(y)} cases are {only}")
    return n_pos, n_neg


def _delong_components(y, scores):
    """AUCs and their DeLong covariance matrix for k scores (Sun & Xu 2014).

    Parameters
    ----------
    y : ndarray of int, shape (n,)
        0/1 truth.
    scores : ndarray, shape (k, n)

    Returns
    -------
    aucs : ndarray, shape (k,)
    cov : ndarray, shape (k, k)
        DeLong covariance S10/m + S01/n; NaN when a class has a single case.
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    # Midranks (average ranks of ties) within each class and in the pooled sample.
    tx = _sps.rankdata(pos, axis=1)
    ty = _sps.rankdata(neg, axis=1)
    tz = _sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    # Structural components: V10 (per positive) and V01 (per negative).
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    k = scores.shape[0]
    if m < 2 or n < 2:
        return aucs, np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def _check_ci(ci):
    if ci not in AUC_CI_METHODS:
        raise StatsError(f"ci must be one of {', '.join(AUC_CI_METHODS)}, got {show(ci)}")
    return ci


def _interval(auc, se, alpha, ci, n_pos, n_neg):
    """(low, high, note) of the DeLong interval; see :func:`delong_auc`."""
    from covreport.stats.effect_sizes import disjoint_comparisons, logit_interval, separation_interval

    if ci == "wald":
        z = z_quantile(alpha)
        return max(0.0, auc - z * se), min(1.0, auc + z * se), ""
    if not (0.0 < auc < 1.0):
        n = disjoint_comparisons(n_pos, n_neg)
        return (*separation_interval(auc, n, alpha), SEPARATION_NOTE.format(auc=auc, n=n))
    if not se > 0:
        return math.nan, math.nan, ZERO_SE_NOTE
    return (*logit_interval(auc, se, math.inf, alpha), "")


def delong_auc(y_true, y_score, alpha=0.05, ci="logit"):
    """AUC with DeLong's standard error and a confidence interval.

    The AUC is P(score of a positive > score of a negative) + 0.5 P(tie),
    computed from midranks. Its variance is DeLong's (1988), computed with the
    O(n log n) algorithm of Sun & Xu (2014). The default interval (``ci="logit"``)
    is expit(logit(AUC) +/- z SE / (AUC (1 - AUC))) (Pepe 2003): inside (0, 1)
    without clipping. At an AUC of 0 or 1 (complete separation) the SE is 0
    and a Wald interval has zero width: the interval is then the exact
    Clopper-Pearson interval of N of N comparisons that share no case, N =
    min(positives, negatives) (:func:`covreport.stats.effect_sizes.separation_interval`;
    conservative), and ``note`` says so. ``ci="wald"`` gives
    AUC +/- z * SE clipped to [0, 1], as pROC's ``ci.auc(method="delong")``.
    Higher scores mean positive; the direction is never guessed.

    Parameters
    ----------
    y_true : array-like of 0/1 (or bool), shape (n,)
        1 is the positive class.
    y_score : array-like of float, shape (n,)
    alpha : float
        1 - confidence level.
    ci : {"logit", "wald"}
        The interval (above).

    Returns
    -------
    dict
        ``auc``, ``se``, ``ci_low``, ``ci_high``, ``n_pos``, ``n_neg``,
        ``method`` and ``note`` ("" unless there is no interval: the SE is
        undefined because a class holds a single case (se NaN, CI NaN), or
        the AUC is 0 or 1 with ``ci="logit"`` (the exact interval above)).

    Raises
    ------
    StatsError
        One class only, values other than 0/1 in ``y_true``, missing values,
        or misaligned inputs.

    References
    ----------
    DeLong et al., Biometrics 1988;44:837-845. Sun & Xu, IEEE Signal
    Processing Letters 2014;21:1389-1393.
    """
    alpha = check_alpha(alpha)
    ci = _check_ci(ci)
    y = _as_truth(y_true)
    s = _as_score(y_score, len(y), "y_score")
    n_pos, n_neg = _check_classes(y)
    aucs, cov = _delong_components(y, s[np.newaxis, :])
    auc = float(aucs[0])
    var = float(cov[0, 0])
    note = ""
    if math.isnan(var):
        se = low = high = math.nan
        note = (f"no standard error: DeLong's variance needs at least 2 positives and 2 negatives "
                f"(got {n_pos} and {n_neg})")
    else:
        se = math.sqrt(max(var, 0.0))
        low, high, note = _interval(auc, se, alpha, ci, n_pos, n_neg)
    return {"auc": auc, "se": se, "ci_low": low, "ci_high": high,
            "n_pos": n_pos, "n_neg": n_neg, "method": AUC_CI_METHODS[ci], "note": note}


def delong_test(y_true, score_a, score_b):
    """DeLong's test of two correlated AUCs measured on the same cases.

    z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab), two-sided normal p.

    Parameters
    ----------
    y_true : array-like of 0/1, shape (n,)
    score_a, score_b : array-like of float, shape (n,)

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``difference`` (a - b), ``se``, ``z``, ``p``,
        ``method`` and ``note`` ("" unless z is undefined, e.g. identical
        scores or a class with a single case).

    References
    ----------
    DeLong et al., Biometrics 1988;44:837-845. Sun & Xu 2014.
    """
    y = _as_truth(y_true)
    a = _as_score(score_a, len(y), "score_a")
    b = _as_score(score_b, len(y), "score_b")
    n_pos, n_neg = _check_classes(y)
    aucs, cov = _delong_components(y, np.vstack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    note = ""
    if math.isnan(var):
        se = z = p = math.nan
        note = (f"no test: DeLong's variance needs at least 2 positives and 2 negatives "
                f"(got {n_pos} and {n_neg})")
    elif var <= 1e-15 * max(1.0, float(cov[0, 0] + cov[1, 1])):
        se = math.sqrt(max(var, 0.0))
        z = p = math.nan
        note = "no test: the variance of the difference is zero (the two scores rank the cases alike)"
    else:
        se = math.sqrt(var)
        z = diff / se
        p = float(2.0 * _sps.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff,
            "se": se, "z": z, "p": p, "method": TEST_METHOD, "note": note}


def roc_curve_points(y_true, y_score):
    """False- and true-positive rates of the empirical ROC curve, for figures.

    A thin layer over :func:`sklearn.metrics.roc_curve` (higher score =
    positive) with this module's input checks.

    Returns
    -------
    fpr, tpr : ndarray
    """
    from sklearn.metrics import roc_curve

    y = _as_truth(y_true)
    s = _as_score(y_score, len(y), "y_score")
    _check_classes(y)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def validation_auc(truth, scores, labels=None, *, alpha=0.05, ci="logit"):
    """Per-label AUC with DeLong CI on a labelled validation set.

    Parameters
    ----------
    truth : pandas.DataFrame
        One row per image, one column per label holding 1 (positive),
        0 (negative), -1 (uncertain) or blank/NaN (not mentioned), as in
        CheXpert's ``valid.csv``.
    scores : pandas.DataFrame
        The model's probabilities, one column per label, aligned row by row
        with ``truth`` (row i is the same image).
    labels : sequence of str, optional
        Labels to analyse, in order (default: the study's 10 labels).
    alpha : float
        1 - confidence level.
    ci : {"logit", "wald"}
        The interval, as in :func:`delong_auc`.

    Returns
    -------
    pandas.DataFrame
        Columns label, n_pos, n_neg, auc, se, ci_low, ci_high, method, note.
        Only rows with truth 0 or 1 and a score enter a label's AUC; the note
        says how many uncertain, blank or unscored rows were left out. A label
        with fewer than 2 positives or 2 negatives is not estimable (NaN AUC,
        reason in note).

    Raises
    ------
    ScoresError
        A label column missing from either frame, truth values other than
        1, 0, -1 or blank, or frames of different lengths.
    """
    alpha = check_alpha(alpha)
    ci = _check_ci(ci)
    labels = list(DEFAULT_LABELS if labels is None else labels)
    if len(truth) != len(scores):
        raise ScoresError(f"validation truth has {len(truth)} rows but the scores have {len(scores)}; "
                          "they must be aligned row by row (row i is the same image)")
    for frame, what in ((truth, "validation truth"), (scores, "validation scores")):
        missing = [lab for lab in labels if lab not in frame.columns]
        if missing:
            raise ScoresError(f"{what} lack label column(s) {missing}; "
                              f"present: {list(frame.columns)}")
    rows = []
    for label in labels:
        t = pd.to_numeric(truth[label], errors="coerce").to_numpy(dtype=float)
        raw = truth[label].to_numpy()
        blank_raw = pd.isna(truth[label]).to_numpy() | (truth[label].astype(str).str.strip() == "").to_numpy()
        bad = (np.isnan(t) & ~blank_raw) | (~np.isnan(t) & ~np.isin(t, (1.0, 0.0, -1.0)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ScoresError(f"validation truth column {label!r}, row {i}: {show(raw[i])} is not "
                              "1 (positive), 0 (negative), -1 (uncertain) or blank")
        s = pd.to_numeric(scores[label], errors="coerce").to_numpy(dtype=float)
        known = np.isin(t, (0.0, 1.0))
        scored = ~np.isnan(s)
        use = known & scored
        n_unc = int((t == -1.0).sum())
        n_blank = int(np.isnan(t).sum())
        n_unscored = int((known & ~scored).sum())
        left = []
        if n_unc:
            left.append(f"{n_unc} uncertain (-1)")
        if n_blank:
            left.append(f"{n_blank} blank")
        if n_unscored:
            left.append(f"{n_unscored} without a score")
        notes = [f"left out: {', '.join(left)}"] if left else []
        y = t[use].astype(np.int8)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        row = {"label": label, "n_pos": n_pos, "n_neg": n_neg, "auc": math.nan, "se": math.nan,
               "ci_low": math.nan, "ci_high": math.nan, "method": AUC_CI_METHODS[ci]}
        if n_pos < 2 or n_neg < 2:
            notes.insert(0, f"not estimable: {n_pos} positive(s) and {n_neg} negative(s); "
                            "at least 2 of each are needed")
        else:
            res = delong_auc(y, s[use], alpha=alpha, ci=ci)
            row.update({k: res[k] for k in ("auc", "se", "ci_low", "ci_high")})
            if res["note"]:
                notes.insert(0, res["note"])
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(VALIDATION_COLUMNS))
