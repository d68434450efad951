"""Reliability: a ``--templates`` folder cannot run code (issue 13, item 7).

Every template is rendered in Jinja's ``SandboxedEnvironment``: the classic
server-side template injection payloads reach for Python internals through
attributes that start with an underscore (``cycler.__init__.__globals__``,
``''.__class__.__mro__``) and must be refused with a clear ``Error:`` before
anything runs. Each payload tries to create a marker file; the test asserts
the file does not exist, the run exits 1 naming the sandbox, and no output
folder is left behind.

Issue 18, section 2: a custom template cannot crash or hang the run either.
``--templates`` are rendered in a child process with a memory limit, a CPU
limit and a wall-clock limit (``covreport.report.sandbox``); ``*`` and
``**`` are bounded; a template file is read only if it is a regular file
inside its folder, never through a symbolic link. Every failure is
``Error: template <name> line N: <what> -- <fix>`` with exit status 1, no
traceback, no output folder, and the child process never outlives covreport.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.errors import ReportError
from covreport.report import plain_results, render_html, sandbox
from reliability_helpers import make_study, manifest_images, random_scores, subprocess_env
from report_fixtures import base

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
                                       "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--templates", str(templates)])
    assert not marker.exists(), f"the template payload {name!r} ran a command"
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "sandbox" in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_sandbox_still_renders_the_builtin_report(study, tmp_path):
    manifest, scores = study
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out),
                                       "--permutations", "0", "--bootstrap", "0", "--no-pdf"])
    assert result.exit_code == 0, result.output
    assert "Appendix A. STARD 2015 checklist" in (out / "report.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# Templates that crash or hang (issue 18, section 2)

RECURSION = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}\n{{ f(1) }}"
DOUBLING = "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s|length }}{% endmacro %}\n{{ d('x' * 10**7, 9) }}"
CRASHES = {  # name: (template, its line, what the message says)
    "unbounded recursion": (RECURSION, 1, "calls itself without end"),
    "division by zero": ("<p>\n{{ 1 // 0 }}</p>", 2, "ZeroDivisionError"),
    "str + int": ("<p>\n\n{{ 'a' + 1 }}</p>", 3, "TypeError: can only concatenate"),
    "range(10**9)": ("{% for i in range(10**9) %}x{% endfor %}", 1, "Range too big"),
    "nested range(100000) loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                   "{% endfor %}", 1, "did not finish within 3 s"),
    "'x' * 10**9": ("{{ 'x' * 10**9 }}", 1, "repeated 1,000,000,000 times"),
    "10 ** 10**8": ("{{ 10 ** 100000000 }}", 1, "bits the sandbox allows"),
    "memory doubling": (DOUBLING, 1, "1 GiB of memory a template may use"),
    "include of a symlink to /etc/passwd": ("<pre>{% include 'passwd.html.j2' %}</pre>", 1, "symbolic link"),
}


def _crash_folder(tmp_path, name):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "report.html.j2").write_text(CRASHES[name][0])
    os.symlink("/etc/passwd", templates / "passwd.html.j2")
    return templates


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_template_that_crashes_or_hangs_is_an_error_with_its_line(tmp_path, monkeypatch, name):
    _, line, what = CRASHES[name]
    monkeypatch.setattr(sandbox, "TIMEOUT", 3.0)
    start = time.monotonic()
    with pytest.raises(ReportError) as err:
        sandbox.render_in_child(_crash_folder(tmp_path, name), {})
    message = str(err.value)
    assert message.startswith(f"template report.html.j2 line {line}: "), message
    assert what in message and " -- " in message, message
    assert "root:" not in message
    assert time.monotonic() - start < 30  # 3 s of template time, plus starting Python on a loaded machine


@pytest.mark.parametrize("name", ["unbounded recursion", "include of a symlink to /etc/passwd"])
def test_cli_says_error_and_exits_1_on_a_failing_template(study, tmp_path, name):
    manifest, scores = study
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out),
                                       "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--templates",
                                       str(_crash_folder(tmp_path, name))])
    assert result.exit_code == 1, result.output
    assert "Error: template report.html.j2 line 1: " in result.output and CRASHES[name][2] in result.output
    assert "Traceback" not in result.output and "root:" not in result.output
    assert not out.exists()


def _render(templates):
    return render_html(plain_results(base()), templates=templates)


def test_template_files_are_regular_files_inside_their_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.html.j2").write_text("SECRET-OUTSIDE")
    t = tmp_path / "t"
    t.mkdir()
    # The top template itself a link; report.css (included by the built-in report) a link; a linked subfolder.
    os.symlink(outside / "x.html.j2", t / "report.html.j2")
    with pytest.raises(ReportError, match=r"^template report.html.j2 is a symbolic link .* -- copy the file"):
        _render(t)
    (t / "report.html.j2").unlink()
    os.symlink("/etc/passwd", t / "report.css")
    with pytest.raises(ReportError, match=r"^template report.html.j2 line \d+: report.css is a symbolic link"):
        _render(t)
    (t / "report.css").unlink()
    os.symlink(outside, t / "sub")
    (t / "report.html.j2").write_text("{% include 'sub/x.html.j2' %}")
    with pytest.raises(ReportError, match="sub/x.html.j2 is a symbolic link"):
        _render(t)
    (t / "report.html.j2").write_text("{% include '../outside/x.html.j2' %}")
    with pytest.raises(ReportError, match="not found"):
        _render(t)


def test_template_that_is_a_fifo_or_too_large_is_refused(tmp_path):
    t = tmp_path / "t"
    t.mkdir()
    os.mkfifo(t / "report.css")
    start = time.monotonic()
    with pytest.raises(ReportError, match="named pipe"):
        _render(t)
    assert time.monotonic() - start < 30
    (t / "report.css").unlink()
    (t / "report.css").write_text("p{}" * 400_000)
    with pytest.raises(ReportError, match="larger than the 1 MiB a template may be"):
        _render(t)


def test_parent_kills_a_child_that_does_not_answer(tmp_path, monkeypatch):
    """A child stuck where its own alarm cannot reach (C code) is killed after TIMEOUT + GRACE."""
    started = []
    real = subprocess.Popen

    def stuck(args, **kwargs):
        proc = real([sys.executable, "-c", "import time; time.sleep(600)"], **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(sandbox.subprocess, "Popen", stuck)
    monkeypatch.setattr(sandbox, "GRACE", 0.5)
    (tmp_path / "report.css").write_text("p{}")
    with pytest.raises(ReportError, match=r"did not finish within 1 s -- make the loops smaller"):
        sandbox.render_in_child(tmp_path, {}, timeout=1)
    assert started and started[0].poll() is not None


PARENT = """
import subprocess, sys
from covreport.report import sandbox
real = subprocess.Popen
class Popen(real):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(self.pid, flush=True)
subprocess.Popen = Popen
sandbox.render_in_child(sys.argv[1], {}, timeout=300)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_child_never_outlives_covreport(tmp_path, sig):
    (tmp_path / "report.html.j2").write_text(CRASHES["nested range(100000) loops"][0])
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=subprocess_env(tmp_path))
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(child)
        os.kill(parent.pid, sig)
        parent.wait(30)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the template child process outlived covreport"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
