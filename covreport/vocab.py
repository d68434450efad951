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
#: make one id display as another ("Trojan Source", CVE-2021-42574), so
#: covreport refuses them in every manifest column it reads.
INVISIBLE_CONTROLS = "\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\u200b-\u200d\u2060\ufeff"
INVISIBLE_CONTROLS_RE = re.compile(f"[{INVISIBLE_CONTROLS}]")


def has_invisible_controls(text):
    """True when ``text`` holds a character of :data:`INVISIBLE_CONTROLS`."""
    return isinstance(text, str) and INVISIBLE_CONTROLS_RE.search(text) is not None
