"""Everything the templates see, derived from the results mapping."""

from __future__ import annotations

import json

from covreport.constants import IMPROVED, OUTCOMES, STABLE, WORSE
from covreport.errors import ReportError
from covreport.report.checklists import ai_checklist, stard_checklist
from covreport.report.format import REFERENCES
from covreport.report.limitations import limitations
from covreport.report.revalidation_view import revalidation_view
from covreport.report.summaries import (
    ALPHA, IMBALANCE_RATIO, SMALL_GROUP, WIDE_CI, _group_summary, _prediction_blocks, _threshold,
    _validation_summary,
)
from covreport.study import STUDY_FIELDS, validate_study

#: Reference categories (the reference standard's outcome definitions).
OUTCOME_DEFINITIONS = {
    WORSE: "new or increased radiological findings on the second CXR compared with the first",
    STABLE: "no change in radiological findings between the two CXRs",
    IMPROVED: "decreased radiological findings on the second CXR compared with the first",
}

def _recorded_methods(results):
    """Every distinct ``method`` string stored in the results, with where it was used."""
    seen = {}

    def add(where, m):
        if m:
            seen.setdefault(str(m), [])
            if where not in seen[str(m)]:
                seen[str(m)].append(where)

    for r in results.get("validation_auc") or []:
        add("validation AUC", r.get("method"))
    for r in results.get("group_differences") or []:
        for k in ("mw_method", "d_method", "method"):
            add("group differences", r.get(k))
    for r in results.get("table1") or []:
        for k in ("p_age_method", "p_age_welch_method", "p_sex_method"):
            add("Table 1", r.get(k))
    iv = results.get("interval_days") or {}
    add("interval between CXRs", iv.get("method"))
    for b in _prediction_blocks(results):
        add(f"prediction ({b['name']})", b["block"].get("method"))
        add(f"prediction ({b['name']})", (b["block"].get("auc") or {}).get("method"))
        for rec in (b["block"].get("metrics") or {}).values():
            add(f"prediction ({b['name']})", rec.get("method"))
    rev = results.get("revalidation") or {}
    for m in (rev.get("method"), rev.get("added_method"), (rev.get("pair_changes") or {}).get("method")):
        add("comparison with the previous validation", m)
    return [{"method": m, "where": ", ".join(w)} for m, w in seen.items()]


def _footnotes(rows, keys):
    """Letters for the distinct method strings of ``keys`` in ``rows``: ({method: letter}, [(letter, method)])."""
    letters = {}
    for r in rows:
        for k in keys:
            m = r.get(k)
            if m and m not in letters:
                letters[m] = "abcdefghijklmnopqrstuvwxyz"[len(letters) % 26]
    return letters, [(v, k) for k, v in letters.items()]


def _kv(mapping):
    """A flat list of (key, text) from a nested mapping, for provenance tables."""
    out = []
    for k, v in (mapping or {}).items():
        if isinstance(v, dict):
            out += [(f"{k}.{k2}", v2) for k2, v2 in _kv(v)]
        elif isinstance(v, (list, tuple)):
            out.append((str(k), ", ".join(str(x) for x in v)))
        else:
            out.append((str(k), "not recorded" if v is None else str(v)))
    return out


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"results hold a {type(obj).__name__}, which results.json cannot store")


def plain_results(results):
    """The results as results.json would hold them: plain Python types (numpy values converted)."""
    try:
        return json.loads(json.dumps(results, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ReportError(f"the results cannot be reported: {exc}") from exc


def running_title(title, limit=80):
    """The title shortened at a word boundary to fit the running header on one line."""
    title = " ".join(str(title).split())
    if len(title) <= limit:
        return title
    cut = title[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + "\u2026"


def build_context(results, *, figures=None, cams_note=None, has_cams=False):
    """Everything the templates see, derived from the results mapping.

    Keys (documented for institutions writing their own templates): ``r`` (the
    results as given), ``study`` (validated study fields), ``title``,
    ``synthetic``, ``figures`` (``{stem: {"uri"}}``), ``blocks`` (prediction
    protocols, headline first), ``limitations``, ``checklist``, ``ai_items``,
    ``methods`` (recorded method strings), ``references``, ``t1_notes``,
    ``t2_notes``, ``validation`` (summary), ``groups`` (summary),
    ``threshold``, ``provenance`` tables, ``cams_note``, ``outcome_defs``,
    ``reval`` (:func:`revalidation_view`: what moved since the last
    validation, or None without ``--previous``).
    """
    results = plain_results(results)
    study = validate_study(results.get("study") or {}, source="results['study']")
    results["study"] = study
    prov = results.get("provenance") or {}
    blocks = _prediction_blocks(results)
    t1 = results.get("table1") or []
    t1_letters, t1_notes = _footnotes(t1, ("p_age_method", "p_age_welch_method", "p_sex_method"))
    metric_recs = [dict((b["block"].get("metrics") or {}), auc=b["block"].get("auc") or {}) for b in blocks]
    metric_rows = [{"method": rec.get("method")} for recs in metric_recs for rec in recs.values()]
    metric_letters, metric_notes = _footnotes(metric_rows, ("method",))
    note_marks = {}
    for recs in metric_recs:
        for rec in recs.values():
            if rec.get("note") and rec["note"] not in note_marks:
                note_marks[rec["note"]] = str(len(note_marks) + 1)
    gd = results.get("group_differences") or []
    contrasts = []
    for r in gd:
        if r.get("contrast") not in contrasts:
            contrasts.append(r.get("contrast"))
    inputs = prov.get("inputs") or {}
    reviewer_mode = "scores" in inputs or not prov.get("weights_sha256")
    model = prov.get("model") or {}
    training = model.get("training") if isinstance(model.get("training"), dict) else None
    architecture = (training or {}).get("architecture") or "DenseNet121"
    title = study.get("title") or ("Tracking and predicting COVID-19 radiological trajectory on chest X-rays "
                                   "with a CheXpert-trained DenseNet121")
    return {
        "r": results,
        "study": study,
        "study_fields": STUDY_FIELDS,
        "title": title,
        "synthetic": bool(prov.get("synthetic")),
        "labels": results.get("labels") or [],
        "flow": results.get("flow") or {},
        "figures": figures or {},
        "blocks": blocks,
        "headline": blocks[0] if blocks else None,
        "threshold": _threshold(blocks[0]["block"]) if blocks else None,
        "limitations": limitations(results),
        "checklist": stard_checklist(results),
        "ai_items": ai_checklist(results, has_cams=has_cams),
        "methods": _recorded_methods(results),
        "references": [{"n": i + 1, "key": k, "text": v} for i, (k, v) in enumerate(REFERENCES.items())],
        "t1_letters": t1_letters,
        "t1_notes": t1_notes,
        "t1_counted_by": sorted({str(row.get("counted_by")) for row in t1 if row.get("counted_by")}),
        "t1_reference": any("chexpert" in str(row.get("group", "")).lower() or row.get("counted_by") == "CSV row"
                            for row in t1),
        "metric_letters": metric_letters,
        "metric_notes": metric_notes,
        "note_marks": note_marks,
        "running_title": running_title(title),
        "contrasts": contrasts,
        "validation": _validation_summary(results),
        "groups": _group_summary(results),
        "provenance": prov,
        "inputs": inputs,
        "reviewer_mode": reviewer_mode,
        "architecture": architecture,
        "training": _kv(training) if training else ([("training", str(model["training"]))]
                                                     if model.get("training") else []),
        "preprocessing": _kv(prov.get("preprocessing")) if isinstance(prov.get("preprocessing"), dict) else [],
        "packages": sorted((prov.get("packages") or {}).items()),
        "cams_note": cams_note,
        "reval": revalidation_view(results),
        "outcome_defs": OUTCOME_DEFINITIONS,
        "outcomes": OUTCOMES,
        "WORSE": WORSE, "STABLE": STABLE, "IMPROVED": IMPROVED,
        "thresholds": {"small": SMALL_GROUP, "wide": WIDE_CI, "imbalance": IMBALANCE_RATIO, "alpha": ALPHA},
    }


