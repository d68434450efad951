"""Read and write scores files (CSV or Parquet): one row per image, label and feature columns.

A scores table has one row per image: ``image`` (the key the caller gave,
e.g. the path exactly as the manifest writes it), one probability column per
label (``sigmoid(logit)``), and ``feat_0000`` ... ``feat_1023``, the globally
average-pooled output of the last convolutional block. Files come from other
people: every cell is checked by content, and writes are atomic.
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd

from covreport.constants import FEATURE_PREFIX, IMAGE_COLUMN, MANIFEST_COLUMNS, feature_columns
from covreport.errors import ScoresError

SCORES_SUFFIXES = (".csv", ".parquet", ".pq")

# --------------------------------------------------------------------------
# Scores files
# --------------------------------------------------------------------------


def _suffix(path):
    suffix = Path(path).suffix.lower()
    if suffix not in SCORES_SUFFIXES:
        raise ScoresError(
            f"{path}: scores file must end in .csv or .parquet, not {suffix or '(no suffix)'!r}"
        )
    return suffix


def write_scores(df, path, *, metadata=None):
    """Write a scores table atomically, as CSV or Parquet by the file's suffix.

    Parameters
    ----------
    df : pandas.DataFrame
        ``image``, label columns, ``feat_*`` columns.
    path : path
        ``.csv`` (UTF-8, formula cells neutralised) or ``.parquet``.
    metadata : dict, optional
        Provenance (e.g. :meth:`ScoringResult.metadata`: weights SHA-256,
        preprocessing, counts); written beside as ``<path>.json`` and, for
        Parquet, also into the file's schema metadata.
    """
    import json

    from covreport._io import atomic_write_bytes, atomic_write_text, write_csv_atomic

    path = Path(path)
    suffix = _suffix(path)
    meta_text = None
    if metadata is not None:
        meta_text = json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if suffix == ".csv":
        write_csv_atomic(df, path, error_class=ScoresError)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ScoresError(
                f"{path}: writing Parquet needs pyarrow (pip install 'covreport[parquet]'); "
                "or write .csv"
            ) from None
        table = pa.Table.from_pandas(df, preserve_index=False)
        if meta_text is not None:
            table = table.replace_schema_metadata(
                {**(table.schema.metadata or {}), b"covreport": meta_text.encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(path, buf.getvalue(), error_class=ScoresError)
    if meta_text is not None:
        atomic_write_text(Path(f"{path}.json"), meta_text, error_class=ScoresError)
    return path


def _show(value):
    """A cell for an error message: text quoted (control characters escaped), numbers plain."""
    from covreport.inputs import safe_text

    if isinstance(value, str):
        return "'" + safe_text(value, limit=80) + "'"
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "an empty cell"
    return safe_text(value.item() if hasattr(value, "item") else value, limit=80)


#: Largest magnitude a feature may have: features are kept as float32.
FEATURE_MAX = float(np.finfo(np.float32).max)


def _csv_header(fh):
    """``(names, line)``: the header row of a CSV as written (not de-duplicated by pandas), and its line.

    Blank lines before the header are skipped, as pandas skips them.
    """
    import csv

    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(text)
        for row in reader:
            if row:
                return row, reader.line_num
        return None, reader.line_num
    finally:
        text.detach()


def _csv_line_of(fh, record):
    """The line of a CSV file on which data record ``record`` (0-based, after the header) starts.

    Counts what pandas counts: blank lines are skipped, a quoted cell may
    hold line breaks. Only called to word an error message.
    """
    import csv

    fh.seek(0)
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="", errors="replace")
    try:
        reader = csv.reader(text)
        seen = -1  # the header is record -1
        start = 1
        for row in reader:
            if row:
                if seen == record:
                    return start
                seen += 1
            start = reader.line_num + 1
        return None
    finally:
        text.detach()


def _numeric_block(df, columns):
    """``df[columns]`` as a float64 array; cells that are not numbers (text, booleans) become NaN.

    Columns pandas already parsed as numbers are converted in one step (no
    per-column work, so thousands of columns stay fast).
    """
    n = len(df)
    out = np.empty((n, len(columns)), dtype=np.float64)
    dtypes = df.dtypes
    numeric = [i for i, c in enumerate(columns)
               if pd.api.types.is_numeric_dtype(dtypes[c]) and not pd.api.types.is_bool_dtype(dtypes[c])]
    if numeric:
        out[:, numeric] = df[[columns[i] for i in numeric]].to_numpy(dtype=np.float64)
    done = set(numeric)
    for i, c in enumerate(columns):
        if i not in done:
            s = df[c]
            if pd.api.types.is_bool_dtype(s.dtype):
                out[:, i] = np.nan
            else:
                s = s.map(lambda v: np.nan if isinstance(v, bool) else v) if s.dtype == object else s
                out[:, i] = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    return out


def read_scores(path, labels=None, *, require_features=False):
    """Read and validate a scores file (CSV or Parquet).

    Parameters
    ----------
    path : path
    labels : sequence of str, optional
        Label columns that must be present; default: every column that is not
        ``image`` or ``feat_*``.
    require_features : bool
        Require all 1,024 ``feat_*`` columns (the prediction analysis needs them).

    Returns
    -------
    pandas.DataFrame
        ``image`` (str), the label columns (float64, in ``[0, 1]``), then the
        feature columns (float32) if present.

    Raises
    ------
    ScoresError
        Naming the file and the problem: missing file (or not a regular file,
        or larger than the limit of :data:`covreport.inputs.LIMITS`), no
        ``image`` column, a column name written twice or empty, missing label
        or feature columns, duplicated images, non-numeric, missing or
        out-of-range probabilities, features that are not finite float32
        numbers. Rows are named by the file's line (the header is line 1 of
        a CSV; rows of a Parquet file count from 1).

    Notes
    -----
    The header is read as written: pandas would rename a second ``Edema``
    column to ``Edema.1`` and make it a label. The work is linear in the
    number of columns (20,000 extra columns read in seconds; see
    ``benchmarks/bench_scores_wide.py``).
    """
    from covreport.inputs import open_binary, safe_text

    path = Path(path)
    suffix = _suffix(path)
    name = safe_text(str(path))
    csv_file = suffix == ".csv"
    with open_binary(path, "scores file", error_class=ScoresError) as fh:
        try:
            if csv_file:
                header, header_line = _csv_header(fh)
                if header is None:
                    raise ScoresError(f"scores file {name} is empty -- write a header line "
                                      f"({IMAGE_COLUMN!r}, one column per label, feat_*) and one row per image")
                fh.seek(0)
                df = pd.read_csv(fh, dtype={IMAGE_COLUMN: str}, keep_default_na=False, index_col=False,
                                 float_precision="round_trip",  # exact: pandas' default parser is off by 1 ulp
                                 na_values=["", "NA", "NaN", "nan"], encoding="utf-8-sig")
            else:
                df = pd.read_parquet(fh)
                header, header_line = [str(c) for c in df.columns], None
        except ScoresError:
            raise
        except ImportError:
            raise ScoresError(f"{name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        except MemoryError:
            raise ScoresError(f"scores file {name} is too large to read in the memory available -- "
                              "score fewer images per file, or keep only the columns covreport reads") from None
        except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError,
                pd.errors.EmptyDataError) as exc:
            raise ScoresError(f"cannot read scores file {name}: {safe_text(exc)}") from None
        except Exception as exc:  # pyarrow and csv raise their own types on a damaged file
            raise ScoresError(f"cannot read scores file {name}: {type(exc).__name__}: {safe_text(exc)}") from None
        if csv_file:
            from covreport._io import unescape_csv_cell

            header = [unescape_csv_cell(c) for c in header]
            if len(header) != len(df.columns):
                raise ScoresError(f"scores file {name}: the header (line {header_line}) names {len(header)} "
                                  f"columns but the rows hold {len(df.columns)} -- give every column one name")
            df.columns = header
            if IMAGE_COLUMN in df.columns:
                df[IMAGE_COLUMN] = df[IMAGE_COLUMN].map(unescape_csv_cell)

        def where(r):
            """Where data record ``r`` (0-based) is: ``line N`` of a CSV, ``row N`` of a Parquet file."""
            if not csv_file:
                return f"row {r + 1}"
            line = _csv_line_of(fh, r)
            return f"line {line}" if line is not None else f"data row {r + 1}"

        return _validate_scores(df, name, header, header_line, labels, require_features, where)


def _validate_scores(df, name, header, header_line, labels, require_features, where):
    """The checks of :func:`read_scores` on the frame as read (columns named as written)."""
    from collections import Counter

    from covreport.inputs import identifier_problem

    on = f" (line {header_line})" if header_line is not None else ""
    counts = Counter(header)
    for i, col in enumerate(header):
        if not col.strip():
            raise ScoresError(f"scores file {name}: column {i + 1} of the header{on} has no name -- name it "
                              "or delete the column (an index written by pandas' to_csv(index=True)?)")
    dup = [c for c in header if counts[c] > 1]
    if dup:
        first = dup[0]
        cols = [str(i + 1) for i, c in enumerate(header) if c == first]
        raise ScoresError(f"scores file {name}: columns {' and '.join(cols)} of the header{on} are both named "
                          f"{_show(first)} -- each column needs its own name; delete or rename the copy")
    if IMAGE_COLUMN not in counts:
        raise ScoresError(f"scores file {name} has no {IMAGE_COLUMN!r} column")
    feats = [c for c in header if c.startswith(FEATURE_PREFIX)]
    present = [c for c in header if c != IMAGE_COLUMN and not c.startswith(FEATURE_PREFIX)]
    if labels is None:
        labels = present
        if not labels:
            raise ScoresError(f"scores file {name} has no label columns "
                              f"(columns other than {IMAGE_COLUMN!r} and '{FEATURE_PREFIX}*')")
    labels = [str(v) for v in labels]
    for lab in labels:
        problem = identifier_problem(lab)
        if problem is not None and lab in counts:
            raise ScoresError(f"scores file {name}: label column {_show(lab)}{on} {problem}")
    reserved = [c for c in labels if c in MANIFEST_COLUMNS]
    if reserved:
        raise ScoresError(f"scores file {name}: column(s) {', '.join(map(repr, reserved))} would be read as "
                          "labels but are manifest columns; a scores file holds 'image', one probability "
                          "column per label and feat_* only: remove or rename them")
    missing = [c for c in labels if c not in counts]
    if missing:
        shown = ", ".join(_show(c)[1:-1] for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ScoresError(f"scores file {name} is missing label column(s): {shown}")
    expected_feats = feature_columns()
    if feats or require_features:
        missing_f = [c for c in expected_feats if c not in counts]
        if missing_f:
            shown = ", ".join(missing_f[:3]) + (", ..." if len(missing_f) > 3 else "")
            raise ScoresError(
                f"scores file {name} is missing {len(missing_f)} feature column(s): {shown} "
                f"(expected {expected_feats[0]} ... {expected_feats[-1]})"
            )
        extra = sorted(set(feats) - set(expected_feats))
        if extra:
            shown = ", ".join(_show(c) for c in extra[:3])
            raise ScoresError(f"scores file {name} has unexpected feature column(s): {shown}")
    images = df[IMAGE_COLUMN]
    blank = images.isna() | (images.astype(str).str.strip() == "")
    if blank.any():
        r = int(np.flatnonzero(blank.to_numpy())[0])
        raise ScoresError(f"scores file {name}, {where(r)}: empty {IMAGE_COLUMN!r} -- every row needs "
                          "the image it scores")
    images = images.astype(str)
    dups = images.duplicated()
    if dups.any():
        r = int(np.flatnonzero(dups.to_numpy())[0])
        raise ScoresError(f"scores file {name}, {where(r)}: image {_show(images.iloc[r])} appears more than once")
    probs = _numeric_block(df, labels)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        raise ScoresError(
            f"scores file {name}, {where(r)}, column {_show(labels[c])}: {_show(df[labels[c]].iloc[r])} is not "
            "a probability in [0, 1]"
        )
    parts = [pd.DataFrame({IMAGE_COLUMN: pd.Series(images.tolist(), dtype=str)}),
             pd.DataFrame(probs, columns=labels)]
    if feats:
        block = _numeric_block(df, expected_feats)
        bad = ~(np.abs(block) <= FEATURE_MAX)  # NaN, inf and what float32 cannot hold
        if bad.any():
            r, c = (int(v[0]) for v in np.nonzero(bad))
            raise ScoresError(
                f"scores file {name}, {where(r)}, column {expected_feats[c]!r}: "
                f"{_show(df[expected_feats[c]].iloc[r])} is not a finite number a float32 feature can hold "
                f"(|value| <= {FEATURE_MAX:.6g}) -- re-score that image"
            )
        parts.append(pd.DataFrame(block.astype(np.float32), columns=expected_feats))
    return pd.concat(parts, axis=1)
