"""What a template may do, and what may reach ``report.html``, whoever wrote the template.

Three guards, each independent of what a template says:

- :class:`FolderLoader` reads a template only if it is a regular file inside
  its folder (no symbolic link anywhere on the way, nothing that resolves
  outside), through :mod:`covreport.inputs` (size limit ``"template"``);
- :func:`render_in_child` renders ``--templates`` in a child process
  (``python -c "...sandbox._child_main(pid)"``) that is given the report context
  as plain JSON data and runs under ``RLIMIT_AS`` (:data:`MEMORY_LIMIT`),
  ``RLIMIT_CPU`` and a wall-clock limit (:data:`TIMEOUT`); the child dies
  with its parent and is killed on a timeout, an error or Ctrl-C. Every
  failure becomes ``ReportError("template <name> line N: <what> -- <fix>")``
  (:func:`template_error`);
- :func:`sanitize_html` rebuilds the rendered page from an allow-list of
  tags, attributes and URLs (``nh3``, the Rust ``ammonia`` sanitiser): no
  script, no event handler, no form, frame, object, link or base element,
  links only to ``#fragments`` of the page, images only as ``data:image/``
  URIs, CSS (style elements and attributes, read with ``tinycss2``) without
  ``@import`` and without any URL but ``data:``, and covreport's own
  Content-Security-Policy (:data:`CSP`) first in ``<head>``.

The built-in templates are rendered in-process (they are part of covreport)
but their output passes through the same :func:`sanitize_html`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import traceback
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import jinja2.loaders
import jinja2.sandbox

from covreport import inputs
from covreport.errors import ReportError

#: Wall-clock seconds a custom template render may take (tests lower it).
TIMEOUT = 60.0
#: Seconds the parent waits past :data:`TIMEOUT` before it kills the child.
GRACE = 5.0
#: Address-space limit of the child process (bytes).
MEMORY_LIMIT = inputs.GiB
#: Largest rendered page accepted from the child (bytes of UTF-8).
MAX_HTML = 256 * inputs.MiB
#: Context values that are functions; the child rebuilds them from ``blocks``.
HELPERS = ("any_block_has", "any_metric")
#: Most characters or items one ``*`` in a template may build.
MAX_REPEAT = 10_000_000
#: Most bits the result of one ``**`` in a template may have.
MAX_POWER_BITS = 100_000

#: The Content-Security-Policy covreport writes first in ``<head>`` of every report.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; base-uri 'none'; "
       "form-action 'none'")


# --------------------------------------------------------------------------
# Loading: regular files inside the folder, never through a link
# --------------------------------------------------------------------------

class TemplateRefused(ReportError):
    """A template file that is a symbolic link or lies outside its folder."""


class FolderLoader(jinja2.BaseLoader):
    """Templates from ``folders`` (first match wins), each a regular file inside its folder.

    A name that climbs (``..``) is not found; a path with a symbolic link
    on the way, or one that resolves outside its folder, is refused with
    :class:`TemplateRefused` (not skipped: an override must not fall back
    silently). Files are read by :func:`covreport.inputs.read_text`.
    """

    def __init__(self, folders):
        self.folders = [Path(f).resolve() for f in folders]
        self.names = {}  # file name -> template name, for the line of an error

    def get_source(self, environment, template):
        pieces = jinja2.loaders.split_template_path(template)
        for root in self.folders:
            path = root.joinpath(*pieces)
            if not os.path.lexists(path):
                continue
            step = root
            for piece in pieces:
                step = step / piece
                if step.is_symlink():
                    target = inputs.safe_text(os.readlink(step))
                    raise TemplateRefused(f"{template} is a symbolic link ({step.name} -> {target}); covreport "
                                          f"reads no template through a link -- copy the file itself into {root}")
            if not Path(os.path.realpath(path)).is_relative_to(root):
                raise TemplateRefused(f"{template} lies outside the templates folder {root} -- put it inside")
            source = inputs.read_text(path, "template", error_class=ReportError)
            self.names[str(path)] = template
            return source, str(path), lambda: True
        raise jinja2.TemplateNotFound(template)


class BoundedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """Jinja's sandbox, with ``*`` and ``**`` bounded so that one expression cannot take the memory or the CPU.

    ``"x" * 10**9`` and ``10 ** 10**8`` raise :class:`OverflowError` at
    their line (the sandbox already bounds ``range`` to
    :data:`jinja2.sandbox.MAX_RANGE` items).
    """

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise OverflowError(f"a {type(seq).__name__} of length {len(seq):,} repeated {n:,} times would "
                                        f"hold {len(seq) * n:,} items, more than the {MAX_REPEAT:,} the sandbox "
                                        "allows")
        elif (operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
              and abs(left).bit_length() * right > MAX_POWER_BITS):
            raise OverflowError(f"{left} ** {right} would have more than the {MAX_POWER_BITS:,} bits the sandbox "
                                "allows a number")
        return super().call_binop(context, operator, left, right)


# --------------------------------------------------------------------------
# Errors: template <name> line N: <what> -- <fix>
# --------------------------------------------------------------------------

class RenderTimeout(Exception):
    """Raised in the child by its alarm when the render takes longer than its time limit."""


def _location(exc, names):
    """``"name line N"`` of the innermost template frame of ``exc`` (None when none)."""
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
        return f"{exc.name or names.get(exc.filename, exc.filename)} line {exc.lineno}"
    found = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        tpl = frame.f_globals.get("__jinja_template__")
        if tpl is not None:
            found = f"{tpl.name} line {tpl.get_corresponding_lineno(lineno)}"
        elif frame.f_code.co_filename in names:  # a frame of Jinja's rewritten traceback
            found = f"{names[frame.f_code.co_filename]} line {lineno}"
    return found


def _what_and_fix(exc, timeout):
    message = inputs.safe_text(getattr(exc, "message", None) or exc, limit=300)
    if isinstance(exc, jinja2.sandbox.SecurityError):
        return (f"tried an unsafe operation and was stopped by the sandbox ({message})",
                "templates run in Jinja's sandbox: use only the values of the report context, never attributes "
                "starting with '_'")
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"syntax error: {message}", "correct the Jinja syntax on that line"
    if isinstance(exc, jinja2.TemplateNotFound):
        return (f"template {inputs.safe_text(exc.name)!r} not found in the templates folder or the built-in "
                "templates", "check the name given to include, import or extends")
    if isinstance(exc, jinja2.UndefinedError):
        return message, "use only the names of the report context (see covreport.report.build_context)"
    if isinstance(exc, RenderTimeout):
        return (f"did not finish within {timeout:g} s", "make the loops smaller; a template must render within "
                                                         "that time")
    if isinstance(exc, RecursionError):
        return ("a macro, include or import calls itself without end (maximum recursion depth exceeded)",
                "give the recursion a condition that stops it")
    if isinstance(exc, MemoryError):
        return (f"needs more than the {inputs.limit_text(MEMORY_LIMIT)} of memory a template may use",
                "build smaller strings and lists")
    if isinstance(exc, OverflowError):
        return message, (f"use smaller numbers: the sandbox allows ranges of {jinja2.sandbox.MAX_RANGE:,} items and "
                         f"repeated strings or lists of {MAX_REPEAT:,}")
    return f"{type(exc).__name__}: {message}", "correct the expression on that line"


def template_error(exc, names=None, timeout=None):
    """The :class:`ReportError` saying where and why a template failed.

    Parameters
    ----------
    exc : BaseException
        What rendering raised.
    names : dict, optional
        File name -> template name (:attr:`FolderLoader.names`).
    timeout : float, optional
        The time limit, for the message of a :class:`RenderTimeout`.
    """
    where = _location(exc, names or {})
    if isinstance(exc, ReportError):  # the loader's refusals, inputs' file checks, the citation check
        if where:
            return ReportError(f"template {where}: {exc}")
        return ReportError(f"template {exc}") if isinstance(exc, TemplateRefused) else exc
    what, fix = _what_and_fix(exc, TIMEOUT if timeout is None else timeout)
    return ReportError(f"template {where or '(no line known)'}: {what} -- {fix}")


# --------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------

_PAIRS = "\x00pairs"  # a dict with keys JSON cannot hold (tuples): [[key, value], ...]


def to_plain(value):
    """``value`` (the report context) as JSON-able data; :func:`from_plain` undoes it."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: to_plain(v) for k, v in value.items() if k not in HELPERS}
        return {_PAIRS: [[to_plain(k), to_plain(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"the report context holds a {type(value).__name__}, which a child process cannot be given; "
                    "give the templates plain data (or add a rebuilt helper to sandbox.HELPERS)")


def from_plain(value):
    """The inverse of :func:`to_plain` (lists stay lists; tuple keys come back as tuples)."""
    if isinstance(value, dict):
        if set(value) == {_PAIRS}:
            return {tuple(k) if isinstance(k, list) else k: from_plain(v) for k, v in value[_PAIRS]}
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    return value


def _with_helpers(ctx):
    """Rebuild the context's function values (:data:`HELPERS`) from its data."""
    blocks = ctx.get("blocks") or []
    ctx["any_block_has"] = lambda key: any(b["block"].get(key) is not None for b in blocks)
    ctx["any_metric"] = lambda key: any(key in (b["block"].get("metrics") or {}) for b in blocks)
    return ctx


def _die_with_parent(parent):
    """Ask Linux to kill this process when its parent dies (prctl PR_SET_PDEATHSIG); exit if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the CPU limit and the parent's kill remain
        pass
    if os.getppid() != parent:
        os._exit(3)


def _child_main(parent):
    """Read ``{"templates", "context", "timeout"}`` on stdin, write ``{"html"}`` or ``{"error"}`` on stdout."""
    import resource

    from covreport.report.render import make_environment, render_template

    _die_with_parent(parent)
    request = json.load(sys.stdin.buffer)
    timeout = float(request["timeout"])
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    cpu = int(timeout + GRACE) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))

    def alarm(signum, frame):
        raise RenderTimeout

    signal.signal(signal.SIGALRM, alarm)
    env = None
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        env = make_environment(request["templates"])
        html = render_template(env, _with_helpers(from_plain(request["context"])))
        signal.setitimer(signal.ITIMER_REAL, 0)
        if len(html) > MAX_HTML:
            raise ReportError(f"the templates wrote a page of {inputs.limit_text(len(html))}, more than the "
                              f"{inputs.limit_text(MAX_HTML)} a report may be -- check their loops")
        reply = {"html": html}
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as a message
        signal.setitimer(signal.ITIMER_REAL, 0)
        names = env.loader.names if env is not None else {}
        reply = {"error": str(template_error(exc, names, timeout))}
    sys.stdout.buffer.write(json.dumps(reply).encode("utf-8"))
    sys.stdout.flush()


def render_in_child(templates, context, *, timeout=None):
    """Render ``report.html.j2`` of ``templates`` (then the built-in ones) with ``context`` in a child process.

    Parameters
    ----------
    templates : path
        The ``--templates`` folder.
    context : dict
        The report context (:func:`covreport.report.build_context`); sent as JSON.
    timeout : float, optional
        Wall-clock seconds (default :data:`TIMEOUT`).

    Returns
    -------
    str
        The rendered page, not yet sanitised.

    Raises
    ------
    ReportError
        ``template <name> line N: <what> -- <fix>`` for any failure, or that
        the render did not finish in time.
    """
    timeout = TIMEOUT if timeout is None else float(timeout)
    payload = json.dumps({"templates": str(templates), "context": to_plain(context), "timeout": timeout})
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = f"from covreport.report.sandbox import _child_main; _child_main({os.getpid()})"
    proc = subprocess.Popen([sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        out, _ = proc.communicate(payload.encode("utf-8"), timeout=timeout + GRACE)
    except subprocess.TimeoutExpired:
        raise ReportError(f"template report.html.j2 (in {inputs.safe_text(templates)}): did not finish within "
                          f"{timeout:g} s -- make the loops smaller; a template must render within that "
                          "time") from None
    finally:
        if proc.poll() is None:  # timeout, Ctrl-C or any other exception: the child never outlives this call
            proc.kill()
            proc.wait()
    try:
        reply = json.loads(out)
    except ValueError:
        reply = None
    if proc.returncode != 0 or not isinstance(reply, dict):
        code = proc.returncode
        why = (f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            why += f" (more than {int(timeout + GRACE) + 1} s of CPU)"
        raise ReportError(f"template report.html.j2 (in {inputs.safe_text(templates)}): the process rendering "
                          f"it {why} -- make the templates' loops and values smaller")
    if "error" in reply:
        raise ReportError(reply["error"])
    return reply["html"]


# --------------------------------------------------------------------------
# Sanitising the rendered page
# --------------------------------------------------------------------------

#: Elements a report may hold (everything else is removed, keeping its text).
TAGS = {
    "a", "abbr", "address", "article", "aside", "b", "bdi", "blockquote", "br", "caption", "cite", "code", "col",
    "colgroup", "dd", "del", "details", "dfn", "div", "dl", "dt", "em", "figcaption", "figure", "footer", "h1",
    "h2", "h3", "h4", "h5", "h6", "header", "hr", "i", "img", "ins", "kbd", "li", "main", "mark", "meta", "nav",
    "ol", "p", "pre", "q", "s", "samp", "section", "small", "span", "strong", "sub", "summary", "sup", "table",
    "tbody", "td", "tfoot", "th", "thead", "time", "title", "tr", "u", "ul", "var", "wbr",
}
#: Elements removed with everything inside them (``style`` is read apart, by :func:`clean_css`).
DROPPED = {"script", "style", "noscript", "template", "iframe", "frame", "frameset", "noframes", "object",
           "embed", "applet", "svg", "math", "textarea", "select", "button", "xmp", "noembed"}
#: Attributes a report's elements may carry (``aria-*`` too); ``style`` is cleaned by :func:`clean_css`.
ATTRIBUTES = {
    "*": {"class", "id", "title", "lang", "dir", "role", "style"},
    "a": {"href"}, "img": {"src", "alt", "width", "height"}, "td": {"colspan", "rowspan", "headers"},
    "th": {"colspan", "rowspan", "headers", "scope", "abbr"}, "ol": {"start", "reversed", "type"},
    "li": {"value"}, "col": {"span"}, "colgroup": {"span"}, "time": {"datetime"}, "details": {"open"},
    "meta": {"name", "content"},
}
_HEAD_OWN = {"html", "head", "body", "!doctype"}


def _allowed_url(tag, attr, value):
    value = value.strip()
    if attr == "href":
        return tag == "a" and value.startswith("#")
    return tag == "img" and value.lower().startswith("data:image/")


def _attribute_filter(tag, attr, value):
    if attr in ("href", "src"):
        return value if _allowed_url(tag, attr, value) else None
    if attr == "style":
        return clean_css(value, inline=True)[0] or None
    return value


_CLEANER = None


def _cleaner():
    global _CLEANER
    if _CLEANER is None:
        import nh3

        _CLEANER = nh3.Cleaner(tags=TAGS, clean_content_tags=DROPPED, attributes=ATTRIBUTES,
                               generic_attribute_prefixes={"aria-"}, attribute_filter=_attribute_filter,
                               url_schemes={"data"}, url_relative=lambda url: url if url.startswith("#") else None,
                               link_rel=None, strip_comments=True)
    return _CLEANER


# --- CSS -------------------------------------------------------------------------

#: CSS functions whose strings are URLs.
_URL_FUNCTIONS = {"url", "src", "image", "image-set", "-webkit-image-set", "cross-fade", "-webkit-cross-fade",
                  "element", "-moz-element"}
_GROUPING = {"media", "supports", "layer", "container", "scope", "starting-style", "document"}


def _is_data(url):
    return str(url).strip().lower().startswith("data:")


def css_references(nodes, inside=False):
    """Every reference out of the page in CSS tokens: URLs other than ``data:``, ``@import``, and
    ``var()``/``env()``/``attr()`` inside a URL function (a URL that could be assembled)."""
    out = []
    nodes = [n for n in nodes or () if n.type not in ("whitespace", "comment")]
    for i, node in enumerate(nodes):
        kind = node.type
        if i and nodes[i - 1].type == "at-keyword" and nodes[i - 1].lower_value == "import":
            continue  # the URL of an @import, reported with it
        if kind == "url" and not _is_data(node.value):
            out.append(f"url({node.value})")
        elif kind == "at-keyword" and node.lower_value == "import":
            out.append("@import " + (nodes[i + 1].serialize() if i + 1 < len(nodes) else ""))
        elif kind == "string" and inside and not _is_data(node.value):
            out.append(repr(node.value))
        elif kind == "function":
            name = node.lower_name
            if inside and name in ("var", "env", "attr"):
                out.append(f"{name}() inside a URL")
            elif name == "attr" and any(getattr(a, "lower_value", None) == "url" for a in node.arguments):
                out.append("attr(... url)")
            out += css_references(node.arguments, inside or name in _URL_FUNCTIONS)
        elif kind in ("() block", "[] block", "{} block"):
            out += css_references(node.content, inside)
    return out


def _references(text):
    import tinycss2

    return css_references(tinycss2.parse_component_value_list(text, skip_comments=True))


def _clean_block(content):
    """Declarations (and nested rules) of a block, without those that refer out of the page."""
    import tinycss2

    kept = []
    for item in tinycss2.parse_blocks_contents(content, skip_comments=True, skip_whitespace=True):
        if item.type == "declaration":
            if not css_references(item.value):
                kept.append(item.serialize())
        elif item.type in ("qualified-rule", "at-rule"):
            kept.append(_clean_rule(item))
    return "; ".join(k for k in kept if k)


def _clean_rule(rule):
    import tinycss2

    if rule.type not in ("qualified-rule", "at-rule") or css_references(rule.prelude):
        return ""
    if rule.type == "qualified-rule":
        return tinycss2.serialize(rule.prelude) + "{" + _clean_block(rule.content) + "}"
    name = rule.lower_at_keyword
    if name in ("import", "namespace", "charset"):
        return ""
    head = "@" + rule.at_keyword + tinycss2.serialize(rule.prelude)
    if rule.content is None:
        return head + ";"
    if name in _GROUPING:
        inner = "\n".join(_clean_rule(r) for r in tinycss2.parse_rule_list(rule.content, skip_comments=True,
                                                                             skip_whitespace=True))
    else:  # @page and its margin boxes, @font-face, @keyframes ...
        inner = _clean_block(rule.content)
    return head + "{" + inner + "}"


def clean_css(text, *, inline=False):
    """``text`` (a style sheet, or a style attribute when ``inline``) without references out of the page.

    CSS that refers to nothing outside the page is returned unchanged.
    Otherwise it is rebuilt without each declaration, rule or at-rule that
    does (``tinycss2`` tokens, so CSS escapes cannot hide a ``url(``); if the
    rebuilt CSS still refers out, nothing is kept.

    Returns
    -------
    (str, list of str)
        The CSS to use and what was removed.
    """
    import tinycss2

    found = _references(text)
    if not found and "</" not in text:
        return text, []
    if inline:
        cleaned = _clean_block(text)
    else:
        rules = tinycss2.parse_stylesheet(text, skip_comments=True, skip_whitespace=True)
        cleaned = "\n".join(r for r in (_clean_rule(rule) for rule in rules) if r)
    if _references(cleaned) or "</" in cleaned:
        return "", found or ["'</' in CSS"]
    return cleaned, found or ["'</' in CSS"]


# --- the page ------------------------------------------------------------------------

_STYLE = re.compile(r"<style\b([^>]*)>(.*?)(?:</style\s*>|\Z)", re.IGNORECASE | re.DOTALL)
_MEDIA = re.compile(r"""\bmedia\s*=\s*["']?([a-z0-9 ,():_-]+)["']?""", re.IGNORECASE)
_LANG = re.compile(r"""<html\b[^>]*?\blang\s*=\s*["']?([A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*)["'\s>]""",
                   re.IGNORECASE)
_BODY = re.compile(r"<body\b([^>]*)>", re.IGNORECASE)
_BARE_META = re.compile(r'<meta(?: content="[^"]*")?>')


class _Removed(HTMLParser):
    """What the sanitiser will remove from a page (for the warning; not the guard itself)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found = []

    def handle_starttag(self, tag, attrs):
        if tag == "meta" and any(k == "charset" or k == "http-equiv" and (v or "").lower() ==
                                 "content-security-policy" for k, v in attrs):
            return  # covreport writes its own
        if tag not in TAGS and tag not in _HEAD_OWN and tag != "style":
            self.found.append(f"<{tag}>")
            return
        allowed = ATTRIBUTES["*"] | ATTRIBUTES.get(tag, set())
        for key, value in attrs:
            if (key not in allowed and not key.startswith("aria-") and tag not in _HEAD_OWN
                    or key in ("href", "src") and not _allowed_url(tag, key, value or "")):
                self.found.append(f"<{tag} {key}={inputs.safe_text(value or '', limit=60)!r}>")
            elif key == "style":
                self.found += clean_css(value or "", inline=True)[1]

    handle_startendtag = handle_starttag


def sanitize_html(raw):
    """The page ``raw`` rebuilt from covreport's allow-lists, with covreport's CSP first in ``<head>``.

    Parameters
    ----------
    raw : str
        A rendered page (a whole HTML document).

    Returns
    -------
    (str, list of str)
        The page to write, and what was removed (empty for the built-in
        templates; a few examples, for a warning).
    """
    scan = _Removed()
    scan.feed(raw)
    scan.close()
    removed = scan.found
    styles = []
    for m in _STYLE.finditer(raw):
        css, dropped = clean_css(m.group(2))
        removed += dropped
        media = _MEDIA.search(m.group(1))
        if css.strip() and media:
            css = f"@media {media.group(1)} {{\n{css}\n}}"
        if css.strip():
            styles.append(f"<style>{css}</style>")
    body = _BODY.search(raw)
    head_src, body_src = (raw[:body.start()], raw[body.end():]) if body else ("", raw)
    body_attrs = ""
    if body and body.group(1).strip():
        div = _cleaner().clean(f"<div{body.group(1)}></div>")
        body_attrs = div[len("<div"):-len("></div>")] if div.startswith("<div") else ""
    lang = _LANG.search(raw)
    head = _BARE_META.sub("", _cleaner().clean(head_src)).strip()
    parts = ["<!DOCTYPE html>", f'<html lang="{lang.group(1)}">' if lang else "<html>", "<head>",
             f'<meta http-equiv="Content-Security-Policy" content="{CSP}">', '<meta charset="utf-8">']
    parts += [head] if head else []
    parts += styles
    parts += ["</head>", f"<body{body_attrs}>", _BARE_META.sub("", _cleaner().clean(body_src)).strip("\n"), "</body>", "</html>", ""]
    return "\n".join(parts), removed
