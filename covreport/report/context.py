"""Everything the templates see, derived from the results mapping."""

from __future__ import annotations

import json
import re
from pathlib import PurePath

from covreport.constants import IMPROVED, OUTCOMES, STABLE, WORSE
from covreport.errors import ReportError
from covreport.figures import projection_counts
from covreport.report.checklists import (
    claim_checklist, reviewer_mode, stard_ai_checklist, stard_checklist, tripod_checklist,
)
from covreport.report.format import METRIC_NAMES, current_style
from covreport.report.limitations import limitations
from covreport.report.revalidation_view import revalidation_view
from covreport.report.training import training_text
from covreport.stats.clustered import SIMULATION_CHECK
from covreport.report.summaries import (
    ALPHA, IMBALANCE_RATIO, SMALL_GROUP, WIDE_CI, _group_summary, endpoint_summary, _prediction_blocks, _threshold,
    _validation_summary, mixed_summary,
)
from covreport.study import STUDY_FIELDS, validate_study

#: Reference categories (the reference standard's outcome definitions).
OUTCOME_DEFINITIONS = {
    WORSE: "new or increased radiological findings on the second CXR compared with the first",
    STABLE: "no change in radiological findings between the two CXRs",
    IMPROVED: "decreased radiological findings on the second CXR compared with the first",
}

#: Where a method string of results.json is used, by its top-level key (see :func:`_recorded_methods`).
METHOD_PLACES = {
    "validation_auc": "validation AUC", "group_differences": "group differences, pairs as units",
    "group_differences_clustered": "group differences, patients as clusters", "table1": "Table 1",
    "table1_patients": "Table 1b", "table1_predictors": "Table 1c", "interval_days": "interval between CXRs",
    "bootstrap": "cluster bootstrap",
    "decision_curve": "decision curve", "revalidation": "comparison with the previous validation",
    "mixed_model": "mixed model (sensitivity analysis)", "trend_test": "trend test (sensitivity analysis)",
    "subgroups": "subgroup performance", "failure_analysis": "failure analysis",
    "patient_separation": "patient separation", "class_activation_maps": "class activation maps",
    "projection_changes": "projection changes", "sample_size": "sample size for revalidation",
}
#: Sub-records of a prediction block, in words.
_PREDICTION_PARTS = {"cv_intervals": "intervals refitting the protocol", "permutation_monte_carlo": "permutation test",
                     "permutation_method": "permutation test", "informative_method": "not informative",
                     "threshold": "classification threshold", "auc_clustered": "AUC, patients as clusters",
                     "calibration": "calibration", "tuning": "tuning", "final_model": "final model",
                     "events_per_candidate_predictor": "events per candidate predictor"}


#: What a method key other than ``method`` describes.
_METHOD_KEYS = {"mw_method": "Mann-Whitney P", "p_method": "P", "hl_method": "Hodges-Lehmann shift",
                "hl_ci_method": "Hodges-Lehmann CI", "d_method": "Cohen's d (results.json and CSV)",
                "g_method": "Hedges' g", "rb_method": "rank-biserial r", "smd_method": "standardised differences",
                "p_age_method": "P, age", "p_age_welch_method": "P, age (Welch)", "p_sex_method": "P, sex",
                "ci_method": "CI", "control_method": "control"}


def _places(where):
    """``where`` entries with the prediction blocks of one part merged: "prediction (penalised, nested), calibration"."""
    out, blocks = [], {}
    for w in where:
        m = re.fullmatch(r"prediction \((\w+)\)(, .*)?", w)
        if not m:
            out.append(w)
            continue
        part = m.group(2) or ""
        if part not in blocks:
            blocks[part] = []
            out.append(("prediction", part))
        blocks[part].append(m.group(1))
    return ", ".join(w if isinstance(w, str) else f"prediction ({', '.join(blocks[w[1]])}){w[1]}" for w in out)


def _recorded_methods(results):
    """Every distinct method string stored in the results (any key ending in ``method``), with where it is used.

    The walk covers every record, so a new analysis appears in Appendix E without a line here; the
    per-pair lists and the provenance hold no methods and are skipped. Table 1's P-value methods are
    listed only when its P values are shown (``--table1-tests``).
    """
    seen = {}
    t1_tests = bool(((results.get("provenance") or {}).get("report_options") or {}).get("table1_tests"))

    def add(where, m):
        seen.setdefault(str(m), [])
        if where not in seen[str(m)]:
            seen[str(m)].append(where)

    def walk(obj, where):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "pairs":
                    continue
                if k.endswith("method") and isinstance(v, str) and v:
                    if not t1_tests and where.startswith("Table 1") and k.startswith("p_"):
                        continue
                    if k == "informative_method" and obj.get("informative") is not False:
                        continue
                    part = _PREDICTION_PARTS.get(k) or _METHOD_KEYS.get(k)
                    add(where + (f", {part}" if part else ""), v)
                elif isinstance(v, (dict, list)):
                    part = _PREDICTION_PARTS.get(k) if where.startswith("prediction") else None
                    walk(v, f"{where}, {part}" if part and part not in where else where)
        elif isinstance(obj, list):
            for item in obj:
                walk(item, where)

    for top, value in results.items():
        if top in ("provenance", "study", "pairs") or not isinstance(value, (dict, list)):
            continue
        if top == "class_activation_maps" and reviewer_mode(results):
            continue  # no maps are drawn without the model, so their method was not used
        if top == "prediction" and isinstance(value, dict):
            for b in _prediction_blocks(results):
                walk(b["block"], f"prediction ({b['name']})")
            continue
        walk(value, METHOD_PLACES.get(top, top.replace("_", " ")))
    return [{"method": m, "where": _places(w)} for m, w in seen.items()]


def calibration_gaps(blocks):
    """Where each block's flexible calibration curve is farthest from the diagonal: {name: {probability, observed}}.

    ICI and E50 average the gap over the pairs, so a gap where few pairs lie (often in the middle of the range)
    weighs little in them; the report names its place beside them.
    """
    out = {}
    for b in blocks:
        curve = (b["block"].get("calibration") or {}).get("curve") or {}
        p, o = curve.get("probability") or [], curve.get("observed") or []
        pts = [(abs(oi - pi), pi, oi) for pi, oi in zip(p, o) if oi is not None and pi is not None]
        if pts:
            gap, pi, oi = max(pts)
            out[b["name"]] = {"gap": gap, "probability": pi, "observed": oi}
    return out


def predictor_table(rows):
    """Table 1c's layout: the groups (columns) and one line per numeric predictor or categorical level."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    lines = {}
    for r in rows:
        line = lines.setdefault((r["predictor"], r.get("level")), {"predictor": r["predictor"], "kind": r["kind"],
                                                                   "level": r.get("level"), "cells": {}})
        line["cells"][r["group"]] = r
    lines = list(lines.values())
    for i, line in enumerate(lines):     # a categorical predictor's last level carries its missing count
        line["last"] = i + 1 == len(lines) or lines[i + 1]["predictor"] != line["predictor"]
        line["missing"] = any((c.get("missing") or 0) > 0 for c in line["cells"].values())
    return {"groups": groups, "lines": lines, "missing": any(line["missing"] for line in lines)}


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


_ABSOLUTE = re.compile(r"""(?<![\w.])(?:/|~/|[A-Za-z]:[\\/])[^\s'"]*""")


def display_path(path):
    """A path as the report shows it: relative paths as given, absolute ones as their file name.

    The report never shows an absolute local path (it names the author's
    folders and would differ between machines); the SHA-256 beside every
    input identifies the file.
    """
    text = str(path or "")
    if not text:
        return ""
    if _ABSOLUTE.fullmatch(text):
        return PurePath(text.replace("\\", "/")).name or text
    return text


def scrub_paths(text):
    """``text`` with every absolute path replaced by its file name (for the recorded command)."""
    return _ABSOLUTE.sub(lambda m: display_path(m.group(0)), str(text or ""))


def _mw_methods_text(rows):
    """How the Mann-Whitney p-values were computed, in words, with the number of tests of each kind."""
    counts = {}
    for r in rows:
        m = str(r.get("mw_method") or "").strip()
        if m:
            counts[m] = counts.get(m, 0) + 1
    if not counts:
        return "as stated in the test's method"
    words = {"exact": "exactly (the exact distribution of U)",
             "asymptotic": "by the normal approximation with continuity correction",
             "normal": "by the normal approximation with continuity correction"}
    parts = [f"{words.get(m.lower(), m)} for {n} of {len(rows)} tests" if len(counts) > 1 else words.get(m.lower(), m)
             for m, n in counts.items()]
    return "; ".join(parts)


def _marks(notes):
    marks = {}
    for n in notes:
        if n and n not in marks:
            marks[n] = str(len(marks) + 1)
    return marks


#: Row names of the prediction measures in the tables.
METRIC_TITLES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "sensitivity": "Sensitivity",
                 "specificity": "Specificity", "ppv": "Positive predictive value",
                 "npv": "Negative predictive value", "lr_positive": "Positive likelihood ratio",
                 "lr_negative": "Negative likelihood ratio", "auc": "AUC"}

#: Excluded pairs (and reasons) listed in the report; tables/exclusions.csv holds them all.
EXCLUSIONS_SHOWN = 50

#: Figures in the order they appear in the report (numbered in this order when present).
FIGURE_ORDER = ("flow_diagram", "roc_curves", "change_boxplots", "calibration", "decision_curve",
                "added_value_decision_curve", "site_forest", "site_forest_iecv",
                "class_activation_maps",
                "revalidation_trend")


#: Thresholds of the decision-curve table (with the classification threshold added).
DCA_SHOWN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def decision_view(results, blocks, threshold=None):
    """What the decision-curve section shows: per protocol (report order) its rows at :data:`DCA_SHOWN`.

    Returns None without a ``decision_curve`` record; else ``{"method", "resamples", "seed", "level",
    "protocols": [{"name", "short", "headline", "prevalence", "useful", "rows"}], "thresholds"}``.
    """
    rec = results.get("decision_curve")
    if not isinstance(rec, dict) or not rec.get("rows"):
        return None
    shown = sorted(set(DCA_SHOWN) | ({round(float(threshold), 2)} if threshold is not None else set()))
    short = {b["name"]: b["short"] for b in blocks}
    order = [b["name"] for b in blocks] + [n for n in (rec.get("protocols") or {}) if n not in short]
    protocols = []
    for name in order:
        rows = {round(float(r["threshold"]), 2): r for r in rec["rows"] if r.get("protocol") == name}
        if not rows:
            continue
        summary = (rec.get("protocols") or {}).get(name) or {}
        protocols.append({"name": name, "short": short.get(name, name),
                          "headline": bool(blocks) and name == blocks[0]["name"],
                          "prevalence": summary.get("prevalence"), "useful": summary.get("useful") or [],
                          "n_useful": summary.get("n_useful"),
                          "rows": [rows[t] for t in shown if t in rows]})
    return {"method": rec.get("method"), "resamples": rec.get("resamples"), "seed": rec.get("seed"),
            "level": rec.get("level"), "protocols": protocols, "thresholds": shown}


def running_title(title, limit=80):
    """The title shortened at a word boundary to fit the running header on one line."""
    title = " ".join(str(title).split())
    if len(title) <= limit:
        return title
    cut = title[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + "\u2026"


def build_context(results, *, figures=None, cams_note=None, has_cams=False, cams_info=None):
    """Everything the templates see, derived from the results mapping.

    Keys (documented for institutions writing their own templates): ``r`` (the
    results as given), ``study`` (validated study fields), ``title``,
    ``synthetic``, ``figures`` (``{stem: {"uri"}}``), ``blocks`` (prediction
    protocols, headline first), ``limitations``, ``checklist``, ``tripod`` (TRIPOD+AI rows, [] without prediction), ``claim`` and ``stard_ai`` (CLAIM 2024, STARD-AI rows),
    ``methods`` (recorded method strings), ``references``, ``t1_notes``,
    ``t2_notes``, ``validation`` (summary), ``groups`` (summary), ``endpoint`` (the primary endpoint
    and the multiplicity families, :func:`endpoint_summary`), ``contrasts`` (primary first),
    ``threshold``, ``provenance`` tables, ``cams_note``, ``outcome_defs``,
    ``reval`` (:func:`revalidation_view`: what moved since the last
    validation, or None without ``--previous``), ``style`` (the number style,
    :mod:`covreport.report.format`; the filters follow it).
    """
    results = plain_results(results)
    # The text on the activation maps comes from results.json when it holds the record (so that a report
    # rendered again from results.json alone, e.g. by `covreport verify`, reads the same).
    cam_record = results.get("class_activation_maps") if isinstance(results.get("class_activation_maps"), dict) else {}
    cam_pairs = [dict(p, label=cam_record.get("label")) for p in cam_record.get("pairs") or []] or \
        plain_results(list(cams_info or []))
    cam_rule = cam_record.get("rule") or next((c.get("rule") for c in cams_info or [] if c.get("rule")), None)
    reviewer = reviewer_mode(results)
    cams_expected = bool(has_cams or (cam_record.get("pairs") and not reviewer))
    has_cams = cams_expected
    study = validate_study(results.get("study") or {}, source="results['study']")
    results["study"] = study
    prov = results.get("provenance") or {}
    blocks = _prediction_blocks(results)
    t1 = results.get("table1") or []
    t1_tests = bool((prov.get("report_options") or {}).get("table1_tests"))
    t1_letters, t1_notes = _footnotes(t1, ("p_age_welch_method", "p_sex_method") if t1_tests else ())
    metric_recs = [dict((b["block"].get("metrics") or {}), auc=b["block"].get("auc") or {},
                        auc_clustered=b["block"].get("auc_clustered") or {}) for b in blocks]
    metric_rows = [{"method": rec.get("method")} for recs in metric_recs for rec in recs.values()]
    metric_letters, metric_notes = _footnotes(metric_rows, ("method",))
    note_marks = {}
    for recs in metric_recs:
        for rec in recs.values():
            if rec.get("note") and rec["note"] not in note_marks:
                note_marks[rec["note"]] = str(len(note_marks) + 1)
    gd = results.get("group_differences") or []
    counts = sorted((results.get("flow") or {}).get("exclusion_counts") or [],
                    key=lambda c: (-(c.get("pairs") or 0), str(c.get("stage")), str(c.get("reason"))))
    t1p = results.get("table1_patients") or []
    t1p_letters, t1p_notes = _footnotes(t1p, ("p_age_welch_method", "p_sex_method") if t1_tests else ())
    boot = results.get("bootstrap") or {}
    boot_gd = {(b.get("contrast"), b.get("label"), b.get("quantity")): b for b in boot.get("group_differences") or []}
    boot_pred = boot.get("prediction") or {}
    boot_keys = []
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "auc"):
        if any(name in (boot_pred.get(b["name"]) or {}) for b in blocks):
            boot_keys.append(name)
    for recs in boot_pred.values():
        boot_keys += [k for k in recs if k not in boot_keys]
    mw_rules = sorted({str(r["mw_rule"]) for r in gd if r.get("mw_rule")})
    figure_numbers = {}
    for stem in FIGURE_ORDER:
        if stem in (figures or {}) or (stem == "class_activation_maps" and cams_expected):
            figure_numbers[stem] = len(figure_numbers) + 1
    endpoint = endpoint_summary(results)
    pos = str((results.get("prediction") or {}).get("positive_class") or WORSE)
    neg = str((results.get("prediction") or {}).get("negative_class") or IMPROVED)
    dca = decision_view(results, blocks, ((blocks[0]["block"].get("threshold") or {}).get("value")
                                          if blocks else None))
    def any_block_has(key):
        return any(b["block"].get(key) is not None for b in blocks)

    shown = (("cv", any_block_has("cv_intervals")), ("cluster", bool(boot_pred) and not any_block_has("cv_intervals")),
             ("calibration", any_block_has("calibration")), ("net_benefit", bool(dca)),
             ("added_value", bool((results.get("added_value") or {}).get("models"))),
             ("sites", bool((results.get("sites") or {}).get("rows"))))
    t4 = {}
    for name, present in shown:                  # the prediction tables after Table 4, lettered as they appear
        if present:
            t4[name] = f"4{'bcdefg'[len(t4)]}"
    inputs = prov.get("inputs") or {}
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
        "threshold": (((blocks[0]["block"].get("threshold") or {}).get("value")
                       or _threshold(blocks[0]["block"], pos)) if blocks else None),
        "threshold_record": (blocks[0]["block"].get("threshold") or None) if blocks else None,
        "dca": dca,
        "t4": t4,
        "limitations": limitations(results),
        "checklist": stard_checklist(results),
        "claim": claim_checklist(results),
        "stard_ai": stard_ai_checklist(results),
        "tripod": tripod_checklist(results) if results.get("prediction") else [],
        "methods": _recorded_methods(results),
        "t1_letters": t1_letters,
        "t1_tests": t1_tests,
        "t1_notes": t1_notes,
        "t1_counted_by": sorted({str(row.get("counted_by")) for row in t1 if row.get("counted_by")}),
        "t1_reference": any("chexpert" in str(row.get("group", "")).lower() or row.get("counted_by") == "CSV row"
                            for row in t1),
        "metric_letters": metric_letters,
        "metric_notes": metric_notes,
        "note_marks": note_marks,
        "primary": results.get("primary_analysis") or None,
        "mw_rule": "; ".join(mw_rules),
        "mw_methods_text": _mw_methods_text(gd),
        "t1p_letters": t1p_letters,
        "t1_predictors": predictor_table(results.get("table1_predictors") or []),
        "t1p_notes": t1p_notes,
        "cal_gaps": calibration_gaps(blocks),
        "boot_gd": boot_gd,
        "clustered_check": SIMULATION_CHECK,
        "hl_levels": [g["hl_conf_level"] for g in gd if g.get("hl_ci_method") == "exact"
                      and isinstance(g.get("hl_conf_level"), (int, float))],
        "boot_pred": boot_pred,
        "boot_pred_keys": boot_keys,
        "metric_names": METRIC_NAMES,
        "metric_titles": METRIC_TITLES,
        "clustered_note_marks": _marks(r.get("note") for r in results.get("group_differences_clustered") or []),
        "projection": {("All pairs" if k == "All" else k): v for k, v in projection_counts(results).items()},
        "clustered_tested": next((g for g in results.get("group_differences_clustered") or [] if g.get("p_method")),
                                 {}),
        "pair_note_marks": _marks(r.get("note") for r in gd),
        "mixed_note_marks": _marks(r.get("note") for r in results.get("mixed_model") or []),
        "any_block_has": any_block_has,
        "any_metric": lambda key: any(key in (b["block"].get("metrics") or {}) for b in blocks),
        "fig_no": figure_numbers,
        "running_title": running_title(title),
        "contrasts": endpoint["order"],
        "endpoint": endpoint,
        "mixed_view": mixed_summary(results, endpoint),
        "validation": _validation_summary(results),
        "groups": _group_summary(results),
        "provenance": prov,
        "inputs": inputs,
        "reviewer_mode": reviewer,
        "architecture": architecture,
        "training": _kv(training) if training else ([("training", str(model["training"]))]
                                                     if model.get("training") else []),
        "preprocessing": _kv(prov.get("preprocessing")) if isinstance(prov.get("preprocessing"), dict) else [],
        "packages": sorted((prov.get("packages") or {}).items()),
        "training_text": training_text(results),
        "cams_note": cams_note,
        "exclusions_shown": list((results.get("flow") or {}).get("exclusions") or [])[:EXCLUSIONS_SHOWN],
        "exclusion_counts_shown": counts[:EXCLUSIONS_SHOWN],
        "exclusion_counts_more": ({"reasons": len(counts) - EXCLUSIONS_SHOWN,
                                   "pairs": sum(c.get("pairs") or 0 for c in counts[EXCLUSIONS_SHOWN:])}
                                  if len(counts) > EXCLUSIONS_SHOWN else None),
        "cams_info": cam_pairs,
        "cams_rule": cam_rule,
        "cams_expected": cams_expected,
        "reval": revalidation_view(results),
        "outcome_defs": OUTCOME_DEFINITIONS,
        "outcomes": OUTCOMES,
        "WORSE": WORSE, "STABLE": STABLE, "IMPROVED": IMPROVED,
        # The prediction's classes: Worse and Improved, or a clinical target's (--target; prediction_target)
        "POS": pos, "NEG": neg, "target": results.get("prediction_target") or None,
        "thresholds": {"small": SMALL_GROUP, "wide": WIDE_CI, "imbalance": IMBALANCE_RATIO, "alpha": ALPHA},
        "style": current_style(),
    }


