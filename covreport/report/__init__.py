"""The STARD 2015 report: one sandboxed Jinja environment, self-contained HTML, and a PDF.

:func:`render_report` turns the results mapping (docs/RESULTS.md) into

- ``report.html``: self-contained (CSS and figures inline as ``data:`` URIs,
  a Content-Security-Policy that forbids any request), readable offline;
- ``report.pdf``: WeasyPrint's rendering of the same HTML (A4, page numbers,
  table headers repeated, rows and figures never split); WeasyPrint is given
  a URL fetcher that refuses every URL but ``data:``;
- ``figures/*.png`` and ``figures/*.svg``.

The report follows the 30 items of STARD 2015 in order. What covreport knows
from the run (methods, numbers, limitations computed from the numbers) it
writes itself; what only the authors know comes from ``study.toml``
(:mod:`covreport.study`) and is shown as "to be completed" when absent. The
appendix lists every checklist item with where it is reported and who filled it.

The package has one module per job:

- :mod:`~covreport.report.format`: numbers, p-values, references and citations;
- :mod:`~covreport.report.summaries`: small summaries shared by the others;
- :mod:`~covreport.report.context`: results -> template context;
- :mod:`~covreport.report.checklists`: STARD 2015, TRIPOD+AI, CLAIM 2024 and STARD-AI checklists (items as data files);
- :mod:`~covreport.report.limitations`: limitations derived from the numbers;
- :mod:`~covreport.report.revalidation_view`: what moved since the last validation;
- :mod:`~covreport.report.render`: the sandboxed Jinja environment, HTML, PDF, figures.
- :mod:`~covreport.report.sandbox`: what a template may do (child process with limits, a loader
  confined to its folder) and what may reach ``report.html`` (the allow-list sanitiser, the CSP).

Templates live in the top-level ``templates/`` folder (shipped in the wheel as
``covreport/templates``). ``templates=DIR`` puts DIR in front of the built-in
templates, so an institution can override ``report.css`` or
``report.html.j2`` (or one of the partials) without copying the rest. All
templates are rendered in Jinja's sandbox with autoescaping on: text from a
manifest or a study file can never become markup or script, and a template
cannot reach Python internals or run a program.

References
----------
Bossuyt PM et al. STARD 2015: an updated list of essential items for reporting
diagnostic accuracy studies. BMJ 2015;351:h5527.
"""

from covreport.report.checklists import claim_checklist, stard_ai_checklist, stard_checklist, tripod_checklist
from covreport.report.context import build_context, plain_results
from covreport.report.format import (
    REFERENCES, STYLES, Citations, cite, fmt_auc, fmt_ci, fmt_est, fmt_num, fmt_p, fmt_pp, use_style,
)
from covreport.report.limitations import limitations
from covreport.report.render import (
    external_references, make_environment, render_html, render_report, report_style, templates_dir, write_pdf,
)
from covreport.report.revalidation_view import revalidation_view

__all__ = ["render_report", "render_html", "write_pdf", "make_environment", "templates_dir", "build_context",
           "plain_results", "stard_checklist", "tripod_checklist", "claim_checklist", "stard_ai_checklist", "limitations", "revalidation_view",
           "external_references", "report_style", "STYLES", "use_style", "fmt_p", "fmt_pp", "Citations", "fmt_auc", "fmt_num", "fmt_ci", "fmt_est", "cite", "REFERENCES"]
