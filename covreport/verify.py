"""``covreport verify``: re-derive every number of a submitted results folder.

A reviewer holding a submitted folder (``results.json``, ``report.html``,
``tables/``) and the study's inputs checks that

1. each input is the file the run read (its SHA-256 against
   ``provenance.inputs``);
2. rerunning the analysis with the options the run recorded
   (``provenance.options``) regenerates every number of ``results.json``;
3. ``tables/*.csv`` and the text of ``report.html`` carry the values of the
   submitted ``results.json`` (a hand-edited table or report is caught).

Numbers are equal when their relative difference is below ``RTOL`` (1e-9), or
their absolute difference below ``ATOL`` (1e-12) near zero; every other value
(text, counts, flags) must be identical.

What is compared: everything outside ``provenance``; of ``provenance``, the
inputs' SHA-256, ``options``, ``weights_sha256``, ``preprocessing`` and
``model``. Not compared (they describe the run, not the study): ``created``,
``command``, ``scoring`` (images computed or taken from the cache), the
package versions, and the input and model paths (an input is identified by
its hash).
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from covreport.errors import CovreportError

RTOL = 1e-9
ATOL = 1e-12
TOLERANCE_TEXT = f"numbers equal within a relative difference of {RTOL:g} (absolute {ATOL:g} near zero)"

#: provenance keys whose values must be regenerated; the rest describe the run.
PROVENANCE_COMPARED = ("options", "weights_sha256", "preprocessing", "model")
#: roles of provenance.inputs that are RunOptions fields of the same name.
ROLES = ("manifest", "scores", "weights", "validation_csv", "validation_scores", "reference_csv", "study")


class VerifyError(CovreportError):
    """The submitted folder cannot be verified (missing or changed inputs, unreadable results)."""


@dataclass
class Verification:
    """What :func:`verify` found.

    ``differences`` lists ``{"path", "submitted", "regenerated"}`` for
    results.json, ``report_differences`` the same for the report files
    (``path`` then names the file and the place in it).
    """

    numbers_compared: int
    differences: list = field(default_factory=list)
    report_differences: list = field(default_factory=list)
    report_checked: list = field(default_factory=list)
    report_not_checked: list = field(default_factory=list)
    hash_mismatches: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    tolerance: str = TOLERANCE_TEXT

    @property
    def ok(self):
        return not (self.differences or self.report_differences or self.hash_mismatches)

    def to_dict(self):
        return {"verified": self.ok, "numbers_compared": self.numbers_compared, "tolerance": self.tolerance,
                "inputs": self.inputs, "hash_mismatches": self.hash_mismatches,
                "differences": self.differences, "report_differences": self.report_differences,
                "report_checked": self.report_checked, "report_not_checked": self.report_not_checked}


def verify(folder, inputs=None, *, previous=(), templates=None, ignore_hashes=False, use_cache=True):
    """Rerun the analysis of a submitted results folder and compare every number.

    Parameters
    ----------
    folder : path
        The submitted output folder of ``covreport run`` (holding results.json).
    inputs : dict, optional
        Role (``manifest``, ``scores``, ``weights``, ``validation_csv``,
        ``validation_scores``, ``reference_csv``, ``study``) -> path. A role
        the run recorded but not given here is looked for at its recorded
        path, relative to the manifest's folder.
    previous : sequence of path
        The earlier results.json files the run compared with (``--previous``).
    templates : path, optional
        The ``--templates`` folder the run used (recorded as ``provenance.templates``);
        without it the text of such a report is not checked.
    ignore_hashes : bool
        Rerun even when an input's SHA-256 differs from the recorded one (the
        mismatches are still reported and verification fails).
    use_cache : bool
        Let weights-mode scoring use the score cache.

    Returns
    -------
    Verification

    Raises
    ------
    VerifyError
        The folder has no readable results.json, an input is missing, or an
        input's SHA-256 differs (unless ``ignore_hashes``).
    """
    from covreport._io import sha256_file

    folder = Path(folder)
    submitted = _load(folder / "results.json")
    prov = submitted.get("provenance") or {}
    recorded = prov.get("inputs") or {}
    options = prov.get("options")
    if not isinstance(options, dict):
        raise VerifyError(f"{folder / 'results.json'}: provenance has no 'options' (written by a covreport "
                          "older than 0.2); rerun it with `covreport run` to make it verifiable")
    _check_options(options, folder / "results.json")
    paths = _resolve_inputs(recorded, dict(inputs or {}), previous)
    mismatches = []
    for role, path in paths.items():
        want = (recorded.get(role) or {}).get("sha256")
        if role == "weights" and want is None:
            continue
        got = _weights_sha(path) if role == "weights" else sha256_file(path)
        if want is not None and got != want:
            mismatches.append({"input": role, "path": str(path), "recorded_sha256": want, "sha256": got})
    if mismatches and not ignore_hashes:
        lines = "\n".join(f"  {m['input']} {m['path']}: SHA-256 {m['sha256']}, the run recorded "
                          f"{m['recorded_sha256']}" for m in mismatches)
        raise VerifyError(f"{len(mismatches)} input(s) differ from those of the submitted run:\n{lines}\n"
                          "give the files the run read, or --ignore-hashes to compare anyway")
    regenerated = _rerun(paths, options, prov, use_cache)
    # A scores file standing in for the weights: the rerun cannot know the model.
    stand_in = "weights" in recorded and "scores" in paths
    skip = ("provenance.weights_sha256", "provenance.preprocessing", "provenance.model",
            "provenance.inputs.weights", "provenance.inputs.scores",
            "provenance.inputs.validation_scores") if stand_in else ()
    differences, n = compare_results(submitted, regenerated, skip=skip)
    used = prov.get("templates")
    report_diffs, checked, not_checked = check_report(
        folder, submitted, templates=templates if templates is not None else (None if used else ""))
    return Verification(numbers_compared=n, differences=differences, report_differences=report_diffs,
                        report_checked=checked, report_not_checked=not_checked, hash_mismatches=mismatches,
                        inputs={k: str(v) for k, v in paths.items()})


# --- inputs ------------------------------------------------------------------

#: What each recorded option may be (the CLI's own ranges): a submitted results.json is untrusted.
_OPTION_RULES = {
    "protocol": (lambda v: v in ("nested", "global"), "'nested' or 'global'"),
    "seed": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "permutations": (lambda v: type(v) is int and 0 <= v <= 100_000, "an integer from 0 to 100,000"),
    "bootstrap": (lambda v: type(v) is int and 0 <= v <= 100_000, "an integer from 0 to 100,000"),
    "predictive_ci": (lambda v: v in ("exact", "logit"), "'exact' or 'logit'"),
    "strict": (lambda v: type(v) is bool, "true or false"),
}


def _check_options(options, path):
    for key, (ok, want) in _OPTION_RULES.items():
        if key not in options:
            raise VerifyError(f"{path}: provenance.options lacks {key!r}; the run cannot be repeated")
        if not ok(options[key]):
            raise VerifyError(f"{path}: provenance.options.{key} is {options[key]!r}, not {want}")



def _load(path):
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VerifyError(f"{path} does not exist: give the folder that `covreport run --out` wrote") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VerifyError(f"{path} cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("provenance"), dict):
        raise VerifyError(f"{path} is not a covreport results.json (no 'provenance')")
    return data


def _resolve_inputs(recorded, given, previous):
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown input role(s) {unknown}")
    given = {k: Path(v) for k, v in given.items() if v is not None}
    for role in given:
        if role not in recorded and not (role in ("scores", "validation_scores") and "weights" in recorded):
            raise VerifyError(f"--{role.replace('_', '-')} was given but the submitted run read no {role} "
                              f"(it read: {', '.join(sorted(recorded)) or 'nothing recorded'})")
    if "manifest" not in given:
        raise VerifyError("give --manifest: the manifest the run read "
                          f"({_recorded_text(recorded, 'manifest')})")
    base = given["manifest"].parent
    paths, missing = {}, []
    for role in ROLES:
        if role not in recorded and role not in given:
            continue
        if role == "weights" and "scores" in given:
            continue  # a scores file made with those weights stands in for them
        path = given.get(role)
        if path is None:
            rec = (recorded.get(role) or {}).get("path")
            candidate = base / rec if rec else None
            if candidate is not None and candidate.is_file():
                path = candidate
        if path is None:
            missing.append(role)
        elif not path.is_file() and not (role == "weights" and str(path).startswith("xrv:")):
            raise VerifyError(f"{path} does not exist (--{role.replace('_', '-')})")
        else:
            paths[role] = path
    roles_previous = sorted((k for k in recorded if k.startswith("previous_")), key=lambda k: int(k.split("_")[1]))
    if len(previous) != len(roles_previous):
        missing.append(f"previous ({len(roles_previous)} earlier results.json given to --previous)")
    for role, path in zip(roles_previous, previous):
        paths[role] = Path(path)
    if missing:
        lines = "\n".join(f"  {_missing_text(role, recorded, base)}" for role in missing)
        raise VerifyError(f"the rerun needs these inputs of the submitted run:\n{lines}")
    return paths


def _recorded_text(recorded, role):
    rec = recorded.get(role) or {}
    return f"{rec.get('path', '?')}, SHA-256 {rec.get('sha256', '?')}"


def _missing_text(role, recorded, base):
    rec = (recorded.get(role) or {}).get("path")
    looked = f" (not found at {base / rec})" if rec and not role.startswith("previous") else ""
    return _missing_reason(role, recorded) + looked


def _missing_reason(role, recorded):
    if role == "weights":
        return (f"--weights: the run scored the images with {_recorded_text(recorded, 'weights')}; give those "
                "weights, or --scores with a scores file made with them (`covreport score`): the pairs table of "
                "results.json holds no image features, which the prediction needs")
    if role.startswith("previous"):
        return f"--previous: {role}"
    return f"--{role.replace('_', '-')}: {_recorded_text(recorded, role)}"


def _weights_sha(path):
    from covreport._io import sha256_file

    if str(path).startswith("xrv:"):
        return None
    return sha256_file(path)


# --- rerun and compare -----------------------------------------------------------


def _rerun(paths, options, prov, use_cache):
    import json

    from covreport.pipeline import NUMBER_OPTIONS, RunOptions, run
    from covreport.progress import stage

    fields = {k: options[k] for k in NUMBER_OPTIONS}  # all present and in range (_check_options)
    kwargs = {r: (str(p) if r == "weights" else p) for r, p in paths.items() if r in ROLES}
    # previous_1, previous_2, ... were put in numeric order by _resolve_inputs (not sorted as text:
    # previous_10 comes after previous_9)
    previous = tuple(p for r, p in paths.items() if r.startswith("previous_"))
    with tempfile.TemporaryDirectory(prefix="covreport-verify-") as tmp:
        opts = RunOptions(out=Path(tmp) / "rerun", pdf=False, use_cache=use_cache, previous=previous,
                          synthetic=bool(prov.get("synthetic")), **kwargs, **fields)
        with stage("Rerunning the analysis"):
            run(opts)
        return json.loads((Path(tmp) / "rerun" / "results.json").read_text(encoding="utf-8"))


def compare_results(submitted, regenerated, *, skip=()):
    """Every difference between two results.json documents, and the count of numbers compared.

    Returns
    -------
    (list of dict, int)
        ``{"path": "prediction.nested.metrics.accuracy.estimate", "submitted": ..., "regenerated": ...}``
        for each value that differs (a key present on one side only has
        ``None`` on the other and a ``note``), and how many numbers were
        compared. Differences whose path starts with one of ``skip`` are
        left out.
    """
    diffs = []
    count = [0]
    for key in sorted(set(submitted) | set(regenerated)):
        if key == "provenance":
            a, b = submitted.get(key) or {}, regenerated.get(key) or {}
            for sub in PROVENANCE_COMPARED:
                _walk(a.get(sub), b.get(sub), f"provenance.{sub}", diffs, count)
            diffs = [d for d in diffs if d["path"] != "provenance.model.source"]  # a path, not the model
            ins_a, ins_b = a.get("inputs") or {}, b.get("inputs") or {}
            for role in sorted(set(ins_a) | set(ins_b)):
                _walk((ins_a.get(role) or {}).get("sha256"), (ins_b.get(role) or {}).get("sha256"),
                      f"provenance.inputs.{role}.sha256", diffs, count)
        elif key not in ("covreport_version", "_path"):
            _walk(submitted.get(key, _ABSENT), regenerated.get(key, _ABSENT), key, diffs, count)
    diffs = [d for d in diffs if not d["path"].startswith(tuple(skip)) and not _RUN_FACT.match(d["path"])]
    return diffs, count[0]


#: Copies of run facts inside results: the new run's time in the revalidation series, and the
#: --previous files' paths (identified by their SHA-256 in provenance.inputs).
_RUN_FACT = re.compile(r"^revalidation\.(series\[\d+\]\.points\[\d+\]\.created|previous\[\d+\]\.path)$")


_ABSENT = object()


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _walk(a, b, path, diffs, count):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{path}.{k}", diffs, count)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{path}[{i}]", diffs, count)
    elif _is_number(a) and _is_number(b):
        count[0] += 1
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            diffs.append({"path": path, "submitted": a, "regenerated": b})
    elif a is _ABSENT or b is _ABSENT:
        diffs.append({"path": path, "submitted": None if a is _ABSENT else a,
                      "regenerated": None if b is _ABSENT else b,
                      "note": "absent from the regenerated results" if b is _ABSENT
                      else "absent from the submitted results"})
    elif isinstance(a, list) and isinstance(b, list):
        diffs.append({"path": path, "submitted": f"{len(a)} items", "regenerated": f"{len(b)} items"})
    elif a != b or type(a) is not type(b):
        diffs.append({"path": path, "submitted": a, "regenerated": b})


# --- the report files ---------------------------------------------------------------


def check_report(folder, submitted, templates=""):
    """Compare ``tables/*.csv`` and the text of ``report.html`` with a rendering of ``submitted``.

    ``templates``: the folder of the run's ``--templates`` ("" for the
    built-in ones; None when the run used templates that were not given, so
    report.html cannot be checked).

    Returns
    -------
    (list of dict, list of str, list of str)
        The differences (``path`` names the file and where), the files
        checked, and the files that could not be checked with the reason.
    """
    from covreport.pipeline import _write_tables

    folder = Path(folder)
    diffs, checked, not_checked = [], [], []
    with tempfile.TemporaryDirectory(prefix="covreport-verify-") as tmp:
        tmp = Path(tmp)
        try:
            _write_tables(submitted, tmp / "tables")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            return [], [], [f"tables/ and report.html: the submitted results.json is malformed "
                            f"({type(exc).__name__}: {exc}), so they cannot be rebuilt from it"]
        sub_tables = folder / "tables"
        names = sorted({p.name for p in (tmp / "tables").glob("*.csv")}
                       | ({p.name for p in sub_tables.glob("*.csv")} if sub_tables.is_dir() else set()))
        for name in names:
            mine, theirs = tmp / "tables" / name, sub_tables / name
            if not theirs.is_file():
                diffs.append({"path": f"tables/{name}", "submitted": None, "regenerated": "present",
                              "note": "missing from the submitted folder"})
            elif not mine.is_file():
                diffs.append({"path": f"tables/{name}", "submitted": "present", "regenerated": None,
                              "note": "results.json holds no such table"})
            else:
                diffs += _csv_differences(theirs, mine, f"tables/{name}")
                checked.append(f"tables/{name}")
        html = folder / "report.html"
        if html.is_file() and templates is not None:
            from covreport.report import render_report

            try:
                render_report(submitted, tmp / "report", pdf=False, templates=templates or None)
            except (CovreportError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                not_checked.append(f"report.html: cannot be rendered from the submitted results.json ({exc})")
            else:
                diffs += _html_differences(html, tmp / "report" / "report.html")
                checked.append("report.html (its text outside figures)")
        elif html.is_file():
            not_checked.append("report.html: the run used its own --templates; give them to verify "
                               "(--templates) to check the report's text")
        else:
            not_checked.append("report.html: not in the folder")
    if (folder / "report.pdf").is_file():
        not_checked.append("report.pdf: its text is not compared (render report.html again to check it)")
    if (folder / "figures").is_dir():
        not_checked.append("figures/: images are not compared")
    return diffs, checked, not_checked


def _csv_differences(submitted, regenerated, name):
    import pandas as pd

    if submitted.read_bytes() == regenerated.read_bytes():
        return []
    try:
        a = pd.read_csv(submitted, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        return [{"path": name, "submitted": f"unreadable CSV ({exc})", "regenerated": "CSV"}]
    b = pd.read_csv(regenerated, dtype=str, keep_default_na=False)
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return [{"path": name, "submitted": f"{len(a)} rows x {list(a.columns)}",
                 "regenerated": f"{len(b)} rows x {list(b.columns)}"}]
    out = []
    for col in a.columns:
        for i, (x, y) in enumerate(zip(a[col], b[col])):
            if x != y and not _close_text(x, y):
                out.append({"path": f"{name} line {i + 2}, column {col!r}", "submitted": x, "regenerated": y})
    return out


def _close_text(x, y):
    try:
        return math.isclose(float(x), float(y), rel_tol=RTOL, abs_tol=ATOL)
    except ValueError:
        return False


class _Text(HTMLParser):
    """Visible text of an HTML document, line by line, leaving out figures, styles and scripts."""

    SKIP = {"figure", "style", "script", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1
        elif tag in ("br", "p", "tr", "li", "h1", "h2", "h3", "h4", "caption", "div", "td", "th"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)

    def lines(self):
        text = "".join(self.parts)
        return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _html_lines(path):
    parser = _Text()
    parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.lines()


def _html_differences(submitted, regenerated):
    import difflib

    a, b = _html_lines(submitted), _html_lines(regenerated)
    if a == b:
        return []
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        out.append({"path": f"report.html text line {i1 + 1}",
                    "submitted": "\n".join(a[i1:i2]) or None, "regenerated": "\n".join(b[j1:j2]) or None})
    return out
