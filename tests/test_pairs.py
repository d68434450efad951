"""Tests of covreport.pairs and `covreport pairs`.

Nothing here is a statistic: the expected pairs, ties and counts are worked
out by hand from the small exports written in each test (the reference is
the export itself, read by eye), and the output manifest is checked by the
manifest reader of issue 2 (covreport.manifest.read_manifest).
"""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.constants import STAGE_NO_REFERENCE
from covreport.errors import ManifestError
from covreport.manifest import read_manifest
from covreport.pairs import build_pairs, normalize_view, parse_filter, read_column_map, write_pairs

#: The header of ieee8023/covid-chestxray-dataset metadata.csv (current
#: layout, trailing comma included), copied from the repository's file.
IEEE_HEADER = (
    "patientid,offset,sex,age,finding,RT_PCR_positive,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,other_notes,"
)


def _ieee_row(pid, offset, sex, age, finding, view, modality, date, filename, notes=""):
    cells = [pid, offset, sex, age, finding, "Y", "", "", "", "", "", "", "", "", "", "", "", "",
             view, modality, date, '"Hospital, City"', "images", filename, "", "", "", notes, "", ""]
    return ",".join(cells)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _simple_export(tmp_path, rows, header="patient_id,date,view,path,age,sex"):
    return _write(tmp_path / "images.csv", header + "\n" + "\n".join(rows) + "\n")


# --------------------------------------------------------------------------
# ordering, ties, views


def test_orders_by_date_and_pairs_each_image_with_the_next(tmp_path):
    # Rows deliberately out of order; expected by hand: P1 a<b<c -> 2 pairs, P2 x<y -> 1 pair.
    export = _simple_export(tmp_path, [
        "P1,2020-03-05,AP,img/b.png,54,M",
        "P2,2020-04-02,PA,img/y.png,61,F",
        "P1,2020-03-09,AP,img/c.png,54,M",
        "P1,2020-03-02,AP,img/a.png,54,M",
        "P2,2020-04-01,PA,img/x.png,61,F",
    ])
    pairs, report = build_pairs(export)
    assert list(pairs["pair_id"]) == ["P1-1", "P1-2", "P2-1"]
    assert list(pairs["first_image"]) == ["img/a.png", "img/b.png", "img/x.png"]
    assert list(pairs["second_image"]) == ["img/b.png", "img/c.png", "img/y.png"]
    assert list(pairs["first_date"]) == ["2020-03-02", "2020-03-05", "2020-04-01"]
    assert list(pairs["second_date"]) == ["2020-03-05", "2020-03-09", "2020-04-02"]
    assert (pairs["outcome"] == "").all()
    assert list(pairs["age"]) == ["54", "54", "61"]
    assert list(pairs["sex"]) == ["M", "M", "F"]
    assert report["ties"] == []
    assert report["pairs"] == report["pairs_new"] == 3
    assert report["patients"] == report["patients_with_pairs"] == 2
    assert report["order_by"] == "date"


def test_patients_in_natural_order_and_offsets(tmp_path):
    # Patient '10' after '2' (natural order); offsets written as given, negative allowed.
    export = _simple_export(tmp_path, [
        "10,-1,AP,a10.png", "10,4.5,AP,b10.png", "2,3,AP,b2.png", "2,0,AP,a2.png",
    ], header="patient,offset,view,image")
    pairs, report = build_pairs(export)
    assert list(pairs["pair_id"]) == ["2-1", "10-1"]
    assert list(pairs["first_offset_days"]) == ["0", "-1"]
    assert list(pairs["second_offset_days"]) == ["3", "4.5"]
    assert report["order_by"] == "offset_days"


def test_ties_broken_by_path_reported_and_noted(tmp_path):
    # Two images of P1 share 2020-03-05: ordered by path (img/b1 < img/b2), reported, noted.
    export = _simple_export(tmp_path, [
        "P1,2020-03-02,AP,img/a.png,,",
        "P1,2020-03-05,AP,img/b2.png,,",
        "P1,2020-03-05,AP,img/b1.png,,",
        "P1,2020-03-09,AP,img/c.png,,",
    ])
    pairs, report = build_pairs(export)
    assert list(zip(pairs["first_image"], pairs["second_image"])) == [
        ("img/a.png", "img/b1.png"), ("img/b1.png", "img/b2.png"), ("img/b2.png", "img/c.png")]
    assert report["ties"] == [{"patient_id": "P1", "order_by": "date", "order_key": "2020-03-05",
                               "images": ["img/b1.png", "img/b2.png"], "lines": [4, 3]}]
    assert all(n.startswith("tie: images with the same date") for n in pairs["notes"])
    # Deterministic: the same export in another row order gives the same manifest.
    export2 = _simple_export(tmp_path, [
        "P1,2020-03-09,AP,img/c.png,,", "P1,2020-03-05,AP,img/b1.png,,",
        "P1,2020-03-05,AP,img/b2.png,,", "P1,2020-03-02,AP,img/a.png,,",
    ])
    pairs2, _ = build_pairs(export2)
    pd.testing.assert_frame_equal(pairs, pairs2)


@pytest.mark.parametrize("raw,expected", [
    ("AP", "AP"), ("ap", "AP"), ("AP Supine", "AP Supine"), ("AP supine", "AP Supine"),
    ("AP_SUPINE", "AP Supine"), ("APS", "AP Supine"), ("PA", "PA"), ("L", "Lateral"),
    ("Lateral", "Lateral"), ("AP Erect", "AP"), ("Axial", None), ("Coronal", None), ("", None), (None, None),
])
def test_normalize_view(raw, expected):
    assert normalize_view(raw) == expected


def test_view_filtering(tmp_path):
    export = _simple_export(tmp_path, [
        "P1,2020-03-01,AP,a.png,,", "P1,2020-03-02,L,a_lat.png,,", "P1,2020-03-03,AP supine,b.png,,",
        "P1,2020-03-04,PA,c.png,,", "P1,2020-03-05,Axial,ct.png,,", "P1,2020-03-06,,noview.png,,",
    ])
    pairs, report = build_pairs(export)
    assert list(pairs["first_image"]) == ["a.png", "b.png"]
    assert list(pairs["second_image"]) == ["b.png", "c.png"]
    assert list(pairs["first_view"]) == ["AP", "AP Supine"]
    assert list(pairs["second_view"]) == ["AP Supine", "PA"]
    assert report["excluded_counts"] == {"view 'L' not kept": 1, "view 'Axial' not kept": 1, "no view": 1}
    # PA and AP only (any spelling): a.png -> c.png
    pairs, _ = build_pairs(export, views=["pa", "ap"])
    assert list(zip(pairs["first_image"], pairs["second_image"])) == [("a.png", "c.png")]
    # views=None keeps every row whatever its view: 6 images, 5 pairs
    pairs, report = build_pairs(export, views=None)
    assert len(pairs) == 5 and report["excluded"] == []
    with pytest.raises(ManifestError, match=r"--views: 'oblique' is not a view -- use AP, AP Supine, PA or Lateral"):
        build_pairs(export, views=["oblique"])


def test_excluded_rows_are_reported_with_their_line(tmp_path):
    export = _simple_export(tmp_path, [
        "P1,2020-03-01,AP,a.png,,", "P1,,AP,nodate.png,,", ",2020-03-02,AP,nopatient.png,,",
        "P1,2020-03-03,AP,,,", "P1,2020-03-04,AP,a.png,,", "P1,2020-03-05,AP,b.png,,",
    ])
    pairs, report = build_pairs(export)
    assert [(r["line"], r["reason"]) for r in report["excluded"]] == [
        (3, "no date"), (4, "no patient id"), (5, "no image path"), (6, "same image as line 2")]
    assert len(pairs) == 1 and report["images_eligible"] == 2 and report["images_in_export"] == 6


def test_bad_age_and_sex_are_left_blank_with_a_warning(tmp_path):
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,200,X", "P1,2020-03-02,AP,b.png,,"])
    pairs, report = build_pairs(export)
    assert pairs.loc[0, "age"] == "" and pairs.loc[0, "sex"] == ""
    assert report["warnings"] == [
        f"1 age not a number from 0 to 120 (first: {export} line 2, '200'): left blank in the manifest",
        f"1 sex code not M, F, Male or Female (first: {export} line 2, 'X'): left blank in the manifest",
    ]


# --------------------------------------------------------------------------
# errors


def test_missing_column_suggests_the_close_one(tmp_path):
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png"], header="patientid,date,view,path")
    with pytest.raises(ManifestError) as exc:
        build_pairs(export, columns={"patient_id": "patient"})
    assert str(exc.value) == (
        f"{export} line 1, column 'patient': missing (the patient's id) -- did you mean 'patientid'? "
        "map the right column with --patient-col or a --map file (the header has: patientid, date, view, path)")


def test_no_order_column(tmp_path):
    export = _simple_export(tmp_path, ["P1,AP,a.png"], header="patient_id,view,path")
    with pytest.raises(ManifestError) as exc:
        build_pairs(export)
    assert str(exc.value) == (
        f"{export} line 1: no column to order the images by -- name the date column with --date-col or the "
        "day-offset column with --offset-col (the header has: patient_id, view, path)")


def test_unparsable_dates_are_listed_with_line_and_column(tmp_path):
    export = _simple_export(tmp_path, [
        "P1,2020-03-01,AP,a.png,,", "P1,03/04/2020,AP,b.png,,", "P1,2020,AP,c.png,,",
        "P1,not a date,L,lat.png,,",  # excluded by its view: not checked
        "P1,1850-01-01,AP,old.png,,",  # outside the manifest's date range
        "P1,20200306,AP,basic.png,,",  # ISO 8601 basic form: fine
    ])
    with pytest.raises(ManifestError) as exc:
        build_pairs(export)
    fix = ("write full dates in ISO 8601, YYYY-MM-DD (e.g. 2020-03-14), give their format with --date-format "
           "(e.g. '%d/%m/%Y'), or order by a day offset with --offset-col; dates from 1900-01-01 to 2199-12-31")
    # issue 21.5: one message for all the dates, with their lines, not one long message per date
    assert str(exc.value) == f"{export} column 'date': 3 dates not read (lines 3, 4, 6; first: '03/04/2020') -- {fix}"
    # with the format given, they parse (03/04/2020 = 3 April, day first); the year-only row stays an error
    with pytest.raises(ManifestError, match=r"4 dates not read \(lines 2, 4, 6, 7; first: '2020-03-01'\)"):
        build_pairs(export, date_format="%d/%m/%Y")


def test_image_under_two_patients_is_left_out_with_a_warning(tmp_path):
    # a.png under P1 and P2: both rows left out; P2 still has b.png -> c.png.
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P2,2020-03-02,AP,a.png,,",
                                       "P2,2020-03-03,AP,b.png,,", "P2,2020-03-04,AP,c.png,,",
                                       "P1,2020-03-05,AP,a.png,,"])
    pairs, report = build_pairs(export)
    assert list(zip(pairs["first_image"], pairs["second_image"])) == [("b.png", "c.png")]
    why = "image listed under two patients: 'P1' (line 2), 'P2' (line 3)"
    assert [(r["line"], r["reason"]) for r in report["excluded"]] == [(2, why), (3, why), (6, why)]
    assert report["warnings"] == [
        f"1 image listed under two or more patients (first: {export} line 2, 'a.png'): left out; an image "
        "belongs to one patient, so correct the export"]


def test_no_pairs_is_an_error(tmp_path):
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P2,2020-03-02,AP,b.png,,",
                                       "P2,2020-03-03,L,c.png,,"])
    with pytest.raises(ManifestError) as exc:
        build_pairs(export)
    assert str(exc.value) == (
        f"{export}: no pairs -- no patient has two eligible images (2 of 3 rows eligible; excluded: "
        "view 'L' not kept: 1); check --views, --filter and the column mapping")


@pytest.mark.parametrize("text,expected", [
    ("finding~COVID-19", ("finding", "~", ("COVID-19",))),
    ("modality = X-ray", ("modality", "=", ("X-ray",))),
    ("view!=L|LL", ("view", "!=", ("L", "LL"))),
])
def test_parse_filter(text, expected):
    assert parse_filter(text) == expected


def test_bad_filter():
    with pytest.raises(ManifestError, match=r"--filter 'finding': not understood -- write COLUMN=VALUE"):
        parse_filter("finding")


# --------------------------------------------------------------------------
# update


def test_update_keeps_outcomes_and_appends_only_new_pairs(tmp_path):
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,50,M", "P1,2020-03-03,AP,c.png,50,M",
                                       "P2,2020-04-01,AP,x.png,70,F", "P2,2020-04-02,AP,y.png,70,F"])
    first, _ = build_pairs(export)
    manifest = tmp_path / "pairs.csv"
    first["outcome"] = ["W", ""]  # a reader labelled P1-1 only
    first.loc[0, "notes"] = "reader 1 and 2 agree"
    write_pairs(first, manifest)

    # New images arrive: P1 b.png between a and c, P1 d.png after c, a new patient P3.
    export = _simple_export(tmp_path, [
        "P1,2020-03-01,AP,a.png,50,M", "P1,2020-03-02,AP,b.png,50,M", "P1,2020-03-03,AP,c.png,50,M",
        "P1,2020-03-04,AP,d.png,50,M", "P2,2020-04-01,AP,x.png,70,F", "P2,2020-04-02,AP,y.png,70,F",
        "P3,2020-05-01,PA,p.png,33,F", "P3,2020-05-02,PA,q.png,33,F",
    ])
    pairs, report = build_pairs(export, previous=manifest)
    # Kept verbatim first (the labelled P1-1 a->c no longer arises but is kept), then the new pairs.
    assert list(pairs["pair_id"]) == ["P1-1", "P2-1", "P1-2", "P1-3", "P1-4", "P3-1"]
    assert pairs.loc[0, "outcome"] == "W" and pairs.loc[0, "notes"] == "reader 1 and 2 agree"
    assert list(zip(pairs["first_image"], pairs["second_image"]))[2:] == [
        ("a.png", "b.png"), ("b.png", "c.png"), ("c.png", "d.png"), ("p.png", "q.png")]
    assert (pairs["outcome"].iloc[1:] == "").all()
    assert report["pairs_kept"] == 2 and report["pairs_kept_labelled"] == 1 and report["pairs_new"] == 4
    assert [(s["pair_id"], s["outcome"], s["line"]) for s in report["stale"]] == [("P1-1", "W", 2)]
    assert report["dropped"] == []
    assert report["new_pair_ids"] == ["P1-2", "P1-3", "P1-4", "P3-1"]

    # Nothing new: the same export again appends nothing and keeps every row.
    write_pairs(pairs, manifest)
    again, report = build_pairs(export, previous=manifest)
    pd.testing.assert_frame_equal(again, pairs)
    assert report["pairs_new"] == 0


def test_update_drops_only_unlabelled_superseded_pairs(tmp_path):
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P1,2020-03-03,AP,c.png,,"])
    first, _ = build_pairs(export)
    manifest = tmp_path / "pairs.csv"
    write_pairs(first, manifest)  # P1-1 a->c, not labelled yet
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P1,2020-03-02,AP,b.png,,",
                                       "P1,2020-03-03,AP,c.png,,"])
    pairs, report = build_pairs(export, previous=manifest)
    assert list(pairs["pair_id"]) == ["P1-2", "P1-3"]  # P1-1 is not reused for another pair
    assert [d["pair_id"] for d in report["dropped"]] == ["P1-1"]
    assert report["stale"] == []


def test_update_keeps_pairs_of_patients_absent_from_the_export(tmp_path):
    manifest = _write(tmp_path / "pairs.csv", "patient_id,first_image,second_image,outcome\n"
                                              "S1,sirm/1.png,sirm/2.png,\n")
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P1,2020-03-02,AP,b.png,,"])
    pairs, report = build_pairs(export, previous=manifest)
    # No pair_id column in the old manifest: its rows are numbered as read_manifest numbers them.
    assert list(pairs["pair_id"]) == ["1", "P1-1"]
    assert list(pairs.columns[:4]) == ["pair_id", "patient_id", "first_image", "second_image"]
    assert report["stale"][0]["reason"] == "patient not among the export's eligible images"


def test_update_refuses_an_invalid_manifest(tmp_path):
    manifest = _write(tmp_path / "pairs.csv", "patient_id,first_image,second_image,outcome\nP1,a.png,b.png,Wrose\n")
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P1,2020-03-02,AP,b.png,,"])
    with pytest.raises(ManifestError, match=r"line 2, column 'outcome': 'Wrose' -- use Worse, Stable or Improved"):
        build_pairs(export, previous=manifest)


# --------------------------------------------------------------------------
# ieee8023 preset, paths, round trip


def _ieee_export(tmp_path):
    rows = [
        _ieee_row("2", "0", "M", "65", "Pneumonia/Viral/COVID-19", "PA", "X-ray", '"January 22, 2020"',
                  "auntminnie-a.jpeg", '"Chest radiograph, admission"'),
        _ieee_row("2", "3", "M", "65", "Pneumonia/Viral/COVID-19", "PA", "X-ray", '"January 25, 2020"',
                  "auntminnie-b.jpeg"),
        _ieee_row("2", "3", "M", "65", "Pneumonia/Viral/COVID-19", "L", "X-ray", '"January 25, 2020"',
                  "auntminnie-b-L.jpeg"),
        _ieee_row("2", "5", "M", "65", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "2020", "auntminnie-c.jpeg"),
        _ieee_row("3", "4", "M", "74", "Pneumonia/Viral/SARS", "AP", "X-ray", "2004", "SARS-a.jpeg"),
        _ieee_row("3", "9", "M", "74", "Pneumonia/Viral/SARS", "AP", "X-ray", "2004", "SARS-b.jpeg"),
        _ieee_row("17", "3", "M", "54", "Pneumonia/Viral/COVID-19", "AP", "X-ray", "2020", "jkms-a.jpg"),
        _ieee_row("17", "9", "M", "54", "Pneumonia/Viral/COVID-19", "AP supine", "X-ray", "2020", "jkms-b.jpg"),
        _ieee_row("17", "9", "M", "54", "Pneumonia/Viral/COVID-19", "Axial", "CT", "2020", "jkms-d.jpg"),
        _ieee_row("18", "", "F", "", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "2020", "nooffset.jpeg"),
    ]
    return _write(tmp_path / "metadata.csv", IEEE_HEADER + "\n" + "\n".join(rows) + "\n")


def test_ieee8023_preset(tmp_path):
    export = _ieee_export(tmp_path)
    pairs, report = build_pairs(export, preset="ieee8023", filters=["finding~COVID-19"])
    assert list(pairs["pair_id"]) == ["2-1", "2-2", "17-1"]
    assert list(pairs["first_image"]) == ["images/auntminnie-a.jpeg", "images/auntminnie-b.jpeg", "images/jkms-a.jpg"]
    assert list(pairs["second_image"]) == ["images/auntminnie-b.jpeg", "images/auntminnie-c.jpeg", "images/jkms-b.jpg"]
    assert list(pairs["first_offset_days"]) == ["0", "3", "3"]
    assert list(pairs["second_view"]) == ["PA", "AP Supine", "AP Supine"]
    assert set(pairs["source"]) == {"ieee8023/covid-chestxray-dataset"}
    assert "first_date" not in pairs  # the preset orders by offset: ieee8023 dates are often a year only
    assert report["excluded_counts"] == {
        "view 'L' not kept": 1, "filtered out (finding ~ COVID-19)": 2,
        "filtered out (modality = X-ray)": 1, "no day offset": 1}
    assert report["columns"]["image"] == ["folder", "filename"]


def test_output_round_trips_through_read_manifest(tmp_path):
    export = _ieee_export(tmp_path)
    pairs, _ = build_pairs(export, preset="ieee8023", filters=["finding~COVID-19"])
    out = tmp_path / "pairs.csv"
    write_pairs(pairs, out)
    m = read_manifest(out, check_images=False)
    assert list(m.pairs["pair_id"]) == ["2-1", "2-2", "17-1"]
    assert m.pairs["outcome"].isna().all()
    assert list(m.exclusions["stage"]) == [STAGE_NO_REFERENCE] * 3  # empty outcomes: exclusions, not errors
    assert list(m.pairs["interval_days"]) == [3.0, 2.0, 6.0]
    assert list(m.pairs["age"]) == [65.0, 65.0, 54.0]
    assert list(m.pairs["second_view"]) == ["PA", "AP Supine", "AP Supine"]
    assert m.pairs["first_path"].iloc[0] == str(tmp_path / "images" / "auntminnie-a.jpeg")
    # Labelled, it validates with --strict semantics too.
    text = out.read_text().replace("2-1,2,images/auntminnie-a.jpeg,images/auntminnie-b.jpeg,,",
                                   "2-1,2,images/auntminnie-a.jpeg,images/auntminnie-b.jpeg,Worse,")
    out.write_text(text)
    assert read_manifest(out, check_images=False).pairs["outcome"].iloc[0] == "Worse"


def test_paths_are_rewritten_for_the_manifests_folder(tmp_path):
    export = _ieee_export(tmp_path)
    (tmp_path / "study").mkdir()
    pairs, _ = build_pairs(export, preset="ieee8023", filters=["finding~COVID-19"], out_dir=tmp_path / "study")
    assert pairs["first_image"].iloc[0] == "../images/auntminnie-a.jpeg"
    out = tmp_path / "study" / "pairs.csv"
    write_pairs(pairs, out)
    m = read_manifest(out, check_images=False)
    assert m.pairs["first_path"].iloc[0] == str(tmp_path / "images" / "auntminnie-a.jpeg")


def test_column_map_files(tmp_path):
    toml = _write(tmp_path / "map.toml", '[columns]\npatient = "Subject"\nimage = ["dir", "file"]\n'
                                         'date = "Acquired"\n')
    csvmap = _write(tmp_path / "map.csv", "manifest_column,export_column\npatient_id,Subject\npath,dir\n"
                                          "path,file\ndate,Acquired\n")
    expected = {"patient_id": "Subject", "image": ("dir", "file"), "date": "Acquired"}
    assert read_column_map(toml) == expected
    assert read_column_map(csvmap) == expected
    export = _write(tmp_path / "export.csv", "Subject;Acquired;dir;file\nA;2021-01-02;imgs;1.png\n"
                                             "A;2021-01-01;imgs;0.png\n")
    pairs, _ = build_pairs(export, columns=expected)
    assert list(zip(pairs["first_image"], pairs["second_image"])) == [("imgs/0.png", "imgs/1.png")]
    bad = _write(tmp_path / "bad.csv", "manifest_column,export_column\nward,Ward\n")
    with pytest.raises(ManifestError) as exc:
        read_column_map(bad)
    assert str(exc.value) == (f"{bad} line 2, column 'manifest_column': 'ward' is not a manifest column to map -- "
                              "use one of patient_id, image, date, offset_days, view, age, sex")


# --------------------------------------------------------------------------
# CLI


def test_cli_ieee8023_one_liner(tmp_path, monkeypatch):
    _ieee_export(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["pairs", "metadata.csv", "--preset", "ieee8023",
                                       "--filter", "finding~COVID-19", "--out", "pairs.csv"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Export      metadata.csv: 10 rows, 5 eligible (AP, AP Supine, PA; ordered by day offset)"
    assert "Ties        none" in lines
    assert "Pairs       3" in lines
    assert lines[-1] == ("Wrote pairs.csv: fill in the outcome (Worse, Stable, Improved) of the 3 new pairs, "
                         "then `covreport validate pairs.csv`.")
    assert read_manifest(tmp_path / "pairs.csv", check_images=False).pairs.shape[0] == 3


def test_cli_update_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P1,2020-03-02,AP,b.png,,"])
    runner = CliRunner()
    assert runner.invoke(main, ["pairs", "images.csv", "--out", "pairs.csv"]).exit_code == 0
    text = (tmp_path / "pairs.csv").read_text().replace("P1-1,P1,a.png,b.png,,", "P1-1,P1,a.png,b.png,Improved,")
    (tmp_path / "pairs.csv").write_text(text)
    _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P1,2020-03-02,AP,b.png,,", "P1,2020-03-02,AP,c.png,,"])
    result = runner.invoke(main, ["pairs", "images.csv", "--update", "pairs.csv", "--out", "pairs.csv", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pairs_new"] == 1 and report["pairs_kept_labelled"] == 1
    assert report["ties"][0]["images"] == ["b.png", "c.png"]
    m = read_manifest(tmp_path / "pairs.csv", check_images=False)
    assert list(m.pairs["outcome"]) == ["Improved", None]


def test_cli_errors_exit_1_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,"])
    result = CliRunner().invoke(main, ["pairs", "images.csv", "--out", "pairs.csv"])
    assert result.exit_code == 1
    assert result.output == ("Error: images.csv: no pairs -- no patient has two eligible images (1 of 1 rows "
                             "eligible; excluded: none); check --views, --filter and the column mapping\n")
    assert not (tmp_path / "pairs.csv").exists()
    result = CliRunner().invoke(main, ["pairs", "images.csv", "--out", "pairs.csv", "--patient-col", "Patient"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: images.csv line 1, column 'Patient': missing (the patient's id) -- did you mean 'patient_id'? map "
        "the right column with --patient-col or a --map file (the header has: patient_id, date, view, path, age, "
        "sex)\n")
    result = CliRunner().invoke(main, ["pairs", "missing.csv", "--out", "pairs.csv"])
    assert result.exit_code == 1
    assert result.output == "Error: missing.csv does not exist -- check the path to the image export\n"


def test_cli_help_mentions_the_one_liner():
    result = CliRunner().invoke(main, ["pairs", "--help"])
    assert result.exit_code == 0
    assert 'covreport pairs metadata.csv --preset ieee8023 --filter "finding~COVID-19" --out pairs.csv' in result.output


def test_times_kept_and_offset_breaks_date_ties(tmp_path):
    # Same date for b and c: the offset column (also mapped) orders them (c: 2 < b: 3), no tie reported.
    export = _simple_export(tmp_path, [
        "P1,2020-03-01T08:30,1,AP,a.png", "P1,2020-03-02,3,AP,b.png", "P1,2020-03-02,2,AP,c.png",
    ], header="patient_id,date,offset,view,path")
    pairs, report = build_pairs(export, columns={"date": "date", "offset_days": "offset"})
    assert list(zip(pairs["first_image"], pairs["second_image"])) == [("a.png", "c.png"), ("c.png", "b.png")]
    assert list(pairs["first_date"]) == ["2020-03-01T08:30:00", "2020-03-02"]
    assert list(pairs["first_offset_days"]) == ["1", "2"]
    assert report["ties"] == [] and (pairs["notes"] == "").all()


def test_dataframe_input_keeps_file_lines_after_filtering(tmp_path):
    from covreport.pairs import read_images

    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,", "P2,2020-03-01,AP,x.png,,",
                                       "P1,March 2,AP,b.png,,"])
    df = read_images(export)
    df = df[df["patient_id"] == "P1"].sort_values("path", ascending=False)
    with pytest.raises(ManifestError, match=rf"^{export} line 4, column 'date': 'March 2' -- "):
        build_pairs(df)


def test_filter_on_a_missing_column(tmp_path):
    export = _simple_export(tmp_path, ["P1,2020-03-01,AP,a.png,,"])
    with pytest.raises(ManifestError) as exc:
        build_pairs(export, filters=["Sex=F"])
    assert str(exc.value) == (f"{export} line 1, column 'Sex': missing (named by --filter 'Sex=F') -- did you mean "
                              "'sex'? filter on a column of the export (the header has: patient_id, date, view, "
                              "path, age, sex)")
