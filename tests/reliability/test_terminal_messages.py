"""Issue 18.6: messages cannot act on the terminal, and resource errors are errors, not tracebacks."""

import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.inputs import safe_text


def test_escape_and_bidi_controls_in_a_message_are_shown_escaped(tmp_path):
    name = tmp_path / "m\x1b]8;;https:x\x07click\x1b[2J\u202egpj.csv"
    res = CliRunner().invoke(main, ["validate", str(name)])
    assert res.exit_code == 1
    assert "\x1b" not in res.output and "\x07" not in res.output and "\u202e" not in res.output
    assert "\\x1b]8;;https:x\\x07click\\x1b[2J\\u202egpj.csv" in res.output


def test_safe_text_keeps_ordinary_text_and_escapes_the_rest():
    assert safe_text("Pleural Effusion, é, 肺, line\nnext") == "Pleural Effusion, é, 肺, line\nnext"
    assert safe_text("a\x9bb\u2066c\u200bd\U000e0041") == "a\\x9bb\\u2066c\\u200bd\\U000e0041"


@pytest.mark.parametrize("exc, words", [
    (MemoryError(), "ran out of memory"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (OverflowError("int too large to convert to float"), "OverflowError"),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError"),
])
def test_resource_errors_become_an_error_with_their_true_name(tmp_path, monkeypatch, exc, words):
    import covreport.manifest as manifest

    (tmp_path / "m.csv").write_text("pair_id\n")

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(manifest, "read_manifest", boom)
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "m.csv")])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: covreport validate ") and words in res.output, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
