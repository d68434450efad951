"""Messages of the commands a new user tries first (issue 14): what they print and where."""

import json

from click.testing import CliRunner

from covreport.cli import main


def test_diagnostic_json_carries_the_counts_prevalence_and_alpha():
    result = CliRunner().invoke(main, ["diagnostic", "--tp", "40", "--fp", "3", "--fn", "4", "--tn", "5",
                                       "--alpha", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["table"] == {"tp": 40, "fp": 3, "fn": 4, "tn": 5, "n": 52}
    assert out["prevalence"] == {"value": 44 / 52, "source": "table: (TP+FN)/N"}
    assert out["alpha"] == 0.1 and abs(out["confidence_level"] - 0.9) < 1e-12
    # accuracy = (TP + TN) / N by hand
    assert abs(out["measures"]["accuracy"]["estimate"] - 45 / 52) < 1e-12
    assert set(out["measures"]) == {"accuracy", "sensitivity", "specificity", "ppv", "npv",
                                    "lr_positive", "lr_negative"}


def test_diagnostic_json_names_a_given_prevalence():
    result = CliRunner().invoke(main, ["diagnostic", "--tp", "40", "--fp", "3", "--fn", "4", "--tn", "5",
                                       "--prevalence", "0.2", "--json"])
    out = json.loads(result.stdout)
    assert out["prevalence"] == {"value": 0.2, "source": "given (--prevalence)"}
    assert out["alpha"] == 0.05
