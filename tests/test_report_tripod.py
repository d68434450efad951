"""The TRIPOD+AI 2024 checklist (issue 19, section 7): item texts as data, filled from the run and study.toml."""

import re
import tomllib
from pathlib import Path

from covreport.report.checklists import TRIPOD_NEEDS, tripod_checklist, tripod_items
from covreport.study import STUDY_FIELDS

EXAMPLE = Path(__file__).parent.parent / "docs" / "study.example.toml"


def test_the_data_file_holds_27_items_and_52_sub_items_in_order():
    # Collins et al. BMJ 2024;385:e078378: "27 main items", 52 sub-items
    items = tripod_items()
    ids = [it["id"] for it in items]
    assert len(ids) == 52 and len(set(ids)) == 52
    mains = list(dict.fromkeys(int(re.match(r"\d+", i).group()) for i in ids))
    assert mains == list(range(1, 28))
    for it in items:
        assert {"id", "section", "topic", "text", "applies", "where", "where_name"} <= set(it)
        assert it["applies"] in ("D", "E", "D;E")
        # every sub-item says who fills it
        assert it.get("covreport") or it.get("study") or it.get("not_applicable"), it["id"]
        assert it.get("needs") in (None, *TRIPOD_NEEDS), it["id"]


def test_every_study_field_of_the_checklist_is_documented():
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for it in tripod_items():
        for field in it.get("study", ()):
            assert field in STUDY_FIELDS, (it["id"], field)
            assert field in example, (it["id"], field)


def _results(**extra):
    return {"study": {}, "flow": {"stages": []}, "prediction": {"penalised": {"protocol": "penalised"}}, **extra}


def test_status_follows_the_run_and_the_study_fields():
    rows = {r["item"]: r for r in tripod_checklist(_results())}
    assert len(rows) == 52
    # covreport alone
    assert rows["12c"]["status"] == "covreport" and rows["12c"]["todo"] == ""
    # authors alone, empty study: to be completed, naming the field
    assert rows["17"]["status"] == "author" and rows["17"]["todo"] == "study.toml: ethics"
    # not applicable, with its reason
    assert rows["12f"]["status"] == "not applicable" and "no model is updated" in rows["12f"]["filled"]
    # needs a final model that this run lacks: falls to the authors, saying why
    assert rows["22"]["status"] == "author" and "no model refitted" in rows["22"]["todo"]
    # needs a reference row of Table 1
    assert rows["20c"]["status"] == "author" and "--reference-csv" in rows["20c"]["todo"]


def test_a_filled_study_and_a_final_model_complete_their_items():
    res = _results(study={"ethics": "Waived.", "heterogeneity": "Not examined."},
                   table1=[{"group": "CheXpert (reference)", "counted_by": "patient"}])
    res["prediction"]["penalised"]["final_model"] = {"C": 1.0}
    rows = {r["item"]: r for r in tripod_checklist(res)}
    assert rows["17"]["status"] == "study.toml" and rows["17"]["filled"] == "study.toml: ethics"
    assert rows["12d"]["status"] == "covreport + study.toml"
    assert rows["22"]["status"] == "covreport" and "coefficient" in rows["22"]["filled"]
    assert rows["20c"]["status"] == "covreport"


def test_without_prediction_results_the_items_that_need_them_fall_to_the_authors():
    rows = {r["item"]: r for r in tripod_checklist({"study": {}})}
    assert rows["12a"]["status"] == "author" and rows["12a"]["todo"] == "no prediction results"
    assert rows["26"]["status"] == "covreport"           # the limitations need no prediction block
