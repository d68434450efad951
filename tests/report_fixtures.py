"""Results fixtures for the report tests, built from tests/fixtures/results.json.

:func:`with_contract_keys` adds every results.json key of the statistics
additions (coordination contract "results.json additions"), with numbers
that are plausible but not recomputed: the report tests check that each is
shown, formatted, and that nothing breaks when it is absent.
:func:`stressed` adds the long cell notes that pushed Table 4 off the page
(the demo's reversed-order likelihood ratio; data_manifests/example's
zero-width logit interval) and long unbroken identifiers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"

OBUCHOWSKI = ("Clustered Mann-Whitney statistic theta = P(change in group 1 > change in group 2) with the "
              "variance of Obuchowski (1997) for patients contributing several pairs; Wald 95% CI and z test")
BOOT = ("Percentile 95% CI from 2000 cluster-bootstrap resamples of patients (Davison & Hinkley 1997), "
        "pairs of a resampled patient kept together")
CAL = ("Brier score; calibration intercept and slope by logistic regression of the outcome on the logit of the "
       "out-of-fold probability (Cox 1958), Wald 95% CIs; bins are deciles of the predicted probability")


def base():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _bins(pairs, k=5):
    rows = sorted(pairs, key=lambda p: p["probability"])
    out = []
    for i in range(k):
        chunk = rows[i * len(rows) // k:(i + 1) * len(rows) // k]
        if chunk:
            out.append({"predicted": sum(p["probability"] for p in chunk) / len(chunk),
                        "observed": sum(p["outcome"] == "Worse" for p in chunk) / len(chunk), "n": len(chunk)})
    return out


def with_contract_keys(results=None):
    """The fixture with every key of the contract's results.json additions."""
    r = copy.deepcopy(results or base())
    r["primary_analysis"] = {"unit": "patient", "reason": "12 of 40 patients contribute more than one analysed "
                                                          "pair, so the patient is the unit of the primary analysis"}
    for g in r["group_differences"]:
        g["unit"] = "pair"
        g["mw_rule"] = "exact when both groups have fewer than 50 pairs and there are no ties (R's wilcox.test)"
        g["mw_method"] = "exact"
        # section 5 effect sizes (plausible, not recomputed; the widest cells the demo has)
        g.update(hl_shift=round(g["median1"] - g["median2"], 6), hl_ci_low=-0.508123, hl_ci_high=0.048765,
                 hl_method="Hodges-Lehmann shift (Hodges & Lehmann 1963); CI of Bauer 1972",
                 rb_ci_low=-0.901234, rb_ci_high=0.866543, rb_method="rank-biserial r (Kerby 2014)",
                 hedges_g=round(0.98 * g["cohen_d"], 6), g_ci_low=-2.351234, g_ci_high=2.122345,
                 g_method="Hedges' g (Hedges & Olkin 1985); noncentral t CI (Steiger & Fouladi 1997)")
    r["mixed_model"] = [
        {"label": g["label"], "contrast": g["contrast"], "group1": g["group1"], "group2": g["group2"],
         "estimate": -0.335199 + 0.01 * i, "se": 0.104525, "ci_low": -0.540065 + 0.01 * i,
         "ci_high": -0.130334 + 0.01 * i, "z": -3.2, "p": 0.0013 * (i + 1), "n_pairs": 60, "n_patients": 40,
         "formula": ("change ~ C(outcome, Treatment('Improved')) + np.log(interval_days) + "
                     "C(projection_change, Treatment('same'))"), "terms_left_out": None, "unit": "patient",
         "analysis": "sensitivity", "method": "linear mixed model (Laird & Ware 1982), REML",
         "note": ("the random-intercept variance is estimated at 0 (the boundary), so the fit equals ordinary "
                  "least squares of the pairs") if i % 2 else None}
        for i, g in enumerate(r["group_differences"])]
    r["trend_test"] = [
        {"label": lab, "order": "Improved < Stable < Worse", "sizes": "8, 8, 44", "J": 529.0 + i, "mean": 384.0,
         "sd": 60.575, "z": 2.3937 - 0.1 * i, "p": 0.016 * (i + 1) if unit == "pair" else 0.018 * (i + 1),
         "p_method": "exact", "unit": unit, "analysis": "secondary: trend across the ordered outcome",
         "method": "Jonckheere-Terpstra test (Jonckheere 1954; Terpstra 1952)", "note": None}
        for i, lab in enumerate(r["labels"]) for unit in ("pair", "patient")]
    r["projection_changes"] = [
        {"outcome": o, "first_view": "AP", "second_view": v, "projection_change": "same" if v == "AP" else "changed",
         "pairs": n, "patients": n, "unit": "pair"}
        for o, v, n in (("Worse", "AP", 40), ("Worse", "PA", 4), ("Stable", "AP", 8), ("Improved", "AP", 7),
                        ("Improved", "AP Supine", 1), ("All", "AP", 55), ("All", "PA", 4), ("All", "AP Supine", 1))]
    clustered = []
    for i, g in enumerate(r["group_differences"]):
        theta = round(0.5 + 0.5 * g["rank_biserial"], 6)
        clustered.append({
            "contrast": g["contrast"], "label": g["label"], "group1": g["group1"], "group2": g["group2"],
            "n1": g["n1"], "n2": g["n2"], "clusters1": max(1, g["n1"] - 9), "clusters2": max(1, g["n2"] - 2),
            "clusters": 40, "theta": theta, "se": 0.071234, "ci_low": round(theta - 0.139617, 6),
            "ci_high": round(min(1.0, theta + 0.139617), 6), "z": round((theta - 0.5) / 0.071234, 6),
            "p": 0.0123 if i == 3 else 0.4321, "p_holm": 0.0987 if i == 3 else 1.0, "p_bh": 0.0456 if i == 3 else 0.9,
            "unit": "patient", "method": OBUCHOWSKI,
            "note": "a patient can have pairs in both groups" if i == 0 else None})
    r["group_differences_clustered"] = clustered
    t1p = []
    for row in r["table1"]:
        row = dict(row)
        row.update(unit="patient", counted_by="patient",
                   patients=row.get("patients"), pairs=None if row["group"] == "All pairs" else row.get("pairs"))
        if row["group"] in ("Worse", "Stable", "Improved"):
            row["age_n"] = row.get("patients")
        t1p.append(row)
    r["table1_patients"] = t1p
    r["table1_patients"][0]["note"] = ("9 patients have pairs in more than one outcome group and count once in "
                                       "each of those groups")
    boot_pred = {}
    for name in ("nested", "global", "reversed"):
        b = r["prediction"][name]
        boot_pred[name] = {m: {"ci_low": max(0.0, rec["estimate"] - 0.2) if rec.get("estimate") is not None else None,
                               "ci_high": min(1.0, rec["estimate"] + 0.05) if rec.get("estimate") is not None else None,
                               "not_estimable": 3 if m == "specificity" else 0}
                           for m, rec in b["metrics"].items() if not m.startswith("lr_")}
        boot_pred[name]["auc"] = {"ci_low": 0.512345, "ci_high": 0.912345, "not_estimable": 0}
        b["unit"] = "pair"
        b["auc_clustered"] = {"auc": b["auc"]["auc"], "se": 0.101234, "ci_low": 0.576123, "ci_high": 0.974123,
                              "clusters": b["n_patients"], "unit": "patient", "method": (
                                  "AUC with the clustered variance of Obuchowski (1997), patients as clusters; "
                                  "Wald 95% CI"), "note": None}
        b["calibration"] = {"brier": 0.123456, "intercept": -0.345678, "intercept_ci_low": -1.234567,
                            "intercept_ci_high": 0.543211, "slope": 0.876543, "slope_ci_low": 0.123456,
                            "slope_ci_high": 1.629630, "bins": _bins(b["pairs"]), "method": CAL, "note": None}
        b["features_selected"] = {"median": 3.0, "min": 1, "max": 7,
                                  "per_fold": [1 + (i % 7) for i in range(b["n_patients"])]}
        b["metrics"]["balanced_accuracy"] = {"estimate": 0.687500, "ci_low": None, "ci_high": None,
                                             "method": "mean of sensitivity and specificity (Brodersen et al. 2010)",
                                             "note": None}
        b.setdefault("permutation_p", 0.2468)
        if b["permutation_p"] is None:
            b["permutation_p"] = 0.2468
    r["prediction"]["reversed"]["majority_rate"] = 44 / 52
    r["bootstrap"] = {
        "resamples": 2000, "seed": 0, "unit": "patient", "method": BOOT, "prediction": boot_pred,
        "group_differences": [{"contrast": g["contrast"], "label": g["label"], "quantity": q,
                               "estimate": g["cohen_d"] if q == "cohen_d" else g["median1"] - g["median2"],
                               "ci_low": -0.91234, "ci_high": 0.41234, "not_estimable": 0, "unit": "patient",
                               "method": BOOT}
                              for g in r["group_differences"] for q in ("cohen_d", "median_difference")],
    }
    r["provenance"]["options"] = {"protocol": "nested", "seed": 0, "permutations": 1000, "bootstrap": 2000,
                                  "predictive_ci": "logit", "strict": False}
    return r


def stressed(results=None):
    """The fixture with the long notes and identifiers that broke the layout."""
    r = copy.deepcopy(results or base())
    r["study"].pop("title", None)  # the long default title: the running header must still be one line
    rev = r["prediction"]["reversed"]["metrics"]
    rev["lr_negative"].update(estimate=None, ci_low=None, ci_high=None,
                              note="infinite: TN = 0; the log-method interval needs FN > 0 and TN > 0 "
                                   "(no continuity correction)")
    r["prediction"]["global"]["metrics"]["ppv"]["note"] = (
        "zero-width interval: the logit variance is undefined when the estimate is 0 or 1 "
        "(Mercaldo, Lau & Zhou 2007); the Clopper-Pearson exact interval is given instead")
    long_id = "P" + "0123456789ABCDEF" * 6
    r["prediction"]["nested"]["pairs"][0]["pair_id"] = long_id
    r["flow"]["exclusions"][0]["reason"] = "first image: file not found (" + "images/" + "x" * 120 + ".png)"
    return r


def with_ai_checks(results=None):
    """The fixture with the subgroups, failure_analysis and patient_separation records of the AI checklists
    (issue 20, section 9), computed by covreport.stats.subgroups from its headline protocol's pairs."""
    import pandas as pd

    from covreport.stats.subgroups import failure_analysis, patient_separation, subgroup_performance

    r = copy.deepcopy(results or base())
    name = r["prediction"]["headline"]
    recs = r["prediction"][name]["pairs"]
    folds = {pat: k for k, pat in enumerate(dict.fromkeys(p["patient_id"] for p in recs))}
    recs = [dict(p, fold=folds[p["patient_id"]]) for p in recs]   # leave-one-patient-out folds
    sex = pd.DataFrame({"sex": ["F", "M"] * (len(recs) // 2) + ["F"] * (len(recs) % 2)})
    r["subgroups"] = {"protocol": name, "method": "stated", "rows": subgroup_performance(recs, sex)}
    r["failure_analysis"] = {"protocol": name, "method": "stated", "rows": failure_analysis(recs)}
    r["patient_separation"] = {"protocol": name, **patient_separation(recs, dates=["2020-03-01"])}
    return r
