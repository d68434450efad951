"""Hostile submitted folders given to ``covreport verify`` (issue 18.4).

A submitted folder comes from someone else: its results.json may carry wrong
types, non-finite numbers, deep nesting, or recorded input paths that are
absolute, climb with ``..`` or pass a symbolic link; its report.html and
tables may be symbolic links to the reviewer's own files. verify must refuse
the malformed results.json with an ``Error:`` naming the key, never open a
file outside the folders a recorded path is relative to, never read through a
symbolic link, and echo nothing of what it did not verify.
"""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.pipeline import NUMBER_OPTIONS, RunOptions
from reliability_helpers import covreport_cmd, subprocess_env

#: Valid recorded options (the defaults of `covreport run`): each test fails before any rerun.
OPTIONS = {k: getattr(RunOptions(manifest=None, out=None), k) for k in NUMBER_OPTIONS}
SECRET = "image,SECRET-LINE-OF-THE-REVIEWER\n"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def study(tmp_path):
    """A manifest, a reviewer's private file outside the study, and an empty submitted folder ``sub/out``."""
    sub = tmp_path / "sub"
    (sub / "out").mkdir(parents=True)
    (sub / "manifest.csv").write_text("patient_id,first_image,second_image,outcome\nP1,a.png,b.png,Worse\n",
                                      encoding="utf-8")
    secret = tmp_path / "private" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text(SECRET, encoding="utf-8")
    return sub, secret


def _results(sub, **inputs):
    manifest = sub / "manifest.csv"
    recorded = {"manifest": {"path": "manifest.csv", "from_results": "../manifest.csv", "sha256": _sha(manifest)},
                **inputs}
    return {"provenance": {"inputs": recorded, "options": dict(OPTIONS)}, "labels": ["Edema"]}


def _write(sub, data):
    text = data if isinstance(data, str) else json.dumps(data)
    (sub / "out" / "results.json").write_text(text, encoding="utf-8")


def _verify(sub, *extra):
    return CliRunner().invoke(main, ["verify", str(sub / "out"), "--manifest", str(sub / "manifest.csv"), *extra])


@pytest.mark.parametrize("edit, said", [
    (lambda r: r["provenance"]["inputs"].update(manifest="manifest.csv"),
     "provenance.inputs.manifest: text instead of an object"),
    (lambda r: r["provenance"]["inputs"].update(previous_x={"path": "a.json", "sha256": "0" * 64}),
     "provenance.inputs.previous_x: not an input covreport records"),
    (lambda r: r["provenance"]["inputs"].update(previous_2={"path": "a.json", "sha256": "0" * 64}),
     "provenance.inputs: the previous results are numbered [2], not 1 to 1"),
    (lambda r: r["provenance"]["inputs"]["manifest"].update(sha256=["x"]),
     "provenance.inputs.manifest.sha256: ['x'] is not a SHA-256"),
    (lambda r: r["provenance"]["inputs"]["manifest"].update(from_results=7),
     "provenance.inputs.manifest.from_results: int instead of a path (text)"),
    (lambda r: r["provenance"].update(templates=["t"]), "provenance.templates: a list instead of text"),
    (lambda r: r.update(labels="Edema"), "labels: not a list of text"),
    (lambda r: r.update(flow={"pairs_analysed": "12"}), "flow.pairs_analysed: text instead of int"),
])
def test_wrong_types_are_an_error_naming_the_key(study, edit, said):
    sub, _ = study
    data = _results(sub)
    edit(data)
    _write(sub, data)
    res = _verify(sub)
    assert res.exit_code == 1, res.output
    assert res.output.startswith(f"Error: {sub / 'out' / 'results.json'}: {said}"), res.output
    assert "give the results.json covreport wrote, unedited" in res.output


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_are_refused(study, literal):
    sub, _ = study
    text = json.dumps(_results(sub, scores={"path": "scores.csv", "sha256": "0" * 64}))
    _write(sub, text[:-1] + f', "flow": {{"pairs_analysed": {literal}}}}}')
    res = _verify(sub)
    assert res.exit_code == 1
    assert f"flow.pairs_analysed: {literal} is not a finite number" in res.output, res.output


def test_deep_nesting_is_refused(study):
    sub, _ = study
    data = _results(sub)
    data["extra"] = json.loads("[" * 40 + "]" * 40)
    _write(sub, data)
    res = _verify(sub)
    assert res.exit_code == 1
    assert "extra" in res.output and "nested deeper than 32 levels" in res.output, res.output


def test_an_oversized_results_json_is_refused_before_it_is_read(study):
    sub, _ = study
    with open(sub / "out" / "results.json", "wb") as fh:  # sparse: no disk used
        fh.truncate(257 << 20)
    res = _verify(sub)
    assert res.exit_code == 1
    assert "larger than the 256 MiB a results may be" in res.output, res.output


def test_a_fifo_results_json_does_not_block(study, tmp_path):
    sub, _ = study
    os.mkfifo(sub / "out" / "results.json")
    proc = subprocess.run(covreport_cmd("verify", sub / "out", "--manifest", sub / "manifest.csv"),
                          capture_output=True, text=True, timeout=60, env=subprocess_env(tmp_path))
    assert proc.returncode == 1
    assert "is a named pipe (FIFO), not a regular file" in proc.stderr, proc.stderr


def test_a_symlinked_results_json_is_refused(study):
    sub, secret = study
    (sub / "elsewhere.json").write_text(json.dumps(_results(sub)), encoding="utf-8")
    os.symlink(sub / "elsewhere.json", sub / "out" / "results.json")
    res = _verify(sub)
    assert res.exit_code == 1
    assert "results.json is a symbolic link" in res.output, res.output


@pytest.mark.parametrize("where", ["absolute", "climbing", "symlink"])
def test_recorded_paths_outside_the_folder_are_not_read(study, where):
    """A recorded path to the reviewer's own file, with that file's true SHA-256: never opened."""
    sub, secret = study
    if where == "absolute":
        rel, said = str(secret), "an absolute path, not looked at"
    elif where == "climbing":
        rel, said = "../../private/secret.csv", "leads out of"
    else:
        os.symlink(secret, sub / "out" / "scores.csv")
        rel, said = "scores.csv", "is a symbolic link, not followed"
    _write(sub, _results(sub, scores={"path": rel, "from_results": rel, "sha256": _sha(secret)}))
    res = _verify(sub)
    assert res.exit_code == 1
    assert "the rerun needs these inputs of the submitted run:\n  --scores: " in res.output, res.output
    assert said in res.output
    assert "SECRET" not in res.output


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """The output of a real (reviewer-mode) `covreport run`."""
    import pandas as pd

    from test_pipeline import EXAMPLE, _scores

    tmp = tmp_path_factory.mktemp("hostile-verify")
    shutil.copy(EXAMPLE, tmp / "manifest.csv")
    m = pd.read_csv(EXAMPLE)
    _scores(tmp / "scores.csv", sorted(set(m["first_image"]) | set(m["second_image"])))
    res = CliRunner().invoke(main, ["-q", "run", str(tmp / "manifest.csv"), "--scores", str(tmp / "scores.csv"),
                                    "--out", str(tmp / "out"), "--permutations", "10", "--bootstrap", "0",
                                    "--no-pdf"])
    assert res.exit_code == 0, res.output
    return tmp / "out"


def test_symlinked_report_and_tables_are_not_read(run_folder, tmp_path):
    from covreport.verify import check_report

    out = tmp_path / "out"
    shutil.copytree(run_folder, out)
    secret = tmp_path / "secret.txt"
    secret.write_text("pair_id,SECRET-LINE-OF-THE-REVIEWER\n<p>SECRET-LINE-OF-THE-REVIEWER</p>\n", encoding="utf-8")
    for name in ("report.html", "tables/pairs.csv"):
        (out / name).unlink()
        os.symlink(secret, out / name)
    submitted = json.loads((out / "results.json").read_text(encoding="utf-8"))
    diffs, checked, not_checked = check_report(out, submitted)
    assert "SECRET" not in repr((diffs, checked, not_checked))
    paths = {d["path"]: d["submitted"] for d in diffs}
    assert paths["report.html"] == paths["tables/pairs.csv"] == "a symbolic link (not followed)"
    assert "report.html: a symbolic link (not followed)" in not_checked
    assert "tables/pairs.csv" not in checked and "tables/group_differences.csv" in checked
    # A tables folder that is a link is not listed either.
    shutil.rmtree(out / "tables")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "pairs.csv").write_text(SECRET, encoding="utf-8")
    os.symlink(tmp_path / "t", out / "tables")
    diffs, checked, not_checked = check_report(out, submitted)
    assert "SECRET" not in repr((diffs, checked, not_checked))
    assert "tables/: a symbolic link (not followed)" in not_checked
    assert not any(c.startswith("tables/") for c in checked)


def test_values_echoed_from_the_submission_cannot_act_on_the_terminal(monkeypatch, tmp_path):
    import covreport.verify as verify_module

    evil = "\x1b]52;c;ZXZpbA==\x07\u202egnp.\x1b[2J"
    found = verify_module.Verification(
        numbers_compared=1, differences=[{"path": f"study.title{evil}", "submitted": evil, "regenerated": "x"}],
        report_not_checked=[f"tables/{evil}.csv: a symbolic link (not followed)"],
        hash_mismatches=[{"input": "manifest", "path": f"m{evil}.csv", "sha256": "0", "recorded_sha256": "1"}])
    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: found)
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "\x1b" not in res.output and "\x07" not in res.output and "\u202e" not in res.output
    assert "\\x1b]52;c;ZXZpbA==" in res.output
