"""Group comparisons of the change in each label's probability.

For every pair the change of a label is its probability on the second CXR
minus on the first. :func:`compare_groups` compares the changes of two outcome
groups (Worse vs Improved, Worse vs Stable, Stable vs Improved) label by label
with a two-sided Mann-Whitney U test (exact or normal approximation by R's
wilcox.test rule) with, beside it, the Hodges-Lehmann shift, the rank-biserial
r and Hedges' g, each with its CI (:mod:`covreport.stats.effect_sizes`; Cohen's
d is kept), and adjusts the p-values across labels within each contrast (Holm;
Benjamini-Hochberg). A label whose change is the same in every pair of a
contrast is not tested and is not in that contrast's family (status "not
tested: constant"); complete separation keeps its exact p and stays in.

References
----------
.. [1] Mann HB, Whitney DR. On a test of whether one of two random variables
   is stochastically larger than the other. Ann Math Stat 1947;18:50-60.
.. [2] Kerby DS. The simple difference formula: an approach to teaching
   nonparametric correlation. Compr Psychol 2014;3:11.IT.3.1.
.. [3] Cohen J. Statistical Power Analysis for the Behavioral Sciences, 2nd ed.
   1988.
.. [4] Hedges LV, Olkin I. Statistical Methods for Meta-Analysis. 1985,
   chapter 5 (large-sample variance of d).
.. [5] Holm S. A simple sequentially rejective multiple test procedure.
   Scand J Stat 1979;6:65-70.
.. [6] Benjamini Y, Hochberg Y. Controlling the false discovery rate. J R Stat
   Soc B 1995;57:289-300.
"""

import math

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from covreport.constants import CONTRASTS
from covreport.errors import StatsError
from covreport.stats._util import check_alpha, z_quantile
from covreport.stats.effect_sizes import (
    G_METHOD, HL_METHOD, RB_METHOD, hedges_g, hodges_lehmann, rank_biserial,
)

#: Columns of the table :func:`compare_groups` returns, in order.
GROUP_COLUMNS = (
    "contrast", "label", "group1", "group2", "n1", "n2",
    "median1", "median2", "mean1", "mean2",
    "U", "p", "mw_method", "mw_rule", "rank_biserial",
    "cohen_d", "d_ci_low", "d_ci_high", "d_method",
    "p_holm", "p_bh", "unit", "method", "note",
    "status", "analysis",
    "hl_shift", "hl_ci_low", "hl_ci_high", "hl_ci_method", "hl_conf_level", "hl_method",
    "rb_ci_low", "rb_ci_high", "rb_method",
    "hedges_g", "g_ci_low", "g_ci_high", "g_method",
)

#: ``status`` values: tested, or why not.
TESTED = "tested"
NOT_TESTED_CONSTANT = "not tested: constant"
NOT_TESTED_SMALL = "not tested: too few pairs"

#: ``analysis`` of every pair-level record.
SECONDARY = "secondary: pairs treated as independent, as in the original study"

#: Smallest group size for which the tests and effect sizes are computed.
MIN_GROUP_SIZE = 2

#: Which p-value method runs: R's ``wilcox.test`` default rule.
MW_RULE = (
    "R's wilcox.test default: exact when both groups have fewer than 50 values and there are "
    "no ties, otherwise the normal approximation with tie and continuity correction"
)

#: ``mw_method`` values.
MW_EXACT = "exact"
MW_NORMAL = "normal approximation with continuity correction"

#: Text of the ``method`` column (the whole test, effect sizes and adjustment).
METHOD = (
    "Two-sided Mann-Whitney U test (scipy.stats.mannwhitneyu; " + MW_RULE + "); "
    "pairs counted as independent; "
    "U is the first-named group's; rank-biserial r = 2U/(n1 n2) - 1 (Kerby 2014); "
    "p adjusted across labels within the contrast by Holm and by Benjamini-Hochberg "
    "(statsmodels multipletests); a label whose change is the same in every pair of the contrast is "
    "not tested and not in the family"
)


def _d_method(alpha):
    level = round(100 * (1 - alpha), 6)
    return (
        f"Cohen's d = (mean1 - mean2) / pooled SD (ddof 1); {level:g}% CI by the normal "
        "approximation d +/- z * sqrt((n1+n2)/(n1 n2) + d^2/(2(n1+n2))) (Hedges & Olkin 1985)"
    )


def mannwhitney_method(x, y):
    """Name the p-value method of R's ``wilcox.test`` default for samples ``x`` and ``y``.

    R (``stats:::wilcox.test.default``, ``exact = NULL``, ``correct = TRUE``)
    computes the exact distribution when both groups have fewer than 50
    values and the pooled values hold no tie; otherwise the normal
    approximation with tie and continuity correction.

    Parameters
    ----------
    x, y : array_like
        The two samples (no missing values).

    Returns
    -------
    str
        :data:`MW_EXACT` or :data:`MW_NORMAL`.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) >= 50 or len(y) >= 50:
        return MW_NORMAL
    pooled = np.concatenate([x, y])
    if len(np.unique(pooled)) < len(pooled):
        return MW_NORMAL
    return MW_EXACT


def mannwhitney(x, y):
    """Two-sided Mann-Whitney U test by R's ``wilcox.test`` rule.

    Returns
    -------
    (float, float, str)
        U of ``x``, the two-sided p and the method that ran
        (:func:`mannwhitney_method`).

    References
    ----------
    Mann & Whitney 1947; R Core Team, ``wilcox.test``; computed with
    :func:`scipy.stats.mannwhitneyu` (``method="exact"``, or
    ``method="asymptotic", use_continuity=True``).
    """
    which = mannwhitney_method(x, y)
    res = sps.mannwhitneyu(x, y, alternative="two-sided", use_continuity=True,
                           method="exact" if which == MW_EXACT else "asymptotic")
    return float(res.statistic), float(res.pvalue), which


def cohens_d(x, y, alpha=0.05):
    """Cohen's d with the pooled SD and its normal-approximation CI.

    Parameters
    ----------
    x, y : array_like
        The two samples; d is positive when ``x`` has the larger mean.
    alpha : float
        1 - confidence level.

    Returns
    -------
    tuple
        ``(d, ci_low, ci_high, note)``; NaN with a ``note`` when a group has
        fewer than 2 values or the pooled SD is 0.

    Notes
    -----
    s_pooled = sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1+n2-2)), d = (m1-m2)/s_pooled,
    SE(d) = sqrt((n1+n2)/(n1 n2) + d^2 / (2 (n1+n2))) (Hedges & Olkin 1985),
    CI = d -/+ z_{1-alpha/2} SE, not rounded.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n1, n2 = len(x), len(y)
    if n1 < MIN_GROUP_SIZE or n2 < MIN_GROUP_SIZE:
        return math.nan, math.nan, math.nan, f"Cohen's d needs at least {MIN_GROUP_SIZE} values per group"
    var = ((n1 - 1) * x.var(ddof=1) + (n2 - 1) * y.var(ddof=1)) / (n1 + n2 - 2)
    if (np.ptp(x) == 0 and np.ptp(y) == 0) or not var > 0:
        return math.nan, math.nan, math.nan, "Cohen's d is undefined: the pooled SD is 0 (all values equal within each group)"
    d = float((x.mean() - y.mean()) / math.sqrt(var))
    se = math.sqrt((n1 + n2) / (n1 * n2) + d * d / (2.0 * (n1 + n2)))
    z = z_quantile(alpha)
    return d, d - z * se, d + z * se, None


def _values(changes, outcome_column, group, label):
    col = changes.loc[changes[outcome_column] == group, label]
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    return values[~bad], int(bad.sum())


def compare_groups(changes, labels, *, outcome_column="outcome", contrasts=CONTRASTS, alpha=0.05):
    """Compare the label changes of outcome groups, label by label.

    Parameters
    ----------
    changes : pandas.DataFrame
        One row per pair: the outcome in ``outcome_column`` and one column per
        label holding the second CXR's probability minus the first's.
    labels : sequence of str
        Label columns to compare, in the order of the output.
    outcome_column : str
        Column holding the outcome (``Worse``, ``Stable``, ``Improved``).
    contrasts : sequence of (str, str)
        ``(group1, group2)`` pairs; group 1 is the first-named group, whose U
        is reported and whose larger mean makes d positive.
    alpha : float
        1 - confidence level of the Cohen's d interval (0.05: 95%).

    Returns
    -------
    pandas.DataFrame
        One row per contrast and label with the columns of
        :data:`GROUP_COLUMNS`: beside U and p the Hodges-Lehmann shift
        (``hl_*``), the rank-biserial r with its CI (``rb_*``), Hedges' g
        (``hedges_g``, ``g_*``) and Cohen's d; ``status`` says whether the
        label was tested (a constant one is not, nor adjusted). A group with fewer than 2 values (or a
        pooled SD of 0) gives NaN statistics with the reason in ``note``;
        missing changes are left out and counted in ``note``.

    Raises
    ------
    StatsError
        If ``changes`` lacks the outcome column or a label column.

    References
    ----------
    Mann & Whitney 1947; Kerby 2014; Cohen 1988; Hedges & Olkin 1985;
    Holm 1979; Benjamini & Hochberg 1995.
    """
    alpha = check_alpha(alpha)
    labels = check_changes(changes, labels, outcome_column)
    d_method = _d_method(alpha)
    rows = []
    for group1, group2 in contrasts:
        contrast = f"{group1} vs {group2}"
        block = []
        for label in labels:
            x, bad1 = _values(changes, outcome_column, group1, label)
            y, bad2 = _values(changes, outcome_column, group2, label)
            n1, n2 = len(x), len(y)
            notes = []
            if bad1 or bad2:
                notes.append(
                    f"{bad1 + bad2} missing change(s) left out ({group1}: {bad1}, {group2}: {bad2})"
                )
            row = {
                "contrast": contrast, "label": label, "group1": group1, "group2": group2,
                "n1": n1, "n2": n2,
                "median1": float(np.median(x)) if n1 else math.nan,
                "median2": float(np.median(y)) if n2 else math.nan,
                "mean1": float(np.mean(x)) if n1 else math.nan,
                "mean2": float(np.mean(y)) if n2 else math.nan,
                "U": math.nan, "p": math.nan, "mw_method": None, "mw_rule": MW_RULE,
                "rank_biserial": math.nan,
                "cohen_d": math.nan, "d_ci_low": math.nan, "d_ci_high": math.nan,
                "d_method": d_method, "p_holm": math.nan, "p_bh": math.nan,
                "unit": "pair", "method": METHOD, "status": TESTED, "analysis": SECONDARY,
                "hl_shift": math.nan, "hl_ci_low": math.nan, "hl_ci_high": math.nan,
                "hl_ci_method": None, "hl_conf_level": math.nan, "hl_method": HL_METHOD,
                "rb_ci_low": math.nan, "rb_ci_high": math.nan, "rb_method": RB_METHOD,
                "hedges_g": math.nan, "g_ci_low": math.nan, "g_ci_high": math.nan, "g_method": G_METHOD,
            }
            small = [f"{g} has n = {n}" for g, n in ((group1, n1), (group2, n2)) if n < MIN_GROUP_SIZE]
            if small:
                notes.append(
                    f"not computed: {' and '.join(small)} (fewer than {MIN_GROUP_SIZE} pairs)"
                )
                row["status"] = NOT_TESTED_SMALL
            elif is_constant(x, y):
                notes.append("not tested: constant (the change is the same in every pair of the contrast); "
                             "left out of the Holm/BH family")
                row["status"] = NOT_TESTED_CONSTANT
            else:
                u1, row["p"], row["mw_method"] = mannwhitney(x, y)
                row["U"] = u1
                row["rank_biserial"] = 2.0 * u1 / (n1 * n2) - 1.0
                d, low, high, d_note = cohens_d(x, y, alpha)
                row["cohen_d"], row["d_ci_low"], row["d_ci_high"] = d, low, high
                if d_note:
                    notes.append(d_note)
                _effect_sizes(row, x, y, alpha, notes)
            row["note"] = "; ".join(notes) if notes else None
            block.append(row)
        adjust_within(block)
        rows.extend(block)
    return pd.DataFrame(rows, columns=list(GROUP_COLUMNS))


def is_constant(x, y):
    """True when every value of both samples is the same (the test is not defined; R gives NaN)."""
    pooled = np.concatenate([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    return len(pooled) > 0 and float(np.ptp(pooled)) == 0.0


def _effect_sizes(row, x, y, alpha, notes):
    """Fill the Hodges-Lehmann, rank-biserial CI and Hedges' g columns of ``row``."""
    hl = hodges_lehmann(x, y, alpha)
    row.update({"hl_shift": hl["estimate"], "hl_ci_low": hl["ci_low"], "hl_ci_high": hl["ci_high"],
                "hl_ci_method": hl["ci_method"], "hl_conf_level": hl["conf_level"]})
    rb = rank_biserial(x, y, alpha)
    row["rb_ci_low"], row["rb_ci_high"] = rb["ci_low"], rb["ci_high"]
    g = hedges_g(x, y, alpha)
    row["hedges_g"], row["g_ci_low"], row["g_ci_high"] = g["g"], g["ci_low"], g["ci_high"]
    notes.extend(n for n in (hl["note"], rb["note"]) if n)


def check_changes(changes, labels, outcome_column):
    """The labels as a list, or :class:`StatsError` when ``changes`` is not a table holding them."""
    if not isinstance(changes, pd.DataFrame):
        raise StatsError("changes must be a pandas DataFrame with one row per pair")
    labels = list(labels)
    missing = [c for c in [outcome_column, *labels] if c not in changes.columns]
    if missing:
        raise StatsError(
            f"the changes table lacks column(s) {missing}; it needs the outcome column "
            f"{outcome_column!r} and one column per label (second minus first probability)"
        )
    return labels


def adjust_within(block):
    """Set ``p_holm`` and ``p_bh`` of each record of one contrast from its ``p`` (missing p left out).

    Holm's step-down and Benjamini-Hochberg's step-up adjustments across the
    labels of the contrast (``statsmodels.stats.multitest.multipletests``).
    """
    pvals = np.array([r["p"] for r in block], dtype=float)
    ok = np.isfinite(pvals)
    if ok.any():
        holm = multipletests(pvals[ok], method="holm")[1]
        bh = multipletests(pvals[ok], method="fdr_bh")[1]
        for r, ph, pb in zip((r for r, k in zip(block, ok) if k), holm, bh):
            r["p_holm"], r["p_bh"] = float(ph), float(pb)
