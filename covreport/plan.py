"""How many pairs and patients a revalidation needs (``covreport plan DIR``; results.json ``sample_size``).

Read from a results folder (or from the results of a run in progress), for
the study's primary analyses:

- **accuracy** of the headline prediction protocol: the pairs for a target
  CI half-width of sensitivity and specificity at the observed prevalence
  (Buderer 1996) and of the AUC (Hanley-McNeil variance);
- **change** of each label between the two groups of every contrast: the
  power of the Mann-Whitney test at the observed probability of superiority
  for 1, 2, 5 and 10 times the pairs, and the pairs for the target power
  (Noether 1987), at alpha divided by the labels tested in the contrast
  (Bonferroni, the first step of the Holm adjustment the analysis uses);
- the **prediction model**: the minimum development size for its candidate
  predictors by the criteria of Riley et al. (BMJ 2020), the Cox-Snell
  R-squared anticipated from the cross-validated C-statistic (Riley, Van
  Calster & Collins 2021).

Each size for independent pairs is multiplied by the design effect measured
in this study (the patient-clustered over the independent variance), kept
between 1 and its largest value, at intra-patient correlation 1 (sum of
squared pairs per patient / pairs, Kish 1965), which is used where it cannot
be measured, and
converted to patients with the observed pairs per patient. An estimate at 0
or 1 gives no variance to plan on: the plan assumes its CI bound nearer 1/2
(:func:`covreport.stats.sample_size.planning_value`).

A submitted results.json is untrusted: every value is checked before it is
used, and a part that cannot be computed says why instead.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from covreport._io import OUTPUT_MARKER, atomic_write_text, check_out_file, written_files
from covreport.errors import StatsError
from covreport.inputs import safe_text
from covreport.stats import sample_size as ss
from covreport.stats.effect_sizes import _delong_var
from covreport.summary import ResultsError, read_results

#: Default targets (``covreport plan`` options and the report's section).
HALF_WIDTH = 0.05
POWER = 0.8
ALPHA = 0.05
SHRINKAGE = 0.9
#: Multiples of the current pairs at which each change contrast's power is given.
MULTIPLES = (1, 2, 5, 10)

ACCURACY_METHOD = (
    "pairs to estimate sensitivity and specificity to the target half-width of the 95% CI at the observed "
    "prevalence, z^2 p(1 - p)/(w^2 share) (Buderer 1996; as R epiR epi.ssdxsesp), and the AUC to that half-width "
    "of z x its Hanley-McNeil SE (Hanley & McNeil 1982); times the design effect measured in this study "
    "(for sensitivity and specificity the refitting patient bootstrap's, SE^2 / binomial variance; for the AUC "
    "Obuchowski's clustered over DeLong's variance), kept between 1 and its largest value, at intra-patient "
    "correlation 1 (sum of squared pairs per patient / pairs; Kish 1965), which is used where it is not "
    "measurable; patients = pairs / observed pairs per patient; an estimate of 0 or 1 is planned at its 95% CI "
    "bound nearer 1/2")
CHANGE_METHOD = (
    "power of the two-sided Mann-Whitney test at the observed probability of superiority theta and group "
    "fraction c, Phi(sqrt(12 c(1 - c) N / design effect) |theta - 1/2| - z), and the pairs for the target power, "
    "N = (z_alpha + z_beta)^2 / (12 c(1 - c)(theta - 1/2)^2) x design effect (Noether 1987), at alpha / the labels "
    "tested in the contrast (Bonferroni, the first step of Holm's adjustment); design effect = Obuchowski's "
    "clustered / DeLong's independent variance of theta, kept between 1 and its largest value (Kish 1965); "
    "theta 0 or 1 planned at its CI bound nearer 1/2")
MODEL_METHOD = (
    "minimum sample size to develop the prediction model (Riley et al. 2020, criteria and roundings of R "
    "pmsampsize 1.1.3): (1) expected shrinkage at least the target, (2) apparent and adjusted Nagelkerke "
    "R-squared within 0.05, (3) the outcome proportion within 0.05; the Cox-Snell R-squared anticipated from the "
    "cross-validated C-statistic under the binormal construction of Riley, Van Calster & Collins 2021 (computed "
    "by quadrature); candidate predictors = the features entering the model; Riley's size counts independent "
    "observations, so it is multiplied by the AUC's design effect for pairs")
REFERENCE = ("Buderer NMF. Acad Emerg Med 1996;3:895-900; Hanley JA, McNeil BJ. Radiology 1982;143:29-36; "
             "Noether GE. J Am Stat Assoc 1987;82:645-647; Riley RD et al. BMJ 2020;368:m441; "
             "Riley RD, Van Calster B, Collins GS. Stat Med 2021;40:859-864; Kish L. Survey Sampling, Wiley 1965")


class _Missing(Exception):
    """A value the plan needs is missing or invalid in results.json."""


def _num(obj, key, *, where, lo=None, hi=None, whole=False):
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Missing(f"results.json has no valid {where}.{key}")
    if whole and value != int(value):
        raise _Missing(f"{where}.{key} is not a whole number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _Missing(f"{where}.{key} = {value!r} is out of range")
    return int(value) if whole else float(value)


def _opt(obj, key, lo=None, hi=None):
    try:
        return _num(obj, key, where="", lo=lo, hi=hi)
    except _Missing:
        return None


def _dict(x):
    return x if isinstance(x, dict) else {}


def _kish(patient_ids):
    """Design effect at intra-patient correlation 1: sum of squared pairs per patient / pairs."""
    counts = Counter(patient_ids).values()
    n = sum(counts)
    return sum(c * c for c in counts) / n if n else None


def _design_effect(measured, largest):
    """The measured design effect, kept between 1 and its largest value at intra-patient correlation 1
    (clustering cannot inflate a variance more; a larger ratio is resampling noise or the variability of
    refitting, not clustering); the largest where none is measured."""
    if largest is None:
        raise _Missing("no design effect: the pairs' patients are not known")
    if measured is not None and math.isfinite(measured) and measured > 0:
        if measured > largest:
            return max(largest, 1.0), "measured, capped at the largest"
        return max(measured, 1.0), "measured"
    return max(largest, 1.0), "largest (intra-patient correlation 1)"


def _pair_rows(block):
    rows = block.get("pairs")
    out = []
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict) and isinstance(r.get("patient_id"), (str, int)) and isinstance(r.get("outcome"), str):
            out.append((str(r["patient_id"]), r["outcome"]))
    return out


def _planned(estimate, *records):
    """The planning value of an estimate: itself, or at 0 or 1 the bound nearer 1/2 of the first of
    ``records`` (the primary interval first) whose bound lies inside (0, 1)."""
    reason = "no interval recorded"
    for rec in records:
        rec = _dict(rec)
        value, source = ss.planning_value(estimate, _opt(rec, "ci_low", 0, 1), _opt(rec, "ci_high", 0, 1))
        if value is not None:
            return value, source
        reason = source
    if 0.0 < estimate < 1.0:
        return estimate, "estimate"
    raise _Missing(reason)


def _accuracy(block, pos, neg, t):
    n_pairs = _num(block, "n_pairs", where="prediction", lo=2, whole=True)
    n_patients = _num(block, "n_patients", where="prediction", lo=1, hi=n_pairs, whole=True)
    conf = _dict(block.get("confusion"))
    tp, fp, fn, tn = (_num(conf, k, where="prediction.confusion", lo=0, whole=True) for k in ("tp", "fp", "fn", "tn"))
    if tp + fp + fn + tn != n_pairs or tp + fn == 0 or fp + tn == 0:
        raise _Missing("prediction.confusion does not add up to n_pairs with both classes present")
    prevalence = (tp + fn) / n_pairs
    per_patient = n_pairs / n_patients
    pairs = _pair_rows(block)
    metrics, cvs = _dict(block.get("metrics")), _dict(block.get("cv_intervals"))
    rows = []
    for measure, share, cls in (("sensitivity", prevalence, pos), ("specificity", 1 - prevalence, neg)):
        rec, cv = _dict(metrics.get(measure)), _dict(cvs.get(measure))
        est = _num(rec, "estimate", where=f"prediction.metrics.{measure}", lo=0, hi=1)
        value, source = _planned(est, cv, rec)
        kish = _kish([p for p, o in pairs if o == cls])
        deff, deff_source = _design_effect(_opt(cv, "design_effect"), kish)
        n_ind = ss.diagnostic_n(value, share, t["half_width"], t["alpha"])
        rows.append(_size_row(measure, est, value, source, deff, deff_source, n_ind, per_patient))
    auc, auc_c = _dict(block.get("auc")), _dict(block.get("auc_clustered"))
    est = _num(auc, "auc", where="prediction.auc", lo=0, hi=1)
    value, source = _planned(est, cvs.get("auc"), auc_c, auc)
    se, se_c = _opt(auc, "se", 0), _opt(auc_c, "se", 0)
    measured = (se_c / se) ** 2 if se and se_c else None
    deff, deff_source = _design_effect(measured, _kish([p for p, _ in pairs]))
    n_ind = ss.auc_n(value, prevalence, t["half_width"], t["alpha"])
    rows.append(_size_row("auc", est, value, source, deff, deff_source, n_ind, per_patient))
    return {"n_pairs": n_pairs, "n_patients": n_patients, "pairs_per_patient": per_patient,
            "prevalence": prevalence, "positive_class": pos, "rows": rows, "unit": "pair",
            "method": ACCURACY_METHOD}


def _size_row(measure, estimate, value, source, deff, deff_source, n_independent, per_patient):
    pairs = math.ceil(n_independent * deff - 1e-9)
    return {"measure": measure, "estimate": estimate, "planning_value": value, "planning_source": source,
            "design_effect": deff, "design_effect_source": deff_source,
            "pairs_independent": math.ceil(n_independent - 1e-9), "pairs": pairs,
            "patients": math.ceil(pairs / per_patient - 1e-9)}


def _changes(results, t):
    rows = results.get("group_differences_clustered")
    if not isinstance(rows, list) or not rows:
        raise _Missing("results.json has no patient-clustered change analysis (group_differences_clustered)")
    listed = results.get("pairs")
    pairs = [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []
    tested = Counter(r.get("contrast") for r in rows if isinstance(r, dict) and r.get("status") == "tested")
    out = []
    for r in rows:
        if not isinstance(r, dict) or r.get("status") != "tested" or not isinstance(r.get("contrast"), str):
            continue
        contrast, label = r["contrast"], r.get("label")
        g1, g2 = r.get("group1"), r.get("group2")
        try:
            theta = _num(r, "theta", where="group_differences_clustered", lo=0, hi=1)
            n1 = _num(r, "n1", where="group_differences_clustered", lo=1, whole=True)
            n2 = _num(r, "n2", where="group_differences_clustered", lo=1, whole=True)
            clusters = _num(r, "clusters", where="group_differences_clustered", lo=1, whole=True)
            value, source = _planned(theta, r)
            if value == 0.5:
                raise _Missing("theta is 1/2: no effect to power")
            x = [p.get(f"{label} change") for p in pairs if p.get("outcome") == g1]
            y = [p.get(f"{label} change") for p in pairs if p.get("outcome") == g2]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in x + y)
            se_c = _opt(r, "se", 0)
            measured = None
            if finite and len(x) == n1 and len(y) == n2 and n1 > 1 and n2 > 1 and se_c:
                var = _delong_var(x, y)[1]
                measured = se_c ** 2 / var if var > 0 else None
            kish = _kish([str(p.get("patient_id")) for p in pairs if p.get("outcome") in (g1, g2)])
            deff, deff_source = _design_effect(measured, kish)
            n = n1 + n2
            c = n1 / n
            a = t["alpha"] / tested[contrast]
            per_patient = n / clusters
            power = [{"multiple": k, "pairs": k * n, "patients": math.ceil(k * clusters),
                      "power": ss.noether_power(value, c, k * n / deff, a)} for k in MULTIPLES]
            need = math.ceil(ss.noether_n(value, c, a, t["power"]) * deff - 1e-9)
            out.append({"contrast": contrast, "label": label, "theta": theta, "planning_value": value,
                        "planning_source": source, "n1": n1, "n2": n2, "clusters": clusters, "fraction": c,
                        "design_effect": deff, "design_effect_source": deff_source, "alpha_per_test": a,
                        "power_at": power, "pairs_for_power": need,
                        "patients_for_power": math.ceil(need / per_patient - 1e-9), "note": None})
        except (_Missing, StatsError) as exc:
            out.append({"contrast": contrast, "label": label, "note": safe_text(str(exc), limit=200)})
    return {"rows": out, "unit": "pair", "method": CHANGE_METHOD}


def _model(block, accuracy, t):
    epp = _dict(block.get("events_per_candidate_predictor"))
    parameters = _num(epp, "candidate_predictors", where="prediction.events_per_candidate_predictor", lo=1,
                      whole=True)
    prevalence = accuracy["prevalence"]
    auc_row = next(r for r in accuracy["rows"] if r["measure"] == "auc")
    c = auc_row["planning_value"]
    if block.get("informative") is False:
        raise _Missing("the headline protocol is not informative (it predicts one class for every pair or ranks "
                       "below chance): no C-statistic to plan the model on")
    if c <= 0.5:
        raise _Missing(f"the cross-validated C-statistic ({c:.3f}) is not above 0.5: no model to plan on")
    r2 = ss.cstatistic_to_r2(c, prevalence)
    res = ss.riley_binary(r2, parameters, prevalence, t["shrinkage"])
    deff = auc_row["design_effect"]
    pairs = math.ceil(res["n"] * deff - 1e-9)
    per_patient = accuracy["pairs_per_patient"]
    return {"candidate_predictors": parameters, "prevalence": prevalence, "cstatistic": auc_row["estimate"],
            "planning_value": c, "planning_source": auc_row["planning_source"], "r2_cs": r2,
            "max_r2_cs": res["max_r2"], "shrinkage": res["shrinkage"], "criteria": res["criteria"],
            "n_independent": res["n"], "events": res["events"], "events_per_parameter": res["events_per_parameter"],
            "design_effect": deff, "pairs": pairs, "patients": math.ceil(pairs / per_patient - 1e-9),
            "unit": "pair", "method": MODEL_METHOD}


def _check_targets(half_width, power, alpha, shrinkage):
    for name, v in (("half_width", half_width), ("power", power), ("alpha", alpha), ("shrinkage", shrinkage)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise StatsError(f"{name} must be between 0 and 1 (exclusive), got {v!r}")
    if power <= alpha:
        raise StatsError(f"power ({power}) must exceed alpha ({alpha})")
    return {"half_width": float(half_width), "power": float(power), "alpha": float(alpha),
            "shrinkage": float(shrinkage)}


def _part(fn, *args):
    try:
        return fn(*args)
    except (_Missing, StatsError) as exc:
        return {"not_available": safe_text(str(exc), limit=300)}


def make_plan(results, *, half_width=HALF_WIDTH, power=POWER, alpha=ALPHA, shrinkage=SHRINKAGE):
    """The sample-size plan of a results dict (the results.json of ``covreport run``).

    Parameters
    ----------
    results : dict
    half_width : float
        Target half-width of the 95% CIs of sensitivity, specificity and AUC.
    power : float
        Target power of each label's change contrast.
    alpha : float
        Two-sided significance level of the change contrasts (before dividing by the labels tested).
    shrinkage : float
        Target expected shrinkage of the prediction model (Riley criterion 1).

    Returns
    -------
    dict
        ``targets``, ``accuracy``, ``change``, ``model`` (each part holds
        ``not_available`` with the reason when it cannot be computed, else its
        ``method``), ``reference``.
    """
    t = _check_targets(half_width, power, alpha, shrinkage)
    pred = _dict(results.get("prediction"))
    name = pred.get("headline")
    block = _dict(pred.get(name)) if isinstance(name, str) else {}
    pos, neg = pred.get("positive_class"), pred.get("negative_class")
    plan = {"targets": t, "protocol": name if block else None}
    if block and isinstance(pos, str) and isinstance(neg, str):
        plan["accuracy"] = _part(_accuracy, block, pos, neg, t)
    else:
        plan["accuracy"] = {"not_available": "results.json has no prediction (headline protocol)"}
    plan["change"] = _part(_changes, results, t)
    if "not_available" in plan["accuracy"]:
        plan["model"] = {"not_available": plan["accuracy"]["not_available"]}
    else:
        plan["model"] = _part(_model, block, plan["accuracy"], t)
    plan["reference"] = REFERENCE
    return plan


def plan_folder(folder, **targets):
    """:func:`make_plan` of a results folder's results.json; returns ``(plan, path read)``."""
    results, path = read_results(folder)
    plan = make_plan(results, **targets)
    plan["results"] = str(path)
    return plan, path


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_plan(plan):
    """The plan as a plain-text table for the terminal."""
    t = plan["targets"]
    lines = [f"Sample size for revalidation ({safe_text(plan.get('results', 'results.json'))})",
             f"Targets: 95% CI half-width {t['half_width']:g}; power {t['power']:g} at two-sided alpha "
             f"{t['alpha']:g} / labels tested per contrast; shrinkage {t['shrinkage']:g}.", ""]
    acc = plan["accuracy"]
    if "not_available" in acc:
        lines += [f"Accuracy: not available ({acc['not_available']})", ""]
    else:
        lines.append(f"Accuracy of the {safe_text(str(plan['protocol']))} protocol: now {acc['n_pairs']:,} pairs of "
                     f"{acc['n_patients']:,} patients ({acc['pairs_per_patient']:.2f} pairs per patient), "
                     f"prevalence of {safe_text(acc['positive_class'])} {acc['prevalence']:.3f}")
        lines.append(f"  {'measure':<12} {'estimate':>8} {'planned on':>18} {'design eff.':>11} {'pairs':>8} "
                     f"{'patients':>9}")
        for r in acc["rows"]:
            lines.append(f"  {r['measure']:<12} {r['estimate']:>8.3f} {r['planning_value']:>7.3f} "
                         f"({r['planning_source']:>8}) {r['design_effect']:>11.2f} {r['pairs']:>8,} "
                         f"{r['patients']:>9,}")
        lines.append("")
    ch = plan["change"]
    if "not_available" in ch:
        lines += [f"Change of each label: not available ({ch['not_available']})", ""]
    else:
        contrasts = list(dict.fromkeys(r["contrast"] for r in ch["rows"]))
        for contrast in contrasts:
            rows = [r for r in ch["rows"] if r["contrast"] == contrast]
            first = next((r for r in rows if r.get("note") is None), None)
            head = " ".join(f"{'x' + str(k):>6}" for k in MULTIPLES)
            lines.append(f"Change of each label, {safe_text(contrast)}: power at x1..x10 the pairs; "
                         f"pairs for power {t['power']:g}")
            if first:
                lines.append(f"  (x1 = {first['n1'] + first['n2']:,} pairs of {first['clusters']:,} patients; "
                             f"alpha per test {first['alpha_per_test']:.4f})")
            lines.append(f"  {'label':<27} {'theta':>6} {'deff':>5} {head} {'pairs':>9} {'patients':>9}")
            for r in rows:
                label = safe_text(str(r["label"]), limit=27)
                if r.get("note"):
                    lines.append(f"  {label:<27} {r['note']}")
                    continue
                pw = " ".join(f"{p['power']:>6.2f}" for p in r["power_at"])
                lines.append(f"  {label:<27} {r['theta']:>6.3f} {r['design_effect']:>5.2f} {pw} "
                             f"{r['pairs_for_power']:>9,} {r['patients_for_power']:>9,}")
            lines.append("")
    mo = plan["model"]
    if "not_available" in mo:
        lines += [f"Prediction model: not available ({mo['not_available']})", ""]
    else:
        lines.append(f"Prediction model (Riley et al. 2020): {mo['candidate_predictors']:,} candidate predictors, "
                     f"prevalence {mo['prevalence']:.3f}, C {mo['planning_value']:.3f} ({mo['planning_source']}) "
                     f"-> Cox-Snell R2 {mo['r2_cs']:.3f} (largest {mo['max_r2_cs']:.2f})")
        lines.append(f"  {'criterion':<24} {'pairs':>9} {'shrinkage':>9} {'events':>9} {'EPP':>7}")
        for c in mo["criteria"]:
            lines.append(f"  {c['criterion']:<24} {c['n']:>9,} {c['shrinkage']:>9.3f} {c['events']:>9,.1f} "
                         f"{c['events_per_parameter']:>7.2f}")
        lines.append(f"  minimum: {mo['n_independent']:,} independent pairs; x design effect {mo['design_effect']:.2f} = "
                     f"{mo['pairs']:,} pairs ({mo['patients']:,} patients at the observed pairs per patient)")
        lines.append("")
    return "\n".join(lines)


def plan_rows(plan):
    """The plan as tidy rows (tables/sample_size.csv): one per measure, label and criterion."""
    rows = []
    for r in plan["accuracy"].get("rows", []):
        rows.append({"part": "accuracy", "contrast": None, "item": r["measure"], "estimate": r["estimate"],
                     "planning_value": r["planning_value"], "design_effect": r["design_effect"],
                     "pairs": r["pairs"], "patients": r["patients"], "note": None})
    for r in plan["change"].get("rows", []):
        rows.append({"part": "change", "contrast": r["contrast"], "item": r["label"], "estimate": r.get("theta"),
                     "planning_value": r.get("planning_value"), "design_effect": r.get("design_effect"),
                     "pairs": r.get("pairs_for_power"), "patients": r.get("patients_for_power"),
                     "note": r.get("note")})
    for c in plan["model"].get("criteria", []):
        rows.append({"part": "model", "contrast": None, "item": c["criterion"], "estimate": None,
                     "planning_value": plan["model"]["planning_value"], "design_effect": plan["model"]["design_effect"],
                     "pairs": math.ceil(c["n"] * plan["model"]["design_effect"] - 1e-9), "patients": None,
                     "note": f"{c['n']} independent pairs"})
    return rows


def plan_json(plan):
    """The plan as the text of plan.json (sorted keys, ASCII, newline at the end)."""
    return json.dumps(plan, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def write_plan(plan, results_path, out=None, *, force=False):
    """Write plan.json (default: beside results.json) whole; returns its path.

    An existing file is replaced only when the folder's covreport marker
    lists it (covreport wrote it) or with ``force``, and never when it is the
    results.json read. Written into a covreport output folder, plan.json is
    added to the marker's list, so that ``covreport run --force`` may replace
    the folder with it.
    """
    results_path = Path(results_path)
    out = Path(out) if out is not None else results_path.parent / "plan.json"
    folder = out.parent if str(out.parent) else Path(".")
    listed = written_files(folder)
    ours = listed is not None and out.name in listed and out.is_file() and not out.is_symlink()
    check_out_file(out, inputs=[results_path], force=force or ours, error_class=ResultsError)
    atomic_write_text(out, plan_json(plan), error_class=ResultsError)
    if listed is not None and out.name not in listed:
        marker = folder / OUTPUT_MARKER
        text = marker.read_text(encoding="utf-8")
        atomic_write_text(marker, text + ("" if text.endswith("\n") else "\n") + out.name + "\n",
                          error_class=ResultsError)
    return out


__all__ = ["ResultsError", "format_plan", "make_plan", "plan_folder", "plan_json", "write_plan"]
