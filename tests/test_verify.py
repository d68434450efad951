"""covreport verify: a reviewer re-derives every number of a submitted folder (issue 15).

Reviewer mode throughout: the folder holds only manifest.csv and scores.csv,
never the images, as a reviewer receives them.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.verify import VerifyError, compare_results, verify

from test_pipeline import EXAMPLE, _scores


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """A study folder (manifest + scores, no images) and the output of its `covreport run`."""
    import pandas as pd

    tmp = tmp_path_factory.mktemp("verify")
    shutil.copy(EXAMPLE, tmp / "manifest.csv")
    m = pd.read_csv(EXAMPLE)
    _scores(tmp / "scores.csv", sorted(set(m["first_image"]) | set(m["second_image"])))
    res = CliRunner().invoke(main, ["run", str(tmp / "manifest.csv"), "--scores", str(tmp / "scores.csv"),
                                    "--out", str(tmp / "out"), "--permutations", "30", "--seed", "7",
                                    "--no-pdf"])
    assert res.exit_code == 0, res.output
    return tmp


def _copy(submitted, tmp_path):
    shutil.copytree(submitted / "out", tmp_path / "out")
    return tmp_path / "out"


def _verify(folder, submitted, *extra):
    return CliRunner().invoke(main, ["verify", str(folder), "--manifest", str(submitted / "manifest.csv"),
                                     "--scores", str(submitted / "scores.csv"), *extra])


def test_untouched_folder_verifies(submitted):
    res = _verify(submitted / "out", submitted)
    assert res.exit_code == 0, res.output
    m = re.search(r"^verified: (\d+) numbers regenerated exactly \(numbers equal within a relative "
                  r"difference of 1e-09", res.output, re.M)
    assert m and int(m.group(1)) > 300
    assert "report.html (its text outside figures)" in res.output
    assert "tables/group_differences.csv" in res.output
    # The recorded options were used: another seed would change the permutation p-values.
    results = json.loads((submitted / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["provenance"]["options"]["seed"] == 7


def test_edited_p_value_is_caught(submitted, tmp_path):
    out = _copy(submitted, tmp_path)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    old = results["group_differences"][0]["p"]
    results["group_differences"][0]["p"] = old / 10
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    res = _verify(out, submitted)
    assert res.exit_code == 1
    assert "NOT verified: 1 difference(s) in results.json" in res.output
    assert f"group_differences[0].p\t{old / 10}\t{old}" in res.output
    # --json carries the same record.
    res = _verify(out, submitted, "--json")
    record = json.loads(res.output[res.output.index("{"):])
    assert record["verified"] is False
    assert record["differences"] == [{"path": "group_differences[0].p", "submitted": old / 10, "regenerated": old}]


def test_edited_report_number_is_caught(submitted, tmp_path):
    out = _copy(submitted, tmp_path)
    html = (out / "report.html").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    n = results["flow"]["pairs_in_manifest"]
    # Change the number of pairs in the manifest wherever the report says it in the flow text.
    edited, k = re.subn(rf"\b{n} pairs\b", f"{n + 40} pairs", html, count=1)
    assert k == 1
    (out / "report.html").write_text(edited, encoding="utf-8")
    res = _verify(out, submitted)
    assert res.exit_code == 1
    assert "0 difference(s) in results.json, 1 in the report files" in res.output
    assert "report.html text line" in res.output and f"{n + 40} pairs" in res.output


def test_edited_table_cell_is_caught(submitted, tmp_path):
    out = _copy(submitted, tmp_path)
    path = out / "tables" / "pairs.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("Worse", "Improved", 1)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = _verify(out, submitted)
    assert res.exit_code == 1
    assert "tables/pairs.csv line 2, column 'outcome'\tImproved\tWorse" in res.output


def test_changed_manifest_is_a_hash_mismatch(submitted, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text((submitted / "manifest.csv").read_text(encoding="utf-8").replace("Stable", "Worse"),
                        encoding="utf-8")
    res = CliRunner().invoke(main, ["verify", str(submitted / "out"), "--manifest", str(manifest),
                                    "--scores", str(submitted / "scores.csv")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: 1 input(s) differ from those of the submitted run:\n"
                                 f"  manifest {manifest}: SHA-256 ")
    assert "give the files the run read, or --ignore-hashes to compare anyway" in res.output
    # With --ignore-hashes the rerun happens and the changed outcome shows as differences.
    res = CliRunner().invoke(main, ["verify", str(submitted / "out"), "--manifest", str(manifest),
                                    "--scores", str(submitted / "scores.csv"), "--ignore-hashes"])
    assert res.exit_code == 1
    assert "input changed: manifest" in res.output and "NOT verified" in res.output


def test_missing_input_is_named(submitted, tmp_path):
    # The manifest alone, the folder moved: the scores file is neither given nor at a recorded path.
    shutil.copy(submitted / "manifest.csv", tmp_path / "manifest.csv")
    moved = tmp_path / "moved" / "out"
    shutil.copytree(submitted / "out", moved)
    with pytest.raises(VerifyError, match=r"the rerun needs these inputs of the submitted run:\n"
                                          r"  --scores: scores.csv, SHA-256 [0-9a-f]{64} \(not found at "):
        verify(moved, {"manifest": tmp_path / "manifest.csv"})


def test_folder_alone_verifies_from_the_recorded_paths(submitted):
    """`covreport verify DIR`: every input is found from results.json (issue 21.3)."""
    results = json.loads((submitted / "out" / "results.json").read_text(encoding="utf-8"))
    inputs = results["provenance"]["inputs"]
    # New keys: relative to the results folder; the old manifest-relative ones are kept.
    assert inputs["manifest"]["from_results"] == "../manifest.csv"
    assert inputs["scores"]["from_results"] == "../scores.csv" and inputs["scores"]["path"] == "scores.csv"
    res = CliRunner().invoke(main, ["verify", str(submitted / "out")])
    assert res.exit_code == 0, res.output
    assert f"input manifest: {submitted / 'manifest.csv'} (found from results.json)" in res.output
    assert f"input scores: {submitted / 'scores.csv'} (found from results.json)" in res.output
    assert "\nverified: " in res.output


def test_options_override_the_recorded_paths(submitted, tmp_path):
    # An explicit --manifest is used as given, not the recorded one (here: a changed copy, so its hash differs).
    manifest = tmp_path / "manifest.csv"
    manifest.write_text((submitted / "manifest.csv").read_text(encoding="utf-8").replace("Stable", "Worse"),
                        encoding="utf-8")
    res = CliRunner().invoke(main, ["verify", str(submitted / "out"), "--manifest", str(manifest)])
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: 1 input(s) differ from those of the submitted run:\n  manifest {manifest}:")


def test_a_recorded_file_whose_hash_differs_is_not_read(submitted, tmp_path):
    # Found through results.json but changed since: refused, even with --ignore-hashes.
    shutil.copy(submitted / "scores.csv", tmp_path / "scores.csv")
    (tmp_path / "manifest.csv").write_text(
        (submitted / "manifest.csv").read_text(encoding="utf-8").replace("Stable", "Worse"), encoding="utf-8")
    out = _copy(submitted, tmp_path)
    res = CliRunner().invoke(main, ["verify", str(out), "--ignore-hashes"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: 1 input(s) at the paths results.json records are not the files the run "
                                 f"read:\n  manifest {tmp_path / 'manifest.csv'} (found from results.json): SHA-256 ")


def test_compare_results_tolerance_and_shape():
    a = {"x": {"p": 0.1, "n": 3, "label": "Edema"}, "provenance": {"created": "a", "options": {"seed": 1}}}
    b = {"x": {"p": 0.1 * (1 + 1e-12), "n": 3, "label": "Edema"},
         "provenance": {"created": "b", "options": {"seed": 1}}}
    assert compare_results(a, b) == ([], 3)  # created is a run fact; 1e-12 relative is equal
    b["x"]["p"] = 0.1 * (1 + 1e-6)
    b["x"]["label"] = "Oedema"
    b["provenance"]["options"]["seed"] = 2
    diffs, _ = compare_results(a, b)
    assert [d["path"] for d in diffs] == ["provenance.options.seed", "x.p", "x.label"]


def test_weights_mode_run_verifies_with_weights_or_a_scores_file(tmp_path):
    """A weights-mode run (tiny random DenseNet, 32 px) re-derived from its weights, or from scores made with them."""
    import torch

    from covreport.images import Preprocessing
    from covreport.model import build_model, save_checkpoint

    labels = ("Cardiomegaly", "Edema", "Pleural Effusion")
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    save_checkpoint(weights, build_model(labels), labels=labels, preprocessing=Preprocessing(size=32))
    study = tmp_path / "study"
    shutil.copytree(EXAMPLE.parent, study)
    runner = CliRunner()
    cache = str(tmp_path / "cache.sqlite")
    res = runner.invoke(main, ["run", str(study / "manifest.csv"), "--weights", str(weights), "--cache", cache,
                               "--out", str(tmp_path / "out"), "--permutations", "20", "--no-pdf"])
    assert res.exit_code == 0, res.output
    # The folder alone (weights and manifest found from results.json) with the run's cache: every image
    # score comes from that cache (a spy on the scoring records which cache the rerun used).
    import covreport.scoring as scoring

    seen, real = [], scoring.score_manifest

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append((kwargs.get("cache_path"), res.scored, res.from_cache))
        return res

    mp = pytest.MonkeyPatch()
    mp.setattr(scoring, "score_manifest", spy)
    try:
        res = runner.invoke(main, ["verify", str(tmp_path / "out"), "--cache", cache])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    assert "input weights: " in res.output and "\nverified: " in res.output
    assert [(str(c), n) for c, n, _ in seen] == [(cache, 0)] and seen[0][2] > 0
    # Moved away from its inputs, the folder names what it needs.
    shutil.copytree(tmp_path / "out", tmp_path / "elsewhere" / "out")
    res = runner.invoke(main, ["verify", str(tmp_path / "elsewhere" / "out"), "--manifest",
                               str(study / "manifest.csv")])
    assert res.exit_code == 1
    assert "--weights: the run scored the images with tiny.pt, SHA-256" in res.output
    res = runner.invoke(main, ["verify", str(tmp_path / "out"), "--manifest", str(study / "manifest.csv"),
                               "--weights", str(weights), "--no-cache"])
    assert res.exit_code == 0, res.output
    assert "\nverified: " in res.output
    res = runner.invoke(main, ["score", str(study / "manifest.csv"), "--weights", str(weights), "--cache", cache,
                               "--out", str(tmp_path / "scores.csv")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["verify", str(tmp_path / "out"), "--manifest", str(study / "manifest.csv"),
                               "--scores", str(tmp_path / "scores.csv")])
    assert res.exit_code == 0, res.output


def test_a_run_with_previous_results_verifies(submitted, tmp_path):
    # The new run's time inside revalidation.series and the --previous paths are run facts.
    prev = tmp_path / "earlier.json"
    shutil.copy(submitted / "out" / "results.json", prev)
    out = tmp_path / "out2"
    res = CliRunner().invoke(main, ["-q", "run", str(submitted / "manifest.csv"), "--scores",
                                    str(submitted / "scores.csv"), "--out", str(out), "--permutations", "30",
                                    "--seed", "7", "--no-pdf", "--previous", str(prev)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert str(tmp_path) not in json.dumps(results["revalidation"])  # no absolute local path
    res = _verify(out, submitted, "--previous", str(prev), "-q")
    assert res.exit_code == 0, res.output
    assert "verified: " in res.output


@pytest.mark.parametrize("key, value, said", [
    ("permutations", "abc", "provenance.options.permutations is 'abc', not an integer from 0 to 100,000"),
    ("bootstrap", 10 ** 9, "provenance.options.bootstrap is 1000000000, not an integer from 0 to 100,000"),
    ("seed", -1, "provenance.options.seed is -1, not an integer >= 0"),
])
def test_hostile_recorded_options_are_refused(submitted, tmp_path, key, value, said):
    out = _copy(submitted, tmp_path)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results["provenance"]["options"][key] = value
    (out / "results.json").write_text(json.dumps(results), encoding="utf-8")
    res = _verify(out, submitted)
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: {out / 'results.json'}: {said}"


def test_a_report_made_with_other_templates_is_not_checked_without_them(submitted, tmp_path):
    from covreport.report.render import templates_dir

    tpl = tmp_path / "tpl"
    shutil.copytree(templates_dir(), tpl)
    page = tpl / "report.html.j2"
    page.write_text(page.read_text(encoding="utf-8").replace("<h1", "<p>Site banner</p><h1", 1), encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["-q", "run", str(submitted / "manifest.csv"), "--scores",
                                    str(submitted / "scores.csv"), "--out", str(out), "--permutations", "30",
                                    "--seed", "7", "--no-pdf", "--templates", str(tpl)])
    assert res.exit_code == 0, res.output
    res = _verify(out, submitted)
    assert res.exit_code == 0, res.output
    assert "not checked: report.html: the run used its own --templates" in res.output
    res = _verify(out, submitted, "--templates", str(tpl))
    assert res.exit_code == 0 and "report.html (its text outside figures)" in res.output


def test_every_recorded_option_has_a_range_check():
    # verify reruns with exactly the options `covreport run` records, each checked first.
    from covreport.pipeline import NUMBER_OPTIONS
    from covreport.verify import _OPTION_RULES

    assert set(_OPTION_RULES) == set(NUMBER_OPTIONS)
