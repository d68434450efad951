"""Decision-curve analysis of out-of-fold probabilities (Vickers & Elkin 2006).

At a threshold probability pt, treating the pairs whose probability is >= pt
has the net benefit NB = TP/n - FP/n x pt / (1 - pt); treating every pair
has NB_all = prevalence - (1 - prevalence) x pt / (1 - pt), treating none 0.
"Net interventions avoided per 100" = (NB - NB_all) x 100 x (1 - pt) / pt.
The same numbers as ``dcurves.dca`` (checked in the tests).

References
----------
.. [1] Vickers AJ, Elkin EB. Decision curve analysis: a novel method for
   evaluating prediction models. Med Decis Making 2006;26:565-574.
.. [2] Vickers AJ, Van Calster B, Steyerberg EW. Net benefit approaches to
   the evaluation of prediction models, molecular markers, and diagnostic
   tests. BMJ 2016;352:i6.
"""

import math

import numpy as np
import pandas as pd

from covreport.constants import WORSE
from covreport.errors import StatsError
from covreport.stats._util import check_alpha, patient_resample_rows

#: Default threshold probabilities: 0.05 to 0.95 in steps of 0.01.
THRESHOLDS = tuple(round(t / 100, 2) for t in range(5, 96))

#: Resamples of the patient bootstrap band (pipeline: ``--bootstrap``).
RESAMPLES = 1000

REFERENCE = ("Vickers AJ, Elkin EB. Med Decis Making 2006;26:565-574; Vickers AJ, Van Calster B, Steyerberg EW. "
             "BMJ 2016;352:i6")

METHOD = (
    "Decision-curve analysis (Vickers & Elkin 2006) of the out-of-fold probabilities of {positive}: at each "
    "threshold probability pt ({span}), a pair is treated as {positive} when its probability is >= pt; net benefit "
    "= TP/n - FP/n x pt/(1 - pt), against treating every pair (prevalence - (1 - prevalence) x pt/(1 - pt)) "
    "and none (0); net interventions avoided per 100 pairs = (NB - NB treat-all) x 100 x (1 - pt)/pt; "
    "{band}; the numbers agree with dcurves' dca (tested)"
)

#: Columns of tables/decision_curve.csv, in order.
COLUMNS = ("protocol", "threshold", "net_benefit", "lower", "upper", "treat_all", "treat_none",
           "net_interventions_avoided", "nia_lower", "nia_upper", "tp", "fp", "n", "prevalence")


def check_thresholds(thresholds):
    """Threshold probabilities as a sorted float array, each strictly between 0 and 1 (else StatsError)."""
    try:
        t = np.asarray(THRESHOLDS if thresholds is None else list(thresholds), dtype=float)
    except (TypeError, ValueError):
        raise StatsError(f"the decision-curve thresholds must be numbers, got {thresholds!r}") from None
    if t.ndim != 1 or not len(t):
        raise StatsError("the decision-curve thresholds must be a non-empty list of numbers")
    if not (np.isfinite(t).all() and (t > 0).all() and (t < 1).all()):
        raise StatsError("the decision-curve thresholds must lie strictly between 0 and 1 "
                         "(net benefit weighs false positives by pt / (1 - pt))")
    return np.unique(t)


def net_benefit(y, probability, thresholds):
    """TP, FP and the net benefit of treating the pairs with probability >= each threshold.

    Parameters
    ----------
    y : array_like of 0/1
    probability : array_like of float
    thresholds : array_like of float in (0, 1)

    Returns
    -------
    dict of ndarray
        ``tp``, ``fp``, ``net_benefit``, ``treat_all`` (one value per threshold).

    Examples
    --------
    >>> res = net_benefit([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], [0.5])
    >>> float(res["net_benefit"][0])   # 1/4 - 1/4 x 0.5/0.5
    0.0
    """
    y = np.asarray(y, dtype=bool)
    p = np.asarray(probability, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    n = len(y)
    hit = p[:, None] >= t[None, :]
    tp = (hit & y[:, None]).sum(axis=0)
    fp = (hit & ~y[:, None]).sum(axis=0)
    odds = t / (1 - t)
    prev = y.mean() if n else math.nan
    return {"tp": tp, "fp": fp, "net_benefit": tp / n - fp / n * odds, "treat_all": prev - (1 - prev) * odds}


def decision_curve(y, probability, *, groups=None, thresholds=None, n_resamples=RESAMPLES, seed=0, alpha=0.05):
    """Net benefit over thresholds with treat-all, treat-none and a patient-level bootstrap band.

    Parameters
    ----------
    y : array_like of 0/1
        Observed outcome (1 = positive).
    probability : array_like of float
        Predicted probability of the positive class, in [0, 1].
    groups : array_like, optional
        Patient of each pair; the bootstrap resamples patients with all their
        pairs (without it, pairs).
    thresholds : array_like, optional
        Threshold probabilities in (0, 1); default :data:`THRESHOLDS`.
    n_resamples : int
        Bootstrap resamples (0: no band, ``lower`` and ``upper`` are NaN).
    seed : int
        Seed of ``numpy.random.SeedSequence``; resample b draws from its b-th
        spawned child.
    alpha : float
        1 - level of the pointwise percentile band.

    Returns
    -------
    pandas.DataFrame
        One row per threshold with the columns of :data:`COLUMNS` but
        ``protocol``.

    Raises
    ------
    StatsError
        Misaligned inputs, outcomes other than 0/1, probabilities outside
        [0, 1], no pair, or bad thresholds.

    References
    ----------
    Vickers & Elkin 2006; Vickers, Van Calster & Steyerberg 2016.
    """
    alpha = check_alpha(alpha)
    t = check_thresholds(thresholds)
    y = np.asarray(y, dtype=float)
    p = np.asarray(probability, dtype=float)
    if y.ndim != 1 or p.shape != y.shape:
        raise StatsError(f"outcomes and probabilities must be one-dimensional and aligned, got {y.shape} and {p.shape}")
    if not len(y):
        raise StatsError("a decision curve needs at least one pair")
    if not np.isin(y, (0.0, 1.0)).all():
        raise StatsError("the outcomes must hold 0 and 1 only")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise StatsError("the probabilities must be numbers between 0 and 1")
    B = int(n_resamples)
    if B < 0:
        raise StatsError(f"n_resamples must be >= 0, got {n_resamples!r}")
    y = y.astype(bool)
    base = net_benefit(y, p, t)
    weight = 100 * (1 - t) / t
    nia = (base["net_benefit"] - base["treat_all"]) * weight
    lower = upper = nia_lo = nia_hi = np.full(len(t), np.nan)
    if B:
        if groups is not None:
            groups = np.asarray(groups, dtype=object)
            if groups.shape != y.shape:
                raise StatsError(f"groups must have one value per pair ({len(y)}), got shape {groups.shape}")
        nb = np.empty((B, len(t)))
        gain = np.empty((B, len(t)))
        for b, rows in enumerate(patient_resample_rows(groups, len(y), B, seed)):
            res = net_benefit(y[rows], p[rows], t)
            nb[b] = res["net_benefit"]
            gain[b] = (res["net_benefit"] - res["treat_all"]) * weight
        q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
        lower, upper = np.percentile(nb, q, axis=0)
        nia_lo, nia_hi = np.percentile(gain, q, axis=0)
    return pd.DataFrame({
        "threshold": t, "net_benefit": base["net_benefit"], "lower": lower, "upper": upper,
        "treat_all": base["treat_all"], "treat_none": np.zeros(len(t)), "net_interventions_avoided": nia,
        "nia_lower": nia_lo, "nia_upper": nia_hi, "tp": base["tp"].astype(int), "fp": base["fp"].astype(int),
        "n": len(y), "prevalence": float(y.mean()),
    })


def _ranges(thresholds, mask):
    """Contiguous runs of ``mask`` as [(first threshold, last threshold)]."""
    out, start = [], None
    for i, on in enumerate(mask):
        if on and start is None:
            start = i
        if start is not None and (not on or i == len(mask) - 1):
            end = i if on else i - 1
            out.append((float(thresholds[start]), float(thresholds[end])))
            start = None
    return out


def decision_curves(prediction, *, thresholds=None, n_resamples=RESAMPLES, seed=0, alpha=0.05):
    """The ``decision_curve`` record of results.json: every protocol of a ``prediction`` block.

    Every entry of ``prediction`` that is a protocol block with out-of-fold
    probabilities (``pairs`` with ``probability``, ``outcome`` and
    ``patient_id``) gets a curve, whatever the protocols are called.

    Returns
    -------
    dict
        ``rows`` (tidy records with the columns of :data:`COLUMNS`),
        ``protocols`` ({name: summary: ``prevalence``, ``n``, ``role``,
        ``useful`` ranges of thresholds where the model's net benefit exceeds
        both treat-all and treat-none, ``n_useful`` how many thresholds}), ``thresholds``, ``resamples``,
        ``seed``, ``level``, ``unit`` ("pair"), ``interval_unit``
        ("patient"), ``method``, ``reference``, ``note``.
    """
    t = check_thresholds(thresholds)
    alpha = check_alpha(alpha)
    frames, protocols = [], {}
    positive = (prediction or {}).get("positive_class", WORSE)
    for name, block in (prediction or {}).items():
        if not isinstance(block, dict):
            continue
        pairs = [r for r in block.get("pairs") or [] if r.get("probability") is not None]
        if not pairs:
            continue
        y = np.array([r.get("outcome") == positive for r in pairs], dtype=float)
        p = np.array([float(r["probability"]) for r in pairs])
        g = [r.get("patient_id") for r in pairs]
        df = decision_curve(y, p, groups=g, thresholds=t, n_resamples=n_resamples, seed=seed, alpha=alpha)
        df.insert(0, "protocol", name)
        frames.append(df)
        better = (df["net_benefit"] > df["treat_all"]) & (df["net_benefit"] > 0)
        protocols[name] = {"n": int(len(y)), "prevalence": float(y.mean()), "role": block.get("role"),
                           "n_useful": int(better.sum()),
                           "useful": [{"from": a, "to": b} for a, b in _ranges(df["threshold"].to_numpy(),
                                                                                better.to_numpy())]}
    span = (f"{t[0]:g} to {t[-1]:g}, {len(t)} thresholds")
    level = round(100 * (1 - alpha), 6)
    band = (f"{level:g}% pointwise percentile band from {int(n_resamples):,} bootstrap resamples of the patients "
            f"with replacement (all their pairs; numpy SeedSequence({seed}).spawn, one stream each)"
            if n_resamples else "no interval band (no bootstrap: --bootstrap 0)")
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    return {"rows": rows[list(COLUMNS)].to_dict("records"), "protocols": protocols,
            "thresholds": [float(v) for v in t], "resamples": int(n_resamples), "seed": int(seed),
            "level": 1 - alpha, "unit": "pair", "interval_unit": "patient",
            "method": METHOD.format(span=span, band=band, positive=positive),
            "reference": REFERENCE,
            "note": None if frames else "not computed: no protocol has out-of-fold probabilities"}
