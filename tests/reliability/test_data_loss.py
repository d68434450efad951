"""Reliability (issue 13, items 1, 2 and 8): covreport never deletes or overwrites the user's data.

- ``run --out DIR --force`` replaces only a folder covreport wrote (it
  carries the ``.covreport-output`` marker); a folder of other files, the
  current folder, a folder holding an input, an old unmarked output are
  refused, naming what is there, and nothing is deleted;
- ``score --out FILE`` never overwrites an input, needs ``--force`` for an
  existing file, and fails before scoring when the folder is missing;
- SIGTERM during writing removes the temporary folder; leftovers of dead
  runs are cleaned up at the next start; ``--out`` through a symbolic link
  writes into its target and keeps the link; a dangling link creates nothing.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport._io import OUTPUT_MARKER
from covreport.cli import main
from reliability_helpers import HERE, covreport_cmd, make_study, manifest_images, random_scores, subprocess_env


@pytest.fixture()
def study(tmp_path):
    """A study folder: manifest, images/, scores.csv side by side (a researcher's working folder)."""
    root = tmp_path / "study"
    manifest = make_study(root, n_patients=6, images_per_patient=3, seed=5)
    scores = random_scores(manifest_images(manifest), root / "scores.csv")
    return root, manifest, scores


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None)
                  for p in Path(folder).rglob("*"))


def _run(manifest, scores, out, *extra):
    return CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out),
                                     "--permutations", "0", "--bootstrap", "0", "--no-pdf", *extra])


def _refused(res, *fragments):
    assert res.exit_code == 1, res.output
    # The last line is the error (progress bars may come before it on stderr).
    assert res.output.strip().splitlines()[-1].lstrip("\r ").startswith("Error: ") or \
        res.output.startswith("Error: "), res.output
    assert "Traceback" not in res.output, res.output
    for fragment in fragments:
        assert fragment in res.output, res.output


# --------------------------------------------------------------------------
# Item 1: --force deletes any folder


def test_force_on_the_study_folder_deletes_nothing(study):
    root, manifest, scores = study
    before = _tree(root)
    _refused(_run(manifest, scores, root, "--force"), "holds the input", "choose a separate --out")
    assert _tree(root) == before


def test_out_dot_is_refused_without_a_traceback(study, monkeypatch):
    root, manifest, scores = study
    before = _tree(root)
    monkeypatch.chdir(root)
    _refused(_run("manifest.csv", "scores.csv", ".", "--force"), "is the current folder")
    assert _tree(root) == before
    # An empty current folder is refused too (covreport would replace the folder the user is in).
    empty = root.parent / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _refused(_run(manifest, scores, ".", "--force"), "is the current folder")
    _refused(_run(manifest, scores, empty.parent, "--force"), "holds it")
    assert empty.is_dir() and _tree(root) == before


def test_force_on_an_unrelated_folder_names_its_contents_and_keeps_them(study, tmp_path):
    _, manifest, scores = study
    docs = tmp_path / "Documents"
    docs.mkdir()
    for name in ("thesis.docx", "budget.xlsx", "notes.txt"):
        (docs / name).write_text(name)
    before = _tree(docs)
    _refused(_run(manifest, scores, docs, "--force"), "was not written by covreport",
             "3 entries: budget.xlsx, notes.txt, thesis.docx", "choose another --out")
    assert _tree(docs) == before


def test_force_refuses_a_folder_holding_an_input(study, tmp_path):
    root, manifest, scores = study
    out = tmp_path / "out"
    assert _run(manifest, scores, out).exit_code == 0
    moved = out / "scores.csv"  # the user keeps the scores in the old output folder
    moved.write_bytes(scores.read_bytes())
    _refused(_run(manifest, moved, out, "--force"), f"holds the input {moved}")
    assert moved.is_file() and (out / "results.json").is_file()


def test_force_replaces_a_marked_output_and_an_empty_folder(study, tmp_path):
    _, manifest, scores = study
    out = tmp_path / "out"
    assert _run(manifest, scores, out).exit_code == 0
    assert (out / OUTPUT_MARKER).is_file()
    # A file an earlier run wrote (listed in the marker) that this run does not write: replaced.
    (out / "stale.txt").write_text("from an earlier run")
    with open(out / OUTPUT_MARKER, "a", encoding="utf-8") as fh:
        fh.write("stale.txt\n")
    res = _run(manifest, scores, out, "--force", "--previous", str(out / "results.json"))
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / OUTPUT_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(manifest, scores, empty, "--force").exit_code == 0
    assert (empty / "results.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_old_unmarked_output_is_left_to_the_user(study, tmp_path):
    _, manifest, scores = study
    out = tmp_path / "out"
    assert _run(manifest, scores, out).exit_code == 0
    (out / OUTPUT_MARKER).unlink()  # as written by covreport before the marker existed
    before = _tree(out)
    _refused(_run(manifest, scores, out, "--force"), "has no .covreport-output file",
             "If it is the output of an older covreport, delete it yourself", f"rm -r {out}")
    assert _tree(out) == before


def test_demo_style_rerun_with_force_replaces_its_own_output(study, tmp_path):
    """The demo reruns `covreport run --force` into the folder it wrote: allowed, every time."""
    from covreport.pipeline import RunOptions, run

    _, manifest, scores = study
    out = tmp_path / "demo" / "report"
    for _ in range(2):
        run(RunOptions(manifest=manifest, out=out, scores=scores, permutations=0, bootstrap=0, pdf=False,
                       force=True))
    assert (out / OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report"]


# --------------------------------------------------------------------------
# Item 2: score --out overwrites the manifest


def test_score_never_overwrites_an_input(study, tiny_weights, monkeypatch):
    import covreport.scoring as scoring

    root, manifest, _ = study
    before = manifest.read_bytes()

    def no_scoring(*a, **k):
        raise AssertionError("scoring started before the output was checked")

    monkeypatch.setattr(scoring, "score_manifest", no_scoring)
    args = ["score", str(manifest), "--weights", str(tiny_weights), "--no-progress", "--workers", "0"]
    _refused(CliRunner().invoke(main, [*args, "--out", str(manifest)]), f"would overwrite the input {manifest}")
    _refused(CliRunner().invoke(main, [*args, "--out", str(manifest), "--force"]), "would overwrite the input")
    link = root / "link.csv"  # another name for the manifest
    link.symlink_to(manifest)
    _refused(CliRunner().invoke(main, [*args, "--out", str(link), "--force"]), "would overwrite the input")
    assert manifest.read_bytes() == before
    # An image of the manifest given as the sidecar's target (OUT.json) is an input too.
    image = root / "images" / "P000_0.png"
    img_bytes = image.read_bytes()
    os.link(image, root / "s.csv.json")
    _refused(CliRunner().invoke(main, [*args, "--out", str(root / "s.csv"), "--force"]),
             "would overwrite the input")
    assert image.read_bytes() == img_bytes
    # A missing folder fails before scoring starts.
    _refused(CliRunner().invoke(main, [*args, "--out", str(root / "nope" / "s.csv")]),
             "the folder", "does not exist")


def test_score_needs_force_for_an_existing_file(study, tiny_weights, tmp_path):
    _, manifest, _ = study
    out = tmp_path / "s.csv"
    out.write_text("keep me")
    args = ["score", str(manifest), "--weights", str(tiny_weights), "--no-cache", "--no-progress",
            "--workers", "0", "--out", str(out)]
    _refused(CliRunner().invoke(main, args), f"{out} exists", "--force")
    assert out.read_text() == "keep me"
    res = CliRunner().invoke(main, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("image,")


# --------------------------------------------------------------------------
# Item 8: leftovers, SIGTERM, symbolic links


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def test_leftovers_of_dead_runs_are_removed_and_only_those(study, tmp_path):
    _, manifest, scores = study
    out = tmp_path / "out"
    dead = _dead_pid()
    leftovers = {
        f".out.tmp-{dead}-abc": True, f".out.old-{dead}": True,            # dead covreport: removed
        f".out.tmp-{os.getppid()}-xyz": False,                             # a live process: kept
        f".other.tmp-{dead}-abc": False,                                   # another destination: kept
    }
    from covreport._io import record_written_files

    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / OUTPUT_MARKER).write_text("x")
        (tmp_path / name / "results.json").write_text("{}")
    record_written_files(tmp_path / f".out.old-{dead}")  # a previous output: its marker lists its files
    forged = tmp_path / f".out.old-{_dead_pid()}"  # a one-line marker lists nothing: its files are kept
    forged.mkdir()
    (forged / OUTPUT_MARKER).write_text("This folder was written by covreport\n")
    (forged / "thesis.docx").write_text("a thesis")
    unmarked = tmp_path / f".out.tmp-{dead}-user"  # no marker: not covreport's, kept
    unmarked.mkdir()
    assert _run(manifest, scores, out).exit_code == 0
    for name, removed in leftovers.items():
        assert (tmp_path / name).exists() != removed, name
    assert unmarked.is_dir()
    assert (forged / "thesis.docx").read_text() == "a thesis"


def test_a_previous_output_moved_aside_survives_a_failed_run(study, tmp_path):
    """``.OUT.old-PID`` may be the only copy of the previous output: removed only after a successful swap."""
    import covreport.report as report

    _, manifest, scores = study
    out = tmp_path / "out"
    assert _run(manifest, scores, out).exit_code == 0
    aside = tmp_path / f".out.old-{_dead_pid()}"
    out.rename(aside)  # as a kill -9 between the two renames of the swap leaves it
    real = report.render_report
    try:
        report.render_report = lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        _refused(_run(manifest, scores, out), "No space left on device")
    finally:
        report.render_report = real
    assert (aside / "results.json").is_file() and not out.exists()
    assert _run(manifest, scores, out).exit_code == 0
    assert not aside.exists() and (out / "results.json").is_file()


def test_sigterm_during_writing_removes_the_temporary_folder(study, tmp_path):
    _, manifest, scores = study
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(HERE / "kill_at.py"), "term", "run", manifest, "--scores", scores, "--out", out,
         "--permutations", "0", "--bootstrap", "0"],
        env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_user_cache", "study"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["study"], list(tmp_path.iterdir())


def test_out_through_a_symbolic_link_writes_into_its_target(study, tmp_path):
    _, manifest, scores = study
    real = tmp_path / "real" / "out"
    assert _run(manifest, scores, real).exit_code == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    res = _run(manifest, scores, link, "--force")
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (link / "results.json").is_file() and (real / OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "study"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["out"]


def test_a_dangling_link_creates_nothing(study, tmp_path):
    _, manifest, scores = study
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing" / "out")
    _refused(_run(manifest, scores, link, "--force"), "symbolic link", "does not exist")
    assert link.is_symlink() and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "study"]


def test_out_through_a_symbolic_link_to_another_file_system(study, tmp_path):
    """The link's target is on another file system: the swap happens there, no cross-device rename."""
    from reliability_helpers import tiny_tmpfs

    _, manifest, scores = study
    with tiny_tmpfs(tmp_path / "mnt", size="32m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here")
        real = tmp_path / "mnt" / "out"
        assert _run(manifest, scores, real).exit_code == 0
        link = tmp_path / "link"
        link.symlink_to(real, target_is_directory=True)
        res = _run(manifest, scores, link, "--force")
        assert res.exit_code == 0, res.output
        assert link.is_symlink() and (real / "results.json").is_file()
        assert sorted(p.name for p in (tmp_path / "mnt").iterdir()) == ["out"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mnt", "study"]


def test_pairs_never_overwrites_the_export(tmp_path):
    export = tmp_path / "images.csv"
    export.write_text("patient_id,image,date\nP1,a.png,2020-03-01\nP1,b.png,2020-03-02\n")
    before = export.read_bytes()
    res = CliRunner().invoke(main, ["pairs", str(export), "--out", str(export)])
    _refused(res, f"would overwrite the input {export}")
    assert export.read_bytes() == before
    # The documented in-place update of a manifest still works.
    manifest = tmp_path / "pairs.csv"
    assert CliRunner().invoke(main, ["pairs", str(export), "--out", str(manifest)]).exit_code == 0
    res = CliRunner().invoke(main, ["pairs", str(export), "--update", str(manifest), "--out", str(manifest)])
    assert res.exit_code == 0, res.output


def test_demo_never_replaces_a_study_folder_it_did_not_write(tmp_path):
    """covreport demo --out X keeps a user's X/study (no phantom README.txt): refused, nothing touched."""
    from click.testing import CliRunner

    from covreport.cli import main

    mine = tmp_path / "study" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("the user's own file")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'study'} exists and is not a phantom study of covreport demo (it has no "
        "README.txt); the demo never replaces it: choose another --out or move it away")
    assert mine.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


def test_force_never_deletes_files_a_user_added_to_an_output_folder(tmp_path):
    """A covreport output folder with a user's notes added: --force refuses and names them."""
    import shutil as _sh

    from covreport.constants import DEFAULT_LABELS, feature_columns

    example = Path(__file__).resolve().parents[2] / "data_manifests" / "example" / "manifest.csv"
    _sh.copy(example, tmp_path / "manifest.csv")
    m = pd.read_csv(example)
    images = sorted(set(m["first_image"]) | set(m["second_image"]))
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"image": images, **{lab: rng.random(len(images)) for lab in DEFAULT_LABELS}})
    feats = pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())
    pd.concat([scores, feats], axis=1).to_csv(tmp_path / "scores.csv", index=False)
    args = ["-q", "run", str(tmp_path / "manifest.csv"), "--scores", str(tmp_path / "scores.csv"), "--out",
            str(tmp_path / "out"), "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--force"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, args).exit_code == 0          # its own files: replaced
    notes = tmp_path / "out" / "tables" / "my-notes.txt"
    notes.write_text("a reviewer's notes")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'out'} holds 1 file(s) covreport did not write (tables/my-notes.txt); --force "
        "would delete them: move them out of it, or choose another --out")
    assert notes.read_text() == "a reviewer's notes"
