"""Issue 18.1: --force never deletes what covreport did not write (the marker's file list, checked at the swap).

Before: a ``.covreport-output`` marker without a file list (an older
covreport's, or one line anyone can type) made ``run --force`` delete
everything in the folder (a ``thesis.docx`` and a ``data/`` folder were
lost), and a file added to the output folder while a ``--force`` run was
writing was deleted by the swap.
"""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from covreport import _io
from covreport._io import OUTPUT_MARKER, foreign_files, record_written_files, remove_written, swap_dir
from covreport.cli import main
from covreport.errors import ReportError
from reliability_helpers import make_study, manifest_images, random_scores


@pytest.fixture()
def study(tmp_path):
    root = tmp_path / "study"
    manifest = make_study(root, n_patients=6, images_per_patient=3, seed=5)
    scores = random_scores(manifest_images(manifest), root / "scores.csv")
    return manifest, scores


def _run(manifest, scores, out):
    return CliRunner().invoke(main, ["-q", "run", str(manifest), "--scores", str(scores), "--out", str(out),
                                     "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--force"])


def _users_files(folder):
    (folder / "thesis.docx").write_bytes(b"PK\x03\x04 a thesis")
    (folder / "data").mkdir()
    (folder / "data" / "cohort.csv").write_text("id\n1\n")


@pytest.mark.parametrize("marker", [
    b"This folder was written by covreport 0.9.\n",           # an older covreport: no file list
    b"x",                                                      # one line anyone can type
    b"\xff\xfe\x00garbage",                                    # does not parse
    b"This folder was written by covreport\nFiles written:\n../../etc/passwd\n",  # a list that climbs out
])
def test_a_marker_without_a_usable_file_list_makes_every_file_foreign(study, tmp_path, marker):
    manifest, scores = study
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUT_MARKER).write_bytes(marker)
    _users_files(out)
    res = _run(manifest, scores, out)
    assert res.exit_code == 1, res.output
    assert "lists no files covreport wrote" in res.output and "thesis.docx" in res.output
    assert "Traceback" not in res.output
    assert (out / "thesis.docx").read_bytes() == b"PK\x03\x04 a thesis"
    assert (out / "data" / "cohort.csv").read_text() == "id\n1\n"
    assert sorted(foreign_files(out)) == ["data", "thesis.docx"]


def test_a_marker_that_is_a_link_to_a_device_is_not_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/zero", out / OUTPUT_MARKER)
    (out / "notes.txt").write_text("mine")
    assert _io.written_files(out) is None
    assert foreign_files(out) == ["notes.txt"]


def test_an_empty_folder_of_the_user_is_foreign(tmp_path):
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "a.csv").write_text("x")
    record_written_files(out)
    (out / "my-empty-folder").mkdir()
    assert foreign_files(out) == ["my-empty-folder"]


def test_a_file_added_while_the_run_writes_is_kept_with_both_outputs(study, tmp_path, monkeypatch):
    """The check is repeated at the swap: refused, the old output and the new outputs both kept."""
    import covreport.report as report

    manifest, scores = study
    out = tmp_path / "out"
    assert _run(manifest, scores, out).exit_code == 0
    before = (out / "results.json").read_bytes()
    real = report.render_report

    def render_and_meanwhile(*args, **kwargs):
        (out / "thesis.docx").write_text("saved while the run was writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "render_report", render_and_meanwhile)
    res = _run(manifest, scores, out)
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    kept = tmp_path / f"out.new-{os.getpid()}"
    assert last.startswith("Error: ") and "thesis.docx" in last and str(kept) in last, last
    assert (out / "thesis.docx").read_text() == "saved while the run was writing"
    assert (out / "results.json").read_bytes() == before          # the old output is untouched
    assert (kept / "results.json").is_file() and (kept / "report.html").is_file()  # the new outputs kept
    assert not list(tmp_path.glob(".out.*"))


def test_a_file_arriving_between_the_check_and_the_move_is_put_back(tmp_path, monkeypatch):
    """The race after the check: the old folder is checked again once moved aside, and put back."""
    target, tmp = tmp_path / "out", tmp_path / ".out.tmp-1-x"
    for folder in (target, tmp):
        folder.mkdir()
        (folder / "results.json").write_text(folder.name)
        record_written_files(folder)
    (target / "thesis.docx").write_text("mine")
    real, calls = _io._foreign_message, []

    def first_check_misses_it(folder, out):
        calls.append(folder)
        return None if len(calls) == 1 else real(folder, out)  # the file "arrives" after the first check

    monkeypatch.setattr(_io, "_foreign_message", first_check_misses_it)
    with pytest.raises(ReportError, match="Nothing was replaced"):
        swap_dir(tmp, target, force=True, error_class=ReportError)
    assert (target / "thesis.docx").read_text() == "mine"
    assert (target / "results.json").read_text() == "out"
    assert (tmp_path / f"out.new-{os.getpid()}" / "results.json").read_text() == tmp.name


def test_remove_written_deletes_only_the_listed_files(tmp_path):
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "t.csv").write_text("x")
    (out / "results.json").write_text("{}")
    record_written_files(out)
    (out / "tables" / "mine.txt").write_text("mine")
    assert remove_written(out) == ["tables/mine.txt"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        OUTPUT_MARKER, "tables", "tables/mine.txt"]
    (out / "tables" / "mine.txt").unlink()
    assert remove_written(out) == [] and not out.exists()


def test_an_own_output_is_still_replaced(study, tmp_path):
    manifest, scores = study
    out = tmp_path / "out"
    assert _run(manifest, scores, out).exit_code == 0
    assert _run(manifest, scores, out).exit_code == 0
    assert foreign_files(out) == [] and not list(Path(tmp_path).glob("*.new-*"))
