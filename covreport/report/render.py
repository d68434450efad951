"""Rendering: the sandboxed Jinja environment, self-contained HTML, the PDF and the figures."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import jinja2

import covreport
from covreport._io import atomic_write_bytes, atomic_write_text
from covreport.errors import ReportError
from covreport.report.context import build_context, display_path, plain_results, scrub_paths
from covreport.report.format import (
    TBC, Citations, cite, fmt_auc, fmt_ci, fmt_count, fmt_est, fmt_est_text, fmt_num, fmt_p, fmt_pct, fmt_pp,
    STYLES, capfirst, fmt_p_below, fmt_prop_text, fmt_ratio, fmt_sig, fmt_signed, italic_p, use_style,
)
from covreport.report import sandbox
from covreport.report.revalidation_view import REVALIDATION_FIGURE

log = logging.getLogger(__name__)

# --- templates --------------------------------------------------------------------


def templates_dir():
    """The built-in templates: ``covreport/templates`` in a wheel, ``templates/`` in a checkout."""
    pkg = Path(covreport.__file__).resolve().parent
    for candidate in (pkg / "templates", pkg.parent / "templates"):
        if (candidate / "report.html.j2").is_file():
            return candidate
    raise ReportError(f"the report templates are missing (looked in {pkg / 'templates'} and "
                      f"{pkg.parent / 'templates'}); reinstall covreport")


def _pluck(rows, key):
    """``row.get(key)`` of each mapping in ``rows`` (None where absent or not a mapping)."""
    return [row.get(key) if isinstance(row, dict) else None for row in rows or []]


def make_environment(templates=None):
    """The one Jinja environment of covreport: sandboxed, autoescaping always on.

    Every template, built-in or from ``--templates``, runs in Jinja's
    :class:`~jinja2.sandbox.SandboxedEnvironment` (with ``*`` and ``**``
    bounded, :class:`~covreport.report.sandbox.BoundedSandbox`): attributes
    starting with an underscore (``__init__``, ``__globals__``, ...) and
    unsafe methods are refused, so a template cannot reach Python objects
    beyond the values it is given, let alone run a program. Templates are read by
    :class:`~covreport.report.sandbox.FolderLoader`: regular files inside
    their folder, never through a symbolic link.

    Parameters
    ----------
    templates : path, optional
        A folder whose templates take precedence over the built-in ones.
    """
    folders = []
    if templates is not None:
        tdir = Path(templates)
        if not tdir.is_dir():
            raise ReportError(f"--templates {tdir}: not a folder; give a folder holding report.html.j2 "
                              "and/or report.css to override")
        folders.append(tdir)
    folders.append(templates_dir())
    env = sandbox.BoundedSandbox(
        loader=sandbox.FolderLoader(folders),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update({"num": fmt_num, "auc": fmt_auc, "p": fmt_p, "pp": fmt_pp, "ci": fmt_ci, "est": fmt_est,
                        "est_text": fmt_est_text, "prop_text": fmt_prop_text, "whole": fmt_count,
                        "signed": fmt_signed, "p_below": fmt_p_below, "pct": fmt_pct, "ratio": fmt_ratio, "display_path": display_path,
                        "scrub_paths": scrub_paths, "pluck": _pluck, "capfirst": capfirst,
                        "words": _words, "plain_terms": _plain_terms, "sig": fmt_sig})
    env.globals.update({"cite": cite, "TBC": TBC})
    return env


def _words(items):
    """'A', 'A and B', 'A, B and C'."""
    items = [str(i) for i in items]
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


#: Model terms of covreport.stats.mixed in words, for the report's table notes (the code is in Appendix E).
_TERMS = (("C(outcome, Treatment('Improved'))", "the outcome (reference Improved)"),
          ("np.log1p(interval_days)", "log(1 + days between the CXRs)"),
          ("np.log(interval_days)", "log(days between the CXRs)"),
          ("C(projection_change, Treatment('same'))", "the change of projection"),
          ("projection_change", "the change of projection"), ("'same'", "the same projection"))


def _plain_terms(text):
    for code, words in _TERMS:
        text = str(text).replace(code, words)
    return text


# --- figures ------------------------------------------------------------------------


def _data_uri(path):
    mime = {"svg": "image/svg+xml", "png": "image/png"}[path.suffix[1:]]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _make_figures(results, cams, folder):
    """Draw and save every figure; return ``{stem: {"uri", "paths"}}``."""
    from covreport import figures

    todo = [("flow_diagram", lambda: figures.flow_diagram(results), "png")]
    if results.get("validation_auc"):
        todo.append(("roc_curves", lambda: figures.roc_grid(results), "png"))
    if results.get("pairs") and results.get("labels"):
        todo.append(("change_boxplots", lambda: figures.change_boxplots(results), "png"))
    pred = results.get("prediction") or {}
    if any(figures.calibration_drawable(b) for b in pred.values()):
        todo.append(("calibration", lambda: figures.calibration_figure(results), "png"))
    if (results.get("decision_curve") or {}).get("rows"):
        todo.append(("decision_curve", lambda: figures.decision_curve_figure(results), "png"))
    if (results.get("added_value") or {}).get("decision_curve"):
        todo.append(("added_value_decision_curve", lambda: figures.added_value_decision_figure(results), "png"))
    if (results.get("sites") or {}).get("rows"):
        todo.append(("site_forest", lambda: figures.site_forest_figure(results), "png"))
    if ((results.get("sites") or {}).get("iecv") or {}).get("rows"):
        todo.append(("site_forest_iecv", lambda: figures.site_forest_figure(results, external=True), "png"))
    if cams:
        todo.append(("class_activation_maps", lambda: figures.cam_figure(cams), "png"))
    rev = results.get("revalidation")
    if rev and len(rev.get("previous") or []) >= 2:
        todo.append((REVALIDATION_FIGURE, lambda: figures.trend_figure(rev), "png"))
    out = {}
    for stem, draw, inline in todo:
        try:
            fig = draw()
        except ReportError as exc:
            if stem != REVALIDATION_FIGURE:
                raise
            log.warning("no trend figure of the revalidation: %s", exc)
            continue
        paths = figures.save_figure(fig, stem, folder)
        out[stem] = {"uri": _data_uri(paths[inline]), "paths": paths}
    return out


# --- rendering -------------------------------------------------------------------------

_TAG = re.compile(r"<[^<>]+>")
_ATTR = re.compile(r"""\s(?:src|href|srcset|poster|action|formaction|data|background|xlink:href|ping|manifest)"""
                   r"""\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.IGNORECASE)
_STYLE = re.compile(r"<style[^>]*>(.*?)</style>", re.IGNORECASE | re.DOTALL)
_CSS_URL = re.compile(r"""url\(\s*['"]?\s*([^'")\s]*)|@import""", re.IGNORECASE)


def external_references(html):
    """URLs in tag attributes or inline CSS that are not ``data:`` or ``#fragment`` (should be empty)."""
    bad = []
    for tag in _TAG.findall(html):
        for m in _ATTR.finditer(tag):
            url = (m.group(1) or m.group(2) or m.group(3) or "").strip()
            if url and not url.lower().startswith(("data:", "#")):
                bad.append(url)
    for css in _STYLE.findall(html) + re.findall(r"""style\s*=\s*"([^"]*)\"""", html):
        for m in _CSS_URL.finditer(css):
            url = m.group(1) if m.group(1) is not None else "@import"
            if not url.lower().startswith(("data:", "#")):
                bad.append(url)
    return bad


def render_template(env, ctx):
    """``report.html.j2`` of ``env`` rendered with ``ctx``, citations numbered in order of first use.

    Two passes: the first records the order of first citation, the second
    numbers every citation in that order and lists exactly the cited works
    (Vancouver style). Numbers follow ``ctx["style"]``. Exceptions propagate
    (see :func:`covreport.report.sandbox.template_error`).
    """
    template = env.get_template("report.html.j2")
    first = Citations()
    with use_style(ctx.get("style")):
        template.render(**ctx, cite=first.cite, cite_text=first.text, references=[])
        second = Citations(first.order)
        html = template.render(**ctx, cite=second.cite, cite_text=second.text, references=first.listed())
    if second.order != first.order:
        raise ReportError("a template cites a work only on its second rendering; cite works unconditionally")
    return html


def report_style(results):
    """The number style recorded in ``provenance.report_options.style``.

    A results.json that names none was written before covreport had styles,
    in what is now the ``vancouver`` style: rendering it again reads the same.
    """
    opts = ((results.get("provenance") or {}).get("report_options") or {})
    style = opts.get("style") if isinstance(opts, dict) else None
    if style is None:
        return "vancouver"
    if style not in STYLES:
        raise ReportError(f"results.json: provenance.report_options.style is {str(style)[:40]!r}; it must be one "
                          f"of {', '.join(STYLES)} (covreport run --style)")
    return style


def render_html(results, *, templates=None, figures=None, cams_note=None, has_cams=False, cams_info=None):
    """Render ``report.html.j2`` to a string (see :func:`build_context` for what templates see).

    Numbers follow :func:`report_style` (:mod:`covreport.report.format`).

    The built-in templates are rendered in this process; ``templates`` in a
    child process with bounded time and memory
    (:func:`covreport.report.sandbox.render_in_child`). Either page then
    passes through :func:`covreport.report.sandbox.sanitize_html`: no
    script, event handler, navigation or reference out of the page
    survives, and covreport's Content-Security-Policy comes first in
    ``<head>``. What the sanitiser removed is logged as a warning.

    Raises
    ------
    ReportError
        ``template <name> line N: <what> -- <fix>`` if a template is
        missing, refused or fails.
    """
    if templates is not None and not Path(templates).is_dir():
        raise ReportError(f"--templates {templates}: not a folder; give a folder holding report.html.j2 "
                          "and/or report.css to override")
    style = report_style(results)
    with use_style(style):
        ctx = build_context(results, figures=figures, cams_note=cams_note, has_cams=has_cams, cams_info=cams_info)
        if templates is not None:
            raw = sandbox.render_in_child(templates, ctx)
        else:
            env = make_environment()
            try:
                raw = render_template(env, ctx)
            except Exception as exc:  # noqa: BLE001 - every failure becomes "template <name> line N: ..."
                err = sandbox.template_error(exc, env.loader.names)
                if err is exc:
                    raise
                raise err from exc
        raw = italic_p(raw)
    html, removed = sandbox.sanitize_html(raw)
    if removed:
        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        log.warning("covreport removed %d item(s) from report.html that would run a script, navigate or load "
                    "something outside the page: %s; a report is self-contained (data: images, #links only)",
                    len(removed), shown)
    return html


def _url_fetcher():
    """A WeasyPrint URL fetcher that only serves ``data:`` URLs and records what it refused."""
    import weasyprint.urls as wurls

    refused = []
    base = getattr(wurls, "URLFetcher", None)
    if base is not None:  # WeasyPrint >= 66

        class _Fetcher(base):
            def fetch(self, url, headers=None):
                if not str(url).lower().startswith("data:"):
                    refused.append(str(url))
                    raise ValueError(f"covreport refuses to fetch {url}: the report must be self-contained")
                return super().fetch(url, headers)

        return _Fetcher(allowed_protocols=("data",)), refused

    def fetch(url, *args, **kwargs):  # WeasyPrint < 66: a function returning a dict
        if not str(url).lower().startswith("data:"):
            refused.append(str(url))
            raise ValueError(f"covreport refuses to fetch {url}: the report must be self-contained")
        return wurls.default_url_fetcher(url, *args, **kwargs)

    return fetch, refused


def write_pdf(html, path):
    """Render ``html`` to a PDF at ``path`` with WeasyPrint, fetching nothing but ``data:`` URLs.

    The PDF is rendered in memory and written atomically (:func:`covreport._io.atomic_write_bytes`).
    """
    import weasyprint

    path = Path(path)
    fetcher, refused = _url_fetcher()
    # WeasyPrint logs every CSS property it ignores at WARNING; keep those out of the user's console.
    wlog = logging.getLogger("weasyprint")
    level = wlog.level
    wlog.setLevel(logging.ERROR)
    try:
        data = weasyprint.HTML(string=html, base_url=None, url_fetcher=fetcher).write_pdf()
    finally:
        wlog.setLevel(level)
    if refused:
        raise ReportError(f"the report refers to {len(refused)} external resource(s), e.g. {refused[0]!r}; "
                          "templates must inline everything (data: URIs)")
    return atomic_write_bytes(path, data, error_class=ReportError)


def _cams_note(results, cams):
    if cams:
        return None
    inputs = (results.get("provenance") or {}).get("inputs") or {}
    if "scores" in inputs:
        return ("No class activation maps were computed: this run read its index-test outputs from a scores file "
                "(reviewer mode), so the model itself was not available to covreport. Rerun with --weights to "
                "add them.")
    return "No class activation maps were computed for this run (none were passed to the report)."


def _cams_info(cams):
    """What the caption says of each pair with activation maps (no arrays), when results.json has no record."""
    keys = ("pair_id", "outcome", "label", "probability", "label_first", "label_second", "rule")
    return [{k: c.get(k) for k in keys} for c in cams or []]


def render_report(results, out_dir, *, templates=None, cams=None, pdf=True):
    """Write the STARD 2015 report of ``results`` into ``out_dir``.

    Parameters
    ----------
    results : dict
        results.json content (docs/RESULTS.md).
    out_dir : path
        Folder to write into (created if missing). The caller moves the whole
        folder into place; files are also written under temporary names here.
    templates : path, optional
        Folder of templates overriding the built-in ones (``--templates``).
    cams : list of dict, optional
        Class activation maps, ``{"pair_id", "label", "first": {"image",
        "heatmap"}, "second": {...}}``; without them the report says why
        there are none.
    pdf : bool
        Also write ``report.pdf`` (WeasyPrint).

    Returns
    -------
    dict
        Relative path (``"report.html"``, ``"report.pdf"``,
        ``"figures/flow_diagram.svg"``, ...) to the written :class:`~pathlib.Path`.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the report folder {out_dir}: {exc.strerror}") from exc
    written = {}
    results = plain_results(results)
    figs = _make_figures(results, cams, out_dir / "figures")
    for stem, f in figs.items():
        for ext, p in f["paths"].items():
            written[f"figures/{stem}.{ext}"] = p
    html = render_html(results, templates=templates, figures=figs, cams_note=_cams_note(results, cams),
                       has_cams=bool(cams), cams_info=_cams_info(cams))
    atomic_write_text(out_dir / "report.html", html, error_class=ReportError)
    written["report.html"] = out_dir / "report.html"
    if pdf:
        from covreport import progress

        with progress.stage("Writing PDF"):
            written["report.pdf"] = write_pdf(html, out_dir / "report.pdf")
    return written
