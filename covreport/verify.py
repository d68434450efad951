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

A submitted folder is untrusted (issue 18.4). ``results.json`` is read as a
bounded regular file and checked against the schema before use (types,
finite numbers, depth; an ``Error:`` names the key). Nothing inside the
folder is read through a symbolic link. A recorded input path is only a
candidate, looked at when it

- is relative (never absolute) and, joined to the folder it is relative to
  (``from_results``: the results folder; ``path``: the manifest's folder),
  stays inside that folder's root (the folder holding the results folder,
  respectively the manifest's folder) without passing a symbolic link;
- names a regular file within the size limit of its kind;
- has the SHA-256 the run recorded (``--ignore-hashes`` does not relax this:
  a file found through the submission is parsed only when it is the file
  the run read, so nothing else of the reviewer's can be echoed).

An input given as an option is always used as given. The score cache is
never taken from the submission (a submitted cache could hold any scores):
``--cache``, else the default cache of ``covreport run``.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from covreport import inputs as _inputs
from covreport.errors import CovreportError

RTOL = 1e-9
ATOL = 1e-12
TOLERANCE_TEXT = f"numbers equal within a relative difference of {RTOL:g} (absolute {ATOL:g} near zero)"

#: provenance keys whose values must be regenerated; the rest describe the run.
PROVENANCE_COMPARED = ("options", "weights_sha256", "preprocessing", "model")
#: roles of provenance.inputs that are RunOptions fields of the same name.
ROLES = ("manifest", "scores", "weights", "validation_csv", "validation_scores", "reference_csv", "study")
#: Kind of each input for its size limit (covreport.inputs.LIMITS); previous_N are "results".
_KIND = {"manifest": "manifest", "scores": "scores file", "weights": "checkpoint", "validation_csv": "manifest",
         "validation_scores": "scores file", "reference_csv": "manifest", "study": "study file"}
_PREVIOUS = re.compile(r"previous_([1-9][0-9]{0,3})")


class VerifyError(CovreportError):
    """The submitted folder cannot be verified (missing or changed inputs, unreadable results)."""


@dataclass
class Verification:
    """What :func:`verify` found.

    ``differences`` lists ``{"path", "submitted", "regenerated"}`` for
    results.json, ``report_differences`` the same for the report files
    (``path`` then names the file and the place in it). ``found`` names the
    inputs taken from the paths results.json records (the others were given).
    """

    numbers_compared: int
    differences: list = field(default_factory=list)
    report_differences: list = field(default_factory=list)
    report_checked: list = field(default_factory=list)
    report_not_checked: list = field(default_factory=list)
    hash_mismatches: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    found: list = field(default_factory=list)
    tolerance: str = TOLERANCE_TEXT

    @property
    def ok(self):
        return not (self.differences or self.report_differences or self.hash_mismatches)

    def to_dict(self):
        return {"verified": self.ok, "numbers_compared": self.numbers_compared, "tolerance": self.tolerance,
                "inputs": self.inputs, "inputs_found_from_results": self.found,
                "hash_mismatches": self.hash_mismatches,
                "differences": self.differences, "report_differences": self.report_differences,
                "report_checked": self.report_checked, "report_not_checked": self.report_not_checked}


def verify(folder, inputs=None, *, previous=(), templates=None, ignore_hashes=False, use_cache=True, cache=None):
    """Rerun the analysis of a results folder and compare every number.

    Parameters
    ----------
    folder : path
        The output folder of ``covreport run`` or ``covreport demo`` (holding
        results.json), one's own or a submitted one.
    inputs : dict, optional
        Role (``manifest``, ``scores``, ``weights``, ``validation_csv``,
        ``validation_scores``, ``reference_csv``, ``study``) -> path; these
        override what results.json records. A role the run recorded but not
        given here is looked for at its recorded paths (``from_results``,
        relative to the results folder, then ``path``, relative to the
        manifest's folder) under the rule of the module docstring.
    previous : sequence of path
        The earlier results.json files the run compared with (``--previous``),
        in order; empty: looked for at their recorded paths.
    templates : path, optional
        The ``--templates`` folder the run used (recorded as ``provenance.templates``);
        without it the text of such a report is not checked.
    ignore_hashes : bool
        Rerun even when a given input's SHA-256 differs from the recorded one
        (the mismatches are still reported and verification fails).
    use_cache : bool
        Let weights-mode scoring use the score cache.
    cache : path, optional
        The score cache; default that of ``covreport run`` without ``--cache``
        (:func:`covreport.cache.default_cache_path`). Never one named by the
        submission.

    Returns
    -------
    Verification

    Raises
    ------
    VerifyError
        The folder has no readable or well-formed results.json (the message
        names the key), an input is missing, or an input's SHA-256 differs
        (unless ``ignore_hashes`` and the input was given).
    """
    from covreport._io import sha256_file

    folder = Path(folder)
    submitted = _load(folder / "results.json")
    prov = submitted["provenance"]
    recorded = prov.get("inputs") or {}
    options = prov.get("options")
    if not isinstance(options, dict):
        raise VerifyError(f"{folder / 'results.json'}: provenance has no 'options' (written by a covreport "
                          "older than 0.2); rerun it with `covreport run` to make it verifiable")
    _check_options(options, folder / "results.json")
    paths, found = _resolve_inputs(folder, recorded, dict(inputs or {}), previous)
    mismatches = []
    for role, path in paths.items():
        want = recorded.get(role, {}).get("sha256")
        if role == "weights" and want is None:
            continue
        kind = _KIND.get(role, "results")
        got = _weights_sha(path) if role == "weights" else sha256_file(path, what=kind, error_class=VerifyError)
        if want is not None and got != want:
            mismatches.append({"input": role, "path": str(path), "recorded_sha256": want, "sha256": got})
    wrong_found = [m for m in mismatches if m["input"] in found]
    if wrong_found:  # a file found through the submission is read as data only when it is the run's
        lines = "\n".join(f"  {m['input']} {m['path']} (found from results.json): SHA-256 {m['sha256']}, the "
                          f"run recorded {m['recorded_sha256']}" for m in wrong_found)
        raise VerifyError(f"{len(wrong_found)} input(s) at the paths results.json records are not the files the "
                          f"run read:\n{lines}\ngive the files the run read as options (--manifest, --scores, ...); "
                          "--ignore-hashes compares anyway only with files given as options")
    if mismatches and not ignore_hashes:
        lines = "\n".join(f"  {m['input']} {m['path']}: SHA-256 {m['sha256']}, the run recorded "
                          f"{m['recorded_sha256']}" for m in mismatches)
        raise VerifyError(f"{len(mismatches)} input(s) differ from those of the submitted run:\n{lines}\n"
                          "give the files the run read, or --ignore-hashes to compare anyway")
    regenerated = _rerun(paths, options, prov, use_cache, cache)
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
                        inputs={k: str(v) for k, v in paths.items()}, found=found)


# --- the submitted results.json -------------------------------------------------------

#: What each recorded option may be (the CLI's own ranges): a submitted results.json is untrusted.
_OPTION_RULES = {
    "protocol": (lambda v: v in ("penalised", "nested", "global"), "'penalised', 'nested' or 'global'"),
    "seed": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "permutations": (lambda v: type(v) is int and 0 <= v <= 100_000, "an integer from 0 to 100,000"),
    "bootstrap": (lambda v: type(v) is int and 0 <= v <= 100_000, "an integer from 0 to 100,000"),
    "predictive_ci": (lambda v: v in ("exact", "logit"), "'exact' or 'logit'"),
    "threshold": (lambda v: type(v) in (int, float) and 0 < v < 1, "a number strictly between 0 and 1"),
    "strict": (lambda v: type(v) is bool, "true or false"),
    "predictors": (lambda v: type(v) is str and len(v) <= 2000 and v.isprintable(),
                   "a list of manifest columns as --predictors takes it"),
    "target": (lambda v: type(v) is str and len(v) <= 200 and v.isprintable(), "a manifest column name or ''"),
    "positive": (lambda v: type(v) is str and len(v) <= 200 and v.isprintable(), "a value of the target or ''"),
    "site": (lambda v: type(v) is str and len(v) <= 200 and v.isprintable(), "a manifest column name or ''"),
    "validation": (lambda v: v in ("leave-one-patient-out", "leave-one-site-out"),
                   "'leave-one-patient-out' or 'leave-one-site-out'"),
}


#: Options added after results.json first recorded its options, with the value every run had before.
_OPTION_BEFORE = {"threshold": 0.5, "predictors": "", "target": "", "positive": "", "site": "",
                  "validation": "leave-one-patient-out"}


def _check_options(options, path):
    for key, (ok, want) in _OPTION_RULES.items():
        if key not in options and key in _OPTION_BEFORE:
            options[key] = _OPTION_BEFORE[key]  # an older run: it used the fixed value
        if key not in options:
            raise VerifyError(f"{path}: provenance.options lacks {key!r}; the run cannot be repeated")
        if not ok(options[key]):
            raise VerifyError(f"{path}: provenance.options.{key} is {_inputs.safe_text(repr(options[key]), limit=80)}, "
                              f"not {want}")


class _NonFinite(str):
    """A NaN or infinite number of the submitted JSON, kept (as its text) so that its key can be named."""


def _parse_float(text):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _load(path):
    """The submitted results.json, read as a bounded regular file and checked (:func:`submission_problem`)."""
    import json

    from covreport.revalidation import MAX_CONTAINERS, MAX_STRINGS, MAX_VALUES

    shown = _inputs.safe_text(str(path))
    hint = "give the results.json covreport wrote, unedited"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise VerifyError(f"{shown} does not exist: give the folder that `covreport run --out` wrote") from None
    except OSError as exc:
        raise VerifyError(f"{shown} cannot be read ({exc.strerror}) -- check the folder's permissions") from None
    if stat.S_ISLNK(st.st_mode):
        raise VerifyError(f"{shown} is a symbolic link; covreport writes none and verify follows none in a "
                          f"results folder -- {hint}")
    raw = _inputs.read_bytes(path, "results", error_class=VerifyError)  # regular file (no FIFO), size limit
    for count, most, what in ((raw.count(b"[") + raw.count(b"{"), MAX_CONTAINERS, "objects and lists"),
                              (raw.count(b","), MAX_VALUES, "values"), (raw.count(b'"') // 2, MAX_STRINGS, "strings")):
        if count > most:
            raise VerifyError(f"{shown}: holds {count:,} {what}, more than the {most:,} a results.json covreport "
                              f"writes may hold -- {hint}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_NonFinite, parse_float=_parse_float)
    except UnicodeDecodeError as exc:
        raise VerifyError(f"{shown} is not UTF-8 text (byte offset {exc.start}) -- {hint}") from None
    except json.JSONDecodeError as exc:
        raise VerifyError(f"{shown} line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}) -- "
                          f"{hint}") from None
    except RecursionError:
        raise VerifyError(f"{shown}: nested too deeply to be a results.json -- {hint}") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise VerifyError(f"{shown}: not a results.json covreport wrote ({_inputs.safe_text(exc)}) -- "
                          f"{hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("provenance"), dict):
        raise VerifyError(f"{shown} is not a covreport results.json (no 'provenance' object) -- {hint}")
    problem = submission_problem(data)
    if problem:
        raise VerifyError(f"{shown}: {problem} -- {hint}")
    return data


def _kind(v):
    return "null" if v is None else {bool: "true/false", str: "text", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__)


def _nonfinite_problem(data):
    stack = [(data, "")]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, _NonFinite):
            return f"{where or 'the top'}: {_inputs.safe_text(obj, limit=40)} is not a finite number"
        if isinstance(obj, dict):
            stack.extend((v, f"{where}.{_inputs.safe_text(k, limit=80)}" if where else _inputs.safe_text(k, limit=80))
                         for k, v in obj.items())
        elif isinstance(obj, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(obj))
    return None


def submission_problem(data):
    """The first problem of a submitted results.json (parsed by :func:`_load`), or ``None``.

    Checked: no NaN or infinite number anywhere; what
    :func:`covreport.revalidation.check_results` checks (nesting depth, no
    control or invisible characters in keys and strings, types and ranges of
    the compared parts); and the provenance verify reads: ``inputs`` (each
    role known, an object with a 64-hex ``sha256`` and text paths;
    ``previous_N`` numbered 1..k), ``options`` an object, ``templates`` text,
    ``synthetic`` true/false, ``labels`` a list of text. The problem names
    the key.
    """
    from covreport.revalidation import check_results

    problem = _nonfinite_problem(data) or check_results(data)
    if problem:
        return problem
    prov = data["provenance"]
    ins = prov.get("inputs", {})
    if not isinstance(ins, dict):
        return f"provenance.inputs: {_kind(ins)} instead of an object"
    numbers = []
    for role, rec in ins.items():
        where = f"provenance.inputs.{_inputs.safe_text(role, limit=80)}"
        match = _PREVIOUS.fullmatch(role)
        if role not in ROLES and not match:
            return f"{where}: not an input covreport records ({', '.join(ROLES)}, previous_1, previous_2, ...)"
        if match:
            numbers.append(int(match.group(1)))
        if not isinstance(rec, dict):
            return f"{where}: {_kind(rec)} instead of an object"
        sha = rec.get("sha256")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)) and not (role == "weights" and sha is None):
            return f"{where}.sha256: {_inputs.safe_text(repr(sha), limit=80)} is not a SHA-256 (64 hexadecimal digits)"
        for key in ("path", "from_results"):
            if key in rec and not (isinstance(rec[key], str) and 0 < len(rec[key]) <= 4096):
                return f"{where}.{key}: {_kind(rec[key])} instead of a path (text)"
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        return f"provenance.inputs: the previous results are numbered {sorted(numbers)}, not 1 to {len(numbers)}"
    for key, types, want in (("options", dict, "an object"), ("templates", str, "text"),
                             ("synthetic", bool, "true/false")):
        if prov.get(key) is not None and not isinstance(prov[key], types):
            return f"provenance.{key}: {_kind(prov[key])} instead of {want}"
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        return "labels: not a list of text"
    return None


# --- inputs ------------------------------------------------------------------


def _resolve_inputs(folder, recorded, given, previous):
    """Role -> path of every input the rerun needs, and the roles found from results.json's paths."""
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown input role(s) {unknown}")
    given = {k: Path(v) for k, v in given.items() if v is not None}
    for role in given:
        if role not in recorded and not (role in ("scores", "validation_scores") and "weights" in recorded):
            raise VerifyError(f"--{role.replace('_', '-')} was given but the submitted run read no {role} "
                              f"(it read: {', '.join(sorted(recorded)) or 'nothing recorded'})")
    roles_previous = sorted((k for k in recorded if k.startswith("previous_")), key=lambda k: int(k.split("_")[1]))
    missing, why = [], {}
    if previous:
        if len(previous) != len(roles_previous):
            missing.append("previous")
            why["previous"] = (f"--previous: the run was given {len(roles_previous)} earlier results.json, "
                               f"verify {len(previous)}")
        else:
            given.update((role, Path(p)) for role, p in zip(roles_previous, previous))
    base = given["manifest"].parent if "manifest" in given else None
    paths, found = {}, []
    for role in ROLES + tuple(roles_previous):
        if role not in recorded and role not in given:
            continue
        if role == "weights" and "scores" in given:
            continue  # a scores file made with those weights stands in for them
        path = given.get(role)
        if path is not None:
            if not path.exists() and not (role == "weights" and str(path).startswith("xrv:")):
                raise VerifyError(f"{path} does not exist (--{role.replace('_', '-')})")  # then: a regular file?
            paths[role] = path
            continue
        path, reasons = _find_recorded(folder, base, recorded[role])
        if path is None:
            missing.append(role)
            why[role] = reasons
            continue
        paths[role], found = path, found + [role]
        if role == "manifest":
            base = path.parent
    if missing:
        lines = "\n".join(f"  {_missing_reason(role, recorded)}{why.get(role) or ''}" for role in missing)
        raise VerifyError(f"the rerun needs these inputs of the submitted run:\n{lines}")
    return paths, found


def _find_recorded(folder, base, rec):
    """The file a recorded input names, if it may be read (module docstring), and why not otherwise."""
    reasons = []
    results_dir = Path(os.path.abspath(folder))
    for key, start, root in (("from_results", results_dir, results_dir.parent), ("path", base, base)):
        rel = rec.get(key)
        if rel is None or start is None:
            continue
        path, reason = _candidate(start, rel, root)
        if path is not None:
            return path, None
        reasons.append(reason)
    return None, "".join(f" ({r})" for r in reasons)


def _shown(path):
    """``path`` relative to the current folder when it lies below it, else as it is."""
    try:
        return Path(os.path.relpath(path)) if Path(os.path.abspath(path)).is_relative_to(Path.cwd()) else Path(path)
    except ValueError:
        return Path(path)


def _candidate(start, rel, root):
    """``start/rel`` when it stays inside ``root``, passes no symbolic link below it and is a regular file.

    Returns ``(path, None)`` or ``(None, reason)``; nothing is opened.
    """
    shown = _inputs.safe_text(rel, limit=200)
    if "\x00" in rel or "\\" in rel or rel.startswith("/") or re.match(r"[A-Za-z]:", rel):
        return None, f"recorded as {shown!r}: an absolute path, not looked at"
    root = os.path.abspath(root)
    target = os.path.normpath(os.path.join(os.path.abspath(start), rel))
    if target == root or os.path.commonpath([target, root]) != root:
        return None, f"recorded as {shown!r}: leads out of {root}, not looked at"
    here = root
    for part in Path(os.path.relpath(target, root)).parts:
        here = os.path.join(here, part)
        try:
            st = os.lstat(here)
        except OSError:
            return None, f"not found at {_shown(target)}"
        if stat.S_ISLNK(st.st_mode):
            return None, f"{_shown(here)} is a symbolic link, not followed"
    if not stat.S_ISREG(st.st_mode):
        return None, f"{_shown(target)} is not a regular file"
    return _shown(target), None


def _recorded_text(recorded, role):
    rec = recorded.get(role) or {}
    return f"{_inputs.safe_text(rec.get('path', '?'), limit=200)}, SHA-256 {rec.get('sha256', '?')}"


def _missing_reason(role, recorded):
    if role == "weights":
        return (f"--weights: the run scored the images with {_recorded_text(recorded, 'weights')}; give those "
                "weights, or --scores with a scores file made with them (`covreport score`): the pairs table of "
                "results.json holds no image features, which the prediction needs")
    if role.startswith("previous"):
        return f"--previous ({role}): {_recorded_text(recorded, role)}" if role in recorded else ""
    return f"--{role.replace('_', '-')}: {_recorded_text(recorded, role)}"


def _weights_sha(path):
    from covreport._io import sha256_file

    if str(path).startswith("xrv:"):
        return None
    return sha256_file(path, what="checkpoint", error_class=VerifyError)


# --- rerun and compare -----------------------------------------------------------


def _rerun(paths, options, prov, use_cache, cache=None):
    import json

    from covreport.pipeline import NUMBER_OPTIONS, RunOptions, run
    from covreport.progress import stage

    fields = {k: options[k] for k in NUMBER_OPTIONS}  # all present and in range (_check_options)
    kwargs = {r: (str(p) if r == "weights" else p) for r, p in paths.items() if r in ROLES}
    # previous_1, previous_2, ... were put in numeric order by _resolve_inputs (not sorted as text:
    # previous_10 comes after previous_9)
    previous = tuple(p for r, p in paths.items() if r.startswith("previous_"))
    with tempfile.TemporaryDirectory(prefix="covreport-verify-") as tmp:
        opts = RunOptions(out=Path(tmp) / "rerun", pdf=False, use_cache=use_cache, cache=cache, previous=previous,
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


def _entry(path):
    """What is at ``path`` without following a symbolic link: "file", "folder", "link", "other" or None."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return ("link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode)
            else "other")


_NOT_FILE = {"link": "a symbolic link (not followed)", "other": "not a regular file (not read)",
             "folder": "a folder"}


def check_report(folder, submitted, templates=""):
    """Compare ``tables/*.csv`` and the text of ``report.html`` with a rendering of ``submitted``.

    ``templates``: the folder of the run's ``--templates`` ("" for the
    built-in ones; None when the run used templates that were not given, so
    report.html cannot be checked). No file of ``folder`` is read through a
    symbolic link or unless it is a regular file within the size limit: a
    table or report that is not is a difference, and nothing of it is read.

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
                            f"({type(exc).__name__}: {_inputs.safe_text(exc, limit=200)}), so they cannot be "
                            "rebuilt from it"]
        sub_tables = folder / "tables"
        kind = _entry(sub_tables)
        theirs_names = set()
        if kind == "folder":
            theirs_names = {e.name for e in os.scandir(sub_tables) if e.name.endswith(".csv")}
        elif kind is not None:
            not_checked.append(f"tables/: {_NOT_FILE[kind]}")
            diffs.append({"path": "tables/", "submitted": _NOT_FILE[kind], "regenerated": "a folder",
                          "note": "covreport writes tables/ as a folder"})
        names = sorted({p.name for p in (tmp / "tables").glob("*.csv")} | theirs_names)
        for name in names:
            mine, theirs = tmp / "tables" / name, sub_tables / name
            shown = f"tables/{_inputs.safe_text(name, limit=200)}"
            kind = _entry(theirs) if name in theirs_names else None
            if kind is None:
                diffs.append({"path": shown, "submitted": None, "regenerated": "present",
                              "note": "missing from the submitted folder"})
            elif kind != "file":
                not_checked.append(f"{shown}: {_NOT_FILE[kind]}")
                diffs.append({"path": shown, "submitted": _NOT_FILE[kind], "regenerated": "a file" if
                              mine.is_file() else None, "note": "covreport writes tables as regular files"})
            elif not mine.is_file():
                diffs.append({"path": shown, "submitted": "present", "regenerated": None,
                              "note": "results.json holds no such table"})
            else:
                diffs += _csv_differences(theirs, mine, shown)
                checked.append(shown)
        html = folder / "report.html"
        kind = _entry(html)
        if kind not in (None, "file"):
            not_checked.append(f"report.html: {_NOT_FILE[kind]}")
            diffs.append({"path": "report.html", "submitted": _NOT_FILE[kind], "regenerated": "a file",
                          "note": "covreport writes report.html as a regular file"})
        elif kind == "file" and templates is not None:
            from covreport.report import render_report

            try:
                render_report(submitted, tmp / "report", pdf=False, templates=templates or None)
            except (CovreportError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                not_checked.append(f"report.html: cannot be rendered from the submitted results.json "
                                   f"({_inputs.safe_text(exc, limit=200)})")
            else:
                diffs += _html_differences(html, tmp / "report" / "report.html")
                checked.append("report.html (its text outside figures)")
        elif kind == "file":
            not_checked.append("report.html: the run used its own --templates; give them to verify "
                               "(--templates) to check the report's text")
        else:
            not_checked.append("report.html: not in the folder")
    kind = _entry(folder / "report.pdf")
    if kind is not None:
        not_checked.append("report.pdf: its text is not compared (render report.html again to check it)"
                           if kind == "file" else f"report.pdf: {_NOT_FILE[kind]}")
    if _entry(folder / "figures") is not None:
        not_checked.append("figures/: images are not compared")
    return diffs, checked, not_checked


def _submitted_bytes(path):
    """A file of the submitted folder: a regular file (lstat: no symbolic link) within the size limit."""
    if _entry(path) != "file":
        raise VerifyError(f"{_inputs.safe_text(path)} is not a regular file")
    return _inputs.read_bytes(path, "submitted file", error_class=VerifyError)


def _csv_differences(submitted, regenerated, name):
    import pandas as pd

    try:
        raw = _submitted_bytes(submitted)
    except VerifyError as exc:
        return [{"path": name, "submitted": f"not read ({exc})", "regenerated": "CSV"}]
    if raw == regenerated.read_bytes():
        return []
    try:
        a = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        return [{"path": name, "submitted": f"unreadable CSV ({_inputs.safe_text(exc, limit=200)})",
                 "regenerated": "CSV"}]
    b = pd.read_csv(regenerated, dtype=str, keep_default_na=False)
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return [{"path": name, "submitted": f"{len(a)} rows x {_inputs.safe_text(list(a.columns), limit=300)}",
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
    parser.feed(_submitted_bytes(path).decode("utf-8", errors="replace"))
    parser.close()
    return parser.lines()


def _html_differences(submitted, regenerated):
    import difflib

    try:
        a = _html_lines(submitted)
    except VerifyError as exc:
        return [{"path": "report.html", "submitted": f"not read ({exc})", "regenerated": "HTML"}]
    b = _html_lines(regenerated)
    if a == b:
        return []
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        out.append({"path": f"report.html text line {i1 + 1}",
                    "submitted": "\n".join(a[i1:i2]) or None, "regenerated": "\n".join(b[j1:j2]) or None})
    return out
