"""Tables as text cells with their line numbers: the reading layer under manifests and exports.

A CSV file or the first sheet of a workbook becomes a :class:`Grid`: every
record as text cells, how many fields it really had, whether it is blank, and
the line (or sheet row) it starts on, so that every problem can name its
line. :class:`Problems` collects problems of cells and rows and raises them
all at once as one :class:`~covreport.errors.ManifestError`, one line each.
:mod:`covreport.manifest` and :mod:`covreport.pairs` read through here; what
the cells mean (column names, codes, dates) is theirs and
:mod:`covreport.vocab`'s.
"""

import csv
import io
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covreport.errors import ManifestError

#: Problems of one kind shown before "N more like: ...".
MAX_SHOWN_PER_KIND = 20
#: A row holding only these (and delimiters) is an empty row.
BLANK = " \t\x0b\x0c"


#: Bytes looked at to tell binary data from text.
SNIFF_BYTES = 65536


def read_bytes(path, name, what):
    """The bytes of a table file, or a one-line :class:`ManifestError` naming it and the fix."""
    from pathlib import Path

    path = Path(path)
    try:
        if path.is_dir():
            raise ManifestError(f"{name} is a folder, not a file -- give the path of the {what} CSV file")
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{name} does not exist -- check the path to the {what}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ManifestError(f"{name} cannot be read ({reason}) -- check the path and its permissions") from None


def _byte_classes(sample):
    arr = np.frombuffer(sample, dtype=np.uint8)
    control = (arr < 0x20) & ~np.isin(arr, (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1A))
    return control, arr >= 0x80


def decode(raw, name, *, empty_fix, export_fix):
    """File bytes -> text (UTF-8, with or without BOM), or a one-line error saying how to fix the file.

    Refused: UTF-16, an empty file (``empty_fix`` says what to write), binary
    data (NUL, or many control bytes; ``export_fix`` says how to export the
    table), text that is not UTF-8 (its byte, offset and line named).
    """
    def binary(offset):
        return ManifestError(f"{name} is not a text CSV file (binary data at byte {offset}) -- {export_fix}")

    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(f"{name} is UTF-16 text -- re-save it as UTF-8 (in Excel: Save As > 'CSV UTF-8')")
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    if not body.strip():
        raise ManifestError(f"{name} is empty -- {empty_fix}")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise binary(nul)
    sample = raw[:SNIFF_BYTES]
    control, high = _byte_classes(sample)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if control.sum() > 0.01 * len(sample) or high.sum() > 0.3 * len(sample):
            raise binary(int(np.flatnonzero(control | high)[0])) from None
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"{name} is not UTF-8 text (byte 0x{raw[exc.start]:02X} at offset {exc.start}, line {line}; "
            "Latin-1 or Windows-1252?) -- re-save it as UTF-8 (in Excel: Save As > 'CSV UTF-8')"
        ) from None
    if control.sum() > 0.01 * len(sample):
        raise binary(int(np.flatnonzero(control)[0]))
    return text


def show_name(text):
    """A column name in a message: line breaks and other unprintable characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]

class Problems:
    """Every problem found, rendered as ``<file> line <n>, column '<c>': <value> -- <fix>``."""

    def __init__(self, name, unit):
        self.name, self.unit = name, unit
        self.items = []  # (line, position, kind, where-less text)

    def add(self, line, column, value, fix, *, position=0, kind=None):
        where = f"column '{show_name(column)}'" if isinstance(column, str) else f"column {column}"
        self.items.append((int(line), position, kind or (column, fix), f"{where}: {value} -- {fix}"))

    def add_line(self, line, message, *, kind=None):
        """A problem of a whole row, not of one cell."""
        self.items.append((int(line), -1, kind or message, message))

    def __len__(self):
        return len(self.items)

    def _render(self, line, text):
        sep = ", " if text.startswith("column") else ": "
        return f"{self.name} {self.unit} {line}{sep}{text}"

    def raise_if_any(self):
        if not self.items:
            return
        items = sorted(self.items, key=lambda it: (it[0], it[1]))
        shown, hidden, per_kind = [], {}, {}
        for line, _pos, kind, text in items:
            per_kind[kind] = per_kind.get(kind, 0) + 1
            if per_kind[kind] <= MAX_SHOWN_PER_KIND:
                shown.append(self._render(line, text))
            else:
                hidden.setdefault(kind, [0, text])[0] += 1
        for count, text in hidden.values():
            shown.append(f"{self.name}: {count} more like: {text}")
        if len(items) == 1:
            message = shown[0]
        else:
            message = f"{self.name}: {len(items)} problems; fix them all and validate again:\n" + "\n".join(shown)
        err = ManifestError(message)
        err.problems = [self._render(line, text) for line, _pos, _kind, text in items]
        raise err

def first_line(text):
    start = re.search(r"[^\r\n]", text)
    if start is None:
        return ""
    end = re.compile(r"[\r\n]").search(text, start.start())
    return text[start.start(): end.start() if end else len(text)]

@dataclass
class Grid:
    """Every record of a file (blank lines included) as text cells, before any meaning."""

    cells: pd.DataFrame     # positional columns 0..w-1, str, padded with ""
    lengths: np.ndarray     # number of fields each record really had (0: blank line)
    blank: np.ndarray       # True where every cell is empty or whitespace
    starts: np.ndarray      # line (or sheet row) each record starts on
    multiline: bool         # whether a cell may hold a line break


def grid_from_records(records, starts):
    lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    width = int(lengths.max()) if len(records) else 0
    rows = [r if len(r) == width else r + [""] * (width - len(r)) for r in records]
    cells = pd.DataFrame(rows, columns=range(width), dtype=str) if rows else pd.DataFrame(dtype=str)
    blank = np.array([not any(v.strip(BLANK) for v in r) for r in records], dtype=bool)
    return Grid(cells, lengths, blank, np.asarray(starts, dtype=np.int64), True)


def read_records(text, delimiter, name):
    """CSV text -> (records as lists of str, line each record starts on), with the csv module.

    Quotes, line breaks inside quoted cells and ragged rows are read as
    written; a quoting error is a :class:`ManifestError` naming the line.
    """
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, ends = [], []
    # The csv module refuses fields over 128 KiB (a guard against unbounded
    # memory); the whole file is in memory already, so a long quoted cell
    # (e.g. notes) is no risk: lift the limit to the file's size while reading.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        for record in reader:
            records.append(record)
            ends.append(reader.line_num)
    except csv.Error as exc:
        raise ManifestError(
            f"{name} line {reader.line_num}: {exc} -- check the quoting on this line"
        ) from None
    finally:
        csv.field_size_limit(limit)
    starts = np.empty(len(records), dtype=np.int64)
    if records:
        starts[0] = 1
        starts[1:] = np.asarray(ends[:-1], dtype=np.int64) + 1
    return records, starts


def parse_csv(text, delimiter, name):
    """General CSV reading with the csv module: quotes, line breaks in cells, ragged rows."""
    return grid_from_records(*read_records(text, delimiter, name))


def parse_plain_csv(text, delimiter):
    """Fast path for a CSV without any double quote: one record per line, vectorised.

    Returns None when the text does not fit the fast path (the caller then
    uses :func:`parse_csv`).
    """
    if '"' in text or "\r" in text.replace("\r\n", ""):
        return None
    text = text.replace("\r\n", "\n")
    try:
        cells = pd.read_csv(
            io.StringIO(text), sep=delimiter, header=None, dtype=str, keep_default_na=False,
            na_filter=False, skip_blank_lines=False, index_col=False, quoting=csv.QUOTE_NONE,
            engine="c",
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
        return None  # e.g. a row longer than the first: the general reader reports it
    # Per line: number of fields, and whether anything but spaces and delimiters is on it.
    # (UTF-8 never uses the bytes of newline or delimiter inside a multi-byte character.)
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    n_lines = len(newlines) + (0 if text.endswith("\n") else 1)
    if len(cells) != n_lines:
        return None
    begins = np.concatenate([[0], newlines + 1])[:n_lines]
    ends = np.append(newlines, len(data))[:n_lines]
    fields = np.add.reduceat(data == ord(delimiter), begins, dtype=np.int64) + 1
    lengths = np.where(ends > begins, fields, 0)
    is_content = np.ones(256, dtype=bool)
    is_content[list((BLANK + "\n" + delimiter).encode())] = False
    blank = np.add.reduceat(is_content[data], begins, dtype=np.int64) == 0
    cells.columns = range(cells.shape[1])
    return Grid(cells, lengths, blank, np.arange(1, n_lines + 1, dtype=np.int64), False)

def cell_text(value):
    """A workbook cell as the text a CSV export would hold."""
    import datetime as dt

    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0, 0):
            return value.date().isoformat()
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def read_workbook(raw, name, warnings):
    """First sheet of an .xlsx workbook -> records and row numbers."""
    try:
        import openpyxl
    except ImportError:  # pragma: no cover - openpyxl is a dependency
        raise ManifestError(f"{name} is an Excel workbook and openpyxl is not installed -- export it as CSV (UTF-8)")
    try:
        wb = openpyxl.load_workbook(io.BytesIO(raw), read_only=True, data_only=True)
        try:
            sheets = wb.sheetnames
            ws = wb[sheets[0]]
            records = [[cell_text(v) for v in row] for row in ws.iter_rows(min_row=1, values_only=True)]
        finally:
            wb.close()
    except Exception as exc:  # openpyxl and zipfile raise many types on junk
        raise ManifestError(
            f"{name} cannot be read as an Excel workbook ({type(exc).__name__}) -- "
            "export the first sheet as CSV (UTF-8) and validate that"
        ) from None
    if len(sheets) > 1:
        warnings.append(f"{name} has {len(sheets)} sheets; read the first one, '{sheets[0]}'")
    # Trailing empty cells of a row are not data (a CSV export drops them too).
    records = [r[: max((i + 1 for i, v in enumerate(r) if v.strip()), default=0)] for r in records]
    return grid_from_records(records, np.arange(1, len(records) + 1, dtype=np.int64))
