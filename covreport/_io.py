"""Small output helpers shared by every module that writes files.

Every file covreport writes goes through here: it is written to a temporary
file in the destination folder, flushed to disk and moved into place with
:func:`os.replace`, so a reader (or a crash) sees either the old file or the
whole new one, never a partial file. CSV text cells are neutralised against
spreadsheet formula injection.
"""

import hashlib
import os
import re
import tempfile
from pathlib import Path

from covreport.errors import CovreportError

#: First characters that make a spreadsheet treat a cell as a formula (OWASP
#: "CSV injection": = + - @, and tab / carriage return).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _write_error(path, exc, error_class):
    reason = exc.strerror or str(exc) or type(exc).__name__
    return error_class(
        f"cannot write {path}: {reason} (check that the folder exists, is writable "
        f"and has free space)"
    )


def atomic_write_bytes(path, data, *, error_class=CovreportError):
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``).

    Parameters
    ----------
    path : str or path-like
    data : bytes
    error_class : type
        The :class:`~covreport.errors.CovreportError` subclass raised when
        the file cannot be written (read-only or full folder, ...).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _write_error(path, exc, error_class) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def atomic_write_text(path, text, *, encoding="utf-8", error_class=CovreportError):
    """Write ``text`` to ``path`` atomically; newlines are written as given."""
    return atomic_write_bytes(path, text.encode(encoding), error_class=error_class)


def _needs_quote(value):
    body = value.lstrip("'")
    if not body.startswith(FORMULA_PREFIXES):
        return False
    # "'=x" (already quoted-looking) is quoted again so unescaping is exact.
    return value != body or not _PLAIN_NUMBER.fullmatch(value)


def safe_csv_cell(value):
    """Neutralise a text cell that a spreadsheet would run as a formula.

    A string starting with ``= + - @``, tab or carriage return gets a leading
    apostrophe (``'=HYPERLINK(...)``), the OWASP recommendation for CSV
    injection. Plain numbers written as text (``-1.5``, ``+3``) are left
    alone, as are non-strings. Strings that already look escaped (``'=x``)
    get one more apostrophe, so :func:`unescape_csv_cell` inverts this exactly.
    """
    if isinstance(value, str) and _needs_quote(value):
        return "'" + value
    return value


def unescape_csv_cell(value):
    """Inverse of :func:`safe_csv_cell` (for reading covreport's own CSVs back)."""
    if isinstance(value, str) and value.startswith("'") and _needs_quote(value[1:]):
        return value[1:]
    return value


def neutralise_formulas(df):
    """A copy of ``df`` with :func:`safe_csv_cell` applied to text cells and column names."""
    import pandas as pd

    out = df.copy()
    for col in out.columns:
        s = out[col]
        if pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s) \
                or isinstance(s.dtype, pd.CategoricalDtype):
            out[col] = s.astype(object).map(safe_csv_cell)
    out.columns = [safe_csv_cell(c) if isinstance(c, str) else c for c in out.columns]
    return out


def write_csv_atomic(df, path, *, index=False, error_class=CovreportError, **to_csv_kwargs):
    """Write a DataFrame as UTF-8 CSV atomically, with formulas neutralised.

    Floats are written with full round-trip precision (pandas' default
    shortest representation of each value's own dtype).
    """
    text = neutralise_formulas(df).to_csv(index=index, lineterminator="\n", **to_csv_kwargs)
    return atomic_write_text(path, text, error_class=error_class)


#: Short alias used by the pipeline.
write_csv = write_csv_atomic


def sha256_file(path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
