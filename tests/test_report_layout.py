"""Layout of the report as readers see it: every table within the PDF page and the HTML column.

Issue 12: Table 4 ran off the PDF page (a long unbroken note in the
reversed-order column) and overflowed the HTML at 1280 px. These tests render
the fixture with the new results.json keys and the long notes and
identifiers that broke the layout (tests/report_fixtures.py), then

- read the position of every word of the PDF (poppler's ``pdftotext
  -bbox-layout``) and check that no word lies outside the page's content box
  (A4 with the margins of report.css), that the running header is one line,
  and that the captions of Tables 1-4 are on the page where their table starts;
- open the HTML in headless Chromium at 800 and 1280 CSS pixels and check
  that no element is wider than its container and the page never scrolls
  sideways.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from _chromium import Chromium, chromium_binary
from covreport.report import render_report
from report_fixtures import stressed, with_contract_keys

MM = 72 / 25.4
#: @page margins of templates/report.css (top, right, bottom, left), in mm.
MARGINS = (20, 15, 18, 15)
TOLERANCE = 1.0  # points


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("layout")
    render_report(stressed(with_contract_keys()), out)
    return out


def _pdf_words(pdf):
    """[(page number, page width, page height, [(xmin, ymin, xmax, ymax, text)])] from pdftotext -bbox-layout."""
    xml = subprocess.run(["pdftotext", "-bbox-layout", str(pdf), "-"], check=True, capture_output=True,
                         timeout=120).stdout.decode("utf-8")
    xml = re.sub(r"<!DOCTYPE[^>]*>", "", xml)
    root = ET.fromstring(xml)
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    pages = []
    for i, page in enumerate(root.iter("{http://www.w3.org/1999/xhtml}page"), 1):
        words = [(float(w.get("xMin")), float(w.get("yMin")), float(w.get("xMax")), float(w.get("yMax")), w.text or "")
                 for w in page.iterfind(".//h:word", ns)]
        pages.append((i, float(page.get("width")), float(page.get("height")), words))
    return pages


needs_poppler = pytest.mark.skipif(shutil.which("pdftotext") is None,
                                   reason="pdftotext (poppler-utils) is not installed")


@needs_poppler
def test_no_pdf_text_outside_the_content_box(report):
    top, right, bottom, left = (m * MM for m in MARGINS)
    outside = []
    for n, width, height, words in _pdf_words(report / "report.pdf"):
        for x0, y0, x1, y1, text in words:
            if x0 < left - TOLERANCE or x1 > width - right + TOLERANCE:
                outside.append(f"page {n}: {text!r} at x {x0:.0f}-{x1:.0f} (content box {left:.0f}-{width - right:.0f})")
            elif y1 > height + TOLERANCE or y0 < -TOLERANCE:
                outside.append(f"page {n}: {text!r} off the page vertically")
    assert outside == [], "\n".join(outside[:20])


@needs_poppler
def test_running_header_is_one_line(report):
    top = MARGINS[0] * MM
    for n, _w, _h, words in _pdf_words(report / "report.pdf")[1:]:
        lines = {round(y0) for x0, y0, x1, y1, t in words if y1 < top - TOLERANCE}
        assert len(lines) == 1, f"page {n}: the running header takes {len(lines)} lines"


@needs_poppler
@pytest.mark.parametrize("caption, first_cell", [
    ("Table 1. Demographics", "All pairs"), ("Table 2. Change in probability", "Cardiomegaly"),
    ("Table 3. Cross tabulation", "Worse (positive)"), ("Table 4. Accuracy of the prediction", "Accuracy"),
])
def test_caption_on_the_page_where_its_table_starts(report, caption, first_cell):
    pages = _pdf_words(report / "report.pdf")
    where = None
    for n, _w, _h, words in pages:
        text = " ".join(w[4] for w in words)
        if caption in text:
            where = (n, text)
            break
    assert where, f"{caption} not found"
    n, text = where
    after = text[text.index(caption):]
    assert first_cell in after, f"{caption} is on page {n} but its table starts on a later page"


LAYOUT_CHECK = r"""
(() => {
  const bad = [];
  const root = document.documentElement;
  if (root.scrollWidth > root.clientWidth + 1)
    bad.push('page scrolls sideways: ' + root.scrollWidth + ' > ' + root.clientWidth);
  const name = e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className && typeof e.className === 'string' ? '.' + e.className.split(' ')[0] : '');
  for (const e of document.body.querySelectorAll('*')) {
    const p = e.parentElement;
    if (!p || getComputedStyle(e).display === 'none') continue;
    const r = e.getBoundingClientRect(), q = p.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    if (r.right > q.right + 1 || r.left < q.left - 1)
      bad.push(name(e) + ' (' + Math.round(r.left) + '-' + Math.round(r.right) + ') outside ' + name(p) +
               ' (' + Math.round(q.left) + '-' + Math.round(q.right) + '): ' + (e.textContent || '').slice(0, 60));
  }
  return bad;
})()
"""


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (Debian package `chromium`)")
def test_no_html_element_wider_than_its_container(report, tmp_path):
    browser = Chromium(chromium_binary(), tmp_path / "profile")
    found = {}
    try:
        for width in (800, 1280):
            sid = browser.open((report / "report.html").resolve().as_uri(), width=width)
            found[width] = browser.evaluate(sid, LAYOUT_CHECK)
    finally:
        browser.close()
    assert found == {800: [], 1280: []}, "\n".join(f"{w} px: {b}" for w, bad in found.items() for b in bad[:15])
