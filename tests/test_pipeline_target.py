"""`covreport run --target COLUMN --positive VALUE` end to end on the reviewer example (issue 22, section 2).

Checks: the prediction, its metrics, predictions.csv, decision curves and the added-value models use
the target on every analysed pair that records it (Stable pairs included), while the change analysis
keeps the radiological outcome; the pair without the target is left out and counted; the report names
the target; a bad target stops the run before anything is scored, with the file, line, column and fix;
verify repeats the run from the folder. The out-of-fold probabilities are those of the protocol run
directly on the same features and target (its own numbers are tied to scikit-learn in
test_stats_penalised.py).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.errors import StatsError
from covreport.stats.target import target_classes

EXAMPLE = Path(__file__).parent.parent / "data_manifests" / "reviewer_example"


def _copy(tmp, column=None):
    for name in ("manifest.csv", "scores.csv"):
        shutil.copy(EXAMPLE / name, tmp / name)
    manifest = tmp / "manifest.csv"
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if column is not None:
        table["icu"] = column(table)
        table.to_csv(manifest, index=False)
    return manifest, tmp / "scores.csv", table


def _icu(table):
    """ICU admission: every third pair and the Worse pairs of older patients, one pair not recorded."""
    yes = (np.arange(len(table)) % 3 == 0) | ((table.outcome == "Worse") & (table.age.astype(int) > 60))
    values = np.where(yes, "yes", "no").astype(object)
    values[5] = ""
    return values


def _run(manifest, scores, out, *extra):
    return CliRunner().invoke(main, ["-q", "run", str(manifest), "--scores", str(scores), *extra,
                                     "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--out", str(out)])


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("target")
    manifest, scores, table = _copy(tmp, _icu)
    res = _run(manifest, scores, tmp / "out", "--target", "icu", "--positive", "yes", "--predictors", "age")
    assert res.exit_code == 0, res.output
    return tmp / "out", table, res.output


def test_the_prediction_uses_the_target_on_every_pair_that_records_it(target_run):
    out, table, _ = target_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    target = results["prediction_target"]
    assert (target["column"], target["positive"], target["negative"]) == ("icu", "yes", "no")
    assert (target["positive_class"], target["negative_class"]) == ("icu = yes", "icu = no")
    analysed = {p["pair_id"] for p in results["pairs"]}
    sub = table[table.pair_id.isin(analysed)]
    recorded = sub[sub.icu != ""]
    assert target["pairs_with_target"] == len(recorded) == len(analysed) - 1
    assert target["positive_pairs"] == int((recorded.icu == "yes").sum())
    assert target["excluded"] == [{"pair_id": table.pair_id[5], "patient_id": table.patient_id[5],
                                   "outcome": table.outcome[5], "reason": "icu not recorded"}]
    pred = results["prediction"]
    assert (pred["positive_class"], pred["negative_class"]) == ("icu = yes", "icu = no")
    head = pred[pred["headline"]]
    truth = dict(zip(recorded.pair_id, recorded.icu))
    assert {r["pair_id"] for r in head["pairs"]} == set(truth)        # Stable pairs included
    assert "Stable" in set(recorded.outcome)
    assert all(r["outcome"] == f"icu = {truth[r['pair_id']]}" for r in head["pairs"])
    assert all(r["predicted"] in ("icu = yes", "icu = no") for r in head["pairs"])
    c = head["confusion"]
    assert c["tp"] + c["fn"] == target["positive_pairs"] and c["fp"] + c["tn"] == target["negative_pairs"]
    assert "icu = yes (positive) vs icu = no" in head["method"]
    # the change analysis keeps the radiological outcome
    assert {r["group1"] for r in results["group_differences"]} <= {"Worse", "Stable"}
    # the decision curve and the added-value models predict the same target on the same pairs
    dca = results["decision_curve"]["protocols"][pred["headline"]]
    assert dca["n"] == len(truth) and dca["prevalence"] == pytest.approx(target["positive_pairs"] / len(truth))
    av = results["added_value"]
    assert av["pairs_in_prediction"] == len(truth)
    assert {r["pair_id"]: r["outcome"] for r in av["pairs"]} == {k: f"icu = {v}" for k, v in truth.items()}
    rows = pd.read_csv(out / "tables" / "predictions.csv", dtype={"pair_id": str})
    rows = rows[rows.protocol == pred["headline"]]
    assert dict(zip(rows.pair_id, rows.outcome)) == {k: int(v == "yes") for k, v in truth.items()}
    assert results["provenance"]["options"]["target"] == "icu"
    assert results["provenance"]["options"]["positive"] == "yes"


def test_the_probabilities_are_the_protocols_on_the_target(target_run):
    """The headline's out-of-fold probabilities equal lopo_predict run directly on the first CXRs and the target."""
    from covreport.stats.lopo import lopo_predict
    from covreport.stats.prediction import PRIMARY_PROTOCOL

    out, table, _ = target_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    head = results["prediction"][PRIMARY_PROTOCOL]
    scores = pd.read_csv(out.parent / "scores.csv").set_index("image")
    feats = [c for c in scores.columns if c.startswith("feat_")]
    first = dict(zip(table.pair_id, table.first_image))
    ids = [r["pair_id"] for r in head["pairs"]]                      # canonical order
    X = scores.loc[[first[i] for i in ids], feats].to_numpy(dtype=float)
    y = np.array([r["outcome"] == "icu = yes" for r in head["pairs"]], dtype=int)
    groups = np.array([r["patient_id"] for r in head["pairs"]], dtype=object)
    direct = lopo_predict(X, y, groups, protocol=PRIMARY_PROTOCOL)
    np.testing.assert_allclose([r["probability"] for r in head["pairs"]], direct["probabilities"], atol=1e-10)


def test_the_report_and_the_summary_name_the_target(target_run):
    out, _, output = target_run
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<strong>Prediction target.</strong>" in page and "the manifest column <code>icu</code>" in page
    assert "Prediction of icu = yes vs icu = no from the first CXR" in page
    assert "a clinical outcome, not the radiological course, was predicted" in page     # the abstract
    assert "Worse vs Improved was predicted" not in page
    assert (out / "figures" / "flow_diagram.png").is_file()
    assert "icu = yes/icu = no pairs" in output
    from covreport.report.checklists import tripod_checklist

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    item = next(r for r in tripod_checklist(results) if r["item"] == "8a")
    assert item["filled"].startswith("the clinical target predicted: the manifest column icu (icu = yes vs icu = no)")


def test_the_flow_diagram_counts_the_pairs_without_the_target(target_run):
    from matplotlib.text import Text

    from covreport.figures import flow_diagram

    out, _, _ = target_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    fig = flow_diagram(results)
    texts = [t.get_text() for t in fig.findobj(Text)]
    n = results["prediction_target"]["pairs_with_target"]
    assert any(t.startswith("Prediction of icu = yes vs icu = no from the first CXR") and f"{n} pairs" in t
               and "icu not recorded: 1 pair, not included" in t for t in texts)
    assert any(t.startswith("Target\nicu = yes: ") for t in texts)


def test_verify_repeats_the_run_with_the_target(target_run):
    out, _, _ = target_run
    res = CliRunner().invoke(main, ["-q", "verify", str(out)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("options,third,message", [
    (["--target", "icu"], False, "{m}: --target icu needs --positive VALUE: the value of the positive class"),
    (["--positive", "yes"], False, "--positive yes is given without --target: name the manifest column that "
                                   "holds the target with --target COLUMN"),
    (["--target", "icuu", "--positive", "yes"], False, "{m}: target column 'icuu' is not in the manifest"),
    (["--target", "icu", "--positive", "Yes"], False,
     "{m}: target column 'icu': no pair has the value 'Yes' given by --positive (its values: 'yes', 'no'); give "
     "the value of the positive class"),
    (["--target", "icu", "--positive", "yes"], True,
     "{m}: line 5, column 'icu': 'maybe' is a third value beside 'yes' and 'no'; a target is binary: fix the "
     "value, or leave the cell blank where the outcome is not known"),
])
def test_a_bad_target_stops_the_run_before_scoring(tmp_path, options, third, message):
    def column(table):
        values = np.where(np.arange(len(table)) % 2 == 0, "yes", "no").astype(object)
        if third:
            values[3] = "maybe"                                       # line 5: the header is line 1
        return values

    manifest, scores, _ = _copy(tmp_path, column)
    res = _run(manifest, scores, tmp_path / "out", *options)
    assert res.exit_code == 1
    assert res.output.replace("\n", " ").startswith("Error: " + message.format(m=manifest))
    assert not (tmp_path / "out").exists()


def test_target_classes_compares_numbers_as_numbers_and_leaves_blanks_out():
    frame = pd.DataFrame({"died": ["1", "0", "1.0", "", " 0 ", None]})
    classes, record = target_classes(frame, "died", "1")
    assert list(classes) == ["died = 1", "died = 0", "died = 1", None, "died = 0", None]
    assert (record["positive_class"], record["negative_class"]) == ("died = 1", "died = 0")
    with pytest.raises(StatsError, match="every recorded value is '1'"):
        target_classes(frame.assign(died=["1", "", "1", "1", "1", "1"]), "died", "1")
    with pytest.raises(StatsError, match=r"^row 2, column 'died': '2' is a third value beside '1' and '0'"):
        target_classes(frame.assign(died=["1", "0", "2", "", "0", "1"]), "died", "1")
