"""Reliability: no active content in a report, whatever a ``--templates`` folder writes (issue 18, section 2).

A custom template can write anything into the page it renders. What
covreport writes to ``report.html`` is rebuilt by
:func:`covreport.report.sandbox.sanitize_html` from allow-lists (``nh3``
for the HTML, ``tinycss2`` tokens for the CSS) and carries covreport's own
Content-Security-Policy first in ``<head>``. Each attack class below is
checked twice: statically, with Python's own ``html.parser`` (independent
of the sanitiser's html5ever parser), and in headless Chromium pointed at a
loopback server that records every request: zero requests, and the marker a
script would write is absent. A positive control opens the unsanitised page
and must see requests and the marker, so the test can fail.

The built-in report must come out of the sanitiser unchanged in what users
see: the same elements, attributes and text (compared with ``html.parser``)
and nothing reported as removed.
"""

import base64
import http.server
import re
import subprocess
import threading
from html.parser import HTMLParser

import pytest

from covreport.report import build_context, make_environment, plain_results, render_html, sandbox
from covreport.report.render import render_template
from _chromium import chromium_binary
from report_fixtures import with_contract_keys

PNG = "data:image/png;base64," + base64.b64encode(
    bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
                  "c0f01f0005000201ffa6d6a1d40000000049454e44ae426082")).decode()
MARKER = "PWNED-MARKER"

#: Every way a page can run a script, navigate, or make a request; ``{h}`` is the recording server.
ATTACKS = {
    "script": f"<script>document.title='{MARKER}';document.body.append('{MARKER}');"
              "new Image().src='{h}/ran-script'</script>",
    "script src": "<script src='{h}/script.js'></script>",
    "fetch in script": "<script>fetch('{h}/fetch')</script>",
    "url built by script": "<script>var i=new Image();i.src='{h}'+'/built'</script>",
    "event attribute": f"<img src='{PNG}' onload=\"document.title='{MARKER}'\"><p onclick='x()'>p</p>",
    "svg onload": f"<svg onload=\"document.title='{MARKER}'\"><image href='{{h}}/svg-image'/></svg>",
    "meta refresh": "<meta http-equiv='refresh' content='0;url={h}/refresh'>",
    "img src": "<img src='{h}/img.png'>",
    "srcset": "<img srcset='{h}/srcset.png 1x'><picture><source srcset='{h}/source.png'><img></picture>",
    "style single-quoted": "<p style='background:url({h}/style-attr)'>x</p>",
    "image-set": "<p style=\"background-image:image-set('{h}/image-set.png' 1x)\">x</p>",
    "css escape": "<style>p{{background:\\75 rl({h}/escaped)}}</style>",
    "css @import": "<style>@import '{h}/import.css'; @\\69mport url({h}/import2.css);</style>",
    "css var in image-set": "<style>:root{{--u:'{h}/var.png'}} p{{background-image:image-set(var(--u) 1x)}}</style>",
    "css content url": "<style>p::before{{content:url({h}/content.png)}} body{{cursor:url({h}/cursor),auto}}</style>",
    "font-face": "<style>@font-face{{font-family:X;src:url({h}/font.woff)}} p{{font-family:X}}</style><p>f</p>",
    "link href": "<link rel='stylesheet' href='{h}/link.css'><link rel='prefetch' href='{h}/prefetch'>",
    "object embed iframe": "<object data='{h}/object'></object><embed src='{h}/embed'>"
                           "<iframe src='{h}/iframe'></iframe><iframe srcdoc=\"<img src='{h}/srcdoc'>\"></iframe>",
    "form action": "<form action='{h}/form' method='get'><input name='q' value='1'><button formaction='{h}/button'>"
                   "go</button></form>",
    "base href": "<base href='{h}/base/'><img src='relative.png'>",
    "media": "<video poster='{h}/poster.png' src='{h}/video'></video><audio src='{h}/audio' autoplay></audio>",
    "external link": "<a href='{h}/link' id='l'>l</a><a href='javascript:alert(1)'>j</a>"
                     "<a href='data:text/html,hi'>d</a><a href='//127.0.0.1/x'>r</a>",
}


def _template(folder, h):
    """A report.html.j2 in ``folder`` writing every attack (head and body), plus legitimate content."""
    head = "".join(ATTACKS[k].format(h=h) for k in ("meta refresh", "link href", "base href", "css @import"))
    body = "".join(v.format(h=h) for v in ATTACKS.values())
    folder.mkdir(exist_ok=True)
    (folder / "report.html.j2").write_text(
        "<!DOCTYPE html><html lang='en'><head><title>{{ title }}</title>" + head + "</head>"
        "<body onload=\"document.title='" + MARKER + "'\"><h1 id='top' style='color: #123456'>Kept heading</h1>"
        "<a href='#top'>back to top</a><img alt='figure' src='" + PNG + "'>" + body + "</body></html>")
    return folder


class _Page(HTMLParser):
    """Every element, attribute and style text of a page, read by Python's html.parser."""

    def __init__(self, html):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.css, self.text, self._in = [], [], [], [], None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self._in = tag

    def handle_data(self, data):
        (self.css if self._in == "style" else self.text).append(data)


def _assert_inert(html, host):
    page = _Page(html)
    # A CSS custom property holding a string is inert text (using it in a URL function is what is removed).
    assert host not in re.sub(r"--u:[^;}]*", "", html), "a URL of the recording server survived"
    assert not {"script", "iframe", "object", "embed", "link", "base", "form", "button", "svg", "video",
                "audio", "source", "picture", "input"} & set(page.tags)
    for tag, key, value in page.attrs:
        assert not key.startswith("on"), (tag, key)
        assert key not in ("srcset", "srcdoc", "action", "formaction", "poster", "data", "http-equiv") or \
            (tag, key, value) == ("meta", "http-equiv", "Content-Security-Policy"), (tag, key)
        if key == "href":
            assert value.startswith("#"), (tag, value)
        if key == "src":
            assert value.startswith("data:image/"), (tag, value)
    css = " ".join(page.css + [v for _, k, v in page.attrs if k == "style"]).lower()
    assert "@import" not in css and "image-set" not in css and not re.search(r"url\((?!\s*['\"]?data:)", css)
    assert MARKER not in " ".join(page.text)


def test_hostile_template_renders_inert(tmp_path, caplog):
    host = "127.0.0.1:9"
    html = render_html(plain_results(with_contract_keys()), templates=_template(tmp_path / "t", f"http://{host}"))
    _assert_inert(html, host)
    head = html[html.index("<head>") + len("<head>"):].lstrip()
    assert head.startswith(f'<meta http-equiv="Content-Security-Policy" content="{sandbox.CSP}">')
    assert html.count("Content-Security-Policy") == 1
    assert "Kept heading" in html and 'href="#top"' in html and PNG in html and 'style="color: #123456"' in html
    assert "<title>Tracking" in html
    assert "covreport removed 4" in caplog.text and "<meta http-equiv='refresh'>" in caplog.text


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_each_attack_class_is_removed(tmp_path, name):
    raw = ("<!DOCTYPE html><html><head></head><body><p>kept</p>" + ATTACKS[name].format(h="http://127.0.0.1:9")
           + "</body></html>")
    html, removed = sandbox.sanitize_html(raw)
    _assert_inert(html, "127.0.0.1:9")
    assert removed, f"nothing reported as removed for {name!r}"
    assert "<p>kept</p>" in html


@pytest.mark.parametrize("css, kept", [
    ("p { color: red }", "p { color: red }"),                                       # nothing to remove: unchanged
    ("p { color: red; background: url(http://x/y) }", "p {color: red}"),
    ("p { background: url('data:image/png;base64,AA') }", "data:image/png"),        # data: stays
    ("@media print { p { color: red; background: URL(http://x) } }", "@media print"),
    ("@page { @top-left { content: 'x'; background: url(//x) } }", '@page {@top-left {content: "x"}}'),
    ("p { --u: 'http://x'; background: image-set(var(--u) 1x) }", 'p {--u: "http://x"}'),  # a string is text
])
def test_css_keeps_what_refers_to_nothing_outside(css, kept):
    cleaned, _ = sandbox.clean_css(css)
    assert kept in cleaned
    assert not re.search(r"url\((?!\s*['\"]?data:)|image-set|@import", cleaned, re.I)


def test_builtin_report_is_unchanged_by_the_sanitiser():
    """The built-in report keeps every element, attribute and text (html.parser on both sides)."""
    results = plain_results(with_contract_keys())
    figures = {stem: {"uri": PNG, "paths": {}} for stem in ("flow_diagram", "roc_curves", "change_boxplots",
                                                            "calibration")}
    raw = render_template(make_environment(), build_context(results, figures=figures))
    html, removed = sandbox.sanitize_html(raw)
    assert removed == []

    def events(page):
        out = []

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                if not (tag == "meta" and any(k in ("charset", "http-equiv") for k, _ in attrs)):
                    out.append((tag, sorted(attrs)))

            def handle_endtag(self, tag):
                out.append(("/", tag))

            def handle_data(self, data):
                if data.split():
                    out.append(" ".join(data.split()))

        P(convert_charrefs=True).feed(page)
        return out

    before, after = events(raw), events(html)
    assert len(before) > 3000 and after == before
    assert html.count(PNG) == raw.count(PNG) >= 3                      # figures (data: URIs)
    assert len(re.findall(r'href="#', html)) == len(re.findall(r'href="#', raw)) > 20   # links in the page
    assert re.search(r"<style>.*@page.*</style>", html, re.S)          # the CSS, @page rules included


# --------------------------------------------------------------------------
# Headless Chromium against a loopback server that records requests


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        body = b"document.title='PWNED-MARKER';" if self.path.endswith(".js") else b"x"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    """A threading HTTP server on 127.0.0.1 (random port) that records every request path.

    It only listens and accepts; the network guard blocks this process's outgoing connections, not that.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


def _dump_dom(page, profile):
    proc = subprocess.run([chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    return proc.stdout


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (Debian package `chromium`)")
def test_chromium_makes_no_request_and_runs_no_script(tmp_path, recorder):
    url, seen = recorder
    templates = _template(tmp_path / "t", url)
    # Positive control: the page as the template wrote it loads from the server and runs the script.
    raw = (templates / "report.html.j2").read_text().replace("{{ title }}", "control")
    (tmp_path / "control.html").write_text(raw)
    _dump_dom(tmp_path / "control.html", tmp_path / "p1")
    assert {"/ran-script", "/script.js", "/fetch", "/built", "/img.png", "/style-attr", "/image-set.png",
            "/refresh"} <= set(seen), seen
    seen.clear()

    html = render_html(plain_results(with_contract_keys()), templates=templates)
    (tmp_path / "report.html").write_text(html)
    dom = _dump_dom(tmp_path / "report.html", tmp_path / "p2")
    assert "Kept heading" in dom, dom[:300]
    assert seen == []
    assert MARKER not in dom
