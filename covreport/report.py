"""The STARD 2015 report: one Jinja environment, self-contained HTML, and a PDF.

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

Templates live in the top-level ``templates/`` folder (shipped in the wheel as
``covreport/templates``). ``templates=DIR`` puts DIR in front of the built-in
templates, so an institution can override ``report.css`` or
``report.html.j2`` (or one of the partials) without copying the rest. All
templates are rendered with autoescaping on: text from a manifest or a study
file can never become markup or script.

References
----------
Bossuyt PM et al. STARD 2015: an updated list of essential items for reporting
diagnostic accuracy studies. BMJ 2015;351:h5527.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import numbers
import os
import re
import tempfile
from pathlib import Path

import jinja2

import covreport
from covreport.constants import IMPROVED, OUTCOMES, STABLE, WORSE
from covreport.errors import ReportError
from covreport.study import STUDY_FIELDS, validate_study

log = logging.getLogger(__name__)

TBC = "to be completed"
#: Thresholds of the limitations derived from the numbers.
SMALL_GROUP = 20          # pairs in an outcome group
WIDE_CI = 0.30            # width of a 95% CI of a proportion or an AUC
IMBALANCE_RATIO = 1.5     # majority:minority ratio in the prediction task
ALPHA = 0.05

#: Display names of the prediction metrics.
METRIC_NAMES = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
                "ppv": "PPV", "npv": "NPV", "lr_positive": "LR+", "lr_negative": "LR-"}

#: Reference categories (the reference standard's outcome definitions).
OUTCOME_DEFINITIONS = {
    WORSE: "new or increased radiological findings on the second CXR compared with the first",
    STABLE: "no change in radiological findings between the two CXRs",
    IMPROVED: "decreased radiological findings on the second CXR compared with the first",
}

#: Cited works, in citation order; numbers in the report follow this order.
REFERENCES = {
    "stard": "Bossuyt PM, Reitsma JB, Bruns DE, et al. STARD 2015: an updated list of essential items for "
             "reporting diagnostic accuracy studies. BMJ 2015;351:h5527.",
    "stard_ee": "Cohen JF, Korevaar DA, Altman DG, et al. STARD 2015 guidelines for reporting diagnostic accuracy "
                "studies: explanation and elaboration. BMJ Open 2016;6:e012799.",
    "duchesne": "Duchesne S, Gourdeau D, Archambault P, et al. Tracking and predicting COVID-19 radiological "
                "trajectory using deep learning on chest X-rays: initial accuracy testing. medRxiv 2020. "
                "doi:10.1101/2020.05.01.20086207.",
    "chexpert": "Irvin J, Rajpurkar P, Ko M, et al. CheXpert: a large chest radiograph dataset with uncertainty "
                "labels and expert comparison. Proc AAAI Conf Artif Intell 2019;33:590-597.",
    "densenet": "Huang G, Liu Z, van der Maaten L, Weinberger KQ. Densely connected convolutional networks. "
                "Proc IEEE CVPR 2017:4700-4708.",
    "delong": "DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more correlated receiver "
              "operating characteristic curves: a nonparametric approach. Biometrics 1988;44:837-845.",
    "sunxu": "Sun X, Xu W. Fast implementation of DeLong's algorithm for comparing the areas under correlated "
             "receiver operating characteristic curves. IEEE Signal Process Lett 2014;21:1389-1393.",
    "mw": "Mann HB, Whitney DR. On a test of whether one of two random variables is stochastically larger than "
          "the other. Ann Math Stat 1947;18:50-60.",
    "cohen": "Cohen J. Statistical Power Analysis for the Behavioral Sciences. 2nd ed. Hillsdale, NJ: "
             "Lawrence Erlbaum; 1988.",
    "hedges": "Hedges LV, Olkin I. Statistical Methods for Meta-Analysis. Orlando, FL: Academic Press; 1985.",
    "holm": "Holm S. A simple sequentially rejective multiple test procedure. Scand J Stat 1979;6:65-70.",
    "bh": "Benjamini Y, Hochberg Y. Controlling the false discovery rate: a practical and powerful approach to "
          "multiple testing. J R Stat Soc Series B 1995;57:289-300.",
    "sklearn": "Pedregosa F, Varoquaux G, Gramfort A, et al. Scikit-learn: machine learning in Python. "
               "J Mach Learn Res 2011;12:2825-2830.",
    "ambroise": "Ambroise C, McLachlan GJ. Selection bias in gene extraction on the basis of microarray "
                "gene-expression data. Proc Natl Acad Sci USA 2002;99:6562-6566.",
    "cp": "Clopper CJ, Pearson ES. The use of confidence or fiducial limits illustrated in the case of the "
          "binomial. Biometrika 1934;26:404-413.",
    "mercaldo": "Mercaldo ND, Lau KF, Zhou XH. Confidence intervals for predictive values with an emphasis to "
                "case-control studies. Stat Med 2007;26:2170-2183.",
    "simel": "Simel DL, Samsa GP, Matchar DB. Likelihood ratios with confidence: sample size estimation for "
             "diagnostic test studies. J Clin Epidemiol 1991;44:763-770.",
    "ojala": "Ojala M, Garriga GC. Permutation tests for studying classifier performance. J Mach Learn Res "
             "2010;11:1833-1863.",
    "welch": "Welch BL. The generalization of 'Student's' problem when several different population variances "
             "are involved. Biometrika 1947;34:28-35.",
    "cam": "Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A. Learning deep features for discriminative "
           "localization. Proc IEEE CVPR 2016:2921-2929.",
    "claim": "Tejani AS, Klontzas ME, Gatti AA, et al. Checklist for Artificial Intelligence in Medical Imaging "
             "(CLAIM): 2024 update. Radiol Artif Intell 2024;6:e240300.",
    "stard_ai": "Sounderajah V, Guni A, Liu X, et al. The STARD-AI reporting guideline for diagnostic accuracy "
                "studies using artificial intelligence. Nat Med 2025.",
    "altman_bland": "Altman DG, Bland JM. Interaction revisited: the difference between two estimates. "
                    "BMJ 2003;326:219.",
}


def cite(*keys):
    """Citation marks like ``[6, 7]`` for keys of :data:`REFERENCES`."""
    order = list(REFERENCES)
    return "[" + ", ".join(str(order.index(k) + 1) for k in keys) + "]"


# --- number formatting ---------------------------------------------------------


def _finite(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x, nd=2):
    """A number with ``nd`` decimals ("n/a" when missing); integers as integers."""
    if not _finite(x):
        return "n/a"
    if isinstance(x, numbers.Integral):
        return str(int(x))
    return f"{float(x):.{nd}f}"


def fmt_auc(x):
    """An AUC or a proportion: 3 decimals."""
    return fmt_num(x, 3)


def fmt_p(p):
    """A p-value: "<0.001", else 3 significant digits ("0.0234", "0.500")."""
    if not _finite(p):
        return "n/a"
    if p < 0.001:
        return "<0.001"
    return f"{min(p, 1.0):#.3g}"


def fmt_ci(lo, hi, nd=3):
    """A 95% CI "lo-hi" (an en dash), or "lo to hi" when a bound is negative."""
    if not (_finite(lo) and _finite(hi)):
        return "n/a"
    sep = " to " if (lo < 0 or hi < 0) else "\u2013"
    return f"{lo:.{nd}f}{sep}{hi:.{nd}f}"


def fmt_est(rec, nd=3, est="estimate"):
    """``estimate (lo-hi)`` from a record with ``estimate``/``ci_low``/``ci_high``."""
    if not rec or not _finite(rec.get(est)):
        return "n/a"
    if _finite(rec.get("ci_low")) and _finite(rec.get("ci_high")):
        return f"{fmt_num(float(rec[est]), nd)} ({fmt_ci(rec['ci_low'], rec['ci_high'], nd)})"
    return fmt_num(float(rec[est]), nd)


def fmt_pct(k, n, nd=1):
    """``k (x.x%)``."""
    if not _finite(k):
        return "n/a"
    if not _finite(n) or n == 0:
        return str(k)
    return f"{k} ({100.0 * k / n:.{nd}f}%)"


def _ci_width(rec, lo="ci_low", hi="ci_high"):
    if rec and _finite(rec.get(lo)) and _finite(rec.get(hi)):
        return rec[hi] - rec[lo]
    return None


# --- templates --------------------------------------------------------------------


def templates_dir():
    """The built-in templates: ``covreport/templates`` in a wheel, ``templates/`` in a checkout."""
    pkg = Path(covreport.__file__).resolve().parent
    for candidate in (pkg / "templates", pkg.parent / "templates"):
        if (candidate / "report.html.j2").is_file():
            return candidate
    raise ReportError(f"the report templates are missing (looked in {pkg / 'templates'} and "
                      f"{pkg.parent / 'templates'}); reinstall covreport")


def make_environment(templates=None):
    """The one Jinja environment of covreport (autoescaping always on).

    Parameters
    ----------
    templates : path, optional
        A folder whose templates take precedence over the built-in ones.
    """
    loaders = []
    if templates is not None:
        tdir = Path(templates)
        if not tdir.is_dir():
            raise ReportError(f"--templates {tdir}: not a folder; give a folder holding report.html.j2 "
                              "and/or report.css to override")
        loaders.append(jinja2.FileSystemLoader(str(tdir)))
    loaders.append(jinja2.FileSystemLoader(str(templates_dir())))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update({"num": fmt_num, "auc": fmt_auc, "p": fmt_p, "ci": fmt_ci, "est": fmt_est,
                        "pct": fmt_pct})
    env.globals.update({"cite": cite, "TBC": TBC})
    return env


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
    if cams:
        todo.append(("class_activation_maps", lambda: figures.cam_figure(cams), "png"))
    rev = results.get("revalidation")
    if rev and len(rev.get("previous") or []) >= 2:
        from covreport.revalidation import trend_figure

        todo.append((REVALIDATION_FIGURE, lambda: trend_figure(rev), "png"))
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


# --- derived content: abstract, methods, limitations, checklist -------------------


def _prediction_blocks(results):
    pred = results.get("prediction") or {}
    headline = pred.get("headline", "nested")
    titles = {"nested": "Nested (feature selection inside each fold)",
              "global": "Global selection (original study; OPTIMISTIC)",
              "reversed": "Reversed-order control (second CXR)"}
    short = {"nested": "Nested", "global": "Global (OPTIMISTIC)", "reversed": "Reversed order (control)"}
    blocks = []
    for name in ("nested", "global", "reversed"):
        b = pred.get(name)
        if b:
            blocks.append({"name": name, "title": titles[name], "short": short[name], "block": b, "headline": name == headline,
                           "optimistic": name == "global"})
    blocks.sort(key=lambda d: (not d["headline"], ("nested", "global", "reversed").index(d["name"])))
    return blocks


def _threshold(block):
    """The probability cut-off implied by the stored predictions, if it is 0.5."""
    rows = [p for p in block.get("pairs", []) if _finite(p.get("probability"))]
    if rows and all((p["probability"] >= 0.5) == (p["predicted"] == WORSE) for p in rows):
        return 0.5
    return None


def _validation_summary(results):
    rows = results.get("validation_auc") or []
    est = [r for r in rows if _finite(r.get("auc"))]
    if not est:
        return None
    lo = min(est, key=lambda r: r["auc"])
    hi = max(est, key=lambda r: r["auc"])
    return {"n": len(rows), "estimable": len(est), "not_estimable": [r for r in rows if not _finite(r.get("auc"))],
            "min": lo, "max": hi, "n_pos_neg": (rows[0].get("n_pos", 0) or 0) + (rows[0].get("n_neg", 0) or 0)}


def _group_summary(results):
    rows = results.get("group_differences") or []
    tested = [r for r in rows if _finite(r.get("p"))]
    return {
        "tests": len(tested),
        "raw": sum(r["p"] < ALPHA for r in tested),
        "holm": sum(_finite(r.get("p_holm")) and r["p_holm"] < ALPHA for r in tested),
        "bh": sum(_finite(r.get("p_bh")) and r["p_bh"] < ALPHA for r in tested),
        "holm_rows": [r for r in tested if _finite(r.get("p_holm")) and r["p_holm"] < ALPHA],
        "expected_false": ALPHA * len(tested),
    }


# --- revalidation: what moved since the last validation --------------------------

#: Stem of the trend figure (figures/<stem>.png and .svg), drawn when 2 or more previous results are given.
REVALIDATION_FIGURE = "revalidation_trend"
#: Characters of a SHA-256 shown in the report (the full value is in results.json).
SHA_SHOWN = 12

_PROTOCOL_TITLES = {"nested": "nested protocol", "global": "global protocol (original study; OPTIMISTIC)",
                    "reversed": "reversed-order control (second CXR)"}
_PREDICTION_ORDER = ("accuracy", "sensitivity", "specificity", "AUC")
_WVI_D = f"{WORSE} vs {IMPROVED} Cohen's d"
_WVI_P = f"{WORSE} vs {IMPROVED} p"


def _short_sha(sha):
    """The first :data:`SHA_SHOWN` characters of a SHA-256 and an ellipsis, or "not recorded"."""
    if not sha:
        return "not recorded"
    sha = str(sha)
    return sha if len(sha) <= SHA_SHOWN else sha[:SHA_SHOWN] + "\u2026"


def _date(created):
    """The date part of an ISO-8601 time stamp ("date not recorded" when missing)."""
    return str(created)[:10] if created else "date not recorded"


def _not_comparable_why(entry, provenance):
    """A short phrase saying why a previous result is not comparable with the new one (None if it is)."""
    if entry.get("comparable") is not False:
        return None
    why = []
    old, new = entry.get("weights_sha256"), provenance.get("weights_sha256")
    if not old or not new:
        why.append("weights SHA-256 not recorded, so the same model cannot be confirmed")
    elif old != new:
        why.append(f"different weights (SHA-256 {_short_sha(old)} then, {_short_sha(new)} now)")
    if json.dumps(entry.get("preprocessing"), sort_keys=True, default=str) != \
            json.dumps(provenance.get("preprocessing"), sort_keys=True, default=str):
        why.append("different preprocessing")
    return "; ".join(why) or str(entry.get("reason") or "not comparable")


def _reval_format(quantity, estimate, lo, hi):
    if quantity.endswith(" p"):
        return fmt_p(estimate)
    return fmt_est({"estimate": estimate, "ci_low": lo, "ci_high": hi}, 2 if "Cohen" in quantity else 3)


def _reval_change(quantity, change):
    if not _finite(change):
        return "n/a"
    if quantity.endswith(" p") and change != 0 and abs(change) < 0.001:
        return f"{change:+.1e}"
    return f"{change:+.{2 if 'Cohen' in quantity else 3}f}"


def _reval_groups(rev, results):
    """The headline rows of the revalidation record, grouped and ordered for reading.

    Order: the prediction of the headline protocol, the other protocols
    (global, then the reversed-order control), the validation AUC of each
    label, then Worse vs Improved per label (Cohen's d, then the p-value);
    labels in the order of ``results["labels"]``. Rows of any other quantity
    come last, in record order.
    """
    labels = list(results.get("labels") or [])
    head = rev.get("headline_protocol") or (results.get("prediction") or {}).get("headline") or "nested"
    protocols = [head] + [p for p in ("nested", "global", "reversed") if p != head]
    prefix = None
    previous = rev.get("previous") or []
    if previous and previous[-1].get("comparable") is False:
        prefix = "not comparable: " + str(previous[-1].get("reason") or "")

    def label_rank(label):
        return labels.index(label) if label in labels else len(labels)

    groups = {}
    for i, h in enumerate(rev.get("headline") or []):
        q, label, protocol = h.get("quantity") or "", h.get("label"), h.get("protocol")
        if protocol is not None and q in _PREDICTION_ORDER:
            rank = protocols.index(protocol) if protocol in protocols else len(protocols)
            key = (0, rank, str(protocol))
            title = (f"Prediction of {WORSE} vs {IMPROVED}, "
                     + _PROTOCOL_TITLES.get(protocol, f"{protocol} protocol")
                     + (" [headline]" if protocol == head else ""))
            name = q if q == "AUC" else q.capitalize()
            short = f"{q} ({protocol})"
            order = (_PREDICTION_ORDER.index(q), i)
        elif q == "validation AUC":
            key, title = (1, 0, ""), "Validation AUC of each label"
            name, short, order = str(label), f"{label} validation AUC", (label_rank(label), i)
        elif q in (_WVI_D, _WVI_P):
            key = (2, 0, "")
            title = f"{WORSE} vs {IMPROVED}: change of each label (Cohen's d; Mann-Whitney U p)"
            what = "Cohen's d" if q == _WVI_D else "p"
            name, short = f"{label}: {what}", f"{what} of {label} ({WORSE} vs {IMPROVED})"
            order = (label_rank(label), 0 if q == _WVI_D else 1, i)
        else:
            key, title = (3, 0, ""), "Other"
            name = " ".join(str(x) for x in (q, label, protocol) if x)
            short, order = name, (i,)
        note = h.get("note") or ""
        if prefix and note.startswith(prefix):
            rest = note[len(prefix):].lstrip("; ")
            note = "not comparable" + (f"; {rest}" if rest else "")
        excludes = h.get("new_ci_excludes_old")
        row = {
            "name": name, "short": short, "quantity": q, "label": label, "protocol": protocol,
            "old": _reval_format(q, h.get("old_estimate"), h.get("old_ci_low"), h.get("old_ci_high")),
            "new": _reval_format(q, h.get("new_estimate"), h.get("new_ci_low"), h.get("new_ci_high")),
            "change": _reval_change(q, h.get("change")),
            "excludes": excludes,
            "excludes_text": {True: "yes", False: "no"}.get(excludes, "n/a"),
            "note": note,
        }
        groups.setdefault(key, {"title": title, "rows": []})["rows"].append((order, row))
    out = []
    for key in sorted(groups):
        g = groups[key]
        out.append({"title": g["title"], "rows": [r for _o, r in sorted(g["rows"], key=lambda t: t[0])]})
    return out


def _count_phrase(n, what):
    """"12 pairs added", "1 pair fewer", "no pair added"."""
    if not isinstance(n, numbers.Integral):
        return None
    if n == 0:
        return f"no {what} added"
    word = what if abs(n) == 1 else what + "s"
    return f"{abs(n)} {word} " + ("added" if n > 0 else "fewer")


def revalidation_view(results):
    """What the report shows of ``results["revalidation"]`` (None when there is none).

    Returns
    -------
    dict or None
        ``previous`` (the record's entries with ``date``, ``sha_short``,
        ``why`` (short reason when not comparable) and ``latest``),
        ``latest``, ``comparable``, ``added`` (rows per outcome and Total,
        with ``pairs_new_in``/``pairs_removed`` from ``pair_changes`` when
        known), ``pair_changes``, ``groups`` (headline rows grouped and
        ordered, see :func:`_reval_groups`), ``n_rows``, ``n_flagged``
        (rows with a CI), ``excluded`` (rows whose new CI excludes the old
        estimate), ``abstract`` (one sentence for the abstract),
        ``warnings``, ``methods`` and ``figure`` (the stem of the trend
        figure when 2 or more previous results were given).
    """
    rev = results.get("revalidation")
    if not rev:
        return None
    prov = results.get("provenance") or {}
    entries = list(rev.get("previous") or [])
    previous = []
    for i, p in enumerate(entries):
        previous.append({**p, "n": i + 1, "date": _date(p.get("created")),
                         "sha_short": _short_sha(p.get("weights_sha256")),
                         "why": _not_comparable_why(p, prov), "latest": i == len(entries) - 1})
    latest = previous[-1] if previous else None
    comparable = bool(rev.get("comparable")) if latest else None
    pc = rev.get("pair_changes") or None
    pc_by = {b.get("outcome"): b for b in (pc or {}).get("by_outcome") or []}
    added = []
    for a in rev.get("added") or []:
        b = pc_by.get(a.get("outcome")) or {}
        if a.get("outcome") == "Total" and pc:
            b = pc
        added.append({**a, "pairs_new_in": b.get("pairs_added"), "pairs_removed": b.get("pairs_removed")})
    total = next((a for a in added if a.get("outcome") == "Total"), None)
    groups = _reval_groups(rev, results)
    rows = [r for g in groups for r in g["rows"]]
    excluded = [r for r in rows if r["excludes"] is True]
    n_flagged = sum(r["excludes"] is not None for r in rows)

    abstract = None
    if latest:
        parts = []
        if total:
            pairs = _count_phrase(total.get("pairs_added"), "pair")
            patients = _count_phrase(total.get("patients_added"), "patient")
            if pairs:
                parts.append(pairs + (f" ({fmt_num(total.get('pairs_old'))} to {fmt_num(total.get('pairs_new'))} "
                                      "pairs analysed)" if total.get("pairs_old") is not None else ""))
            if patients:
                parts.append(patients)
        if pc and pc.get("pairs_relabelled"):
            parts.append(f"{pc['pairs_relabelled']} pair(s) relabelled")
        if n_flagged:
            names = ", ".join(r["short"] for r in excluded[:5]) + (
                f" and {len(excluded) - 5} more" if len(excluded) > 5 else "")
            parts.append(f"the new 95% CI excludes the previous estimate for {len(excluded)} of {n_flagged} "
                         "headline numbers" + (f" ({names})" if excluded else ""))
        lead = f"Compared with the previous validation ({latest['date']})"
        if not comparable:
            lead += f", which is NOT comparable ({latest['why']})"
        abstract = lead + ": " + "; ".join(parts or ["no headline number to compare"]) + "."

    methods = [m for m in (rev.get("method"), rev.get("added_method"), (pc or {}).get("method")) if m]
    return {
        "previous": previous,
        "latest": latest,
        "comparable": comparable,
        "not_comparable": [p for p in previous if p.get("comparable") is False],
        "added": added,
        "pair_changes": pc,
        "groups": groups,
        "n_rows": len(rows),
        "n_flagged": n_flagged,
        "excluded": excluded,
        "abstract": abstract,
        "warnings": [str(w) for w in rev.get("warnings") or []],
        "methods": methods,
        "figure": REVALIDATION_FIGURE if len(previous) >= 2 else None,
        "new_created": prov.get("created"),
        "new_sha_short": _short_sha(prov.get("weights_sha256")),
    }


def limitations(results):
    """Limitations flagged from the numbers (STARD item 26).

    Returns
    -------
    list of dict
        ``{"kind", "text"}`` for each flag: small groups (fewer than
        :data:`SMALL_GROUP` pairs), wide 95% CIs (width above :data:`WIDE_CI`),
        class imbalance, the number of tests, the optimism of the global
        protocol, correlated pairs, heterogeneous intervals, non-estimable
        AUCs, exclusions, a reversed-order control above chance, synthetic data.
    """
    out = []
    flow = results.get("flow") or {}
    prov = results.get("provenance") or {}
    if prov.get("synthetic"):
        out.append({"kind": "Synthetic data", "text": "The data are synthetic (phantom study): no number in this "
                    "report describes patients."})
    by = flow.get("by_outcome") or {}
    small = [(o, by[o]) for o in OUTCOMES if o in by and by[o].get("pairs", 0) < SMALL_GROUP]
    if small:
        parts = ", ".join(f"{o}: {g['pairs']} pairs of {g.get('patients', '?')} patients" for o, g in small)
        out.append({"kind": "Small groups", "text": f"{len(small)} outcome group(s) have fewer than {SMALL_GROUP} "
                    f"pairs ({parts}); estimates involving them are imprecise and tests have little power."})
    blocks = _prediction_blocks(results)
    head = blocks[0] if blocks else None
    wide = []
    if head:
        for name, rec in head["block"].get("metrics", {}).items():
            if name.startswith("lr_"):
                continue
            w = _ci_width(rec)
            if w is not None and w > WIDE_CI:
                wide.append(f"{METRIC_NAMES.get(name, name)} {fmt_est(rec)} (width {w:.2f})")
        w = _ci_width(head["block"].get("auc"))
        if w is not None and w > WIDE_CI:
            wide.append(f"AUC {fmt_est(head['block']['auc'], est='auc')} (width {w:.2f})")
    for r in results.get("validation_auc") or []:
        w = _ci_width(r)
        if w is not None and w > WIDE_CI:
            wide.append(f"validation AUC of {r['label']} {fmt_est(r, est='auc')} (width {w:.2f})")
    if wide:
        out.append({"kind": "Wide confidence intervals", "text": f"{len(wide)} 95% CI(s) are wider than "
                    f"{WIDE_CI:.2f}: " + "; ".join(wide) + "."})
    if head:
        b = head["block"]
        c = b.get("confusion") or {}
        npos, nneg = c.get("tp", 0) + c.get("fn", 0), c.get("fp", 0) + c.get("tn", 0)
        if npos and nneg:
            ratio = max(npos, nneg) / min(npos, nneg)
            if ratio >= IMBALANCE_RATIO:
                major = WORSE if npos >= nneg else IMPROVED
                nir = max(npos, nneg) / (npos + nneg)
                acc = (b.get("metrics") or {}).get("accuracy", {}).get("estimate")
                out.append({"kind": "Class imbalance", "text": f"The prediction task has {npos} {WORSE} and {nneg} "
                            f"{IMPROVED} pairs (ratio {ratio:.1f}:1). Always predicting {major} would be "
                            f"{fmt_auc(nir)} accurate; the {head['name']} accuracy of {fmt_auc(acc)} must be "
                            "read against that rate, and sensitivity and specificity together."})
    g = _group_summary(results)
    if g["tests"] > 1:
        n_val = len(results.get("validation_auc") or [])
        out.append({"kind": "Multiple comparisons", "text": f"{g['tests']} Mann-Whitney U tests were run "
                    f"(labels x contrasts); at P < {ALPHA} about {g['expected_false']:.1f} would be significant "
                    f"by chance alone. {g['raw']} had unadjusted p < {ALPHA}, {g['holm']} after Holm and "
                    f"{g['bh']} after Benjamini-Hochberg adjustment"
                    + (f"; {n_val} validation AUCs were also estimated." if n_val else ".")})
    pred = results.get("prediction") or {}
    if pred.get("nested") and pred.get("global"):
        an = ((pred["nested"].get("metrics") or {}).get("accuracy") or {}).get("estimate")
        ag = ((pred["global"].get("metrics") or {}).get("accuracy") or {}).get("estimate")
        un = (pred["nested"].get("auc") or {}).get("auc")
        ug = (pred["global"].get("auc") or {}).get("auc")
        if _finite(an) and _finite(ag):
            text = (f"Selecting features once on all pairs, as the original study did (global protocol), "
                    f"gave an accuracy of {fmt_auc(ag)} against {fmt_auc(an)} with selection inside each fold "
                    f"(nested), an optimism of {ag - an:+.3f}")
            if _finite(un) and _finite(ug):
                text += f" (AUC {fmt_auc(ug)} vs {fmt_auc(un)}, {ug - un:+.3f})"
            text += ". Only the nested estimate is free of selection leakage " + cite("ambroise") + "."
            out.append({"kind": "Optimism of the global protocol", "text": text})
    rev = pred.get("reversed")
    if rev and _finite((rev.get("auc") or {}).get("ci_low")) and rev["auc"]["ci_low"] > 0.5:
        out.append({"kind": "Reversed-order control above chance", "text": f"Predicting from the second CXR "
                    f"gave AUC {fmt_est(rev['auc'], est='auc')}, above chance: the features may encode the "
                    "patient or the acquisition rather than a trajectory."})
    if head and _finite(head["block"].get("permutation_p")) and head["block"]["permutation_p"] >= ALPHA:
        out.append({"kind": "Prediction not distinguished from chance", "text": f"The permutation test of the "
                    f"{head['name']} protocol gave p = {fmt_p(head['block']['permutation_p'])} "
                    f"({head['block'].get('permutations', '?')} permutations)."})
    pa, na = flow.get("pairs_analysed"), flow.get("patients_analysed")
    if _finite(pa) and _finite(na) and pa > na:
        out.append({"kind": "Correlated pairs", "text": f"The {pa} pairs come from {na} patients: pairs of one "
                    "patient are not independent. Cross-validation leaves all pairs of a patient out together, "
                    "but the Mann-Whitney tests and the CIs treat pairs as independent, so their precision is "
                    "overstated."})
    iv = results.get("interval_days")
    if iv and _finite(iv.get("min")) and _finite(iv.get("max")) and iv["max"] > iv["min"]:
        out.append({"kind": "Non-uniform intervals", "text": f"The interval between the two CXRs ranged from "
                    f"{fmt_num(iv['min'], 0)} to {fmt_num(iv['max'], 0)} days (median {fmt_num(iv['median'], 1)}, "
                    f"IQR {fmt_num(iv['q1'], 1)}-{fmt_num(iv['q3'], 1)}); change over different intervals is "
                    "pooled."})
    vs = _validation_summary(results)
    if vs and vs["not_estimable"]:
        labs = ", ".join(f"{r['label']} ({r.get('n_pos', '?')} positive)" for r in vs["not_estimable"])
        out.append({"kind": "Labels not validated", "text": f"The validation AUC was not estimable for {labs}; "
                    "changes of these labels rest on an unvalidated output."})
    pim, pan = flow.get("pairs_in_manifest"), flow.get("pairs_analysed")
    if _finite(pim) and _finite(pan) and pim > pan:
        out.append({"kind": "Exclusions", "text": f"{pim - pan} of {pim} pairs ({100 * (pim - pan) / pim:.1f}%) "
                    "were excluded (see the flow diagram); if exclusion relates to the outcome, the estimates "
                    "are biased."})
    rv = revalidation_view(results)
    if rv and rv["not_comparable"]:
        texts = []
        if rv["comparable"] is False:
            texts.append(f"The most recent previous validation ({rv['latest']['date']}) is not comparable with this "
                         f"one: {rv['latest']['why']}. The changes in 'What moved since the last validation' mix a "
                         "change of the index test with the change of data and cannot be read as the effect of "
                         "the added pairs.")
        older = [p for p in rv["not_comparable"] if not p["latest"]]
        if older:
            texts.append(f"{len(older)} earlier validation(s) ("
                         + "; ".join(f"{p['date']}: {p['why']}" for p in older)
                         + ") are not comparable with this one" + (" (open markers in the trend figure)."
                                                                   if rv["figure"] else "."))
        out.append({"kind": "Previous validation not comparable", "text": " ".join(texts)})
    return out


def _study_status(study, fields):
    have = [f for f in fields if study.get(f)]
    miss = [f for f in fields if not study.get(f)]
    return have, miss


#: STARD 2015 items: (item, short title, section id, section name, what covreport fills or None, study fields).
STARD_ITEMS = (
    ("1", "Identification as a diagnostic accuracy study, with an accuracy measure", "title", "Title and abstract",
     "title names the design; abstract gives AUC, sensitivity, specificity", ()),
    ("2", "Structured abstract", "abstract", "Abstract", "design, methods and results with key numbers",
     ("conclusions",)),
    ("3", "Background and intended use of the index test", "introduction", "Introduction", None,
     ("background", "intended_use")),
    ("4", "Objectives and hypotheses", "introduction", "Introduction", None, ("objectives", "hypotheses")),
    ("5", "Prospective or retrospective data collection", "methods-design", "Methods: study design", None,
     ("data_collection",)),
    ("6", "Eligibility criteria", "methods-participants", "Methods: participants",
     "exclusions applied by covreport, with reasons", ("eligibility",)),
    ("7", "How participants were identified", "methods-participants", "Methods: participants", None,
     ("identification",)),
    ("8", "Setting, location and dates", "methods-participants", "Methods: participants", None,
     ("setting", "locations", "dates")),
    ("9", "Consecutive, random or convenience series", "methods-participants", "Methods: participants", None,
     ("series",)),
    ("10a", "Index test in detail", "methods-index", "Methods: index test",
     "model, weights SHA-256, training recipe, labels, preprocessing, software versions", ()),
    ("10b", "Reference standard in detail", "methods-reference", "Methods: reference standard",
     "outcome categories and their definitions", ("reference_standard",)),
    ("11", "Rationale for the reference standard", "methods-reference", "Methods: reference standard", None,
     ("rationale_reference_standard",)),
    ("12a", "Index-test positivity cut-offs or categories", "methods-index", "Methods: index test",
     "probabilities (no cut-off) and the prediction threshold, exploratory", ()),
    ("12b", "Reference-standard categories", "methods-reference", "Methods: reference standard",
     "Worse, Stable, Improved with definitions", ()),
    ("13a", "Information available to readers of the index test", "methods-index", "Methods: index test",
     "the model sees only the images", ("blinding_index",)),
    ("13b", "Information available to assessors of the reference standard", "methods-reference",
     "Methods: reference standard", None, ("blinding_reference",)),
    ("14", "Methods for estimating or comparing accuracy", "methods-analysis", "Methods: analysis",
     "every method by name with its reference", ()),
    ("15", "Handling of indeterminate results", "methods-analysis", "Methods: analysis",
     "exclusions by stage; uncertain labels", ()),
    ("16", "Handling of missing data", "methods-analysis", "Methods: analysis", "complete-case analysis", ()),
    ("17", "Analyses of variability", "methods-analysis", "Methods: analysis",
     "per label and contrast; nested vs global; reversed order", ()),
    ("18", "Intended sample size", "methods-analysis", "Methods: analysis", "achieved sample size and precision",
     ("intended_sample_size",)),
    ("19", "Flow of participants, with a diagram", "results-flow", "Results: participants",
     "flow diagram and exclusions table", ()),
    ("20", "Baseline characteristics", "results-characteristics", "Results: participants", "Table 1", ()),
    ("21a", "Distribution of severity in those with the target condition", "results-characteristics",
     "Results: participants", "pairs per outcome category", ("severity",)),
    ("21b", "Alternative diagnoses in those without the target condition", "results-characteristics",
     "Results: participants", None, ("alternative_diagnoses",)),
    ("22", "Interval and interventions between index test and reference standard", "results-interval",
     "Results: participants", "interval between the two CXRs", ("interventions",)),
    ("23", "Cross tabulation of index test by reference standard", "results-prediction", "Results: prediction",
     "confusion matrices, per-pair predictions", ()),
    ("24", "Accuracy estimates with precision", "results-accuracy", "Results: accuracy",
     "AUCs, sensitivity, specificity, PPV, NPV, LRs with 95% CIs", ()),
    ("25", "Adverse events", "results-adverse", "Results: adverse events", None, ("adverse_events",)),
    ("26", "Limitations", "discussion-limitations", "Discussion: limitations", "limitations computed from the numbers",
     ()),
    ("27", "Implications for practice", "discussion-implications", "Discussion: implications", None,
     ("implications",)),
    ("28", "Registration", "other", "Other information", None, ("registration",)),
    ("29", "Protocol", "other", "Other information", None, ("protocol",)),
    ("30", "Funding", "other", "Other information", None, ("funding",)),
)


def _available(item, results):
    """Whether the data behind an item covreport fills are present (and why not)."""
    if item == "20" and not results.get("table1"):
        return "no age or sex in the manifest"
    if item == "22" and not results.get("interval_days"):
        return "no CXR dates or offsets in the manifest"
    if item in ("23",) and not (results.get("prediction") or {}):
        return "no prediction results"
    if item == "24" and not ((results.get("prediction") or {}) or results.get("validation_auc")):
        return "no accuracy results"
    return None


def stard_checklist(results):
    """The STARD 2015 checklist, filled from the results and ``results["study"]``.

    Returns
    -------
    list of dict
        One row per item, in STARD order: ``item``, ``title``, ``section``
        (anchor id), ``section_name``, ``status`` (``"covreport"``,
        ``"study.toml"``, ``"covreport + study.toml"``, ``"partly"`` or
        ``"author"``), ``filled`` (what is reported), ``todo`` (the
        study.toml fields the author must still fill, or why data is missing).
    """
    study = results.get("study") or {}
    rows = []
    for item, title, sec, sec_name, auto, fields in STARD_ITEMS:
        have, miss = _study_status(study, fields)
        gap = _available(item, results) if auto else None
        if auto and gap:
            auto_ok = False
        else:
            auto_ok = bool(auto)
        if auto_ok and not fields:
            status = "covreport"
        elif auto_ok and not miss:
            status = "covreport + study.toml"
        elif not auto and fields and not miss:
            status = "study.toml"
        elif auto_ok or have:
            status = "partly"
        else:
            status = "author"
        filled = []
        if auto_ok:
            filled.append(auto)
        if have:
            filled.append("study.toml: " + ", ".join(have))
        todo = [f"study.toml: {f}" for f in miss]
        if gap:
            todo.append(gap)
        rows.append({"item": item, "title": title, "section": sec, "section_name": sec_name, "status": status,
                     "filled": "; ".join(filled), "todo": "; ".join(todo)})
    return rows


def ai_checklist(results, *, has_cams=False):
    """STARD-AI and CLAIM items covreport can fill, with their status (same shape as :func:`stard_checklist`)."""
    study = results.get("study") or {}
    prov = results.get("provenance") or {}
    inputs = prov.get("inputs") or {}
    model = prov.get("model") or {}
    rows = []

    def add(title, sec, sec_name, ok, filled, fields=(), gap=None):
        have, miss = _study_status(study, fields)
        if ok and not miss:
            status = "covreport" if not fields else "covreport + study.toml"
        elif not ok and fields and not miss:
            status = "study.toml"
        elif ok or have:
            status = "partly"
        else:
            status = "author"
        todo = [f"study.toml: {f}" for f in miss] + ([gap] if (gap and not ok) else [])
        rows.append({"item": "", "title": title, "section": sec, "section_name": sec_name, "status": status,
                     "filled": "; ".join(([filled] if ok else []) + (["study.toml: " + ", ".join(have)] if have
                                                                      else [])),
                     "todo": "; ".join(todo)})

    add("Data sources, with file checksums", "reproducibility", "Reproducibility", bool(inputs),
        "input files with SHA-256", ("data_collection",))
    add("Data selection, exclusions and partitions", "results-flow", "Results: participants",
        bool(results.get("flow")), "flow diagram; test pairs and patients"
        + ("; training and validation sizes" if model.get("training") else ""))
    add("Reference-standard annotation (who, how)", "methods-reference", "Methods: reference standard", False, "",
        ("reference_standard",))
    add("Acquisition devices and protocols", "methods-participants", "Methods: participants", False, "",
        ("acquisition",))
    add("Preprocessing", "methods-index", "Methods: index test", bool(prov.get("preprocessing")),
        "recorded preprocessing", gap="preprocessing not recorded (scores file supplied)")
    add("Model and weights (architecture, SHA-256)", "methods-index", "Methods: index test",
        bool(prov.get("weights_sha256")), "weights SHA-256", gap="weights not available (scores file supplied)")
    add("Model development (training recipe)", "methods-index", "Methods: index test", bool(model.get("training")),
        "training recipe stored with the weights", gap="no training recipe stored with the weights")
    add("Software versions", "reproducibility", "Reproducibility", bool(prov.get("packages")),
        "Python and package versions")
    add("Performance with 95% CIs", "results-accuracy", "Results: accuracy",
        bool(results.get("prediction") or results.get("validation_auc")), "metrics with CIs")
    add("Error analysis (per-case outputs, control analysis)", "appendix-pairs", "Appendix: per-pair predictions",
        bool(results.get("prediction")), "per-pair predictions; reversed-order control")
    add("Explainability (class activation maps)", "results-cams", "Results: activation maps", has_cams,
        "class activation maps", gap="no class activation maps computed")
    add("Code availability", "other", "Other information", True,
        f"covreport {results.get('covreport_version', '')}", ("code_availability",))
    add("Data availability", "other", "Other information", False, "", ("data_availability",))
    add("Stored auditable outputs", "reproducibility", "Reproducibility", True,
        "results.json, tables/*.csv, figures, command, seed")
    return rows


def _recorded_methods(results):
    """Every distinct ``method`` string stored in the results, with where it was used."""
    seen = {}

    def add(where, m):
        if m:
            seen.setdefault(str(m), [])
            if where not in seen[str(m)]:
                seen[str(m)].append(where)

    for r in results.get("validation_auc") or []:
        add("validation AUC", r.get("method"))
    for r in results.get("group_differences") or []:
        for k in ("mw_method", "d_method", "method"):
            add("group differences", r.get(k))
    for r in results.get("table1") or []:
        for k in ("p_age_method", "p_age_welch_method", "p_sex_method"):
            add("Table 1", r.get(k))
    iv = results.get("interval_days") or {}
    add("interval between CXRs", iv.get("method"))
    for b in _prediction_blocks(results):
        add(f"prediction ({b['name']})", b["block"].get("method"))
        add(f"prediction ({b['name']})", (b["block"].get("auc") or {}).get("method"))
        for rec in (b["block"].get("metrics") or {}).values():
            add(f"prediction ({b['name']})", rec.get("method"))
    rev = results.get("revalidation") or {}
    for m in (rev.get("method"), rev.get("added_method"), (rev.get("pair_changes") or {}).get("method")):
        add("comparison with the previous validation", m)
    return [{"method": m, "where": ", ".join(w)} for m, w in seen.items()]


def _footnotes(rows, keys):
    """Letters for the distinct method strings of ``keys`` in ``rows``: ({method: letter}, [(letter, method)])."""
    letters = {}
    for r in rows:
        for k in keys:
            m = r.get(k)
            if m and m not in letters:
                letters[m] = "abcdefghijklmnopqrstuvwxyz"[len(letters) % 26]
    return letters, [(v, k) for k, v in letters.items()]


def _kv(mapping):
    """A flat list of (key, text) from a nested mapping, for provenance tables."""
    out = []
    for k, v in (mapping or {}).items():
        if isinstance(v, dict):
            out += [(f"{k}.{k2}", v2) for k2, v2 in _kv(v)]
        elif isinstance(v, (list, tuple)):
            out.append((str(k), ", ".join(str(x) for x in v)))
        else:
            out.append((str(k), "not recorded" if v is None else str(v)))
    return out


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"results hold a {type(obj).__name__}, which results.json cannot store")


def plain_results(results):
    """The results as results.json would hold them: plain Python types (numpy values converted)."""
    try:
        return json.loads(json.dumps(results, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ReportError(f"the results cannot be reported: {exc}") from exc


def build_context(results, *, figures=None, cams_note=None, has_cams=False):
    """Everything the templates see, derived from the results mapping.

    Keys (documented for institutions writing their own templates): ``r`` (the
    results as given), ``study`` (validated study fields), ``title``,
    ``synthetic``, ``figures`` (``{stem: {"uri"}}``), ``blocks`` (prediction
    protocols, headline first), ``limitations``, ``checklist``, ``ai_items``,
    ``methods`` (recorded method strings), ``references``, ``t1_notes``,
    ``t2_notes``, ``validation`` (summary), ``groups`` (summary),
    ``threshold``, ``provenance`` tables, ``cams_note``, ``outcome_defs``,
    ``reval`` (:func:`revalidation_view`: what moved since the last
    validation, or None without ``--previous``).
    """
    results = plain_results(results)
    study = validate_study(results.get("study") or {}, source="results['study']")
    results["study"] = study
    prov = results.get("provenance") or {}
    blocks = _prediction_blocks(results)
    t1 = results.get("table1") or []
    t1_letters, t1_notes = _footnotes(t1, ("p_age_method", "p_age_welch_method", "p_sex_method"))
    metric_recs = [dict((b["block"].get("metrics") or {}), auc=b["block"].get("auc") or {}) for b in blocks]
    metric_rows = [{"method": rec.get("method")} for recs in metric_recs for rec in recs.values()]
    metric_letters, metric_notes = _footnotes(metric_rows, ("method",))
    gd = results.get("group_differences") or []
    contrasts = []
    for r in gd:
        if r.get("contrast") not in contrasts:
            contrasts.append(r.get("contrast"))
    inputs = prov.get("inputs") or {}
    reviewer_mode = "scores" in inputs or not prov.get("weights_sha256")
    model = prov.get("model") or {}
    training = model.get("training") if isinstance(model.get("training"), dict) else None
    architecture = (training or {}).get("architecture") or "DenseNet121"
    title = study.get("title") or ("Tracking and predicting COVID-19 radiological trajectory on chest X-rays "
                                   "with a CheXpert-trained DenseNet121")
    return {
        "r": results,
        "study": study,
        "study_fields": STUDY_FIELDS,
        "title": title,
        "synthetic": bool(prov.get("synthetic")),
        "labels": results.get("labels") or [],
        "flow": results.get("flow") or {},
        "figures": figures or {},
        "blocks": blocks,
        "headline": blocks[0] if blocks else None,
        "threshold": _threshold(blocks[0]["block"]) if blocks else None,
        "limitations": limitations(results),
        "checklist": stard_checklist(results),
        "ai_items": ai_checklist(results, has_cams=has_cams),
        "methods": _recorded_methods(results),
        "references": [{"n": i + 1, "key": k, "text": v} for i, (k, v) in enumerate(REFERENCES.items())],
        "t1_letters": t1_letters,
        "t1_notes": t1_notes,
        "t1_counted_by": sorted({str(row.get("counted_by")) for row in t1 if row.get("counted_by")}),
        "t1_reference": any("chexpert" in str(row.get("group", "")).lower() or row.get("counted_by") == "CSV row"
                            for row in t1),
        "metric_letters": metric_letters,
        "metric_notes": metric_notes,
        "contrasts": contrasts,
        "validation": _validation_summary(results),
        "groups": _group_summary(results),
        "provenance": prov,
        "inputs": inputs,
        "reviewer_mode": reviewer_mode,
        "architecture": architecture,
        "training": _kv(training) if training else ([("training", str(model["training"]))]
                                                     if model.get("training") else []),
        "preprocessing": _kv(prov.get("preprocessing")) if isinstance(prov.get("preprocessing"), dict) else [],
        "packages": sorted((prov.get("packages") or {}).items()),
        "cams_note": cams_note,
        "reval": revalidation_view(results),
        "outcome_defs": OUTCOME_DEFINITIONS,
        "outcomes": OUTCOMES,
        "WORSE": WORSE, "STABLE": STABLE, "IMPROVED": IMPROVED,
        "thresholds": {"small": SMALL_GROUP, "wide": WIDE_CI, "imbalance": IMBALANCE_RATIO, "alpha": ALPHA},
    }


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


def render_html(results, *, templates=None, figures=None, cams_note=None, has_cams=False):
    """Render ``report.html.j2`` to a string (see :func:`build_context` for what templates see).

    Raises
    ------
    ReportError
        If a template is missing or fails, or the page would refer to an
        external resource.
    """
    env = make_environment(templates)
    ctx = build_context(results, figures=figures, cams_note=cams_note, has_cams=has_cams)
    try:
        html = env.get_template("report.html.j2").render(**ctx)
    except jinja2.TemplateNotFound as exc:
        raise ReportError(f"template {exc.name!r} not found in {templates or templates_dir()} "
                          f"or the built-in templates") from exc
    except jinja2.TemplateError as exc:
        where = f"{getattr(exc, 'filename', None) or getattr(exc, 'name', None) or 'template'}:{getattr(exc, 'lineno', '?')}"
        raise ReportError(f"template error in {where}: {exc.message}") from exc
    bad = external_references(html)
    if bad:
        raise ReportError(f"the report would load {len(bad)} external resource(s), e.g. {bad[0]!r}; "
                          "templates must inline everything (data: URIs) so that no request leaves the page")
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

    The file is written to a temporary name beside ``path`` and moved into place.
    """
    import weasyprint

    path = Path(path)
    fetcher, refused = _url_fetcher()
    # WeasyPrint logs every CSS property it ignores at WARNING; keep those out of the user's console.
    wlog = logging.getLogger("weasyprint")
    level = wlog.level
    wlog.setLevel(logging.ERROR)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pdf", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            weasyprint.HTML(string=html, base_url=None, url_fetcher=fetcher).write_pdf(fh)
        if refused:
            raise ReportError(f"the report refers to {len(refused)} external resource(s), e.g. {refused[0]!r}; "
                              "templates must inline everything (data: URIs)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        wlog.setLevel(level)
    return path


def _write_text(path, text):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cams_note(results, cams):
    if cams:
        return None
    inputs = (results.get("provenance") or {}).get("inputs") or {}
    if "scores" in inputs:
        return ("No class activation maps were computed: this run read its index-test outputs from a scores file "
                "(reviewer mode), so the model itself was not available to covreport. Rerun with --weights to "
                "add them.")
    return "No class activation maps were computed for this run (none were passed to the report)."


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
                       has_cams=bool(cams))
    _write_text(out_dir / "report.html", html)
    written["report.html"] = out_dir / "report.html"
    if pdf:
        written["report.pdf"] = write_pdf(html, out_dir / "report.pdf")
    return written


__all__ = ["render_report", "render_html", "write_pdf", "make_environment", "templates_dir", "build_context",
           "stard_checklist", "ai_checklist", "limitations", "revalidation_view", "external_references",
           "fmt_p", "fmt_auc",
           "fmt_num", "fmt_ci", "fmt_est", "cite", "REFERENCES"]
