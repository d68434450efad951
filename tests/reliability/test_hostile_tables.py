"""Hostile tables and the readers around them (issue 18, sections 3, 5 and 6).

- workbooks: every cell a sheet holds is read whatever its ``<dimension>``
  says (too few rows, too few columns, ``A1`` alone, rows out of order), and
  what is read is bounded before openpyxl unpacks anything (a shared string
  table of 70 MB unpacked, a worksheet part, filled cells) and while reading
  (a stray cell at ``XFD1048576`` is refused in seconds, a real row at row
  1,048,576 is read in seconds);
- identifiers: every format (Cf) and default-ignorable code point is refused
  in id and path columns of manifests and exports, and two ids that look the
  same (equal Unicode TR39 skeletons) are refused naming both lines; the
  same characters are refused in study.toml fields and in ``--previous``
  results;
- every input is a bounded regular file: a FIFO or a link to ``/dev/zero``
  given as a manifest, export, column map, study file or ``--previous`` is
  refused at once (run in a child process with a timeout and an address
  space limit, so that a regression fails instead of hanging or eating the
  machine's memory);
- messages escape control and invisible characters echoed from inputs, and a
  memory error is reported as one.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from covreport.errors import ManifestError, ReportError
from covreport.manifest import read_manifest
from reliability_helpers import REPO

HEADER = ["pair_id", "patient_id", "first_image", "second_image", "outcome", "first_date", "second_date",
          "age", "sex"]  # columns A to I


def _rows(n_pairs):
    rows = [HEADER]
    for k in range(n_pairs):
        rows.append([f"k{k}", f"P{k // 2}", f"img/{k}a.png", f"img/{k}b.png", ("Worse", "Stable", "Improved")[k % 3],
                     "2020-01-01", "2020-01-05", 50 + k, "MF"[k % 2]])
    return rows


def _workbook(path, rows):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    for row in rows:
        ws.append(row)
    wb.save(path)
    return path


def _edit_part(path, part, edit):
    """Rewrite one part of a zip (``edit``: text -> text), keeping the others as they are."""
    with zipfile.ZipFile(path) as zf:
        items = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in items:
            out.writestr(name, edit(data.decode("utf-8")).encode("utf-8") if name == part else data)
    return path


SHEET = "xl/worksheets/sheet1.xml"
SST_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"


def _with_shared_strings(path, strings, part="xl/sharedStrings.xml"):
    """Add a shared string table (openpyxl writes inline strings), listed in [Content_Types].xml."""
    sst = ('<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
           + "".join(f"<si><t>{t}</t></si>" for t in strings) + "</sst>")
    with zipfile.ZipFile(path) as zf:
        items = {info.filename: zf.read(info) for info in zf.infolist()}
    items[part] = sst.encode("utf-8")
    items["[Content_Types].xml"] = items["[Content_Types].xml"].replace(
        b"</Types>", f'<Override PartName="/{part}" ContentType="{SST_TYPE}" /></Types>'.encode())
    # The first pair's patient id read from the table, so that the table is really used.
    items[SHEET] = re.sub(rb'<c r="B2" t="inlineStr"><is><t>[^<]*</t></is></c>', b'<c r="B2" t="s"><v>0</v></c>',
                          items[SHEET])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in items.items():
            out.writestr(name, data)
    return path


def _dimension(ref):
    return lambda xml: re.sub(r'<dimension ref="[^"]*"\s*/>', f'<dimension ref="{ref}"/>', xml)


def _read_in_child(path, tmp_path, timeout=60):
    """read_manifest(path) in a child process: its pairs and lines or its error, seconds and peak RSS (MiB).

    The child runs under a 4 GiB address-space limit and the timeout, so a
    reader that iterates over empty space or unpacks a bomb fails the test
    instead of hanging the suite or eating the machine's memory.
    """
    code = textwrap.dedent("""
        import json, sys, time
        from covreport.errors import CovreportError
        from covreport.manifest import read_manifest
        start = time.perf_counter()
        try:
            m = read_manifest(sys.argv[1], check_images=False)
            out = {"pairs": len(m.pairs), "lines": [int(x) for x in m.pairs["line"]],
                   "ages": [None if a != a else float(a) for a in m.pairs["age"]]}
        except CovreportError as exc:
            out = {"error": str(exc)}
        out["seconds"] = time.perf_counter() - start
        # VmHWM: this process image's peak RSS (ru_maxrss would count the forking parent's too)
        status = open("/proc/self/status").read()
        out["rss_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
        print(json.dumps(out))
    """)
    res = _child(code, [str(path)], tmp_path, timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child(code, args, tmp_path, timeout=60):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=tmp_path, env=env, preexec_fn=limit)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


# --------------------------------------------------------------------------
# Workbooks: every cell that is there, whatever <dimension> says


@pytest.mark.parametrize("ref, why", [
    ("A1:H10", "declares 10 rows of 25"),
    ("A1:E25", "declares 5 columns of 9: dates, age and sex would read as empty"),
    ("A1", "declares one cell"),
])
def test_workbook_cells_beyond_the_declared_dimension_are_read(tmp_path, ref, why):
    path = _edit_part(_workbook(tmp_path / "m.xlsx", _rows(24)), SHEET, _dimension(ref))
    m = read_manifest(path, check_images=False)
    assert len(m.pairs) == 24, why
    assert list(m.pairs["line"]) == list(range(2, 26))
    assert m.pairs["age"].tolist() == [50.0 + k for k in range(24)], why
    assert m.pairs["sex"].notna().all() and m.pairs["interval_days"].eq(4).all(), why


def test_workbook_rows_out_of_order_are_all_read(tmp_path):
    def move_row_3_last(xml):
        row = re.search(r'<row r="3"[^>]*>.*?</row>', xml).group(0)
        return xml.replace(row, "").replace("</sheetData>", row + "</sheetData>")

    path = _edit_part(_workbook(tmp_path / "m.xlsx", _rows(24)), SHEET, move_row_3_last)
    m = read_manifest(path, check_images=False)
    assert len(m.pairs) == 24 and sorted(m.pairs["line"]) == list(range(2, 26))


def test_workbook_cell_written_twice_is_refused(tmp_path):
    def twice(xml):
        cell = re.search(r'<c r="B2"[^>]*>.*?</c>', xml).group(0)
        return xml.replace(cell, cell + cell)

    path = _edit_part(_workbook(tmp_path / "m.xlsx", _rows(4)), SHEET, twice)
    with pytest.raises(ManifestError, match=r"cell B2 is written twice in the sheet -- "):
        read_manifest(path, check_images=False)


def test_workbook_far_stray_cell_is_refused_in_seconds(tmp_path):
    """A 6 KB workbook declaring A1:XFD1048576 with one far cell: refused naming the cell, no iteration."""
    far = '<row r="1048576"><c r="XFD1048576" t="inlineStr"><is><t>x</t></is></c></row>'
    path = _edit_part(_workbook(tmp_path / "m.xlsx", _rows(4)), SHEET, lambda xml: _dimension("A1:XFD1048576")(
        xml).replace("</sheetData>", far + "</sheetData>"))
    assert path.stat().st_size < 10_000
    out = _read_in_child(path, tmp_path)
    assert "cell XFD1048576 lies right of column 1,024" in out.get("error", ""), out
    assert out["seconds"] < 10 and out["rss_mib"] < 1024, out


def test_workbook_far_real_row_is_read_in_seconds(tmp_path):
    """A real pair on the sheet's last row, under a dimension of the whole sheet: read, quickly."""
    cells = "".join(f'<c r="{col}1048576" t="inlineStr"><is><t>{text}</t></is></c>'
                    for col, text in zip("ABCDE", ["far", "P9", "img/f1.png", "img/f2.png", "Worse"]))
    path = _edit_part(_workbook(tmp_path / "m.xlsx", _rows(4)), SHEET, lambda xml: _dimension("A1:XFD1048576")(
        xml).replace("</sheetData>", f'<row r="1048576">{cells}</row></sheetData>'))
    out = _read_in_child(path, tmp_path)
    assert out.get("lines") == [2, 3, 4, 5, 1048576], out
    assert out["seconds"] < 10 and out["rss_mib"] < 1024, out


def test_workbook_huge_unused_shared_string_is_refused_before_unpacking(tmp_path):
    """70 MB of one unused shared string (a few KB packed): refused from the zip directory, in little memory."""
    path = _with_shared_strings(_workbook(tmp_path / "m.xlsx", _rows(4)), ["P0", "x" * (70 << 20)])
    assert path.stat().st_size < 1_000_000
    out = _read_in_child(path, tmp_path)
    assert re.search(r"its shared string table unpacks to 70[.\d]* MiB, more than the 64 MiB", out.get("error", "")), out
    assert out["rss_mib"] < 400, out


def test_workbook_shared_strings_found_by_content_type_whatever_their_name(tmp_path, monkeypatch):
    """[Content_Types].xml may put the shared strings anywhere, even among the sheets: the cap follows it."""
    import covreport.tabular as tabular

    path = _with_shared_strings(_workbook(tmp_path / "m.xlsx", _rows(4)), ["P0", "y" * 200_000],
                                part="xl/worksheets/strings.xml")
    m = read_manifest(path, check_images=False)  # openpyxl follows the content types
    assert len(m.pairs) == 4 and m.pairs["patient_id"].iloc[0] == "P0"
    # As if 100 KB were too much for a shared string table: the larger cap of a sheet must not apply.
    monkeypatch.setattr(tabular, "MAX_OTHER_PART_BYTES", 100_000, raising=False)
    with pytest.raises(ManifestError, match="its shared string table unpacks to"):
        read_manifest(path, check_images=False)


def test_workbook_sheet_part_and_cell_caps(tmp_path, monkeypatch):
    import covreport.tabular as tabular

    path = _workbook(tmp_path / "m.xlsx", _rows(200))
    monkeypatch.setattr(tabular, "MAX_SHEET_PART_BYTES", 10_000, raising=False)
    with pytest.raises(ManifestError, match=r"its part xl/worksheets/sheet1.xml unpacks to .* more than the "
                                            r"10,000 bytes covreport reads from a workbook part -- export"):
        read_manifest(path, check_images=False)
    monkeypatch.setattr(tabular, "MAX_SHEET_PART_BYTES", 128 << 20, raising=False)
    monkeypatch.setattr(tabular, "MAX_SHEET_CELLS", 1_000, raising=False)
    with pytest.raises(ManifestError, match=r"holds more than 1,000 filled cells"):
        read_manifest(path, check_images=False)
    # A stray cell far right makes a table of rows x columns, refused before it is built.
    monkeypatch.setattr(tabular, "MAX_SHEET_CELLS", 5_000, raising=False)
    far = _edit_part(_workbook(tmp_path / "far.xlsx", _rows(200)), SHEET, lambda xml: xml.replace(
        "</sheetData>", '<row r="300"><c r="AMJ300" t="inlineStr"><is><t>x</t></is></c></row></sheetData>'))
    with pytest.raises(ManifestError, match=r"reach column AMJ \(cell AMJ300\), 206,848 cells, more than the 5,000"):
        read_manifest(far, check_images=False)


# --------------------------------------------------------------------------
# Identifiers: no invisible character, no two that look alike


def _csv(tmp_path, lines, name="m.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("char", ["\u2064", "\U000e0041", "\u034f", "\u00ad", "\ufe0f", "\u180e", "\u3164"])
@pytest.mark.parametrize("column", ["patient_id", "pair_id", "first_image"])
def test_every_invisible_character_is_refused_in_id_and_path_columns(tmp_path, char, column):
    rows = {"pair_id": "k2", "patient_id": "P2", "first_image": "c.png"}
    rows[column] = rows[column][:1] + char + rows[column][1:]
    path = _csv(tmp_path, ["pair_id,patient_id,first_image,second_image,outcome", "k1,P1,a.png,b.png,Worse",
                           f"{rows['pair_id']},{rows['patient_id']},{rows['first_image']},d.png,Stable"])
    with pytest.raises(ManifestError) as err:
        read_manifest(path, check_images=False)
    text = str(err.value)
    # as repr writes it (\\xad, \\u2064, \\U000e0041), and the printable ones escaped too (\\u034f)
    escaped = f"\\u{ord(char):04x}" if char.isprintable() else repr(char)[1:-1]
    assert f"line 3, column '{column}': " in text and escaped in text and f"U+{ord(char):04X}" in text, text
    assert char not in text


def test_look_alike_patient_ids_are_refused_naming_both_lines(tmp_path):
    lines = ["pair_id,patient_id,first_image,second_image,outcome"]
    lines += [f"k{i},P0{i},{i}a.png,{i}b.png,Worse" for i in range(5)]
    lines += ["k9,\u042001,9a.png,9b.png,Stable"]  # Cyrillic ER, then 01: "looks like" P01 of line 3
    with pytest.raises(ManifestError) as err:
        read_manifest(_csv(tmp_path, lines), check_images=False)
    assert (f"{tmp_path / 'm.csv'} line 7, column 'patient_id': '\u042001' looks the same as 'P01' on line 3 "
            "(characters from another script) -- write the same id the same way") in str(err.value)


def test_look_alike_pair_ids_and_paths_are_refused(tmp_path):
    path = _csv(tmp_path, ["pair_id,patient_id,first_image,second_image,outcome",
                           "pO1,P1,img/a.png,img/b.png,Worse",
                           "p01,P2,img/\u0430.png,img/c.png,Stable"])  # Cyrillic a
    with pytest.raises(ManifestError) as err:
        read_manifest(path, check_images=False)
    text = str(err.value)
    assert "line 3, column 'pair_id': 'p01' looks the same as 'pO1' on line 2 (look-alike characters)" in text
    assert ("line 3, column 'first_image': 'img/\u0430.png' looks the same as 'img/a.png' (first_image, line 2; "
            "characters from another script)") in text
    # Paths may hold 0 and O, 1 and l: only letters of another script make two paths look alike.
    ok = _csv(tmp_path, ["patient_id,first_image,second_image,outcome", "P1,img_0.png,img_1.png,Worse",
                         "P2,img_O.png,img_l.png,Stable"], "ok.csv")
    assert len(read_manifest(ok, check_images=False).pairs) == 2


def test_export_ids_are_checked_too(tmp_path):
    from covreport.pairs import build_pairs

    def export(rows):
        path = tmp_path / "export.csv"
        path.write_text("patientid,date,view,path\n" + "\n".join(rows) + "\n", encoding="utf-8")
        return path

    same = export(["p1,2020-01-01,PA,a.png", "p1,2020-01-02,PA,b.png",
                   "\u04401,2020-01-01,PA,c.png", "\u04401,2020-01-03,PA,d.png"])  # Cyrillic er
    with pytest.raises(ManifestError, match=r"line 4, column 'patientid': '\u04401' looks the same as 'p1' on line 2 "
                                            r"\(characters from another script\)"):
        build_pairs(same)
    hidden = export([f"q{i},2020-01-0{1 + i % 2},PA,q{i}.png" for i in range(40)] + [
                     "p1,2020-01-01,PA,a.png", "p1,2020-01-02,PA,b.png",
                     "p\u20642,2020-01-01,PA,c.png", "p2\x1b]0;x\x07,2020-01-03,PA,d\U000e0041.png"])
    with pytest.raises(ManifestError) as err:
        build_pairs(hidden)
    text = str(err.value)
    assert "line 44, column 'patientid': 'p\\u20642'" in text and "U+2064" in text, text
    assert "line 45, column 'patientid': 'p2\\x1b]0;x\\x07'" in text, text
    assert "line 45, column 'path': 'd\\U000e0041.png'" in text, text
    assert "\x1b" not in text and "\u2064" not in text and "\U000e0041" not in text
    # A header echoed in a message is escaped too.
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("pat\x1b[2Jient,date,view,path\n" + "p1,2020-01-01,PA,a.png\n" * 20, encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        build_pairs(bad_header)
    assert "pat\\x1b[2Jient" in str(err.value) and "\x1b" not in str(err.value)


def test_study_fields_refuse_bidi_and_control_characters(tmp_path):
    from covreport.study import read_study

    study = tmp_path / "study.toml"
    for text, code in (("Trial \u202eevil", "U+202E"), ("x\u2066y", "U+2066"), ("red \x1b[31m", "U+001B"),
                       ("a\u200bb", "U+200B")):
        toml = "".join(c if c.isascii() and c.isprintable() else f"\\u{ord(c):04x}" for c in text)
        study.write_text(f'title = "Study"\nfunding = ["none", "{toml}"]\n', encoding="utf-8")
        with pytest.raises(ReportError, match=rf"study.toml: field 'funding' holds the invisible or control "
                                              rf"character {re.escape(code)}"):
            read_study(study)
    study.write_text('"\\u001b[31mred" = "x"\n', encoding="utf-8")
    with pytest.raises(ReportError) as err:
        read_study(study)
    assert "unknown field '\\x1b[31mred'" in str(err.value) and "\x1b" not in str(err.value)
    study.write_text('title = "Line one\\nline two\\tand a tab"\n', encoding="utf-8")
    assert read_study(study)["title"] == "Line one\nline two\tand a tab"  # prose keeps its breaks


def test_previous_results_refuse_bidi_and_control_characters(tmp_path):
    from covreport.revalidation import load_results

    path = tmp_path / "results.json"
    for data, fragment in (
        ({"provenance": {"created": "2024\u202e-01-01"}}, "provenance.created: holds the invisible or control "
                                                          "character U+202E"),
        ({"provenance": {}, "pairs": [{"patient_id": "P\u20641"}]}, "pairs[0].patient_id: holds the invisible"),
        ({"provenance": {}, "x\x1b]0;t\x07": 1}, "x\\x1b]0;t\\x07: the key holds the invisible or control "
                                                  "character U+001B"),
    ):
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ReportError) as err:
            load_results(path)
        assert fragment in str(err.value) and "\x1b" not in str(err.value), str(err.value)


# --------------------------------------------------------------------------
# Every input a bounded regular file


_READERS = textwrap.dedent("""
    import json, sys
    from covreport.errors import CovreportError
    from covreport.manifest import read_manifest
    from covreport.pairs import read_column_map, read_images
    from covreport.revalidation import load_results
    from covreport.study import read_study
    readers = {"manifest": lambda p: read_manifest(p, check_images=False), "export": read_images,
               "map": read_column_map, "study": read_study, "previous": load_results}
    out = {}
    for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
        try:
            readers[kind](path)
            out[kind] = "read"
        except CovreportError as exc:
            out[kind] = str(exc)
    print(json.dumps(out))
""")

_NAMES = {"manifest": "m.csv", "export": "export.csv", "map": "map.toml", "study": "study.toml",
          "previous": "results.json"}


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_fifo_or_device_input_is_refused_at_once(tmp_path, kind):
    args = []
    for reader, name in _NAMES.items():
        path = tmp_path / name
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        args += [reader, str(path)]
    start = time.perf_counter()
    out = json.loads(_child(_READERS, args, tmp_path, timeout=60).stdout.strip().splitlines()[-1])
    assert time.perf_counter() - start < 45
    what = "a named pipe (FIFO)" if kind == "fifo" else "a character device"
    for reader, name in _NAMES.items():
        assert f"{tmp_path / name} is {what}, not a regular file" in out[reader], (reader, out[reader])


def test_oversized_inputs_are_refused_before_reading(tmp_path):
    from covreport.pairs import read_column_map
    from covreport.revalidation import load_results
    from covreport.study import read_study

    for name, reader, fragment in (("study.toml", read_study, "a study file may be"),
                                   ("map.toml", read_column_map, "a --map file may be"),
                                   ("results.json", load_results, "a results may be")):
        path = tmp_path / name
        with open(path, "wb") as fh:  # sparse: no disk used
            fh.truncate(200 << 20)
        with pytest.raises((ReportError, ManifestError), match=fragment):
            reader(path)


def test_previous_results_with_millions_of_values_are_refused_before_parsing(tmp_path):
    from covreport.revalidation import load_results

    path = tmp_path / "results.json"
    path.write_text('{"provenance": {}, "x": [' + ",".join(["[]"] * 2_100_000) + "]}", encoding="utf-8")
    with pytest.raises(ReportError, match=r"holds 2,100,00\d objects and lists, more than the 2,000,000"):
        load_results(path)


def test_previous_results_memory_error_is_reported_as_memory(tmp_path, monkeypatch):
    import covreport.revalidation as revalidation

    path = tmp_path / "results.json"
    path.write_text('{"provenance": {}}', encoding="utf-8")

    def no_memory(*_a, **_k):
        raise MemoryError

    monkeypatch.setattr(revalidation.json, "loads", no_memory)
    with pytest.raises(ReportError) as err:
        revalidation.load_results(path)
    assert "too large to read into memory" in str(err.value) and "nested" not in str(err.value)


def test_deep_toml_is_an_error_not_a_traceback(tmp_path):
    from covreport.pairs import read_column_map
    from covreport.study import read_study

    for name, reader in (("study.toml", read_study), ("map.toml", read_column_map)):
        path = tmp_path / name
        path.write_text("title = " + "[" * 50_000 + "]" * 50_000 + "\n", encoding="utf-8")
        with pytest.raises((ReportError, ManifestError), match="nested too deeply"):
            reader(path)


def test_memory_error_reading_a_table_is_a_manifest_error_saying_memory(tmp_path, monkeypatch):
    import covreport.pairs as pairs
    import covreport.tabular as tabular

    def no_memory(*_a, **_k):
        raise MemoryError

    manifest = _csv(tmp_path, ["patient_id,first_image,second_image,outcome", "P1,a.png,b.png,Worse"])
    monkeypatch.setattr(tabular, "decode", no_memory)
    monkeypatch.setattr(pairs, "decode", no_memory)
    with pytest.raises(ManifestError, match="too large to validate in the memory available"):
        read_manifest(manifest, check_images=False)
    with pytest.raises(ManifestError, match="too large to read in the memory available -- split the image export"):
        pairs.read_images(manifest)
