"""Reliability: faults during a run lose nothing and leave no partial output.

- ``kill -9`` during scoring, then a rerun: the cache is consistent, the
  rerun takes what was scored from the cache, and results.json equals that
  of an uninterrupted run without cache;
- ``kill -9`` while the report is written (before the PDF, before the move
  into place, between moving the old output aside and the new one in): the
  destination is absent or the previous complete output, never a partial one;
- a read-only or full output folder (a real tiny tmpfs where mounting is
  allowed, else the error simulated): ``Error: ...``, exit 1, nothing left;
- two processes sharing one cache at once: both complete with the same
  scores as an uncached run.

The subprocesses run with the network blocked (``reliability_helpers.subprocess_env``).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cache import ScoreCache
from covreport.cli import main
from reliability_helpers import (
    HERE, LABELS, cache_rows, covreport_cmd, make_study, manifest_images, netguard, random_scores,
    strip_lines, subprocess_env, tiny_tmpfs,
)

RUN_VARIANT = ("created", "command", "images_computed", "images_from_cache")


@pytest.fixture(scope="module")
def slow_weights(tmp_path_factory):
    """A DenseNet121 at 96x96 input: slow enough on one thread to be killed midway."""
    import torch

    from covreport.images import Preprocessing
    from covreport.model import build_model, save_checkpoint

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("slow") / "slow.pt"
    save_checkpoint(path, build_model(LABELS), labels=LABELS, preprocessing=Preprocessing(size=96))
    return path


@pytest.fixture(scope="module")
def study40(tmp_path_factory):
    """40 images (10 patients x 4), 30 pairs."""
    return make_study(tmp_path_factory.mktemp("study40"), n_patients=10, images_per_patient=4,
                      shape=(120, 120), seed=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 6-patient study with a random scores file (reviewer mode: no model)."""
    root = tmp_path_factory.mktemp("small")
    manifest = make_study(root, n_patients=6, images_per_patient=3, seed=5)
    scores = random_scores(manifest_images(manifest), root / "scores.csv")
    return manifest, scores


def _run_args(manifest, scores, out, *extra):
    return ["run", str(manifest), "--scores", str(scores), "--out", str(out), "--permutations", "0",
            "--bootstrap", "0", *extra]


def _no_blocked_network(stderr):
    assert netguard.MARKER not in stderr, stderr


# --------------------------------------------------------------------------
# kill -9 during scoring


@pytest.mark.slow
def test_kill_during_scoring_then_resume_gives_same_results(tmp_path, study40, slow_weights):
    cache = tmp_path / "cache.sqlite"
    out = tmp_path / "out"
    args = ["run", str(study40), "--weights", str(slow_weights), "--cache", str(cache), "--out", str(out),
            "--no-pdf", "--permutations", "0", "--bootstrap", "0"]
    env = subprocess_env(tmp_path)
    # The reference: an uninterrupted run without cache, in the same kind of process (one
    # thread: float32 sums depend on the thread count and batch size, by about 1e-6). It runs
    # alongside the run that will be killed.
    ref = tmp_path / "reference"
    reference = subprocess.Popen(
        covreport_cmd(*args[:4], "--no-cache", "--out", ref, "--no-pdf", "--permutations", "0", "--bootstrap", "0"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(covreport_cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        seen = cache_rows(cache)
        if seen >= 1:
            break
        time.sleep(0.02)
    proc.kill()  # SIGKILL
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -9, f"the run ended before it could be killed ({proc.returncode}): {stderr[-2000:]}"
    _no_blocked_network(stderr)
    cached = cache_rows(cache)
    assert 1 <= seen <= cached < 40, (seen, cached)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not leftovers, leftovers  # killed before any output was started
    with ScoreCache(cache) as c:  # consistent: opens, counts, integrity check passes
        assert len(c) == cached
        assert c._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    rerun = subprocess.run(covreport_cmd(*args), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _no_blocked_network(rerun.stderr)
    resumed = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert resumed["provenance"]["scoring"]["images_from_cache"] == cached
    assert resumed["provenance"]["scoring"]["images_computed"] == 40 - cached
    assert resumed["flow"]["images_scored"] == 40
    assert cache_rows(cache) == 40

    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err[-3000:]
    clean = json.loads((ref / "results.json").read_text(encoding="utf-8"))
    assert clean["provenance"]["scoring"] == {"images_computed": 40, "images_from_cache": 0,
                                                  "cache_rows_rejected": 0}
    # Everything but the run's own facts (time, command line, cache counts) is byte-identical.
    a = strip_lines((out / "results.json").read_text(encoding="utf-8"), RUN_VARIANT)
    b = strip_lines((ref / "results.json").read_text(encoding="utf-8"), RUN_VARIANT)
    assert a == b
    for table in sorted((ref / "tables").glob("*.csv")):
        assert (out / "tables" / table.name).read_bytes() == table.read_bytes(), table.name


# --------------------------------------------------------------------------
# kill -9 while the report is written


def _killed_run(point, args, tmp_path):
    return subprocess.Popen([sys.executable, str(HERE / "kill_at.py"), point, *args],
                            env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_kill_during_report_writing_leaves_no_partial_report(tmp_path, small):
    manifest, scores = small
    # The previous complete output, for the --force cases.
    previous = tmp_path / "previous"
    res = CliRunner().invoke(main, _run_args(manifest, scores, previous, "--no-pdf"))
    assert res.exit_code == 0, res.output
    before = (previous / "results.json").read_bytes()
    cases = {
        "pdf": (tmp_path / "a" / "out", False),
        "move": (tmp_path / "b" / "out", True),
        "swap": (tmp_path / "c" / "out", True),
    }
    procs = {}
    for point, (out, has_previous) in cases.items():
        out.parent.mkdir()
        if has_previous:
            shutil.copytree(previous, out)
        extra = ["--force"] if has_previous else []
        procs[point] = _killed_run(point, _run_args(manifest, scores, out, *extra), tmp_path)
    for point, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -9, f"{point}: not killed ({proc.returncode}): {stderr[-2000:]}"
        _no_blocked_network(stderr)
        out, has_previous = cases[point]
        if out.exists():  # only ever the previous complete output
            assert has_previous, f"{point}: a partial report at the destination"
            assert (out / "results.json").read_bytes() == before, point
            assert not (out / "report.pdf").exists() and (out / "report.html").exists()
        else:
            assert point in ("pdf", "swap"), f"{point}: destination lost"
        if point == "swap":  # the old output was moved aside: it is still there, whole
            aside = [p for p in out.parent.iterdir() if ".old-" in p.name]
            assert len(aside) == 1 and (aside[0] / "results.json").read_bytes() == before
    # A rerun succeeds despite the leftovers of the killed one.
    out = cases["swap"][0]
    res = CliRunner().invoke(main, _run_args(manifest, scores, out, "--no-pdf", "--force"))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "results.json").read_text())["flow"]["pairs_analysed"] == 12


# --------------------------------------------------------------------------
# Read-only and full output folders


def _assert_clean_error(res, *fragments):
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert res.output[res.output.find("Error: "):].startswith("Error: ") and "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in res.output, res.output


def test_read_only_output_folder(tmp_path, small, monkeypatch):
    manifest, scores = small
    folder = tmp_path / "ro"
    with tiny_tmpfs(folder, read_only=True) as mounted:
        if not mounted:  # simulate: nothing can be created in the folder
            import tempfile

            real = tempfile.mkdtemp

            def refuse(*a, dir=None, **k):
                if dir is not None and Path(dir).resolve() == folder.resolve():
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
                return real(*a, dir=dir, **k)

            monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        res = CliRunner().invoke(main, _run_args(manifest, scores, folder / "out", "--no-pdf"))
        _assert_clean_error(res, f"cannot write to {folder}", "Read-only file system", "choose another --out")
        assert not (folder / "out").exists()


def test_full_output_folder(tmp_path, small, tiny_weights, monkeypatch):
    manifest, scores = small
    folder = tmp_path / "full"
    with tiny_tmpfs(folder, size="64k") as mounted:
        if not mounted:  # simulate: every file write finds the disk full
            import covreport._io as _io

            def full(path, *a, **k):
                raise _io._write_error(Path(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                       k.get("error_class", _io.CovreportError))

            monkeypatch.setattr(_io, "atomic_write_bytes", full)
        res = CliRunner().invoke(main, _run_args(manifest, scores, folder / "out", "--no-pdf"))
        _assert_clean_error(res, "No space left on device")
        assert sorted(os.listdir(folder)) == [], os.listdir(folder)  # temporary folder removed too
        # A scores file on a full disk: the same kind of message.
        res = CliRunner().invoke(main, ["score", str(manifest), "--weights", str(tiny_weights), "--no-cache",
                                        "--out", str(folder / "scores.csv"), "--no-progress", "--workers", "0"])
        _assert_clean_error(res, f"cannot write {folder / 'scores.csv'}", "No space left on device")
        assert sorted(os.listdir(folder)) == [], os.listdir(folder)


def test_cache_on_a_full_disk_says_the_disk_is_full(tmp_path, tiny_weights, small):
    manifest, _ = small
    folder = tmp_path / "full"
    with tiny_tmpfs(folder, size="64k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here")
        try:
            with open(folder / "filler", "wb") as fh:
                fh.write(b"\0" * 64 * 1024)
        except OSError:
            pass
        res = CliRunner().invoke(main, ["score", str(manifest), "--weights", str(tiny_weights),
                                        "--cache", str(folder / "c.sqlite"), "--out", str(tmp_path / "s.csv"),
                                        "--no-progress", "--workers", "0"])
        _assert_clean_error(res, "full")
        assert "corrupt" not in res.output and "delete it" not in res.output


# --------------------------------------------------------------------------
# Two processes, one cache


@pytest.mark.slow
def test_two_runs_sharing_one_cache_at_once(tmp_path, study40, tiny_weights, tiny_loaded):
    df = pd.read_csv(study40, dtype=str, keep_default_na=False)
    halves = {"a": df.iloc[:22], "b": df.iloc[8:]}  # overlapping pairs, so overlapping images
    cache = tmp_path / "shared.sqlite"
    procs = {}
    for name, part in halves.items():
        m = study40.parent / f"manifest_{name}.csv"
        part.to_csv(m, index=False)
        # One image per transaction, so the two writers interleave many times.
        procs[name] = subprocess.Popen(
            covreport_cmd("score", m, "--weights", tiny_weights, "--cache", cache, "--out", tmp_path / f"{name}.csv",
                          "--batch-size", "1", "--workers", "0", "--no-progress"),
            env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, stderr[-3000:])
        _no_blocked_network(stderr)
        outputs[name] = stdout
    from covreport.scores_file import read_scores
    from covreport.scoring import score_images

    reference = score_images({img: study40.parent / img for img in manifest_images(study40)},
                             tiny_loaded, num_workers=0).scores.set_index("image")
    for name in halves:
        got = read_scores(tmp_path / f"{name}.csv", labels=LABELS).set_index("image")
        assert len(got) == len(set(halves[name]["first_image"]) | set(halves[name]["second_image"]))
        # Same values up to float32 rounding: the reference ran with another batch size and
        # thread count (measured differences <= 2e-6 relative; identical settings give identical bits).
        np.testing.assert_allclose(got.to_numpy(), reference.loc[got.index].to_numpy(), rtol=1e-5, atol=1e-6)
    assert cache_rows(cache) == 40
    with ScoreCache(cache) as c:
        assert c._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Each process looks the cache up once, at its start: an image both need may be scored by
    # both (a harmless race: INSERT OR REPLACE of the same key), never more than once by each.
    counts = {name: int(next(l for l in out.splitlines() if l.startswith("Scored")).split()[1])
              for name, out in outputs.items()}
    sizes = {name: len(set(h["first_image"]) | set(h["second_image"])) for name, h in halves.items()}
    assert all(counts[n] <= sizes[n] for n in counts) and sum(counts.values()) >= 40, (counts, sizes)
