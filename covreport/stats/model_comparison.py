"""The added value of a model over another on the same pairs: combined vs clinical (issue 22, section 3).

- :func:`reclassification`: the category-free net reclassification improvement
  (NRI > 0, with its event and non-event parts), the integrated discrimination
  improvement (IDI) and the difference in Brier score of a new model's
  probabilities over an old model's;
- :func:`compare_models`: those with patient-bootstrap percentile intervals,
  beside the difference in AUC by DeLong's paired test and by Obuchowski's
  clustered comparison, as a tidy table (``tables/model_comparison.csv``:
  comparison, measure, estimate, lower, upper, p, method).

The probabilities are out-of-fold predictions of the two models for the same
pairs; the bootstrap resamples them (patients with all their pairs), it does
not refit the models.

References
----------
.. [1] Pencina MJ, D'Agostino RB Sr, D'Agostino RB Jr, Vasan RS. Evaluating the
   added predictive ability of a new marker: from area under the ROC curve to
   reclassification and beyond. Stat Med 2008;27:157-172 (IDI).
.. [2] Pencina MJ, D'Agostino RB Sr, Steyerberg EW. Extensions of net
   reclassification improvement calculations to measure usefulness of new
   biomarkers. Stat Med 2011;30:11-21 (category-free NRI).
.. [3] DeLong ER, DeLong DM, Clarke-Pearson DL. Biometrics 1988;44:837-845.
.. [4] Obuchowski NA. Biometrics 1997;53:567-578.
"""

import math

import numpy as np
import pandas as pd

from covreport.errors import StatsError
from covreport.stats._util import check_alpha, z_quantile
from covreport.stats.auc import delong_test
from covreport.stats.clustered import _codes, _percentile, obuchowski_compare, resample_counts

#: Columns of :func:`compare_models` (and of tables/model_comparison.csv).
COMPARISON_COLUMNS = ("comparison", "measure", "estimate", "lower", "upper", "p", "method")

NRI_METHOD = ("category-free net reclassification improvement NRI(>0) (Pencina et al. 2011): "
              "[P(up | event) - P(down | event)] + [P(down | non-event) - P(up | non-event)], up when the new "
              "model's probability exceeds the old one's, down when it is lower, ties neither (as R's "
              "Hmisc improveProb)")
IDI_METHOD = ("integrated discrimination improvement (Pencina et al. 2008): the new minus the old model's mean "
              "probability in events, minus the same difference in non-events (as R's Hmisc improveProb)")
BRIER_METHOD = "difference in Brier score, new minus old model (negative: the new model's probabilities are closer)"
BOOT_NOTE = ("; 95% patient-bootstrap percentile interval ({n:,} resamples, seed {seed}: patients drawn with "
             "replacement with all their pairs, the out-of-fold probabilities resampled, the models not refitted; "
             "resamples without an event or a non-event left out)")


def _inputs(y, p_new, p_old):
    y = np.asarray(y)
    new = np.asarray(p_new, dtype=float)
    old = np.asarray(p_old, dtype=float)
    if y.ndim != 1 or new.shape != y.shape or old.shape != y.shape:
        raise StatsError(f"y, p_new and p_old must be one-dimensional and aligned, got {y.shape}, {new.shape} "
                         f"and {old.shape}")
    if not set(np.unique(y)) <= {0, 1, True, False}:
        raise StatsError("y must be 0/1 (1 = event)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise StatsError("y needs both events and non-events")
    for name, p in (("p_new", new), ("p_old", old)):
        if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
            raise StatsError(f"{name} must hold probabilities in [0, 1], without missing values")
    return y, new, old


def _parts(y, new, old):
    """Per-unit terms whose sums give every measure: counts and sums for events and non-events."""
    up, down = new > old, new < old
    ev, ne = y, ~y
    diff = new - old
    return {"events": ev.astype(float), "nonevents": ne.astype(float),
            "up_ev": (up & ev).astype(float), "down_ev": (down & ev).astype(float),
            "up_ne": (up & ne).astype(float), "down_ne": (down & ne).astype(float),
            "diff_ev": np.where(ev, diff, 0.0), "diff_ne": np.where(ne, diff, 0.0),
            "brier": (new - y) ** 2 - (old - y) ** 2, "ones": np.ones(len(y))}


def _measures(s):
    """The measures from sums (scalars or arrays over resamples) of :func:`_parts`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        nri_ev = (s["up_ev"] - s["down_ev"]) / s["events"]
        nri_ne = (s["down_ne"] - s["up_ne"]) / s["nonevents"]
        return {"nri": nri_ev + nri_ne, "nri_events": nri_ev, "nri_nonevents": nri_ne,
                "idi": s["diff_ev"] / s["events"] - s["diff_ne"] / s["nonevents"],
                "brier_difference": s["brier"] / s["ones"]}


def reclassification(y, p_new, p_old):
    """Category-free NRI, IDI and the Brier-score difference of ``p_new`` over ``p_old``.

    Parameters
    ----------
    y : array_like of 0/1
        1 = event (e.g. Worse).
    p_new, p_old : array_like of float
        The two models' probabilities of the event for the same units.

    Returns
    -------
    dict
        ``nri``, ``nri_events``, ``nri_nonevents``, ``idi``, ``brier_difference``
        (new minus old), ``n``, ``events``.

    References
    ----------
    Pencina et al. Stat Med 2008;27:157-172 and 2011;30:11-21.

    Examples
    --------
    >>> r = reclassification([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.3], [0.6, 0.7, 0.4, 0.3])
    >>> r["nri_events"], r["nri_nonevents"], round(r["idi"], 3)
    (1.0, 0.5, 0.3)
    """
    y, new, old = _inputs(y, p_new, p_old)
    sums = {k: float(v.sum()) for k, v in _parts(y, new, old).items()}
    out = {k: float(v) for k, v in _measures(sums).items()}
    out.update(n=len(y), events=int(y.sum()))
    return out


def compare_models(y, p_new, p_old, patients, *, name="combined vs clinical", n_resamples=2000, seed=0,
                   alpha=0.05):
    """The added value of the new model over the old: AUC, Brier, NRI and IDI with their intervals.

    Parameters
    ----------
    y : array_like of 0/1
    p_new, p_old : array_like of float
        Out-of-fold probabilities of the two models for the same pairs.
    patients : array_like
        Patient of each pair (the bootstrap's and Obuchowski's cluster).
    name : str
        The ``comparison`` column (e.g. "combined vs clinical").
    n_resamples : int
        Patient-bootstrap resamples (0: no intervals for the bootstrap measures).
    seed : int
    alpha : float

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COMPARISON_COLUMNS`, one row per measure:
        ``auc_difference`` (DeLong's paired test, pairs as units),
        ``auc_difference_clustered`` (Obuchowski's clustered comparison),
        ``brier_difference``, ``nri``, ``nri_events``, ``nri_nonevents`` and
        ``idi`` (patient-bootstrap percentile intervals, no p).
    """
    alpha = check_alpha(alpha)
    y, new, old = _inputs(y, p_new, p_old)
    n_resamples = int(n_resamples)
    if n_resamples < 0:
        raise StatsError(f"the bootstrap needs 0 or more resamples, got {n_resamples}")
    codes = _codes(patients, len(y))        # patients in sorted order (as text): draws do not depend on rows
    G = int(codes.max()) + 1
    rows = []
    d = delong_test(y.astype(int), new, old)
    half = z_quantile(alpha) * d["se"]
    rows.append({"measure": "auc_difference", "estimate": d["difference"], "lower": d["difference"] - half,
                 "upper": d["difference"] + half, "p": d["p"],
                 "method": d["method"] + "; 95% Wald interval of the difference"})
    c = obuchowski_compare(y.astype(int), new, old, patients, alpha=alpha)
    rows.append({"measure": "auc_difference_clustered", "estimate": c["difference"], "lower": c["ci_low"],
                 "upper": c["ci_high"], "p": c["p"], "method": c["method"]})
    parts = _parts(y, new, old)
    point = _measures({k: float(v.sum()) for k, v in parts.items()})
    counts = resample_counts(G, n_resamples, seed)
    draws = _measures({k: counts @ np.bincount(codes, weights=v, minlength=G) for k, v in parts.items()})
    note = BOOT_NOTE.format(n=n_resamples, seed=seed) if n_resamples else "; no interval (no bootstrap resamples)"
    methods = {"brier_difference": BRIER_METHOD, "nri": NRI_METHOD,
               "nri_events": "the events' part of the category-free NRI: P(up | event) - P(down | event)",
               "nri_nonevents": ("the non-events' part of the category-free NRI: "
                                 "P(down | non-event) - P(up | non-event)"),
               "idi": IDI_METHOD}
    for measure, method in methods.items():
        lo, hi, _bad = _percentile(np.asarray(draws[measure], dtype=float), alpha)
        rows.append({"measure": measure, "estimate": float(point[measure]), "lower": lo, "upper": hi,
                     "p": math.nan, "method": method + note})
    out = pd.DataFrame(rows)
    out.insert(0, "comparison", name)
    return out[list(COMPARISON_COLUMNS)]


__all__ = ["COMPARISON_COLUMNS", "compare_models", "reclassification"]
