"""covreport/summary.py and ``covreport summary``: the headline of a results folder (issue 21.2, 21.7)."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.constants import DEFAULT_LABELS, feature_columns
from covreport.pipeline import RunOptions, run
from covreport.summary import ALPHA, ResultsError, format_summary, read_results, summarise


def _study(folder, pairs_per_patient, n_patients=24, seed=0):
    """A reviewer-mode study whose Edema change separates Worse from Improved; returns (manifest, scores)."""
    rng = np.random.default_rng(seed)
    rows, images = [], []
    for p in range(n_patients):
        outcome = ("Worse", "Improved")[p % 2]
        for k in range(pairs_per_patient):
            a, b = f"P{p}_{k}a.png", f"P{p}_{k}b.png"
            rows.append({"pair_id": f"P{p}-{k}", "patient_id": f"P{p}", "first_image": a, "second_image": b,
                         "outcome": outcome})
            images += [(a, outcome, "first"), (b, outcome, "second")]
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    scores = pd.DataFrame({"image": [i for i, _o, _w in images]})
    for lab in DEFAULT_LABELS:
        scores[lab] = rng.random(len(images)) * 0.2 + 0.4
    shift = np.array([(0.3 if o == "Worse" else -0.3) if w == "second" else 0.0 for _i, o, w in images])
    scores["Edema"] = 0.5 + shift + rng.normal(0, 0.02, len(images))
    feats = pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())
    feats["feat_0000"] = [1.0 if o == "Worse" else 0.0 for _i, o, _w in images]  # the prediction can learn
    path = folder / "scores.csv"
    pd.concat([scores, feats], axis=1).to_csv(path, index=False)
    return manifest, path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two results folders: one pair per patient (pair unit) and two per patient (patient unit)."""
    out = {}
    for name, k, resamples in (("pair", 1, 0), ("patient", 2, 10)):  # (the bootstrap refits: few resamples)
        tmp = tmp_path_factory.mktemp(name)
        manifest, scores = _study(tmp, k)
        out[name] = run(RunOptions(manifest=manifest, out=tmp / "out", scores=scores, permutations=0,
                                   bootstrap=resamples, pdf=False))
    return out


def _results(folder):
    return json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("unit", ["pair", "patient"])
def test_significant_labels_are_those_holm_keeps(folders, unit):
    # Reference: statsmodels' Holm adjustment of the raw p-values stored in results.json.
    from statsmodels.stats.multitest import multipletests

    folder = folders[unit]
    results = _results(folder)
    s = summarise(folder)
    assert s["primary_unit"] == unit == results["primary_analysis"]["unit"]
    rows = results["group_differences_clustered" if unit == "patient" else "group_differences"]
    for c in s["contrasts"]:
        tested = [r for r in rows if r["contrast"] == c["contrast"] and r["p"] is not None]
        assert c["labels_tested"] == len(tested)
        if not tested:
            continue
        keep = multipletests([r["p"] for r in tested], alpha=ALPHA, method="holm")[0]
        expected = {r["label"] for r, k in zip(tested, keep) if k}
        assert {x["label"] for x in c["significant"]} == expected
    worse_improved = [c for c in s["contrasts"] if c["contrast"] == "Worse vs Improved"][0]
    assert [x["label"] for x in worse_improved["significant"]] == ["Edema"]
    effect = worse_improved["significant"][0]["effect"]
    if unit == "patient":  # theta = U/(n1 n2): every Worse change exceeds every Improved change
        assert effect["name"] == "theta" and effect["estimate"] == pytest.approx(1.0)
    else:  # Hedges' g: Cohen's d with the pooled SD (ddof 1) times J = 1 - 3/(4(n1+n2) - 9), written out
        assert effect["name"] == "Hedges' g"
        pairs = pd.DataFrame(results["pairs"])
        x = pairs.loc[pairs["outcome"] == "Worse", "Edema change"]
        y = pairs.loc[pairs["outcome"] == "Improved", "Edema change"]
        pooled = np.sqrt(((len(x) - 1) * x.var() + (len(y) - 1) * y.var()) / (len(x) + len(y) - 2))
        j = 1 - 3 / (4 * (len(x) + len(y)) - 9)
        assert effect["estimate"] == pytest.approx(j * (x.mean() - y.mean()) / pooled, rel=1e-9)


def test_prediction_of_the_headline_protocol_with_intervals(folders):
    # References: sklearn accuracy_score and roc_auc_score on the stored out-of-fold predictions;
    # statsmodels' Clopper-Pearson interval (proportion_confint method="beta").
    from sklearn.metrics import accuracy_score, roc_auc_score
    from statsmodels.stats.proportion import proportion_confint

    folder = folders["pair"]
    results = _results(folder)
    s = summarise(folder)["prediction"]
    block = results["prediction"][results["prediction"]["headline"]]
    rows = [r for r in block["pairs"] if r["predicted"] is not None]
    y = [r["outcome"] == "Worse" for r in rows]
    acc = accuracy_score(y, [r["predicted"] == "Worse" for r in rows])
    assert s["protocol"] == results["prediction"]["headline"]
    assert s["accuracy"]["estimate"] == pytest.approx(acc)
    low, high = proportion_confint(round(acc * len(rows)), len(rows), method="beta")
    assert (s["accuracy"]["ci_low"], s["accuracy"]["ci_high"]) == pytest.approx((low, high))
    assert s["auc"]["estimate"] == pytest.approx(roc_auc_score(y, [r["probability"] for r in rows]))
    assert s["auc"]["unit"] == "pair"
    # patient unit: the bootstrap's percentile interval of the accuracy and Obuchowski's AUC
    r2 = _results(folders["patient"])
    s2 = summarise(folders["patient"])["prediction"]
    head = r2["prediction"]["headline"]
    assert (s2["accuracy"]["ci_low"], s2["accuracy"]["ci_high"]) == \
        (r2["bootstrap"]["prediction"][head]["accuracy"]["ci_low"], r2["bootstrap"]["prediction"][head]["accuracy"]["ci_high"])
    assert s2["auc"]["ci_low"] == r2["prediction"][head]["auc_clustered"]["ci_low"]


def test_the_headline_protocol_is_read_from_results_json(folders, tmp_path):
    # Another protocol may become the default: the summary follows results.json, not a name in the code.
    results = _results(folders["pair"])
    pred = results["prediction"]
    new = copy.deepcopy(pred[pred["headline"]])
    new["metrics"]["accuracy"]["estimate"] = 0.123
    pred["penalised"] = new
    pred["headline"] = "penalised"
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    s = summarise(tmp_path)["prediction"]
    assert s["protocol"] == "penalised" and s["accuracy"]["estimate"] == 0.123
    assert "Prediction  penalised protocol" in format_summary(summarise(tmp_path))


def test_text_names_counts_results_and_files(folders):
    folder = folders["pair"]
    text = format_summary(summarise(folder))
    lines = text.splitlines()
    assert lines[0] == "Analysed    24 pairs of 24 patients; in the manifest 24 pairs of 24 patients"
    assert any(line.startswith("    Edema: Hedges' g ") and "Holm p" in line for line in lines)
    assert lines[-3:] == [f"Report      {folder / 'report.html'}",
                          "PDF         none in the folder (the run had --no-pdf?)",
                          f"Results     {folder / 'results.json'}"]


def test_missing_parts_are_named_not_a_traceback(tmp_path):
    (tmp_path / "results.json").write_text('{"flow": {"pairs_analysed": 3}}', encoding="utf-8")
    result = CliRunner().invoke(main, ["summary", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Analysed    3 pairs of ? patients" in result.stdout
    assert "Missing     'prediction' is not in results.json" in result.stdout
    assert "Missing     'primary_analysis.unit' is not in results.json" in result.stdout
    # wrong types anywhere are treated as missing
    (tmp_path / "results.json").write_text(json.dumps({
        "flow": [], "primary_analysis": {"unit": "patient"}, "group_differences_clustered": [1, {"contrast": 5}],
        "prediction": {"headline": "nested", "nested": {"metrics": "x"}}}), encoding="utf-8")
    result = CliRunner().invoke(main, ["summary", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Prediction  nested: the nested protocol has no results (it could not run)" in result.stdout


@pytest.mark.parametrize("content, message", [
    (b"not json", "is not valid JSON"),
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_unreadable_results_json_is_one_error_line(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["summary", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {path} ") and message in result.stderr
    assert "Traceback" not in result.output


def test_results_json_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "results.json")
    with pytest.raises(ResultsError, match="is a named pipe"):
        read_results(tmp_path)


def test_escape_sequences_in_results_json_are_not_echoed(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({
        "primary_analysis": {"unit": "pair"},
        "group_differences": [{"contrast": "W\x1b]0;pwned\x07", "label": "E\x1b[2J", "p": 0.001, "p_holm": 0.001,
                               "cohen_d": 1.0}]}), encoding="utf-8")
    result = CliRunner().invoke(main, ["summary", str(tmp_path)])
    assert result.exit_code == 0 and "\x1b" not in result.stdout


def test_json_output_is_the_record(folders):
    result = CliRunner().invoke(main, ["summary", str(folders["pair"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(summarise(folders["pair"])))


def test_alpha_is_the_reports():
    from covreport.report.summaries import ALPHA as REPORT_ALPHA

    assert ALPHA == REPORT_ALPHA


# --- run config: summary --config -> run --config ---------------------------------


def test_run_prints_the_summary_on_stdout_and_config_round_trips(tmp_path, monkeypatch):
    manifest, scores = _study(tmp_path, 1, n_patients=8)
    args = ["--quiet", "run", str(manifest), "--scores", str(scores), "--permutations", "0", "--bootstrap", "3",
            "--no-pdf", "--seed", "3", "--out", str(tmp_path / "a")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == format_summary(summarise(tmp_path / "a"))
    config = CliRunner().invoke(main, ["summary", str(tmp_path / "a"), "--config"])
    assert config.exit_code == 0, config.output
    assert 'manifest = "manifest.csv"\nscores = "scores.csv"\n' in config.stdout
    assert "seed = 3\n" in config.stdout and "bootstrap = 3\n" in config.stdout
    (tmp_path / "run.toml").write_text(config.stdout, encoding="utf-8")
    # from another folder: the config's relative paths start at its own folder; the command line overrides it
    monkeypatch.chdir(tmp_path / "a")
    again = CliRunner().invoke(main, ["-q", "run", "--config", str(tmp_path / "run.toml"), "--no-pdf",
                                      "--bootstrap", "4", "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert b["provenance"]["options"] == {**a["provenance"]["options"], "bootstrap": 4}
    assert b["group_differences"] == a["group_differences"] and b["flow"] == a["flow"]
    head = a["prediction"]["headline"]
    assert b["prediction"][head]["metrics"]["accuracy"] == a["prediction"][head]["metrics"]["accuracy"]


@pytest.mark.parametrize("text, message", [
    ("permutation = 3\n", "run.toml: unknown key 'permutation' -- did you mean 'permutations'?"),
    ('permutations = "3"\n', "run.toml: permutations = '3' -- give a number, without quotes"),
    ("permutations = -1\n", "run.toml: permutations = -1 -- -1 is not in the range 0<=x<=100000."),
    ("no_pdf = 1\n", "run.toml: no_pdf = 1 -- give true or false"),
    ('previous = "a.json"\n', "run.toml: previous = 'a.json' -- give a list"),
    ("seed = [1]\n", "run.toml: seed = [1] -- give a "),
    ("permutations = \n", "run.toml: not valid TOML"),
])
def test_bad_run_config_is_a_usage_error_naming_the_key(tmp_path, monkeypatch, text, message):
    (tmp_path / "run.toml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--config", "run.toml"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_summary_config_of_a_folder_without_provenance_says_so(tmp_path):
    (tmp_path / "results.json").write_text("{}", encoding="utf-8")
    result = CliRunner().invoke(main, ["summary", str(tmp_path), "--config"])
    assert result.exit_code == 1
    assert "provenance.inputs.manifest is missing" in result.stderr
