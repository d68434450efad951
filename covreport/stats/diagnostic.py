"""Diagnostic accuracy of a binary test from its 2x2 table, as MedCalc computes it.

Layout of the table (disease = reference standard positive)::

                 disease present   disease absent
    test +            TP                FP
    test -            FN                TN

References
----------
Clopper CJ, Pearson ES. The use of confidence or fiducial limits illustrated
in the case of the binomial. Biometrika 1934;26:404-413.

Altman DG, Machin D, Bryant TN, Gardner MJ (eds). Statistics with Confidence,
2nd ed. BMJ Books, 2000, p. 109 (log method for likelihood ratios).

Mercaldo ND, Lau KF, Zhou XH. Confidence intervals for predictive values with
an emphasis to case-control studies. Statistics in Medicine 2007;26:2170-2183.

MedCalc Software. Diagnostic test evaluation calculator,
https://www.medcalc.org/calc/diagnostic_test.php (methods as listed there).
"""

import math
import numbers

import numpy as np
import pandas as pd
from scipy import stats as _sps

from covreport.errors import StatsError
from covreport.stats._util import check_alpha, show, z_quantile

#: Row order of :func:`diagnostic_metrics`.
MEASURES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "lr_positive", "lr_negative")

COLUMNS = ("measure", "estimate", "ci_low", "ci_high", "method", "note")

CLOPPER_PEARSON = "Clopper-Pearson exact"
LOG_METHOD = "log method (Altman et al. 2000, p. 109)"


def clopper_pearson(x, n, alpha=0.05):
    """Clopper-Pearson exact confidence interval of a binomial proportion x / n.

    Parameters
    ----------
    x, n : int
        Successes and trials, 0 <= x <= n, n > 0.
    alpha : float
        1 - confidence level.

    Returns
    -------
    (float, float)
        Lower and upper limits; 0 when x = 0 and 1 when x = n.

    References
    ----------
    Clopper & Pearson, Biometrika 1934;26:404-413.
    """
    if n <= 0:
        return math.nan, math.nan
    low = 0.0 if x == 0 else float(_sps.beta.ppf(alpha / 2.0, x, n - x + 1))
    high = 1.0 if x == n else float(_sps.beta.ppf(1.0 - alpha / 2.0, x + 1, n - x))
    return low, high


def _count(name, value):
    if isinstance(value, (bool, np.bool_)):
        raise StatsError(f"{name} must be a non-negative whole number, got {show(value)}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        value = int(value)
    else:
        raise StatsError(f"{name} must be a non-negative whole number, got {show(value)}")
    if value < 0:
        raise StatsError(f"{name} must be a non-negative whole number, got {value}")
    return value


def _row(measure, estimate, low=math.nan, high=math.nan, method="", note=""):
    return {"measure": measure, "estimate": float(estimate), "ci_low": float(low),
            "ci_high": float(high), "method": method, "note": note}


def _proportion(measure, x, n, alpha, empty_reason):
    """Row for a proportion x / n with a Clopper-Pearson interval."""
    if n == 0:
        return _row(measure, math.nan, method=CLOPPER_PEARSON, note=f"not estimable: {empty_reason}")
    low, high = clopper_pearson(x, n, alpha)
    return _row(measure, x / n, low, high, CLOPPER_PEARSON)


def _likelihood_ratio(measure, a, n1, b, n0, alpha, z):
    """LR = (a/n1) / (b/n0) with the log-method interval.

    For LR+ a = TP, n1 = TP+FN, b = FP, n0 = FP+TN; for LR- a = FN, b = TN.
    SE(ln LR) = sqrt(1/a - 1/n1 + 1/b - 1/n0) (Altman et al. 2000, p. 109).
    """
    sign = "+" if measure == "lr_positive" else "-"
    a_name, b_name = ("TP", "FP") if sign == "+" else ("FN", "TN")
    if n1 == 0:
        return _row(measure, math.nan, method=LOG_METHOD,
                    note="not estimable: no diseased cases (TP + FN = 0)")
    if n0 == 0:
        return _row(measure, math.nan, method=LOG_METHOD,
                    note="not estimable: no non-diseased cases (FP + TN = 0)")
    if a == 0 and b == 0:
        return _row(measure, math.nan, method=LOG_METHOD,
                    note=f"not estimable: {a_name} = {b_name} = 0 gives 0/0")
    if b == 0:
        return _row(measure, math.inf, method=LOG_METHOD,
                    note=f"infinite: {b_name} = 0; the log-method interval needs {a_name} > 0 and "
                         f"{b_name} > 0 (no continuity correction)")
    estimate = (a / n1) / (b / n0)
    if a == 0:
        return _row(measure, estimate, method=LOG_METHOD,
                    note=f"no interval: {a_name} = 0; the log-method interval needs {a_name} > 0 and "
                         f"{b_name} > 0 (no continuity correction)")
    se = math.sqrt(1.0 / a - 1.0 / n1 + 1.0 / b - 1.0 / n0)
    log_lr = math.log(estimate)
    note = ""
    if se == 0.0:
        note = (f"zero-width interval: the log-method SE is 0 when {a_name} = TP + FN and "
                f"{b_name} = FP + TN")
    return _row(measure, estimate, math.exp(log_lr - z * se), math.exp(log_lr + z * se), LOG_METHOD, note)


def _predictive_value(measure, tp, fp, fn, tn, prevalence, alpha, z):
    """PPV or NPV with the standard logit interval of Mercaldo et al. (2007).

    With prevalence p (the sample prevalence n1/N when none is given),
    sensitivity Se = TP/n1 and specificity Sp = TN/n0 (n1 = TP+FN, n0 = FP+TN):

    logit PPV = ln(p Se / ((1-p)(1-Sp))),  Var = (1-Se)/(n1 Se) + Sp/(n0 (1-Sp))
    logit NPV = ln((1-p) Sp / (p (1-Se))), Var = Se/(n1 (1-Se)) + (1-Sp)/(n0 Sp)

    When the value is 0 or 1 the logit is undefined and a Clopper-Pearson
    interval of TP/(TP+FP) (or TN/(TN+FN)) is given instead, as MedCalc does.
    """
    n1, n0 = tp + fn, fp + tn
    if measure == "ppv":
        x, n, empty = tp, tp + fp, "no positive test results (TP + FP = 0)"
    else:
        x, n, empty = tn, tn + fn, "no negative test results (TN + FN = 0)"
    if prevalence is None:
        if n == 0:
            return _row(measure, math.nan, method="standard logit (Mercaldo et al. 2007)",
                        note=f"not estimable: {empty}")
        estimate = x / n
        p = n1 / (n1 + n0)
        p_text = "sample prevalence"
    else:
        if n1 == 0 or n0 == 0:
            which = "no diseased cases (TP + FN = 0)" if n1 == 0 else "no non-diseased cases (FP + TN = 0)"
            return _row(measure, math.nan, method="Bayes' rule from sensitivity, specificity and prevalence",
                        note=f"not estimable: {which}, so sensitivity or specificity is undefined")
        se_, sp_ = tp / n1, tn / n0
        p = prevalence
        if measure == "ppv":
            num, den = p * se_, p * se_ + (1 - p) * (1 - sp_)
        else:
            num, den = (1 - p) * sp_, (1 - p) * sp_ + p * (1 - se_)
        if den == 0:
            return _row(measure, math.nan, method="Bayes' rule from sensitivity, specificity and prevalence",
                        note=f"not estimable: {empty}, so the value is 0/0")
        estimate = num / den
        p_text = f"prevalence {p:g}"
    if estimate == 0.0 or estimate == 1.0:
        low, high = clopper_pearson(x, n, alpha)
        what = "TP/(TP+FP)" if measure == "ppv" else "TN/(TN+FN)"
        return _row(measure, estimate, low, high,
                    f"Clopper-Pearson exact on {what} (value is {estimate:g}; the logit is undefined)"
                    + ("" if prevalence is None else f"; estimate by Bayes' rule with {p_text}"))
    se_, sp_ = tp / n1, tn / n0
    if measure == "ppv":
        logit = math.log(p * se_ / ((1 - p) * (1 - sp_)))
        var = (1 - se_) / (n1 * se_) + sp_ / (n0 * (1 - sp_))
    else:
        logit = math.log((1 - p) * sp_ / (p * (1 - se_)))
        var = se_ / (n1 * (1 - se_)) + (1 - sp_) / (n0 * sp_)
    half = z * math.sqrt(var)
    expit = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    method = f"standard logit (Mercaldo et al. 2007) with {p_text}"
    if prevalence is not None:
        method = "Bayes' rule; " + method
    note = ""
    if var == 0.0:
        note = ("zero-width interval: the logit variance is 0 when sensitivity is 1 and "
                "specificity is 0")
    return _row(measure, estimate, expit(logit - half), expit(logit + half), method, note)


def diagnostic_metrics(tp, fp, fn, tn, *, prevalence=None, alpha=0.05):
    """Accuracy, sensitivity, specificity, predictive values and likelihood ratios with CIs.

    Methods follow MedCalc's diagnostic test calculator:

    - sensitivity TP/(TP+FN), specificity TN/(FP+TN) and accuracy
      (TP+TN)/N: Clopper-Pearson exact intervals;
    - LR+ = Se/(1-Sp) and LR- = (1-Se)/Sp: log method,
      SE(ln LR+) = sqrt(1/TP - 1/(TP+FN) + 1/FP - 1/(FP+TN)) and
      SE(ln LR-) = sqrt(1/FN - 1/(TP+FN) + 1/TN - 1/(FP+TN));
    - PPV and NPV: standard logit intervals of Mercaldo et al. (2007), with the
      sample prevalence (TP+FN)/N, or ``prevalence`` when given, taken as
      known; a Clopper-Pearson interval when the value is 0 or 1.

    With ``prevalence`` p, PPV and NPV come from Bayes' rule and accuracy is
    Se*p + Sp*(1-p), with the interval p*[Se limits] + (1-p)*[Sp limits]
    (Clopper-Pearson limits of Se and Sp); the ``method`` says so.

    No continuity correction is applied: a zero cell or empty margin that
    makes a measure undefined gives NaN (or +inf for a likelihood ratio with
    a zero denominator) with the reason in ``note``.

    Parameters
    ----------
    tp, fp, fn, tn : int
        Cells of the 2x2 table, non-negative whole numbers.
    prevalence : float, optional
        Disease prevalence in the target population, 0 < prevalence < 1.
    alpha : float
        1 - confidence level (0.05 for 95% intervals).

    Returns
    -------
    pandas.DataFrame
        Columns measure, estimate, ci_low, ci_high, method, note; one row per
        measure in the order accuracy, sensitivity, specificity, ppv, npv,
        lr_positive, lr_negative. ``note`` is "" when there is nothing to say.

    Raises
    ------
    StatsError
        On a negative or non-integer count, a prevalence outside (0, 1) or
        an alpha outside (0, 1).

    References
    ----------
    Clopper & Pearson, Biometrika 1934;26:404-413. Altman et al., Statistics
    with Confidence, 2nd ed., 2000, p. 109. Mercaldo, Lau & Zhou, Stat Med
    2007;26:2170-2183. MedCalc diagnostic test evaluation calculator.
    """
    tp, fp, fn, tn = (_count(name, v) for name, v in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)))
    alpha = check_alpha(alpha)
    if prevalence is not None:
        if isinstance(prevalence, (bool, np.bool_)) or not isinstance(prevalence, numbers.Real):
            raise StatsError(f"prevalence must be a number between 0 and 1 (exclusive), got {show(prevalence)}")
        prevalence = float(prevalence)
        if not (0.0 < prevalence < 1.0):
            raise StatsError(f"prevalence must be between 0 and 1 (exclusive), got {show(prevalence)}")
    z = z_quantile(alpha)
    n1, n0, n = tp + fn, fp + tn, tp + fp + fn + tn

    sens = _proportion("sensitivity", tp, n1, alpha, "no diseased cases (TP + FN = 0)")
    spec = _proportion("specificity", tn, n0, alpha, "no non-diseased cases (FP + TN = 0)")
    if prevalence is None:
        acc = _proportion("accuracy", tp + tn, n, alpha, "the table is empty (N = 0)")
    else:
        p = prevalence
        method = (f"Se*p + Sp*(1-p) with prevalence p = {p:g}; interval combines the "
                  "Clopper-Pearson limits of Se and Sp the same way")
        if n1 == 0 or n0 == 0:
            acc = _row("accuracy", math.nan, method=method,
                       note="not estimable: sensitivity or specificity is undefined "
                            + ("(TP + FN = 0)" if n1 == 0 else "(FP + TN = 0)"))
        else:
            acc = _row("accuracy", sens["estimate"] * p + spec["estimate"] * (1 - p),
                       sens["ci_low"] * p + spec["ci_low"] * (1 - p),
                       sens["ci_high"] * p + spec["ci_high"] * (1 - p), method)
    rows = [
        acc, sens, spec,
        _predictive_value("ppv", tp, fp, fn, tn, prevalence, alpha, z),
        _predictive_value("npv", tp, fp, fn, tn, prevalence, alpha, z),
        _likelihood_ratio("lr_positive", tp, n1, fp, n0, alpha, z),
        _likelihood_ratio("lr_negative", fn, n1, tn, n0, alpha, z),
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))
