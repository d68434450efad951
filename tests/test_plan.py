"""covreport/plan.py and ``covreport plan``: how many pairs and patients a revalidation needs (issue 22.5)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport._io import written_files
from covreport.cli import main
from covreport.constants import DEFAULT_LABELS, feature_columns
from covreport.pipeline import RunOptions, run
from covreport.plan import make_plan
from covreport.stats import sample_size as ss


def _study(folder, n_patients=30, seed=3):
    """Reviewer-mode study, 1-3 pairs per patient, a noisy Edema change and noisy predictive features."""
    rng = np.random.default_rng(seed)
    rows, images = [], []
    for p in range(n_patients):
        outcome = "Worse" if p % 2 else "Improved"
        for k in range(1 + p % 3):
            a, b = f"P{p}_{k}a.png", f"P{p}_{k}b.png"
            rows.append({"pair_id": f"P{p}-{k}", "patient_id": f"P{p}", "first_image": a, "second_image": b,
                         "outcome": outcome})
            images += [(a, outcome, "first"), (b, outcome, "second")]
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    scores = pd.DataFrame({"image": [i for i, _o, _w in images]})
    for lab in DEFAULT_LABELS:
        scores[lab] = rng.random(len(images)) * 0.2 + 0.4
    shift = np.array([(0.1 if o == "Worse" else -0.1) if w == "second" else 0.0 for _i, o, w in images])
    scores["Edema"] = 0.5 + shift + rng.normal(0, 0.1, len(images))
    feats = pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())
    worse = np.array([float(o == "Worse") for _i, o, _w in images])
    for j in range(100):  # a signal spread over 100 features, as L2 penalisation finds it
        feats[f"feat_{j:04d}"] = np.abs(worse + rng.normal(0, 1.1, len(images)))
    path = folder / "scores.csv"
    pd.concat([scores, feats], axis=1).to_csv(path, index=False)
    return manifest, path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    manifest, scores = _study(tmp)
    return run(RunOptions(manifest=manifest, out=tmp / "out", scores=scores, permutations=0, bootstrap=10,
                          pdf=False))


def _results(folder):
    return json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))


def test_run_stores_the_plan_at_the_default_targets(folder):
    results = _results(folder)
    stored = results.pop("sample_size")
    assert json.loads(json.dumps(make_plan(results))) == stored
    assert stored["targets"] == {"half_width": 0.05, "power": 0.8, "alpha": 0.05, "shrinkage": 0.9}
    table = pd.read_csv(Path(folder) / "tables" / "sample_size.csv")
    assert set(table["part"]) == {"accuracy", "change", "change, prespecified theta", "model"}


def test_accuracy_sizes_follow_buderer_and_hanley_mcneil(folder):
    results = _results(folder)
    plan = make_plan(results)
    acc = plan["accuracy"]
    block = results["prediction"][results["prediction"]["headline"]]
    c = block["confusion"]
    prev = (c["tp"] + c["fn"]) / block["n_pairs"]
    assert acc["prevalence"] == prev
    per_patient = block["n_pairs"] / block["n_patients"]
    rows = {r["measure"]: r for r in acc["rows"]}
    for measure, share, cls in (("sensitivity", prev, "Worse"), ("specificity", 1 - prev, "Improved")):
        r = rows[measure]
        cv = block["cv_intervals"][measure]
        assert r["estimate"] == block["metrics"][measure]["estimate"]
        m = pd.Series([p["patient_id"] for p in block["pairs"] if p["outcome"] == cls]).value_counts()
        largest = float((m ** 2).sum() / m.sum())  # Kish's design effect at intra-patient correlation 1
        assert r["design_effect"] == min(max(cv["design_effect"], 1.0), largest)
        assert r["conservative_value"] == min(max(0.5, cv["ci_low"]), cv["ci_high"])
        for value, key in ((r["estimate"], ""), (r["conservative_value"], "_conservative")):
            n = ss.diagnostic_n(value, share, 0.05)
            assert r["pairs" + key] == math.ceil(n * r["design_effect"] - 1e-9)
            assert r["patients" + key] == math.ceil(r["pairs" + key] / per_patient - 1e-9)
    auc = rows["auc"]
    m = pd.Series([p["patient_id"] for p in block["pairs"]]).value_counts()
    largest = float((m ** 2).sum() / m.sum())
    assert auc["design_effect"] == pytest.approx(
        min(max((block["auc_clustered"]["se"] / block["auc"]["se"]) ** 2, 1.0), largest), rel=1e-12)
    n = ss.auc_n(auc["estimate"], prev, 0.05)
    assert auc["pairs"] == math.ceil(n * auc["design_effect"] - 1e-9)


def _delong_var_explicit(x, y):
    """DeLong's variance of theta written out from its structural components, O(n1 n2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(y)


def test_change_power_follows_noether_with_the_measured_design_effect(folder):
    results = _results(folder)
    plan = make_plan(results)
    rows = [r for r in plan["change"]["rows"] if r["contrast"] == "Worse vs Improved"]
    tested = [r for r in results["group_differences_clustered"]
              if r["contrast"] == "Worse vs Improved" and r["status"] == "tested"]
    assert len(rows) == len(tested)
    pairs = results["pairs"]
    for r, g in zip(rows, tested):
        assert r["label"] == g["label"]
        if r["note"] is not None:
            continue
        x = [p[f"{g['label']} change"] for p in pairs if p["outcome"] == "Worse"]
        y = [p[f"{g['label']} change"] for p in pairs if p["outcome"] == "Improved"]
        m = pd.Series([p["patient_id"] for p in pairs if p["outcome"] in ("Worse", "Improved")]).value_counts()
        largest = float((m ** 2).sum() / m.sum())
        assert r["design_effect"] == pytest.approx(
            min(max(g["se"] ** 2 / _delong_var_explicit(x, y), 1.0), largest), rel=1e-9)
        a = 0.05 / len(tested)
        assert r["alpha_per_test"] == a
        c = g["n1"] / (g["n1"] + g["n2"])
        n = ss.noether_n(g["theta"], c, a, 0.8)
        assert r["pairs_for_power"] == math.ceil(n * r["design_effect"] - 1e-9)
        bound = min(max(0.5, g["ci_low"]), g["ci_high"])
        assert r["conservative_value"] == bound
        if bound == 0.5:
            assert r["pairs_for_power_conservative"] is None
        else:
            n = ss.noether_n(bound, c, a, 0.8)
            assert r["pairs_for_power_conservative"] == math.ceil(n * r["design_effect"] - 1e-9)
        powers = [p["power"] for p in r["power_at"]]
        assert powers == sorted(powers) and [p["multiple"] for p in r["power_at"]] == [2, 5, 10]
    grid = [x for x in plan["change"]["grid"] if x["contrast"] == "Worse vs Improved"]
    deff = max(r["design_effect"] for r in rows if r["note"] is None)
    assert [x["theta"] for x in grid] == [0.65, 0.7, 0.8]
    assert all(x["design_effect"] == deff for x in grid)


def test_model_size_follows_riley(folder):
    results = _results(folder)
    plan = make_plan(results)
    mo = plan["model"]
    block = results["prediction"][results["prediction"]["headline"]]
    assert mo["candidate_predictors"] == block["events_per_candidate_predictor"]["candidate_predictors"]
    assert (mo["planning_value"], mo["planning_source"]) == (mo["cstatistic"], "estimate")
    r2 = ss.cstatistic_to_r2(mo["planning_value"], mo["prevalence"])
    assert mo["n_independent"] == ss.riley_binary(r2, mo["candidate_predictors"], mo["prevalence"])["n"]
    assert mo["pairs"] == math.ceil(mo["n_independent"] * mo["design_effect"] - 1e-9)
    minority = min(mo["prevalence"], 1 - mo["prevalence"])  # events: the less frequent class
    assert mo["events_per_parameter"] == mo["n_independent"] * minority / mo["candidate_predictors"]


def test_an_estimate_of_one_is_planned_at_its_ci_bound():
    results = {"prediction": {"headline": "p", "positive_class": "Worse", "negative_class": "Improved", "p": {
        "n_pairs": 20, "n_patients": 10, "confusion": {"tp": 10, "fn": 0, "fp": 2, "tn": 8},
        "metrics": {"sensitivity": {"estimate": 1.0, "ci_low": 0.69, "ci_high": 1.0},
                    "specificity": {"estimate": 0.8, "ci_low": 0.44, "ci_high": 0.97}},
        "auc": {"auc": 0.9, "se": 0.05}, "pairs": [{"patient_id": f"P{i // 2}", "outcome": "Worse" if i < 10
                                                    else "Improved"} for i in range(20)]}}}
    plan = make_plan(results)
    sens = plan["accuracy"]["rows"][0]
    assert sens["conservative_value"] == 0.69 and sens["pairs"] is None  # no variance at 1: only the CI value
    assert sens["pairs_conservative"] == math.ceil(ss.diagnostic_n(0.69, 0.5, 0.05) * 2.0 - 1e-9)
    # no measured design effect: the largest, 2 pairs per patient -> 2
    assert (sens["design_effect"], sens["design_effect_source"]) == (2.0, "largest (intra-patient correlation 1)")
    assert plan["model"]["not_available"] == "results.json has no valid prediction.events_per_candidate_predictor" \
        ".candidate_predictors"
    assert "not_available" in plan["change"]


def test_no_model_plan_on_a_protocol_below_chance():
    block = {"n_pairs": 20, "n_patients": 20, "confusion": {"tp": 10, "fn": 0, "fp": 10, "tn": 0},
             "metrics": {"sensitivity": {"estimate": 1.0, "ci_low": 0.69, "ci_high": 1.0},
                         "specificity": {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.31}},
             "auc": {"auc": 0.43, "se": 0.1}, "events_per_candidate_predictor": {"candidate_predictors": 8},
             "pairs": [{"patient_id": f"P{i}", "outcome": "Worse" if i < 10 else "Improved"} for i in range(20)]}
    results = {"prediction": {"headline": "p", "positive_class": "Worse", "negative_class": "Improved", "p": block}}
    assert "no value above 0.5" in make_plan(results)["model"]["not_available"]
    block["informative"] = False
    assert "not informative" in make_plan(results)["model"]["not_available"]


@pytest.mark.parametrize("results", [
    {},
    {"prediction": {"headline": "p", "p": "x"}, "group_differences_clustered": 5},
    {"prediction": {"headline": "p", "positive_class": "W", "negative_class": "I",
                    "p": {"n_pairs": float("nan"), "n_patients": True}}},
    {"prediction": {"headline": ["p"]}, "group_differences_clustered": [{"status": "tested", "contrast": "a",
                                                                          "label": "L", "theta": "0.7"}]},
])
def test_untrusted_results_give_reasons_not_tracebacks(results):
    plan = make_plan(results)
    for part in ("accuracy", "change", "model"):
        assert "not_available" in plan[part] or all(r.get("note") for r in plan[part]["rows"])


def test_cli_prints_the_table_and_writes_plan_json_beside_results(folder, tmp_path):
    res = CliRunner().invoke(main, ["plan", str(folder), "--half-width", "0.1"])
    assert res.exit_code == 0, res.output
    assert "sensitivity" in res.output and "Prediction model, developed anew (Riley et al. 2020)" in res.output
    written = Path(folder) / "plan.json"
    plan = json.loads(written.read_text(encoding="utf-8"))
    assert plan["targets"]["half_width"] == 0.1
    assert "plan.json" in written_files(folder)  # covreport's marker lists it: `run --force` may replace it
    again = CliRunner().invoke(main, ["plan", str(folder), "--json"])  # covreport's own plan.json is replaced
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["targets"]["half_width"] == 0.05
    assert json.loads(written.read_text(encoding="utf-8"))["targets"]["half_width"] == 0.05


def test_cli_never_replaces_a_file_covreport_did_not_write(folder, tmp_path):
    (tmp_path / "results.json").write_bytes((Path(folder) / "results.json").read_bytes())
    mine = tmp_path / "plan.json"
    mine.write_text("my notes", encoding="utf-8")
    res = CliRunner().invoke(main, ["plan", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output == f"Error: {mine} exists; choose another --out or add --force to replace it\n"
    assert mine.read_text(encoding="utf-8") == "my notes"
    res = CliRunner().invoke(main, ["plan", str(tmp_path), "--out", str(tmp_path / "results.json"), "--force"])
    assert res.exit_code == 1
    assert "would overwrite the input" in res.output
    res = CliRunner().invoke(main, ["plan", str(tmp_path), "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads(mine.read_text(encoding="utf-8"))["targets"]["power"] == 0.8


def test_cli_errors(tmp_path):
    (tmp_path / "results.json").write_text("[1, 2]", encoding="utf-8")
    res = CliRunner().invoke(main, ["plan", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {tmp_path / 'results.json'} holds a JSON list, not an object")
    res = CliRunner().invoke(main, ["plan", str(tmp_path), "--power", "1.5"])
    assert res.exit_code == 2
    (tmp_path / "results.json").write_text("{}", encoding="utf-8")
    res = CliRunner().invoke(main, ["plan", str(tmp_path), "--power", "0.01", "--alpha", "0.05"])
    assert res.exit_code == 1
    assert res.output == "Error: power (0.01) must exceed alpha (0.05)\n"


def test_report_has_the_sample_size_section(folder):
    html = (Path(folder) / "report.html").read_text(encoding="utf-8")
    assert "Sample size for revalidation" in html and "Table 5. Pairs needed" in html
    assert "Riley et al." in html
