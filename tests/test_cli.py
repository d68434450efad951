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
                                  "verify"}


def test_library_errors_become_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.csv")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output


def test_other_exceptions_are_bugs_and_keep_their_traceback(monkeypatch):
    @main.command("boom-test")
    def boom():
        raise KeyError("bug")  # resource errors (ZeroDivisionError ...) are mapped: issue 18.6

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
