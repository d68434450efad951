"""``covreport validate``: exact messages and exit codes for each bad manifest of issue 2."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from covreport.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "data_manifests" / "example" / "manifest.csv"
HEADER = "pair_id,patient_id,first_image,second_image,outcome"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Work inside a temporary folder so that messages name 'm.csv', not a long path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def validate(*args):
    return CliRunner().invoke(main, ["validate", *args])


def write(path, text):
    Path(path).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def assert_error(result, message):
    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {message}\n"
    assert result.stdout == ""
    assert "Traceback" not in result.output


def csv_text(*rows, header=HEADER):
    return "\n".join([header, *rows]) + "\n"


# --- each bad manifest of the issue: exact text, exit 1 ---------------------------


def test_missing_column_suggests_close_match(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,Worse", header="pair_id,patientid,first_image,second_image,outcome"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 1, column 'patient_id': missing -- rename column 'patientid' to 'patient_id'")


def test_missing_column_spelled_with_spaces_and_capitals(here):
    write("m.csv", csv_text("P1,a.png,b.png,W", header="Patient ID,First Image,second_image,outcome"))
    assert_error(validate("m.csv", "--no-images"), "m.csv: 2 problems; fix them all and validate again:\n"
                 "m.csv line 1, column 'patient_id': missing -- rename column 'Patient ID' to 'patient_id'\n"
                 "m.csv line 1, column 'first_image': missing -- rename column 'First Image' to 'first_image'")


def test_missing_column_without_close_match_lists_header(here):
    write("m.csv", csv_text("P1,a.png,b.png,x", header="patient_id,first_image,second_image,grade"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 1, column 'outcome': missing -- add a column 'outcome' "
                 "(the header has: patient_id, first_image, second_image, grade)")


def test_empty_required_cell(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,Worse", "p2,,b.png,c.png,Worse"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 3, column 'patient_id': empty -- fill in the patient's id "
                 "(all pairs of a patient share it)")


def test_unknown_outcome(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,Better"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'outcome': 'Better' -- use Worse, Stable or Improved "
                 "(or W, S, I; any case); did you mean 'Improved'?")


def test_duplicate_pair_id(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W", "p2,P1,b.png,c.png,S", "p1,P1,c.png,d.png,I"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 4, column 'pair_id': 'p1' -- already used on line 2; pair ids must be unique")


def test_same_image_first_and_second(here):
    write("m.csv", csv_text("p1,P1,a.png,./a.png,W"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'second_image': './a.png' -- same image as first_image 'a.png'; "
                 "a pair is two different CXRs of the patient")


def test_second_date_before_first(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,2020-03-05,2020-03-01",
                            header=HEADER + ",first_date,second_date"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'second_date': '2020-03-01' -- earlier than first_date '2020-03-05'; "
                 "the first image must be the earlier CXR: swap first and second (images, dates, views)")


def test_second_offset_before_first(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,3,-2", header=HEADER + ",first_offset_days,second_offset_days"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'second_offset_days': '-2' -- earlier than first_offset_days '3'; "
                 "the first image must be the earlier CXR: swap first and second (images, dates, views)")


def test_date_not_iso(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,14/03/2020,2020-03-20", header=HEADER + ",first_date,second_date"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'first_date': '14/03/2020' -- write dates in ISO 8601, YYYY-MM-DD "
                 "(e.g. 2020-03-14), from 1900-01-01 to 2199-12-31")


def test_image_under_two_patients(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W", "p2,P2,b.png,c.png,S"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 3, column 'first_image': 'b.png' -- also listed under patient 'P1' (line 2); "
                 "an image belongs to one patient: correct the patient_id or the path")


@pytest.mark.parametrize("age", ["abc", "200", "-1", "nan", "inf"])
def test_bad_age(here, age):
    write("m.csv", csv_text(f"p1,P1,a.png,b.png,W,{age}", header=HEADER + ",age"))
    assert_error(validate("m.csv", "--no-images"),
                 f"m.csv line 2, column 'age': '{age}' -- give the age in years, a number from 0 to 120 "
                 "(or leave it blank)")


def test_bad_sex(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,X", header=HEADER + ",sex"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'sex': 'X' -- use M, F, Male or Female (any case), or leave it blank")


def test_bad_view(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,Axial", header=HEADER + ",first_view"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2, column 'first_view': 'Axial' -- use AP, AP Supine, PA or Lateral "
                 "(or leave it blank)")


def test_every_problem_listed_at_once_in_file_order(here):
    write("m.csv", csv_text(
        "p1,P1,a.png,b.png,Better,abc",
        "p1,P1,c.png,c.png,W,54",
        "p3,,d.png,e.png,S,30",
        header=HEADER + ",age"))
    assert_error(validate("m.csv", "--no-images"), "\n".join([
        "m.csv: 5 problems; fix them all and validate again:",
        "m.csv line 2, column 'outcome': 'Better' -- use Worse, Stable or Improved (or W, S, I; any case); "
        "did you mean 'Improved'?",
        "m.csv line 2, column 'age': 'abc' -- give the age in years, a number from 0 to 120 (or leave it blank)",
        "m.csv line 3, column 'pair_id': 'p1' -- already used on line 2; pair ids must be unique",
        "m.csv line 3, column 'second_image': 'c.png' -- same image as first_image 'c.png'; "
        "a pair is two different CXRs of the patient",
        "m.csv line 4, column 'patient_id': empty -- fill in the patient's id (all pairs of a patient share it)",
    ]))


def test_row_with_too_many_fields(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,extra"))
    assert_error(validate("m.csv", "--no-images"),
                 "m.csv line 2: 6 fields but the header has 5 -- quote values that contain the delimiter "
                 "(e.g. \"a, b\") or remove the extra delimiter")


# --- files that are not a readable table: one line, exit 1 -------------------------


def test_missing_file(here):
    assert_error(validate("nope.csv"), "nope.csv does not exist -- check the path to the manifest")


def test_empty_file(here):
    write("m.csv", "")
    assert_error(validate("m.csv"), "m.csv is empty -- write a header line "
                 "(patient_id,first_image,second_image,outcome) and one row per pair")


def test_blank_lines_only(here):
    write("m.csv", "\n \r\n,,,\n")
    assert_error(validate("m.csv"), "m.csv is empty -- write a header line "
                 "(patient_id,first_image,second_image,outcome) and one row per pair")


def test_header_only(here):
    write("m.csv", HEADER + "\n")
    assert_error(validate("m.csv"),
                 "m.csv has a header but no pairs -- add one row per pair below the header (line 1)")


def test_binary_junk(here):
    png = EXAMPLE.parent / "images" / "P01_1.png"
    shutil.copy(png, here / "m.csv")
    result = validate("m.csv")
    # the first NUL byte of a PNG is at offset 8 (the IHDR chunk length)
    assert_error(result, "m.csv is not a text CSV file (binary data at byte 8) -- "
                 "export the manifest as CSV (UTF-8), one row per pair")


def test_random_bytes(here):
    write("m.csv", bytes(range(256)) * 4)
    assert_error(validate("m.csv"), "m.csv is not a text CSV file (binary data at byte 0) -- "
                 "export the manifest as CSV (UTF-8), one row per pair")


def test_latin1(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W,café", header=HEADER + ",notes").encode("latin-1"))
    # offset: header line 58 bytes + "p1,P1,a.png,b.png,W,caf" 23 bytes = 81
    assert_error(validate("m.csv"), "m.csv is not UTF-8 text (byte 0xE9 at offset 81, line 2; "
                 "Latin-1 or Windows-1252?) -- re-save it as UTF-8 (in Excel: Save As > 'CSV UTF-8')")


def test_utf16(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,W").encode("utf-16"))
    assert_error(validate("m.csv"), "m.csv is UTF-16 text -- re-save it as UTF-8 (in Excel: Save As > 'CSV UTF-8')")


def test_damaged_xlsx(here):
    write("m.xlsx", b"PK\x03\x04 not really a zip")
    assert_error(validate("m.xlsx"), "m.xlsx cannot be read as an Excel workbook (BadZipFile) -- "
                 "export the first sheet as CSV (UTF-8) and validate that")


def test_old_xls(here):
    write("m.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100)
    assert_error(validate("m.xls"), "m.xls is an old Excel .xls workbook -- save it as .xlsx, "
                 "or export the first sheet as CSV (UTF-8)")


# --- accepted files ----------------------------------------------------------


def test_xlsx_is_read(here):
    import datetime as dt

    import openpyxl

    shutil.copytree(EXAMPLE.parent / "images", here / "images")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["patient_id", "first_image", "second_image", "outcome", "first_date", "second_date", "age"])
    ws.append(["P01", "images/P01_1.png", "images/P01_2.png", "w", dt.datetime(2020, 3, 2), dt.datetime(2020, 3, 5), 54])
    ws.append(["P01", "images/P01_2.png", "images/P01_3.png", "Stable", dt.datetime(2020, 3, 5), dt.datetime(2020, 3, 9), 54])
    wb.save(here / "m.xlsx")
    result = validate("m.xlsx")
    assert result.exit_code == 0, result.output
    assert "Pairs       2 (1 patient)" in result.stdout
    assert "Images      3 files: 3 found, 0 missing, 0 unreadable" in result.stdout


def test_xlsx_error_names_rows(here):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["patient_id", "first_image", "second_image", "outcome"])
    ws.append(["P01", "a.png", "b.png", "maybe"])
    wb.save(here / "m.xlsx")
    assert_error(validate("m.xlsx", "--no-images"),
                 "m.xlsx row 2, column 'outcome': 'maybe' -- use Worse, Stable or Improved (or W, S, I; any case)")


def test_semicolon_file_accepted_with_warning(here):
    write("m.csv", "patient_id;first_image;second_image;outcome;age\nP1;a.png;b.png;W;54,5\n")
    result = validate("m.csv", "--no-images")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "Pairs       1 (1 patient)" in result.stdout
    assert "  m.csv is semicolon-separated, not comma-separated; read it with semicolons as the delimiter\n" \
        in result.stdout


def test_tab_file_with_bom_and_crlf_accepted(here):
    write("m.csv", "\ufeffpatient_id\tfirst_image\tsecond_image\toutcome\r\nP1\ta.png\tb.png\tS\r\n")
    result = validate("m.csv", "--no-images")
    assert result.exit_code == 0, result.output
    assert "m.csv is tab-separated" in result.stdout


# --- the example, summary output, --json, --strict ---------------------------------


def test_example_manifest_validates():
    result = validate(str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2:] == [
        "Pairs       6 (3 patients)",
        "Outcomes    Worse 3, Stable 1, Improved 2",
        "Images      9 files: 9 found, 0 missing, 0 unreadable",
        "Exclusions  none",
        "Warnings    none",
        "Analyses    2 of 4 can run",
        "  cannot run: Worse vs Stable: Stable has 1 pair; a group comparison needs at least 2 pairs per group",
        "  cannot run: Stable vs Improved: Stable has 1 pair; a group comparison needs at least 2 pairs per group",
        "OK: the manifest is usable; 6 of 6 pairs can be analysed; 2 analyses cannot run (listed above).",
    ]


def test_example_json():
    result = validate(str(EXAMPLE), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pairs"] == 6 and summary["patients"] == 3
    assert summary["pairs_per_outcome"] == {"Worse": 3, "Stable": 1, "Improved": 2, "empty": 0}
    assert summary["images"] == {"total": 9, "checked": True, "found": 9, "missing": 0, "unreadable": 0}
    assert summary["exclusions"] == [] and summary["warnings"] == []
    assert summary["extra_columns"] == ["site"]


def _with_exclusions(here):
    shutil.copytree(EXAMPLE.parent / "images", here / "images")
    (here / "images" / "bad.png").write_bytes(b"not a png")
    return write("m.csv", csv_text(
        "p1,P01,images/P01_1.png,images/P01_2.png,W",
        "p2,P01,images/P01_2.png,images/missing.png,I",
        "p3,P01,images/P01_3.png,images/bad.png,S",
        "p4,P02,images/P02_1.png,images/P02_2.png,",
    ))


def test_missing_images_and_empty_outcome_are_exclusions(here):
    _with_exclusions(here)
    result = validate("m.csv")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2:] == [
        "Pairs       4 (2 patients)",
        "Outcomes    Worse 1, Stable 1, Improved 1, empty 1",
        "Images      7 files: 5 found, 1 missing, 1 unreadable",
        "Exclusions  3",
        "  pair p2 (patient P01): index test not done: second image: file not found (images/missing.png)",
        "  pair p3 (patient P01): index test not done: second image: unreadable image "
        "(not PNG, JPEG or DICOM) (images/bad.png)",
        "  pair p4 (patient P02): reference standard not available: outcome empty",
        "Warnings    2",
        "  1 image file missing and 1 unreadable: 2 pairs excluded (index test not done); "
        "strict mode makes this an error",
        "  1 pair without an outcome: excluded (reference standard not available) until a reader fills it in; "
        "strict mode makes this an error",
        "Analyses    0 of 4 can run",
        "  cannot run: Worse vs Improved: Worse has 1 pair and Improved has 0 pairs; a group comparison needs "
        "at least 2 pairs per group",
        "  cannot run: Worse vs Stable: Worse has 1 pair and Stable has 0 pairs; a group comparison needs "
        "at least 2 pairs per group",
        "  cannot run: Stable vs Improved: Stable has 0 pairs and Improved has 0 pairs; a group comparison needs "
        "at least 2 pairs per group",
        "  cannot run: Prediction of Worse vs Improved (leave-one-patient-out): no Improved pair; it needs at "
        "least one Worse and one Improved pair",
        "Warning: 1 of 4 pairs can be analysed, but none of the 4 analyses can run (listed above); the report "
        "would hold only the flow diagram and Table 1.",
    ]


def test_strict_turns_exclusions_into_errors(here):
    _with_exclusions(here)
    root = str(here.resolve())
    assert_error(validate("m.csv", "--strict"), "\n".join([
        "m.csv: 3 problems; fix them all and validate again:",
        f"m.csv line 3, column 'second_image': 'images/missing.png' -- file not found: {root}/images/missing.png; "
        "correct the path (relative paths start at the manifest's folder) or remove the pair",
        f"m.csv line 4, column 'second_image': 'images/bad.png' -- unreadable image (not PNG, JPEG or DICOM): "
        f"{root}/images/bad.png; replace the file or remove the pair",
        "m.csv line 5, column 'outcome': empty -- fill in Worse, Stable or Improved (without strict mode the pair "
        "is excluded: reference standard not available)",
    ]))


def test_no_images_skips_probing(here):
    _with_exclusions(here)
    result = validate("m.csv", "--no-images")
    assert result.exit_code == 0, result.output
    assert "Images      7 files, not checked (--no-images)" in result.stdout
    assert "Exclusions  1" in result.stdout


def test_help_describes_options():
    result = CliRunner().invoke(main, ["validate", "--help"])
    assert result.exit_code == 0
    for option in ("--json", "--strict", "--no-images", "data_manifests/README.md"):
        assert option in result.output


# --- issue 21.5: every problem of every row in one round -----------------------------


def test_mixed_problems_exclusions_and_near_misses_in_one_round(here):
    # Before: round 1 listed the bad outcome only; the too-long row's age, the 'Age' near miss and the
    # missing image and empty outcome appeared only after each fix.
    shutil.copytree(EXAMPLE.parent / "images", here / "images")
    write("m.csv", csv_text(
        "p1,P01,images/P01_1.png,images/P01_2.png,Better,54",
        "p2,P01,images/P01_2.png,images/P01_3.png,W,241,extra",
        "p3,P02,images/P02_1.png,images/missing.png,I,30",
        "p4,P02,images/P02_2.png,images/P02_3.png,,30",
        header=HEADER + ",age"))
    (here / "n.csv").write_text((here / "m.csv").read_text().replace(",age\n", ",age,Sex\n", 1))
    assert_error(validate("m.csv"), "\n".join([
        "m.csv: 3 problems; fix them all and validate again:",
        "m.csv line 2, column 'outcome': 'Better' -- use Worse, Stable or Improved (or W, S, I; any case); "
        "did you mean 'Improved'?",
        "m.csv line 3: 7 fields but the header has 6 -- quote values that contain the delimiter (e.g. \"a, b\") "
        "or remove the extra delimiter",
        "m.csv line 3, column 'age': '241' -- give the age in years, a number from 0 to 120 (or leave it blank)",
        "m.csv: once these problems are fixed, 2 pairs would be excluded (left out of the analysis; errors only "
        "in strict mode):",
        "m.csv line 4: second image: file not found (images/missing.png)",
        "m.csv line 5: outcome empty",
    ]))
    result = validate("n.csv", "--no-images")
    assert result.exit_code == 1
    assert ("n.csv: warning (not an error): column 'Sex' is not a manifest column and is carried through "
            "untouched; rename it to 'sex' if that is what it holds") in result.stderr.splitlines()


def test_one_problem_with_exclusions_keeps_a_header(here):
    write("m.csv", csv_text("p1,P1,a.png,b.png,Better", "p2,P1,b.png,c.png,"))
    lines = validate("m.csv", "--no-images").stderr.splitlines()
    assert lines[:2] == ["Error: m.csv: 1 problem; fix it and validate again:",
                         "m.csv line 2, column 'outcome': 'Better' -- use Worse, Stable or Improved (or W, S, I; "
                         "any case); did you mean 'Improved'?"]
    assert lines[-1] == "m.csv line 3: outcome empty"


def test_prediction_cannot_run_when_a_fold_trains_on_one_class(here):
    # Improved is one pair of one patient: leaving P3 out trains on Worse alone (the report then printed
    # specificity 0.000 and AUC 0.25).
    write("m.csv", csv_text("p1,P1,a.png,b.png,W", "p2,P1,b.png,c.png,W", "p3,P2,d.png,e.png,W",
                            "p4,P3,f.png,g.png,I"))
    result = validate("m.csv", "--no-images")
    assert result.exit_code == 0, result.output
    assert ("  cannot run: Prediction of Worse vs Improved (leave-one-patient-out): leaving out patient P3, the only "
            "patient with an Improved pair (1 pair), trains on Worse pairs alone; leave-one-patient-out needs Worse "
            "and Improved pairs from at least 2 patients each") in result.stdout.splitlines()
