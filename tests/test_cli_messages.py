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


def test_run_without_weights_lists_every_way_to_get_scores(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COVREPORT_MODEL_DIR", raising=False)
    manifest = str(Path(__file__).resolve().parents[1] / "data_manifests" / "example" / "manifest.csv")
    result = CliRunner().invoke(main, ["run", manifest, "--out", "out"])
    assert result.exit_code == 1
    err = result.stderr
    assert err.startswith(f"Error: no --weights given and no checkpoint (.pt) in {tmp_path / 'model'}.")
    for text in ("covreport train --chexpert-root DIR --out model/densenet121.pt", "COVREPORT_MODEL_DIR",
                 "--weights FILE", "--scores SCORES.csv", "reviewer mode"):
        assert text in err, text
    assert "covreport demo" not in err
    assert not (tmp_path / "out").exists()

    # once the demo has trained, its weights are named (and not used on their own)
    from covreport.demo import weights_path

    weights_path().parent.mkdir(parents=True)
    weights_path().write_bytes(b"")
    result = CliRunner().invoke(main, ["run", manifest, "--out", "out"])
    assert result.exit_code == 1
    assert "The weights `covreport demo` trained are at covreport-demo/model/densenet121-phantom.pt" \
        in result.stderr
