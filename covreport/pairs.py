"""Build a pair manifest from an image-level export (``covreport pairs``).

Hospitals and public collections export one row per image (patient, date or
day offset, view, path, age, sex), not pairs. :func:`build_pairs` turns such
a table into the pair manifest of ``data_manifests/README.md``:

1. rows are kept when they pass every filter (``--filter``), have a patient
   id and an image path, show one of the chosen views (default frontal: AP,
   AP Supine, PA) and have a date or day offset; every other row is reported
   with its reason;
2. per patient, the eligible images are ordered by date (or day offset);
   images with the same date are put in the order of their paths, and every
   such tie is reported (and noted on the pairs it touches);
3. each image is paired with the next one: a patient with k images gives
   k - 1 pairs, ``pair_id`` ``<patient>-<k>``, ``outcome`` left empty for the
   readers to fill in.

With ``previous`` (``--update MANIFEST``), the rows of the existing manifest
are kept verbatim, in their order (outcome, pair_id, notes and every other
cell), and only the pairs it does not hold yet (same patient, first and
second image) are appended, so readers label only what is new. A labelled
pair of the old manifest that no longer arises from the export (an image now
lies between its two) is kept and reported; an unlabelled one is dropped and
reported, since the pairs that replace it are appended; a pair of a patient
the export does not show is kept.

The output is read back by :func:`covreport.manifest.read_manifest`: empty
outcomes there are exclusions ("reference standard not available"), not
errors.

The ieee8023 covid-chestxray-dataset ``metadata.csv`` (Cohen et al. 2020,
https://github.com/ieee8023/covid-chestxray-dataset) has a preset:
``covreport pairs metadata.csv --preset ieee8023 --filter "finding~COVID-19"
--out pairs.csv`` (see ``data_manifests/ieee8023.md``).
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
from pathlib import Path

import numpy as np
import pandas as pd

from covreport.errors import ManifestError
from covreport import inputs
from covreport.tabular import decode, invisible_cells, look_alikes, read_bytes, read_records, show_name, show_value
from covreport.vocab import DATE_RANGE, EXPORT_VIEW_CODES, SEX_CODES, canon, iso_dates, view_key

__all__ = [
    "DEFAULT_VIEWS", "PRESETS", "build_pairs", "normalize_view", "read_column_map",
    "read_images", "write_pairs", "parse_filter", "LineNumbers",
]

#: Views kept by default: the frontal projections.
DEFAULT_VIEWS = ("AP", "AP Supine", "PA")

#: What each key of a column mapping means, and the option that sets it.
COLUMN_KEYS = {
    "patient_id": ("the patient's id", "--patient-col"),
    "image": ("the image path (several columns are joined with '/')", "--path-col"),
    "date": ("the acquisition date (ISO 8601, or --date-format)", "--date-col"),
    "offset_days": ("the day offset of the image (e.g. days since admission)", "--offset-col"),
    "view": ("the view (AP, AP Supine, PA, Lateral)", "--view-col"),
    "age": ("the patient's age in years", "--age-col"),
    "sex": ("the patient's sex (M/F/Male/Female)", "--sex-col"),
}
_KEY_ALIASES = {
    "patient": "patient_id", "patientid": "patient_id", "path": "image", "image_path": "image",
    "filename": "image", "file": "image", "offset": "offset_days", "day": "offset_days",
    "days": "offset_days", "gender": "sex",
}
#: Export columns recognised without a mapping (compared ignoring case, spaces, _ - .).
_GUESSES = {
    "patient_id": ("patient_id", "patientid", "patient", "subject_id", "subject"),
    "image": ("image", "path", "image_path", "file", "filename"),
    "date": ("date", "study_date", "acquisition_date", "image_date"),
    "offset_days": ("offset_days", "offset", "day_offset", "days"),
    "view": ("view", "view_position", "projection"),
    "age": ("age", "patient_age"),
    "sex": ("sex", "gender", "patient_sex"),
}

#: Built-in mappings of well-known exports.
PRESETS = {
    "ieee8023": {
        "columns": {"patient_id": "patientid", "image": ("folder", "filename"), "offset_days": "offset",
                    "view": "view", "age": "age", "sex": "sex"},
        "filters": ("modality=X-ray",),
        "source": "ieee8023/covid-chestxray-dataset",
        "description": "ieee8023 covid-chestxray-dataset metadata.csv (Cohen et al. 2020): "
                       "patientid, offset (days), view, age, sex, folder/filename; X-ray rows only",
    },
}

_FILTER = re.compile(r"^\s*(?P<col>[^=~!]+?)\s*(?P<op>!=|~|=)\s*(?P<value>.*?)\s*$")
_MAX_LISTED = 20
#: Largest --map file (a handful of lines).
_MAP_LIMIT = 1 << 20


def _listed(header, n=15):
    """The first ``n`` column names of a header, for a message (escaped)."""
    return ", ".join(show_name(h) for h in header[:n]) + (", ..." if len(header) > n else "")


_canon = canon


def _n(count, word):
    return f"{count} {word}{'' if count == 1 else 's'}"


def _natural_key(text):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", str(text)) if p != ""]


def normalize_view(value):
    """A view as written in an export -> AP, AP Supine, PA, Lateral, or None.

    Case, spaces, underscores and hyphens are ignored: ``'AP supine'``,
    ``'AP_SUPINE'`` and ``'APS'`` are AP Supine; ``'L'`` and ``'LL'`` are
    Lateral; an erect or upright AP is AP. Anything else (``'Axial'``, blank)
    is None.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return EXPORT_VIEW_CODES.get(view_key(value))


# --------------------------------------------------------------------------
# Reading the export


def _read_table(path, *, delimiter=None, what="table"):
    """A CSV file -> (header, records, start line of each record, delimiter).

    Every cell is text; all-blank records are skipped; short records are
    padded; a record longer than the header is an error.
    """
    try:
        return _read_table_unguarded(path, delimiter=delimiter, what=what)
    except MemoryError:
        raise ManifestError(f"{inputs.safe_text(str(path))} is too large to read in the memory available -- "
                            f"split the {what}, or run on a machine with more memory") from None


def _read_table_unguarded(path, *, delimiter=None, what="table"):
    name = str(path)
    raw = read_bytes(path, name, what, limit=_MAP_LIMIT if what == "--map file" else None)
    if raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise ManifestError(f"{name} is a spreadsheet workbook -- export its first sheet as CSV (UTF-8)")
    text = decode(raw, name, empty_fix=f"the {what} needs a header line and its rows",
                  export_fix=f"save the {what} as CSV (UTF-8)")
    if delimiter is None:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        counts = {d: first.count(d) for d in (",", ";", "\t")}
        delimiter = max(counts, key=lambda d: (counts[d], d == ","))
    all_records, all_starts = read_records(text, delimiter, name)
    filled = [i for i, rec in enumerate(all_records) if any(cell.strip() for cell in rec)]
    records, starts = [all_records[i] for i in filled], [int(all_starts[i]) for i in filled]
    if not records:
        raise ManifestError(f"{name} is empty -- export one row per image, with a header line")
    header = [h.strip() for h in records[0]]
    body, lines, long_rows = [], [], []
    for rec, start in zip(records[1:], starts[1:]):
        if len(rec) > len(header):
            if any(cell.strip() for cell in rec[len(header):]):
                long_rows.append(f"{name} line {start}: {len(rec)} fields but the header has {len(header)} "
                                 "-- quote values that contain the delimiter")
                continue
            rec = rec[: len(header)]
        body.append(rec + [""] * (len(header) - len(rec)))
        lines.append(start)
    if long_rows:
        shown = long_rows[:_MAX_LISTED]
        more = f"\n... and {len(long_rows) - _MAX_LISTED} more" if len(long_rows) > _MAX_LISTED else ""
        raise ManifestError("\n".join(shown) + more)
    return header, body, lines, delimiter, starts[0]


def read_images(path):
    """Read an image-level export (CSV, UTF-8; comma, semicolon or tab).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    pandas.DataFrame
        One text column per named header column (unnamed and repeated
        columns dropped), one row per non-blank record, index 0, 1, 2, ...
        ``attrs`` holds ``path`` (the file name as given), ``lines`` (the
        line of each row in the file, by row label, so that messages still
        name the right line after the frame is filtered or sorted) and
        ``header_line``.

    Raises
    ------
    ManifestError
        For a file that is not readable as a CSV table.
    """
    header, body, lines, _delim, header_line = _read_table(path, what="image export")
    keep, seen = [], set()
    for i, h in enumerate(header):
        if h and h not in seen:
            keep.append(i)
            seen.add(h)
    if not body:
        raise ManifestError(f"{path} has a header but no rows -- export one row per image")
    data = {header[i]: [rec[i] for rec in body] for i in keep}
    df = pd.DataFrame(data, dtype=object)
    df.attrs.update(path=str(path), lines=LineNumbers(lines), header_line=int(header_line))
    return df


class LineNumbers:
    """Line numbers of a table's rows, kept in ``DataFrame.attrs``.

    Immutable, so pandas' deep copy of ``attrs`` (made by every operation on
    the frame) shares it instead of copying 100,000 integers each time.
    """

    __slots__ = ("values",)

    def __init__(self, values):
        arr = np.array(values, dtype=np.int64)
        arr.setflags(write=False)
        self.values = arr

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __len__(self):
        return len(self.values)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __eq__(self, other):
        return isinstance(other, LineNumbers) and np.array_equal(self.values, other.values)

    def __hash__(self):
        return hash(self.values.tobytes())

    def __repr__(self):
        return f"LineNumbers({self.values.tolist()!r})"


# --------------------------------------------------------------------------
# Column mapping and filters


def _normalise_key(key, where):
    k = str(key).strip()
    canon = _canon(k)
    for real in COLUMN_KEYS:
        if canon == _canon(real):
            return real
    for alias, real in _KEY_ALIASES.items():
        if canon == _canon(alias):
            return real
    raise ManifestError(
        f"{where}: {show_value(k)} is not a manifest column to map -- use one of {', '.join(COLUMN_KEYS)}"
    )


def read_column_map(path):
    """Read a column mapping file: TOML or CSV.

    TOML: ``manifest_column = "export column"`` lines at the top level or in
    a ``[columns]`` table; ``image`` may be a list of columns joined with
    ``/`` (``image = ["folder", "filename"]``). CSV: a header
    ``manifest_column,export_column`` and one row per mapping; several rows
    for ``image`` are joined in order.

    Keys: patient_id, image, date, offset_days, view, age, sex (aliases:
    patient, path, offset).

    Returns
    -------
    dict
        Key -> column name (or tuple of column names for ``image``).

    Raises
    ------
    ManifestError
        Naming the file, line and the fix.
    """
    path = Path(path)
    name = str(path)
    out = {}
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ManifestError(f"{name}: reading TOML needs Python 3.11 or the tomli package -- "
                                    "install tomli, or write the mapping as CSV (manifest_column,export_column)") from None
        text = inputs.read_text(path, "--map file", limit=_MAP_LIMIT, error_class=ManifestError)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"{name}: not valid TOML ({exc}) -- write lines like patient_id = \"patientid\"") from None
        except RecursionError:  # arrays nested thousands deep
            raise ManifestError(f"{name}: nested too deeply to be a column mapping -- write lines like "
                                "patient_id = \"patientid\"") from None
        table = data.get("columns", data)
        if not isinstance(table, dict):
            raise ManifestError(f"{name}: [columns] must be a table of manifest_column = \"export column\"")
        for key, value in table.items():
            real = _normalise_key(key, name)
            if isinstance(value, str) and value.strip():
                out[real] = value.strip()
            elif real == "image" and isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
                out[real] = tuple(v.strip() for v in value)
            else:
                raise ManifestError(f"{name}: {show_name(str(key))} = {show_value(value)} -- give the export column's name as a string"
                                    + (" (or a list of names for image)" if real == "image" else ""))
        return out
    header, body, lines, _d, header_line = _read_table(path, what="--map file")
    canon = [_canon(h) for h in header]
    if canon[:2] != ["manifestcolumn", "exportcolumn"]:
        raise ManifestError(f"{name} line {header_line}: header {show_value(','.join(header))} -- the mapping CSV's header "
                            "must be manifest_column,export_column (or give a .toml file)")
    for rec, line in zip(body, lines):
        key, col = rec[0].strip(), rec[1].strip()
        if not col:
            raise ManifestError(f"{name} line {line}, column 'export_column': empty -- give the export column's name")
        real = _normalise_key(key, f"{name} line {line}, column 'manifest_column'")
        if real == "image":
            out[real] = tuple(out.get(real, ())) + (col,)
        elif real in out:
            raise ManifestError(f"{name} line {line}, column 'manifest_column': {show_value(key)} mapped twice -- keep one row")
        else:
            out[real] = col
    return out


def parse_filter(text):
    """``'COL=VALUE'``, ``'COL!=VALUE'`` or ``'COL~TEXT'`` -> (column, op, values).

    ``=`` keeps rows whose cell equals a value, ``!=`` rows whose cell equals
    none, ``~`` rows whose cell contains a text; comparisons ignore case and
    surrounding spaces; ``|`` separates alternatives (``view=AP|PA``).
    """
    if isinstance(text, (tuple, list)) and len(text) == 3:
        col, op, values = text
        values = tuple(values) if isinstance(values, (tuple, list)) else tuple(str(values).split("|"))
        return str(col), str(op), tuple(v.strip() for v in values)
    m = _FILTER.match(str(text))
    if not m or not m.group("col"):
        raise ManifestError(f"--filter {show_value(str(text))}: not understood -- write COLUMN=VALUE, COLUMN!=VALUE or "
                            "COLUMN~TEXT (e.g. finding~COVID-19, modality=X-ray)")
    return m.group("col"), m.group("op"), tuple(v.strip() for v in m.group("value").split("|"))


def _filter_mask(cells, op, values):
    low = cells.str.strip().str.lower()
    vals = [v.lower() for v in values]
    if op == "~":
        hit = np.zeros(len(low), dtype=bool)
        for v in vals:
            hit |= low.str.contains(v, regex=False).to_numpy()
        return hit
    hit = low.isin(vals).to_numpy()
    return ~hit if op == "!=" else hit


def _missing_column(name, header_line, header, col, key, fix_option):
    close = difflib.get_close_matches(col, header, n=1, cutoff=0.6) or [
        h for h in header if _canon(h) == _canon(col)][:1]
    listed = _listed(header)
    hint = f"did you mean '{show_name(close[0])}'? " if close else ""
    return ManifestError(
        f"{name} line {header_line}, column '{show_name(col)}': missing ({key}) -- {hint}map the right column with "
        f"{fix_option} or a --map file (the header has: {listed})"
    )


def _resolve_columns(header, columns, name, header_line):
    """Explicit mapping checked against the header; unmapped keys guessed."""
    mapping = {}
    for key, col in (columns or {}).items():
        real = _normalise_key(key, "column mapping")
        cols = tuple(col) if isinstance(col, (tuple, list)) else (col,)
        if real != "image" and len(cols) != 1:
            raise ManifestError(f"column mapping: {real} takes one export column, got {list(cols)}")
        for c in cols:
            if c not in header:
                raise _missing_column(name, header_line, header, c, COLUMN_KEYS[real][0], COLUMN_KEYS[real][1])
        mapping[real] = cols
    used = {c for cols in mapping.values() for c in cols}
    for key, guesses in _GUESSES.items():
        if key in mapping:
            continue
        if key in ("date", "offset_days") and ("date" in mapping or "offset_days" in mapping):
            continue  # the order was chosen explicitly: do not add the other key by its name
        canon_guesses = [_canon(g) for g in guesses]
        for g in canon_guesses:
            hit = [h for h in header if _canon(h) == g and h not in used]
            if hit:
                mapping[key] = (hit[0],)
                used.add(hit[0])
                break
    for key in ("patient_id", "image"):
        if key not in mapping:
            desc, option = COLUMN_KEYS[key]
            close = difflib.get_close_matches(key, header, n=1, cutoff=0.5)
            hint = f"did you mean '{show_name(close[0])}'? " if close else ""
            listed = _listed(header)
            raise ManifestError(
                f"{name} line {header_line}: no column for {desc} -- {hint}name it with {option} or a --map "
                f"file (the header has: {listed})"
            )
    if "date" not in mapping and "offset_days" not in mapping:
        listed = _listed(header)
        raise ManifestError(
            f"{name} line {header_line}: no column to order the images by -- name the date column with "
            f"--date-col or the day-offset column with --offset-col (the header has: {listed})"
        )
    return mapping


# --------------------------------------------------------------------------
# Build


class _Errors:
    def __init__(self, name):
        self.name, self.items = name, []

    def add(self, line, column, value, fix):
        self.add_text(line, column, show_value(value), fix)

    def add_text(self, line, column, text, fix):
        """A problem whose value part is already written (escaped) as ``text``."""
        self.items.append((line, f"{self.name} line {line}, column '{show_name(column)}': {text} -- {fix}"))

    def raise_if_any(self):
        if not self.items:
            return
        items = [t for _l, t in sorted(self.items, key=lambda it: it[0])]
        if len(items) == 1:
            raise ManifestError(items[0])
        shown = items[:_MAX_LISTED]
        more = [f"... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else []
        err = ManifestError(f"{self.name}: {len(items)} problems:\n" + "\n".join(shown + more))
        err.problems = items
        raise err


def _dates_problem(name, col, s, lines, rows, fix, date_format):
    """One problem for every date of ``rows`` that could not be read: the count, the lines, the format's hint."""
    shown = ", ".join(str(int(lines[i])) for i in rows[:_MAX_LISTED])
    more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    hint = ""
    parts = [re.fullmatch(r"(\d{1,2})([/.-])(\d{1,2})\2(\d{4})", s.iat[i].strip()) for i in rows]
    if date_format is None and parts and all(parts):
        sep = parts[0].group(2)
        day_first = any(int(m.group(1)) > 12 for m in parts)
        month_first = any(int(m.group(3)) > 12 for m in parts)
        if not (day_first and month_first):
            fmt, words = ((f"%m{sep}%d{sep}%Y", "MM/DD/YYYY") if month_first else
                          (f"%d{sep}%m{sep}%Y", "DD/MM/YYYY"))
            words = words.replace("/", sep)
            ambiguous = "" if day_first or month_first else " (or month first: --date-format '%m{0}%d{0}%Y')".format(sep)
            hint = f"they look like {words}: add --date-format '{fmt}'{ambiguous}; otherwise "
    return (f"{name} column '{show_name(col)}': {len(rows)} dates not read (lines {shown}{more}; first: {show_value(s.iat[rows[0]])}) "
            f"-- {hint}{fix}")


def _gap_notes(patient, lines, image_raw, reason, work, nxt, has_next, what):
    """Pair index -> notes of the images left out for want of a date (or offset) that may lie between them.

    Such an image cannot be placed in time, so a pair may bridge it (issue
    21.5): it is noted on the patient's pairs whose export lines enclose its
    line, or on every pair of the patient when none does.
    """
    undated = [i for i in range(len(reason)) if reason[i] in ("no date", "no day offset")]
    if not undated:
        return {}
    pairs_of = {}
    for i in np.flatnonzero(has_next):
        pairs_of.setdefault(work["patient"].iat[i], []).append(i)
    line_a, line_b = work["line"].to_numpy(dtype=float), nxt["line"].to_numpy(dtype=float)
    notes = {}
    for j in undated:
        idx = pairs_of.get(patient.iat[j], [])
        ln = int(lines[j])
        inside = [i for i in idx if min(line_a[i], line_b[i]) < ln < max(line_a[i], line_b[i])]
        for i in inside or idx:
            notes.setdefault(i, []).append(f"gap: {image_raw.iat[j]} (line {ln}) of this patient has no {what} "
                                           "and was left out; it may lie between these CXRs")
    return notes


def _check_ids(table, mapping, patient, image_raw, reason, lines, name):
    """Refuse patient ids and image paths (of the rows the filters keep) that could pass for others.

    No invisible character (direction controls, zero-width, tags, any other
    format character) in a patient id or path cell, and no two patient ids
    (or paths, by letters of another script) with equal Unicode TR39
    confusable skeletons: either would make one patient count as two.
    """
    errors = _Errors(name)
    alive = np.array([r is None for r in reason], dtype=bool)
    for col in mapping["patient_id"] + tuple(mapping["image"]):
        values = table[col].str.strip()
        for i, problem in invisible_cells(values):
            if alive[i]:
                errors.add(int(lines[i]), col, values.iat[i],
                           f"{problem}: an invisible direction-control, zero-width or other format character can "
                           "make one value display as another")
    rows = np.flatnonzero(alive)
    checks = (
        (mapping["patient_id"][0], patient, False,
         "write the same id the same way (if they are two patients, give ids that do not look alike)"),
        ("/".join(mapping["image"]), image_raw, True,
         "a reader cannot tell these two paths apart: correct the path, or rename the file"),
    )
    for col, series, other_script_only, fix in checks:
        values = series.to_numpy(dtype=object)[rows]
        for i, j, why in look_alikes(values, other_script_only=other_script_only):
            errors.add_text(int(lines[rows[i]]), col, f"{show_value(values[i])} looks the same as "
                            f"{show_value(values[j])} on line {int(lines[rows[j]])} ({why})", fix)
    errors.raise_if_any()


def _fmt_number(x):
    if x is None or not np.isfinite(x):
        return ""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _fmt_date(ts):
    if ts is None or pd.isna(ts):
        return ""
    if ts == ts.normalize():
        return ts.strftime("%Y-%m-%d")
    return ts.isoformat()


def _join_path(parts):
    parts = [p.strip() for p in parts]
    if not parts[-1]:
        return ""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def _abs_folder(folder):
    return None if folder is None else os.path.abspath(folder)


def _rebase(path, images_root, out_dir):
    """An export path (relative to ``images_root``) as the manifest will hold it (relative to ``out_dir``).

    Both folders are absolute (or None: the path is only normalised).
    """
    p = path.replace("\\", "/")
    if not p or posixpath.isabs(p) or images_root is None or out_dir is None:
        return posixpath.normpath(p) if p else p
    if images_root == out_dir:
        return posixpath.normpath(p)
    full = os.path.normpath(os.path.join(images_root, p))
    return os.path.relpath(full, out_dir).replace(os.sep, "/")


def _absolute(path, base):
    """A manifest path made absolute against ``base`` (an absolute folder, or None)."""
    p = path.replace("\\", "/")
    if base is None or posixpath.isabs(p):
        return posixpath.normpath(p)
    return os.path.normpath(os.path.join(base, p))


def build_pairs(images, *, columns=None, views=DEFAULT_VIEWS, previous=None, filters=(), preset=None,
                date_format=None, source=None, images_root=None, out_dir=None):
    """Build the pair manifest from an image-level export.

    Parameters
    ----------
    images : pandas.DataFrame or str or os.PathLike
        One row per image (all cells text), or the path of such a CSV
        (read with :func:`read_images`).
    columns : dict, optional
        Manifest key -> export column: ``patient_id``, ``image`` (a column or
        a tuple of columns joined with ``/``), ``date``, ``offset_days``,
        ``view``, ``age``, ``sex``. Keys left out are looked for under their
        usual names (``patientid``, ``path``, ``offset``, ...). A preset's
        mapping is used underneath.
    views : sequence of str or None, default ("AP", "AP Supine", "PA")
        Views kept (any spelling :func:`normalize_view` knows). None keeps
        every row, whatever its view. Without a view column every row is
        kept and the view columns are left empty.
    previous : str or os.PathLike, optional
        An existing pair manifest: its rows are kept verbatim (outcomes,
        pair ids, notes...) and only pairs it does not hold are appended.
    filters : sequence of str
        ``COL=VALUE``, ``COL!=VALUE`` or ``COL~TEXT`` (see
        :func:`parse_filter`); a row is kept when it passes all of them.
    preset : str, optional
        A key of :data:`PRESETS` (``"ieee8023"``): its column mapping,
        filters and source.
    date_format : str, optional
        :func:`~datetime.datetime.strptime` format of the date column;
        default ISO 8601 (``YYYY-MM-DD``, optionally with a time).
    source : str, optional
        Written to the ``source`` column of new pairs (default: the preset's
        source or the export's file name).
    images_root : str or os.PathLike, optional
        Folder the export's relative image paths start from (default: the
        export's folder when ``images`` is a path).
    out_dir : str or os.PathLike, optional
        Folder the manifest will be written to; relative image paths are
        rewritten relative to it (default: ``images_root``).

    Returns
    -------
    pairs : pandas.DataFrame
        The manifest, every cell text ("" for empty): ``pair_id``,
        ``patient_id``, ``first_image``, ``second_image``, ``outcome``, the
        date and/or offset columns, ``age``, ``sex``, ``first_view``,
        ``second_view`` (those that were mapped), ``source``, ``notes``; the
        previous manifest's rows first, with its columns.
    report : dict
        ``images_in_export``, ``images_eligible``, ``excluded`` (line,
        patient_id, image, reason), ``excluded_counts`` (reason -> rows),
        ``ties`` (patient_id, order_key, images in the order used, lines),
        ``patients``, ``patients_with_pairs``, ``pairs``, ``pairs_new``,
        ``pairs_kept``, ``pairs_kept_labelled``, ``stale`` (old pairs that
        no longer arise), ``order_by``, ``views``, ``filters``, ``columns``,
        ``warnings``.

    Raises
    ------
    ManifestError
        A mapped column missing (with a suggestion), an unparsable date or
        offset of an otherwise eligible row, no pair at all. (An image
        listed under two patients is left out, with a warning.)
    """
    filters = list(filters or ())
    mapping_in = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ManifestError(f"unknown preset {show_value(str(preset))} -- use one of {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        mapping_in.update(spec["columns"])
        filters = list(spec["filters"]) + filters
        source = source if source is not None else spec["source"]
    for key, col in (columns or {}).items():
        mapping_in[_normalise_key(key, "column mapping")] = col

    if isinstance(images, (str, os.PathLike)):
        export_path = Path(images)
        if images_root is None:
            images_root = export_path.parent
        images = read_images(export_path)
        if source is None:
            source = export_path.name
    if not isinstance(images, pd.DataFrame):
        raise TypeError("images must be a DataFrame or the path of a CSV file")
    if out_dir is None:
        out_dir = images_root if images_root is not None else (
            Path(previous).parent if previous is not None else None)
    name = images.attrs.get("path", "image table")
    header_line = int(images.attrs.get("header_line", 1))
    lines = np.arange(len(images), dtype=np.int64) + header_line + 1
    given = images.attrs.get("lines")
    if given is not None:  # line numbers of the rows as read, by row label: still right after filtering or sorting
        values = np.asarray(given, dtype=np.int64)
        index = images.index
        if pd.api.types.is_integer_dtype(index) and (len(index) == 0 or (index.min() >= 0 and index.max() < len(values))):
            lines = values[index.to_numpy()]
    header = [str(c) for c in images.columns]
    table = pd.DataFrame({h: images.iloc[:, j].to_numpy(dtype=object) for j, h in enumerate(header)})
    table = table.astype(object).fillna("").astype(str)

    mapping = _resolve_columns(header, mapping_in, name, header_line)
    kept_views = None
    if views is not None:
        kept_views = []
        for v in views:
            nv = normalize_view(v)
            if nv is None:
                raise ManifestError(f"--views: {show_value(str(v))} is not a view -- use AP, AP Supine, PA or Lateral")
            if nv not in kept_views:
                kept_views.append(nv)

    n = len(table)
    reason = np.full(n, None, dtype=object)

    def exclude(mask, why):
        """Give rows not yet excluded the reason ``why`` (a string, or one per row)."""
        mask = np.asarray(mask, dtype=bool) & np.array([r is None for r in reason], dtype=bool)
        reason[mask] = why[mask] if isinstance(why, np.ndarray) else why

    # 1. filters
    parsed_filters = []
    for f in filters:
        col, op, values = parse_filter(f)
        if col not in header:
            close = difflib.get_close_matches(col, header, n=1, cutoff=0.6)
            hint = f"did you mean '{show_name(close[0])}'? " if close else ""
            listed = _listed(header)
            raise ManifestError(f"{name} line {header_line}, column '{show_name(col)}': missing (named by --filter "
                                f"{f if isinstance(f, str) else col!r}) -- {hint}filter on a column of the export "
                                f"(the header has: {listed})")
        parsed_filters.append((col, op, values))
        keep = _filter_mask(table[col], op, values)
        shown = "|".join(values)
        exclude(~keep, f"filtered out ({col} {op} {shown})")

    def cells(key):
        return table[mapping[key][0]].str.strip()

    patient = cells("patient_id")
    image_raw = pd.Series([_join_path(parts) for parts in zip(*(table[c].to_numpy(dtype=object)
                                                                 for c in mapping["image"]))], dtype=object) \
        if len(mapping["image"]) > 1 else cells("image")
    exclude(patient == "", "no patient id")
    exclude(image_raw == "", "no image path")
    _check_ids(table, mapping, patient, image_raw, reason, lines, name)

    # 2. views
    if "view" in mapping:
        view_raw = cells("view")
        view = view_raw.map(normalize_view)
        if kept_views is not None:
            off = ~view.isin(kept_views).to_numpy()
            why = np.array(["no view" if v == "" else f"view {show_value(v)} not kept" for v in view_raw], dtype=object)
            exclude(off, why)
    else:
        view = pd.Series([None] * n, dtype=object)

    alive = np.array([r is None for r in reason], dtype=bool)
    errors = _Errors(name)

    # 3. order key
    dates = pd.Series([pd.NaT] * n, dtype="datetime64[ns]")
    offsets = pd.Series([np.nan] * n, dtype=float)
    if "date" in mapping:
        col = mapping["date"][0]
        s = cells("date")
        if date_format:
            dates = pd.to_datetime(s, format=date_format, errors="coerce")
            fix = f"write the date as --date-format {date_format!r} says, or leave it blank"
        else:
            dates = iso_dates(s)
            fix = ("write full dates in ISO 8601, YYYY-MM-DD (e.g. 2020-03-14), give their format with "
                   "--date-format (e.g. '%d/%m/%Y'), or order by a day offset with --offset-col")
        dates = dates.astype("datetime64[ns]")
        low, high = pd.Timestamp(DATE_RANGE[0]), pd.Timestamp(DATE_RANGE[1]) + pd.Timedelta("1D") - pd.Timedelta("1s")
        dates = dates.where((dates >= low) & (dates <= high))  # --date-format dates too
        fix += f"; dates from {DATE_RANGE[0]} to {DATE_RANGE[1]}"
        bad = alive & (s != "").to_numpy() & dates.isna().to_numpy()
        rows = np.flatnonzero(bad)
        if len(rows) == 1:
            errors.add(int(lines[rows[0]]), col, s.iat[rows[0]], fix)
        elif len(rows):  # one message for them all (issue 21.5), with the format they seem to follow
            errors.items.append((int(lines[rows[0]]), _dates_problem(name, col, s, lines, rows, fix, date_format)))
    if "offset_days" in mapping:
        col = mapping["offset_days"][0]
        s = cells("offset_days")
        offsets = pd.to_numeric(s.str.replace(",", ".", regex=False), errors="coerce").astype(float)
        finite = np.isfinite(offsets.to_numpy())
        bad = alive & (s != "").to_numpy() & ~finite
        for i in np.flatnonzero(bad):
            errors.add(int(lines[i]), col, s.iat[i], "write the day offset as a number of days (e.g. 0, 3, 12.5), "
                                                     "or leave it blank to leave the image out")
        offsets = offsets.where(finite)
    errors.raise_if_any()
    order_by = "date" if "date" in mapping else "offset_days"
    primary = dates if order_by == "date" else offsets
    exclude(primary.isna().to_numpy(), "no date" if order_by == "date" else "no day offset")

    # 4. age and sex
    warnings = []
    age_text = pd.Series([""] * n, dtype=object)
    if "age" in mapping:
        s = cells("age")
        age = pd.to_numeric(s.str.replace(",", ".", regex=False), errors="coerce").astype(float)
        ok = np.isfinite(age.to_numpy()) & (age >= 0).to_numpy() & (age <= 120).to_numpy()
        alive_now = np.array([r is None for r in reason], dtype=bool)
        bad = alive_now & (s != "").to_numpy() & ~ok
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            warnings.append(f"{_n(int(bad.sum()), 'age')} not a number from 0 to 120 (first: {name} line {lines[i]}, "
                            f"{show_value(s.iat[i])}): left blank in the manifest")
        age_text = pd.Series([_fmt_number(a) if k else "" for a, k in zip(age, ok)], dtype=object)
    sex = pd.Series([""] * n, dtype=object)
    if "sex" in mapping:
        s = cells("sex")
        mapped = s.str.upper().map(SEX_CODES)
        alive_now = np.array([r is None for r in reason], dtype=bool)
        bad = alive_now & (s != "").to_numpy() & mapped.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            warnings.append(f"{_n(int(bad.sum()), 'sex code')} not M, F, Male or Female (first: {name} line {lines[i]}, "
                            f"{show_value(s.iat[i])}): left blank in the manifest")
        sex = mapped.where(mapped.notna(), "").astype(object)

    # 5. images: one patient each, no repeats
    root_abs, out_abs = _abs_folder(images_root), _abs_folder(out_dir)
    written = pd.Series([_rebase(p, root_abs, out_abs) for p in image_raw], dtype=object)
    absolute = pd.Series([_absolute(p, out_abs) if p else "" for p in written], dtype=object)
    alive = np.array([r is None for r in reason], dtype=bool)
    absolute_arr, patient_arr = absolute.to_numpy(dtype=object), patient.to_numpy(dtype=object)
    owners, rows_of = {}, {}  # image -> {patient: first row}, image -> every row
    drop_why = np.full(n, None, dtype=object)
    for i in np.flatnonzero(alive):
        key = absolute_arr[i]
        rows_of.setdefault(key, []).append(i)
        first_of = owners.setdefault(key, {})
        if patient_arr[i] in first_of:
            drop_why[i] = f"same image as line {lines[first_of[patient_arr[i]]]}"
        else:
            first_of[patient_arr[i]] = i
    # An image listed under two patients cannot be paired honestly: all its rows are left out, with a warning.
    clashes = {key: first_of for key, first_of in owners.items() if len(first_of) > 1}
    for key, first_of in clashes.items():
        listed = ", ".join(f"{show_value(p)} (line {lines[i]})" for p, i in first_of.items())
        for i in rows_of[key]:
            drop_why[i] = f"image listed under two patients: {listed}"
    if clashes:
        first = min(min(first_of.values()) for first_of in clashes.values())
        warnings.append(
            f"{_n(len(clashes), 'image')} listed under two or more patients (first: {name} line {lines[first]}, "
            f"{show_value(image_raw.iat[first])}): left out; an image belongs to one patient, so correct the export")
    exclude(np.array([w is not None for w in drop_why], dtype=bool), drop_why)

    excluded = [
        {"line": int(lines[i]), "patient_id": patient.iat[i], "image": image_raw.iat[i], "reason": reason[i]}
        for i in range(n) if reason[i] is not None
    ]
    counts = {}
    for rec in excluded:
        counts[rec["reason"]] = counts.get(rec["reason"], 0) + 1

    # 6. order and pair (vectorised: one sort of all eligible images)
    alive = np.array([r is None for r in reason], dtype=bool)
    work = pd.DataFrame({
        "row": np.arange(n), "patient": patient.to_numpy(dtype=object), "image": written.to_numpy(dtype=object),
        "absolute": absolute.to_numpy(dtype=object), "date": dates.to_numpy(), "offset": offsets.to_numpy(),
        "view": view.to_numpy(dtype=object), "age": age_text.to_numpy(dtype=object),
        "sex": sex.to_numpy(dtype=object), "line": lines,
    })[alive]
    patients_sorted = sorted(pd.unique(work["patient"]), key=_natural_key)
    work["rank"] = work["patient"].map({p: i for i, p in enumerate(patients_sorted)}).astype(np.int64)
    work["offset_key"] = work["offset"].fillna(np.inf)  # a missing secondary offset sorts last
    tie_cols = ["rank"] + (["date", "offset_key"] if order_by == "date" else ["offset_key"])
    work = work.sort_values(tie_cols + ["image"], kind="mergesort").reset_index(drop=True)
    tied = work.duplicated(tie_cols, keep=False).to_numpy()
    ties = []
    if tied.any():
        for _key, tg in work[tied].groupby(tie_cols, sort=True):
            first = tg.iloc[0]
            shown = _fmt_date(first["date"]) if order_by == "date" else _fmt_number(first["offset"])
            if order_by == "date" and "offset_days" in mapping and np.isfinite(first["offset_key"]):
                shown += f", offset {_fmt_number(first['offset'])}"
            ties.append({"patient_id": first["patient"], "order_by": order_by, "order_key": shown,
                         "images": list(tg["image"]), "lines": [int(x) for x in tg["line"]]})

    # sex: the first image's (in time order) that has one; a patient with two sexes is warned about
    known_sex = work[work["sex"] != ""]
    patient_sex = known_sex.groupby("patient", sort=False)["sex"].first().to_dict()
    n_sexes = known_sex.groupby("patient", sort=False)["sex"].nunique()
    for pid in sorted(n_sexes.index[n_sexes > 1], key=_natural_key):
        values = sorted(set(known_sex.loc[known_sex["patient"] == pid, "sex"]))
        warnings.append(f"patient {show_value(pid)}: sex differs between images ({', '.join(values)}); "
                        "the first image's is used")

    nxt = work.shift(-1)
    has_next = (work["rank"].to_numpy() == nxt["rank"].to_numpy())
    k_in_patient = work.groupby("rank", sort=False).cumcount().to_numpy() + 1
    what = "date" if order_by == "date" else "day offset"
    tie_note = f"tie: images with the same {what} put in the order of their paths"
    tied_next = np.append(tied[1:], False)
    new_rows = []
    gaps = _gap_notes(patient, lines, image_raw, reason, work, nxt, has_next, what)
    stamps = pd.to_datetime(work["date"])
    midnight = (stamps == stamps.dt.normalize()).to_numpy()
    work["date"] = np.where(midnight, stamps.dt.strftime("%Y-%m-%d").fillna("").to_numpy(dtype=object),
                            stamps.dt.strftime("%Y-%m-%dT%H:%M:%S").fillna("").to_numpy(dtype=object))
    nxt["date"] = work["date"].shift(-1)
    cols_a = {c: work[c].to_numpy() for c in ("patient", "image", "absolute", "date", "offset", "view", "age")}
    cols_b = {c: nxt[c].to_numpy() for c in ("image", "absolute", "date", "offset", "view", "age")}
    for i in np.flatnonzero(has_next):
        pid = cols_a["patient"][i]
        row = {
            "pair_id": f"{pid}-{k_in_patient[i]}", "patient_id": pid, "first_image": cols_a["image"][i],
            "second_image": cols_b["image"][i], "outcome": "",
        }
        if "date" in mapping:
            row["first_date"], row["second_date"] = cols_a["date"][i], cols_b["date"][i]
        if "offset_days" in mapping:
            row["first_offset_days"] = _fmt_number(cols_a["offset"][i])
            row["second_offset_days"] = _fmt_number(cols_b["offset"][i])
        if "age" in mapping:
            row["age"] = cols_a["age"][i] or cols_b["age"][i]
        if "sex" in mapping:
            row["sex"] = patient_sex.get(pid, "")
        if "view" in mapping:
            row["first_view"], row["second_view"] = cols_a["view"][i] or "", cols_b["view"][i] or ""
        row["source"] = source or ""
        notes = [tie_note] if (tied[i] or tied_next[i]) else []
        if "view" in mapping and cols_a["view"][i] and cols_b["view"][i] and cols_a["view"][i] != cols_b["view"][i]:
            notes.append(f"projection changes: {cols_a['view'][i]} to {cols_b['view'][i]}")
        notes += gaps.get(i, [])
        row["notes"] = "; ".join(notes)
        row["_key"] = (pid, cols_a["absolute"][i], cols_b["absolute"][i])
        new_rows.append(row)
    patients_with_pairs = len({r["patient_id"] for r in new_rows})

    report = {
        "export": name, "order_by": order_by, "views": kept_views,
        "filters": [f"{c} {o} {'|'.join(v)}" for c, o, v in parsed_filters],
        "columns": {k: (list(v) if len(v) > 1 else v[0]) for k, v in mapping.items()},
        "images_in_export": int(n), "images_eligible": int(alive.sum()),
        "excluded": excluded, "excluded_counts": counts, "ties": ties,
        "patients": int(len(patients_sorted)), "patients_with_pairs": int(patients_with_pairs),
        "warnings": warnings,
    }

    columns_out = ["pair_id", "patient_id", "first_image", "second_image", "outcome"]
    if "date" in mapping:
        columns_out += ["first_date", "second_date"]
    if "offset_days" in mapping:
        columns_out += ["first_offset_days", "second_offset_days"]
    columns_out += [c for c, k in (("age", "age"), ("sex", "sex")) if k in mapping]
    if "view" in mapping:
        columns_out += ["first_view", "second_view"]
    columns_out += ["source", "notes"]

    if previous is None:
        if not new_rows:
            raise ManifestError(
                f"{name}: no pairs -- no patient has two eligible images ({report['images_eligible']} of {n} rows "
                f"eligible; excluded: {_counts_text(counts)}); check --views, --filter and the column mapping"
            )
        out = pd.DataFrame([{c: r.get(c, "") for c in columns_out} for r in new_rows], columns=columns_out, dtype=object)
        report.update(pairs=len(out), pairs_new=len(out), pairs_kept=0, pairs_kept_labelled=0, stale=[],
                      dropped=[], new_pair_ids=list(out["pair_id"]))
        return out, report
    return _merge(previous, new_rows, columns_out, out_dir, report, set(patients_sorted))


def _counts_text(counts):
    if not counts:
        return "none"
    return "; ".join(f"{why}: {k}" for why, k in sorted(counts.items(), key=lambda kv: -kv[1])[:6])


def _merge(previous, new_rows, columns_out, out_dir, report, patients_seen):
    """Keep the previous manifest's rows verbatim; append the pairs it does not hold."""
    from covreport.manifest import read_manifest

    prev_path = Path(previous)
    m = read_manifest(prev_path, check_images=False)  # refuses a manifest with problems, listing them all
    if m.delimiter is None:
        raise ManifestError(f"{prev_path}: --update needs the manifest as CSV -- export the workbook's first sheet "
                            "as CSV (UTF-8) and give that")
    header, body, lines, _d, _h = _read_table(prev_path, delimiter=m.delimiter, what="manifest")
    header = [h.strip() for h in header]
    col = {}
    for i, h in enumerate(header):
        if h and h not in col:
            col[h] = i
    prev_dir = prev_path.parent
    rows = []
    for number, rec in enumerate(body, start=1):
        row = {h: rec[i] for h, i in col.items()}
        if "pair_id" not in col:
            row["pair_id"] = str(number)
        rows.append(row)
    # Image paths relative to the old manifest's folder, rewritten for the new one's.
    prev_abs, out_abs = os.path.abspath(prev_dir), os.path.abspath(out_dir)
    move = prev_abs != out_abs
    keys = []
    for row in rows:
        f, s = row.get("first_image", "").strip(), row.get("second_image", "").strip()
        if move:
            row["first_image"] = f = _rebase(f, prev_abs, out_abs)
            row["second_image"] = s = _rebase(s, prev_abs, out_abs)
        keys.append((row.get("patient_id", "").strip(), _absolute(f, out_abs) if f else "",
                     _absolute(s, out_abs) if s else ""))
    known = set(keys)
    used_ids = {r["pair_id"].strip() for r in rows}
    appended = []
    for r in new_rows:
        if r["_key"] in known:
            continue
        pid = r["patient_id"]
        pair_id = r["pair_id"]
        if pair_id in used_ids:
            pattern = re.compile(re.escape(pid) + r"-(\d+)$")
            taken = [int(mm.group(1)) for u in used_ids if (mm := pattern.match(u))]
            pair_id = f"{pid}-{max(taken, default=0) + 1}"
        used_ids.add(pair_id)
        appended.append({**r, "pair_id": pair_id})
    arising = {r["_key"] for r in new_rows}
    stale, dropped, kept_rows = [], [], []
    for row, key, line in zip(rows, keys, lines):
        labelled = bool(row.get("outcome", "").strip())
        if key in arising:
            kept_rows.append(row)
            continue
        rec = {"line": int(line), "pair_id": row["pair_id"], "patient_id": key[0],
               "first_image": row.get("first_image", ""), "second_image": row.get("second_image", ""),
               "outcome": row.get("outcome", "").strip()}
        if labelled or key[0] not in patients_seen:
            # A reader's work is never thrown away; nor a pair of a patient this export does not show.
            rec["reason"] = ("patient not among the export's eligible images" if key[0] not in patients_seen
                             else "not consecutive images in the export any more")
            stale.append(rec)
            kept_rows.append(row)
        else:  # unlabelled and superseded: nothing to lose, the pairs that replace it are appended
            dropped.append(rec)
    rows = kept_rows
    final_cols = (["pair_id"] if "pair_id" not in col else []) + list(col)
    final_cols += [c for c in columns_out if c not in final_cols]
    records = [{c: row.get(c, "") for c in final_cols} for row in rows]
    records += [{c: r.get(c, "") for c in final_cols} for r in appended]
    out = pd.DataFrame(records, columns=final_cols, dtype=object)
    if not len(out):
        raise ManifestError(
            f"{report['export']}: no pairs -- no patient has two eligible images and {prev_path} keeps none; "
            "check --views, --filter and the column mapping"
        )
    labelled = sum(1 for r in rows if r.get("outcome", "").strip())
    report.update(
        previous=str(prev_path), pairs=len(out), pairs_new=len(appended), pairs_kept=len(rows),
        pairs_kept_labelled=labelled, stale=stale, dropped=dropped,
        new_pair_ids=[r["pair_id"] for r in appended],
    )
    return out, report


def write_pairs(pairs, path):
    """Write the manifest as UTF-8 CSV, atomically (temporary file + rename).

    Text cells a spreadsheet would run as a formula get a leading apostrophe
    (:func:`covreport._io.safe_csv_cell`).

    Raises
    ------
    ManifestError
        When the file cannot be written.
    """
    from covreport._io import write_csv_atomic

    return write_csv_atomic(pairs, path, error_class=ManifestError)
