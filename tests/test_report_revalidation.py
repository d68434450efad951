"""The report's "What moved since the last validation" section (covreport run ... --previous).

The new results are tests/fixtures/results.json; each previous result is a
modified copy of it (fewer patients, shifted validation AUCs and nested
accuracy, other weights or preprocessing), and the ``revalidation`` record is
made with covreport.revalidation.compare, as the pipeline does. The expected
strings are formatted here with plain f-strings from the numbers of the two
dicts, and the counts are counted here from their ``pairs`` lists (the
reference is that arithmetic), independently of covreport's formatters.
"""

from __future__ import annotations

import collections
import copy
import html as htmlmod
import json
import re
from pathlib import Path

import pytest

from covreport.report import external_references, render_html, render_report
from covreport.revalidation import compare

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"
EN = "\u2013"
ELL = "\u2026"
INJECT = "<script>alert(1)</script>"
OTHER_SHA = "e" * 64
#: Patients whose pairs the previous validation did not have yet.
NEW_PATIENTS = ("P036", "P037", "P038", "P039", "P040")
AUC_SHIFT = 0.15          # previous validation AUCs were lower by this
OLD_ACCURACY = (0.70, 0.55, 0.82)


@pytest.fixture(scope="module")
def results():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _previous(results, created, *, sha=None, preprocessing=None):
    """An earlier results.json: without the pairs of NEW_PATIENTS, AUCs and nested accuracy shifted."""
    old = copy.deepcopy(results)
    old["provenance"]["created"] = created
    if sha is not None:
        old["provenance"]["weights_sha256"] = sha
    if preprocessing is not None:
        old["provenance"]["preprocessing"] = preprocessing
    old["pairs"] = [p for p in old["pairs"] if p["patient_id"] not in NEW_PATIENTS]
    flow = old["flow"]
    flow["by_outcome"] = {o: {"pairs": sum(p["outcome"] == o for p in old["pairs"]),
                              "patients": len({p["patient_id"] for p in old["pairs"] if p["outcome"] == o})}
                          for o in ("Worse", "Stable", "Improved")}
    flow["pairs_analysed"] = len(old["pairs"])
    flow["patients_analysed"] = len({p["patient_id"] for p in old["pairs"]})
    for v in old["validation_auc"]:
        if v["auc"] is not None:
            v["auc"] -= AUC_SHIFT
            v["ci_low"] -= AUC_SHIFT
            v["ci_high"] = min(1.0, v["ci_high"] - AUC_SHIFT)
    acc = old["prediction"]["nested"]["metrics"]["accuracy"]
    acc["estimate"], acc["ci_low"], acc["ci_high"] = OLD_ACCURACY
    return old


def _with_revalidation(results, previous):
    new = copy.deepcopy(results)
    new["revalidation"] = compare(results, previous)
    return new


def _text(html):
    body = re.sub(r"<style.*?</style>", " ", html, flags=re.S)
    body = re.sub(r"<[^>]+>", " ", body)
    return re.sub(r"\s+", " ", htmlmod.unescape(body))


def _section(html):
    i, j = html.index('id="results-revalidation"'), html.index('id="discussion"')
    return _text(html[i:j])


def _abstract(html):
    return _text(html[html.index('id="abstract"'):html.index('id="introduction"')])


def _est(e, lo, hi, nd=3):
    return f"{e:.{nd}f} ({lo:.{nd}f}{EN}{hi:.{nd}f})"


def _expected(results, old):
    """Rows and counts the section must show, from the two dicts."""
    new_v = {v["label"]: v for v in results["validation_auc"]}
    old_v = {v["label"]: v for v in old["validation_auc"]}
    acc = results["prediction"]["nested"]["metrics"]["accuracy"]
    rows = {}
    for label in ("Edema", "Lung Lesion"):
        n, o = new_v[label], old_v[label]
        # Edema: old 0.781 < new CI low 0.894 -> excluded; Lung Lesion: old 0.469 inside 0.174-1.000 -> not.
        flag = "yes" if not (n["ci_low"] <= o["auc"] <= n["ci_high"]) else "no"
        rows[label] = (f"{label} {_est(o['auc'], o['ci_low'], o['ci_high'])} "
                       f"{_est(n['auc'], n['ci_low'], n['ci_high'])} {n['auc'] - o['auc']:+.3f} {flag}")
    assert rows["Edema"].endswith("yes") and rows["Lung Lesion"].endswith("no")
    rows["nested accuracy"] = (f"Accuracy {_est(*OLD_ACCURACY)} {_est(acc['estimate'], acc['ci_low'], acc['ci_high'])} "
                               f"{acc['estimate'] - OLD_ACCURACY[0]:+.3f} yes")
    count = collections.Counter
    np_, op_ = count(p["outcome"] for p in results["pairs"]), count(p["outcome"] for p in old["pairs"])
    added = {}
    for o in ("Worse", "Stable", "Improved"):
        npat = len({p["patient_id"] for p in results["pairs"] if p["outcome"] == o})
        opat = len({p["patient_id"] for p in old["pairs"] if p["outcome"] == o})
        added[o] = (f"{o} {op_[o]} {np_[o]} {np_[o] - op_[o]:+d} {opat} {npat} {npat - opat:+d} "
                    f"{np_[o] - op_[o]} 0")
    n_new, n_old = len(results["pairs"]), len(old["pairs"])
    pat_new = len({p["patient_id"] for p in results["pairs"]})
    pat_old = len({p["patient_id"] for p in old["pairs"]})
    added["Total"] = (f"Total {n_old} {n_new} {n_new - n_old:+d} {pat_old} {pat_new} {pat_new - pat_old:+d} "
                      f"{n_new - n_old} 0")
    return rows, added, (n_old, n_new, pat_new - pat_old)


# --- without --previous --------------------------------------------------------------


def test_no_section_without_previous(results):
    html = render_html(results)
    assert 'id="results-revalidation"' not in html
    assert "Compared with the previous validation" not in _text(html)


# --- one comparable previous validation (HTML only) ----------------------------------


def test_comparable_previous_validation(results):
    old = _previous(results, "2024-03-01T09:00:00+00:00")
    new = _with_revalidation(results, [old])
    html = render_html(new)
    pos = [html.find(f'id="{i}"') for i in ("results-prediction", "results-revalidation", "discussion")]
    assert 0 < pos[0] < pos[1] < pos[2]
    sec = _section(html)
    rows, added, (n_old, n_new, pat_added) = _expected(results, old)
    # Which validation was compared: date, shortened SHA-256, comparable.
    sha = results["provenance"]["weights_sha256"]
    assert f"previous 1 (most recent) 2024-03-01T09:00:00+00:00 {sha[:12]}{ELL} comparable" in sec
    assert "NOT comparable" not in sec and 'id="revalidation-not-comparable"' not in html
    # Pairs and patients added per outcome group, and the total.
    for outcome, row in added.items():
        assert row in sec, (outcome, row)
    # Headline numbers: previous [CI], new [CI], change, flag.
    for what, row in rows.items():
        assert row in sec, (what, row)
    rev = new["revalidation"]
    k = sum(h["new_ci_excludes_old"] is True for h in rev["headline"])
    n = sum(h["new_ci_excludes_old"] is not None for h in rev["headline"])
    assert f"excludes the previous estimate for {k} of {n} headline numbers" in sec
    # Readable order: headline protocol first, then validation AUCs, then Worse vs Improved per label.
    order = [sec.index(s) for s in ("nested protocol [headline]", "global protocol", "reversed-order control",
                                    "Validation AUC of each label", "Worse vs Improved: change of each label")]
    assert order == sorted(order)
    assert sec.index("Lung Opacity: Cohen's d") < sec.index("Lung Opacity: p") < sec.index("Edema: Cohen's d")
    # The abstract says it briefly.
    ab = _abstract(html)
    assert (f"Compared with the previous validation (2024-03-01): {n_new - n_old} pairs added ({n_old} to {n_new} "
            f"pairs analysed); {pat_added} patients added;") in ab
    assert f"for {k} of {n} headline numbers (" in ab and "Edema validation AUC" in ab
    text = _text(html)
    assert "Previous validation not comparable" not in text
    assert "descriptive flag, not a test of change" in text  # recorded methods / table notes
    assert "Headline estimates with their 95% CIs across" not in sec  # one previous result: no trend figure


# --- not comparable ------------------------------------------------------------------


@pytest.mark.parametrize("change, why", [
    ({"sha": OTHER_SHA}, f"different weights (SHA-256 {OTHER_SHA[:12]}{ELL} then, 9b2e7d7d7d7d{ELL} now)"),
    ({"preprocessing": {"size": 224, "channels": 3}}, "different preprocessing"),
])
def test_not_comparable_previous_is_flagged(results, change, why):
    old = _previous(results, "2024-03-01T09:00:00+00:00", **change)
    html = render_html(_with_revalidation(results, [old]))
    sec = _section(html)
    assert 'id="revalidation-not-comparable"' in html
    assert f"NOT COMPARABLE: the previous validation of 2024-03-01 was computed with {why}." in sec
    assert f"NOT comparable {why}" in sec
    assert "These comparisons are not comparable" in sec
    # every headline row carries the short note, not the long reason
    assert sec.count("not comparable") >= 40
    assert f"Compared with the previous validation (2024-03-01), which is NOT comparable ({why}):" in _abstract(html)
    lim = _text(html[html.index('id="discussion-limitations"'):html.index('id="discussion-implications"')])
    assert (f"Previous validation not comparable. The most recent previous validation (2024-03-01) is not "
            f"comparable with this one: {why}.") in lim


def test_text_from_previous_results_is_escaped(results):
    old = _previous(results, "2025-01-01T00:00:00+00:00")  # later than the new result: out of time order
    new = _with_revalidation(results, [old])
    new["revalidation"]["previous"][0]["path"] = f"{INJECT}/results.json"
    new["revalidation"]["warnings"].append(INJECT)
    html = render_html(new)
    assert "<script" not in html.lower()
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    sec = _section(html)
    assert "Warnings. the results are not in time order" in sec
    assert f"{INJECT}/results.json" in sec


# --- two previous validations: trend figure, files and PDF ----------------------------


@pytest.fixture(scope="module")
def two_previous(results, tmp_path_factory):
    older = _previous(results, "2024-01-15T08:00:00+00:00", sha=OTHER_SHA)
    old = _previous(results, "2024-03-01T09:00:00+00:00")
    out = tmp_path_factory.mktemp("revalidation")
    written = render_report(_with_revalidation(results, [older, old]), out)
    return out, written, old


def test_trend_figure_with_two_previous(two_previous):
    out, written, _old = two_previous
    for ext in ("png", "svg"):
        assert f"figures/revalidation_trend.{ext}" in written
        assert (out / "figures" / f"revalidation_trend.{ext}").stat().st_size > 1000
    html = (out / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", html)
    # flow diagram, ROC curves, box plots (tests/test_report.py: 3) + the trend figure
    assert len(imgs) == 4 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert 'id="fig-revalidation_trend"' in html
    assert html.index('id="fig-revalidation_trend"') > html.index('id="results-revalidation"')
    assert external_references(html) == []
    sec = _section(html)
    # figures are numbered consecutively: flow diagram, ROC curves, box plots, then the trend (no CAMs here)
    assert "Figure 4. Headline estimates with their 95% CIs across successive validations" in sec
    assert f"previous 1 2024-01-15T08:00:00+00:00 {OTHER_SHA[:12]}{ELL} NOT comparable different weights" in sec
    assert "Not comparable: 1 earlier validation (2024-01-15: different weights" in sec
    assert 'id="revalidation-not-comparable"' not in html  # the most recent previous one is comparable


def test_key_numbers_and_flags_in_pdf(two_previous, results):
    from pypdf import PdfReader

    out, _written, old = two_previous
    pdf = " ".join(re.sub(r"\s+", " ", p.extract_text() or "") for p in PdfReader(str(out / "report.pdf")).pages)
    _rows, _added, (n_old, n_new, _pat) = _expected(results, old)
    assert "What moved since the last validation" in pdf
    assert f"Compared with the previous validation (2024-03-01): {n_new - n_old} pairs added" in pdf
    assert "NOT comparable" in pdf and OTHER_SHA[:12] in pdf
    assert results["provenance"]["weights_sha256"][:12] in pdf
    new_v = {v["label"]: v for v in results["validation_auc"]}["Edema"]
    old_v = {v["label"]: v for v in old["validation_auc"]}["Edema"]
    acc = results["prediction"]["nested"]["metrics"]["accuracy"]
    for s in (_est(old_v["auc"], old_v["ci_low"], old_v["ci_high"]),
              _est(new_v["auc"], new_v["ci_low"], new_v["ci_high"]),
              f"{new_v['auc'] - old_v['auc']:+.3f}", _est(*OLD_ACCURACY),
              f"{acc['estimate'] - OLD_ACCURACY[0]:+.3f}"):
        assert s in pdf, s
    assert "Figure 4." in pdf
    assert "Previous validation not comparable" in pdf
