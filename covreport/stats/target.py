"""A clinical target for the prediction (issue 22, section 2): ``--target COLUMN --positive VALUE``.

By default the prediction's outcome is the radiological course (Worse vs
Improved). With a target, the prediction, its metrics, calibration and decision
curves use a binary outcome held in a manifest column instead (for example
intubation or death within 14 days of the first CXR), on every analysed pair
whose value is recorded, whatever its radiological outcome; the change analysis
keeps the radiological outcome.

:func:`target_classes` checks the column (every bad value with its line) and
gives each pair its class.
"""

import numpy as np
import pandas as pd

from covreport.errors import StatsError
from covreport.stats.added_value import _row_name, blank_mask

TARGET_METHOD = ("the prediction's outcome is the manifest column {column!r}: {positive} (positive) against "
                 "{negative}, on every analysed pair with the value recorded (Worse, Stable and Improved alike); "
                 "pairs with the cell blank are left out of the prediction and counted in the flow diagram; the "
                 "change analysis keeps the radiological outcome")


def _same(value, positive):
    """Whether a cell holds the positive value: equal text, or equal numbers (``1`` and ``1.0``)."""
    if value == positive:
        return True
    try:
        return float(value) == float(positive)
    except ValueError:
        return False


def class_name(column, value):
    """How a class of the target is named in records, tables and text: ``column = value``."""
    return f"{column} = {value}"


def target_classes(frame, column, positive):
    """The class of each pair for the target ``column`` with ``positive`` as the positive value.

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per pair with the manifest's columns (a ``line`` column, when
        present, names rows in errors).
    column : str
        The manifest column holding the target.
    positive : str
        The value of the positive class; the column's one other value is the
        negative class (values compared as text, or as numbers when both are
        numbers). Blank cells are not recorded.

    Returns
    -------
    (ndarray of object, dict)
        Per pair the positive class name, the negative one, or None (blank),
        and the record of ``results.json`` ``prediction_target`` without the
        pair counts (``column``, ``positive``, ``negative``,
        ``positive_class``, ``negative_class``, ``method``).

    Raises
    ------
    StatsError
        The column is not in the manifest, no pair holds the positive value,
        or the column holds a third value; the message names the line and the
        fix.
    """
    column, positive = str(column).strip(), str(positive).strip()
    if not column:
        raise StatsError("--target names no column; write --target COLUMN --positive VALUE")
    if not positive:
        raise StatsError(f"--target {column} needs --positive VALUE: the value of the positive class")
    if column not in frame.columns:
        raise StatsError(f"target column {column!r} is not in the manifest (its columns: "
                         f"{', '.join(map(str, frame.columns[:20]))}); add it or fix the name")
    raw = frame[column].astype(object)
    blank = blank_mask(raw)
    text = np.array(["" if b else str(v).strip() for v, b in zip(raw, blank)], dtype=object)
    is_pos = np.array([not b and _same(v, positive) for v, b in zip(text, blank)], dtype=bool)
    others = ~blank & ~is_pos
    levels = list(dict.fromkeys(text[others]))
    if not is_pos.any():
        seen = ", ".join(repr(v) for v in levels) or "none (every cell is blank)"
        raise StatsError(f"target column {column!r}: no pair has the value {positive!r} given by --positive "
                         f"(its values: {seen}); give the value of the positive class")
    if len(levels) > 1:
        i = int(np.flatnonzero(others & (text == levels[1]))[0])
        raise StatsError(f"{_row_name(frame, i)}, column {column!r}: {raw.iloc[i]!r} is a third value beside "
                         f"{positive!r} and {levels[0]!r}; a target is binary: fix the value, or leave the cell "
                         "blank where the outcome is not known")
    if not levels:
        raise StatsError(f"target column {column!r}: every recorded value is {positive!r}; the prediction needs "
                         "pairs of both classes")
    negative = levels[0]
    pos_name, neg_name = class_name(column, positive), class_name(column, negative)
    classes = np.where(blank, None, np.where(is_pos, pos_name, neg_name)).astype(object)
    record = {"column": column, "positive": positive, "negative": negative, "positive_class": pos_name,
              "negative_class": neg_name, "unit": "pair",
              "method": TARGET_METHOD.format(column=column, positive=pos_name, negative=neg_name)}
    return classes, record


def target_record(frame, classes, record):
    """``record`` with the pairs of the prediction and those left out for want of the target."""
    frame = pd.DataFrame(frame).reset_index(drop=True)
    have = np.array([c is not None for c in classes], dtype=bool)
    missing = [{"pair_id": str(frame["pair_id"][i]), "patient_id": str(frame["patient_id"][i]),
                "outcome": str(frame["outcome"][i]), "reason": f"{record['column']} not recorded"}
               for i in np.flatnonzero(~have)]
    n_pos = int(sum(c == record["positive_class"] for c in classes))
    return dict(record, pairs_with_target=int(have.sum()),
                patients_with_target=int(frame.loc[have, "patient_id"].nunique()),
                positive_pairs=n_pos, negative_pairs=int(have.sum()) - n_pos, excluded=missing)
