"""CheXpert's CSV files: the label CSVs (``train.csv``, ``valid.csv``) and reference cohorts.

The statistics read no files: these readers turn CheXpert-format CSVs into the
DataFrames :mod:`covreport.stats` takes (validation truth for
:func:`covreport.stats.validation_auc`, a reference cohort for Table 1), and
the training split with its image files for :mod:`covreport.train`. Every
cell is checked by content; errors name the file, the data row and the column.

Reference: Irvin J et al. CheXpert: a large chest radiograph dataset with
uncertainty labels and expert comparison. AAAI 2019;33:590-597.
"""

import re
from pathlib import Path

import numpy as np
import pandas as pd

from covreport.constants import CHEXPERT_LABELS, CHEXPERT_META_COLUMNS
from covreport.errors import CovreportError, ModelError, ScoresError
from covreport.stats._util import show

_REFERENCE_SEX = {"Male": "M", "Female": "F", "Unknown": None}


def read_chexpert_csv(path, labels=None):
    """Read a CheXpert-format label CSV (e.g. ``valid.csv``).

    Parameters
    ----------
    path : str or path-like
    labels : sequence of str, optional
        Label columns that must be present. By default every one of CheXpert's
        14 label columns the file has is kept, and at least one is required.

    Returns
    -------
    pandas.DataFrame
        The file's ``Path`` column and the label columns (floats: 1, 0, -1 or
        NaN), in the file's row order.

    Raises
    ------
    ScoresError
        The file cannot be read, lacks ``Path`` or a label column, or holds a
        label value other than 1, 0, -1 or blank.
    """
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ScoresError(f"cannot read the CheXpert label CSV {str(path)!r}: {exc}") from None
    if labels is None:
        labels = [lab for lab in CHEXPERT_LABELS if lab in df.columns]
        missing = ["Path"] if "Path" not in df.columns else []
        if not labels:
            missing.append("any of CheXpert's label columns " + ", ".join(CHEXPERT_LABELS))
    else:
        labels = list(labels)
        missing = [c for c in ["Path", *labels] if c not in df.columns]
    if missing:
        raise ScoresError(f"{str(path)!r} lacks column(s) {missing}; a CheXpert label CSV has "
                          f"'Path' and one column per label")
    out = df[["Path", *labels]].copy()
    for label in labels:
        col = pd.to_numeric(out[label], errors="coerce")
        not_code = col.notna() & ~col.isin([1.0, 0.0, -1.0])
        not_number = col.isna() & out[label].notna() & (out[label].astype(str).str.strip() != "")
        bad = not_code | not_number
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ScoresError(f"{str(path)!r}, column {label!r}, data row {i + 1}: "
                              f"{show(out[label].iloc[i])} is not 1, 0, -1 or blank")
        out[label] = col.astype(float)
    return out


def read_reference_csv(path):
    """Read a reference cohort from a CheXpert-format CSV (``Sex``, ``Age``; ``Path`` optional).

    ``Sex`` Male/Female become 'M'/'F'; Unknown or blank become None. ``Age``
    is kept as recorded (CheXpert's train.csv has a few ages of 0). When a
    ``Path`` column holds CheXpert paths (``.../patientNNNNN/...``), the
    patient id is taken from it.

    Returns
    -------
    pandas.DataFrame
        Columns ``age`` (float), ``sex`` ('M', 'F' or None) and, when found,
        ``patient_id``; one row per CSV row.

    Raises
    ------
    CovreportError
        The file cannot be read, lacks ``Sex`` or ``Age``, or holds a sex
        other than Male/Female/Unknown/blank or a non-numeric age.
    """
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError) as exc:
        raise CovreportError(f"cannot read the reference CSV {str(path)!r}: {exc}") from None
    missing = [c for c in ("Sex", "Age") if c not in header]
    if missing:
        raise CovreportError(f"the reference CSV {str(path)!r} lacks column(s) {missing}; "
                             "a CheXpert-format CSV has 'Sex' (Male/Female/Unknown) and 'Age'")
    usecols = ["Sex", "Age"] + (["Path"] if "Path" in header else [])
    try:
        raw = pd.read_csv(path, usecols=usecols, dtype={"Sex": object})
    except (OSError, ValueError) as exc:
        raise CovreportError(f"cannot read the reference CSV {str(path)!r}: {exc}") from None
    sex = raw["Sex"].astype(object).where(raw["Sex"].notna(), None)
    sex = sex.map(lambda v: v.strip() if isinstance(v, str) else v)
    known = sex.isna() | (sex == "") | sex.isin(list(_REFERENCE_SEX))
    if not known.all():
        i = int(np.flatnonzero(~known.to_numpy())[0])
        raise CovreportError(f"the reference CSV {str(path)!r}, data row {i + 1}: Sex {show(sex.iloc[i])} "
                             "is not Male, Female, Unknown or blank")
    out = pd.DataFrame({
        "age": pd.to_numeric(raw["Age"], errors="coerce").astype(float),
        "sex": pd.Series([_REFERENCE_SEX.get(v) if isinstance(v, str) else None for v in sex],
                         index=raw.index, dtype=object),
    })
    bad_age = out["age"].isna() & raw["Age"].notna() & (raw["Age"].astype(str).str.strip() != "")
    if bad_age.any():
        i = int(np.flatnonzero(bad_age.to_numpy())[0])
        raise CovreportError(f"the reference CSV {str(path)!r}, data row {i + 1}: Age "
                             f"{show(raw['Age'].iloc[i])} is not a number")
    if "Path" in raw.columns:
        pid = raw["Path"].astype(str).str.extract(r"(patient\d+)", flags=re.IGNORECASE)[0]
        if pid.notna().all():
            out["patient_id"] = pid
    return out


def read_chexpert_split(root, split, labels):
    """Read ``root/<split>.csv`` of a CheXpert-layout folder and locate its images.

    ``Path`` is relative to the dataset root's parent (``CheXpert-v1.0-small/
    train/patient00001/...``); when the root folder was renamed, paths are
    tried relative to the root itself, with and without their first part.

    Returns
    -------
    pandas.DataFrame
        The CSV's rows with an added ``_file`` column (absolute path).
    """
    root = Path(root)
    csv = root / f"{split}.csv"
    if not csv.is_file():
        raise ModelError(f"{csv} not found: --chexpert-root must be the CheXpert folder holding "
                         "train.csv and valid.csv (e.g. CheXpert-v1.0-small).")
    try:
        df = pd.read_csv(csv)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot read {csv}: {exc}") from None
    missing = [c for c in ("Path", *labels) if c not in df.columns]
    if missing:
        raise ModelError(f"{csv} lacks column(s) {missing}; a CheXpert CSV has {list(CHEXPERT_META_COLUMNS)} "
                         f"and the label columns {list(CHEXPERT_LABELS)}.")
    if df.empty:
        raise ModelError(f"{csv} has no rows.")
    if df["Path"].isna().any():
        i = int(np.flatnonzero(df["Path"].isna().to_numpy())[0])
        raise ModelError(f"{csv}, data row {i + 1}: the Path column is empty.")
    rel = [Path(str(p)) for p in df["Path"]]
    bases = [
        lambda p: root.parent / p,
        lambda p: root / p,
        lambda p: root.joinpath(*p.parts[1:]) if len(p.parts) > 1 else root / p,
    ]
    base = next((b for b in bases if b(rel[0]).is_file()), None)
    if base is None:
        raise ModelError(f"{csv}, data row 1: image {df['Path'].iloc[0]!r} not found under {root.parent} "
                         f"or {root}; Path must be relative to the dataset root's parent, as in CheXpert.")
    files = [base(p) for p in rel]
    absent = [i for i, f in enumerate(files) if not f.is_file()]
    if absent:
        first = absent[0]
        raise ModelError(f"{csv}: {len(absent)} image(s) not found, the first at data row {first + 1}: "
                         f"{files[first]}. Complete the dataset or remove those rows.")
    df = df.copy()
    df["_file"] = [str(f) for f in files]
    return df


__all__ = ["read_chexpert_csv", "read_chexpert_split", "read_reference_csv"]
