"""Clinical predictors and the added value of the images (issue 22, sections 1 and 3; library part).

- :func:`predictor_matrix`: the design matrix of clinical predictors named as
  ``name`` (numeric) or ``name=A/B/C`` (categorical, levels listed, the first
  the reference), with the pairs that miss one and every bad value checked;
- :func:`added_value`: under leave-one-patient-out and covreport's main
  (penalised) protocol, the clinical model (the predictors alone), the imaging
  model (the CXR features) and the combined model (both), evaluated on the same
  pairs, and the comparisons combined vs clinical and imaging vs clinical
  (:func:`covreport.stats.model_comparison.compare_models`).

``covreport run --predictors`` (:mod:`covreport.pipeline`) calls them; the
report's "Added value of the images" section shows them.
"""


import math

import numpy as np
import pandas as pd

from covreport.errors import StatsError
from covreport.stats.auc import delong_auc
from covreport.stats.decision_curve import THRESHOLDS, net_benefit
from covreport.stats.lopo import lopo_predict
from covreport.stats.model_comparison import compare_models

ADDED_VALUE_METHOD = (
    "three models under leave-one-patient-out cross-validation with covreport's main protocol (inside each "
    "training fold every predictor standardised, L2-penalised logistic regression with its penalty tuned by an "
    "inner patient-grouped cross-validation): clinical (the clinical predictors, categorical ones as indicators of "
    "each level but the first), imaging (the first CXR's pooled DenseNet features) and combined (both), fitted "
    "and evaluated on the same pairs (those with every predictor); AUC with DeLong's CI, Brier score"
)


def _row_name(frame, i):
    return f"line {int(frame['line'].iloc[i])}" if "line" in frame else f"row {i}"


def blank_mask(values):
    """True where a manifest value is missing: NaN, None or blank text."""
    raw = pd.Series(values).astype(object)
    return raw.isna().to_numpy() | np.array([str(v).strip() == "" for v in raw], dtype=bool)


def _spec(text):
    name, _, levels = str(text).partition("=")
    name = name.strip()
    if not name:
        raise StatsError(f"predictor {text!r} has no column name; write NAME or NAME=LEVEL1/LEVEL2")
    if not levels:
        return {"name": name, "kind": "numeric", "levels": None}
    levels = [v.strip() for v in levels.split("/")]
    if len(levels) < 2 or any(not v for v in levels) or len(set(levels)) < len(levels):
        raise StatsError(f"predictor {text!r} must list two or more distinct levels, e.g. {name}=F/M")
    return {"name": name, "kind": "categorical", "levels": levels}


def predictor_matrix(frame, predictors):
    """The clinical predictors of each pair as a numeric design matrix.

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per pair with the predictor columns (values as read from the
        manifest; a ``line`` column, when present, names rows in errors).
    predictors : sequence of str
        ``name`` for a numeric predictor, ``name=A/B/C`` for a categorical one
        with its levels (the first is the reference).

    Returns
    -------
    (pandas.DataFrame, ndarray of bool, list of dict)
        The matrix (a column per numeric predictor, an indicator ``name[level]``
        per non-reference level; NaN where the pair misses the predictor), the
        pairs with every predictor, and the specs (``name``, ``kind``,
        ``levels``, ``missing``: pairs without it).

    Raises
    ------
    StatsError
        An unknown column, a value that is not a number, a level not listed,
        or a predictor named twice; the message names the row and the fix.
    """
    specs = [_spec(p) for p in predictors]
    names = [s["name"] for s in specs]
    if not specs:
        raise StatsError("no clinical predictor named")
    if len(set(names)) < len(names):
        raise StatsError(f"a predictor is named twice in {', '.join(names)}")
    columns = {}
    complete = np.ones(len(frame), dtype=bool)
    for s in specs:
        if s["name"] not in frame.columns:
            raise StatsError(f"predictor column {s['name']!r} is not in the manifest (its columns: "
                             f"{', '.join(map(str, frame.columns[:20]))}); add it or fix the name")
        raw = frame[s["name"]].astype(object)
        blank = blank_mask(raw)
        s["missing"] = int(blank.sum())
        complete &= ~blank
        if s["kind"] == "numeric":
            values = pd.to_numeric(raw.where(~blank), errors="coerce").to_numpy(dtype=float)
            bad = ~blank & ~np.isfinite(values)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise StatsError(f"{_row_name(frame, i)}, column {s['name']!r}: {raw.iloc[i]!r} is not a number; "
                                 f"write a number, leave it blank when not measured, or name the predictor as "
                                 f"{s['name']}=LEVEL1/LEVEL2 if it is categorical")
            columns[s["name"]] = np.where(blank, np.nan, values)
        else:
            text = np.array([str(v).strip() for v in raw], dtype=object)
            bad = ~blank & ~np.isin(text, s["levels"])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise StatsError(f"{_row_name(frame, i)}, column {s['name']!r}: {raw.iloc[i]!r} is not one of the "
                                 f"levels {'/'.join(s['levels'])}; fix the value or list it in the predictor")
            for level in s["levels"][1:]:
                columns[f"{s['name']}[{level}]"] = np.where(blank, np.nan, (text == level).astype(float))
    return pd.DataFrame(columns, index=frame.index), complete, specs


#: Columns of :func:`predictor_summary` (one row per predictor, level and outcome group).
SUMMARY_COLUMNS = ("predictor", "kind", "level", "group", "pairs", "n", "missing", "mean", "sd", "median", "q1",
                   "q3", "count", "percent", "unit", "method", "note")

SUMMARY_METHOD = ("descriptive, counted by pair (pairs of one patient are not independent): numeric predictors "
                  "as mean and sample SD (ddof 1), median and quartiles (linear interpolation, numpy's default); "
                  "categorical ones as count and percentage of the pairs with the predictor recorded; blank "
                  "cells counted as missing; no baseline tests")


def predictor_summary(frame, predictors, outcome):
    """Table 1 rows of the clinical predictors: each predictor per outcome group, counted by pair.

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per analysed pair with the predictor columns.
    predictors : sequence of str
        As :func:`predictor_matrix` (``name`` or ``name=A/B``).
    outcome : array-like
        Outcome group of each pair (Worse/Stable/Improved).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SUMMARY_COLUMNS`; groups "All pairs" then each outcome
        present. A numeric predictor has one row per group (``n`` recorded,
        ``missing``, mean, SD, median, quartiles); a categorical one has a row
        per level and group (``count``, ``percent`` of the ``n`` recorded).
    """
    from covreport.constants import OUTCOMES

    X, _complete, specs = predictor_matrix(frame, predictors)
    outcome = np.asarray(outcome, dtype=object)
    groups = [("All pairs", np.ones(len(frame), dtype=bool))]
    groups += [(o, outcome == o) for o in OUTCOMES if (outcome == o).any()]
    rows = []
    for s in specs:
        blank = blank_mask(frame[s["name"]])
        text = np.array([str(v).strip() for v in frame[s["name"]]], dtype=object)
        for group, inside in groups:
            recorded = inside & ~blank
            base = {"predictor": s["name"], "kind": s["kind"], "group": group, "pairs": int(inside.sum()),
                    "n": int(recorded.sum()), "missing": int((inside & blank).sum()), "unit": "pair",
                    "method": SUMMARY_METHOD}
            if s["kind"] == "numeric":
                v = X[s["name"]].to_numpy()[recorded]
                q1, med, q3 = (np.percentile(v, [25, 50, 75]) if len(v) else (math.nan,) * 3)
                note = "count and percent: categorical predictors only"
                if len(v) < 2:
                    note += f"; {len(v)} pair(s) with the predictor recorded: no " + ("SD" if len(v) else "summary")
                rows.append({**base, "level": None, "mean": float(v.mean()) if len(v) else math.nan,
                             "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan, "median": float(med),
                             "q1": float(q1), "q3": float(q3), "note": note})
                continue
            for level in s["levels"]:
                count = int((recorded & (text == level)).sum())
                note = "mean, SD, median and quartiles: numeric predictors only"
                if not base["n"]:
                    note += "; no pair with the predictor recorded: no percent"
                rows.append({**base, "level": level, "count": count,
                             "percent": 100.0 * count / base["n"] if base["n"] else math.nan, "note": note})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _non_negative(X):
    """Each column shifted by its minimum: the protocol standardises inside each fold, so a shift changes nothing
    but satisfies lopo_predict's check (written for chi-square selection)."""
    X = np.asarray(X, dtype=float)
    return X - np.minimum(X.min(axis=0), 0.0)


def _brier(y, p):
    return float(np.mean((np.asarray(p) - y) ** 2))


def added_value(images, clinical, y, patients, *, n_resamples=2000, seed=0, alpha=0.05):
    """Clinical, imaging and combined models on the same pairs, and what the images add.

    Parameters
    ----------
    images : ndarray or DataFrame (n_pairs, n_features)
        The first CXR's pooled features (non-negative).
    clinical : ndarray or DataFrame (n_pairs, n_predictors)
        :func:`predictor_matrix` of the same pairs, without missing values.
    y : array_like of 0/1
        1 = the positive class (Worse).
    patients : array_like
        Patient of each pair (the folds and the bootstrap's cluster).
    n_resamples, seed, alpha
        Of the patient bootstrap of :func:`compare_models`.

    Returns
    -------
    dict
        ``models``: {"clinical" | "imaging" | "combined": {"auc" (DeLong, with
        its CI), "brier", "probabilities" (out-of-fold, input order),
        "features", "engine"}}; ``comparison``: the records of
        :func:`compare_models` for "combined vs clinical" and "imaging vs
        clinical"; ``decision_curve``: the net benefit of each model and of
        treating all at the thresholds 0.05-0.95 (Vickers & Elkin 2006);
        ``n_pairs``, ``n_patients``, ``events``, ``method``.
    """
    y = np.asarray(y).astype(int)
    clin = np.asarray(clinical, dtype=float)
    img = np.asarray(images, dtype=float)
    if clin.ndim != 2 or img.ndim != 2 or len(clin) != len(y) or len(img) != len(y):
        raise StatsError(f"images, clinical and y must have one row per pair ({len(y)}), got {img.shape} and "
                         f"{clin.shape}")
    if not np.isfinite(clin).all():
        raise StatsError("the clinical predictors have missing values: keep the pairs with every predictor "
                         "(predictor_matrix's complete mask)")
    groups = np.asarray(patients, dtype=object)
    designs = {"clinical": _non_negative(clin), "imaging": img,
               "combined": np.hstack([_non_negative(clin), img])}
    models = {}
    for name, X in designs.items():
        res = lopo_predict(X, y, groups, protocol="penalised", final_model=False)
        p = np.asarray(res["probabilities"], dtype=float)
        models[name] = {"auc": delong_auc(y, p, alpha=alpha), "brier": _brier(y, p), "probabilities": p.tolist(),
                        "features": int(X.shape[1]), "engine": res.get("engine")}
    comparison = pd.concat([
        compare_models(y, models[new]["probabilities"], models["clinical"]["probabilities"], groups,
                       name=f"{new} vs clinical", n_resamples=n_resamples, seed=seed, alpha=alpha)
        for new in ("combined", "imaging")], ignore_index=True)
    curves = []
    for name, m in models.items():   # the three models' decision curves, on one figure in the report
        nb = net_benefit(y, m["probabilities"], THRESHOLDS)
        curves += [{"model": name, "threshold": t, "net_benefit": float(v), "treat_all": float(a)}
                   for t, v, a in zip(THRESHOLDS, nb["net_benefit"], nb["treat_all"])]
    return {"models": models, "comparison": comparison.to_dict("records"), "decision_curve": curves,
            "n_pairs": int(len(y)),
            "n_patients": int(len(set(map(str, groups)))), "events": int(y.sum()), "method": ADDED_VALUE_METHOD}


__all__ = ["ADDED_VALUE_METHOD", "added_value", "blank_mask", "predictor_matrix"]
