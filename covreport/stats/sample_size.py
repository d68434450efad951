"""Sample-size formulas for planning a revalidation: pure functions, numbers in, numbers out.

- :func:`diagnostic_n`: pairs needed to estimate a sensitivity or a
  specificity to a CI half-width at a prevalence (Buderer 1996; as R epiR
  ``epi.ssdxsesp``).
- :func:`hanley_mcneil_se` and :func:`auc_n`: the Hanley-McNeil standard
  error of an AUC and the pairs needed for a half-width of its CI.
- :func:`noether_n` and :func:`noether_power`: the Mann-Whitney (Wilcoxon
  rank-sum) test's size and power for a probability of superiority.
- :func:`cstatistic_to_r2` and :func:`riley_binary`: the minimum sample size
  of a binary prediction model (Riley et al. 2020, the criteria of R
  ``pmsampsize`` 1.1.3), the anticipated Cox-Snell R-squared from a C-statistic
  (Riley, Van Calster & Collins 2021).
- :func:`conservative_value`: the least favourable value a CI supports (nearest 1/2).

The design effect (the clustered over the independent variance) multiplies
every size by the caller (:mod:`covreport.plan`): these are the sizes for
independent observations.

References
----------
Buderer NMF. Statistical methodology: I. Incorporating the prevalence of
disease into the sample size calculation for sensitivity and specificity.
Acad Emerg Med 1996;3:895-900.

Hanley JA, McNeil BJ. The meaning and use of the area under a receiver
operating characteristic (ROC) curve. Radiology 1982;143:29-36.

Noether GE. Sample size determination for some common nonparametric tests.
J Am Stat Assoc 1987;82:645-647.

Riley RD, Ensor J, Snell KIE, et al. Calculating the sample size required for
developing a clinical prediction model. BMJ 2020;368:m441.

Riley RD, Van Calster B, Collins GS. A note on estimating the Cox-Snell R2
from a reported C statistic (AUROC) to inform sample size calculations for
developing a prediction model with a binary outcome. Stat Med 2021;40:859-864.
"""

import math

import numpy as np
from scipy import stats as sps

from covreport.errors import StatsError
from covreport.stats._util import check_alpha, show, z_quantile


def _probability(value, name, *, open_=True):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StatsError(f"{name} must be a number, got {show(value)}") from None
    ok = 0.0 < v < 1.0 if open_ else 0.0 <= v <= 1.0
    if not ok:
        raise StatsError(f"{name} must be between 0 and 1{' (exclusive)' if open_ else ''}, got {show(value)}")
    return v


def _positive(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StatsError(f"{name} must be a number, got {show(value)}") from None
    if not (v > 0 and math.isfinite(v)):
        raise StatsError(f"{name} must be a positive number, got {show(value)}")
    return v


def diagnostic_n(value, share, half_width, alpha=0.05):
    """Total observations needed to estimate a sensitivity or specificity to a half-width.

    ``z^2 value (1 - value) / (half_width^2 share)`` (Buderer 1996): the
    Wald half-width of ``value`` on the ``share`` of observations that carry
    it (the prevalence for a sensitivity, 1 - prevalence for a specificity)
    equals ``half_width``. Fractional; round up to plan.

    Parameters
    ----------
    value : float
        Anticipated sensitivity or specificity, in (0, 1).
    share : float
        Fraction of the observations in its denominator, in (0, 1].
    half_width : float
        Target half-width of the (1 - alpha) CI.
    alpha : float
    """
    value = _probability(value, "value")
    share = float(share)
    if not (0.0 < share <= 1.0):
        raise StatsError(f"share must be in (0, 1], got {show(share)}")
    w = _positive(half_width, "half_width")
    z = z_quantile(check_alpha(alpha))
    return z * z * value * (1.0 - value) / (w * w * share)


def _hm_terms(auc):
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    return auc * (1.0 - auc), q1 - auc * auc, q2 - auc * auc


def hanley_mcneil_se(auc, n_pos, n_neg):
    """Hanley-McNeil standard error of an AUC with ``n_pos`` positives and ``n_neg`` negatives.

    ``sqrt((A(1-A) + (n_pos-1)(Q1-A^2) + (n_neg-1)(Q2-A^2)) / (n_pos n_neg))``
    with ``Q1 = A/(2-A)``, ``Q2 = 2A^2/(1+A)`` (Hanley & McNeil 1982, table
    of their equation 2): the variance of the Mann-Whitney estimate, exact
    when the scores are exponential in both groups. Counts may be fractional.
    """
    a = _probability(auc, "auc", open_=False)
    n1, n2 = _positive(n_pos, "n_pos"), _positive(n_neg, "n_neg")
    t0, t1, t2 = _hm_terms(a)
    return math.sqrt(max(t0 + (n1 - 1.0) * t1 + (n2 - 1.0) * t2, 0.0) / (n1 * n2))


def auc_n(auc, prevalence, half_width, alpha=0.05):
    """Total observations for a Hanley-McNeil half-width ``z SE`` of an AUC at ``prevalence``.

    With ``n_pos = prevalence N`` and ``n_neg = (1 - prevalence) N``,
    ``z SE = half_width`` is a quadratic in N whose positive root is
    returned (fractional; round up to plan).
    """
    a = _probability(auc, "auc")
    p = _probability(prevalence, "prevalence")
    w = _positive(half_width, "half_width")
    z = z_quantile(check_alpha(alpha))
    t0, t1, t2 = _hm_terms(a)
    # (w/z)^2 p (1-p) N^2 = t0 + (pN - 1) t1 + ((1-p)N - 1) t2
    k = (w / z) ** 2 * p * (1.0 - p)
    b = p * t1 + (1.0 - p) * t2
    c = t0 - t1 - t2
    return (b + math.sqrt(b * b + 4.0 * k * c)) / (2.0 * k)


def _theta(theta):
    t = _probability(theta, "theta", open_=False)
    if t == 0.5:
        raise StatsError("theta is 0.5 (no effect): no sample size gives power above alpha")
    return t


def noether_n(theta, fraction, alpha=0.05, power=0.8):
    """Total observations for a two-sided Mann-Whitney test to reach ``power`` at ``theta``.

    ``N = (z_{1-alpha/2} + z_{power})^2 / (12 c (1 - c) (theta - 1/2)^2)``
    (Noether 1987), ``theta`` = P(X > Y) + P(X = Y)/2 and ``c`` the fraction
    of the observations in the first group. Fractional; round up to plan.
    """
    t = _theta(theta)
    c = _probability(fraction, "fraction")
    alpha = check_alpha(alpha)
    power = _probability(power, "power")
    za, zb = z_quantile(alpha), float(sps.norm.ppf(power))
    return (za + zb) ** 2 / (12.0 * c * (1.0 - c) * (t - 0.5) ** 2)


def noether_power(theta, fraction, n, alpha=0.05):
    """Power of a two-sided Mann-Whitney test with ``n`` observations at ``theta`` (Noether 1987).

    ``Phi(sqrt(12 c (1 - c) n) |theta - 1/2| - z_{1-alpha/2})``, the inverse of
    :func:`noether_n` (the far tail neglected, as there).
    """
    t = _probability(theta, "theta", open_=False)
    c = _probability(fraction, "fraction")
    n = _positive(n, "n")
    za = z_quantile(check_alpha(alpha))
    return float(sps.norm.cdf(math.sqrt(12.0 * c * (1.0 - c) * n) * abs(t - 0.5) - za))


#: Gauss-Hermite (probabilists') nodes and weights for E f(Z), Z ~ N(0, 1).
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(160)
_GH_WEIGHTS = _GH_WEIGHTS / math.sqrt(2.0 * math.pi)


def _null_loglik(prevalence):
    p = prevalence
    return p * math.log(p) + (1.0 - p) * math.log(1.0 - p)


def max_r2(prevalence):
    """Largest Cox-Snell R-squared of a binary outcome: ``1 - exp(2 lnL_null / n)`` (Riley 2020)."""
    p = _probability(prevalence, "prevalence")
    return 1.0 - math.exp(2.0 * _null_loglik(p))


def cstatistic_to_r2(cstatistic, prevalence):
    """Anticipated Cox-Snell R-squared of a model with this C-statistic (Riley, Van Calster & Collins 2021).

    Their construction: the linear predictor is N(0, 1) in one class and
    N(mu, 1) in the other, ``mu = sqrt(2) Phi^-1(C)`` (so its AUC is C), and
    R-squared is that of the logistic regression of the outcome on it in an
    infinite sample. The logistic model is then exact, so R-squared is
    ``1 - exp(-2 I)`` with I the expected log-likelihood gain per
    observation over the intercept-only model, computed here by Gauss-Hermite
    quadrature (160 nodes) where ``pmsampsize`` fits a simulated sample of a
    million.
    """
    c = _probability(cstatistic, "cstatistic")
    p = _probability(prevalence, "prevalence")
    mu = math.sqrt(2.0) * float(sps.norm.ppf(c))
    offset = math.log(p / (1.0 - p)) - mu * mu / 2.0
    # events: LP ~ N(mu, 1), eta = offset + mu LP; non-events: LP ~ N(0, 1)
    eta_event = offset + mu * (_GH_NODES + mu)
    eta_none = offset + mu * _GH_NODES
    loglik = (p * -np.logaddexp(0.0, -eta_event) @ _GH_WEIGHTS
              + (1.0 - p) * -np.logaddexp(0.0, eta_none) @ _GH_WEIGHTS)
    gain = max(float(loglik) - _null_loglik(p), 0.0)
    return 1.0 - math.exp(-2.0 * gain)


def _shrinkage_n(parameters, r2, shrinkage):
    return math.ceil(parameters / ((shrinkage - 1.0) * math.log(1.0 - r2 / shrinkage)))


def riley_binary(r2, parameters, prevalence, shrinkage=0.9):
    """Minimum development sample size of a binary prediction model (Riley et al. BMJ 2020).

    Three criteria, as R ``pmsampsize`` 1.1.3 computes them (its roundings
    kept so that the values agree): (1) expected uniform shrinkage of at
    least ``shrinkage``, ``n = P / ((S - 1) ln(1 - R2/S))``; (2) a difference
    of at most 0.05 between the apparent and the adjusted Nagelkerke R-squared,
    criterion 1 at ``S = R2 / (R2 + 0.05 max_R2)`` (max_R2 to 2 decimals, S to
    3); (3) the overall outcome proportion to within 0.05,
    ``n = (1.96/0.05)^2 p (1 - p)``. The minimum is the largest.

    Parameters
    ----------
    r2 : float
        Anticipated Cox-Snell R-squared (:func:`cstatistic_to_r2` from a C-statistic).
    parameters : int
        Candidate predictor parameters.
    prevalence : float
        Outcome proportion.
    shrinkage : float

    Returns
    -------
    dict
        ``criteria`` (a list of {criterion, n, shrinkage, events, events_per_parameter}),
        ``n``, ``shrinkage``, ``events``, ``events_per_parameter``, ``max_r2``.

    Raises
    ------
    StatsError
        When R-squared is not below the shrinkage or above the largest possible R-squared.
    """
    r2 = _probability(r2, "r2")
    p = _probability(prevalence, "prevalence")
    s = _probability(shrinkage, "shrinkage")
    if isinstance(parameters, bool) or not isinstance(parameters, (int, np.integer)) or parameters < 1:
        raise StatsError(f"parameters must be a whole number of at least 1, got {show(parameters)}")
    if s < r2:
        raise StatsError(f"the shrinkage {s:g} is below the R-squared {r2:g}: criterion 1 is undefined")
    largest = round(max_r2(p), 2)
    if largest < r2:
        raise StatsError(f"the R-squared {r2:g} is above the largest possible for a prevalence of {p:g} "
                         f"({largest:g})")
    s2 = round(r2 / (r2 + 0.05 * largest), 3)
    n1 = _shrinkage_n(parameters, r2, s)
    n2 = _shrinkage_n(parameters, r2, s2)
    n3 = math.ceil((1.96 / 0.05) ** 2 * p * (1.0 - p))
    rows = []
    for name, n, shr in (("shrinkage", n1, s), ("optimism of R-squared", n2, s2), ("overall risk", n3, max(s, s2))):
        rows.append({"criterion": name, "n": int(n), "shrinkage": shr, "events": n * p,
                     "events_per_parameter": n * p / parameters})
    n = max(n1, n2, n3)
    return {"criteria": rows, "n": int(n), "shrinkage": max(s, s2), "events": n * p,
            "events_per_parameter": n * p / parameters, "max_r2": largest}


def conservative_value(ci_low, ci_high):
    """The least favourable value of a proportion, AUC or probability of superiority that its CI supports.

    The point of ``[ci_low, ci_high]`` nearest 1/2, where the variance of a
    proportion (and the sample size for a precision or a power) is largest:
    1/2 itself when the interval holds it. ``None`` when a bound is missing.
    """
    if ci_low is None or ci_high is None:
        return None
    low, high = float(ci_low), float(ci_high)
    if not (0.0 <= low <= high <= 1.0):
        return None
    return min(max(0.5, low), high)
