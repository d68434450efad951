"""Calibration of out-of-fold probabilities: Brier score, calibration intercept and slope, bins.

References
----------
.. [1] Brier GW. Verification of forecasts expressed in terms of probability.
   Mon Weather Rev 1950;78:1-3.
.. [2] Cox DR. Two further applications of a model for binary regression.
   Biometrika 1958;45:562-565 (logistic recalibration: the slope).
.. [3] Van Calster B, McLernon DJ, van Smeden M, et al. Calibration: the
   Achilles heel of predictive analytics. BMC Med 2019;17:230
   (calibration-in-the-large with the slope fixed at 1 by an offset).
.. [4] Collins GS, Moons KGM, Dhiman P, et al. TRIPOD+AI statement.
   BMJ 2024;385:e078378.
"""

import math
import warnings

import numpy as np

from covreport.errors import StatsError
from covreport.stats._util import check_alpha, z_quantile

#: Probabilities are clipped to [EPS, 1 - EPS] before the logit.
EPS = 1e-8

#: Largest number of (equal-count) bins of the calibration plot.
MAX_BINS = 10

#: Fewest pairs per bin.
MIN_PER_BIN = 5

METHOD = (
    "Brier score = mean (probability - outcome)^2; calibration slope: logistic regression of the "
    "outcome on logit(probability) (Cox 1958); calibration intercept (calibration-in-the-large): "
    "logistic regression with the intercept only and logit(probability) as an offset, i.e. the "
    "slope fixed at 1 (Van Calster et al. 2019); both fitted by statsmodels GLM (binomial, logit "
    "link, IRLS) with Wald {level:g}% intervals; ideal values intercept 0, slope 1; probabilities "
    "clipped to [1e-8, 1 - 1e-8] before the logit; bins: up to 10 groups of equal size by "
    "predicted probability (at least 5 pairs each), mean predicted against observed proportion"
)


def _bins(p, y):
    n = len(p)
    k = max(1, min(MAX_BINS, n // MIN_PER_BIN))
    order = np.argsort(p, kind="stable")
    out = []
    for idx in np.array_split(order, k):
        if len(idx):
            out.append({"predicted": float(p[idx].mean()), "observed": float(y[idx].mean()),
                        "n": int(len(idx))})
    return out


def _glm(y, exog, offset=None):
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationError, PerfectSeparationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            fit = sm.GLM(y, exog, family=sm.families.Binomial(), offset=offset).fit()
        except (PerfectSeparationError, PerfectSeparationWarning, np.linalg.LinAlgError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}".split("\n")[0]
    if not np.all(np.isfinite(fit.params)) or not np.all(np.isfinite(fit.bse)):
        return None, "the fit did not converge to finite values"
    return fit, None


def calibration(y_true, probability, *, alpha=0.05):
    """Brier score, calibration intercept and slope with Wald CIs, and plot bins.

    Parameters
    ----------
    y_true : array_like of 0/1
        Observed outcome (1 = positive).
    probability : array_like of float
        Predicted probability of the positive class, in [0, 1].
    alpha : float
        1 - confidence level.

    Returns
    -------
    dict
        ``brier``, ``intercept``, ``intercept_ci_low``, ``intercept_ci_high``,
        ``slope``, ``slope_ci_low``, ``slope_ci_high``, ``bins`` (list of
        ``{"predicted", "observed", "n"}``), ``n``, ``clipped`` (how many
        probabilities were clipped before the logit), ``unit`` ("pair"),
        ``method``, ``note`` (None, or why an estimate is missing).

    Raises
    ------
    StatsError
        Misaligned inputs, outcomes other than 0/1, probabilities outside [0, 1].

    References
    ----------
    Brier 1950; Cox 1958; Van Calster et al. 2019.

    Examples
    --------
    >>> round(calibration([0, 1, 1, 0], [0.2, 0.7, 0.9, 0.4])["brier"], 4)
    0.075
    """
    import statsmodels.api as sm

    alpha = check_alpha(alpha)
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(probability, dtype=float)
    if y.ndim != 1 or p.shape != y.shape:
        raise StatsError(f"outcomes and probabilities must be one-dimensional and aligned, "
                         f"got {y.shape} and {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise StatsError("the outcomes must hold 0 and 1 only")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise StatsError("the probabilities must be numbers between 0 and 1")
    level = round(100 * (1 - alpha), 6)
    out = {"brier": math.nan, "intercept": math.nan, "intercept_ci_low": math.nan,
           "intercept_ci_high": math.nan, "slope": math.nan, "slope_ci_low": math.nan,
           "slope_ci_high": math.nan, "bins": [], "n": int(len(y)), "clipped": 0, "unit": "pair",
           "method": METHOD.format(level=level), "note": None}
    if len(y) == 0:
        out["note"] = "not computed: no pair"
        return out
    out["brier"] = float(np.mean((p - y) ** 2))
    out["bins"] = _bins(p, y)
    pc = np.clip(p, EPS, 1 - EPS)
    out["clipped"] = int((pc != p).sum())
    notes = []
    if out["clipped"]:
        notes.append(f"{out['clipped']} probabilit{'y' if out['clipped'] == 1 else 'ies'} of exactly 0 or 1 "
                     f"(e.g. from one-class training folds) clipped to [{EPS:g}, 1 - {EPS:g}] before the logit")
    if y.min() == y.max():
        notes.append("intercept and slope not computed: the outcomes hold one class only")
        out["note"] = "; ".join(notes)
        return out
    lp = np.log(pc / (1 - pc))
    z = z_quantile(alpha)
    fit, why = _glm(y, np.ones((len(y), 1)), offset=lp)
    if fit is None:
        notes.append(f"calibration intercept not estimable ({why})")
    else:
        b, se = float(fit.params[0]), float(fit.bse[0])
        out.update(intercept=b, intercept_ci_low=b - z * se, intercept_ci_high=b + z * se)
    if np.ptp(lp) == 0:
        notes.append("calibration slope not estimable: every probability is the same")
    else:
        fit, why = _glm(y, sm.add_constant(lp, has_constant="add"))
        if fit is None:
            notes.append(f"calibration slope not estimable ({why})")
        else:
            b, se = float(fit.params[1]), float(fit.bse[1])
            out.update(slope=b, slope_ci_low=b - z * se, slope_ci_high=b + z * se)
    out["note"] = "; ".join(notes) if notes else None
    return out
