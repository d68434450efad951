"""Limitations of the study derived from the numbers (STARD 2015 item 26)."""

from __future__ import annotations

from covreport.constants import IMPROVED, OUTCOMES, WORSE
from covreport.report.format import (
    METRIC_NAMES, _ci_width, _finite, cite_mark, fmt_auc, fmt_count, fmt_est_text, fmt_num, fmt_p_below, fmt_pp,
    fmt_signed,
)
from covreport.study import series_kind
from covreport.report.revalidation_view import revalidation_view
from covreport.report.summaries import (
    ALPHA, IMBALANCE_RATIO, SMALL_GROUP, WIDE_CI, _prediction_blocks, _validation_summary, endpoint_summary,
)


def limitations(results):
    """Limitations flagged from the numbers (STARD item 26).

    Returns
    -------
    list of dict
        ``{"kind", "text"}`` for each flag: small groups (fewer than
        :data:`SMALL_GROUP` pairs), wide 95% CIs (width above :data:`WIDE_CI`),
        class imbalance, the number of tests, the optimism of the global
        protocol, correlated pairs, heterogeneous intervals, non-estimable
        AUCs, exclusions, synthetic data, and the incorporation, spectrum and
        selection biases of the design where they apply.
    """
    out = []
    flow = results.get("flow") or {}
    prov = results.get("provenance") or {}
    if prov.get("synthetic"):
        out.append({"kind": "Synthetic data", "text": "The data are synthetic (phantom study): no number in this "
                    "report describes patients."})
    by = flow.get("by_outcome") or {}
    small = [(o, by[o]) for o in OUTCOMES if o in by and by[o].get("pairs", 0) < SMALL_GROUP]
    if small:
        parts = ", ".join(f"{o}: {g['pairs']} pairs of {g.get('patients', '?')} patients" for o, g in small)
        out.append({"kind": "Small groups", "text": (f"One outcome group has fewer than {SMALL_GROUP} " if len(small) == 1 else
                                                     f"{len(small)} outcome groups have fewer than {SMALL_GROUP} ")
                    + f"pairs ({parts}); estimates involving them are imprecise and tests have little power."})
    blocks = _prediction_blocks(results)
    head = blocks[0] if blocks else None
    wide = []
    scope = []
    if head:
        # the intervals the report leads with: the refitting bootstrap's where it ran, else the pair-level ones
        cv = head["block"].get("cv_intervals")
        scope.append(f"the {head['name']} protocol's performance")
        recs = dict(cv) if cv else {**head["block"].get("metrics", {}), "auc": head["block"].get("auc")}
        for name, rec in recs.items():
            if name.startswith("lr_") or not rec:
                continue
            key = "auc" if (name == "auc" and not cv) else "estimate"
            w = _ci_width(rec)
            if w is not None and w > WIDE_CI:
                wide.append(f"{METRIC_NAMES.get(name, name) if name != 'auc' else 'AUC'} "
                            f"{fmt_est_text(rec, est=key)} (width {fmt_num(w, 2)})")
    if results.get("validation_auc"):
        scope.append("the validation AUCs")
    for r in results.get("validation_auc") or []:
        w = _ci_width(r)
        if w is not None and w > WIDE_CI:
            wide.append(f"validation AUC of {r['label']} {fmt_est_text(r, est='auc')} (width {fmt_num(w, 2)})")
    if wide:
        out.append({"kind": "Wide confidence intervals", "text": (
            ("One" if len(wide) == 1 else fmt_num(len(wide))) + " of the 95% CIs of " + " and ".join(scope)
            + (" is" if len(wide) == 1 else " are") + f" wider than {fmt_num(WIDE_CI, 2)}: " + "; ".join(wide)
            + "; other estimates (Tables 2 to 4) may be as imprecise.")})
    if head:
        b = head["block"]
        c = b.get("confusion") or {}
        npos, nneg = c.get("tp", 0) + c.get("fn", 0), c.get("fp", 0) + c.get("tn", 0)
        if npos and nneg:
            ratio = max(npos, nneg) / min(npos, nneg)
            if ratio >= IMBALANCE_RATIO:
                pos, neg = ((results.get("prediction") or {}).get("positive_class", WORSE),
                            (results.get("prediction") or {}).get("negative_class", IMPROVED))
                major = pos if npos >= nneg else neg
                nir = max(npos, nneg) / (npos + nneg)
                acc = (b.get("metrics") or {}).get("accuracy", {}).get("estimate")
                out.append({"kind": "Class imbalance", "text": f"The prediction task has {fmt_num(npos)} {pos} and "
                            f"{fmt_num(nneg)} "
                            f"{neg} pairs (ratio {fmt_num(ratio, 1)}:1). Always predicting {major} would be "
                            f"{fmt_auc(nir)} accurate; the {head['name']} accuracy of {fmt_auc(acc)} must be "
                            "read against that rate, and sensitivity and specificity together."})
    ep = endpoint_summary(results)
    fams = [(f, "") for f in ([ep["primary"]] if ep["primary"] else []) + ep["other"] if f["tests"]]
    fams += [(f, " (pairs)") for f in ep["secondary"] if f["tests"]]
    total = sum(f["tests"] for f, _ in fams)
    if total > 1:
        n_val = len(results.get("validation_auc") or [])
        unit = "patients as clusters" if ep["unit"] == "patient" else "pairs as units"
        text = (f"{fmt_num(total)} tests of the change were run ({len(fams)} families: "
                + ", ".join(f"{f['contrast']}{where}" for f, where in fams)
                + f"); at {fmt_p_below(ALPHA)} about {fmt_count(ALPHA * total)} would be significant by chance alone. Holm and "
                "Benjamini-Hochberg adjust within each family, not across them.")
        extra = [(len([m for m in results.get(key) or [] if _finite(m.get("p"))]), what)
                 for key, what in (("mixed_model", "mixed-model contrasts"), ("trend_test", "trend tests"))]
        extra = [f"{fmt_num(n)} {what}" for n, what in extra if n]
        extra = (" The sensitivity analyses add " + " and ".join(extra) + ", not adjusted across families.") if extra \
            else ""
        if ep["primary"]:
            pf = ep["primary"]
            text += (f" Primary endpoint ({pf['contrast']}, {unit}): {pf['raw']} of {pf['tests']} had unadjusted "
                     f"{fmt_p_below(ALPHA)}, {pf['holm']} after Holm and {pf['bh']} after Benjamini-Hochberg adjustment; "
                     "the other families are secondary and exploratory")
        out.append({"kind": "Multiple comparisons", "text": text
                    + (f"; {n_val} validation AUCs were also estimated." if n_val else ".") + extra})
    pred = results.get("prediction") or {}
    if pred.get("nested") and pred.get("global"):
        an = ((pred["nested"].get("metrics") or {}).get("accuracy") or {}).get("estimate")
        ag = ((pred["global"].get("metrics") or {}).get("accuracy") or {}).get("estimate")
        un = (pred["nested"].get("auc") or {}).get("auc")
        ug = (pred["global"].get("auc") or {}).get("auc")
        if _finite(an) and _finite(ag):
            text = (f"Selecting features once on all pairs, as the original study did (global protocol), "
                    f"gave an accuracy of {fmt_auc(ag)} against {fmt_auc(an)} with selection inside each fold "
                    f"(nested), an optimism of {fmt_signed(ag - an)}")
            if _finite(un) and _finite(ug) and (ag, ug) == (an, un):
                text += " (AUC the same, " + fmt_auc(ug) + "): none on these data, which does not show that it is " \
                    "absent elsewhere"
            elif _finite(un) and _finite(ug):
                text += f" (AUC {fmt_auc(ug)} vs {fmt_auc(un)}, {fmt_signed(ug - un)})"
            text += (". Only the primary (penalised, no selection) and the nested protocols are free of selection "
                     "leakage " if pred.get("penalised") else ". Only the nested estimate is free of selection leakage ")
            text += cite_mark("ambroise") + "."
            out.append({"kind": "Optimism of the global protocol", "text": text})
    if head and _finite(head["block"].get("permutation_p")) and head["block"]["permutation_p"] >= ALPHA:
        out.append({"kind": "Prediction not distinguished from chance", "text": f"The permutation test of the "
                    f"{head['name']} protocol gave {fmt_pp(head['block']['permutation_p'])} "
                    f"({fmt_num(head['block'].get('permutations'), 0)} permutations)."})
    pa, na = flow.get("pairs_analysed"), flow.get("patients_analysed")
    if _finite(pa) and _finite(na) and pa > na:
        out.append({"kind": "Correlated pairs", "text": f"The {fmt_num(pa)} pairs come from {fmt_num(na)} patients: pairs of one "
                    "patient are not independent. Cross-validation leaves all pairs of a patient out together, "
                    + ("and the primary change analysis takes patients as clusters, but the pair-level "
                       "Mann-Whitney tests and their CIs (secondary, as in the original study) treat pairs as "
                       "independent, so their precision is overstated."
                       if results.get("group_differences_clustered") else
                       "but the Mann-Whitney tests and the CIs treat pairs as independent, so their precision is "
                       "overstated.")
                    + (" The cluster permutation test assumes that, under the null, the pairs of a patient are "
                       "exchangeable; where a patient's course ties the outcome to the order of its pairs (worse, "
                       "then better), this holds only if the change of a label does not depend on that order "
                       "otherwise than through the outcome." if results.get("group_differences_clustered") else "")})
    iv = results.get("interval_days")
    if iv and _finite(iv.get("min")) and _finite(iv.get("max")) and iv["max"] > iv["min"]:
        out.append({"kind": "Non-uniform intervals", "text": f"The interval between the two CXRs ranged from "
                    f"{fmt_count(iv['min'])} to {fmt_count(iv['max'])} days (median, {fmt_count(iv['median'])}; "
                    f"IQR, {fmt_count(iv['q1'])}\u2013{fmt_count(iv['q3'])}); the primary analysis pools change over "
                    "different intervals" + ("; the mixed-model sensitivity analysis adjusts for log(interval)."
                                             if results.get("mixed_model") else ".")})
    vs = _validation_summary(results)
    if vs and vs["not_estimable"]:
        labs = ", ".join(f"{r['label']} ({r.get('n_pos', '?')} positive)" for r in vs["not_estimable"])
        out.append({"kind": "Labels not validated", "text": f"The validation AUC was not estimable for {labs}; "
                    "changes of these labels rest on an unvalidated output."})
    pim, pan = flow.get("pairs_in_manifest"), flow.get("pairs_analysed")
    if _finite(pim) and _finite(pan) and pim > pan:
        out.append({"kind": "Exclusions", "text": f"{fmt_num(pim - pan)} of {fmt_num(pim)} pairs ({fmt_num(100 * (pim - pan) / pim, 1)}%) "
                    "were excluded (see the flow diagram); if exclusion relates to the outcome, the estimates "
                    "are biased."})
    study = results.get("study") or {}
    if not prov.get("synthetic"):      # both describe patients and readers; a phantom has neither
        _clinical_biases(out, by, pan)
    series = series_kind(study.get("series"))
    sel = []
    if _finite(pim) and _finite(pan) and pim > pan:
        sel.append(f"{fmt_num(pim - pan)} of {fmt_num(pim)} pairs were excluded")
    if series == "convenience":
        sel.append("the series is a convenience series")
    elif not series:
        sel.append("how participants were selected is not stated (study.toml: series)" if not study.get("series")
                   else "the series is not stated as consecutive, random or convenience (study.toml: series)")
    if sel and _finite(pa) and _finite(na) and pa > na:     # alone, that is the clustering of "Correlated pairs"
        sel.append(f"patients with more CXRs contribute more pairs ({fmt_num(pa)} pairs of {fmt_num(na)} patients)")
    if sel:
        out.append({"kind": "Selection bias", "text": "The analysed pairs may not represent the eligible population: "
                    + "; ".join(sel) + "."})
    rv = revalidation_view(results)
    if rv and rv["not_comparable"]:
        texts = []
        if rv["comparable"] is False:
            texts.append(f"The most recent previous validation ({rv['latest']['date']}) is not comparable with this "
                         f"one: {rv['latest']['why']}. The changes in 'What moved since the last validation' mix a "
                         "change of the index test with the change of data and cannot be read as the effect of "
                         "the added pairs.")
        older = [p for p in rv["not_comparable"] if not p["latest"]]
        if older:
            texts.append(("One earlier validation (" if len(older) == 1 else f"{len(older)} earlier validations (")
                         + "; ".join(f"{p['date']}: {p['why']}" for p in older)
                         + (") is" if len(older) == 1 else ") are") + " not comparable with this one" + (" (open markers in the trend figure)."
                                                                   if rv["figure"] else "."))
        out.append({"kind": "Previous validation not comparable", "text": " ".join(texts)})
    return out


def _clinical_biases(out, by, pan):
    """The incorporation and spectrum biases of a clinical study (the original design: readers compare the CXRs)."""
    out.append({"kind": "Incorporation bias", "text": "The reference standard (Worse, Stable, Improved) is a reading "
                "of the same two CXRs whose pixels the index test scores, so the index test's input is part of the "
                "reference standard; agreement between them can be inflated compared with an outcome judged "
                "independently of the images (for example clinical deterioration)."})
    spectrum = ("The index test was trained on CheXpert, a general hospital population; the test pairs come from patients imaged at least twice, who tend "
                "to be sicker than those imaged once. Accuracy in this spectrum need not carry over to another "
                "setting")
    if _finite(pan) and by:
        shares = ", ".join(f"{o} {100 * by[o].get('pairs', 0) / pan:.0f}%" for o in OUTCOMES if o in by and pan)
        spectrum += f" or to another mix of outcomes (here {shares})"
    out.append({"kind": "Spectrum bias", "text": spectrum + "."})
