"""``covreport pairs`` on the terminal: gaps, projection changes and date errors in the notes (issue 21.5)."""

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from covreport.cli import main


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _export(rows):
    Path("x.csv").write_text("patient_id,date,view,path\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return "x.csv"


def _notes(path="m.csv"):
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["pair_id"]: r["notes"] for r in csv.DictReader(fh)}


def test_a_pair_that_bridges_an_undated_image_says_so(here):
    # P1's middle image has no date: before, a.png -> c.png came with an empty notes cell.
    result = CliRunner().invoke(main, ["pairs", _export([
        "P1,2020-03-01,AP,a.png", "P1,,AP,b.png", "P1,2020-03-05,AP,c.png", "P1,2020-03-07,AP,d.png",
        "P2,2020-03-01,AP,e.png", "P2,2020-03-02,AP,f.png"]), "--out", "m.csv"])
    assert result.exit_code == 0, result.output
    assert _notes() == {
        "P1-1": "gap: b.png (line 3) of this patient has no date and was left out; it may lie between these CXRs",
        "P1-2": "", "P2-1": ""}


def test_undated_image_outside_every_pair_in_row_order_is_noted_on_every_pair_of_the_patient(here):
    result = CliRunner().invoke(main, ["pairs", _export([
        "P1,,AP,z.png", "P1,2020-03-01,AP,a.png", "P1,2020-03-05,AP,c.png", "P1,2020-03-07,AP,d.png"]),
        "--out", "m.csv"])
    assert result.exit_code == 0, result.output
    gap = "gap: z.png (line 2) of this patient has no date and was left out; it may lie between these CXRs"
    assert _notes() == {"P1-1": gap, "P1-2": gap}


def test_projection_changes_are_noted(here):
    result = CliRunner().invoke(main, ["pairs", _export([
        "P1,2020-03-01,AP,a.png", "P1,2020-03-03,PA,b.png", "P1,2020-03-05,AP supine,c.png",
        "P1,2020-03-06,AP Supine,d.png"]), "--out", "m.csv"])
    assert result.exit_code == 0, result.output
    assert _notes() == {"P1-1": "projection changes: AP to PA", "P1-2": "projection changes: PA to AP Supine",
                        "P1-3": ""}


def test_day_first_dates_give_one_error_with_the_count_and_the_format(here):
    rows = [f"P1,{d}/03/2020,AP,i{d}.png" for d in range(13, 21)]
    result = CliRunner().invoke(main, ["pairs", _export(rows), "--out", "m.csv"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: x.csv column 'date': 8 dates not read (lines 2, 3, 4, 5, 6, 7, 8, 9; first: '13/03/2020') -- "
        "they look like DD/MM/YYYY: add --date-format '%d/%m/%Y'; otherwise write full dates in ISO 8601, "
        "YYYY-MM-DD (e.g. 2020-03-14), give their format with --date-format (e.g. '%d/%m/%Y'), or order by a day "
        "offset with --offset-col; dates from 1900-01-01 to 2199-12-31\n")
    assert not Path("m.csv").exists()
    again = CliRunner().invoke(main, ["pairs", "x.csv", "--out", "m.csv", "--date-format", "%d/%m/%Y"])
    assert again.exit_code == 0, again.output


def test_month_first_and_ambiguous_dates_get_their_hint(here):
    result = CliRunner().invoke(main, ["pairs", _export(["P1,03/13/2020,AP,a.png", "P1,03/14/2020,AP,b.png"]),
                                       "--out", "m.csv"])
    assert "they look like MM/DD/YYYY: add --date-format '%m/%d/%Y'; otherwise" in result.stderr
    result = CliRunner().invoke(main, ["pairs", _export(["P1,03.04.2020,AP,a.png", "P1,04.05.2020,AP,b.png"]),
                                       "--out", "m.csv"])
    assert ("they look like DD.MM.YYYY: add --date-format '%d.%m.%Y' (or month first: --date-format "
            "'%m.%d.%Y'); otherwise") in result.stderr
