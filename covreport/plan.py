"""How many pairs and patients a revalidation needs (``covreport plan DIR``; results.json ``sample_size``).

Read from a results folder (or from the results of a run in progress), for
the study's primary analyses:

- **accuracy** of the headline prediction protocol: the pairs for a target
  CI half-width of sensitivity and specificity at the observed prevalence
  (Buderer 1996) and of the AUC (Hanley-McNeil variance);
- **change** of each label between the two groups of every contrast: the
  power of the Mann-Whitney test at the observed probability of superiority
  for 2, 5 and 10 times the pairs, and the pairs for the target power
  (Noether 1987), at alpha divided by the labels tested in the contrast
  (Bonferroni, the first step of the Holm adjustment the analysis uses);
- the **prediction model**: the minimum size to develop it anew (as a
  revalidation does in every fold) for its candidate predictors by the
  criteria of Riley et al. (BMJ 2020), the Cox-Snell R-squared anticipated
  from the cross-validated C-statistic (Riley, Van Calster & Collins 2021).

Each size for independent pairs is multiplied by the design effect measured
in this study (the patient-clustered over the independent variance), kept
between 1 and its largest value, at intra-patient correlation 1 (sum of
squared pairs per patient / pairs, Kish 1965), which is used where it cannot
be measured, and converted to patients with the observed pairs per patient.
Every size is given at the estimate and, conservatively, at the value of its
95% CI nearest 1/2 (:func:`covreport.stats.sample_size.conservative_value`);
at an estimate of 0 or 1 a precision has no variance to plan on, so only the
conservative size is given. No power is given at the current size: it is a
transform of the observed P (Hoenig & Heisey 2001).

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
from covreport.stats._util import kish_design_effect
from covreport.stats.effect_sizes import _delong_var
from covreport.summary import ResultsError, _dict, read_results

#: Default targets (``covreport plan`` options and the report's section).
HALF_WIDTH = 0.05
POWER = 0.8
ALPHA = 0.05
SHRINKAGE = 0.9
#: Multiples of the current pairs at which each change contrast's power is given.
MULTIPLES = (2, 5, 10)

ACCURACY_METHOD = (
    "pairs to estimate sensitivity and specificity to the target half-width of the 95% CI at the observed "
    "prevalence, z^2 p(1 - p)/(w^2 share) (Buderer 1996; as R epiR epi.ssdxsesp), and the AUC to that half-width "
    "of z x its Hanley-McNeil SE (Hanley & McNeil 1982), each at the estimate (none at 0 or 1, where the "
    "variance is 0) and, conservatively, at the value of its primary 95% CI nearest 1/2; times the design effect "
    "measured in this study (for sensitivity and specificity the refitting patient bootstrap's, SE^2 / binomial "
    "variance; for the AUC Obuchowski's clustered over DeLong's variance), kept between 1 and its largest value, "
    "at intra-patient correlation 1 (sum of squared pairs per patient / pairs; Kish 1965), which is used where it "
    "is not measurable; patients = pairs / observed pairs per patient")
CHANGE_METHOD = (
    "power of the two-sided Mann-Whitney test at the observed probability of superiority theta and group "
    "fraction c, Phi(sqrt(12 c(1 - c) N / design effect) |theta - 1/2| - z), for 2, 5 and 10 times the pairs "
    "(not at the current size: that power is a transform of the observed P, Hoenig & Heisey 2001), and the pairs "
    "for the target power, N = (z_alpha + z_beta)^2 / (12 c(1 - c)(theta - 1/2)^2) x design effect (Noether 1987; "
    "it takes the variance of the statistic under the null, so it is approximate far from theta = 1/2), at theta "
    "and at the value of its 95% CI nearest 1/2 (none when the CI holds 1/2), and for prespecified theta of 0.65, "
    "0.70 and 0.80 at the contrast's largest design effect; alpha divided by the labels tested in the contrast "
    "(Bonferroni, the first step of Holm's adjustment); design effect = Obuchowski's clustered / DeLong's "
    "independent variance of theta, kept between 1 and its largest value (Kish 1965)")
MODEL_METHOD = (
    "minimum sample size to develop the prediction model anew, as a covreport revalidation does in every "
    "leave-one-patient-out fold (Riley et al. 2020, criteria and roundings of R pmsampsize 1.1.3): (1) expected "
    "shrinkage at least the target, (2) apparent and adjusted Nagelkerke R-squared within 0.05, (3) the outcome "
    "proportion within 0.05; the Cox-Snell R-squared anticipated from the cross-validated C-statistic under the "
    "binormal construction of Riley, Van Calster & Collins 2021 (computed by quadrature); candidate predictors = "
    "the features entering the model; events = pairs of the less frequent class; the criteria count independent "
    "observations, so the size is multiplied by the AUC's design effect for pairs; criterion 1 targets unpenalised "
    "maximum likelihood, so for a penalised model the size is a heuristic upper bound")
REFERENCE = ("Buderer NMF. Acad Emerg Med 1996;3:895-900; Hanley JA, McNeil BJ. Radiology 1982;143:29-36; "
             "Noether GE. J Am Stat Assoc 1987;82:645-647; Hoenig JM, Heisey DM. Am Stat 2001;55:19-24; "
             "Riley RD et al. BMJ 2020;368:m441; Riley RD, Van Calster B, Collins GS. Stat Med 2021;40:859-864; "
             "Kish L. Survey Sampling, Wiley 1965")
#: Prespecified probabilities of superiority at which every contrast is planned.
THETA_GRID = (0.65, 0.70, 0.80)


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


def _kish(patient_ids):
    """Design effect at intra-patient correlation 1: sum of squared pairs per patient / pairs."""
    return kish_design_effect(patient_ids)[0]


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


def _bound(*records):
    """The value nearest 1/2 of the first of ``records`` (the primary 95% CI first) holding both bounds."""
    for rec in records:
        rec = _dict(rec)
        value = ss.conservative_value(_opt(rec, "ci_low", 0, 1), _opt(rec, "ci_high", 0, 1))
        if value is not None:
            return value
    return None


def _ceil(x):
    return None if x is None else math.ceil(x - 1e-9)


def _sizes(n_of, estimate, bound, deff, per_patient):
    """Pairs and patients at the estimate and at the CI bound; ``n_of(value)`` is the independent size
    (None where the value gives no variance or no effect)."""
    out = {}
    for key, value in (("", estimate), ("_conservative", bound)):
        n = n_of(value) if value is not None else None
        pairs = _ceil(n * deff) if n is not None else None
        out["pairs" + key] = pairs
        out["patients" + key] = _ceil(pairs / per_patient) if pairs is not None else None
    return out


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
    w, alpha = t["half_width"], t["alpha"]
    rows = []
    for measure, share, cls in (("sensitivity", prevalence, pos), ("specificity", 1 - prevalence, neg)):
        rec, cv = _dict(metrics.get(measure)), _dict(cvs.get(measure))
        est = _num(rec, "estimate", where=f"prediction.metrics.{measure}", lo=0, hi=1)
        measured = None if cv.get("degenerate") else _opt(cv, "design_effect")  # degenerate: the ICC-1 fallback
        deff, deff_source = _design_effect(measured, _kish([p for p, o in pairs if o == cls]))
        bound = _bound(cv, rec)

        def n_of(v, share=share):
            return ss.diagnostic_n(v, share, w, alpha) if 0 < v < 1 else None

        rows.append({"measure": measure, "estimate": est, "conservative_value": bound, "design_effect": deff,
                     "design_effect_source": deff_source, **_sizes(n_of, est, bound, deff, per_patient)})
    auc, auc_c = _dict(block.get("auc")), _dict(block.get("auc_clustered"))
    est = _num(auc, "auc", where="prediction.auc", lo=0, hi=1)
    se, se_c = _opt(auc, "se", 0), _opt(auc_c, "se", 0)
    deff, deff_source = _design_effect((se_c / se) ** 2 if se and se_c else None, _kish([p for p, _ in pairs]))
    bound = _bound(cvs.get("auc"), auc_c, auc)

    def n_auc(v):
        return ss.auc_n(v, prevalence, w, alpha) if 0 < v < 1 else None

    rows.append({"measure": "auc", "estimate": est, "conservative_value": bound, "design_effect": deff,
                 "design_effect_source": deff_source, **_sizes(n_auc, est, bound, deff, per_patient)})
    return {"n_pairs": n_pairs, "n_patients": n_patients, "pairs_per_patient": per_patient,
            "prevalence": prevalence, "positive_class": pos, "rows": rows, "unit": "pair",
            "method": ACCURACY_METHOD}


def _changes(results, t):
    rows = results.get("group_differences_clustered")
    if not isinstance(rows, list) or not rows:
        raise _Missing("results.json has no patient-clustered change analysis (group_differences_clustered)")
    listed = results.get("pairs")
    pairs = [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []
    tested = Counter(r.get("contrast") for r in rows if isinstance(r, dict) and r.get("status") == "tested")
    out, shape = [], {}
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
        except (_Missing, StatsError) as exc:
            out.append({"contrast": contrast, "label": label, "note": safe_text(str(exc), limit=200)})
            continue
        n = n1 + n2
        c = n1 / n
        a = t["alpha"] / tested[contrast]
        per_patient = n / clusters
        bound = _bound(r)

        def n_of(v, c=c, a=a):
            return ss.noether_n(v, c, a, t["power"]) if v != 0.5 else None

        row = {"contrast": contrast, "label": label, "theta": theta, "conservative_value": bound,
               "n1": n1, "n2": n2, "clusters": clusters, "fraction": c, "design_effect": deff,
               "design_effect_source": deff_source, "alpha_per_test": a,
               "power_at": [{"multiple": k, "pairs": k * n, "patients": k * clusters,
                             "power": ss.noether_power(theta, c, k * n / deff, a)}
                            for k in MULTIPLES]}
        sizes = _sizes(n_of, theta, bound, deff, per_patient)
        row.update({"pairs_for_power": sizes["pairs"], "patients_for_power": sizes["patients"],
                    "pairs_for_power_conservative": sizes["pairs_conservative"],
                    "patients_for_power_conservative": sizes["patients_conservative"], "note": None})
        out.append(row)
        largest = shape.get(contrast, {}).get("design_effect", 0.0)
        shape[contrast] = {"fraction": c, "alpha_per_test": a, "per_patient": per_patient,
                           "design_effect": max(largest, deff)}
    grid = []
    for contrast, sh in shape.items():
        for theta in THETA_GRID:
            pairs = _ceil(ss.noether_n(theta, sh["fraction"], sh["alpha_per_test"], t["power"]) * sh["design_effect"])
            grid.append({"contrast": contrast, "theta": theta, "design_effect": sh["design_effect"],
                         "pairs": pairs, "patients": _ceil(pairs / sh["per_patient"])})
    return {"rows": out, "grid": grid, "unit": "pair", "method": CHANGE_METHOD}


def _model(block, accuracy, t):
    epp = _dict(block.get("events_per_candidate_predictor"))
    parameters = _num(epp, "candidate_predictors", where="prediction.events_per_candidate_predictor", lo=1,
                      whole=True)
    prevalence = accuracy["prevalence"]
    auc_row = next(r for r in accuracy["rows"] if r["measure"] == "auc")
    if block.get("informative") is False:
        raise _Missing("the headline protocol is not informative (it predicts one class for every pair or ranks "
                       "below chance): no C-statistic to plan the model on")
    est, bound = auc_row["estimate"], auc_row["conservative_value"]
    c, source = (est, "estimate") if 0.5 < est < 1 else (bound, "CI bound")
    if c is None or c <= 0.5:
        raise _Missing(f"the cross-validated C-statistic ({est:.3f}) gives no value above 0.5 and below 1 to "
                       "plan the model on")
    r2 = ss.cstatistic_to_r2(c, prevalence)
    res = ss.riley_binary(r2, parameters, prevalence, t["shrinkage"])
    minority = min(prevalence, 1 - prevalence)
    criteria = [{**row, "events": row["n"] * minority, "events_per_parameter": row["n"] * minority / parameters}
                for row in res["criteria"]]
    deff = auc_row["design_effect"]
    pairs = _ceil(res["n"] * deff)
    return {"candidate_predictors": parameters, "prevalence": prevalence, "cstatistic": est,
            "planning_value": c, "planning_source": source, "r2_cs": r2,
            "max_r2_cs": res["max_r2"], "shrinkage": res["shrinkage"], "criteria": criteria,
            "n_independent": res["n"], "events": res["n"] * minority,
            "events_per_parameter": res["n"] * minority / parameters,
            "design_effect": deff, "pairs": pairs, "patients": _ceil(pairs / accuracy["pairs_per_patient"]),
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


def _n(x):
    return "n/a" if x is None else f"{x:,}"


def format_plan(plan):
    """The plan as a plain-text table for the terminal."""
    t = plan["targets"]
    lines = [f"Sample size for revalidation ({safe_text(plan.get('results', 'results.json'))})",
             f"Targets: 95% CI half-width {t['half_width']:g}; power {t['power']:g} at two-sided alpha "
             f"{t['alpha']:g} / labels tested per contrast; shrinkage {t['shrinkage']:g}. Sizes at the estimate, "
             "and at its 95% CI's value nearest 1/2 (conservative).", ""]
    acc = plan["accuracy"]
    if "not_available" in acc:
        lines += [f"Accuracy: not available ({acc['not_available']})", ""]
    else:
        lines.append(f"Accuracy of the {safe_text(str(plan['protocol']))} protocol: now {acc['n_pairs']:,} pairs of "
                     f"{acc['n_patients']:,} patients ({acc['pairs_per_patient']:.2f} pairs per patient), "
                     f"prevalence of {safe_text(acc['positive_class'])} {acc['prevalence']:.3f}")
        lines.append(f"  {'measure':<12} {'estimate':>8} {'CI value':>8} {'deff':>5} {'pairs':>9} {'patients':>9} "
                     f"{'pairs (CI)':>10} {'patients (CI)':>13}")
        for r in acc["rows"]:
            lines.append(f"  {r['measure']:<12} {r['estimate']:>8.3f} {_f(r['conservative_value']):>8} "
                         f"{r['design_effect']:>5.2f} {_n(r['pairs']):>9} {_n(r['patients']):>9} "
                         f"{_n(r['pairs_conservative']):>10} {_n(r['patients_conservative']):>13}")
        lines.append("")
    ch = plan["change"]
    if "not_available" in ch:
        lines += [f"Change of each label: not available ({ch['not_available']})", ""]
    else:
        for contrast in dict.fromkeys(r["contrast"] for r in ch["rows"]):
            rows = [r for r in ch["rows"] if r["contrast"] == contrast]
            first = next((r for r in rows if r.get("note") is None), None)
            head = " ".join(f"{'x' + str(k):>5}" for k in MULTIPLES)
            lines.append(f"Change of each label, {safe_text(contrast)}: power at x2, x5, x10 the pairs; pairs for "
                         f"power {t['power']:g}")
            if first:
                lines.append(f"  (now {first['n1'] + first['n2']:,} pairs of {first['clusters']:,} patients; "
                             f"alpha per test {first['alpha_per_test']:.4f})")
            lines.append(f"  {'label':<27} {'theta':>6} {'CI value':>8} {'deff':>5} {head} {'pairs':>9} "
                         f"{'patients':>9} {'pairs (CI)':>10}")
            for r in rows:
                label = safe_text(str(r["label"]), limit=27)
                if r.get("note"):
                    lines.append(f"  {label:<27} {r['note']}")
                    continue
                pw = " ".join(f"{p['power']:>5.2f}" for p in r["power_at"])
                lines.append(f"  {label:<27} {r['theta']:>6.3f} {_f(r['conservative_value']):>8} "
                             f"{r['design_effect']:>5.2f} {pw} {_n(r['pairs_for_power']):>9} "
                             f"{_n(r['patients_for_power']):>9} {_n(r['pairs_for_power_conservative']):>10}")
            grid = [g for g in ch.get("grid", []) if g["contrast"] == contrast]
            if grid:
                lines.append("  prespecified theta: " + "; ".join(
                    f"{g['theta']:.2f} -> {g['pairs']:,} pairs ({g['patients']:,} patients)" for g in grid)
                    + f" (design effect {grid[0]['design_effect']:.2f}, the contrast's largest)")
            lines.append("")
    mo = plan["model"]
    if "not_available" in mo:
        lines += [f"Prediction model: not available ({mo['not_available']})", ""]
    else:
        lines.append(f"Prediction model, developed anew (Riley et al. 2020): {mo['candidate_predictors']:,} candidate "
                     f"predictors, prevalence {mo['prevalence']:.3f}, C {mo['planning_value']:.3f} "
                     f"({mo['planning_source']}) -> Cox-Snell R2 {mo['r2_cs']:.3f} (largest {mo['max_r2_cs']:.2f})")
        lines.append(f"  {'criterion':<24} {'pairs':>9} {'shrinkage':>9} {'events':>9} {'EPP':>7}")
        for c in mo["criteria"]:
            lines.append(f"  {c['criterion']:<24} {c['n']:>9,} {c['shrinkage']:>9.3f} {c['events']:>9,.1f} "
                         f"{c['events_per_parameter']:>7.2f}")
        lines.append(f"  minimum: {mo['n_independent']:,} independent pairs; x design effect "
                     f"{mo['design_effect']:.2f} = {mo['pairs']:,} pairs ({mo['patients']:,} patients at the observed pairs per patient); events "
                     "are pairs of the less frequent class")
        lines.append("")
    return "\n".join(lines)


def plan_rows(plan):
    """The plan as tidy rows (tables/sample_size.csv): one per measure, label, prespecified theta and criterion."""
    rows = []

    def add(part, contrast, item, estimate, conservative, deff, pairs, patients, pairs_c, patients_c, note=None):
        rows.append({"part": part, "contrast": contrast, "item": item, "estimate": estimate,
                     "conservative_value": conservative, "design_effect": deff, "pairs": pairs,
                     "patients": patients, "pairs_conservative": pairs_c, "patients_conservative": patients_c,
                     "note": note})

    for r in plan["accuracy"].get("rows", []):
        add("accuracy", None, r["measure"], r["estimate"], r["conservative_value"], r["design_effect"],
            r["pairs"], r["patients"], r["pairs_conservative"], r["patients_conservative"])
    for r in plan["change"].get("rows", []):
        add("change", r["contrast"], r["label"], r.get("theta"), r.get("conservative_value"),
            r.get("design_effect"), r.get("pairs_for_power"), r.get("patients_for_power"),
            r.get("pairs_for_power_conservative"), r.get("patients_for_power_conservative"), r.get("note"))
    for g in plan["change"].get("grid", []):
        add("change, prespecified theta", g["contrast"], f"theta {g['theta']:.2f}", g["theta"], None,
            g["design_effect"], g["pairs"], g["patients"], None, None)
    mo = plan["model"]
    for c in mo.get("criteria", []):
        pairs = _ceil(c["n"] * mo["design_effect"])
        add("model", None, c["criterion"], None, None, mo["design_effect"], pairs,
            _ceil(pairs / plan["accuracy"]["pairs_per_patient"]), None, None, f"{c['n']} independent pairs")
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
