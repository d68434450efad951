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
LR_BOUNDS_METHOD = ("ratio of the Clopper-Pearson exact limits of its two proportions, each at alpha/2 "
                    "(Bonferroni; coverage at least 1 - alpha)")


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
    if se == 0.0:
        # a = n1 and b = n0 (every case on one side of the threshold): LR = 1 and the log method's interval
        # has zero width. The ratio increases in a/n1 and decreases in b/n0, so the Clopper-Pearson limits
        # of both at alpha/2 (Bonferroni) bound it with probability at least 1 - alpha.
        a_lo, a_hi = clopper_pearson(a, n1, alpha / 2)
        b_lo, b_hi = clopper_pearson(b, n0, alpha / 2)
        return _row(measure, estimate, a_lo / b_hi, a_hi / b_lo, LR_BOUNDS_METHOD,
                    f"bounds instead: the log-method SE is 0 when {a_name} = TP + FN and {b_name} = FP + TN "
                    "(every case on one side of the threshold), which would give a zero-width interval")
    log_lr = math.log(estimate)
    return _row(measure, estimate, math.exp(log_lr - z * se), math.exp(log_lr + z * se), LOG_METHOD, "")


#: PPV/NPV interval methods of :func:`diagnostic_metrics` (``predictive_ci``).
PREDICTIVE_CI = ("exact", "logit")

LOGIT_SAMPLE_NOTE = ("the sample prevalence treated as known: the interval MedCalc prints and the "
                     "original study published; it ignores the sampling variability of the prevalence")


def _predictive_value(measure, tp, fp, fn, tn, prevalence, alpha, z, predictive_ci="exact"):
    """PPV or NPV with a Clopper-Pearson or Mercaldo et al. (2007) logit interval.

    Without a prevalence and with ``predictive_ci="exact"`` (the default),
    PPV = TP/(TP+FP) and NPV = TN/(TN+FN) are binomial proportions of a
    consecutive cohort and get Clopper-Pearson intervals (R's ``binom.test``;
    epiR's ``epi.tests(method="exact")``).

    Otherwise the standard logit interval of Mercaldo et al. (2007): with
    prevalence p (the sample prevalence n1/N when none is given and
    ``predictive_ci="logit"``), sensitivity Se = TP/n1 and specificity
    Sp = TN/n0 (n1 = TP+FN, n0 = FP+TN):

    logit PPV = ln(p Se / ((1-p)(1-Sp))),  Var = (1-Se)/(n1 Se) + Sp/(n0 (1-Sp))
    logit NPV = ln((1-p) Sp / (p (1-Se))), Var = Se/(n1 (1-Se)) + (1-Sp)/(n0 Sp)

    Where that interval degenerates (Se or Sp undefined, 0 or 1: an infinite
    logit or a zero variance) a Clopper-Pearson interval of TP/(TP+FP) (or
    TN/(TN+FN)) is given instead, or, with a given prevalence, Bayes' rule
    applied to the Clopper-Pearson limits of Se and Sp (PPV and NPV increase
    in both); the note says why.
    """
    n1, n0 = tp + fn, fp + tn
    if measure == "ppv":
        x, n, empty, what = tp, tp + fp, "no positive test results (TP + FP = 0)", "TP/(TP+FP)"
    else:
        x, n, empty, what = tn, tn + fn, "no negative test results (TN + FN = 0)", "TN/(TN+FN)"
    exact_method = f"{CLOPPER_PEARSON} on {what} (a binomial proportion in a consecutive cohort; R binom.test)"
    if prevalence is None:
        if n == 0:
            method = exact_method if predictive_ci == "exact" else "standard logit (Mercaldo et al. 2007)"
            return _row(measure, math.nan, method=method, note=f"not estimable: {empty}")
        estimate = x / n
        if predictive_ci == "exact":
            low, high = clopper_pearson(x, n, alpha)
            return _row(measure, estimate, low, high, exact_method)
        p = n1 / (n1 + n0)
        p_text = "the sample prevalence"
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
    se_ = tp / n1 if n1 else math.nan
    sp_ = tn / n0 if n0 else math.nan
    degenerate = [f"{name} is {'undefined' if v != v else f'{v:g}'}"
                  for name, v in (("sensitivity", se_), ("specificity", sp_)) if not 0.0 < v < 1.0]
    if degenerate:
        why = f"the logit interval degenerates when {' and '.join(degenerate)}"
        if prevalence is None:
            low, high = clopper_pearson(x, n, alpha)
            return _row(measure, estimate, low, high, exact_method, f"Clopper-Pearson instead: {why}")
        # Bayes' rule is increasing in Se and Sp: apply it to their Clopper-Pearson limits
        se_lo, se_hi = clopper_pearson(tp, n1, alpha)
        sp_lo, sp_hi = clopper_pearson(tn, n0, alpha)
        bayes = ((lambda a, b: p * a / (p * a + (1 - p) * (1 - b))) if measure == "ppv" else
                 (lambda a, b: (1 - p) * b / ((1 - p) * b + p * (1 - a))))
        return _row(measure, estimate, bayes(se_lo, sp_lo), bayes(se_hi, sp_hi),
                    f"Bayes' rule with {p_text}; interval by Bayes' rule on the {CLOPPER_PEARSON} limits "
                    "of sensitivity and specificity",
                    f"Clopper-Pearson limits instead: {why}")
    if measure == "ppv":
        logit = math.log(p * se_ / ((1 - p) * (1 - sp_)))
        var = (1 - se_) / (n1 * se_) + sp_ / (n0 * (1 - sp_))
    else:
        logit = math.log((1 - p) * sp_ / (p * (1 - se_)))
        var = se_ / (n1 * (1 - se_)) + (1 - sp_) / (n0 * sp_)
    half = z * math.sqrt(var)
    expit = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    if prevalence is None:
        method = f"standard logit (Mercaldo et al. 2007) with {LOGIT_SAMPLE_NOTE}"
    else:
        method = f"Bayes' rule; standard logit (Mercaldo et al. 2007) with {p_text}"
    return _row(measure, estimate, expit(logit - half), expit(logit + half), method)


def diagnostic_metrics(tp, fp, fn, tn, *, prevalence=None, alpha=0.05, predictive_ci="exact"):
    """Accuracy, sensitivity, specificity, predictive values and likelihood ratios with CIs.

    Methods follow MedCalc's diagnostic test calculator:

    - sensitivity TP/(TP+FN), specificity TN/(FP+TN) and accuracy
      (TP+TN)/N: Clopper-Pearson exact intervals;
    - LR+ = Se/(1-Sp) and LR- = (1-Se)/Sp: log method,
      SE(ln LR+) = sqrt(1/TP - 1/(TP+FN) + 1/FP - 1/(FP+TN)) and
      SE(ln LR-) = sqrt(1/FN - 1/(TP+FN) + 1/TN - 1/(FP+TN));
    - PPV and NPV: Clopper-Pearson exact intervals of TP/(TP+FP) and
      TN/(TN+FN) by default (binomial proportions of a consecutive cohort, as
      epiR's ``epi.tests(method="exact")``); with ``predictive_ci="logit"``
      the standard logit intervals of Mercaldo et al. (2007) with the sample
      prevalence (TP+FN)/N taken as known (what MedCalc prints); with
      ``prevalence``, Mercaldo's logit interval with that prevalence. A logit
      interval that degenerates (sensitivity or specificity undefined, 0 or
      1) is replaced by Clopper-Pearson, with a note.

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
    predictive_ci : {"exact", "logit"}
        Interval of PPV and NPV without a ``prevalence`` (see above).

    Returns
    -------
    pandas.DataFrame
        Columns measure, estimate, ci_low, ci_high, method, note; one row per
        measure in the order accuracy, sensitivity, specificity, ppv, npv,
        lr_positive, lr_negative. ``note`` is "" when there is nothing to say.

    Raises
    ------
    StatsError
        On a negative or non-integer count, a prevalence outside (0, 1), an
        alpha outside (0, 1) or an unknown ``predictive_ci``.

    References
    ----------
    Clopper & Pearson, Biometrika 1934;26:404-413. Altman et al., Statistics
    with Confidence, 2nd ed., 2000, p. 109. Mercaldo, Lau & Zhou, Stat Med
    2007;26:2170-2183. MedCalc diagnostic test evaluation calculator.
    """
    tp, fp, fn, tn = (_count(name, v) for name, v in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)))
    alpha = check_alpha(alpha)
    if predictive_ci not in PREDICTIVE_CI:
        raise StatsError(f"predictive_ci must be one of {PREDICTIVE_CI}, got {show(predictive_ci)}")
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
        _predictive_value("ppv", tp, fp, fn, tn, prevalence, alpha, z, predictive_ci),
        _predictive_value("npv", tp, fp, fn, tn, prevalence, alpha, z, predictive_ci),
        _likelihood_ratio("lr_positive", tp, n1, fp, n0, alpha, z),
        _likelihood_ratio("lr_negative", fn, n1, tn, n0, alpha, z),
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))
