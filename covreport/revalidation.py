"""What moved since the last validation: the ``revalidation`` record.

``covreport run ... --previous OLD/results.json`` sets the new results beside
one or more earlier ones (``docs/RESULTS.md``). :func:`compare` builds the
``revalidation`` record of ``results.json``:

* ``previous``: one entry per earlier result (oldest first) with its
  ``created`` time, weights SHA-256 and preprocessing, and whether it is
  ``comparable`` with the new one: results computed with other weights or
  other preprocessing are not, and the ``reason`` names both SHA-256s;
* ``added``: pairs and patients per outcome group, new minus the most recent
  previous (from ``flow.by_outcome``), and ``pair_changes``: which pairs are
  new, gone or relabelled (from the ``pairs`` lists);
* ``headline``: one row per headline number -- per-label validation AUC,
  Worse-vs-Improved Mann-Whitney p and Cohen's d per label, and accuracy,
  sensitivity, specificity and AUC of each prediction protocol (nested,
  global, reversed) -- with the old and new estimate and CI, the change, and
  whether the new CI excludes the old estimate;
* ``series``: per headline number, the estimate and CI of every validation,
  oldest first, for :func:`trend_figure`.

"The new CI excludes the old estimate" is a descriptive flag, not a test of
change: the two validations share most of their pairs, so their estimates
are correlated and the flag is conservative only when the new pairs are a
small addition (Altman & Bland 2003, "Interaction revisited: the difference
between two estimates", BMJ 326:219, give the test for independent
estimates, which does not apply here).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from covreport import inputs
from covreport.constants import IMPROVED, OUTCOMES, WORSE
from covreport.errors import ReportError

__all__ = ["check_results", "compare", "load_results", "trend_figure", "PROTOCOLS", "PREDICTION_MEASURES"]

#: Prediction protocols compared, in the report's order.
PROTOCOLS = ("penalised", "nested", "global", "reversed")
#: Measures of ``prediction.<protocol>.metrics`` compared (plus its ``auc``).
PREDICTION_MEASURES = ("accuracy", "sensitivity", "specificity")

EXCLUDES_METHOD = (
    "new 95% CI excludes the old point estimate: a descriptive flag, not a test of change "
    "(the two validations share pairs, so their estimates are not independent)"
)
ADDED_METHOD = "new flow.by_outcome minus the most recent previous one (negative: fewer than before)"
PAIR_CHANGES_METHOD = ("pairs matched by patient_id, first_image and second_image between the pairs "
                       "analysed in the most recent previous result and in the new one")


#: Deepest nesting accepted in a previous results.json (covreport writes about 6 levels).
MAX_DEPTH = 32
#: Largest magnitude of a number compared (Cohen's d, likelihood ratios); counts are below 1e9.
MAX_VALUE = 1e6
_UNIT = (0.0, 1.0)  # probabilities, AUCs, proportions
#: Largest previous results.json read (covreport writes about 600 bytes per pair), and most objects
#: and lists, values (commas) and strings (quote pairs) in it: these bound the memory parsing takes.
MAX_RESULTS_BYTES = 128 << 20
MAX_CONTAINERS = 2_000_000
MAX_VALUES = 10_000_000
MAX_STRINGS = 10_000_000


def load_results(path):
    """Read a ``results.json`` written by ``covreport run`` and check what :func:`compare` reads.

    The parts of ``docs/RESULTS.md`` that the comparison uses are checked
    (:func:`check_results`): their types, that numbers are finite and in
    range (p values, AUCs and proportions in [0, 1], counts non-negative
    integers, other numbers within :data:`MAX_VALUE`), and that the file is
    nested no deeper than :data:`MAX_DEPTH`.

    Raises
    ------
    ReportError
        When the file is missing, not JSON, not a covreport results file, or
        fails the check; the message names the offending key.
    """
    path = Path(path)
    shown = inputs.safe_text(str(path))
    hint = "give --previous the results.json of an earlier run, unedited"
    if not os.path.lexists(path):
        raise ReportError(f"{shown} does not exist -- give --previous the results.json of an earlier run")
    # A regular file (not a FIFO or a device such as /dev/zero) of bounded size, checked before reading.
    raw = inputs.read_bytes(path, "results", limit=MAX_RESULTS_BYTES, error_class=ReportError)
    counts = ((raw.count(b"[") + raw.count(b"{"), MAX_CONTAINERS, "objects and lists"),
              (raw.count(b","), MAX_VALUES, "values"), (raw.count(b'"') // 2, MAX_STRINGS, "strings"))
    for count, most, what in counts:
        if count > most:
            raise ReportError(f"{shown}: holds {count:,} {what}, more than the {most:,} a results.json covreport "
                              f"writes may hold -- {hint}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ReportError(f"{shown} is not UTF-8 text (byte offset {exc.start}) -- {hint}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{shown} line {exc.lineno}: not valid JSON ({exc.msg}) -- {hint}") from None
    except RecursionError:  # the parser recursed once per level: far deeper than MAX_DEPTH
        raise ReportError(f"{shown}: nested deeper than {MAX_DEPTH} levels -- {hint}") from None
    except MemoryError:
        raise ReportError(f"{shown}: too large to read into memory -- {hint}") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise ReportError(f"{shown}: not a results.json covreport wrote ({inputs.safe_text(exc)}) -- {hint}") from None
    if not isinstance(data, dict) or "provenance" not in data:
        raise ReportError(f"{shown} is not a covreport results.json (no 'provenance') -- give --previous the "
                          "results.json of an earlier run")
    problem = check_results(data)
    if problem:
        raise ReportError(f"{shown}: {problem} -- {hint}")
    data = dict(data)
    data.setdefault("_path", str(path))
    return data


def _depth_problem(data):
    """Nesting deeper than :data:`MAX_DEPTH`, or a string (or key) holding an invisible or control character.

    A results file's strings reach the report and the terminal: a bidi
    control, ESC sequence or other format character is refused, naming the key.
    """
    stack = [(data, 1, "")]
    while stack:
        obj, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            return f"{where or 'the top'}: nested deeper than {MAX_DEPTH} levels"
        if isinstance(obj, dict):
            for k, v in obj.items():
                key = f"{where}.{inputs.safe_text(k, limit=80)}" if where else inputs.safe_text(k, limit=80)
                problem = inputs.text_problem(k)
                if problem:
                    return f"{key}: the key {problem}"
                stack.append((v, depth + 1, key))
        elif isinstance(obj, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(obj))
        elif isinstance(obj, str):
            problem = inputs.text_problem(obj)
            if problem:
                return f"{where or 'the top'}: {problem}"
    return None


class _Bad(Exception):
    pass


def _kind(v):
    return "null" if v is None else {bool: "true/false", str: "text", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__)


def _get(obj, key, where, types, *, optional=True):
    """``obj[key]`` checked to be one of ``types`` (or absent/null when optional)."""
    v = obj.get(key)
    if v is None:
        if optional:
            return None
        raise _Bad(f"{where}.{key}: missing")
    if isinstance(v, bool) and bool not in types:
        raise _Bad(f"{where}.{key}: {v!r} is {_kind(v)}, not {' or '.join(t.__name__ for t in types)}")
    if not isinstance(v, types):
        raise _Bad(f"{where}.{key}: {_kind(v)} instead of {' or '.join(t.__name__ for t in types)}")
    return v


def _number(obj, key, where, limits=(-MAX_VALUE, MAX_VALUE), *, integer=False):
    v = _get(obj, key, where, (int,) if integer else (int, float))
    if v is not None and not (math.isfinite(v) and limits[0] <= v <= limits[1]):
        raise _Bad(f"{where}.{key}: {v!r} is out of range [{limits[0]:g}, {limits[1]:g}]")
    return v


def _records(obj, key, where):
    v = _get(obj, key, where, (list,))
    for i, rec in enumerate(v or []):
        if not isinstance(rec, dict):
            raise _Bad(f"{where}.{key}[{i}]: {_kind(rec)} instead of an object")
    return v or []


def check_results(data):
    """The first problem of a results.json dict in what :func:`compare` reads, or ``None``.

    The schema is ``docs/RESULTS.md``; the problem names the key (e.g.
    ``validation_auc[2].auc: 1e+308 is out of range [0, 1]``).
    """
    problem = _depth_problem(data)
    if problem:
        return problem
    try:
        _check_results(data)
    except _Bad as exc:
        return str(exc)
    return None


def _check_results(data):
    prov = _get(data, "provenance", "results", (dict,), optional=False)
    _get(prov, "created", "provenance", (str,))
    _get(prov, "weights_sha256", "provenance", (str,))
    _get(prov, "preprocessing", "provenance", (dict,))
    _get(prov, "path", "provenance", (str,))
    for i, rec in enumerate(_records(data, "validation_auc", "results")):
        where = f"validation_auc[{i}]"
        _get(rec, "label", where, (str,))
        for key in ("auc", "ci_low", "ci_high"):
            _number(rec, key, where, _UNIT)
    for i, rec in enumerate(_records(data, "group_differences", "results")):
        where = f"group_differences[{i}]"
        for key in ("contrast", "label", "group1", "group2"):
            _get(rec, key, where, (str,))
        _number(rec, "p", where, _UNIT)
        for key in ("cohen_d", "d_ci_low", "d_ci_high"):
            _number(rec, key, where)
    pred = _get(data, "prediction", "results", (dict,)) or {}
    _get(pred, "headline", "prediction", (str,))
    for protocol in PROTOCOLS:
        block = _get(pred, protocol, "prediction", (dict,))
        if block is None:
            continue
        where = f"prediction.{protocol}"
        metrics = _get(block, "metrics", where, (dict,)) or {}
        for measure in PREDICTION_MEASURES:
            m = _get(metrics, measure, f"{where}.metrics", (dict,)) or {}
            for key in ("estimate", "ci_low", "ci_high"):
                _number(m, key, f"{where}.metrics.{measure}", _UNIT)
        auc = _get(block, "auc", where, (dict,)) or {}
        for key in ("auc", "ci_low", "ci_high"):
            _number(auc, key, f"{where}.auc", _UNIT)
    flow = _get(data, "flow", "results", (dict,)) or {}
    for key in ("pairs_analysed", "patients_analysed"):
        _number(flow, key, "flow", (0, 1e9), integer=True)
    by_outcome = _get(flow, "by_outcome", "flow", (dict,)) or {}
    for outcome in OUTCOMES:
        counts = _get(by_outcome, outcome, "flow.by_outcome", (dict,)) or {}
        for key in ("pairs", "patients"):
            _number(counts, key, f"flow.by_outcome.{outcome}", (0, 1e9), integer=True)
    for i, rec in enumerate(_records(data, "pairs", "results")):
        where = f"pairs[{i}]"
        for key in ("patient_id", "first_image", "second_image", "pair_id"):
            _get(rec, key, where, (str, int, float))
        _get(rec, "outcome", where, (str,))


def _num(x):
    """A finite float, or None."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _point(estimate, ci_low=None, ci_high=None):
    return {"estimate": _num(estimate), "ci_low": _num(ci_low), "ci_high": _num(ci_high)}


def _headline_points(results):
    """Ordered dict: (quantity, label, protocol) -> {estimate, ci_low, ci_high}."""
    points = {}
    for rec in results.get("validation_auc") or []:
        points[("validation AUC", rec.get("label"), None)] = _point(rec.get("auc"), rec.get("ci_low"), rec.get("ci_high"))
    for rec in results.get("group_differences") or []:
        if (rec.get("group1"), rec.get("group2")) != (WORSE, IMPROVED) and \
                rec.get("contrast") != f"{WORSE} vs {IMPROVED}":
            continue
        label = rec.get("label")
        points[("Worse vs Improved p", label, None)] = _point(rec.get("p"))
        points[("Worse vs Improved Cohen's d", label, None)] = _point(
            rec.get("cohen_d"), rec.get("d_ci_low"), rec.get("d_ci_high"))
    prediction = results.get("prediction") or {}
    for protocol in PROTOCOLS:
        block = prediction.get(protocol)
        if not isinstance(block, dict):
            continue
        metrics = block.get("metrics") or {}
        for measure in PREDICTION_MEASURES:
            m = metrics.get(measure) or {}
            points[(measure, None, protocol)] = _point(m.get("estimate"), m.get("ci_low"), m.get("ci_high"))
        a = block.get("auc") or {}
        points[("AUC", None, protocol)] = _point(a.get("auc"), a.get("ci_low"), a.get("ci_high"))
    return points


def _provenance(results):
    prov = results.get("provenance") or {}
    return prov.get("created"), prov.get("weights_sha256"), prov.get("preprocessing")


def _comparability(old, new):
    """(comparable, reason) of an old result against the new one."""
    _c, old_sha, old_pre = _provenance(old)
    _c, new_sha, new_pre = _provenance(new)
    reasons = []
    if old_sha is None or new_sha is None:
        which = " and ".join(w for w, s in (("previous", old_sha), ("new", new_sha)) if s is None)
        reasons.append(f"weights SHA-256 not recorded in the {which} result (scores given without weights?): "
                       f"previous {old_sha or 'unknown'}, new {new_sha or 'unknown'}; the same model cannot be confirmed")
    elif old_sha != new_sha:
        reasons.append(f"different weights: previous SHA-256 {old_sha}, new SHA-256 {new_sha}")
    if _canonical(old_pre) != _canonical(new_pre):
        keys = sorted(set((old_pre or {}).keys()) | set((new_pre or {}).keys())) \
            if isinstance(old_pre, dict) and isinstance(new_pre, dict) else []
        diffs = [f"{k}: {old_pre.get(k)!r} -> {new_pre.get(k)!r}" for k in keys if old_pre.get(k) != new_pre.get(k)]
        detail = "; ".join(diffs) if diffs else f"{old_pre!r} -> {new_pre!r}"
        reasons.append(f"different preprocessing ({detail})")
    targets = [str((r.get("prediction") or {}).get("positive_class") or WORSE) for r in (old, new)]
    if targets[0] != targets[1]:
        reasons.append(f"different prediction target: previous {targets[0]!r}, new {targets[1]!r} (--target)")
    if reasons:
        return False, "; ".join(reasons)
    return True, f"same weights (SHA-256 {new_sha}) and preprocessing"


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, default=str)


def _by_outcome(results):
    flow = results.get("flow") or {}
    return flow.get("by_outcome") or {}


def _added(new, old):
    rows = []
    new_b, old_b = _by_outcome(new), _by_outcome(old)
    for outcome in OUTCOMES:
        n, o = new_b.get(outcome) or {}, old_b.get(outcome) or {}
        row = {"outcome": outcome}
        for what in ("pairs", "patients"):
            nv, ov = n.get(what), o.get(what)
            row[f"{what}_old"], row[f"{what}_new"] = ov, nv
            row[f"{what}_added"] = (nv - ov) if isinstance(nv, int) and isinstance(ov, int) else None
        rows.append(row)
    nf, of = new.get("flow") or {}, old.get("flow") or {}
    total = {"outcome": "Total"}
    for what, key in (("pairs", "pairs_analysed"), ("patients", "patients_analysed")):
        nv, ov = nf.get(key), of.get(key)
        total[f"{what}_old"], total[f"{what}_new"] = ov, nv
        total[f"{what}_added"] = (nv - ov) if isinstance(nv, int) and isinstance(ov, int) else None
    rows.append(total)
    return rows


def _pair_key(rec):
    if rec.get("first_image") is not None and rec.get("second_image") is not None:
        return (str(rec.get("patient_id")), str(rec.get("first_image")), str(rec.get("second_image")))
    return (str(rec.get("patient_id")), "pair_id", str(rec.get("pair_id")))


def _pair_changes(new, old):
    new_pairs, old_pairs = new.get("pairs"), old.get("pairs")
    if not isinstance(new_pairs, list) or not isinstance(old_pairs, list):
        return None
    n = {_pair_key(r): r.get("outcome") for r in new_pairs}
    o = {_pair_key(r): r.get("outcome") for r in old_pairs}
    old_patients = {k[0] for k in o}
    added = [k for k in n if k not in o]
    removed = [k for k in o if k not in n]
    relabelled = [k for k in n if k in o and n[k] != o[k]]
    per_outcome = []
    for outcome in OUTCOMES:
        per_outcome.append({
            "outcome": outcome,
            "pairs_added": sum(1 for k in added if n[k] == outcome),
            "pairs_removed": sum(1 for k in removed if o[k] == outcome),
            "patients_added": len({k[0] for k in added if n[k] == outcome and k[0] not in old_patients}),
        })
    return {
        "pairs_added": len(added), "pairs_removed": len(removed), "pairs_relabelled": len(relabelled),
        "patients_added": len({k[0] for k in n} - old_patients),
        "relabelled": [{"patient_id": k[0], "pair": k[2] if k[1] == "pair_id" else f"{k[1]} -> {k[2]}",
                        "old_outcome": o[k], "new_outcome": n[k]} for k in relabelled],
        "by_outcome": per_outcome,
        "method": PAIR_CHANGES_METHOD,
    }


def _excludes(old_estimate, new_low, new_high):
    if old_estimate is None or new_low is None or new_high is None:
        return None
    return bool(old_estimate < new_low or old_estimate > new_high)


def compare(new, previous_list):
    """Set the new results beside earlier ones: the ``revalidation`` record.

    Parameters
    ----------
    new : dict
        The new ``results.json`` (docs/RESULTS.md), before ``revalidation``
        is added.
    previous_list : sequence of dict or path
        Earlier results, oldest first (a path is read with
        :func:`load_results`). The most recent is the last one.

    Returns
    -------
    dict
        ``previous`` [{path, created, weights_sha256, preprocessing,
        comparable, reason}], ``comparable`` (the most recent previous),
        ``added`` (rows per outcome group and Total: pairs/patients old, new,
        added), ``pair_changes`` (or None when a result has no ``pairs``),
        ``headline`` [{quantity, label, protocol, old_estimate, old_ci_low,
        old_ci_high, new_estimate, new_ci_low, new_ci_high,
        new_ci_excludes_old, change, comparable, note}], ``series``
        [{quantity, label, protocol, points: [{created, estimate, ci_low,
        ci_high, comparable, which}]}], ``warnings`` and ``method``.

    Notes
    -----
    ``new_ci_excludes_old`` is ``old_estimate < new_ci_low or old_estimate >
    new_ci_high``, None when a number is missing (a p-value has no CI). It
    is a descriptive flag, not a test: the validations share pairs (Altman &
    Bland 2003 give the test for independent estimates). ``change`` is new
    minus old. Rows of a result computed with other weights or
    preprocessing are kept, with ``comparable`` False.

    Raises
    ------
    ReportError
        When no previous result is given, or one cannot be read.
    """
    previous_list = [load_results(p) if isinstance(p, (str, Path)) else p for p in previous_list]
    if not previous_list:
        raise ReportError("no previous results to compare with -- give --previous OLD/results.json")
    warnings = []
    previous = []
    for i, old in enumerate(previous_list):
        created, sha, pre = _provenance(old)
        comparable, reason = _comparability(old, new)
        entry = {"created": created, "weights_sha256": sha, "preprocessing": pre,
                 "comparable": comparable, "reason": reason}
        path = old.get("_path") or (old.get("provenance") or {}).get("path")
        if path:
            entry = {"path": str(path), **entry}
        previous.append(entry)
    created_all = [p["created"] for p in previous] + [_provenance(new)[0]]
    if all(isinstance(c, str) for c in created_all) and created_all != sorted(created_all):
        warnings.append("the results are not in time order (previous oldest first, then the new one): "
                        + ", ".join(created_all))
    latest = previous_list[-1]
    latest_ok = previous[-1]["comparable"]

    new_points = _headline_points(new)
    old_points = _headline_points(latest)
    keys = list(new_points) + [k for k in old_points if k not in new_points]
    headline = []
    for key in keys:
        quantity, label, protocol = key
        o = old_points.get(key) or _point(None)
        n = new_points.get(key) or _point(None)
        note = None
        if key not in old_points:
            note = "not in the previous result"
        elif key not in new_points:
            note = "not in the new result"
        elif o["ci_low"] is None and n["ci_low"] is None and quantity.endswith(" p"):
            note = "a p-value has no CI"
        if not latest_ok:
            note = "not comparable: " + previous[-1]["reason"] + (f"; {note}" if note else "")
        change = n["estimate"] - o["estimate"] if n["estimate"] is not None and o["estimate"] is not None else None
        headline.append({
            "quantity": quantity, "label": label, "protocol": protocol,
            "old_estimate": o["estimate"], "old_ci_low": o["ci_low"], "old_ci_high": o["ci_high"],
            "new_estimate": n["estimate"], "new_ci_low": n["ci_low"], "new_ci_high": n["ci_high"],
            "new_ci_excludes_old": _excludes(o["estimate"], n["ci_low"], n["ci_high"]),
            "change": change, "comparable": latest_ok, "note": note,
        })

    all_points = [_headline_points(old) for old in previous_list] + [new_points]
    whens = [p["created"] for p in previous] + [_provenance(new)[0]]
    oks = [p["comparable"] for p in previous] + [True]
    which = [f"previous {i + 1}" for i in range(len(previous))] + ["new"]
    series = []
    for key in keys:
        quantity, label, protocol = key
        pts = []
        for pts_of, when, ok, w in zip(all_points, whens, oks, which):
            p = pts_of.get(key) or _point(None)
            pts.append({"created": when, **p, "comparable": ok, "which": w})
        series.append({"quantity": quantity, "label": label, "protocol": protocol, "points": pts})

    return {
        "previous": previous,
        "comparable": latest_ok,
        "added": _added(new, latest),
        "added_method": ADDED_METHOD,
        "pair_changes": _pair_changes(new, latest),
        "headline": headline,
        "series": series,
        "headline_protocol": (new.get("prediction") or {}).get("headline"),
        "method": EXCLUDES_METHOD,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------
# Figure


def trend_figure(revalidation, *, ncols=4):
    """The trend figure of a revalidation record: see :func:`covreport.figures.trend_figure`."""
    from covreport.figures import trend_figure as draw

    return draw(revalidation, ncols=ncols)
