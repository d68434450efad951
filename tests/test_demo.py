"""Known answer of the phantom demo (issue 5): the pipeline finds the effects put there.

The phantom study draws its findings from known amounts, and each pair's
outcome follows from the change of a COVID-like severity that drives Lung
Opacity and Consolidation. If covreport could not recover that, nothing else
it says could be trusted.

The demo runs in the README's default folder ``covreport-demo`` at the
repository root (where the README's first command puts it): a first run
trains (minutes), later runs reuse the weights and the score cache.
"""

from pathlib import Path

import pytest

from covreport.constants import DEFAULT_LABELS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    import json

    from covreport.demo import run_demo

    result = run_demo(ROOT / "covreport-demo", progress=False)
    results = json.loads((result.report / "results.json").read_text(encoding="utf-8"))
    return result, results


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
