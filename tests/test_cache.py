"""Tests of covreport.cache.ScoreCache: round trip, keys, corruption, crashes, concurrency.

Reference: the values written (float32 round trip must be bit-exact) and
SQLite's own ``PRAGMA integrity_check`` after a process is killed.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from covreport.cache import CacheKey, ScoreCache, default_cache_path
from covreport.errors import ScoresError

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")


def _row(i, weights="w" * 64, prep="p" * 16):
    rng = np.random.default_rng(i)
    key = CacheKey(f"{i:064x}", weights, prep)
    return key, LABELS, rng.random(3, dtype=np.float32), rng.standard_normal(1024).astype(np.float32)


def test_round_trip_is_bit_exact(tmp_path):
    rows = [_row(i) for i in range(5)]
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        assert cache.put_many(rows) == 5
        assert len(cache) == 5
        got = cache.get_many([r[0] for r in rows] + [CacheKey("f" * 64, "w" * 64, "p" * 16)])
    assert set(got) == {r[0] for r in rows}  # the unknown key is a miss
    for key, labels, probs, feats in rows:
        assert got[key].labels == LABELS
        np.testing.assert_array_equal(got[key].probabilities, probs)
        np.testing.assert_array_equal(got[key].features, feats)
        assert got[key].probabilities.dtype == np.float32


def test_key_parts_all_matter_and_replace(tmp_path):
    key, labels, probs, feats = _row(1)
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        cache.put_many([(key, labels, probs, feats)])
        assert cache.get_many([(key.image_sha256, "x" * 64, key.preprocessing)]) == {}
        assert cache.get_many([(key.image_sha256, key.weights_sha256, "other")]) == {}
        cache.put_many([(key, labels, probs + 0.5, feats)])
        assert len(cache) == 1
        np.testing.assert_array_equal(cache.get_many([key])[key].probabilities, probs + 0.5)
    # Persisted: a fresh connection sees it.
    with ScoreCache(tmp_path / "c.sqlite") as again:
        assert len(again) == 1


def test_many_keys_are_chunked(tmp_path):
    rows = [_row(i) for i in range(1200)]  # more than SQLite's 999 host parameters
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        cache.put_many(rows)
        assert len(cache.get_many([r[0] for r in rows])) == 1200


def test_wal_mode(tmp_path):
    ScoreCache(tmp_path / "c.sqlite").close()
    conn = sqlite3.connect(tmp_path / "c.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_corrupt_file_says_delete_or_elsewhere(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"definitely not SQLite " * 200)
    with pytest.raises(ScoresError) as info:
        ScoreCache(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupt" in msg and "delete it" in msg and "--cache" in msg


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE patients (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ScoresError, match="not a covreport score cache"):
        ScoreCache(path)


def test_default_location(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.delenv("COVREPORT_CACHE_DIR", raising=False)
    assert default_cache_path() == \
        __import__("pathlib").Path(platformdirs.user_cache_dir("covreport")) / "scores.sqlite"
    monkeypatch.setenv("COVREPORT_CACHE_DIR", str(tmp_path / "cc"))
    with ScoreCache() as cache:
        assert cache.path == tmp_path / "cc" / "scores.sqlite"
    assert (tmp_path / "cc" / "scores.sqlite").is_file()


def test_uncreatable_folder_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("a file where the cache folder should go")
    with pytest.raises(ScoresError, match="--cache PATH elsewhere or --no-cache"):
        ScoreCache(tmp_path / "afile" / "sub" / "c.sqlite")


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from covreport.cache import CacheKey, ScoreCache
    path, start, n_tx, per_tx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cache = ScoreCache(path)
    labels = ("a", "b")
    for t in range(n_tx):
        rows = []
        for j in range(per_tx):
            i = start + t * per_tx + j
            rows.append((CacheKey(f"{i:064x}", "w", "p"), labels,
                         np.full(2, i, np.float32), np.full(1024, i, np.float32)))
        cache.put_many(rows)
        print(t, flush=True)
""")


def _writer(tmp_path, *args):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


def test_kill_9_mid_write_leaves_it_consistent(tmp_path):
    path = tmp_path / "c.sqlite"
    per_tx = 200
    proc = _writer(tmp_path, path, 0, 10_000, per_tx)
    proc.stdout.readline()  # at least one transaction committed
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # SQLite's own check, then ours: whole transactions only, every row decodes.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with ScoreCache(path) as cache:
        n = len(cache)
        assert n >= per_tx and n % per_tx == 0
        keys = [CacheKey(f"{i:064x}", "w", "p") for i in range(n)]
        got = cache.get_many(keys)
        assert len(got) == n
        assert all(float(got[k].features[0]) == i for i, k in enumerate(keys))


def test_two_processes_share_one_cache(tmp_path):
    path = tmp_path / "c.sqlite"
    ScoreCache(path).close()
    # Overlapping ranges: 0..599 and 300..899, written at the same time.
    a = _writer(tmp_path, path, 0, 30, 20)
    b = _writer(tmp_path, path, 300, 30, 20)
    a.communicate(timeout=120)
    b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0
    with ScoreCache(path) as cache:
        assert len(cache) == 900
        got = cache.get_many([CacheKey(f"{i:064x}", "w", "p") for i in range(900)])
        assert len(got) == 900


def test_sqlite_errors_are_told_apart(tmp_path):
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        full = str(cache._sqlite_error(sqlite3.OperationalError("database or disk is full")))
        assert "no space left" in full and "corrupt" not in full and "delete it" not in full
        ro = str(cache._sqlite_error(sqlite3.OperationalError("attempt to write a readonly database")))
        assert "cannot write the score cache" in ro and "corrupt" not in ro
        locked = str(cache._sqlite_error(sqlite3.OperationalError("database is locked")))
        assert "locked by another process" in locked
        bad = str(cache._sqlite_error(sqlite3.DatabaseError("database disk image is malformed")))
        assert "corrupt" in bad and "delete it" in bad
