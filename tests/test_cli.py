"""The CLI group: version, help, error mapping, and every command documented."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from covreport import __version__
from covreport.cli import main
from covreport.errors import CovreportError

ROOT = Path(__file__).resolve().parent.parent


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"covreport, version {__version__}\n"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {command} ")
    assert len(main.commands[command].help.strip()) > 40


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_is_documented_in_the_readme(command):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"### `covreport {command}`" in readme
    assert re.search(rf"`covreport {command}[ `]", readme)


def test_the_commands_are_the_issue_list():
    # Commands that are not built are absent, never placeholders.
    assert set(main.commands) == {"validate", "diagnostic", "run", "score", "train", "demo", "pairs",
                                  "verify", "summary", "plan"}


def test_readme_says_once_and_truly_which_commands_take_quiet():
    # Issue 21.6: one --quiet paragraph, naming exactly the commands that accept --quiet after their name.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("`covreport --quiet CMD`") == 1
    m = re.search(r"silences them for\s+any command; (.+?) also take\s+`--quiet`", readme, re.S)
    assert m, "the --quiet paragraph is not found"
    named = set(re.findall(r"`(\w+)`", m.group(1)))
    takes = {name for name, cmd in main.commands.items() if any(p.name == "quiet" for p in cmd.params)}
    assert named == takes
    for name in takes:  # and it works there
        cmd = main.commands[name]
        assert any("--quiet" in p.opts and "-q" in p.opts for p in cmd.params)


@pytest.mark.parametrize("args, option", [
    (["diagnostic", "--tp", "1", "--fp", "1", "--fn", "1", "--tn", "-1"], "'--tn'"),
    (["diagnostic", "--tp", "-3", "--fp", "1", "--fn", "1", "--tn", "1"], "'--tp'"),
    (["diagnostic", "--tp", "1", "--fp", "1", "--fn", "1", "--tn", "1", "--alpha", "2"], "'--alpha'"),
    (["diagnostic", "--tp", "1", "--fp", "1", "--fn", "1", "--tn", "1", "--alpha", "0"], "'--alpha'"),
    (["diagnostic", "--tp", "1", "--fp", "1", "--fn", "1", "--tn", "1", "--prevalence", "1.5"], "'--prevalence'"),
    (["diagnostic", "--tp", "1", "--fp", "1", "--fn", "1", "--tn", "1", "--prevalence", "nan"], "'--prevalence'"),
    (["run", "m.csv", "--permutations", "-1"], "'--permutations'"),
    (["run", "m.csv", "--bootstrap", "100001"], "'--bootstrap'"),
    (["train", "--chexpert-root", ".", "--out", "m.pt", "--lr", "nan"], "'--lr'"),
    (["train", "--chexpert-root", ".", "--out", "m.pt", "--epochs", "0"], "'--epochs'"),
    (["train", "--chexpert-root", ".", "--out", "m.pt", "--labels", "Edema,Edema"], "--labels"),
    (["score", "m.csv", "--out", "s.csv", "--batch-size", "0"], "'--batch-size'"),
    (["pairs", "x.csv", "--out", "y.csv", "--views", "AP,Axial"], "--views"),
    (["pairs", "x.csv", "--out", "y.csv", "--filter", "=x"], "--filter"),
    (["summary", "d", "--json", "--config"], "--json or --config"),
])
def test_every_range_check_is_a_usage_error_exit_2(tmp_path, monkeypatch, args, option):
    # Issue 21.6: a value out of range is a mistyped command line: exit 2, click's usage message naming it.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Usage: main " in result.stderr and option in result.stderr
    assert "Traceback" not in result.output


def test_library_errors_become_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.csv")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output


def test_other_exceptions_are_bugs_and_keep_their_traceback(monkeypatch):
    @main.command("boom-test")
    def boom():
        raise KeyError("bug")  # (ZeroDivisionError is now a resource error of hostile input: cli._Group)

    try:
        result = CliRunner().invoke(main, ["boom-test"])
        assert isinstance(result.exception, KeyError)
        assert result.exit_code != 0
    finally:
        main.commands.pop("boom-test")


def test_covreport_error_from_any_command_maps_the_same(monkeypatch):
    @main.command("fail-test")
    def fail():
        raise CovreportError("manifest.csv line 3, column 'age': 'abc' -- give a number")

    try:
        result = CliRunner().invoke(main, ["fail-test"])
        assert result.exit_code == 1
        assert result.stderr == "Error: manifest.csv line 3, column 'age': 'abc' -- give a number\n"
    finally:
        main.commands.pop("fail-test")


def test_run_refuses_an_existing_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = ROOT / "data_manifests" / "example" / "manifest.csv"
    scores = tmp_path / "scores.csv"
    scores.write_text("image\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out} exists; choose another --out or add --force to replace it\n"


def test_run_refuses_scores_and_weights_together(tmp_path):
    manifest = ROOT / "data_manifests" / "example" / "manifest.csv"
    scores = tmp_path / "scores.csv"
    scores.write_text("image\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--weights", "w.pt"])
    assert result.exit_code == 2
    assert "give --scores or --weights, not both" in result.output
