"""Small helpers shared by the statistics modules.

Nothing here computes a statistic: these functions validate arguments and
turn tidy DataFrames into JSON-safe records (``results.json`` and
``covreport diagnostic --json``).
"""

import math
import numbers

import numpy as np
import pandas as pd
from scipy import stats as _sps

from covreport.errors import StatsError


def check_alpha(alpha):
    """Return ``alpha`` as a float after checking 0 < alpha < 1.

    Raises
    ------
    StatsError
        If ``alpha`` is not a number strictly between 0 and 1.
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise StatsError(f"alpha must be a number between 0 and 1 (exclusive), got {show(alpha)}") from None
    if not (0.0 < value < 1.0):
        raise StatsError(f"alpha must be between 0 and 1 (exclusive), got {show(alpha)}")
    return value


def z_quantile(alpha):
    """Two-sided standard normal quantile: ``z`` with P(|Z| > z) = alpha."""
    return float(_sps.norm.ppf(1.0 - alpha / 2.0))


def to_python(value):
    """Convert a numpy/pandas scalar to a plain Python value; NaN, inf and NA become None."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_python(value.item())
    return value


def show(value):
    """``repr`` of a value for error messages, without numpy's type wrapper (2, not np.int64(2))."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _describe_missing(value):
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        value = float(value)
        if math.isinf(value):
            return "+inf" if value > 0 else "-inf"
    return "missing"


def records(df):
    """Turn a tidy DataFrame into a list of JSON-safe dicts.

    NaN, infinite and NA values become ``None``; numpy scalars become Python
    scalars. A row that loses a number this way and has no ``note`` of its own
    (no ``note`` column, or an empty one) gets a ``note`` naming the fields
    and whether each was missing or infinite, so that every ``null`` number in
    ``results.json`` comes with a reason.

    Parameters
    ----------
    df : pandas.DataFrame

    Returns
    -------
    list of dict
    """
    out = []
    for row in df.to_dict("records"):
        rec = {}
        lost = []
        for key, value in row.items():
            plain = to_python(value)
            if plain is None and value is not None and key != "note":
                if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                    lost.append(f"{key} is {_describe_missing(value)}")
            rec[key] = plain
        if lost and not rec.get("note"):
            rec["note"] = "; ".join(lost)
        out.append(rec)
    return out


def _sortable(col):
    """A column as sortable values: datetimes and numbers as floats (missing last), anything else as text."""
    s = pd.Series(col).reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(s):
        v = s.astype("int64").astype(float)
        return np.where(s.isna().to_numpy(), np.inf, v), None
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(dtype=float)
        return np.where(np.isnan(v), np.inf, v), None
    missing = s.isna().to_numpy()
    text = np.array(["" if m else str(v) for v, m in zip(s, missing)], dtype=object)
    return missing.astype(np.int8), text


def canonical_order(keys):
    """Row order of a table of sort keys, independent of its row order.

    Parameters
    ----------
    keys : pandas.DataFrame
        One row per item; columns are compared in order (the first is the
        primary key). Datetime and numeric columns sort by value, other
        columns as text; missing values sort last.

    Returns
    -------
    ndarray of int
        Indices that put the rows in canonical order (``np.lexsort``, stable:
        rows equal in every key keep their input order).
    """
    columns = []
    for name in keys.columns:
        first, text = _sortable(keys[name])
        columns.append(first)
        if text is not None:
            # rank the text so that lexsort compares integers
            uniq, inv = np.unique(text.astype(str), return_inverse=True)
            columns.append(inv.reshape(-1))
    if not columns:
        return np.arange(len(keys))
    return np.lexsort(tuple(reversed(columns)))


def patient_resample_rows(groups, n, n_resamples, seed):
    """Row indices of each patient-level bootstrap resample, one array per resample.

    The patients (``groups``, sorted by their text; each pair its own unit when
    ``groups`` is None) are drawn with replacement, all pairs of a drawn patient
    kept; resample b draws from the b-th child of ``numpy.random.SeedSequence(seed)``,
    so no resample depends on how many others are drawn.
    """
    codes = pd.factorize(pd.Series(groups).astype(str), sort=True)[0] if groups is not None else np.arange(n)
    G = int(codes.max()) + 1
    rows_of = [np.flatnonzero(codes == g) for g in range(G)]
    for child in np.random.SeedSequence(seed).spawn(n_resamples):
        pick = np.random.default_rng(child).integers(0, G, size=G)
        yield np.concatenate([rows_of[g] for g in pick])


def kish_design_effect(patient_ids):
    """Design effect at intra-patient correlation 1 (Kish 1965): sum of squared pairs per patient / pairs.

    Returns ``(deff, pairs)``, or ``(None, 0)`` without pairs. Computed on the integer counts, so the
    value is the correctly rounded quotient whichever caller asks.
    """
    counts = pd.Series(np.asarray(patient_ids, dtype=object)).astype(str).value_counts().to_numpy()
    n = int(counts.sum())
    return (int((counts.astype(np.int64) ** 2).sum()) / n, n) if n else (None, 0)

