"""Known answer of the phantom demo (issue 5): the pipeline finds the effects put there.

The phantom study draws its findings from known amounts, and each pair's
outcome follows from the change of a COVID-like severity that drives Lung
Opacity and Consolidation. If covreport could not recover that, nothing else
it says could be trusted.

The demo runs once per test session in a temporary folder (the session
fixture ``phantom_demo`` of conftest.py; it trains for a minute or two), never
in the checkout, where the user's own ``covreport-demo/`` must stay as it is.
"""

import pytest

from covreport.constants import DEFAULT_LABELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(phantom_demo):
    import json

    results = json.loads((phantom_demo.report / "results.json").read_text(encoding="utf-8"))
    return phantom_demo, results


def test_demo_writes_the_whole_report(demo):
    result, results = demo
    for name in ("report.html", "report.pdf", "results.json", "tables/table1.csv",
                 "tables/group_differences.csv", "figures/flow_diagram.png", "figures/roc_curves.png",
                 "figures/class_activation_maps.png"):
        assert (result.report / name).is_file(), name
    assert results["provenance"]["synthetic"] is True
    assert "synthetic" in (result.report / "report.html").read_text(encoding="utf-8").lower()
    assert result.command.startswith("covreport run ")


def test_validation_auc_at_least_085_for_six_labels(demo):
    _, results = demo
    aucs = {r["label"]: r["auc"] for r in results["validation_auc"]}
    assert set(aucs) == set(DEFAULT_LABELS)
    good = [lab for lab, auc in aucs.items() if auc is not None and auc >= 0.85]
    assert len(good) >= 6, aucs


def test_worse_vs_improved_change_significant_for_consolidation_and_opacity(demo):
    _, results = demo
    rows = {(r["contrast"], r["label"]): r for r in results["group_differences"]}
    for label in ("Consolidation", "Lung Opacity"):
        row = rows[("Worse vs Improved", label)]
        assert row["p"] < 0.05, row
        # The phantom's Worse pairs gain severity, its Improved pairs lose it.
        assert row["median1"] > row["median2"], row


def test_lopo_accuracy_above_majority_rate(demo):
    _, results = demo
    nested = results["prediction"]["nested"]
    c = nested["confusion"]
    n = c["tp"] + c["fp"] + c["fn"] + c["tn"]
    majority = max(c["tp"] + c["fn"], c["fp"] + c["tn"]) / n
    assert nested["metrics"]["accuracy"]["estimate"] > majority, (nested["metrics"]["accuracy"], majority)


def test_the_clinical_predictors_have_their_known_contribution(demo):
    """crp carries the outcome and temperature nothing (phantom.CLINICAL); the images carry more than both."""
    _, results = demo
    av = results["added_value"]
    assert [p["name"] for p in av["predictors"]] == ["crp", "temperature"]
    models = av["models"]
    assert models["clinical"]["auc"]["ci_low"] > 0.5, models["clinical"]["auc"]     # crp beats chance
    assert models["combined"]["auc"]["auc"] >= models["clinical"]["auc"]["auc"]
    t1c = {(r["predictor"], r["group"]): r for r in results["table1_predictors"]}
    assert t1c[("crp", "Worse")]["median"] > t1c[("crp", "Improved")]["median"]
    assert "--predictors crp,temperature" in results["provenance"]["command"]


def test_demo_keeps_only_the_best_checkpoint(demo):
    result, _ = demo
    model = result.report.parent / "model"
    assert sorted(p.name for p in model.iterdir()) == [
        "densenet121-phantom.pt", "densenet121-phantom.validation_auc.csv",
        "densenet121-phantom.validation_scores.csv"]


def test_demo_commands_name_its_own_folder(demo):
    """Regenerate and verify commands: the demo's folder, never a file inside the installed package (issue 21.3)."""
    import shlex

    from covreport.demo import DEMO_STUDY_TOML
    from covreport.phantom import PAIRS_DIRNAME

    result, results = demo
    args = shlex.split(result.command)
    assert str(DEMO_STUDY_TOML) not in result.command
    assert args[args.index("--study") + 1] == str(result.report.parent / "study.toml")
    assert result.verify_command == shlex.join(["covreport", "verify", str(result.report), "--cache",
                                                str(result.report.parent / "cache.sqlite")])
    inputs = results["provenance"]["inputs"]
    assert inputs["study"]["from_results"] == "../study.toml"
    assert inputs["manifest"]["from_results"] == f"../study/{PAIRS_DIRNAME}/manifest.csv"
    assert inputs["weights"]["from_results"] == "../model/densenet121-phantom.pt"


def test_the_demo_verifies_from_its_folder_alone(demo):
    """The printed verify command re-derives every number from the folder and the demo's score cache."""
    import shlex

    from click.testing import CliRunner

    from covreport.cli import main

    result, _ = demo
    res = CliRunner().invoke(main, shlex.split(result.verify_command)[1:] + ["-q"])
    assert res.exit_code == 0, res.output
    assert "\nverified: " in res.output and "input weights: " in res.output


def test_verify_command_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from covreport.demo import shown_path, verify_command

    monkeypatch.chdir(tmp_path)
    assert verify_command(tmp_path / "covreport-demo" / "report", Path("covreport-demo/cache.sqlite")) == (
        "covreport verify covreport-demo/report --cache covreport-demo/cache.sqlite")
    assert verify_command(tmp_path / "my demo" / "report", tmp_path / "my demo" / "cache.sqlite") == (
        "covreport verify 'my demo/report' --cache 'my demo/cache.sqlite'")
    # Outside the current folder a path stays absolute (a relative one would climb with ..).
    assert shown_path(tmp_path.parent / "x") == tmp_path.parent / "x"


@pytest.fixture(scope="module")
def site_demo(phantom_demo):
    """``covreport demo --sites`` in the session demo's folder (its trained weights), without resampling."""
    import json

    from covreport.demo import run_demo

    result = run_demo(phantom_demo.report.parent, permutations=0, bootstrap=0, progress=False, sites=True)
    return result, json.loads((result.report / "results.json").read_text(encoding="utf-8"))


def test_the_site_demo_shows_the_shifted_site_in_the_heterogeneity(site_demo):
    """Hospital C admits later (phantom.SITES): its first CXR tells Worse from Improved less well, which the
    site meta-analysis must show; the other analyses of the next study run on the same pairs."""
    result, results = site_demo
    assert result.report.name == "report-sites" and (result.report.parent / "study-sites.toml").is_file()
    assert "--validation leave-one-site-out" in result.command
    sites = results["sites"]
    auc = {row["site"]: row["auc"] for row in sites["rows"]}
    assert set(auc) == {"Hospital A", "Hospital B", "Hospital C"} and all(r["pooled"] for r in sites["rows"])
    assert min(auc, key=auc.get) == "Hospital C", auc
    meta = sites["meta"]["auc"]["estimators"]["Paule-Mandel"]
    assert meta["k"] == 3 and meta["i2"] > 0.5, meta
    assert sites["iecv"]["n_sites"] == 3
    assert results["added_value"]["models"]["clinical"]["auc"]["ci_low"] > 0.5   # crp beats chance here too
    for name in ("figures/site_forest.png", "figures/site_forest_iecv.png", "tables/sites.csv", "report.html"):
        assert (result.report / name).is_file(), name
    html = (result.report / "report.html").read_text(encoding="utf-8")
    assert "Hospital C" in html and "three sites" in html
    assert "<td><span class=\"nw\">Hospital A</span></td>" in html       # a short site name is never broken
