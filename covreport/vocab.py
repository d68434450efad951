"""Shared vocabulary of covreport's input tables: codes and patterns read the same everywhere.

:mod:`covreport.manifest` (pair manifests) and :mod:`covreport.pairs`
(image exports) read the same kinds of cells; their accepted spellings live
here so both agree.
"""

import re

#: Invisible characters that change how text around them is displayed:
#: Unicode bidirectional embeddings, overrides and isolates (U+202A-U+202E,
#: U+2066-U+2069), the direction marks (U+200E, U+200F, U+061C), and the
#: zero-width characters (U+200B-U+200D, U+2060, U+FEFF). In an id they can
#: make one id display as another ("Trojan Source", CVE-2021-42574). They are
#: a subset of what covreport refuses: manifests and exports refuse every
#: format (Cf) and default-ignorable code point in id and path columns
#: (:func:`covreport.inputs.identifier_problem`) and the same but tabs in the
#: other columns (:func:`covreport.inputs.text_problem`), through
#: :func:`covreport.tabular.invisible_cells`.
INVISIBLE_CONTROLS = "\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\u200b-\u200d\u2060\ufeff"
INVISIBLE_CONTROLS_RE = re.compile(f"[{INVISIBLE_CONTROLS}]")


def has_invisible_controls(text):
    """True when ``text`` holds a character covreport refuses in free text (bidi, Cf, controls ...).

    See :func:`covreport.inputs.text_problem`; :data:`INVISIBLE_CONTROLS` is a subset.
    """
    from covreport.inputs import text_problem

    return isinstance(text, str) and text_problem(text) is not None


def canon(name):
    """A column name reduced for forgiving comparison: case, spaces, ``_ - .`` ignored."""
    return re.sub(r"[\s_\-.]+", "", str(name).lower())


# --------------------------------------------------------------------------
# Sex

#: Accepted sex codes (any case) -> the code covreport writes.
SEX_CODES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}


def normalise_sex(value):
    """``'m'``, ``'Male'``, ... -> ``'M'`` / ``'F'``; anything else (blank included) -> None."""
    return SEX_CODES.get(str(value).strip().upper()) if isinstance(value, str) else None


# --------------------------------------------------------------------------
# Views (constants.VIEWS: AP, AP Supine, PA, Lateral)

#: Spellings a manifest may use (case, spaces, ``_`` and ``-`` ignored).
VIEW_CODES = {
    "AP": "AP", "AP SUPINE": "AP Supine", "SUPINE AP": "AP Supine",
    "PA": "PA", "LATERAL": "Lateral", "LAT": "Lateral", "L": "Lateral",
}
#: Spellings found in hospital and public exports (``covreport pairs``): the
#: manifest's, plus erect/upright APs and abbreviations.
EXPORT_VIEW_CODES = {
    **VIEW_CODES,
    "AP ERECT": "AP", "AP UPRIGHT": "AP", "AP SEMI ERECT": "AP", "ERECT AP": "AP",
    "APS": "AP Supine", "AP SUP": "AP Supine", "PA ERECT": "PA", "LL": "Lateral",
}


def view_key(value):
    """The look-up key of a view spelling: upper case, runs of spaces, ``_`` and ``-`` as one space."""
    return re.sub(r"[\s_\-]+", " ", str(value).strip().upper())


# --------------------------------------------------------------------------
# Dates

#: ISO 8601 date, optionally with a time and a zone (RE2-compatible, so
#: pandas/pyarrow can run it vectorised): 2020-03-14, 20200314,
#: 2020-03-14T10:30:00Z, 2020-03-14 10:30+01:00.
ISO_DATE = (r"^\d{4}-?\d{2}-?\d{2}(?:[T ]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?"
            r"(?:Z|[+-]\d{2}(?::?\d{2})?)?)?$")
#: Dates accepted (data_manifests/README.md), inclusive.
DATE_RANGE = ("1900-01-01", "2199-12-31")


def iso_dates(texts):
    """Stripped text cells -> naive UTC Timestamps (NaT where blank, not ISO 8601 or out of :data:`DATE_RANGE`).

    Parameters
    ----------
    texts : pandas.Series of str
    """
    import pandas as pd

    iso = texts.str.match(ISO_DATE)
    values = pd.to_datetime(texts.where(iso, ""), format="ISO8601", errors="coerce", utc=True)
    low = pd.Timestamp(DATE_RANGE[0], tz="UTC")
    high = pd.Timestamp(DATE_RANGE[1], tz="UTC") + pd.Timedelta(days=1) - pd.Timedelta(seconds=1)
    values = values.where((values >= low) & (values <= high))
    return values.dt.tz_convert(None).astype("datetime64[ns]")
