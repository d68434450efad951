"""Tables as text cells with their line numbers: the reading layer under manifests and exports.

A CSV file or the first sheet of a workbook becomes a :class:`Grid`: every
record as text cells, how many fields it really had, whether it is blank, and
the line (or sheet row) it starts on, so that every problem can name its
line. :class:`Problems` collects problems of cells and rows and raises them
all at once as one :class:`~covreport.errors.ManifestError`, one line each.
Files are read through :mod:`covreport.inputs` (regular files of bounded
size); a workbook's every cell is read, whatever its ``<dimension>`` says,
within stated bounds (:func:`read_workbook`); :func:`invisible_cells` and
:func:`look_alikes` find ids that hide a character or look like another id.
:mod:`covreport.manifest` and :mod:`covreport.pairs` read through here; what
the cells mean (column names, codes, dates) is theirs and
:mod:`covreport.vocab`'s.
"""

import csv
import functools
import io
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covreport.errors import ManifestError
from covreport.inputs import identifier_problem, safe_text, skeleton, text_problem

#: Problems of one kind shown before "N more like: ...".
MAX_SHOWN_PER_KIND = 20
#: A row holding only these (and delimiters) is an empty row.
BLANK = " \t\x0b\x0c"


#: Bytes looked at to tell binary data from text.
SNIFF_BYTES = 65536


def read_bytes(path, name, what, *, limit=None):
    """The bytes of a table file, or a one-line :class:`ManifestError` naming it and the fix.

    Read through :func:`covreport.inputs.read_bytes`: the path must name a
    regular file (not a folder, FIFO or device) of at most ``limit`` bytes
    (default: :data:`covreport.inputs.LIMITS` of a manifest or an export).
    """
    from covreport import inputs

    if limit is None:
        limit = inputs.limit_of("manifest" if what == "manifest" else "pairs export")
    return inputs.read_bytes(path, what, limit=limit, error_class=ManifestError)


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
    """A column name in a message: line breaks, control and invisible characters escaped."""
    return safe_text(text if text.isprintable() else repr(text)[1:-1])


def show_value(value, limit=60):
    """A cell value in a message: quoted (as ``repr`` does), shortened, or ``empty``.

    Control, bidirectional, format and other invisible characters are
    escaped (``\\u202e``), so a value cannot act on a terminal or pass for
    another value.
    """
    if value == "":
        return "empty"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 4] + "...'"
    return safe_text(text, limit=limit + 10)

_NOT_PLAIN = r"[^\x20-\x7e]"  # anything but printable ASCII: looked at one by one
_NOT_PLAIN_RE = re.compile(_NOT_PLAIN)


def invisible_cells(values, *, identifier=True):
    """``(index, problem)`` of each cell of ``values`` (a str Series) holding an invisible character.

    Identifier and path cells refuse every control, format (Cf) and
    default-ignorable code point (:func:`covreport.inputs.identifier_problem`);
    free-text cells refuse the same but for tabs and variation selectors
    (:func:`covreport.inputs.text_problem`). Line breaks are left to the
    caller (an unmatched quote is the likelier cause). Only cells that are
    not plain printable ASCII are looked at one by one.
    """
    check = identifier_problem if identifier else text_problem
    cells = values.to_numpy(dtype=object)
    if not _NOT_PLAIN_RE.search("".join(cells)):  # one scan of the whole column: the usual case
        return []
    odd = np.flatnonzero(values.str.contains(_NOT_PLAIN, regex=True).to_numpy(dtype=bool))
    found = []
    for i in odd:
        problem = check(str(values.iat[i]).replace("\r", "").replace("\n", ""))
        if problem:
            found.append((int(i), problem))
    return found


def _scripts(value):
    return {"LATIN" if c.isascii() else unicodedata.name(c, "?").split(" ")[0] for c in value if c.isalpha()}


@functools.lru_cache(maxsize=1)
def _ascii_skeleton_table():
    """``str.translate`` table giving the skeleton of an ASCII text (NFD leaves ASCII as it is)."""
    table = {}
    for cp in range(128):
        proto = skeleton(chr(cp))
        if proto != chr(cp):
            table[cp] = proto
    return table


def look_alikes(values, *, other_script_only=False):
    """Distinct values that look the same: equal Unicode TR39 confusable skeletons.

    Parameters
    ----------
    values : sequence of str
        Stripped cells, in file order ("" is skipped).
    other_script_only : bool
        Report only pairs that differ by letters of another script (for
        paths, where ``0``/``O`` and ``1``/``l`` are ordinary).

    Returns
    -------
    list of (index, first_index, why)
        ``index`` is the first cell of a value that looks like the value
        first written at ``first_index`` (an earlier cell); ``why`` is
        "characters from another script" or "look-alike characters".
    """
    firsts = pd.Series(list(values), dtype=object).drop_duplicates()
    firsts = firsts[firsts != ""]
    table = _ascii_skeleton_table()
    keys = pd.Series([v.translate(table) if v.isascii() else skeleton(v) for v in firsts.to_numpy()],
                     index=firsts.index, dtype=object)
    clash = keys[keys.duplicated(keep=False)]  # only these are looked at one by one
    seen, out = {}, []
    for i, key in clash.items():
        j = seen.setdefault(key, i)
        if j == i:
            continue
        value, other = firsts.at[i], firsts.at[j]
        mixed = _scripts(value) != _scripts(other)
        if other_script_only and not mixed:
            continue
        out.append((int(i), int(j), "characters from another script" if mixed else "look-alike characters"))
    return out


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


#: Bounds on what a workbook may make covreport read (stated in RELIABILITY.md).
#: Largest workbook file: its parts unpack to far more than a CSV of the same size.
MAX_WORKBOOK_BYTES = 64 << 20
#: Largest unpacked size of a worksheet part, and of any other part (the shared
#: string table, styles ...), read from the zip directory before anything is unpacked.
MAX_SHEET_PART_BYTES = 128 << 20
MAX_OTHER_PART_BYTES = 64 << 20
#: Most parts a workbook may hold (Excel writes a few dozen).
MAX_WORKBOOK_PARTS = 10_000
#: Last row and widest filled column read from the first sheet (Excel's last row; 1,024 columns),
#: and most cells (rows x columns) of the table it makes.
MAX_SHEET_ROWS = 1_048_576
MAX_SHEET_COLUMNS = 1_024
MAX_SHEET_CELLS = 5_000_000


def _workbook_fix():
    return "export the first sheet as CSV (UTF-8) and validate that"


def _check_parts(raw, name):
    """Refuse a workbook whose zip directory declares parts too large to unpack, before any is read.

    ``zipfile`` never unpacks more than a part's declared size (a part that
    unpacks to more fails its CRC check), so the declared sizes bound what
    openpyxl can read.
    """
    import posixpath
    import zipfile
    from xml.etree import ElementTree

    from covreport.inputs import limit_text

    if len(raw) > MAX_WORKBOOK_BYTES:
        raise ManifestError(f"{name} is a workbook of {limit_text(len(raw))}, larger than the "
                            f"{limit_text(MAX_WORKBOOK_BYTES)} covreport reads -- {_workbook_fix()}")
    if raw.count(b"PK\x01\x02") > MAX_WORKBOOK_PARTS:
        raise ManifestError(f"{name} holds more than {MAX_WORKBOOK_PARTS:,} parts, not a workbook a spreadsheet "
                            f"program writes -- {_workbook_fix()}")
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        infos = zf.infolist()
        # The shared string table is wherever [Content_Types].xml says, whatever its name.
        strings = {"xl/sharedstrings.xml"}
        types = next((i for i in infos if i.filename == "[Content_Types].xml"), None)
        if types is not None and types.file_size <= (1 << 20):
            try:
                root = ElementTree.fromstring(zf.read(types))
            except ElementTree.ParseError:
                root = None
            for el in root.iter() if root is not None else ():
                if str(el.get("ContentType", "")).endswith("sharedStrings+xml"):
                    strings.add(str(el.get("PartName", "")).lstrip("/").lower())
    for info in infos:
        part = info.filename.lower()
        sheet = (posixpath.dirname(part) == "xl/worksheets" and part.endswith(".xml") and part not in strings)
        cap = MAX_SHEET_PART_BYTES if sheet else MAX_OTHER_PART_BYTES
        if info.file_size > cap:
            what = "its shared string table" if part in strings else f"its part {safe_text(info.filename)}"
            raise ManifestError(
                f"{name}: {what} unpacks to {limit_text(info.file_size)}, more than the {limit_text(cap)} covreport "
                f"reads from a workbook part -- {_workbook_fix()} (a text of that size is no manifest cell)")


def _sheet_cells(ws, name):
    """Every cell of a read-only sheet as ``{row: {column: value}}``, read from the sheet itself.

    openpyxl's own row iteration trusts the sheet's ``<dimension>`` (which
    some writers record wrongly), pads every row to the widest one, and
    drops rows and cells that come out of order; the sheet parser yields
    exactly the cells the file holds, so every one is read, and empty space
    costs nothing however far a stray cell lies.
    """
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet._reader import WorkSheetParser

    wb = ws.parent
    rows, filled = {}, 0
    with ws._get_source() as src:
        parser = WorkSheetParser(src, ws._shared_strings, data_only=wb.data_only, epoch=wb.epoch,
                                 date_formats=wb._date_formats, timedelta_formats=wb._timedelta_formats)
        for number, cells in parser.parse():
            for cell in cells:
                value = cell["value"]
                if value is None or isinstance(value, str) and not value.strip(BLANK):
                    continue
                row, col = int(cell["row"]), int(cell["column"])
                where = f"{get_column_letter(col) if 0 < col <= 18278 else col}{row}"
                if row > MAX_SHEET_ROWS:
                    raise ManifestError(f"{name}: cell {where} lies below row {MAX_SHEET_ROWS:,}, the last row of a "
                                        f"sheet -- delete it, or {_workbook_fix()}")
                if col > MAX_SHEET_COLUMNS:
                    raise ManifestError(f"{name}: cell {where} lies right of column {MAX_SHEET_COLUMNS:,}, the widest "
                                        f"a manifest sheet may be -- delete that stray cell (or {_workbook_fix()})")
                line = rows.setdefault(row, {})
                if col in line:
                    raise ManifestError(f"{name}: cell {where} is written twice in the sheet -- open the workbook in a "
                                        f"spreadsheet program and save it again, or {_workbook_fix()}")
                line[col] = value
                filled += 1
                if filled > MAX_SHEET_CELLS:
                    raise ManifestError(f"{name}: the first sheet holds more than {MAX_SHEET_CELLS:,} filled cells, "
                                        f"more than covreport reads from a workbook -- {_workbook_fix()}")
    return rows


def read_workbook(raw, name, warnings):
    """First sheet of an .xlsx workbook -> a :class:`Grid` of text cells, one record per sheet row.

    Every cell the sheet holds is read, whatever its ``<dimension>`` says;
    what is read is bounded before and while reading (:data:`MAX_WORKBOOK_BYTES`,
    :data:`MAX_SHEET_PART_BYTES`, :data:`MAX_OTHER_PART_BYTES`,
    :data:`MAX_SHEET_ROWS`, :data:`MAX_SHEET_COLUMNS`, :data:`MAX_SHEET_CELLS`).
    """
    try:
        import openpyxl
    except ImportError:  # pragma: no cover - openpyxl is a dependency
        raise ManifestError(f"{name} is an Excel workbook and openpyxl is not installed -- export it as CSV (UTF-8)")
    try:
        _check_parts(raw, name)
        wb = openpyxl.load_workbook(io.BytesIO(raw), read_only=True, data_only=True)
        try:
            sheets = wb.sheetnames
            rows = _sheet_cells(wb[sheets[0]], name)
        finally:
            wb.close()
    except ManifestError:
        raise
    except MemoryError:
        raise ManifestError(f"{name}: the workbook does not fit in memory -- {_workbook_fix()}") from None
    except Exception as exc:  # openpyxl and zipfile raise many types on junk
        raise ManifestError(
            f"{name} cannot be read as an Excel workbook ({type(exc).__name__}) -- {_workbook_fix()}"
        ) from None
    if len(sheets) > 1:
        warnings.append(f"{name} has {len(sheets)} sheets; read the first one, '{safe_text(sheets[0])}'")
    numbers = sorted(rows)
    width = max((max(rows[r]) for r in numbers), default=0)
    if len(numbers) * width > MAX_SHEET_CELLS:
        from openpyxl.utils import get_column_letter

        far = next(r for r in numbers if max(rows[r]) == width)
        raise ManifestError(
            f"{name}: the first sheet's {len(numbers):,} rows reach column {get_column_letter(width)} (cell "
            f"{get_column_letter(width)}{far}), {len(numbers) * width:,} cells, more than the {MAX_SHEET_CELLS:,} "
            f"covreport reads from a workbook -- delete stray cells far to the right, or {_workbook_fix()}")
    # A row ends at its last filled cell (a CSV export drops trailing empty cells too).
    records = []
    for r in numbers:
        line = rows[r]
        record = [""] * max(line)
        for col, value in line.items():
            record[col - 1] = cell_text(value)
        records.append(record)
    return grid_from_records(records, np.asarray(numbers, dtype=np.int64))
