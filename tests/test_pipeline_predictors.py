"""`covreport run --predictors` end to end on the reviewer example (issue 22, sections 1 and 3).

Checks: the three models and the comparisons reach results.json, tables/model_comparison.csv and the
report; a pair missing a predictor is left out of those models and listed with its reason; bad
predictors stop the run before any image is scored, with the file, line, column and fix; verify
accepts the recorded option. The numbers themselves are tied to their references in
test_stats_added_value.py and test_stats_model_comparison.py.
"""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main

EXAMPLE = Path(__file__).parent.parent / "data_manifests" / "reviewer_example"


def _copy(tmp):
    for name in ("manifest.csv", "scores.csv"):
        shutil.copy(EXAMPLE / name, tmp / name)
    return tmp / "manifest.csv", tmp / "scores.csv"


def _run(manifest, scores, out, predictors):
    return CliRunner().invoke(main, ["-q", "run", str(manifest), "--scores", str(scores), "--predictors", predictors,
                                     "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--out", str(out)])


@pytest.fixture(scope="module")
def predictors_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictors")
    manifest, scores = _copy(tmp)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table["spo2"] = [str(90 + i % 7) for i in range(len(table))]
    worse = table.index[table.outcome == "Worse"]
    table.loc[worse[0], "spo2"] = ""                 # one prediction pair without the predictor
    table.to_csv(manifest, index=False)
    res = _run(manifest, scores, tmp / "out", "age,sex=F/M,spo2")
    assert res.exit_code == 0, res.output
    return tmp / "out", table.loc[worse[0], "pair_id"]


def test_models_comparisons_and_exclusions_are_recorded(predictors_run):
    out, missing_pair = predictors_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    av = results["added_value"]
    assert [s["name"] for s in av["predictors"]] == ["age", "sex", "spo2"]
    assert av["predictors"][1]["levels"] == ["F", "M"] and av["predictors"][2]["missing"] == 1
    assert av["excluded"] == [{"pair_id": missing_pair, "patient_id": av["excluded"][0]["patient_id"],
                               "reason": "missing spo2"}]
    assert av["pairs_analysed"] == av["pairs_in_prediction"] - 1 == len(av["pairs"])
    assert set(av["models"]) == {"clinical", "imaging", "combined"}
    assert av["models"]["clinical"]["features"] == 3 and av["models"]["combined"]["features"] == 3 + 1024
    assert results["provenance"]["options"]["predictors"] == "age,sex=F/M,spo2"
    table = pd.read_csv(out / "tables" / "model_comparison.csv")
    assert list(table.columns) == ["comparison", "measure", "estimate", "lower", "upper", "p", "method"]
    assert set(table.comparison) == {"combined vs clinical", "imaging vs clinical"}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Added value of the images over the clinical predictors" in page and 'id="table-model-comparison"' in page
    assert "Decision curves of the clinical (dash-dot), imaging (dashed) and combined (solid) models" in page
    assert (out / "figures" / "added_value_decision_curve.png").is_file()
    # Table 1c: the predictors per outcome group, all analysed pairs (Stable included), counted by pair
    t1c = pd.read_csv(out / "tables" / "table1_predictors.csv")
    spo2 = t1c[(t1c.predictor == "spo2") & (t1c.group == "All pairs")].iloc[0]
    assert (spo2.pairs, spo2.n, spo2.missing) == (len(results["pairs"]), len(results["pairs"]) - 1, 1)
    assert set(t1c.group) == {"All pairs", "Worse", "Stable", "Improved"}
    assert results["table1_predictors"][0]["method"].startswith("descriptive, counted by pair")
    assert 'id="table1-predictors"' in page and "spo2, missing" not in page and "sex = F" in page


@pytest.mark.parametrize("predictors,message", [
    ("age,lactate", "--predictors: predictor column 'lactate' is not in the manifest"),
    ("sex", "column 'sex': 'M' is not a number; write a number, leave it blank when not measured, or name the "
            "predictor as sex=LEVEL1/LEVEL2 if it is categorical"),
    ("sex=F/X", "column 'sex': 'M' is not one of the levels F/X"),
])
def test_bad_predictors_stop_the_run_before_scoring(tmp_path, predictors, message):
    manifest, scores = _copy(tmp_path)
    res = _run(manifest, scores, tmp_path / "out", predictors)
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {manifest}: --predictors: ")
    assert message in res.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()
