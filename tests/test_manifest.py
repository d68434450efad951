"""read_manifest: normalisation, line numbers, exclusions, warnings, robustness."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covreport import manifest as mf
from covreport.constants import STAGE_INDEX_TEST_NOT_DONE, STAGE_NO_REFERENCE
from covreport.errors import CovreportError, ManifestError
from covreport.manifest import Manifest, read_manifest

EXAMPLE = Path(__file__).resolve().parents[1] / "data_manifests" / "example" / "manifest.csv"
HEADER = "pair_id,patient_id,first_image,second_image,outcome"


def write(folder, text, name="m.csv"):
    path = Path(folder) / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def lines(*rows, header=HEADER):
    return "\n".join([header, *rows]) + "\n"


# --- the example -------------------------------------------------------------


def test_example_manifest():
    m = read_manifest(EXAMPLE)
    assert isinstance(m, Manifest)
    assert m.sha256 == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    p = m.pairs
    assert list(p["pair_id"]) == [f"pair{k:02d}" for k in range(1, 7)]
    assert list(p["line"]) == [2, 3, 4, 5, 6, 7]
    # the file writes W and i for pairs 5 and 6
    assert list(p["outcome"]) == ["Worse", "Improved", "Worse", "Stable", "Worse", "Improved"]
    assert list(p["sex"]) == ["M", "M", "F", "F", "M", "M"]  # 'Male' normalised
    # intervals by hand from the dates in make_example.py: 2->5, 5->9, 10->12, 12->17, 20->21, 21->26 March
    assert list(p["interval_days"]) == [3.0, 4.0, 2.0, 5.0, 1.0, 5.0]
    assert p["first_date"].iloc[0] == pd.Timestamp("2020-03-02")
    assert list(p["site"]) == ["demo"] * 6 and m.extra_columns == ["site"]
    assert all(Path(x).is_file() for x in p["first_path"]) and all(Path(x).is_absolute() for x in p["second_path"])
    assert len(m.image_status) == 9 and all(v is None for v in m.image_status.values())
    assert m.exclusions.empty and m.warnings == []


def test_summary_is_json_ready():
    s = read_manifest(EXAMPLE).summary()
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    assert s["pairs_per_outcome"] == {"Worse": 3, "Stable": 1, "Improved": 2, "empty": 0}
    assert s["images"] == {"total": 9, "checked": True, "found": 9, "missing": 0, "unreadable": 0}
    assert s["pairs_analysable"] == 6


# --- normalisation -----------------------------------------------------------


def test_normalisation_of_optional_columns(tmp_path):
    header = HEADER + ",age,sex,first_view,second_view,first_offset_days,second_offset_days,source,notes,extra"
    path = write(tmp_path, lines(
        " p1 , P1 , a.png , b.png , worse ,54,male,ap supine,PA,-2,3.5,src,  note  ,  kept  ",
        "p2,P1,b.png,c.png,S,54.5,F,AP_Supine,lat,,,,,",
        "p3,P1,c.png,d.png,i,,,Supine-AP,L,,,,,",
        header=header))
    p = read_manifest(path, check_images=False).pairs
    assert list(p["pair_id"]) == ["p1", "p2", "p3"]
    assert list(p["first_image"]) == ["a.png", "b.png", "c.png"]
    assert list(p["outcome"]) == ["Worse", "Stable", "Improved"]
    assert p["age"].iloc[0] == 54.0 and p["age"].iloc[1] == 54.5 and np.isnan(p["age"].iloc[2])
    assert list(p["sex"]) == ["M", "F", None]
    assert list(p["first_view"]) == ["AP Supine", "AP Supine", "AP Supine"]
    assert list(p["second_view"]) == ["PA", "Lateral", "Lateral"]
    assert p["interval_days"].iloc[0] == 5.5 and p["interval_days"].isna().iloc[1:].all()
    # free text and unknown columns are kept exactly as written
    assert p["notes"].iloc[0] == "  note  " and p["extra"].iloc[0] == "  kept  "


def test_dates_iso_forms_and_interval(tmp_path):
    path = write(tmp_path, lines(
        "p1,P1,a.png,b.png,W,2020-03-01,2020-03-04T12:00",
        "p2,P1,b.png,c.png,W,20200304T1200,2020-03-05 12:00+01:00",
        "p3,P1,c.png,d.png,W,2020-03-05,",
        header=HEADER + ",first_date,second_date"))
    p = read_manifest(path, check_images=False).pairs
    assert p["second_date"].iloc[0] == pd.Timestamp("2020-03-04 12:00")
    assert p["second_date"].iloc[1] == pd.Timestamp("2020-03-05 11:00")  # +01:00 -> UTC
    assert list(p["interval_days"].iloc[:2]) == [3.5, 23 / 24]
    assert pd.isna(p["second_date"].iloc[2]) and np.isnan(p["interval_days"].iloc[2])


def test_outcome_empty_is_none_and_pair_ids_default_to_row_numbers(tmp_path):
    path = write(tmp_path, lines("P1,a.png,b.png,W", "", "P1,b.png,c.png,", header="patient_id,first_image,second_image,outcome"))
    m = read_manifest(path, check_images=False)
    assert list(m.pairs["pair_id"]) == ["1", "2"]  # data rows, the blank line is not counted
    assert list(m.pairs["line"]) == [2, 4]
    assert m.pairs["outcome"].iloc[1] is None
    assert m.exclusions.to_dict("records") == [{
        "pair_id": "2", "patient_id": "P1", "outcome": None, "stage": STAGE_NO_REFERENCE,
        "reason": "outcome empty", "cause": "outcome empty"}]


def test_formula_like_cells_stay_text(tmp_path):
    path = write(tmp_path, lines("p1,P1,a.png,b.png,W,=HYPERLINK(\"http://x\"),@SUM(1),+x",
                                 header=HEADER + ",notes,source,other"))
    m = read_manifest(path, check_images=False)
    assert m.pairs["notes"].iloc[0] == '=HYPERLINK("http://x")'
    assert m.pairs["source"].iloc[0] == "@SUM(1)" and m.pairs["other"].iloc[0] == "+x"
    assert any("3 cells starting with =, +, - or @" in w for w in m.warnings)


# --- paths -------------------------------------------------------------------


def test_paths_relative_to_manifest_folder_not_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "study"
    sub.mkdir()
    path = write(sub, lines("p1,P1,scans/a.png,./scans/../scans/b.png,W", f"p2,P1,scans\\b.png,{tmp_path}/abs.png,S"))
    monkeypatch.chdir(tmp_path)
    p = read_manifest(Path("study") / "m.csv", check_images=False).pairs
    assert list(p["first_path"]) == [str(sub / "scans/a.png"), str(sub / "scans/b.png")]
    assert list(p["second_path"]) == [str(sub / "scans/b.png"), str(tmp_path / "abs.png")]
    assert p["first_image"].iloc[1] == "scans\\b.png"  # as written


def test_same_image_detected_after_normalisation(tmp_path):
    path = write(tmp_path, lines("p1,P1,scans/a.png,scans//./a.png,W"))
    with pytest.raises(ManifestError, match="same image as first_image"):
        read_manifest(path, check_images=False)


# --- line numbers ------------------------------------------------------------


def test_line_numbers_with_quoted_line_breaks_blank_lines_and_crlf(tmp_path):
    text = (HEADER + ",notes\r\n"
            'p1,P1,a.png,b.png,W,"two\r\nlines"\r\n'
            "\r\n"
            "p2,P1,b.png,c.png,Nope,\r\n")
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        read_manifest(path, check_images=False)
    assert str(err.value).startswith("m.csv line 5, column 'outcome': 'Nope' --") or \
        f"{path} line 5, column 'outcome': 'Nope' --" in str(err.value)
    text = text.replace("Nope", "S")
    p = read_manifest(write(tmp_path, text), check_images=False).pairs
    assert list(p["line"]) == [2, 5] and p["notes"].iloc[0] == "two\r\nlines"


def test_header_after_blank_lines(tmp_path):
    path = write(tmp_path, "\n\n" + lines("p1,P1,a.png,b.png,Bad"))
    with pytest.raises(ManifestError, match=r"line 4, column 'outcome': 'Bad'"):
        read_manifest(path, check_images=False)


# --- delimiters, encodings, workbooks ------------------------------------------


@pytest.mark.parametrize("sep,word", [(";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
def test_other_delimiters(tmp_path, sep, word):
    path = write(tmp_path, lines(sep.join(["p1", "P1", "a.png", "b.png", "W"]), header=HEADER.replace(",", sep)))
    m = read_manifest(path, check_images=False)
    assert m.delimiter == sep and list(m.pairs["outcome"]) == ["Worse"]
    assert m.warnings[0] == f"{path} is {word}-separated, not comma-separated; read it with {word}s as the delimiter"


def test_semicolon_file_accepts_decimal_comma(tmp_path):
    path = write(tmp_path, "patient_id;first_image;second_image;outcome;age\nP1;a.png;b.png;W;54,5\n")
    assert read_manifest(path, check_images=False).pairs["age"].iloc[0] == 54.5


def test_bom_is_ignored(tmp_path):
    path = write(tmp_path, "\ufeff" + lines("p1,P1,a.png,b.png,W"))
    assert list(read_manifest(path, check_images=False).pairs["pair_id"]) == ["p1"]


def test_xlsx_first_sheet_dates_and_numbers(tmp_path):
    import datetime as dt

    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Pairs"
    ws.append(["pair_id", "patient_id", "first_image", "second_image", "outcome", "first_date", "second_date", "age"])
    ws.append([1, "P1", "a.png", "b.png", "W", dt.datetime(2020, 3, 1), dt.date(2020, 3, 4), 61.0])
    ws.append([None] * 8)
    ws.append([3, "P1", "b.png", "c.png", "I", dt.datetime(2020, 3, 4), dt.datetime(2020, 3, 6, 12), 61.5])
    wb.create_sheet("notes")
    wb.save(tmp_path / "m.xlsx")
    m = read_manifest(tmp_path / "m.xlsx", check_images=False)
    assert m.delimiter is None
    assert list(m.pairs["pair_id"]) == ["1", "3"] and list(m.pairs["line"]) == [2, 4]
    assert list(m.pairs["interval_days"]) == [3.0, 2.5] and list(m.pairs["age"]) == [61.0, 61.5]
    assert m.warnings == [f"{tmp_path / 'm.xlsx'} has 2 sheets; read the first one, 'Pairs'"]


# --- header problems -----------------------------------------------------------


def test_header_problems(tmp_path):
    path = write(tmp_path, lines("p1,P1,a.png,b.png,W,1,x,,2", header=HEADER + ",line,outcome,,Age"))
    with pytest.raises(ManifestError) as err:
        read_manifest(path, check_images=False)
    assert err.value.problems == [
        f"{path} line 1, column 'outcome': appears 2 times (columns 5 and 7) -- keep one of them",
        f"{path} line 1, column 'line': reserved name -- covreport adds a column of this name; rename yours",
    ]


def test_unnamed_column_with_values_is_an_error_empty_one_is_dropped(tmp_path):
    ok = read_manifest(write(tmp_path, lines("p1,P1,a.png,b.png,W,", header=HEADER + ",")), check_images=False)
    assert ok.extra_columns == [] and "" not in ok.pairs.columns
    with pytest.raises(ManifestError, match=r"line 1, column 6: no name -- give this column a name \(it has values, "
                                            r"e.g. line 2: 'x'\)"):
        read_manifest(write(tmp_path, lines("p1,P1,a.png,b.png,W,x", header=HEADER + ",")), check_images=False)


def test_near_miss_of_optional_column_warns(tmp_path):
    m = read_manifest(write(tmp_path, lines("p1,P1,a.png,b.png,W,54", header=HEADER + ",Age")), check_images=False)
    assert m.extra_columns == ["Age"] and m.pairs["age"].isna().all()
    assert "column 'Age' is not a manifest column and is carried through untouched; rename it to 'age'" \
        " if that is what it holds" in m.warnings


def test_short_and_empty_rows_warn(tmp_path):
    m = read_manifest(write(tmp_path, lines("p1,P1,a.png,b.png,W,note", ",,,,,", "p2,P1,b.png,c.png,S",
                                            header=HEADER + ",notes")), check_images=False)
    assert list(m.pairs["line"]) == [2, 4] and m.pairs["notes"].iloc[1] == ""
    assert m.warnings == ["skipped 1 empty row (first: line 3)",
                          "1 row with fewer fields than the header (first: line 4, 5 of 6); "
                          "their missing trailing cells are read as empty"]


def test_unmatched_quote_is_reported(tmp_path):
    path = write(tmp_path, lines('p1,P1,"a.png,b.png,W', "p2,P1,b.png,c.png,S"))
    with pytest.raises(ManifestError, match=r"line 2, column 'first_image': .* -- a line break inside a cell: "
                                            r"check for an unmatched double quote"):
        read_manifest(path, check_images=False)


def test_many_identical_problems_are_summarised(tmp_path):
    rows = [f"p{i},P{i},a{i}.png,b{i}.png,Nope" for i in range(30)]
    with pytest.raises(ManifestError) as err:
        read_manifest(write(tmp_path, lines(*rows)), check_images=False)
    text = str(err.value).splitlines()
    assert text[0] == f"{tmp_path / 'm.csv'}: 30 problems; fix them all and validate again:"
    assert len(text) == 1 + 20 + 1 and len(err.value.problems) == 30
    assert text[-1].startswith(f"{tmp_path / 'm.csv'}: 10 more like: column 'outcome': 'Nope' -- use Worse")


def test_duplicate_pair_rows_warn(tmp_path):
    m = read_manifest(write(tmp_path, lines("p1,P1,a.png,b.png,W", "p2,P1,a.png,b.png,W")), check_images=False)
    assert m.warnings == ["1 row repeating the images of an earlier row (first: line 3); "
                          "a pair listed twice counts twice in the analysis"]


# --- images: exclusions and strict mode -------------------------------------------


@pytest.fixture
def scans(tmp_path):
    shutil.copytree(EXAMPLE.parent / "images", tmp_path / "scans")
    (tmp_path / "scans" / "junk.png").write_bytes(b"junk")
    return tmp_path


def test_image_exclusions(scans):
    path = write(scans, lines(
        "p1,P1,scans/P01_1.png,scans/P01_2.png,W",
        "p2,P1,scans/P01_2.png,scans/gone.png,",
        "p3,P1,scans/junk.png,scans/gone2.png,I",
        "p4,P2,scans/P02_1.png,scans/P02_2.png,",
    ))
    m = read_manifest(path)
    ex = m.exclusions
    assert list(ex["pair_id"]) == ["p2", "p3", "p4"]
    assert list(ex["stage"]) == [STAGE_INDEX_TEST_NOT_DONE, STAGE_INDEX_TEST_NOT_DONE, STAGE_NO_REFERENCE]
    assert list(ex["reason"]) == [
        "second image: file not found (scans/gone.png)",
        "first image: unreadable image (not PNG, JPEG or DICOM) (scans/junk.png); "
        "second image: file not found (scans/gone2.png)",
        "outcome empty",
    ]
    assert ex["cause"].iloc[0] == "second image: file not found"
    assert ex["outcome"].iloc[0] is None and ex["outcome"].iloc[1] == "Improved"
    assert m.image_counts() == {"total": 7, "checked": True, "found": 4, "missing": 2, "unreadable": 1}
    assert m.image_status[str(scans / "scans" / "gone.png")] == "file not found"
    assert list(m.analysable_pairs()["pair_id"]) == ["p1"]
    assert m.summary()["exclusions_by_stage"] == {STAGE_INDEX_TEST_NOT_DONE: 2, STAGE_NO_REFERENCE: 1}


def test_no_image_check(scans):
    path = write(scans, lines("p1,P1,scans/gone.png,scans/gone2.png,W"))
    m = read_manifest(path, check_images=False)
    assert m.exclusions.empty and m.image_status == {}
    assert m.image_counts() == {"total": 2, "checked": False, "found": None, "missing": None, "unreadable": None}


def test_strict(scans):
    path = write(scans, lines("p1,P1,scans/P01_1.png,scans/gone.png,W", "p2,P2,scans/P02_1.png,scans/P02_2.png,"))
    with pytest.raises(ManifestError) as err:
        read_manifest(path, strict=True)
    assert len(err.value.problems) == 2
    assert "line 2, column 'second_image': 'scans/gone.png' -- file not found" in err.value.problems[0]
    assert "line 3, column 'outcome': empty -- fill in Worse, Stable or Improved" in err.value.problems[1]
    # without images probed, strict still refuses the empty outcome
    with pytest.raises(ManifestError, match="column 'outcome': empty"):
        read_manifest(path, strict=True, check_images=False)


def test_probe_oserror_becomes_a_reason(tmp_path):
    long_name = "x" * 300 + ".png"  # longer than NAME_MAX: stat raises OSError (ENAMETOOLONG)
    m = read_manifest(write(tmp_path, lines(f"p1,P1,{long_name},b.png,W")))
    assert m.exclusions["stage"].iloc[0] == STAGE_INDEX_TEST_NOT_DONE


# --- robustness: only a Manifest or a CovreportError -----------------------------


_NAMES = ["patient_id", "first_image", "second_image", "outcome", "pair_id", "first_date", "second_date",
          "first_offset_days", "second_offset_days", "age", "sex", "first_view", "second_view", "notes",
          "line", "", "x"]
_CELL = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["W", "s", "Improved", "", "2020-03-01", "/1", "-3", "1e400", "nan", "M", "AP", "a.png",
                     "b.png", '"', ",", "\n", "\r", ";", "\t", "=1", "..", "/", "\\"]),
)


@st.composite
def _csv_texts(draw):
    header = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=8))
    rows = draw(st.lists(st.lists(_CELL, max_size=len(header) + 2), max_size=6))
    sep = draw(st.sampled_from([",", ";", "\t"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return newline.join(sep.join(r) for r in [header] + rows) + draw(st.sampled_from(["", newline]))


def _only_manifest_or_covreport_error(data, suffix=".csv", **kwargs):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"m{suffix}"
        path.write_bytes(data)
        try:
            m = read_manifest(path, **kwargs)
        except CovreportError as exc:
            assert str(exc)
            return
        assert isinstance(m, Manifest)
        json.dumps(m.summary(), allow_nan=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_csv_texts(), st.booleans(), st.booleans(), st.sampled_from(["utf-8", "utf-8-sig"]))
def test_arbitrary_csv_text(text, strict, check_images, encoding):
    _only_manifest_or_covreport_error(text.encode(encoding, "surrogatepass"), strict=strict, check_images=check_images)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       st.sampled_from([".csv", ".xlsx"]))
def test_arbitrary_bytes(data, suffix):
    _only_manifest_or_covreport_error(data, suffix)


_PLAIN_CELL = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters='"\r\n\x00', blacklist_categories=("Cs",)), max_size=5),
    st.sampled_from(["", " ", "a", ",", ";", "\t"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_PLAIN_CELL, max_size=5), min_size=1, max_size=8), st.sampled_from([",", ";", "\t", "|"]),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_fast_reader_agrees_with_csv_module(rows, sep, newline, trailing):
    # Reference: Python's csv module (the general reader), on text without quotes.
    text = newline.join(sep.join(r) for r in rows) + (newline if trailing else "")
    fast = mf._parse_plain_csv(text, sep)
    slow = mf._parse_csv(text, sep, "x")
    if fast is None:  # the fast path declined (e.g. a row longer than the first)
        return
    assert list(fast.lengths) == list(slow.lengths)
    assert list(fast.blank) == list(slow.blank)
    assert list(fast.starts) == list(slow.starts)
    for i, n in enumerate(slow.lengths):
        assert list(fast.cells.iloc[i, :n]) == list(slow.cells.iloc[i, :n])


def test_reading_does_not_depend_on_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_manifest(os.path.relpath(EXAMPLE, tmp_path)).image_counts()["found"] == 9
