"""Read and validate a pair manifest: one row per pair of sequential CXRs.

The user-facing schema is ``data_manifests/README.md``. In short: the
required columns are ``patient_id``, ``first_image``, ``second_image`` and
``outcome``; the optional ones are listed in
:data:`covreport.constants.OPTIONAL_COLUMNS`; any other column is carried
through untouched.

:func:`read_manifest` collects every problem of a manifest and raises one
:class:`~covreport.errors.ManifestError` that lists them all, one per line,
as ``<file> line <n>, column '<col>': <bad value> -- <fix>`` (the header is
line 1). Files that cannot be read as a table at all (empty, header only,
binary, not UTF-8, unreadable workbook) get a one-line error.

Missing or unreadable image files and empty outcomes are not manifest
errors: they become exclusions of the STARD flow diagram (stages
:data:`~covreport.constants.STAGE_INDEX_TEST_NOT_DONE` and
:data:`~covreport.constants.STAGE_NO_REFERENCE`), unless ``strict=True``.

Every cell is read as text and normalised here, column by column, with
vectorised pandas operations; Python loops run only over the rows that have
a problem, so a 100,000-pair manifest validates in about one CPU-second
without opening images (``benchmarks/bench_validate.py``). Cells are never evaluated: a value such
as ``=HYPERLINK(...)`` stays the text it is.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covreport.constants import (
    IMPROVED,
    MANIFEST_DERIVED_COLUMNS,
    OPTIONAL_COLUMNS,
    OUTCOMES,
    REQUIRED_COLUMNS,
    STABLE,
    STAGE_INDEX_TEST_NOT_DONE,
    STAGE_NO_REFERENCE,
    VIEWS,
    WORSE,
)
from covreport.errors import ManifestError, ScoresError
from covreport.images import probe_image
from covreport import tabular
from covreport.tabular import Problems as _Problems
from covreport.tabular import first_line as _first_line
from covreport.tabular import parse_csv as _parse_csv
from covreport.tabular import parse_plain_csv as _parse_plain_csv
from covreport.tabular import read_workbook as _read_workbook
from covreport.tabular import show_name as _name
from covreport.inputs import safe_text
from covreport.vocab import DATE_RANGE, VIEW_CODES, canon, iso_dates, normalise_sex, view_key

__all__ = ["Manifest", "read_manifest", "MISSING_IMAGE_REASONS"]

#: Reasons of :func:`covreport.images.probe_image` that count as "missing"
#: (any other reason counts as "unreadable").
MISSING_IMAGE_REASONS = ("file not found", "broken symbolic link")

_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}

_OUTCOME_CODES = {
    "WORSE": WORSE, "W": WORSE,
    "STABLE": STABLE, "S": STABLE,
    "IMPROVED": IMPROVED, "I": IMPROVED,
}
# Used only to suggest a fix; these words are never accepted silently.
_OUTCOME_HINTS = {
    "WORSENED": WORSE, "WORSENING": WORSE, "DETERIORATED": WORSE, "PROGRESSED": WORSE,
    "PROGRESSION": WORSE, "INCREASED": WORSE,
    "UNCHANGED": STABLE, "SAME": STABLE, "NO CHANGE": STABLE, "STABILITY": STABLE,
    "IMPROVE": IMPROVED, "IMPROVING": IMPROVED, "IMPROVEMENT": IMPROVED, "BETTER": IMPROVED,
    "DECREASED": IMPROVED, "RESOLVED": IMPROVED,
}
_DATE_PAIRS = (("first_date", "second_date"), ("first_offset_days", "second_offset_days"))
_VIEW_COLUMNS = ("first_view", "second_view")
_TEXT_COLUMNS = ("source", "notes")
#: Columns that name a pair, a patient or a file: no invisible character, no two values that look alike.
_ID_COLUMNS = ("pair_id", "patient_id", "first_image", "second_image")
_KNOWN = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

_FORMULA = r"^(?:[=@]|[+\-][^\d.]|[+\-]$)"  # RE2-compatible: pyarrow runs it vectorised
_MESSY_PATH = r"(?:^|/)\.{1,2}(?:/|$)|//|/$"


_canon = canon


def _n(count, word):
    """``1 pair``, ``2 pairs``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _path_text(path):
    """A path in a message: as it is, or quoted when it holds a line break or another unprintable character."""
    return safe_text(path) if path.isprintable() else safe_text(repr(path))


_show = tabular.show_value


# --------------------------------------------------------------------------
# The result


@dataclass
class Manifest:
    """A validated pair manifest.

    Attributes
    ----------
    path : pathlib.Path
        Absolute path of the manifest file.
    sha256 : str
        SHA-256 of the file's bytes (provenance of every result).
    pairs : pandas.DataFrame
        One row per pair in file order: ``pair_id``, ``patient_id``,
        ``first_image``, ``second_image`` (as written, surrounding spaces
        removed), ``first_path``, ``second_path`` (absolute, normalised),
        ``outcome`` (Worse/Stable/Improved or None), ``first_date``,
        ``second_date`` (Timestamps or NaT), ``first_offset_days``,
        ``second_offset_days``, ``interval_days``, ``age`` (float),
        ``sex`` ('M', 'F' or None), ``first_view``, ``second_view`` (AP,
        AP Supine, PA, Lateral or None), ``source``, ``notes``, the unknown
        extra columns untouched, and ``line`` (the pair's line in the file).
        Optional columns absent from the file are present and empty.
    exclusions : pandas.DataFrame
        ``pair_id``, ``patient_id``, ``outcome``, ``stage``, ``reason``,
        ``cause``: one row per excluded pair, at the first stage it fails
        (index test before reference standard). ``reason`` names the image
        files (``first image: file not found (scans/a.png)``); ``cause`` is
        the same without file names (``first image: file not found``), for
        counting pairs per reason.
    image_status : dict
        Absolute image path -> None (readable) or the reason it is not.
        Empty when images were not checked.
    warnings : list of str
        Things the user should know that do not stop the analysis.
    delimiter : str or None
        The CSV delimiter read (None for a workbook).
    extra_columns : list of str
        Columns that are not manifest columns, in file order.
    images_checked : bool
        Whether image files were probed.
    """

    path: Path
    sha256: str
    pairs: pd.DataFrame
    exclusions: pd.DataFrame
    image_status: dict
    warnings: list = field(default_factory=list)
    delimiter: str | None = ","
    extra_columns: list = field(default_factory=list)
    images_checked: bool = True

    def analysable_pairs(self):
        """The pairs that are not excluded (a copy, in file order)."""
        excluded = set(self.exclusions["pair_id"].tolist())
        ids = self.pairs["pair_id"].to_numpy(dtype=object)
        keep = np.fromiter((p not in excluded for p in ids), dtype=bool, count=len(ids))
        return self.pairs[keep].reset_index(drop=True)

    def exclude_unscored(self, scored, *, failed=None, strict=False):
        """This manifest with the pairs lacking an index-test result excluded.

        A pair is analysable when both its images (as written in the
        manifest) are in ``scored``; the first image without one makes the
        pair an exclusion at the stage "index test not done". In reviewer
        mode (a scores file, no images) this is the only image check: no
        image file is opened or looked up.

        Parameters
        ----------
        scored : collection of str
            Image names (the manifest's ``first_image``/``second_image``
            text) that have a score.
        failed : dict, optional
            Image name -> why it could not be scored (weights mode).
        strict : bool
            Raise :class:`ScoresError` listing every unscored pair instead.

        Returns
        -------
        Manifest
            A copy; ``exclusions`` gains one row per newly excluded pair.
        """
        failed = failed or {}
        scored = set(scored)
        # The index test comes before the reference standard (STARD): a pair excluded only for its
        # empty outcome moves to "index test not done" when an image lacks a score, as in weights mode.
        stages = dict(zip(self.exclusions["pair_id"], self.exclusions["stage"]))
        already = {p for p, st in stages.items() if st != STAGE_NO_REFERENCE}
        rows = []
        for rec in self.pairs[["pair_id", "patient_id", "outcome", "first_image", "second_image"]].itertuples(
                index=False):
            if rec.pair_id in already:
                continue
            for which, img in (("first", rec.first_image), ("second", rec.second_image)):
                if img not in scored:
                    why = failed.get(img) or "no score for this image in the scores file"
                    rows.append({"pair_id": rec.pair_id, "patient_id": rec.patient_id, "outcome": rec.outcome,
                                 "stage": STAGE_INDEX_TEST_NOT_DONE, "reason": f"{which} image: {why} ({img})",
                                 "cause": f"{which} image: {why}"})
                    break
        if rows and strict:
            lines = "\n".join(f"pair {r['pair_id']}: {r['reason']}" for r in rows)
            raise ScoresError(f"{len(rows)} pair(s) have no score (--strict):\n{lines}")
        if not rows:
            return self
        new = pd.DataFrame(rows, columns=self.exclusions.columns, dtype=object)
        kept = self.exclusions[~self.exclusions["pair_id"].isin(new["pair_id"])]
        exclusions = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        warnings = [*self.warnings, f"{_n(len(rows), 'pair')} without a score for an image: excluded "
                                    f"({STAGE_INDEX_TEST_NOT_DONE})"]
        return dataclasses.replace(self, exclusions=exclusions, warnings=warnings)

    def image_counts(self):
        """Distinct image files: total, and found/missing/unreadable (None if not checked)."""
        paths = pd.unique(pd.concat([self.pairs["first_path"], self.pairs["second_path"]]))
        counts = {"total": int(len(paths)), "checked": bool(self.images_checked),
                  "found": None, "missing": None, "unreadable": None}
        if self.images_checked:
            reasons = [self.image_status.get(p) for p in paths]
            missing = sum(1 for r in reasons if r is not None and r.startswith(MISSING_IMAGE_REASONS))
            bad = sum(1 for r in reasons if r is not None)
            counts.update(found=len(reasons) - bad, missing=missing, unreadable=bad - missing)
        return counts

    def summary(self):
        """Counts for ``covreport validate`` (plain ints and strings; JSON-ready)."""
        outcome = self.pairs["outcome"]
        per_outcome = {o: int((outcome == o).sum()) for o in OUTCOMES}
        per_outcome["empty"] = int(outcome.isna().sum())
        by_stage = self.exclusions["stage"].value_counts()
        excluded = _plain_records(self.exclusions)
        return {
            "manifest": str(self.path),
            "sha256": self.sha256,
            "delimiter": self.delimiter,
            "pairs": int(len(self.pairs)),
            "patients": int(self.pairs["patient_id"].nunique()),
            "pairs_per_outcome": per_outcome,
            "images": self.image_counts(),
            "exclusions": excluded,
            "exclusions_by_stage": {str(k): int(v) for k, v in by_stage.items()},
            "pairs_analysable": int(len(self.pairs) - self.exclusions["pair_id"].nunique()),
            "extra_columns": list(self.extra_columns),
            "warnings": list(self.warnings),
        }


def _plain_records(frame):
    """Rows of ``frame`` as dicts of str (None where missing), built column by column."""
    columns = {}
    for col in frame.columns:
        values = frame[col].to_numpy(dtype=object)
        missing = pd.isna(values)
        columns[col] = [None if m else str(v) for v, m in zip(values, missing)]
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


# --------------------------------------------------------------------------
# Problems: collected, then raised together


# --------------------------------------------------------------------------
# Bytes -> header, records, line numbers


def _sniff_delimiter(text):
    """The delimiter that makes the header most like a manifest header."""
    line = _first_line(text)
    known = {_canon(c) for c in _KNOWN}
    best, best_key = ",", None
    for delim in _DELIMITERS:
        try:
            fields = next(csv.reader([line], delimiter=delim), [])
        except csv.Error:
            continue
        key = (sum(_canon(f) in known for f in fields), min(len(fields), 2))
        if best_key is None or key > best_key:
            best, best_key = delim, key
    return best


def _is_workbook(path, raw):
    return path.suffix.lower() in (".xlsx", ".xlsm") or raw.startswith(b"PK\x03\x04")


def _load(path, name, raw, warnings):
    """Any accepted file -> (grid, unit, delimiter)."""
    lowered = path.suffix.lower()
    if lowered == ".xls" or raw.startswith(b"\xd0\xcf\x11\xe0"):
        raise ManifestError(
            f"{name} is an old Excel .xls workbook -- save it as .xlsx, or export the first sheet as CSV (UTF-8)"
        )
    if lowered == ".ods":
        raise ManifestError(f"{name} is an OpenDocument spreadsheet -- export the first sheet as CSV (UTF-8)")
    if _is_workbook(path, raw):
        grid = _read_workbook(raw, name, warnings)
        if grid.blank.all():
            raise ManifestError(
                f"{name} is empty -- write a header row ({', '.join(REQUIRED_COLUMNS)}) and one row per pair"
            )
        return grid, "row", None
    text = tabular.decode(raw, name, empty_fix=f"write a header line ({','.join(REQUIRED_COLUMNS)}) and one row per pair",
                          export_fix="export the manifest as CSV (UTF-8), one row per pair")
    delimiter = _sniff_delimiter(text)
    if delimiter != ",":
        warnings.append(
            f"{name} is {_DELIMITERS[delimiter]}-separated, not comma-separated; read it with "
            f"{_DELIMITERS[delimiter]}s as the delimiter"
        )
    grid = _parse_plain_csv(text, delimiter)
    if grid is None:
        grid = _parse_csv(text, delimiter, name)
    return grid, "line", delimiter


# --------------------------------------------------------------------------
# Records -> a table of text cells


@dataclass
class _Table:
    name: str
    unit: str
    header: list            # stripped column names, in file order (kept columns only)
    cells: pd.DataFrame     # one text column per kept header name, positional index
    lines: np.ndarray       # line of each row
    positions: dict         # column name -> position in the file's header
    delimiter: str | None
    multiline: bool         # whether a cell may hold a line break


def _build_table(grid, unit, delimiter, name, problems, warnings):
    lengths, starts = grid.lengths, grid.starts
    filled = np.flatnonzero(~grid.blank)
    if not len(filled):
        raise ManifestError(
            f"{name} is empty -- write a header line ({','.join(REQUIRED_COLUMNS)}) and one row per pair"
        )
    header_at = int(filled[0])  # the header is the first record with a non-blank cell
    header_line = int(starts[header_at])
    header = [str(h).strip().lstrip("\ufeff").strip() for h in grid.cells.iloc[header_at, : lengths[header_at]]]
    rest = np.arange(header_at + 1, len(lengths))
    if unit == "row":  # a workbook row ends at its last filled cell; any width is fine
        width = max(len(header), int(lengths[rest].max()) if len(rest) else 0)
    else:
        width = len(header)
    header = header + [""] * (width - len(header))

    # Rows with more fields than the header are garbled: report them, keep the rest.
    too_long = rest[lengths[rest] > width]
    for i in too_long:
        problems.add_line(
            starts[i],
            f"{lengths[i]} fields but the header has {width} -- quote values that contain "
            f"the delimiter (e.g. \"a{delimiter or ','} b\") or remove the extra delimiter",
            kind="too many fields",
        )
    spaces = rest[grid.blank[rest] & (lengths[rest] > 0)]
    if len(spaces):
        warnings.append(f"skipped {_n(len(spaces), 'empty row')} (first: {unit} {starts[spaces[0]]})")
    # A row with too many fields still gets every other check, on its first `width` fields (issue 21.5).
    body = rest[~grid.blank[rest]]
    named_width = max((i + 1 for i, h in enumerate(header) if h), default=0)
    short = body[lengths[body] < named_width]
    if len(short) and unit == "line":  # a workbook row simply ends at its last filled cell
        warnings.append(
            f"{_n(len(short), 'row')} with fewer fields than the header (first: {unit} {starts[short[0]]}, "
            f"{lengths[short[0]]} of {named_width}); their missing trailing cells are read as empty"
        )
    if len(body) == len(lengths) - header_at - 1:
        cells = grid.cells.iloc[header_at + 1:, :width]
    else:
        cells = grid.cells.iloc[body, :width]
    cells = cells.reset_index(drop=True)
    for pos in range(cells.shape[1], width):  # header wider than every row
        cells[pos] = pd.Series([""] * len(cells), dtype=str)
    lines = starts[body]
    if len(cells) == 0 and not len(too_long):
        raise ManifestError(
            f"{name} has a header but no pairs -- add one row per pair below the header ({unit} {header_line})"
        )

    # Header: empty names, duplicates, names covreport reserves.
    keep, seen, positions = [], {}, {}
    for pos, col in enumerate(header):
        if not col:
            filled = cells[pos].str.strip() != ""
            if filled.any():
                first = int(np.flatnonzero(filled.to_numpy())[0])
                problems.add(
                    header_line, pos + 1, "no name",
                    f"give this column a name (it has values, e.g. {unit} {lines[first]}: {_show(cells[pos].iloc[first])})",
                    position=pos,
                )
            continue
        if col in seen:
            seen[col].append(pos)
            continue
        seen[col] = [pos]
        keep.append(pos)
        positions[col] = pos
    for col, where in seen.items():
        if len(where) > 1:
            numbers = [str(p + 1) for p in where]
            cols = ", ".join(numbers[:-1]) + " and " + numbers[-1]
            problems.add(header_line, col, f"appears {len(where)} times (columns {cols})",
                         "keep one of them", position=where[0])
        if col in MANIFEST_DERIVED_COLUMNS:
            problems.add(header_line, col, "reserved name",
                         "covreport adds a column of this name; rename yours", position=where[0])
    cells = cells[keep]
    cells.columns = [header[p] for p in keep]
    table = _Table(name, unit, list(cells.columns), cells, lines, positions, delimiter, grid.multiline)
    return table, header_line


# --------------------------------------------------------------------------
# Column checks


def _check_header(table, header_line, problems, warnings):
    present = set(table.header)
    unused = [h for h in table.header if h not in _KNOWN]
    for col in REQUIRED_COLUMNS:
        if col in present:
            continue
        same = [h for h in unused if _canon(h) == _canon(col)]
        close = same or difflib.get_close_matches(col, unused, n=1, cutoff=0.75) or [
            h for h in unused if _canon(h) in difflib.get_close_matches(_canon(col), [_canon(u) for u in unused], n=1, cutoff=0.75)
        ][:1]
        if close:
            fix = f"rename column '{_name(close[0])}' to '{col}'"
        else:
            listed = ", ".join(map(_name, table.header[:12])) + (", ..." if len(table.header) > 12 else "")
            fix = f"add a column '{col}' (the header has: {listed})"
        problems.add(header_line, col, "missing", fix, position=-1)
    for h in unused:
        same = [c for c in OPTIONAL_COLUMNS if c not in present and _canon(c) == _canon(h)]
        close = same or difflib.get_close_matches(h.lower(), [c for c in OPTIONAL_COLUMNS if c not in present], n=1, cutoff=0.8)
        if close:
            warnings.append(
                f"column '{_name(h)}' is not a manifest column and is carried through untouched; "
                f"rename it to '{close[0]}' if that is what it holds"
            )


def _flag(table, problems, mask, column, fix, *, kind=None):
    """Add one problem per True in ``mask`` (a loop over the problem rows only)."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    if not len(idx):
        return
    values = table.cells[column].to_numpy(dtype=object)
    pos = table.positions.get(column, 0)
    for i in idx:
        text = fix(i) if callable(fix) else fix
        problems.add(table.lines[i], column, _show(values[i]), text, position=pos, kind=kind or (column, fix if isinstance(fix, str) else id(fix)))


def _stripped(table, column):
    return table.cells[column].str.strip()


def _numbers(table, column, decimal_comma):
    s = _stripped(table, column)
    if decimal_comma:
        s = s.str.replace(",", ".", regex=False)
    values = pd.to_numeric(s, errors="coerce").astype(float)
    bad = (s != "") & ~np.isfinite(values.to_numpy())
    return s, values.where(np.isfinite(values.to_numpy())), bad


def _dates(table, column):
    """ISO 8601 dates (optionally with a time and zone) -> naive UTC Timestamps, bad-cell mask."""
    s = _stripped(table, column)
    values = iso_dates(s)
    return s, values, ((s != "") & values.isna()).to_numpy()


def _resolve(values, base):
    """Image cells -> absolute normalised paths as a str Series ('' stays '').

    Vectorised on POSIX: a path is only handed to :func:`os.path.normpath`
    when it holds ``.``, ``..``, ``//`` or a trailing ``/``. Backslashes are
    read as folder separators (manifests written on Windows).
    """
    if os.sep == "/":
        v = values.str.replace("\\", "/", regex=False)
        joined = v.where(v.str.startswith("/"), base.rstrip("/") + "/" + v)
        messy = np.flatnonzero(joined.str.contains(_MESSY_PATH, regex=True).to_numpy())
        if len(messy):
            out = joined.to_numpy(dtype=object, copy=True)
            for i in messy:
                out[i] = os.path.normpath(out[i])
            joined = pd.Series(out, dtype=str)
    else:  # pragma: no cover - exercised on Windows only
        joined = pd.Series([os.path.normpath(os.path.join(base, p)) for p in values], dtype=str)
    return joined.where(values != "", "").reset_index(drop=True)


def _codes(table, column, normalise):
    """Normalise a low-cardinality column, calling ``normalise`` once per distinct value.

    Returns (normalised values as an object array with None, empty-cell mask).
    """
    codes, uniques = pd.factorize(table.cells[column], use_na_sentinel=False)
    stripped = [str(u).strip() for u in uniques]
    normalised = np.array([normalise(u) if u else None for u in stripped] + [None], dtype=object)
    empty = np.array([not u for u in stripped] + [True], dtype=bool)
    return normalised[codes], empty[codes]


def _outcome_hint(value):
    key = value.strip().upper()
    if key in _OUTCOME_HINTS:
        return f"; did you mean '{_OUTCOME_HINTS[key]}'?"
    close = difflib.get_close_matches(key, [o.upper() for o in OUTCOMES], n=1, cutoff=0.6)
    return f"; did you mean '{close[0].capitalize()}'?" if close else ""


def _validate(table, problems, warnings, base, strict):
    """Normalise every manifest column; return the pairs frame (without images checked)."""
    n = len(table.cells)
    cells = table.cells
    out = {}
    unit = table.unit
    decimal_comma = table.delimiter == ";"

    # Invisible characters (direction controls, zero-width, tags, other format characters): an id could
    # display as another id. Identifier and path columns refuse every one, the other columns all but tabs.
    for col in cells.columns:
        if col in _KNOWN:
            for i, problem in tabular.invisible_cells(cells[col], identifier=col in _ID_COLUMNS):
                problems.add(table.lines[i], col, _show(cells[col].iat[i]),
                             f"{problem}: an invisible direction-control, zero-width or other format character "
                             "can make one value display as another", position=table.positions.get(col, 0),
                             kind=(col, "invisible"))

    # pair_id
    if "pair_id" in cells:
        pid = _stripped(table, "pair_id")
        _flag(table, problems, pid == "", "pair_id",
              "give every pair a unique id, or delete the pair_id column to number the pairs 1, 2, 3, ...")
        dup = (pid != "") & pid.duplicated(keep="first")
        if dup.any():
            first_line = dict(zip(pid[~pid.duplicated(keep="first")], table.lines[~pid.duplicated(keep="first").to_numpy()]))
            _flag(table, problems, dup, "pair_id",
                  lambda i: f"already used on {unit} {first_line[pid.iloc[i]]}; pair ids must be unique",
                  kind=("pair_id", "duplicate"))
        out["pair_id"] = pid
    else:
        out["pair_id"] = pd.Series(np.arange(1, n + 1).astype(str), dtype=str)

    # required text cells
    fixes = {
        "patient_id": "fill in the patient's id (all pairs of a patient share it)",
        "first_image": "give the path of the earlier CXR (relative to the manifest's folder, or absolute)",
        "second_image": "give the path of the later CXR (relative to the manifest's folder, or absolute)",
    }
    for col, fix in fixes.items():
        if col in cells:
            s = _stripped(table, col)
            _flag(table, problems, s == "", col, fix)
            out[col] = s
        else:
            out[col] = pd.Series([""] * n, dtype=str)

    # line breaks inside a cell of a manifest column usually mean an unmatched quote
    for col in _KNOWN if table.multiline else ():
        if col in cells and col not in _TEXT_COLUMNS:
            _flag(table, problems, cells[col].str.contains("\n|\r", regex=True), col,
                  "a line break inside a cell: check for an unmatched double quote (\") on this line",
                  kind=(col, "line break"))

    # outcome
    if "outcome" in cells:
        mapped, empty = _codes(table, "outcome", lambda v: _OUTCOME_CODES.get(v.upper()))
        raw = cells["outcome"]
        _flag(table, problems, ~empty & pd.isna(mapped), "outcome",
              lambda i: "use Worse, Stable or Improved (or W, S, I; any case)" + _outcome_hint(raw.iloc[i]),
              kind=("outcome", "unknown"))
        if strict:
            _flag(table, problems, empty, "outcome",
                  "fill in Worse, Stable or Improved (without strict mode the pair is excluded: "
                  "reference standard not available)")
        out["outcome"] = pd.Series(mapped, dtype=object)
    else:
        out["outcome"] = pd.Series([None] * n, dtype=object)

    # dates and day offsets
    for first, second in _DATE_PAIRS:
        parsed = {}
        for col in (first, second):
            if col not in cells:
                continue
            if col.endswith("_date"):
                s, values, bad = _dates(table, col)
                _flag(table, problems, bad, col,
                      f"write dates in ISO 8601, YYYY-MM-DD (e.g. 2020-03-14), from {DATE_RANGE[0]} "
                      f"to {DATE_RANGE[1]}")
            else:
                s, values, bad = _numbers(table, col, decimal_comma)
                _flag(table, problems, bad, col, "write the day offset as a number of days (e.g. 0, 3, 12.5)")
            parsed[col] = (s, values)
        if len(parsed) == 1:
            (only,) = parsed
            other = second if only == first else first
            warnings.append(f"column '{only}' without '{other}': intervals between the CXRs are not computed from it")
        if len(parsed) == 2:
            (s1, v1), (_, v2) = parsed[first], parsed[second]
            before = (v2 < v1).to_numpy()
            _flag(table, problems, before, second,
                  lambda i, s1=s1, first=first: (
                      f"earlier than {first} {_show(s1.iloc[i])}; the first image must be the earlier CXR: "
                      "swap first and second (images, dates, views)"),
                  kind=(second, "order"))
        for col in (first, second):
            kind = "datetime64[ns]" if col.endswith("_date") else float
            out[col] = parsed[col][1] if col in parsed else pd.Series([pd.NaT if kind != float else np.nan] * n, dtype=kind)

    days = (out["second_date"] - out["first_date"]).dt.total_seconds() / 86400.0
    offsets = out["second_offset_days"] - out["first_offset_days"]
    out["interval_days"] = days.where(days.notna(), offsets).astype(float)

    # age
    if "age" in cells:
        s, age, bad = _numbers(table, "age", decimal_comma)
        bad = bad | (age < 0) | (age > 120)
        _flag(table, problems, bad, "age", "give the age in years, a number from 0 to 120 (or leave it blank)")
        out["age"] = age.where(~bad)
    else:
        out["age"] = pd.Series([np.nan] * n, dtype=float)

    # sex
    if "sex" in cells:
        mapped, empty = _codes(table, "sex", normalise_sex)
        _flag(table, problems, ~empty & pd.isna(mapped), "sex",
              "use M, F, Male or Female (any case), or leave it blank")
        out["sex"] = pd.Series(mapped, dtype=object)
    else:
        out["sex"] = pd.Series([None] * n, dtype=object)

    # views
    for col in _VIEW_COLUMNS:
        if col in cells:
            mapped, empty = _codes(table, col, lambda v: VIEW_CODES.get(view_key(v)))
            _flag(table, problems, ~empty & pd.isna(mapped), col,
                  f"use {', '.join(VIEWS[:-1])} or {VIEWS[-1]} (or leave it blank)")
            out[col] = pd.Series(mapped, dtype=object)
        else:
            out[col] = pd.Series([None] * n, dtype=object)

    for col in _TEXT_COLUMNS:
        out[col] = cells[col] if col in cells else pd.Series([None] * n, dtype=object)

    # images: paths, same image twice, one image under two patients
    first_path = _resolve(out["first_image"], base)
    second_path = _resolve(out["second_image"], base)
    out["first_path"], out["second_path"] = first_path, second_path
    if "first_image" in cells and "second_image" in cells:
        same = ((first_path == second_path) & (first_path != "")).to_numpy()
        _flag(table, problems, same, "second_image",
              lambda i: f"same image as first_image {_show(out['first_image'].iloc[i])}; "
                        "a pair is two different CXRs of the patient",
              kind=("second_image", "same"))
        dup_pairs = pd.DataFrame({"a": first_path, "b": second_path}).duplicated() & (first_path != "")
        if dup_pairs.any():
            i = int(np.flatnonzero(dup_pairs.to_numpy())[0])
            warnings.append(
                f"{_n(int(dup_pairs.sum()), 'row')} repeating the images of an earlier row (first: {unit} {table.lines[i]}); "
                "a pair listed twice counts twice in the analysis"
            )
    if "patient_id" in cells and ("first_image" in cells or "second_image" in cells):
        _check_image_patients(table, problems, out, first_path, second_path)

    _check_look_alikes(table, problems, out)

    # Cells that a spreadsheet would take for a formula are kept as text.
    formula_cells, first_formula = 0, None
    for col in cells.columns:
        hit = cells[col].str.contains(_FORMULA, regex=True).to_numpy()
        if hit.any():
            formula_cells += int(hit.sum())
            i = int(np.flatnonzero(hit)[0])
            if first_formula is None or table.lines[i] < first_formula[0]:
                first_formula = (table.lines[i], col)
    if formula_cells:
        warnings.append(
            f"{_n(formula_cells, 'cell')} starting with =, +, - or @ (first: {unit} {first_formula[0]}, column "
            f"'{_name(first_formula[1])}'): read as plain text and never evaluated"
        )
    return out


_LOOK_ALIKE_FIX = {
    "patient_id": "write the same id the same way (if they are two patients, give ids that do not look alike)",
    "pair_id": "give the pairs ids that do not look alike",
    "first_image": "a reader cannot tell these two paths apart: correct the path, or rename the file",
}


def _check_look_alikes(table, problems, out):
    """Two different ids (or paths) in one file that look the same (equal Unicode TR39 skeletons)."""
    unit = table.unit
    for col in ("patient_id", "pair_id"):
        if col not in table.cells:
            continue
        values = out[col].to_numpy(dtype=object)
        for i, j, why in tabular.look_alikes(values):
            problems.add(table.lines[i], col,
                         f"{_show(values[i])} looks the same as {_show(values[j])} on {unit} {table.lines[j]} ({why})",
                         _LOOK_ALIKE_FIX[col], position=table.positions.get(col, 0), kind=(col, "look-alike"))
    cols = [c for c in ("first_image", "second_image") if c in table.cells]
    if not cols:
        return
    n = len(table.cells)
    # Paths of both columns in file order (row by row, first before second).
    values = np.empty(n * len(cols), dtype=object)
    for k, col in enumerate(cols):
        values[k::len(cols)] = out[col].to_numpy(dtype=object)
    for i, j, why in tabular.look_alikes(values, other_script_only=True):
        col, row = cols[i % len(cols)], i // len(cols)
        problems.add(table.lines[row], col,
                     f"{_show(values[i])} looks the same as {_show(values[j])} ({cols[j % len(cols)]}, "
                     f"{unit} {table.lines[j // len(cols)]}; {why})",
                     _LOOK_ALIKE_FIX["first_image"], position=table.positions.get(col, 0), kind=(col, "look-alike"))


def _check_image_patients(table, problems, out, first_path, second_path):
    """Every image must belong to one patient: flag rows that list it under another."""
    n = len(first_path)
    patient = out["patient_id"].reset_index(drop=True)
    long = pd.DataFrame({
        "path": pd.concat([first_path, second_path], ignore_index=True),
        "patient": pd.concat([patient, patient], ignore_index=True),
        "row": np.concatenate([np.arange(n), np.arange(n)]),
        "which": np.repeat([0, 1], n),
    })
    long = long[(long["path"] != "") & (long["patient"] != "")]
    distinct = long.drop_duplicates(["path", "patient"])
    clashing = distinct["path"][distinct["path"].duplicated()].unique()
    if not len(clashing):
        return
    sub = long[long["path"].isin(clashing)].sort_values(["row", "which"], kind="stable")
    for _path, group in sub.groupby("path", sort=False):
        owner = group.iloc[0]
        for rec in group.itertuples(index=False):
            if rec.patient == owner.patient:
                continue
            col = ("first_image", "second_image")[rec.which]
            problems.add(
                table.lines[rec.row], col, _show(out[col].iloc[rec.row]),
                f"also listed under patient {_show(owner.patient)} ({table.unit} {table.lines[owner.row]}); "
                "an image belongs to one patient: correct the patient_id or the path",
                position=table.positions.get(col, 0), kind=(col, "two patients"),
            )


def _probe(path):
    try:
        return probe_image(path)
    except (OSError, ValueError) as exc:
        return f"cannot be opened ({type(exc).__name__})"


# --------------------------------------------------------------------------
# Public entry point


def read_manifest(path, *, strict=False, check_images=True):
    try:
        return _read_manifest(path, strict=strict, check_images=check_images)
    except MemoryError:
        raise ManifestError(f"{safe_text(str(path))} is too large to validate in the memory available -- "
                            "split the manifest, or validate it on a machine with more memory") from None


def _read_manifest(path, *, strict=False, check_images=True):
    """Read, validate and normalise a pair manifest.

    Parameters
    ----------
    path : str or os.PathLike
        A CSV file (UTF-8 with or without BOM; comma-, semicolon-, tab- or
        pipe-separated) or an ``.xlsx`` workbook (first sheet).
    strict : bool, default False
        If True, missing or unreadable images and empty outcomes are errors
        instead of exclusions.
    check_images : bool, default True
        Probe every image file (header only). If False, no file is opened and
        there are no image exclusions.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        Listing every problem at once, one per line, as
        ``<file> line <n>, column '<col>': <bad value> -- <fix>``; or one line
        for a file that is not a readable table.
    """
    given = Path(path)
    name = str(path)
    raw = tabular.read_bytes(given, name, "manifest")
    sha256 = hashlib.sha256(raw).hexdigest()
    warnings = []
    grid, unit, delimiter = _load(given, name, raw, warnings)
    problems = _Problems(name, unit)
    table, header_line = _build_table(grid, unit, delimiter, name, problems, warnings)
    _check_header(table, header_line, problems, warnings)
    base = os.path.abspath(given.parent)
    out = _validate(table, problems, warnings, base, strict)
    if not strict and len(problems):
        _raise_with_the_rest(table, problems, out, warnings, check_images)

    n = len(table.cells)
    status = {}
    first_bad = np.full(n, None, dtype=object)
    second_bad = np.full(n, None, dtype=object)
    if check_images:
        paths = pd.unique(np.concatenate([out["first_path"], out["second_path"]]))
        status = {p: _probe(p) for p in paths if p != ""}
        first_bad = pd.Series(out["first_path"]).map(status).to_numpy(dtype=object, copy=True)
        second_bad = pd.Series(out["second_path"]).map(status).to_numpy(dtype=object, copy=True)
        first_bad[pd.isna(first_bad)] = None
        second_bad[pd.isna(second_bad)] = None
        if strict:
            for col, bad, paths_ in (("first_image", first_bad, out["first_path"]),
                                     ("second_image", second_bad, out["second_path"])):
                _flag(table, problems, pd.notna(bad), col,
                      lambda i, bad=bad, paths_=paths_: (
                          f"{bad[i]}: {_path_text(paths_[i])}; correct the path (relative paths start at the "
                          "manifest's folder) or remove the pair"
                          if bad[i].startswith(MISSING_IMAGE_REASONS)
                          else f"{bad[i]}: {_path_text(paths_[i])}; replace the file or remove the pair"),
                      kind=(col, "image"))
    problems.raise_if_any()

    pairs = _assemble(table, out)
    exclusions = _exclusions(pairs, first_bad, second_bad)
    _summarise_exclusions(exclusions, status, pairs, warnings)
    return Manifest(
        path=given.absolute(), sha256=sha256, pairs=pairs, exclusions=exclusions,
        image_status=status, warnings=warnings, delimiter=delimiter,
        extra_columns=[c for c in table.header if c not in _KNOWN], images_checked=bool(check_images),
    )


#: Most exclusions listed beside the problems of a manifest that fails (the rest are counted).
_REST_LIMIT = 20


def _raise_with_the_rest(table, problems, out, warnings, check_images):
    """Raise the problems together with what validate would say once they are fixed (issue 21.5).

    The exclusions (missing or unreadable images, empty outcomes) and the
    warnings (a near-miss column name such as ``Age``, ...) of the same
    manifest are listed in the same message, so that one round of fixes is
    enough.
    """
    unit, rest = table.unit, []
    if check_images:
        status = {}
        for col, which, written in (("first_path", "first", "first_image"), ("second_path", "second", "second_image")):
            for i, path in enumerate(out[col]):
                if path and path not in status:
                    status[path] = _probe(path)
                if path and status[path] is not None:
                    rest.append((int(table.lines[i]), f"{unit} {table.lines[i]}: {which} image: {status[path]} "
                                 f"({_path_text(str(out[written].iloc[i]))})"))
    if "outcome" in table.cells:
        for i in np.flatnonzero((table.cells["outcome"].str.strip() == "").to_numpy()):
            rest.append((int(table.lines[i]), f"{unit} {table.lines[i]}: outcome empty"))
    try:
        problems.raise_if_any()
    except ManifestError as err:
        lines = [str(err)]
        if len(problems) == 1 and (warnings or rest):
            lines.insert(0, f"{table.name}: 1 problem; fix it and validate again:")
        lines += [f"{table.name}: warning (not an error): {w}" for w in warnings]
        if rest:
            rest.sort(key=lambda r: r[0])
            lines.append(f"{table.name}: once these problems are fixed, {_n(len({r[0] for r in rest}), 'pair')} "
                         "would be excluded (left out of the analysis; errors only in strict mode):")
            lines += [f"{table.name} {text}" for _line, text in rest[:_REST_LIMIT]]
            if len(rest) > _REST_LIMIT:
                lines.append(f"{table.name}: ... and {len(rest) - _REST_LIMIT} more exclusions")
        err.args = ("\n".join(lines),)
        raise


read_manifest.__doc__ = _read_manifest.__doc__


def _assemble(table, out):
    order = ["pair_id", "patient_id", "first_image", "second_image", "first_path", "second_path",
             "outcome", "first_date", "second_date", "first_offset_days", "second_offset_days",
             "interval_days", "age", "sex", "first_view", "second_view", "source", "notes"]
    data = {}
    for col in order:
        value = out[col]
        data[col] = value.reset_index(drop=True) if isinstance(value, pd.Series) else value
    pairs = pd.DataFrame(data)
    for col in table.header:
        if col not in _KNOWN:
            pairs[col] = table.cells[col].to_numpy(dtype=object)
    pairs["line"] = table.lines.astype(np.int64)
    return pairs


def _exclusions(pairs, first_bad, second_bad):
    """One row per excluded pair, at the first stage it fails.

    ``reason`` names the image as written (for the reader); ``cause`` is the
    same without file names, for counting pairs per reason in the flow diagram.

    Columns are taken out of the frame as object arrays once, and the texts
    are built only for the pairs with a bad image, so a manifest whose
    100,000 outcomes are all empty costs a few array operations, not 100,000
    row look-ups.
    """
    columns = ["pair_id", "patient_id", "outcome", "stage", "reason", "cause"]
    first_bad = np.asarray(first_bad, dtype=object)
    second_bad = np.asarray(second_bad, dtype=object)
    has_first = np.array([v is not None for v in first_bad], dtype=bool)
    has_second = np.array([v is not None for v in second_bad], dtype=bool)
    image = has_first | has_second
    no_reference = pairs["outcome"].isna().to_numpy() & ~image
    rows = np.flatnonzero(image | no_reference)  # ascending: file order
    stage = np.full(len(rows), STAGE_NO_REFERENCE, dtype=object)
    reason = np.full(len(rows), "outcome empty", dtype=object)
    cause = reason.copy()
    at_image = np.flatnonzero(image[rows])
    if len(at_image):
        first_image = pairs["first_image"].to_numpy(dtype=object)
        second_image = pairs["second_image"].to_numpy(dtype=object)
        for k in at_image:
            i = rows[k]
            parts, causes = [], []
            for which, bad, written in (("first", first_bad, first_image), ("second", second_bad, second_image)):
                if bad[i] is not None:
                    parts.append(f"{which} image: {bad[i]} ({written[i]})")
                    causes.append(f"{which} image: {bad[i]}")
            stage[k], reason[k], cause[k] = STAGE_INDEX_TEST_NOT_DONE, "; ".join(parts), "; ".join(causes)
    data = {
        "pair_id": pairs["pair_id"].to_numpy(dtype=object)[rows],
        "patient_id": pairs["patient_id"].to_numpy(dtype=object)[rows],
        "outcome": pairs["outcome"].to_numpy(dtype=object)[rows],
        "stage": stage, "reason": reason, "cause": cause,
    }
    return pd.DataFrame(data, columns=columns, dtype=object)


def _summarise_exclusions(exclusions, status, pairs, warnings):
    stages = exclusions["stage"]
    n_images = int((stages == STAGE_INDEX_TEST_NOT_DONE).sum())
    if n_images:
        missing = sum(1 for r in status.values() if r is not None and r.startswith(MISSING_IMAGE_REASONS))
        unreadable = sum(1 for r in status.values() if r is not None) - missing
        warnings.append(
            f"{_n(missing, 'image file')} missing and {unreadable} unreadable: {_n(n_images, 'pair')} excluded "
            f"({STAGE_INDEX_TEST_NOT_DONE}); strict mode makes this an error"
        )
    n_empty = int(pairs["outcome"].isna().sum())
    if n_empty:
        warnings.append(
            f"{_n(n_empty, 'pair')} without an outcome: excluded ({STAGE_NO_REFERENCE}) until a reader fills it in; "
            "strict mode makes this an error"
        )
