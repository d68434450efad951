"""SQLite cache of model outputs, so each image is scored once per model.

A row is keyed by ``(image content SHA-256, weights SHA-256, preprocessing
signature)`` and holds the label names, the label probabilities and the
1,024 pooled features (float32 blobs). Renaming or moving an image keeps its
entry; changing a pixel, the weights or the preprocessing misses it.

Concurrency and crashes: the database runs in WAL mode with a busy timeout,
so several processes can read and write it at once, and every write is one
transaction, so a process killed at any moment leaves the cache consistent
(the rows of the interrupted transaction are simply absent).
"""

import json
import logging
import os
import sqlite3
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

from covreport.constants import N_FEATURES
from covreport.errors import ScoresError

log = logging.getLogger(__name__)

#: Schema version stored in the ``meta`` table.
SCHEMA_VERSION = 1
APPLICATION = "covreport score cache"
DEFAULT_FILENAME = "scores.sqlite"
#: Seconds a writer waits for another process's transaction before failing.
BUSY_TIMEOUT_S = 120.0
_CHUNK = 500  # keys per SELECT (SQLite's host-parameter limit is 32766 or 999)

CacheKey = namedtuple("CacheKey", ["image_sha256", "weights_sha256", "preprocessing"])
CacheKey.__doc__ = "What identifies one model output: image bytes, weights, preprocessing."

CachedScore = namedtuple("CachedScore", ["labels", "probabilities", "features"])
CachedScore.__doc__ = "A cached output: label names, float32 probabilities, float32 features."


def row_problem(value, labels, n_features=N_FEATURES):
    """Why a cached output cannot be used for a model with ``labels``, or ``None`` when it can.

    A cache file can be damaged or edited: a row is used only when it has
    the model's labels, one finite probability in ``[0, 1]`` per label and
    ``n_features`` finite features.
    """
    if tuple(value.labels) != tuple(labels):
        return "other labels"
    p, f = np.asarray(value.probabilities), np.asarray(value.features)
    if p.shape != (len(labels),):
        return f"{p.size} probabilities for {len(labels)} labels"
    if f.shape != (n_features,):
        return f"{f.size} features instead of {n_features}"
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(f))):
        return "non-finite values"
    if np.any(p < 0) or np.any(p > 1):
        return "probabilities outside [0, 1]"
    return None


def encode_rows(rows, now=None):
    """SQL parameters of ``scores`` rows: ``(image, weights, preprocessing, labels, probs, feats, created)``.

    ``rows`` as for :meth:`ScoreCache.put_many` (the score shards of
    :mod:`covreport.distributed` store the same columns). Raises ValueError
    for a probability count that is not the label count or a value that is
    not finite.
    """
    now = time.time() if now is None else now
    params = []
    for key, labels, probs, feats in rows:
        key = CacheKey(*key)
        labels = [str(v) for v in labels]
        p = np.ascontiguousarray(probs, dtype="<f4").ravel()
        f = np.ascontiguousarray(feats, dtype="<f4").ravel()
        if len(p) != len(labels):
            raise ValueError(f"{len(p)} probabilities for {len(labels)} labels")
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(f))):
            # A row no reader would use: never stored (scoring excludes such an image).
            raise ValueError(f"output for image {key.image_sha256} is not finite (NaN or infinity)")
        params.append((key.image_sha256, key.weights_sha256, key.preprocessing,
                       json.dumps(labels), p.tobytes(), f.tobytes(), now))
    return params


def default_cache_path():
    """``$COVREPORT_CACHE_DIR/scores.sqlite``, else under the user's cache folder.

    The user cache folder is :func:`platformdirs.user_cache_dir` for
    ``covreport`` (e.g. ``~/.cache/covreport`` on Linux).
    """
    env = os.environ.get("COVREPORT_CACHE_DIR")
    if env:
        return Path(env).expanduser() / DEFAULT_FILENAME
    import platformdirs

    return Path(platformdirs.user_cache_dir("covreport")) / DEFAULT_FILENAME


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    image_sha256   TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    preprocessing  TEXT NOT NULL,
    labels         TEXT NOT NULL,
    probabilities  BLOB NOT NULL,
    features       BLOB NOT NULL,
    created        REAL NOT NULL,
    PRIMARY KEY (image_sha256, weights_sha256, preprocessing)
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('application', '{APPLICATION}');
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


def _create_schema(conn):
    # One statement at a time: executescript() would commit the transaction.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


class ScoreCache:
    """The score cache (an SQLite file shared safely between processes).

    Parameters
    ----------
    path : str, path-like or None
        The database file; ``None`` for :func:`default_cache_path`. Its
        folder is created if needed.

    Raises
    ------
    ScoresError
        If the file is not a covreport cache, is corrupt (with the advice to
        delete it or use ``--cache`` elsewhere), or cannot be created.

    Examples
    --------
    >>> with ScoreCache(tmp / "c.sqlite") as cache:          # doctest: +SKIP
    ...     cache.put_many([(key, labels, probs, feats)])
    ...     cache.get_many([key])[key].probabilities
    """

    def __init__(self, path=None):
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self._conn = None
        self._pid = os.getpid()
        #: Rows found but not usable (undecodable blobs), since this object was opened.
        self.rows_rejected = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ScoresError(
                f"cannot create the score cache folder {self.path.parent}: "
                f"{exc.strerror or exc}; use --cache PATH elsewhere or --no-cache"
            ) from None
        if self.path.exists() and not self.path.is_file():
            raise ScoresError(f"score cache {self.path} is not a file; use --cache PATH elsewhere")
        self._open()

    # -- connection -------------------------------------------------------

    def _corrupt(self, exc):
        return ScoresError(
            f"score cache {self.path} is corrupt or not a covreport cache ({exc}); "
            f"delete it (it only holds scores that can be recomputed) or use "
            f"--cache PATH elsewhere (or --no-cache)"
        )

    def _sqlite_error(self, exc):
        """The ScoresError for an sqlite3 error: locked, full, unwritable or corrupt."""
        text = str(exc)
        low = text.lower()
        if "locked" in low or "busy" in low:
            return ScoresError(
                f"score cache {self.path} stayed locked by another process for "
                f"{BUSY_TIMEOUT_S:.0f} s; retry, or use --cache PATH elsewhere"
            )
        if "full" in low:
            return ScoresError(
                f"cannot write the score cache {self.path}: {text} (no space left on the "
                f"device); free some space, or use --cache PATH elsewhere or --no-cache"
            )
        if any(w in low for w in ("readonly", "read-only", "unable to open", "disk i/o",
                                  "permission", "access")):
            return ScoresError(
                f"cannot write the score cache {self.path} ({text}); use --cache PATH "
                f"elsewhere or --no-cache"
            )
        return self._corrupt(exc)

    def _open(self):
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise ScoresError(
                f"cannot open the score cache {self.path}: {exc}; use --cache PATH "
                f"elsewhere or --no-cache"
            ) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a file system without shared memory
                log.warning("score cache %s runs in %s journal mode, not WAL", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after a crash
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and not {"meta", "scores"} <= tables:
                raise ScoresError(
                    f"{self.path} is an SQLite database but not a covreport score cache "
                    f"(tables: {', '.join(sorted(tables))}); use --cache PATH elsewhere"
                )
            if not {"meta", "scores"} <= tables:
                self._write(conn, _create_schema)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except ScoresError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._sqlite_error(exc) from None
        if meta.get("application") != APPLICATION:
            conn.close()
            raise ScoresError(f"{self.path} is not a covreport score cache; use --cache PATH elsewhere")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            conn.close()
            raise ScoresError(
                f"score cache {self.path} has schema version {meta.get('schema_version')}, "
                f"this covreport uses {SCHEMA_VERSION}; delete it or use --cache PATH elsewhere"
            )
        self._conn = conn
        self._pid = os.getpid()

    @staticmethod
    def _write(conn, fn):
        """Run ``fn(conn)`` in one IMMEDIATE transaction (all or nothing)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn)
        except BaseException:
            # SQLite may already have rolled back (e.g. on a full disk); keep
            # the original error either way.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        conn.execute("COMMIT")

    def close(self):
        """Close the connection (idempotent).

        In a forked child (a DataLoader worker) the inherited connection is
        dropped without closing it: closing it there could disturb the
        parent's locks and write-ahead log.
        """
        if self._conn is not None:
            if os.getpid() == self._pid:
                self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def _connection(self):
        if self._conn is None:
            raise ScoresError(f"score cache {self.path} is closed")
        return self._conn

    # -- reading and writing ---------------------------------------------

    def get_many(self, keys):
        """Cached outputs for the keys present.

        Parameters
        ----------
        keys : iterable of CacheKey or (image_sha256, weights_sha256, preprocessing)

        Returns
        -------
        dict
            ``CacheKey -> CachedScore`` for the keys found; absent keys are
            misses. A row whose blobs do not decode is treated as a miss
            (and logged).
        """
        keys = [CacheKey(*k) for k in keys]
        found = {}
        groups = {}
        for k in keys:
            groups.setdefault((k.weights_sha256, k.preprocessing), []).append(k.image_sha256)
        conn = self._connection()
        try:
            for (weights, prep), images in groups.items():
                images = list(dict.fromkeys(images))
                for i in range(0, len(images), _CHUNK):
                    chunk = images[i:i + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = conn.execute(
                        "SELECT image_sha256, labels, probabilities, features FROM scores "
                        f"WHERE weights_sha256 = ? AND preprocessing = ? AND image_sha256 IN ({marks})",
                        [weights, prep, *chunk],
                    ).fetchall()
                    for image, labels, probs, feats in rows:
                        value = self._decode(labels, probs, feats)
                        if value is None:
                            self.rows_rejected += 1
                            log.warning("score cache %s: unreadable row for image %s ignored",
                                        self.path, image)
                            continue
                        found[CacheKey(image, weights, prep)] = value
        except sqlite3.DatabaseError as exc:
            raise self._sqlite_error(exc) from None
        return found

    @staticmethod
    def _decode(labels, probs, feats):
        if not isinstance(labels, str) or not isinstance(probs, bytes) or not isinstance(feats, bytes):
            return None
        try:
            names = tuple(json.loads(labels))
            p = np.frombuffer(probs, dtype="<f4").astype(np.float32)
            f = np.frombuffer(feats, dtype="<f4").astype(np.float32)
        except (ValueError, TypeError):
            return None
        if len(p) != len(names) or not all(isinstance(n, str) for n in names):
            return None
        return CachedScore(names, p, f)

    def put_many(self, rows):
        """Store outputs, all in one transaction.

        Parameters
        ----------
        rows : iterable of (key, labels, probabilities, features)
            ``key`` a :class:`CacheKey` (or 3-tuple); ``labels`` the label
            names; ``probabilities`` ``(L,)`` and ``features`` ``(1024,)``
            array-likes, stored as little-endian float32. An existing row with
            the same key is replaced. Every value must be finite (ValueError
            otherwise: such an output is an exclusion, not a score to keep).

        Returns
        -------
        int
            Number of rows written.
        """
        params = encode_rows(rows)
        if not params:
            return 0
        conn = self._connection()
        try:
            self._write(conn, lambda c: c.executemany(
                "INSERT OR REPLACE INTO scores (image_sha256, weights_sha256, preprocessing, "
                "labels, probabilities, features, created) VALUES (?, ?, ?, ?, ?, ?, ?)", params))
        except sqlite3.DatabaseError as exc:
            raise self._sqlite_error(exc) from None
        return len(params)

    def __len__(self):
        try:
            return int(self._connection().execute("SELECT COUNT(*) FROM scores").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise self._sqlite_error(exc) from None

    def __repr__(self):
        return f"ScoreCache({str(self.path)!r})"
