"""The CLAIM 2024 and STARD-AI checklists (issue 20, section 9): item texts as data, one status rule, and the
subgroup performance, failure analysis and patient separation they ask for."""

import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from covreport.report import claim_checklist, render_html, stard_ai_checklist
from covreport.report.checklists import NEEDS, checklist_items
from covreport.stats.subgroups import failure_analysis, patient_separation, subgroup_performance
from covreport.study import STUDY_FIELDS
from report_fixtures import base, with_ai_checks as _with_checks

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "docs" / "study.example.toml"
DONE = {"covreport", "study.toml", "covreport + study.toml", "not applicable"}


def _main(i):
    return int(re.match(r"\d+", i).group())


def test_claim_file_holds_the_44_items_in_order():
    # Tejani et al. Radiol Artif Intell 2024;6:e240300: 44 items, no sub-items
    ids = [it["id"] for it in checklist_items("claim")]
    assert ids == [str(i) for i in range(1, 45)]


def test_stard_ai_file_holds_the_40_items_in_order():
    # Sounderajah et al. Nat Med 2025;31:3283-3289, Table 2: 40 items; 15, 16, 17, 26 and 40 have sub-items
    ids = [it["id"] for it in checklist_items("stard_ai")]
    assert len(ids) == len(set(ids)) == 48
    assert list(dict.fromkeys(_main(i) for i in ids)) == list(range(1, 41))
    assert [i for i in ids if not i.isdigit()] == ["15a", "15b", "15c", "15d", "16a", "16b", "16c", "17a", "17b",
                                                   "26a", "26b", "40a", "40b"]


@pytest.mark.parametrize("name", ["claim", "stard_ai"])
def test_every_item_has_exactly_one_filling_route(name):
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    anchors = set(re.findall(r'id="([a-z0-9-]+)"', (ROOT / "templates" / "report.html.j2").read_text() +
                             (ROOT / "templates" / "_ai_checklists.html.j2").read_text()))
    for it in checklist_items(name):
        assert {"id", "section", "topic", "text", "where", "where_name"} <= set(it), it["id"]
        assert it["where"] in anchors, (it["id"], it["where"])
        if it.get("not_applicable"):        # not applicable, with its reason, and nothing else
            assert not (it.get("covreport") or it.get("study") or it.get("needs")), it["id"]
        else:                               # filled by covreport, by study.toml, or by both
            assert it.get("covreport") or it.get("study"), it["id"]
        assert it.get("needs") is None or (it.get("covreport") and it["needs"] in NEEDS), it["id"]
        for field in it.get("study", ()):
            assert field in STUDY_FIELDS and field in example, (it["id"], field)


def _rows(fn, r):
    return {row["item"]: row for row in fn(r)}


def test_statuses_follow_the_run_and_the_study():
    r = _with_checks(base())
    claim, stard = _rows(claim_checklist, r), _rows(stard_ai_checklist, r)
    assert len(claim) == 44 and len(stard) == 48
    # covreport alone; the authors' field alone; not applicable with the reason
    assert claim["22"]["status"] == "covreport" and claim["22"]["todo"] == ""
    assert claim["39"]["status"] == "covreport" and claim["20"]["status"] == "covreport"
    assert claim["11"]["status"] == "author" and claim["11"]["todo"] == "study.toml: deidentification"
    assert claim["27"]["status"] == "not applicable" and "no ensemble" in claim["27"]["filled"]
    assert stard["23"]["status"] == "partly" and stard["23"]["todo"] == "study.toml: fairness"
    # filling the study completes the authors' items
    r["study"] = {"deidentification": "Done by the collections.", "fairness": "Subgroups only."}
    assert _rows(claim_checklist, r)["11"]["status"] == "study.toml"
    assert _rows(stard_ai_checklist, r)["23"]["status"] == "covreport + study.toml"


def test_reviewer_mode_hands_the_model_items_to_index_test():
    r = _with_checks(base())
    r["provenance"].update(weights_sha256=None, preprocessing=None, model=None)
    r["provenance"]["inputs"] = {"scores": {"path": "scores.csv", "sha256": "ab" * 32}}
    claim = _rows(claim_checklist, r)
    for item in ("9", "22", "23", "24", "25", "26", "31"):
        assert claim[item]["status"] == "author", item
        assert claim[item]["todo"].startswith("study.toml: index_test"), item
    assert "scores file" in claim["22"]["todo"]
    assert claim["19"]["status"] == "covreport"          # the cross-validation is still covreport's
    r["study"] = {"index_test": "DenseNet121 weights w.pt, trained on CheXpert.", "acquisition": "AP portable."}
    claim, stard = _rows(claim_checklist, r), _rows(stard_ai_checklist, r)
    assert claim["22"]["status"] == "study.toml" and claim["22"]["todo"] == ""
    assert claim["22"]["filled"] == "study.toml: index_test"
    assert stard["14"]["status"] == "study.toml" and stard["14"]["filled"] == "study.toml: acquisition, index_test"


def test_without_prediction_the_items_that_need_it_fall_to_the_authors():
    r = base()
    r.pop("prediction")
    claim, stard = _rows(claim_checklist, r), _rows(stard_ai_checklist, r)
    assert claim["39"]["status"] == "author" and "no failure analysis" in claim["39"]["todo"]
    assert claim["20"]["status"] == "author" and "no patient separation" in claim["20"]["todo"]
    assert claim["28"]["status"] == "author" and claim["28"]["todo"] == "no prediction results"
    assert stard["30"]["status"] == "author"
    assert stard["40b"]["status"] == "covreport"          # the stored outputs need no prediction


# --- the numbers ------------------------------------------------------------------------------------------


def _records(n=80, seed=3):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.6
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0.01, 0.99)
    recs = [{"pair_id": f"P{i:03d}", "patient_id": f"T{i // 2:03d}", "outcome": "Worse" if yy else "Improved",
             "probability": float(pp), "predicted": "Worse" if pp >= 0.5 else "Improved", "fold": i // 2}
            for i, (yy, pp) in enumerate(zip(y, p))]
    cov = pd.DataFrame({"sex": rng.choice(["M", "F", None], n, p=[0.45, 0.45, 0.1]),
                        "age": rng.uniform(30, 90, n), "first_view": ["AP"] * n,
                        "interval_days": rng.integers(1, 12, n)})
    return recs, cov


def _cp(k, n):
    # Clopper-Pearson reference: scipy.stats.binomtest(k, n).proportion_ci(method="exact")
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return k / n, ci.low, ci.high


def test_subgroup_numbers_equal_independent_computations():
    recs, cov = _records()
    rows = subgroup_performance(recs, cov)
    y = np.array([r["outcome"] == "Worse" for r in recs])
    p = np.array([r["probability"] for r in recs])
    hit = p >= 0.5
    masks = {("sex", "female"): cov["sex"].eq("F").to_numpy(), ("sex", "male"): cov["sex"].eq("M").to_numpy(),
             ("sex", "not recorded"): cov["sex"].isna().to_numpy(),
             ("age band", "< 50 years"): (cov["age"] < 50).to_numpy(),
             ("age band", "50\u201369 years"): ((cov["age"] >= 50) & (cov["age"] < 70)).to_numpy(),
             ("age band", "\u2265 70 years"): (cov["age"] >= 70).to_numpy(),
             ("projection of the first CXR", "AP"): np.ones(len(recs), bool),
             ("interval band", "\u2264 3 days"): (cov["interval_days"] <= 3).to_numpy(),
             ("interval band", "> 3 and \u2264 7 days"): cov["interval_days"].between(4, 7).to_numpy(),
             ("interval band", "> 7 days"): (cov["interval_days"] > 7).to_numpy()}
    assert [(r["variable"], r["subgroup"]) for r in rows] == list(masks)
    for row in rows:
        m = masks[(row["variable"], row["subgroup"])]
        yy, hh, pp = y[m], hit[m], p[m]
        assert row["n_pairs"] == m.sum() and row["n_worse"] == yy.sum()
        assert row["n_patients"] == len({recs[i]["patient_id"] for i in np.flatnonzero(m)})
        for name, k, n in (("accuracy", (hh == yy).sum(), m.sum()), ("sensitivity", (hh & yy).sum(), yy.sum()),
                           ("specificity", (~hh & ~yy).sum(), (~yy).sum())):
            est, lo, hi = _cp(int(k), int(n))
            assert row[name] == pytest.approx(est, abs=1e-12)
            assert row[f"{name}_ci_low"] == pytest.approx(lo, abs=1e-9), (row["subgroup"], name)
            assert row[f"{name}_ci_high"] == pytest.approx(hi, abs=1e-9), (row["subgroup"], name)
        assert row["auc"] == pytest.approx(roc_auc_score(yy, pp), abs=1e-12)   # scikit-learn's AUC
        if row["auc"] in (0.0, 1.0):   # complete separation: DeLong's SE is 0; the exact interval instead
            n = min(yy.sum(), (~yy).sum())   # comparisons sharing no case; reference: scipy's Clopper-Pearson
            exact = binomtest(int(n), int(n)).proportion_ci(0.95, method="exact")
            assert (row["auc_ci_low"], row["auc_ci_high"]) == pytest.approx((exact.low, exact.high), abs=1e-13)
            assert f"AUC {row['auc']:g} (complete separation): exact Clopper-Pearson interval" in row["note"]
        else:
            assert 0 < row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"] < 1


def test_a_subgroup_with_one_class_is_not_a_number():
    recs, _ = _records(20)
    cov = pd.DataFrame({"sex": ["M" if r["outcome"] == "Worse" else "F" for r in recs]})
    rows = {r["subgroup"]: r for r in subgroup_performance(recs, cov) if r["variable"] == "sex"}
    male = rows["male"]
    assert male["specificity"] is None and male["auc"] is None and male["auc_ci_low"] is None
    assert male["sensitivity"] is not None
    assert "one class only" in male["note"] and "specificity and AUC n/a" in male["note"]
    # a variable no pair has: one n/a row
    none = [r for r in subgroup_performance(recs, cov) if r["variable"] == "age band"]
    assert len(none) == 1 and none[0]["subgroup"] == "not recorded" and none[0]["accuracy"] is None


def test_failure_analysis_lists_the_largest_errors_first():
    recs, _ = _records(30)
    err = [abs((r["outcome"] == "Worse") - r["probability"]) for r in recs]
    rows = failure_analysis(recs)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["pair_id"] for r in rows] == [recs[i]["pair_id"] for i in sorted(range(30), key=lambda i: -err[i])[:5]]
    assert rows[0]["error"] == pytest.approx(max(err))
    assert all(r["correct"] == (r["predicted"] == r["outcome"]) for r in rows)


def test_patient_separation_checks_the_folds_and_the_dates():
    recs, _ = _records(10)
    sep = patient_separation(recs, dates=["2020-03-01", "2020-04-02", None, "not a date"])
    assert sep["disjoint"] is True and sep["n_patients"] == sep["n_folds"] == 5
    assert sep["dated_within_chexpert"] == 0 and sep["test_first_date"] == "2020-03-01"
    assert "held out together" in sep["cross_validation"] and "none of them is a CheXpert image" in sep["index_test"]
    mixed = [dict(r, fold=0) for r in recs]
    assert patient_separation(mixed)["disjoint"] is False
    sep = patient_separation(recs, dates=["2016-05-01", "2020-01-01"])
    assert sep["dated_within_chexpert"] == 1 and "cannot rule out" in sep["index_test"]
    assert "no CXR dates" in patient_separation(recs)["index_test"]


def test_the_appendix_renders_both_checklists_and_the_supplementary_tables():
    html = render_html(_with_checks(base()))
    assert html.count('id="appendix-ai"') == 1
    for table in ("claim-checklist", "stard-ai-checklist", "subgroups", "failure-analysis"):
        assert f'<table id="{table}"' in html, table
    assert re.search(r"\d+ of 44 items are complete or not applicable; \d+ need the authors\.", html)
    assert re.search(r"\d+ of 48 sub-items \(40 items\) are complete or not applicable", html)
    assert "Supplementary Table C1" in html and "Supplementary Table C2" in html
    assert "Leave-one-patient-out" in html
