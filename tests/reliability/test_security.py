"""Reliability: hostile inputs through the whole pipeline leave nothing dangerous in the outputs.

One study is run end to end (``covreport score``, ``covreport validate``,
``covreport run --weights`` with the PDF) with:

- DICOM images whose patient and institution identifiers hold a unique
  marker: the marker must appear in no output file, no cache, no message;
- markup and script in manifest cells (patient_id, pair_id, notes) and in
  study.toml fields: the HTML must hold no active element and show the text
  escaped; the PDF must hold no script or launch action;
- spreadsheet formulas in manifest cells: every CSV covreport writes must
  neutralise them (OWASP CSV injection: a leading apostrophe), while
  results.json keeps the values exactly.

All of it runs with the network blocked (conftest), and the report must
reference nothing outside itself.
"""

import csv
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.scores_file import read_scores
from reliability_helpers import LABELS, make_study, write_dicom, write_png

MARKER = "ZQXSECRET"
BIRTH = "19010203"
SCRIPT_NOTE = '<script>alert("xss")</script>'
FORMULA_NOTE = '=HYPERLINK("http://evil.example/","click")'
IMG_NOTE = "<img src=x onerror=alert(1)>"
PATIENTS = ["<b>P0</b>", "=1+2", "@SUM(A1)", "P3", "-P4", "P5"]
TITLE = "<script>alert('title')</script> Study"
AUTHOR = "<img src=x onerror=alert(2)>"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _writer(path, rng):
    if path.suffix == ".dcm":
        write_dicom(path, marker=MARKER, array=rng.integers(0, 4096, (48, 40)).astype(np.uint16))
    else:
        write_png(path, rng)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("hostile")
    manifest = make_study(
        root / "study", n_patients=6, image_writer=_writer,
        image_name=lambda p, i: f"images/P{p:03d}_{i}.{'dcm' if p < 2 else 'png'}",
        notes=lambda k: [SCRIPT_NOTE, FORMULA_NOTE, IMG_NOTE][k % 3],
        patient_id=lambda p: PATIENTS[p],
        pair_id=lambda k: f"=pair{k}" if k % 2 else f"pair{k}",
    )
    study = root / "study.toml"
    study.write_text(f'title = "{TITLE}"\nauthors = ["{AUTHOR}"]\n'
                     f'limitations = """{SCRIPT_NOTE} and {FORMULA_NOTE}"""\n', encoding="utf-8")
    cache = root / "cache.sqlite"
    runner = CliRunner()
    outputs = {}
    res = runner.invoke(main, ["score", str(manifest), "--weights", str(tiny_weights), "--cache", str(cache),
                               "--out", str(root / "scores.csv"), "--no-progress", "--workers", "0"])
    assert res.exit_code == 0, res.output
    outputs["score"] = res.output
    res = runner.invoke(main, ["validate", str(manifest), "--json"])
    assert res.exit_code == 0, res.output
    outputs["validate"] = res.output
    res = runner.invoke(main, ["run", str(manifest), "--weights", str(tiny_weights), "--cache", str(cache),
                               "--study", str(study), "--permutations", "0", "--bootstrap", "0", "--out", str(root / "out")])
    assert res.exit_code == 0, res.output
    outputs["run"] = res.output
    return {"root": root, "manifest": manifest, "out": root / "out", "cache": cache, "outputs": outputs}


def _written_files(h):
    root = h["root"]
    files = [p for p in h["out"].rglob("*") if p.is_file()]
    files += [root / "scores.csv", root / "scores.csv.json"]
    files += [p for p in root.glob("cache.sqlite*") if p.is_file()]
    return files


def _pdf_text(path):
    from pypdf import PdfReader

    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def test_dicom_identifiers_never_reach_an_output(hostile):
    dicoms = sorted((hostile["manifest"].parent / "images").glob("*.dcm"))
    assert len(dicoms) == 6 and all(MARKER.encode() in p.read_bytes() for p in dicoms)  # inputs hold it
    files = _written_files(hostile)
    assert {"results.json", "report.html", "report.pdf"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert MARKER.encode() not in data, path
        assert MARKER.encode("utf-16-le") not in data, path
        assert BIRTH.encode() not in data and b"1901-02-03" not in data, path
    text = _pdf_text(hostile["out"] / "report.pdf")
    assert MARKER not in text and BIRTH not in text
    for name, printed in hostile["outputs"].items():
        assert MARKER not in printed, name


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v or "") for k, v in attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_markup_in_manifest_and_study_is_inert_in_html(hostile):
    html = (hostile["out"] / "report.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(html)
    assert not {"script", "iframe", "object", "embed", "frame", "base", "form", "link"} & set(parser.tags)
    assert not [a for a in parser.attrs if a[1].startswith("on")], "event handler attribute in the report"
    for tag, key, value in parser.attrs:
        if key in ("src", "href", "data", "action", "xlink:href"):
            assert not value.lower().startswith(("javascript:", "http:", "https:", "//", "file:")), (tag, key, value)
            if tag == "img":
                assert value.startswith("data:image/"), value  # figures are embedded; nothing is fetched
    text = "".join(parser.text)
    for hostile_text in (TITLE, AUTHOR, PATIENTS[0]):
        assert hostile_text in text, f"{hostile_text!r} not shown as text"
    assert "&lt;script&gt;alert(&#39;title&#39;)&lt;/script&gt;" in html or \
        "&lt;script&gt;alert('title')&lt;/script&gt;" in html


def test_pdf_holds_no_active_content(hostile):
    from pypdf import PdfReader

    pdf = hostile["out"] / "report.pdf"
    raw = pdf.read_bytes()
    for token in (b"/JavaScript", b"/JS ", b"/JS(", b"/Launch", b"/EmbeddedFile", b"/RichMedia", b"/XFA"):
        assert token not in raw, token
    reader = PdfReader(str(pdf))
    for page in reader.pages:
        for annot in page.get("/Annots") or []:
            action = annot.get_object().get("/A") or {}
            uri = str(action.get("/URI", ""))
            assert "evil.example" not in uri and not uri.lower().startswith("javascript:"), uri
    text = _pdf_text(pdf)
    assert "<script>alert('title')</script>" in text.replace("\n", "")  # shown as text


def _csv_cells(path):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.reader(fh):
            yield from row


def test_csv_outputs_neutralise_formulas(hostile):
    csvs = sorted(hostile["out"].glob("tables/*.csv")) + [hostile["root"] / "scores.csv"]
    assert len(csvs) >= 5
    seen = []
    for path in csvs:
        for cell in _csv_cells(path):
            if cell.startswith(_FORMULA_START):
                assert _NUMBER.fullmatch(cell), f"{path.name}: formula cell {cell!r} not neutralised"
            if cell.startswith("'"):
                seen.append(cell)
    assert "'=pair1" in seen and "'=1+2" in seen and "'@SUM(A1)" in seen and "'-P4" in seen
    pairs = list(csv.DictReader(open(hostile["out"] / "tables" / "pairs.csv", encoding="utf-8")))
    assert {"pair0", "'=pair1"} <= {r["pair_id"] for r in pairs}
    # results.json is not a spreadsheet: it keeps the values exactly.
    results = json.loads((hostile["out"] / "results.json").read_text(encoding="utf-8"))
    assert {"pair0", "=pair1"} <= {p["pair_id"] for p in results["pairs"]}
    assert not any(p["pair_id"].startswith("'") for p in results["pairs"])
    assert {p["patient_id"] for p in results["pairs"]} == set(PATIENTS)


def test_scores_csv_round_trips_formula_like_image_names(tmp_path, tiny_loaded):
    from covreport.scoring import score_images
    from covreport.scores_file import write_scores

    rng = np.random.default_rng(11)
    names = ["=1+2.png", "@cmd.png", "+x.png", "-y.png", "plain.png"]
    paths = {name: write_png(tmp_path / name, rng) for name in names}
    res = score_images(paths, tiny_loaded, num_workers=0)
    write_scores(res.scores, tmp_path / "scores.csv")
    column = [row[0] for row in csv.reader(open(tmp_path / "scores.csv", encoding="utf-8"))][1:]
    assert column == ["'=1+2.png", "'@cmd.png", "'+x.png", "'-y.png", "plain.png"]
    back = read_scores(tmp_path / "scores.csv", labels=LABELS)
    assert back["image"].tolist() == names
    np.testing.assert_array_equal(back[list(LABELS)].to_numpy(), res.scores[list(LABELS)].to_numpy())
