"""Calibration of out-of-fold probabilities: Brier score, intercept and slope, flexible curve, ICI.

Pairs whose training fold held one class get the probability 0 or 1 of that
class (no model was fitted): their logit is infinite, so they are excluded
from the intercept and slope fits (never clipped), listed by fold, and kept
in the Brier score, the bins and the flexible curve, which live on the
probability scale.

References
----------
.. [1] Brier GW. Verification of forecasts expressed in terms of probability.
   Mon Weather Rev 1950;78:1-3.
.. [2] Cox DR. Two further applications of a model for binary regression.
   Biometrika 1958;45:562-565 (logistic recalibration: the slope).
.. [3] Van Calster B, McLernon DJ, van Smeden M, et al. Calibration: the
   Achilles heel of predictive analytics. BMC Med 2019;17:230
   (calibration-in-the-large with the slope fixed at 1 by an offset).
.. [4] Austin PC, Steyerberg EW. The Integrated Calibration Index (ICI) and
   related metrics for quantifying the calibration of logistic regression
   models. Stat Med 2019;38:4051-4065.
.. [5] Cleveland WS. Robust locally weighted regression and smoothing
   scatterplots. J Am Stat Assoc 1979;74:829-836.
.. [6] Collins GS, Moons KGM, Dhiman P, et al. TRIPOD+AI statement.
   BMJ 2024;385:e078378.
.. [7] Bickel PJ, Freedman DA. Some asymptotic theory for the bootstrap.
   Ann Stat 1981;9:1196-1217 (section 6: the bootstrap of a maximum fails).
"""

import math
import warnings

import numpy as np
import pandas as pd

from covreport.errors import StatsError
from covreport.stats._util import check_alpha, patient_resample_rows, to_python, z_quantile

#: Largest number of (equal-count) bins of the calibration plot.
MAX_BINS = 10

#: Fewest pairs per bin.
MIN_PER_BIN = 5

#: Fraction of the pairs in each lowess window (Austin & Steyerberg 2019 used loess's span 0.75).
LOWESS_FRAC = 0.75

#: Patient bootstrap resamples of the flexible curve and of the measures' intervals.
CURVE_RESAMPLES = 200

#: Points of the flexible curve stored in results.json (between the smallest and largest probability).
CURVE_POINTS = 51

REFERENCE = ("Brier 1950; Cox 1958; Van Calster B et al. BMC Med 2019;17:230; Austin PC, Steyerberg EW. "
             "Stat Med 2019;38:4051-4065; Cleveland WS. J Am Stat Assoc 1979;74:829-836; Bickel PJ, Freedman DA. Ann Stat 1981;9:1196-1217")

METHOD = (
    "Brier score = mean (probability - outcome)^2; calibration slope: logistic regression of the "
    "outcome on logit(probability) (Cox 1958); calibration intercept (calibration-in-the-large): "
    "logistic regression with the intercept only and logit(probability) as an offset, i.e. the "
    "slope fixed at 1 (Van Calster et al. 2019); both fitted by statsmodels GLM (binomial, logit "
    "link, IRLS) with Wald {level:g}% intervals; ideal values intercept 0, slope 1; no probability is "
    "clipped: pairs whose training fold held one class (probability 0 or 1, the fold's class) and any "
    "other probability of exactly 0 or 1 are left out of the intercept and slope fits and counted; "
    "flexible calibration curve: lowess of the outcome on the probability (statsmodels, local linear, "
    "tricube weights, frac {frac:g}, no robustness iterations; Cleveland 1979), every pair; ICI = mean, "
    "E50 = median, E90 = 90th percentile and Emax = maximum of |probability - smoothed observed| over the "
    "pairs (Austin & Steyerberg 2019), with the probability where Emax lies; {level:g}% percentile intervals "
    "of the Brier score, ICI, E50 and E90 and the pointwise band of the curve from {boot} (none for Emax: "
    "the bootstrap is not consistent for a maximum, Bickel & Freedman 1981); bins: up to 10 groups of equal size by "
    "predicted probability (at least 5 pairs each), mean predicted against observed proportion"
)

_BOOT = "{n:,} bootstrap resamples of the {units} with replacement (numpy SeedSequence({seed}).spawn, one stream each)"

#: Measures of calibration.csv, in order: (key, name, ideal value).
MEASURES = (("brier", "Brier score", 0.0), ("intercept", "calibration intercept", 0.0),
            ("slope", "calibration slope", 1.0), ("ici", "ICI", 0.0), ("e50", "E50", 0.0),
            ("e90", "E90", 0.0), ("emax", "Emax", 0.0))


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
        except (PerfectSeparationError, PerfectSeparationWarning):
            return None, ("perfect separation: the logit of the probability separates the pairs of the two "
                          "classes, so the maximum-likelihood estimate is infinite")
        except (np.linalg.LinAlgError, ValueError) as exc:
            return None, f"the fit failed: {exc}".split("\n")[0]
    if not np.all(np.isfinite(fit.params)) or not np.all(np.isfinite(fit.bse)):
        return None, "the fit did not converge to finite values"
    return fit, None


def smoothed_observed(y, p, frac=LOWESS_FRAC):
    """The lowess of the outcome on the probability at each pair (input order; NaN where not fitted).

    statsmodels' ``lowess`` (local linear, tricube weights, ``it=0``: no
    robustness iterations, which would down-weight the 0/1 outcomes).
    """
    from statsmodels.nonparametric.smoothers_lowess import lowess

    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if len(y) < 3 or np.ptp(p) == 0:
        return np.full(len(y), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(lowess(y, p, frac=frac, it=0, return_sorted=False), dtype=float)


def flexible_errors(y, p, frac=LOWESS_FRAC):
    """ICI, E50, E90 and Emax of Austin & Steyerberg (2019), and the smoothed observed values.

    Returns
    -------
    dict
        ``ici``, ``e50``, ``e90``, ``emax`` (NaN when the smoother cannot be
        fitted), ``emax_probability`` (the probability where Emax lies),
        ``emax_beyond`` (pairs with a probability farther out on that side: fewer
        of them below or above it) and ``smoothed`` (per pair, input order).
    """
    p = np.asarray(p, dtype=float)
    s = smoothed_observed(y, p, frac)
    err = np.abs(p - s)[np.isfinite(s)]
    if not len(err):
        return {"ici": math.nan, "e50": math.nan, "e90": math.nan, "emax": math.nan,
                "emax_probability": math.nan, "emax_beyond": None, "smoothed": s}
    at = float(p[np.isfinite(s)][int(np.argmax(err))])
    return {"ici": float(err.mean()), "e50": float(np.median(err)), "e90": float(np.quantile(err, 0.9)),
            "emax": float(err.max()), "emax_probability": at,
            "emax_beyond": int(min((p < at).sum(), (p > at).sum())), "smoothed": s}


def _curve_at(p, s, grid):
    """The smoother's values at the grid points inside the range of ``p`` (NaN outside, or where unfitted)."""
    ok = np.isfinite(s)
    if ok.sum() < 2:
        return np.full(len(grid), np.nan)
    order = np.argsort(p[ok], kind="stable")
    xs, ys = p[ok][order], s[ok][order]
    out = np.interp(grid, xs, ys)
    out[(grid < xs[0]) | (grid > xs[-1])] = np.nan
    return out


def _aligned(name, values, n, dtype=None):
    if values is None:
        return None
    arr = np.asarray(values, dtype=dtype) if dtype is not None else np.asarray(values, dtype=object)
    if arr.shape != (n,):
        raise StatsError(f"{name} must have one value per pair ({n}), got shape {arr.shape}")
    return arr


def calibration(y_true, probability, *, alpha=0.05, groups=None, folds=None, one_class=None, predicted=None,
                n_resamples=CURVE_RESAMPLES, seed=0, frac=LOWESS_FRAC):
    """Brier score, calibration intercept and slope, the flexible curve and ICI/E50/E90/Emax.

    Parameters
    ----------
    y_true : array_like of 0/1
        Observed outcome (1 = positive).
    probability : array_like of float
        Predicted probability of the positive class, in [0, 1].
    alpha : float
        1 - confidence level.
    groups : array_like, optional
        Patient of each pair: the bootstrap resamples patients (without it,
        pairs).
    folds : array_like of int, optional
        Cross-validation fold of each pair (to list the one-class folds).
    one_class : array_like of bool, optional
        Pairs whose training fold held one class: left out of the intercept
        and slope fits, listed in ``one_class_folds``.
    predicted : array_like of 0/1, optional
        Predicted class of each pair: a model that predicts one class gets
        no calibration panel (``drawable`` False).
    n_resamples : int
        Bootstrap resamples of the curve's band and the intervals (0: none).
    seed : int
        Seed of ``numpy.random.SeedSequence``; resample b draws from its
        b-th spawned child.
    frac : float
        Fraction of the pairs in each lowess window.

    Returns
    -------
    dict
        ``brier``, ``intercept``, ``slope``, ``ici``, ``e50``, ``e90``,
        ``emax``, each with ``*_ci_low`` and ``*_ci_high`` (NaN for Emax:
        see :func:`_bootstrap`), ``emax_probability`` and ``emax_beyond``
        (:func:`flexible_errors`); ``curve
        (``probability``, ``observed``, ``lower``, ``upper`` lists on a grid),
        ``bins``, ``n``, ``n_fit`` (pairs in the intercept and slope fits),
        ``excluded_from_fit``, ``one_class_pairs``, ``one_class_folds``
        (``[{"fold", "patient_id", "pairs"}]``), ``resamples``, ``seed``,
        ``drawable`` and ``not_drawn`` (why no panel is drawn, in words),
        ``unit`` ("pair"), ``interval_unit``, ``method``, ``reference`` and
        ``note`` (None, or why an estimate is missing).

    Raises
    ------
    StatsError
        Misaligned inputs, outcomes other than 0/1, probabilities outside [0, 1].

    References
    ----------
    Brier 1950; Cox 1958; Van Calster et al. 2019; Austin & Steyerberg 2019.

    Examples
    --------
    >>> round(calibration([0, 1, 1, 0], [0.2, 0.7, 0.9, 0.4], n_resamples=0)["brier"], 4)
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
    n = len(y)
    groups = _aligned("groups", groups, n)
    folds = _aligned("folds", folds, n)
    flags = _aligned("one_class", one_class, n, bool)
    flags = np.zeros(n, bool) if flags is None else flags
    pred = _aligned("predicted", predicted, n, float)
    B = int(n_resamples)
    if B < 0:
        raise StatsError(f"n_resamples must be >= 0, got {n_resamples!r}")
    level = round(100 * (1 - alpha), 6)
    units = "patients" if groups is not None else "pairs"
    boot = _BOOT.format(n=B, units=units, seed=seed) if B else "no bootstrap (0 resamples)"
    out = {"n": int(n), "unit": "pair", "interval_unit": "patient" if groups is not None else "pair",
           "method": METHOD.format(level=level, frac=frac, boot=boot), "reference": REFERENCE,
           "resamples": B, "seed": int(seed), "bins": [], "curve": None}
    for key, _name, _ideal in MEASURES:
        out.update({key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan})
    out.update(emax_probability=math.nan, emax_beyond=None)
    out.update(n_fit=0, excluded_from_fit=0, one_class_pairs=int(flags.sum()), one_class_folds=[],
               drawable=False, not_drawn=None, note=None)
    if flags.any():
        rows = pd.DataFrame({"fold": folds[flags] if folds is not None else [None] * int(flags.sum()),
                             "patient_id": groups[flags] if groups is not None else [None] * int(flags.sum())})
        out["one_class_folds"] = [{"fold": to_python(f), "patient_id": to_python(g), "pairs": int(len(sub))}
                                  for (f, g), sub in rows.groupby(["fold", "patient_id"], sort=True, dropna=False)]
    if n == 0:
        out["note"] = out["not_drawn"] = "not computed: no pair"
        return out
    out["brier"] = float(np.mean((p - y) ** 2))
    out["bins"] = _bins(p, y)
    notes = []
    fit_rows = ~flags & (p > 0) & (p < 1)
    out["n_fit"] = int(fit_rows.sum())
    out["excluded_from_fit"] = int(n - fit_rows.sum())
    if flags.any():
        folds_txt = ", ".join(str(f["fold"] if f["fold"] is not None else f["patient_id"])
                              for f in out["one_class_folds"])
        notes.append(f"{int(flags.sum())} pair(s) of {len(out['one_class_folds'])} fold(s) whose training set held "
                     f"one class (fold(s) {folds_txt}) have the probability of that class and are left out of the "
                     "intercept and slope fits")
    other = int((~flags & ~((p > 0) & (p < 1))).sum())
    if other:
        notes.append(f"{other} other probabilit{'y' if other == 1 else 'ies'} of exactly 0 or 1 left out of the "
                     "intercept and slope fits (infinite logit)")
    yf, pf = y[fit_rows], p[fit_rows]
    if len(yf) == 0 or yf.min() == yf.max():
        notes.append("intercept and slope not computed: the pairs of the fit hold one class only"
                     if len(yf) else "intercept and slope not computed: no pair left for the fit")
    else:
        lp = np.log(pf / (1 - pf))
        z = z_quantile(alpha)
        fit, why = _glm(yf, np.ones((len(yf), 1)), offset=lp)
        if fit is None:
            notes.append(f"calibration intercept not estimable ({why})")
        else:
            b, se = float(fit.params[0]), float(fit.bse[0])
            out.update(intercept=b, intercept_ci_low=b - z * se, intercept_ci_high=b + z * se)
        if np.ptp(lp) == 0:
            notes.append("calibration slope not estimable: every probability is the same")
        else:
            fit, why = _glm(yf, sm.add_constant(lp, has_constant="add"))
            if fit is None:
                notes.append(f"calibration slope not estimable ({why})")
            else:
                b, se = float(fit.params[1]), float(fit.bse[1])
                out.update(slope=b, slope_ci_low=b - z * se, slope_ci_high=b + z * se)
    flex = flexible_errors(y, p, frac)
    for key in ("ici", "e50", "e90", "emax", "emax_probability", "emax_beyond"):
        out[key] = flex[key]
    if not math.isfinite(flex["ici"]):
        notes.append("flexible calibration curve not estimable (fewer than 3 pairs or one distinct probability)")
    else:
        grid = np.linspace(p.min(), p.max(), CURVE_POINTS)
        curve = {"probability": grid, "observed": _curve_at(p, flex["smoothed"], grid),
                 "lower": np.full(len(grid), np.nan), "upper": np.full(len(grid), np.nan)}
        if B:
            _bootstrap(out, curve, y, p, groups, B, seed, alpha, frac, grid)
        out["curve"] = {k: [None if not np.isfinite(v) else float(v) for v in vals] for k, vals in curve.items()}
    out["drawable"], out["not_drawn"] = _drawable(out, y, pred)
    out["note"] = "; ".join(notes) if notes else None
    return out


def _bootstrap(out, curve, y, p, groups, B, seed, alpha, frac, grid):
    """Percentile intervals of the Brier score, ICI, E50 and E90 and the curve's pointwise band.

    None for Emax: the bootstrap distribution of a maximum does not approach
    its sampling distribution (Bickel & Freedman 1981, section 6).
    """
    keys = ("brier", "ici", "e50", "e90")
    draws = np.full((B, len(keys)), np.nan)
    band = np.full((B, len(grid)), np.nan)
    for b, rows in enumerate(patient_resample_rows(groups, len(y), B, seed)):
        yb, pb = y[rows], p[rows]
        flex = flexible_errors(yb, pb, frac)
        draws[b] = [float(np.mean((pb - yb) ** 2))] + [flex[k] for k in keys[1:]]
        band[b] = _curve_at(pb, flex["smoothed"], grid)
    lo_q, hi_q = 100 * alpha / 2, 100 * (1 - alpha / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # grid points no resample reaches
        for j, key in enumerate(keys):
            d = draws[:, j][np.isfinite(draws[:, j])]
            if len(d):
                out[f"{key}_ci_low"], out[f"{key}_ci_high"] = (float(v) for v in np.percentile(d, [lo_q, hi_q]))
        curve["lower"] = np.nanpercentile(band, lo_q, axis=0)
        curve["upper"] = np.nanpercentile(band, hi_q, axis=0)


def _drawable(out, y, pred):
    """Whether a calibration panel means anything, and if not why (in words)."""
    if pred is not None and len(pred) and pred.min() == pred.max():
        return False, ("no calibration panel: the model predicts one class for every pair, so a curve would show "
                       "the folds' class balance, not calibration")
    if y.min() == y.max():
        return False, "no calibration panel: the outcomes hold one class only"
    if not math.isfinite(out["slope"]):
        return False, "no calibration panel: the calibration slope is not estimable"
    if out["curve"] is None:
        return False, "no calibration panel: the flexible calibration curve is not estimable"
    return True, None


def calibration_rows(protocol, record):
    """The rows of ``tables/calibration.csv`` for one protocol's calibration record.

    One row per measure of :data:`MEASURES`: ``protocol``, ``measure``,
    ``estimate``, ``ci_low``, ``ci_high``, ``ideal``, ``interval`` (how the
    interval was computed), ``n``, ``n_fit``, ``one_class_pairs``, ``unit``,
    ``method``, ``reference``, ``note``.
    """
    rows = []
    for key, name, ideal in MEASURES:
        est = record.get(key)
        wald = key in ("intercept", "slope")
        interval = ("Wald (GLM)" if wald else
                    "none: the bootstrap is not consistent for a maximum (Bickel & Freedman 1981); at "
                    f"probability {record.get('emax_probability')}" if key == "emax" else
                    f"bootstrap percentile ({record.get('resamples')} resamples of {record.get('interval_unit')}s)")
        rows.append({"protocol": protocol, "measure": name, "estimate": est,
                     "ci_low": record.get(f"{key}_ci_low"), "ci_high": record.get(f"{key}_ci_high"),
                     "ideal": ideal, "interval": interval,
                     "n": record.get("n"), "n_fit": record.get("n_fit") if wald else record.get("n"),
                     "one_class_pairs": record.get("one_class_pairs"), "unit": record.get("unit"),
                     "method": record.get("method"), "reference": record.get("reference"),
                     "note": record.get("note")})
    return rows
