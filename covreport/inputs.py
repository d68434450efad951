"""The untrusted-input boundary: every file covreport reads from a user passes through here.

Manifests, scores files, study files, templates, checkpoints, images,
``--previous`` results and the folders given to ``verify`` come from other
people. This module holds the checks they all share, so that there is one
place to audit:

- :func:`regular_file` / :func:`read_bytes` / :func:`open_binary`: the path
  names a regular file (not a FIFO, a device such as ``/dev/zero``, a socket
  or a folder) no larger than a stated limit, checked on the opened file
  descriptor before a byte is read;
- :func:`safe_text`: any value echoed from an input into a message has its
  control characters (C0, C1, DEL, ESC/OSC sequences) and bidirectional and
  other invisible format characters escaped, so it cannot act on a terminal;
- :func:`identifier_problem` and :func:`skeleton`: identifiers may hold no
  format (Cf) or default-ignorable code point, and two identifiers whose
  Unicode TR39 confusable skeletons are equal are reported as one id written
  two ways.

Nothing here writes a file or runs what an input carries.
"""

import os
import stat
import unicodedata
from functools import lru_cache
from pathlib import Path

from covreport.errors import CovreportError

MiB = 1 << 20
GiB = 1 << 30

#: Largest file accepted, by kind of input (bytes). Stated in RELIABILITY.md.
LIMITS = {
    "manifest": 256 * MiB,
    "pairs export": 256 * MiB,
    "scores file": 4 * GiB,
    "study file": 1 * MiB,
    "template": 1 * MiB,
    "results": 256 * MiB,
    "checkpoint": 1 * GiB,
    "image": 512 * MiB,
    "submitted file": 256 * MiB,
}


def limit_text(n):
    """``n`` bytes in words: ``256 MiB``."""
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB" if n >= MiB else f"{n:,} bytes"


def _kind(mode):
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def _open_fd(path, what, limit, error_class):
    """An O_RDONLY|O_NONBLOCK descriptor of ``path`` after its fstat says: regular file, size <= limit."""
    name = safe_text(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error_class(f"{name} does not exist -- check the path to the {what}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise error_class(f"{name} cannot be read ({reason}) -- check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise error_class(f"{name} is {_kind(st.st_mode)}, not a regular file -- give the path of the "
                          f"{_file_word(what)} itself")
    try:
        # O_NONBLOCK: a path swapped for a FIFO after the stat cannot block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error_class(f"{name} cannot be read ({exc.strerror}) -- check the path and its "
                          "permissions") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error_class(f"{name} is {_kind(st.st_mode)}, not a regular file -- give the path of the "
                          f"{_file_word(what)} itself")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise error_class(f"{name} is {limit_text(st.st_size)}, larger than the {limit_text(limit)} a "
                          f"{what} may be -- check that it is the right file")
    return fd


def _file_word(what):
    return what if what.endswith("file") else f"{what} file"


def limit_of(what):
    return LIMITS.get(what, LIMITS["submitted file"])


def regular_file(path, what, *, limit=None, error_class=CovreportError):
    """Check that ``path`` is a regular file of at most ``limit`` bytes; return its size.

    ``limit`` defaults to :data:`LIMITS` for ``what``. Raises ``error_class``
    naming the file, what it is instead, and the fix.
    """
    fd = _open_fd(path, what, limit_of(what) if limit is None else limit, error_class)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def open_binary(path, what, *, limit=None, error_class=CovreportError):
    """A binary file object of a checked regular file (see :func:`regular_file`)."""
    fd = _open_fd(path, what, limit_of(what) if limit is None else limit, error_class)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path, what, *, limit=None, error_class=CovreportError):
    """The whole content of a checked regular file, never more than ``limit`` bytes."""
    limit = limit_of(what) if limit is None else limit
    with open_binary(path, what, limit=limit, error_class=error_class) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(size + 1)
        if len(data) > size:  # grew after the check: read on, within the limit
            data += fh.read(limit + 1 - len(data))
    if len(data) > limit:  # grew after the check
        raise error_class(f"{safe_text(str(path))} grew past the {limit_text(limit)} a {what} may be "
                          "while it was read -- give a finished file")
    return data


def read_text(path, what, *, limit=None, error_class=CovreportError):
    """UTF-8 (optionally with BOM) text of a checked regular file."""
    raw = read_bytes(path, what, limit=limit, error_class=error_class)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error_class(f"{safe_text(str(path))} is not UTF-8 text (byte offset {exc.start}) -- "
                          "re-save it as UTF-8") from None


def head(path, n, what, *, limit=None, error_class=CovreportError):
    """The first ``n`` bytes of a checked regular file (magic bytes, before anything is hashed)."""
    with open_binary(path, what, limit=limit, error_class=error_class) as fh:
        return fh.read(n)


# --------------------------------------------------------------------------
# Text from inputs: safe in a message, and identifiers that cannot deceive
# --------------------------------------------------------------------------

def _unsafe(ch):
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn") or is_default_ignorable(ch)


def safe_text(value, *, limit=500):
    """``value`` as text that cannot act on a terminal or hide itself.

    Control characters (ESC, OSC, BEL, C1), bidirectional controls, other
    format characters and default-ignorable code points are written as
    ``\\xNN`` / ``\\uNNNN`` escapes; very long values are cut with "...".
    """
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable() and not any(_unsafe(c) for c in text):
        return text
    out = []
    for ch in text:
        if ch in "\n\t" or not _unsafe(ch) and ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            cp = ord(ch)
            out.append(f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}")
    return "".join(out)


#: Default_Ignorable_Code_Point ranges (Unicode DerivedCoreProperties.txt, 15.1).
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)


def is_default_ignorable(ch):
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _DEFAULT_IGNORABLE)


def identifier_problem(value):
    """Why ``value`` cannot be an identifier or path cell (``None`` when it can).

    Refused: control characters, the whole Unicode format category (Cf: bidi
    controls, zero-width characters, U+2064, tag characters ...), other
    default-ignorable code points (U+034F, variation selectors ...), private
    use and unassigned code points: each can make two ids that look the same
    differ, or hide text.
    """
    for i, ch in enumerate(str(value)):
        cat = unicodedata.category(ch)
        if cat == "Cc" or cat == "Cf" or is_default_ignorable(ch) or cat in ("Co", "Cs", "Cn", "Zl", "Zp"):
            name = unicodedata.name(ch, "unnamed")
            return (f"holds the invisible or control character U+{ord(ch):04X} ({name}) at position {i + 1}; "
                    "delete it (retype the value)")
    return None


@lru_cache(maxsize=1)
def _prototypes():
    """Character -> prototype of its confusable class (TR39 data, from ``confusable_homoglyphs``).

    The prototype of a class is its smallest code point, so Latin letters
    stand for their Cyrillic and Greek look-alikes.
    """
    import json

    import confusable_homoglyphs

    data = json.loads(Path(confusable_homoglyphs.__file__).with_name("confusables.json").read_text("utf-8"))
    proto = {}
    for ch, alikes in data.items():
        group = [ch] + [a["c"] for a in alikes]
        single = [c for c in group if len(c) == 1]
        if single:
            proto[ch] = min(single, key=ord)
    return proto


def skeleton(value):
    """The confusable skeleton of ``value`` (after Unicode TR39 section 4): NFD, each character
    replaced by the prototype of its confusable class, NFD again.

    Two identifiers with equal skeletons look alike to a reader (Latin ``A``
    and Cyrillic ``А``, ``0`` and ``O`` ...).
    """
    proto = _prototypes()
    text = unicodedata.normalize("NFD", str(value))
    text = "".join(proto.get(c, c) for c in text)
    return unicodedata.normalize("NFD", text)


def confusable_pairs(values):
    """Pairs ``(a, b)`` of distinct values among ``values`` with equal skeletons (first seen first)."""
    seen = {}
    pairs = []
    for v in values:
        s = skeleton(v)
        first = seen.setdefault(s, v)
        if first != v and (first, v) not in pairs:
            pairs.append((first, v))
    return pairs


def text_problem(value):
    """Why ``value`` cannot be free text from an input (``None`` when it can).

    Like :func:`identifier_problem`, but for prose (study fields, notes,
    strings of a results file): line breaks and tabs are allowed, and so are
    variation selectors (emoji) and private-use or unassigned code points;
    control characters, bidirectional and other format (Cf) characters and
    the other default-ignorable code points are refused.
    """
    text = str(value)
    if text.isascii() and text.isprintable():
        return None
    for i, ch in enumerate(text):
        if ch in "\n\r\t":
            continue
        cp = ord(ch)
        if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Zl", "Zp") or is_default_ignorable(ch):
            name = unicodedata.name(ch, "unnamed")
            return (f"holds the invisible or control character U+{cp:04X} ({name}) at position {i + 1}; "
                    "delete it (retype the text)")
    return None
