"""Reliability: a ``--templates`` folder cannot run code (issue 13, item 7).

Every template is rendered in Jinja's ``SandboxedEnvironment``: the classic
server-side template injection payloads reach for Python internals through
attributes that start with an underscore (``cycler.__init__.__globals__``,
``''.__class__.__mro__``) and must be refused with a clear ``Error:`` before
anything runs. Each payload tries to create a marker file; the test asserts
the file does not exist, the run exits 1 naming the sandbox, and no output
folder is left behind.
"""

import pytest
from click.testing import CliRunner

from covreport.cli import main
from reliability_helpers import make_study, manifest_images, random_scores

PAYLOADS = {
    "cycler globals": '{{{{ cycler.__init__.__globals__.os.system("touch {marker}") }}}}',
    "joiner globals": '{{{{ joiner.__init__.__globals__.os.popen("touch {marker}").read() }}}}',
    "class walk": "{{% for c in ''.__class__.__mro__[1].__subclasses__() %}}{{% if c.__name__ == 'Popen' %}}"
                  "{{{{ c(['touch', '{marker}']) }}}}{{% endif %}}{{% endfor %}}",
    "context object": '{{{{ r.__class__.__init__.__globals__ }}}}{{{{ study.get.__self__ }}}}'
                      '{{{{ cite.__globals__["os"].system("touch {marker}") }}}}',
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    manifest = make_study(root / "study", n_patients=6)
    scores = random_scores(manifest_images(manifest), root / "scores.csv")
    return manifest, scores


@pytest.mark.parametrize("where", ["report.html.j2", "report.css"])
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_template_cannot_run_a_command(study, tmp_path, name, where):
    manifest, scores = study
    marker = tmp_path / "PWNED"
    templates = tmp_path / "templates"
    templates.mkdir()
    payload = PAYLOADS[name].format(marker=marker)
    if where == "report.css":
        (templates / "report.css").write_text("body { color: #000; }\n" + payload + "\n")
    else:
        (templates / "report.html.j2").write_text("<!DOCTYPE html><html><body>" + payload + "</body></html>")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out),
                                       "--permutations", "0", "--no-pdf", "--templates", str(templates)])
    assert not marker.exists(), f"the template payload {name!r} ran a command"
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "sandbox" in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_sandbox_still_renders_the_builtin_report(study, tmp_path):
    manifest, scores = study
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out),
                                       "--permutations", "0", "--no-pdf"])
    assert result.exit_code == 0, result.output
    assert "Appendix A. STARD 2015 checklist" in (out / "report.html").read_text(encoding="utf-8")
