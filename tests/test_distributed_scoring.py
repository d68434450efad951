"""Tests of covreport.distributed: scoring shared by torchrun ranks, merged by rank 0.

The end-to-end tests start ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m covreport score ...`` (gloo, CPU) on the tiny study of
tests/test_scoring.py (a random DenseNet121 at 32 px, 5 distinct images). The
independent reference is the same command's library function run in one
process (:func:`covreport.scoring.score_manifest`, no torchrun), into its own
cache. A dead rank is simulated twice: by the shard such a rank leaves (written
with the ranks' own writer), and by SIGKILL of rank 1 in the middle of a run.
"""

import hashlib
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from test_scoring import LABELS, _images, _manifest, loaded, weights  # noqa: F401 (fixtures)

from covreport import distributed
from covreport.cache import CacheKey, ScoreCache
from covreport.cli import main
from covreport.constants import feature_columns
from covreport.distributed import ShardWriter, read_shard, shard_files, split, take_leftover_shards, world
from covreport.errors import ScoresError
from covreport.images import image_sha256
from covreport.manifest import read_manifest
from covreport.model import load_checkpoint
from covreport.scores_file import read_scores
from covreport.scoring import score_images, score_manifest

# --------------------------------------------------------------------------
# The split and the environment
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_split_disjoint_covering_unpadded(n, k):
    items = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    shares = [split(items, r, k) for r in range(k)]
    flat = [s for share in shares for s in share]
    assert len(flat) == n                       # no padding, no duplicate
    assert set(flat) == set(items)              # every item in some share
    assert all(set(a).isdisjoint(b) for i, a in enumerate(shares) for b in shares[i + 1:])
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1         # balanced
    if k > n:
        assert sizes.count(0) == k - n          # more ranks than items: some get none
    # The same for any order of the input (every rank may find the images in its own order).
    assert [split(items[::-1], r, k) for r in range(k)] == shares


def test_world_from_environment():
    assert world({}) == (0, 0, 1)
    assert world({"WORLD_SIZE": "1", "RANK": "0"}) == (0, 0, 1)
    assert world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 1, 4)
    for env in ({"WORLD_SIZE": "2", "RANK": "x"}, {"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"},
                {"WORLD_SIZE": "2"}):
        with pytest.raises(ScoresError):
            world(env)


def test_no_cache_refused_under_torchrun(tmp_path, weights, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = CliRunner().invoke(main, ["score", str(_manifest(tmp_path)), "--weights", str(weights), "--no-cache",
                                  "--out", str(tmp_path / "s.csv")])
    assert r.exit_code == 1
    assert "under torchrun the ranks hand their scores to rank 0" in r.output
    assert not (tmp_path / "s.csv").exists()


def test_run_on_a_rank_other_than_0_returns_after_scoring(tmp_path, weights, monkeypatch):  # noqa: F811
    import covreport.scoring
    from covreport.pipeline import RunOptions, run

    calls = []

    def fake_score_manifest(manifest, loaded, **kwargs):  # what rank 1 of 2 does: its share, into its shard
        calls.append(kwargs)
        return score_images({}, loaded)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(covreport.scoring, "score_manifest", fake_score_manifest)
    out = tmp_path / "out"
    assert run(RunOptions(manifest=_manifest(tmp_path), weights=str(weights), out=out,
                          permutations=0, bootstrap=0, pdf=False)) is None
    assert len(calls) == 1 and not out.exists()


# --------------------------------------------------------------------------
# torchrun, 2 ranks on the CPU
# --------------------------------------------------------------------------


def _torchrun(tmp_path, manifest, weights, cache, out):  # noqa: F811
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "covreport", "score", str(manifest), "--weights", str(weights), "--cache", str(cache),
           "--out", str(out), "--workers", "0", "--batch-size", "2", "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _reference(tmp_path, loaded):  # noqa: F811
    m = read_manifest(tmp_path / "manifest.csv", check_images=False)
    return score_manifest(m, loaded, cache_path=tmp_path / "one-process.sqlite", num_workers=0)


def _cache_rows(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*), COUNT(DISTINCT image_sha256) FROM scores").fetchone()


def _same_scores(path, reference):
    got = read_scores(path, labels=LABELS, require_features=True)
    assert list(got["image"]) == list(reference.scores["image"])
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(float), reference.scores.iloc[:, 1:].to_numpy(float),
                               atol=1e-5, rtol=0)


def test_two_ranks_equal_one_process(tmp_path, weights, loaded):  # noqa: F811
    manifest = _manifest(tmp_path)
    reference = _reference(tmp_path, loaded)
    cache = tmp_path / "cache" / "c.sqlite"
    r = _torchrun(tmp_path, manifest, weights, cache, tmp_path / "s.csv")
    _same_scores(tmp_path / "s.csv", reference)
    assert r.stdout.count("Scores      ") == 1                 # rank 0 alone writes and reports
    assert "Scored      5 " in r.stdout and "From cache  0" in r.stdout
    assert "img/bad.png: not a recognised image format" in r.stdout
    assert "Rank 1 of 2: scoring 2 images" in r.stderr         # 5 images: 3 on rank 0, 2 on rank 1
    assert _cache_rows(cache) == (5, 5)                       # every image once
    assert shard_files(cache) == []                           # this run's shard merged and removed
    sidecar = pd.read_json(tmp_path / "s.csv.json", typ="series")
    assert (sidecar["images_scored"], sidecar["images_from_cache"], sidecar["images_failed"]) == (5, 0, 1)


def test_rerun_after_a_dead_rank_scores_only_the_missing_images(tmp_path, weights, loaded):  # noqa: F811
    manifest = _manifest(tmp_path)
    reference = _reference(tmp_path, loaded)
    cache = tmp_path / "c.sqlite"
    ScoreCache(cache).close()
    # What rank 1 of a run killed after its first batch leaves: its shard, 2 of the 5 images; the cache (rank
    # 0's part) got nothing. Written with the writer the ranks use.
    prep = loaded.preprocessing.signature()
    by_sha = {image_sha256(tmp_path / k): k for k in reference.scores["image"]}
    done = sorted(by_sha)[1::2]
    assert len(done) == 2
    rows = reference.scores.set_index("image")
    shard = distributed.shard_path(cache, "0badf00d", 1, 2)
    writer = ShardWriter(shard, run="0badf00d", rank=1, world_size=2)
    writer.put_many([(CacheKey(s, loaded.sha256, prep), LABELS, rows.loc[by_sha[s], list(LABELS)],
                      rows.loc[by_sha[s], feature_columns()]) for s in done])
    writer.close()
    before = shard.read_bytes()

    r = _torchrun(tmp_path, manifest, weights, cache, tmp_path / "s.csv")
    assert "Scored      3 " in r.stdout and "From cache  2" in r.stdout   # only the missing ones
    _same_scores(tmp_path / "s.csv", reference)
    assert _cache_rows(cache) == (5, 5)
    assert shard_files(cache) == [shard] and shard.read_bytes() == before  # not this run's: left as it was


def _rank_pids(parent, rank):
    """Pids of the descendants of ``parent`` whose environment holds ``RANK=<rank>`` (Linux /proc)."""
    found, stack = [], [parent]
    while stack:
        pid = stack.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
            if pid != parent:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if f"RANK={rank}".encode() in fh.read().split(b"\0"):
                        found.append(pid)
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the rank's process through /proc")
def test_rank_killed_mid_run_then_rerun_scores_only_the_rest(tmp_path):
    import signal
    import time

    import torch

    from covreport.images import Preprocessing
    from covreport.model import build_model, save_checkpoint

    # 20 images at 160 px, batch 1: rank 1 commits one row at a time for a few seconds.
    torch.manual_seed(0)
    weights = tmp_path / "w160.pt"
    save_checkpoint(weights, build_model(LABELS), labels=LABELS, preprocessing=Preprocessing(size=160))
    paths = _images(tmp_path / "img", n=20, seed=3)
    rows = [f"p{i},img/{a.name},img/{b.name},Worse" for i, (a, b) in enumerate(zip(paths[::2], paths[1::2]))]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,first_image,second_image,outcome\n" + "\n".join(rows) + "\n")
    cache = tmp_path / "c.sqlite"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "covreport", "score", str(manifest), "--weights", str(weights), "--cache", str(cache),
           "--out", str(tmp_path / "s.csv"), "--workers", "0", "--batch-size", "1", "--no-progress"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            shards = shard_files(cache)
            try:
                with sqlite3.connect(f"file:{shards[0]}?mode=ro", uri=True) as conn:
                    if conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0] >= 2:
                        break
            except (IndexError, sqlite3.Error):
                pass
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before rank 1 could be killed"
        victims = _rank_pids(first.pid, 1)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert first.wait(timeout=120) != 0              # torchrun stops rank 0 too and fails
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (tmp_path / "s.csv").exists()
    [shard] = shard_files(cache)
    with sqlite3.connect(f"file:{shard}?mode=ro", uri=True) as conn:
        in_shard = conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    in_cache = _cache_rows(cache)[0]
    assert in_shard >= 2 and in_shard + in_cache < 20

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Scored      {20 - in_shard - in_cache} " in r.stdout        # only what neither rank had kept
    assert f"From cache  {in_shard + in_cache}" in r.stdout
    reference = score_images({f"img/{p.name}": p for p in paths}, load_checkpoint(weights), num_workers=0)
    _same_scores(tmp_path / "s.csv", reference)
    assert _cache_rows(cache) == (20, 20)


def test_one_process_rerun_takes_a_dead_rank_shard_too(tmp_path, loaded):  # noqa: F811
    paths = _images(tmp_path / "img", n=4)
    reference = score_images(paths, loaded, num_workers=0)
    prep = loaded.preprocessing.signature()
    cache = ScoreCache(tmp_path / "c.sqlite")
    writer = ShardWriter(distributed.shard_path(cache.path, "feedbeef", 1, 3), run="feedbeef")
    rows = reference.scores.set_index("image")
    writer.put_many([(CacheKey(image_sha256(p), loaded.sha256, prep), LABELS, rows.loc[str(p), list(LABELS)],
                      rows.loc[str(p), feature_columns()]) for p in paths[:3]])
    writer.put_failed({image_sha256(paths[3]): "decoding failed"}, loaded.sha256, prep)  # retried, not taken
    writer.close()
    res = score_images(paths, loaded, cache=cache, num_workers=0)
    assert (res.scored, res.from_cache, res.failed) == (1, 3, {})
    pd.testing.assert_frame_equal(res.scores, reference.scores, check_exact=False, atol=1e-5, rtol=0)
    again = score_images(paths, loaded, cache=cache, num_workers=0)
    assert (again.scored, again.from_cache) == (0, 4)
    cache.close()


# --------------------------------------------------------------------------
# Shard files are inputs
# --------------------------------------------------------------------------


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hostile_shards_are_ignored_with_a_warning_never_merged_never_deleted(tmp_path, loaded):  # noqa: F811
    paths = _images(tmp_path / "img", n=3)
    reference = score_images(paths, loaded, num_workers=0)
    prep = loaded.preprocessing.signature()
    shas = [image_sha256(p) for p in paths]
    cache_path = tmp_path / "c.sqlite"
    name = distributed.shard_path

    garbage = name(cache_path, "aaaa0001", 1, 2)
    garbage.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    other_db = name(cache_path, "aaaa0002", 1, 2)
    with sqlite3.connect(other_db) as conn:
        conn.execute("CREATE TABLE notes (text)")
        conn.execute("INSERT INTO notes VALUES ('a file of someone else')")
    conn.close()
    a_cache = name(cache_path, "aaaa0003", 1, 2)  # a score cache, not a shard
    ScoreCache(a_cache).close()
    fifo = name(cache_path, "aaaa0004", 1, 2)
    os.mkfifo(fifo)
    bad_rows = name(cache_path, "aaaa0005", 1, 2)  # a shard whose rows are all unusable
    ShardWriter(bad_rows, run="aaaa0005").close()
    n = len(LABELS)
    ok_p, ok_f = np.full(n, 0.5, "<f4").tobytes(), np.zeros(1024, "<f4").tobytes()
    with sqlite3.connect(bad_rows) as conn:
        conn.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, 0)", [
            (shas[0], loaded.sha256, prep, '["a", "b", "c"]', ok_p, ok_f),                # other labels
            (shas[1], loaded.sha256, prep, str(list(LABELS)).replace("'", '"'),
             np.array([np.nan, 0.5, 0.5], "<f4").tobytes(), ok_f),                     # not finite
            (shas[2], loaded.sha256, prep, str(list(LABELS)).replace("'", '"'),
             np.array([1.5, 0.5, 0.5], "<f4").tobytes(), ok_f),                        # not a probability
        ])
    conn.close()
    wrong_weights = name(cache_path, "aaaa0006", 1, 2)  # valid rows, for other weights
    w = ShardWriter(wrong_weights, run="aaaa0006")
    w.put_many([(CacheKey(s, "0" * 64, prep), LABELS, np.full(n, 0.5), np.zeros(1024)) for s in shas])
    w.close()
    files = [garbage, other_db, a_cache, bad_rows, wrong_weights]
    before = {p: _digest(p) for p in files}

    with ScoreCache(cache_path) as cache, pytest.warns(RuntimeWarning) as caught:
        res = score_images(paths, loaded, cache=cache, num_workers=0)
    messages = " | ".join(str(w.message) for w in caught)
    for p in (garbage, other_db, a_cache, fifo):
        assert p.name in messages
    assert "not a covreport score shard" in messages and "not a regular file" in messages
    assert "not merged into the score cache, and left in place" in messages
    assert (res.scored, res.from_cache) == (3, 0)                   # nothing was taken from them
    pd.testing.assert_frame_equal(res.scores, reference.scores, check_exact=False, atol=1e-5, rtol=0)
    assert {p: _digest(p) for p in files} == before and fifo.exists()
    with ScoreCache(cache_path) as cache:
        got = cache.get_many([CacheKey(s, loaded.sha256, prep) for s in shas])
        assert len(got) == 3 and len(cache) == 3
        for s, p in zip(shas, paths):
            np.testing.assert_allclose(got[CacheKey(s, loaded.sha256, prep)].probabilities,
                                       reference.scores.set_index("image").loc[str(p), list(LABELS)].to_numpy(),
                                       atol=1e-5)


def test_read_shard_checks_the_run_and_skips_what_was_not_asked(tmp_path):
    labels = ("A", "B")
    shard = tmp_path / "c.sqlite.shard-12345678-1-of-2.sqlite"
    w = ShardWriter(shard, run="12345678")
    w.put_many([(CacheKey("x" * 64, "w", "p"), labels, [0.1, 0.2], np.ones(1024)),
                (CacheKey("y" * 64, "w", "p"), labels, [0.3, 0.4], np.ones(1024))])
    w.put_failed({"z" * 64: "\x1b[31mred\x1b[0m unreadable"}, "w", "p")
    w.close()
    got, failed = read_shard(shard, ["x" * 64, "z" * 64], "w", "p", labels, run="12345678")
    assert list(got) == ["x" * 64] and np.allclose(got["x" * 64][0], [0.1, 0.2])
    assert failed == {"z" * 64: "\\x1b[31mred\\x1b[0m unreadable"}   # escaped for the terminal
    assert read_shard(shard, ["x" * 64], "other weights", "p", labels) == ({}, {})
    with pytest.raises(ScoresError, match="not written by this run"):
        read_shard(shard, ["x" * 64], "w", "p", labels, run="87654321")
    with pytest.raises(ScoresError, match="exists already"):
        ShardWriter(shard, run="12345678")                           # never replaced
    assert read_shard(shard, ["x" * 64], "w", "p", labels)[0]        # still whole


def test_take_leftover_shards_without_any(tmp_path):
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        assert take_leftover_shards(cache, ["x" * 64], "w", "p", ("A",)) == {}
