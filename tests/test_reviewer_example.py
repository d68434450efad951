"""Issue 21.4: the reviewer-mode example runs as is, and its script regenerates its files exactly."""

import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

from covreport.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "data_manifests" / "reviewer_example"
FILES = ("manifest.csv", "scores.csv", "validation.csv", "validation_scores.csv", "reference.csv")


def test_the_script_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_reviewer_example", EXAMPLE / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


def test_the_example_runs_with_one_command_and_is_stard_complete(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    e = EXAMPLE
    res = CliRunner().invoke(main, [
        "-q", "run", str(e / "manifest.csv"), "--scores", str(e / "scores.csv"),
        "--validation-csv", str(e / "validation.csv"), "--validation-scores", str(e / "validation_scores.csv"),
        "--reference-csv", str(e / "reference.csv"), "--study", str(e / "study.toml"),
        "--permutations", "20", "--bootstrap", "50", "--no-pdf", "--out", "reviewer-report"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "reviewer-report" / "report.html").read_text(encoding="utf-8")
    assert "SYNTHETIC DATA (phantom study)" in html
    assert "34 of 34 items are complete; 0 need the authors." in html
    # CLAIM 2024 and STARD-AI (Appendix C): complete in reviewer mode, the model items from study.toml index_test
    assert "44 of 44 items are complete or not applicable; 0 need the authors." in html
    assert "48 of 48 sub-items (40 items) are complete or not applicable; 0 need the authors." in html
    for name in ("subgroups.csv", "failure_analysis.csv"):
        assert (tmp_path / "reviewer-report" / "tables" / name).is_file(), name
    results = json.loads((tmp_path / "reviewer-report" / "results.json").read_text(encoding="utf-8"))
    assert results["provenance"]["synthetic"] is True
    assert results["validation_auc"], "per-label validation AUCs are computed"
    assert (results["flow"]["pairs_analysed"], results["flow"]["patients_analysed"]) == (60, 40)
    assert [row["group"] for row in results["table1"]][-1] == "Reference (CheXpert)"
