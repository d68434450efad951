"""Stage messages and progress bars, on stderr, through one helper.

Long steps say what they are doing as they start ("Scoring 200 images (180
from the cache)") and how long they took when they end; loops over many
items (images, permutations, bootstrap resamples) show a tqdm bar. Nothing
here writes to stdout, which carries only results. ``covreport --quiet``
(or :func:`set_quiet` from a library caller) silences all of it.

Examples
--------
>>> from covreport import progress
>>> progress.set_quiet(True)
>>> with progress.stage("Counting"):
...     total = sum(progress.bar(range(3), desc="counting"))
>>> total
3
"""

from __future__ import annotations

import contextlib
import sys
import time

_state = {"quiet": False}


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) every stage message and progress bar."""
    _state["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def say(message: str) -> None:
    """One line on stderr, unless quiet."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(message: str):
    """Announce a step as it starts and give its time when it ends.

    ``with stage("Writing PDF"):`` prints ``Writing PDF ...`` then
    ``Writing PDF: done in 3.2 s``. An exception passes through unannounced.
    """
    say(f"{message} ...")
    start = time.perf_counter()
    yield
    say(f"{message}: done in {time.perf_counter() - start:.1f} s")


def bar(iterable=None, *, total=None, desc=None, unit="it"):
    """A tqdm progress bar on stderr (disabled when quiet or for fewer than 2 items)."""
    from tqdm import tqdm

    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    disable = _state["quiet"] or (n is not None and n < 2)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                disable=disable, mininterval=0.5)
