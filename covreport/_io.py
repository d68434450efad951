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
from covreport.inputs import safe_text

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


def sha256_file(path, chunk=1 << 20, *, what=None, error_class=CovreportError):
    """Hex SHA-256 of a file's bytes, read in chunks.

    ``path`` may be an open binary file (hashed from its current position).
    With ``what`` (a kind of :data:`covreport.inputs.LIMITS`) the file is
    opened through :func:`covreport.inputs.open_binary`: a regular file no
    larger than that kind's limit, else ``error_class``.
    """
    digest = hashlib.sha256()
    if hasattr(path, "read"):
        for block in iter(lambda: path.read(chunk), b""):
            digest.update(block)
        return digest.hexdigest()
    if what is not None:
        from covreport.inputs import open_binary

        opened = open_binary(path, what, error_class=error_class)
    else:
        opened = open(path, "rb")
    with opened as fh:
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


#: Largest marker file read (a marker is a few KB; a forged one may be anything).
_MARKER_LIMIT = 16 << 20


def written_files(folder):
    """The files covreport's marker in ``folder`` says it wrote, or ``None`` when it cannot tell.

    ``None`` (nothing may be deleted as covreport's) when the marker is
    missing, a symbolic link or not a regular file, too large, not covreport's
    text, has no file list (an older covreport, or one line anyone can type),
    or lists a name that is absolute or climbs with ``..``.
    """
    import stat

    marker = Path(folder) / OUTPUT_MARKER
    try:
        st = os.lstat(marker)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MARKER_LIMIT:
            return None
        fd = os.open(marker, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(_MARKER_LIMIT + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("This folder was written by covreport") or _FILES_HEADER not in lines:
        return None
    names = set(lines[lines.index(_FILES_HEADER) + 1:])
    names.discard("")
    for name in names:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            return None
    return names


def foreign_files(folder):
    """Entries of an output folder that covreport did not write (relative posix paths, sorted).

    Everything its marker does not list is foreign: files, links, other
    entries, and folders that hold no listed file. A marker without a file
    list (older covreport, or a forged one) makes every entry foreign.
    """
    folder = Path(folder)
    listed = written_files(folder)
    if listed is None:
        listed = set()
    implied = {"/".join(n.split("/")[:i]) for n in listed for i in range(1, n.count("/") + 1)}
    foreign = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder).as_posix()
        for name in dirs + files:
            path = name if rel == "." else f"{rel}/{name}"
            if path == OUTPUT_MARKER:
                continue
            full = Path(root) / name
            if name in dirs and not full.is_symlink():
                if path not in implied:
                    foreign.append(path)
                    dirs.remove(name)  # its content is foreign with it
            elif path not in listed or not full.is_file() or full.is_symlink():
                foreign.append(path)
    return sorted(foreign)


def remove_written(folder):
    """Delete what covreport wrote in ``folder`` (the files its marker lists), never anything else.

    The marker and the folders left empty go too; a folder that still holds
    anything not on the list is kept. Returns the foreign entries left
    (empty when the whole folder is gone).
    """
    folder = Path(folder)
    listed = written_files(folder) or set()
    for name in listed:
        path = folder / name
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink()
        except OSError:
            pass
    for root, dirs, _files in os.walk(folder, topdown=False):
        for name in dirs:
            try:
                (Path(root) / name).rmdir()  # only when empty
            except OSError:
                pass
    left = foreign_files(folder)
    if not left:
        with contextlib.suppress(OSError):
            (folder / OUTPUT_MARKER).unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()
    return left


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


def _foreign_message(target, out):
    """Why ``--force`` will not replace ``target`` (``None`` when it may)."""
    added = foreign_files(target)
    if not added:
        return None
    shown = ", ".join(safe_text(a) for a in added[:_SHOW_ENTRIES]) + (
        f" and {len(added) - _SHOW_ENTRIES} more" if len(added) > _SHOW_ENTRIES else "")
    if written_files(target) is None:
        return (f"{out} has a {OUTPUT_MARKER} file that lists no files covreport wrote (an older covreport's, "
                f"or not covreport's), so all {len(added)} entr{'y' if len(added) == 1 else 'ies'} in it "
                f"({shown}) count as yours and --force will not delete them: delete the folder yourself "
                f"(e.g. rm -r {out}) if it is an old output, or choose another --out")
    return (f"{out} holds {len(added)} file(s) covreport did not write ({shown}); --force "
            "would delete them: move them out of it, or choose another --out")


def _refuse_foreign(target, out, error_class):
    message = _foreign_message(target, out)
    if message:
        raise error_class(message)


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
        _refuse_foreign(target, out, error_class)
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
        if m["old"]:
            if not remove_written(entry):  # a previous output: only what its marker lists
                removed.append(entry)
            continue
        shutil.rmtree(entry, ignore_errors=True)  # a dead run's own staging folder
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
        if replace_any:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _swap_checked(tmp, target, error_class)
    else:
        os.replace(tmp, target)
    os.chmod(target, 0o755)
    return target


def _keep_new(tmp, target):
    """Move the finished new outputs to a visible ``NAME.new-PID`` beside ``target``; return its path."""
    kept = target.with_name(f"{target.name}.new-{os.getpid()}")
    os.replace(tmp, kept)
    return kept


def _swap_checked(tmp, target, error_class):
    """Replace the marked output ``target`` by ``tmp``, checking for foreign files at the moment of the swap.

    A file a user added while the run was writing makes the swap stop: the
    old folder stays where it was, the new outputs are kept beside it, and
    the error says where. The old folder is then moved aside and checked
    again (a file may arrive between the check and the move); it is deleted
    only through :func:`remove_written`, which removes nothing it does not list.
    """
    message = _foreign_message(target, target)
    if message:
        kept = _keep_new(tmp, target)
        raise error_class(f"{message}. Nothing was replaced: the new outputs are in {kept}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    if foreign_files(old):
        os.replace(old, target)  # put it back as it was
        kept = _keep_new(tmp, target)
        raise error_class(f"{_foreign_message(target, target)}. Nothing was replaced: the new outputs are "
                          f"in {kept}")
    os.replace(tmp, target)
    left = remove_written(old)
    if left:
        kept = old.with_name(f"{target.name}.previous-{os.getpid()}")
        os.replace(old, kept)
        raise error_class(f"the new outputs are in {target}, but files covreport did not write appeared in the "
                          f"previous output while it was replaced ({', '.join(map(safe_text, left[:5]))}); "
                          f"they were not deleted: they are in {kept}")


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
