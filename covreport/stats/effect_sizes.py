"""Effect sizes that fit the Mann-Whitney test: Hodges-Lehmann shift, rank-biserial r, Hedges' g.

- :func:`hodges_lehmann`: the median of all differences x_i - y_j with the
  distribution-free interval of Bauer (1972) / Hollander & Wolfe, computed as
  R's ``wilcox.test(x, y, conf.int = TRUE)`` does (order statistics of the
  differences at the exact Mann-Whitney quantiles; with ties or 50 or more
  values in a group, the roots of the continuity-corrected normal statistic);
- :func:`rank_biserial`: r = 2 theta - 1 with theta = U/(n1 n2), its interval
  the logit-transformed interval of theta (:func:`logit_interval`);
- :func:`hedges_g`: Cohen's d times Hedges' correction J = 1 - 3/(4(n1+n2) - 9),
  with the interval from inverting the noncentral t distribution.

:func:`mw_null_counts` is the exact null distribution of U (the Gaussian
binomial coefficients), shared with the Jonckheere-Terpstra test.

References
----------
.. [1] Bauer DF. Constructing confidence sets using rank statistics. J Am Stat
   Assoc 1972;67:687-690.
.. [2] Hollander M, Wolfe DA, Chicken E. Nonparametric Statistical Methods,
   3rd ed. Wiley 2014, section 4.3.
.. [3] Hodges JL, Lehmann EL. Estimates of location based on rank tests. Ann
   Math Stat 1963;34:598-611.
.. [4] Kerby DS. The simple difference formula. Compr Psychol 2014;3:11.IT.3.1.
.. [5] Hedges LV, Olkin I. Statistical Methods for Meta-Analysis. Academic
   Press 1985, chapter 5.
.. [6] Steiger JH, Fouladi RT. Noncentrality interval estimation. In: What if
   there were no significance tests? 1997:221-257.
.. [7] Qin G, Hotilovac L. Comparison of non-parametric confidence intervals
   for the area under the ROC curve of a continuous-scale diagnostic test.
   Stat Methods Med Res 2008;17:207-221 (the logit interval).
"""

import math
from functools import lru_cache

import numpy as np
from scipy import optimize as _opt
from scipy import stats as sps

from covreport.stats._util import check_alpha

#: Method strings of the three effect sizes.
HL_METHOD = (
    "Hodges-Lehmann shift: median of the n1 n2 differences (group 1 minus group 2), Hodges & Lehmann 1963; "
    "distribution-free CI of Bauer 1972 / Hollander & Wolfe (2014, section 4.3) as R's "
    "wilcox.test(x, y, conf.int = TRUE): order statistics of the differences at the exact Mann-Whitney "
    "quantiles when both groups have fewer than 50 values and no ties, otherwise the shifts at which the "
    "continuity- and tie-corrected normal statistic equals -/+ z"
)
RB_METHOD = (
    "rank-biserial r = 2 theta - 1 (Kerby 2014), theta = U/(n1 n2) = P(group 1 > group 2) + P(tie)/2; "
    "CI = 2 x (logit-transformed interval of theta: logit(theta) +/- t(n1+n2-2) SE/(theta(1-theta)), "
    "SE from DeLong's placement values, pairs independent) - 1; at theta 0 or 1 (complete separation, SE 0) "
    "2 x (the exact Clopper-Pearson interval of N of N comparisons that share no pair, N = min(n1, n2)) - 1"
)
G_METHOD = (
    "Hedges' g = J d, d = (mean1 - mean2) / pooled SD (ddof 1), J = 1 - 3/(4(n1+n2) - 9) (Hedges & Olkin 1985, "
    "as pingouin.compute_effsize(eftype='hedges')); CI from inverting the noncentral t distribution of "
    "t = d sqrt(n1 n2/(n1+n2)) on n1+n2-2 df (Steiger & Fouladi 1997), times J"
)


@lru_cache(maxsize=256)
def _counts(m, n):
    # coefficients of the Gaussian binomial [m+n choose m]_q = prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i)
    size = m * n + 1
    c = [0] * size
    c[0] = 1
    for i in range(1, m + 1):
        k = n + i
        for u in range(size - 1, k - 1, -1):   # times (1 - q^k)
            c[u] -= c[u - k]
        for u in range(i, size):               # divided by (1 - q^i)
            c[u] += c[u - i]
    return tuple(c)


def mw_null_counts(m, n):
    """Exact null distribution of the Mann-Whitney U for sample sizes ``m`` and ``n`` (no ties).

    Returns
    -------
    tuple of int
        ``counts[u]`` = number of the C(m+n, m) arrangements with U = u,
        u = 0 ... m n (the coefficients of the Gaussian binomial coefficient).

    Examples
    --------
    >>> mw_null_counts(2, 2)
    (1, 1, 2, 1, 1)
    """
    m, n = int(m), int(n)
    if m > n:
        m, n = n, m
    return _counts(m, n)


def _qwilcox(p, m, n):
    """R's ``qwilcox(p, m, n)``: smallest q with P(U <= q) >= p (R's fuzz 1 - 64 eps)."""
    counts = mw_null_counts(m, n)
    total = sum(counts)
    target = p * total * (1 - 64 * np.finfo(float).eps)
    cum = 0
    for q, c in enumerate(counts):
        cum += c
        if cum >= target:
            return q
    return len(counts) - 1


def _pwilcox(q, m, n):
    counts = mw_null_counts(m, n)
    return sum(counts[: int(q) + 1]) / sum(counts) if q >= 0 else 0.0


def _asymptotic_root(x, y, zq):
    """R's wilcox.test(conf.int = TRUE) asymptotic bound: the shift d where the corrected z equals zq."""
    n1, n2 = len(x), len(y)

    def wdiff(d):
        dr = np.concatenate([x - d, y])
        ranks = sps.rankdata(dr)
        dz = ranks[:n1].sum() - n1 * (n1 + 1) / 2 - n1 * n2 / 2
        _, ties = np.unique(dr, return_counts=True)
        sigma = math.sqrt((n1 * n2 / 12) * ((n1 + n2 + 1) - (ties ** 3 - ties).sum() / ((n1 + n2) * (n1 + n2 - 1))))
        return (dz - np.sign(dz) * 0.5) / sigma - zq

    lo, hi = float(x.min() - y.max()), float(x.max() - y.min())
    f_lo, f_hi = wdiff(lo), wdiff(hi)
    if f_lo <= 0:
        return lo
    if f_hi >= 0:
        return hi
    return float(_opt.brentq(wdiff, lo, hi, xtol=1e-10))


def hodges_lehmann(x, y, alpha=0.05):
    """Hodges-Lehmann shift (group 1 minus group 2) with its distribution-free CI.

    Parameters
    ----------
    x, y : array_like
        The two samples (finite values, at least 2 each).
    alpha : float
        1 - confidence level.

    Returns
    -------
    dict
        ``estimate`` (median of the differences x_i - y_j), ``ci_low``,
        ``ci_high``, ``ci_method`` ("exact" or "normal approximation with
        continuity correction"), ``conf_level`` (achieved level of the exact
        interval, which is discrete), ``note``.

    Notes
    -----
    Exact (both groups < 50, no ties): with k = ``qwilcox(alpha/2, n1, n2)``
    (1 when 0), the CI is [D_(k), D_(n1 n2 - k + 1)] of the sorted
    differences D (Bauer 1972); its level is 1 - 2 P(U <= k - 1). Otherwise
    the bounds solve (U(d) - n1 n2/2 -/+ 1/2)/sigma(d) = +/- z, U(d) the U of
    x - d against y (as R). The estimate is always the median of the
    differences (R's asymptotic branch reports its own root instead).

    Examples
    --------
    R's example in ``?wilcox.test`` (Hollander & Wolfe 1973, p. 69f.); R gives
    0.305 (-0.15, 0.76):

    >>> r = hodges_lehmann([0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46],
    ...                    [1.15, 0.88, 0.90, 0.74, 1.21])
    >>> round(r["estimate"], 3), round(r["ci_low"], 3), round(r["ci_high"], 3)
    (0.305, -0.15, 0.76)
    """
    alpha = check_alpha(alpha)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n1, n2 = len(x), len(y)
    diffs = np.sort(np.subtract.outer(x, y).ravel())
    est = float(np.median(diffs))
    tied = len(np.unique(np.concatenate([x, y]))) < n1 + n2
    if n1 < 50 and n2 < 50 and not tied:
        qu = _qwilcox(alpha / 2, n1, n2)
        qu = qu if qu > 0 else 1
        ql = n1 * n2 - qu
        achieved = 2 * _pwilcox(qu - 1, n1, n2)
        note = None
        if achieved - alpha > alpha / 2:
            note = (f"the requested {100 * (1 - alpha):g}% level is not achievable with n = {n1} and {n2}: "
                    f"the interval's level is {100 * (1 - achieved):.3g}%")
        return {"estimate": est, "ci_low": float(diffs[qu - 1]), "ci_high": float(diffs[ql]),
                "ci_method": "exact", "conf_level": 1 - achieved, "note": note}
    if np.ptp(np.concatenate([x, y])) == 0:
        return {"estimate": est, "ci_low": math.nan, "ci_high": math.nan,
                "ci_method": "normal approximation with continuity correction", "conf_level": math.nan,
                "note": "no interval: all values are equal"}
    zq = float(sps.norm.ppf(1 - alpha / 2))
    low, high = _asymptotic_root(x, y, zq), _asymptotic_root(x, y, -zq)
    return {"estimate": est, "ci_low": low, "ci_high": high,
            "ci_method": "normal approximation with continuity correction", "conf_level": 1 - alpha,
            "note": None}


def logit_interval(theta, se, df, alpha=0.05):
    """Logit-transformed interval of a probability (an AUC, a probability of superiority) with a t reference.

    ``expit(logit(theta) -/+ t_{df, 1-alpha/2} se / (theta (1 - theta)))``,
    the normal quantile when ``df`` is infinite: always inside (0, 1), never
    clipped; NaN when theta is 0 or 1, se is not positive or df < 1.

    Returns
    -------
    (float, float)
    """
    if not (0.0 < theta < 1.0) or not (se > 0) or not (df >= 1) or not math.isfinite(se):
        return math.nan, math.nan
    q = sps.norm.ppf(1 - alpha / 2) if math.isinf(df) else sps.t.ppf(1 - alpha / 2, df)
    centre = math.log(theta / (1.0 - theta))
    half = float(q) * se / (theta * (1.0 - theta))
    return 1.0 / (1.0 + math.exp(-(centre - half))), 1.0 / (1.0 + math.exp(-(centre + half)))


def separation_interval(theta, n_comparisons, alpha=0.05):
    """Exact interval of a probability of superiority at complete separation (theta 0 or 1).

    There the SE is 0 and a Wald or logit interval has zero width or none.
    Any ``n_comparisons`` = N comparisons that share no unit (no patient, when
    clustered) are N independent Bernoulli(theta) trials, and at separation
    all N favour the same group, so the Clopper-Pearson interval for N of N,
    ``((alpha/2)^(1/N), 1)`` (mirrored at theta 0), is exact and conservative
    (it ignores the other comparisons). NaN for another theta or N < 1.

    Returns
    -------
    (float, float)

    References
    ----------
    Clopper CJ, Pearson ES. Biometrika 1934;26:404-413.
    """
    if theta not in (0.0, 1.0) or not n_comparisons >= 1:
        return math.nan, math.nan
    low = (alpha / 2.0) ** (1.0 / n_comparisons)
    return (low, 1.0) if theta == 1.0 else (0.0, 1.0 - low)


def disjoint_comparisons(units1, units2, units=None):
    """How many comparisons of a group-1 with a group-2 unit can share no unit.

    ``units1`` and ``units2`` count the units (patients) with an observation
    in each group, ``units`` those in either (``units1 + units2`` when no unit
    is in both): min(units1, units2, units // 2).
    """
    units = units1 + units2 if units is None else units
    return int(min(units1, units2, units // 2))


SEPARATION_CI = "the exact Clopper-Pearson interval of {n:,} of {n:,} comparisons that share no {unit} (conservative)"


def _delong_var(x, y):
    """theta = U/(n1 n2) and DeLong's variance (units independent)."""
    n1, n2 = len(x), len(y)
    ys, xs = np.sort(y), np.sort(x)
    v10 = (np.searchsorted(ys, x, "left") + np.searchsorted(ys, x, "right")) / (2.0 * n2)
    v01 = ((n1 - np.searchsorted(xs, y, "right")) + (n1 - np.searchsorted(xs, y, "left"))) / (2.0 * n1)
    return float(v10.mean()), float(v10.var(ddof=1) / n1 + v01.var(ddof=1) / n2)


def rank_biserial(x, y, alpha=0.05):
    """Rank-biserial correlation r = 2 U/(n1 n2) - 1 with the logit-transformed CI.

    Returns
    -------
    dict
        ``r``, ``ci_low``, ``ci_high``, ``note`` (why the interval is missing:
        complete separation, theta = 0 or 1).
    """
    alpha = check_alpha(alpha)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    theta, var = _delong_var(x, y)
    low, high = logit_interval(theta, math.sqrt(max(var, 0.0)), len(x) + len(y) - 2, alpha)
    note = None
    if theta in (0.0, 1.0):
        n = disjoint_comparisons(len(x), len(y))
        low, high = separation_interval(theta, n, alpha)
        note = ("complete separation of the groups (r = \u22121 or 1): the rank-biserial interval is twice "
                + SEPARATION_CI.format(unit="pair", n=n) + " minus 1")
    elif not math.isfinite(low):
        note = "no interval for the rank-biserial r: zero standard error"
    return {"r": 2 * theta - 1, "ci_low": 2 * low - 1, "ci_high": 2 * high - 1, "note": note}


def _ncp_bound(t, df, p):
    """Noncentrality ncp with P(T <= t | df, ncp) = p (noncentral t is decreasing in ncp)."""
    if t < 0:  # P(T <= t | ncp) = 1 - P(T <= -t | -ncp): scipy's nct is accurate for t >= 0
        return -_ncp_bound(-t, df, 1.0 - p)

    def f(ncp):
        value = float(sps.nct.cdf(t, df, ncp))
        if not math.isfinite(value):  # far tails: the cdf is 0 (ncp >> t) or 1 (ncp << t)
            value = 0.0 if ncp > t else 1.0
        return value - p

    lo, hi, step = t - 1.0, t + 1.0, 1.0
    while f(lo) < 0:
        step *= 2
        lo = t - step
    step = 1.0
    while f(hi) > 0:
        step *= 2
        hi = t + step
    return float(_opt.brentq(f, lo, hi, xtol=1e-12))


def hedges_g(x, y, alpha=0.05):
    """Hedges' g (small-sample corrected Cohen's d) with the noncentral-t CI.

    Parameters
    ----------
    x, y : array_like
        The two samples; g is positive when ``x`` has the larger mean.
    alpha : float
        1 - confidence level.

    Returns
    -------
    dict
        ``g``, ``ci_low``, ``ci_high``, ``note`` (NaN with the reason when a
        group has fewer than 2 values or the pooled SD is 0).

    Notes
    -----
    d = (m1 - m2)/s_pooled, J = 1 - 3/(4(n1+n2) - 9), g = J d. With
    t = d sqrt(n1 n2/(n1+n2)) and df = n1+n2-2, the CI of the noncentrality
    (ncp_L, ncp_U) solves P(T <= t | ncp_L) = 1 - alpha/2 and
    P(T <= t | ncp_U) = alpha/2 (scipy.stats.nct); the CI of g is
    J ncp sqrt((n1+n2)/(n1 n2)).
    """
    alpha = check_alpha(alpha)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n1, n2 = len(x), len(y)
    if n1 < 2 or n2 < 2:
        return {"g": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "note": "Hedges' g needs at least 2 values per group"}
    var = ((n1 - 1) * x.var(ddof=1) + (n2 - 1) * y.var(ddof=1)) / (n1 + n2 - 2)
    if (np.ptp(x) == 0 and np.ptp(y) == 0) or not var > 0:
        return {"g": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "note": "Hedges' g is undefined: the pooled SD is 0 (all values equal within each group)"}
    d = float((x.mean() - y.mean()) / math.sqrt(var))
    j = 1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)
    scale = math.sqrt(n1 * n2 / (n1 + n2))
    t, df = d * scale, n1 + n2 - 2
    low = _ncp_bound(t, df, 1 - alpha / 2) / scale
    high = _ncp_bound(t, df, alpha / 2) / scale
    return {"g": j * d, "ci_low": j * low, "ci_high": j * high, "note": None}


__all__ = ["hedges_g", "hodges_lehmann", "logit_interval", "mw_null_counts", "rank_biserial"]
