"""Small output helpers shared by every module that writes files.

Every file covreport writes goes through here: it is written to a temporary
file in the destination folder, flushed to disk and moved into place with
:func:`os.replace`, so a reader (or a crash) sees either the old file or the
whole new one, never a partial file. CSV text cells are neutralised against
spreadsheet formula injection.
"""

import contextlib
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


@contextlib.contextmanager
def atomic_write(path, *, mode="wb", encoding=None, error_class=CovreportError):
    """Open a temporary file beside ``path``; on success move it into place whole.

    The one atomic file writer of covreport: the file is written in the
    destination folder (``.NAME.*.tmp``), flushed and fsynced, given the
    usual mode (0666 less the umask) and moved over ``path`` with
    :func:`os.replace`, so a reader (or a crash) sees the old file or the
    whole new one. On any exception the temporary file is removed; an
    ``OSError`` becomes ``error_class`` naming the file.

    Examples
    --------
    >>> with atomic_write("model.pt", error_class=ModelError) as fh:  # doctest: +SKIP
    ...     torch.save(payload, fh)
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
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


def atomic_write_bytes(path, data, *, error_class=CovreportError):
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Parameters
    ----------
    path : str or path-like
    data : bytes
    error_class : type
        The :class:`~covreport.errors.CovreportError` subclass raised when
        the file cannot be written (read-only or full folder, ...).
    """
    with atomic_write(path, error_class=error_class) as fh:
        fh.write(data)
    return Path(path)


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


# --------------------------------------------------------------------------
# Output folders: marked, checked, staged beside the destination, swapped whole
# --------------------------------------------------------------------------

#: Name of the small file covreport writes into every output folder it makes.
#: ``--force`` replaces a folder only when it carries this file.
OUTPUT_MARKER = ".covreport-output"
_SHOW_ENTRIES = 5


def _marker_text():
    from covreport import __version__

    return (f"This folder was written by covreport {__version__}.\n"
            "`covreport run --force` may delete and replace it; it replaces no folder without this file.\n")


_FILES_HEADER = "Files written:"


def record_written_files(folder):
    """List every file of a finished output folder in its marker, so that ``--force`` can tell
    files covreport wrote from files a user added later (:func:`foreign_files`)."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != OUTPUT_MARKER)
    text = _marker_text() + _FILES_HEADER + "\n" + "".join(f"{n}\n" for n in names)
    (folder / OUTPUT_MARKER).write_text(text, encoding="utf-8")


def foreign_files(folder):
    """Files of a covreport output folder that its marker does not list (added by someone else).

    A marker without a file list (older covreport) lists nothing, so nothing is foreign.
    """
    folder = Path(folder)
    try:
        text = (folder / OUTPUT_MARKER).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if _FILES_HEADER not in text:
        return []
    listed = set(text.split(_FILES_HEADER, 1)[1].splitlines())
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != OUTPUT_MARKER
                  and p.relative_to(folder).as_posix() not in listed)


def is_covreport_output(folder):
    """True when ``folder`` is a folder holding covreport's output marker file."""
    folder = Path(folder)
    return folder.is_dir() and (folder / OUTPUT_MARKER).is_file()


def _show_entries(folder):
    try:
        names = sorted(p.name for p in Path(folder).iterdir())
    except OSError as exc:
        return f"(cannot list it: {exc.strerror})"
    shown = ", ".join(names[:_SHOW_ENTRIES])
    more = f" and {len(names) - _SHOW_ENTRIES} more" if len(names) > _SHOW_ENTRIES else ""
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}{more}" if names else "nothing"


def resolve_out_dir(out, *, error_class=CovreportError):
    """The folder an ``--out`` path really names: a symbolic link is followed.

    A link's target is written (the link is kept); a dangling link is an error.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise error_class(f"{out} is a symbolic link to {os.readlink(out)}, which does not exist; "
                          "create the target folder or choose another --out")
    target = Path(os.path.realpath(out))
    if not target.name:
        raise error_class(f"{out} is the root of the file system; choose a new folder as --out")
    return target


def _inside(child, parent):
    """True when path ``child`` equals ``parent`` or lies below it (both absolute, resolved)."""
    try:
        Path(child).relative_to(parent)
        return True
    except ValueError:
        return False


def check_out_dir(out, *, inputs=(), force=False, error_class=CovreportError):
    """Refuse an output folder whose replacement could destroy anything of the user's.

    Parameters
    ----------
    out : path
        The ``--out`` folder as given (a symbolic link is followed).
    inputs : iterable of path
        Every input of the run (manifest, images, scores, weights, cache,
        CSVs, study file, templates); ``out`` may neither equal nor hold any.
    force : bool
        ``--force``: an existing folder may be replaced, but only one that
        carries covreport's marker file (:data:`OUTPUT_MARKER`) or is empty.

    Returns
    -------
    pathlib.Path
        The resolved destination folder.
    """
    target = resolve_out_dir(out, error_class=error_class)
    cwd = Path(os.path.realpath(os.getcwd()))
    if _inside(cwd, target):
        raise error_class(f"--out {out} is the current folder or holds it; covreport replaces its output "
                          "folder whole: give a new folder, e.g. --out covreport-out")
    for item in inputs:
        if item is None or str(item).startswith("xrv:"):
            continue
        real = Path(os.path.realpath(item))
        if _inside(real, target):
            raise error_class(f"--out {out} holds the input {item}; covreport replaces its output folder "
                              "whole and never deletes an input: choose a separate --out folder")
    if os.path.lexists(target):
        if not target.is_dir():
            raise error_class(f"{out} exists and is not a folder; choose another --out")
        foreign = not is_covreport_output(target) and any(target.iterdir())
        if not force and not foreign:
            raise error_class(f"{out} exists; choose another --out or add --force to replace it")
        if foreign:
            raise error_class(
                f"{out} was not written by covreport (it has no {OUTPUT_MARKER} file), so --force will not "
                f"replace it; it holds {_show_entries(target)}. If it is the output of an older covreport, "
                f"delete it yourself (e.g. rm -r {out}); otherwise choose another --out")
        added = foreign_files(target) if is_covreport_output(target) else []
        if added:
            shown = ", ".join(added[:_SHOW_ENTRIES]) + (f" and {len(added) - _SHOW_ENTRIES} more"
                                                        if len(added) > _SHOW_ENTRIES else "")
            raise error_class(f"{out} holds {len(added)} file(s) covreport did not write ({shown}); --force "
                              "would delete them: move them out of it, or choose another --out")
    return target


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<tmp>\d+)-.*|old-(?P<old>\d+))")


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (someone else's) or cannot tell: leave it alone
    return True


def remove_leftovers(target, kinds=("tmp", "old")):
    """Remove ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` folders of dead covreport processes beside ``target``.

    Only folders carrying covreport's marker file and whose process is gone
    (``kill -9``, power cut) are removed; ``kinds`` says which of the two
    (``"tmp"``, ``"old"``). Returns the paths removed.
    """
    import shutil

    target = Path(target)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.fullmatch(entry.name)
        if not m or m["name"] != target.name or entry.is_symlink() or not is_covreport_output(entry):
            continue
        if ("tmp" if m["tmp"] else "old") not in kinds:
            continue
        if _pid_alive(int(m["tmp"] or m["old"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def make_staging_dir(target, *, error_class=CovreportError):
    """A new marked temporary folder ``.NAME.tmp-PID-*`` beside ``target`` (same file system)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise error_class(f"cannot write to {target.parent}: {exc.strerror}; choose another --out") from None
    try:
        (tmp / OUTPUT_MARKER).write_text(_marker_text(), encoding="utf-8")
    except OSError as exc:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise error_class(f"cannot write to {target.parent}: {exc.strerror}; choose another --out") from None
    return tmp


def swap_dir(tmp, target, *, force=False, replace_any=False, error_class=CovreportError):
    """Move the finished folder ``tmp`` to ``target``: the one folder swap of covreport.

    ``target`` is the resolved destination (see :func:`check_out_dir`); an
    existing one is replaced only with ``force`` and only when it carries
    covreport's marker (or is empty): it is moved aside to
    ``.NAME.old-PID``, ``tmp`` is moved in, and the old folder is deleted.
    A reader (or a crash) sees the old folder or the whole new one.
    ``replace_any`` drops the marker requirement, for a caller that asked
    its user explicitly (:func:`covreport.phantom.make_study`'s ``overwrite``).
    """
    import shutil

    tmp, target = Path(tmp), Path(target)
    if os.path.lexists(target):
        if not force:
            raise error_class(f"{target} exists; choose another --out or add --force to replace it")
        if not target.is_dir() or target.is_symlink() or (
                not replace_any and not is_covreport_output(target) and any(target.iterdir())):
            raise error_class(f"{target} was not written by covreport (no {OUTPUT_MARKER} file); "
                              "--force will not replace it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    os.chmod(target, 0o755)
    return target


class _Terminated(SystemExit):
    """SIGTERM while an output folder is staged (exit status 128 + 15)."""


def _on_sigterm(signum, _frame):
    raise _Terminated(128 + signum)


class staged_dir:
    """Context manager: build an output folder beside ``target``, move it into place whole.

    Removes temporary folders of dead covreport processes first; yields the
    marked temporary folder; on success swaps it in with :func:`swap_dir`
    and then removes previous outputs a dead process had moved aside
    (``.NAME.old-PID``: kept until now, as the only copy of the previous
    output, should this run fail); on any
    exception (SIGINT, and SIGTERM, which is turned into ``SystemExit(143)``
    while the folder is staged) deletes it.
    """

    def __init__(self, target, *, force=False, error_class=CovreportError, swap=None):
        self.target = Path(target)
        self.force = force
        self.error_class = error_class
        self.swap = swap or swap_dir
        self._old_handler = None

    def __enter__(self):
        import signal
        import threading

        remove_leftovers(self.target, kinds=("tmp",))
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        self.tmp = make_staging_dir(self.target, error_class=self.error_class)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import shutil
        import signal

        try:
            if exc_type is None:
                try:
                    record_written_files(self.tmp)
                    self.swap(self.tmp, self.target, force=self.force)
                except OSError as err:
                    raise self.error_class(f"cannot write the outputs to {self.target}: {err}") from None
                remove_leftovers(self.target, kinds=("old",))
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)
        return False


def _file_id(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_out_file(out, *, inputs=(), force=False, also=(), error_class=CovreportError):
    """Refuse an output file that would overwrite an input or an existing file without ``force``.

    Parameters
    ----------
    out : path
        The file to write.
    inputs : iterable of path
        Files the command reads; ``out`` (and ``also``) may be none of them,
        even with ``force`` (compared by device and inode, so links and other
        spellings of the same file are caught).
    force : bool
        Allow replacing an existing file that is not an input.
    also : iterable of path
        Files written beside ``out`` (e.g. a provenance sidecar), checked the same way.
    """
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise error_class(f"cannot write {out}: the folder {folder} does not exist; create it first "
                          "or choose another --out")
    if out.is_dir():
        raise error_class(f"{out} is a folder; give a file name for --out")
    ids = {}
    for item in inputs:
        if item is None or str(item).startswith("xrv:"):
            continue
        fid = _file_id(item)
        if fid is not None:
            ids.setdefault(fid, item)
    for path in (out, *map(Path, also)):
        if not os.path.lexists(path):
            continue
        fid = _file_id(path)
        if fid in ids:
            raise error_class(f"--out {out} would overwrite the input {ids[fid]}; covreport never "
                              "overwrites an input: choose another --out")
        if not force:
            raise error_class(f"{path} exists; choose another --out or add --force to replace it")
    return out
