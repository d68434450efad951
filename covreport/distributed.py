"""Scoring under torchrun: each rank scores its share of the images, rank 0 merges.

``torchrun --nproc_per_node K -m covreport score ...`` (or ``run --weights``)
starts K processes ("ranks") that read the same manifest and hash the same
image files. Then:

1. rank 0 alone reads the SQLite cache (and any shard an interrupted run left
   beside it) and tells every rank which images are still to score;
2. that list, sorted by image content hash, is split by :func:`split`: rank
   ``r`` takes items ``r, r + K, r + 2K, ...``, so the shares are disjoint,
   cover the list and hold no padding;
3. each rank scores its share on its own device (``cuda:LOCAL_RANK`` when
   CUDA is available, else the CPU). Rank 0 writes its scores into the cache
   as a one-process run does; rank ``r > 0`` writes them into its shard file
   beside the cache, ``<cache>.shard-<run>-<r>-of-<K>.sqlite``, one
   transaction per batch, so a rank that dies leaves every batch it finished;
4. after a barrier, rank 0 reads each shard of this run, checks every row as
   the cache does (:func:`covreport.cache.row_problem`), stores the rows in
   the cache, deletes the shard files of this run, and goes on alone (writes
   the scores file, or the statistics and the report of ``run``). The other
   ranks end after the barrier and write nothing else.

A rerun after a rank died (torchrun then stops the other ranks too) takes,
for the images the cache lacks, the rows the shards of that run hold (rank 0
stored its own share in the cache already), so only the missing images are
scored again, with any number of ranks or in one process. Those shards are left in place (covreport deletes only the shards
of the run that wrote them); delete them once the rerun has finished.

A shard file is an input like any other: it is opened read-only, never
unpickled, must say it is a covreport score shard (``meta`` table) and only
rows for the images asked, with these weights and preprocessing, the
model's labels and finite values in range are used. A file that fails these
checks is reported with a warning and neither merged nor deleted.

The processes talk through gloo on the CPU (the images to score, the run's
name, one barrier): a few kilobytes, so NCCL would bring nothing even when
the network runs on GPUs. Outside torchrun (``WORLD_SIZE`` unset or 1)
nothing of this runs, except that leftover shards are taken.
"""

import datetime
import hashlib
import logging
import os
import secrets
import sqlite3
import warnings
from pathlib import Path
from urllib.parse import quote

from covreport.cache import CacheKey, ScoreCache, default_cache_path, encode_rows, row_problem
from covreport.constants import N_FEATURES
from covreport.errors import ModelError, ScoresError
from covreport.inputs import regular_file, safe_text

log = logging.getLogger(__name__)

SHARD_APPLICATION = "covreport score shard"
SHARD_SCHEMA_VERSION = 1
#: How long a rank waits for the others (the plan, the barrier): ranks may finish hours apart.
TIMEOUT = datetime.timedelta(hours=24)
_CHUNK = 500  # keys per SELECT and rows per transaction
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE scores (
    image_sha256 TEXT NOT NULL, weights_sha256 TEXT NOT NULL, preprocessing TEXT NOT NULL,
    labels TEXT NOT NULL, probabilities BLOB NOT NULL, features BLOB NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (image_sha256, weights_sha256, preprocessing)) WITHOUT ROWID;
CREATE TABLE failed (
    image_sha256 TEXT NOT NULL, weights_sha256 TEXT NOT NULL, preprocessing TEXT NOT NULL,
    reason TEXT NOT NULL, PRIMARY KEY (image_sha256, weights_sha256, preprocessing)) WITHOUT ROWID
"""


def world(environ=None):
    """``(rank, local_rank, world_size)`` from torchrun's environment; ``(0, 0, 1)`` outside it.

    Raises
    ------
    ScoresError
        If ``WORLD_SIZE``, ``RANK`` or ``LOCAL_RANK`` is not a whole number
        in range.
    """
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE") or 1)
        if size <= 1:
            return 0, 0, 1
        rank = int(env.get("RANK", ""))
        local = int(env.get("LOCAL_RANK") or rank)
    except ValueError:
        raise ScoresError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    if not 0 <= rank < size or local < 0:
        raise ScoresError(f"RANK {rank} is not in 0..{size - 1} (WORLD_SIZE {size})")
    return rank, local, size


def is_main():
    """True outside torchrun and on rank 0: the process that writes the outputs."""
    return world()[0] == 0


def split(items, rank, world_size):
    """The share of rank ``rank`` of ``world_size``: items ``rank, rank + K, ...`` of ``sorted(items)``.

    The shares of ranks ``0 .. K - 1`` are disjoint and together hold every
    item once; none is padded (a rank may get one item fewer than another,
    or none when there are fewer items than ranks).

    Examples
    --------
    >>> split(["d", "a", "c", "b", "e"], 1, 2)
    ['b', 'd']
    >>> split(["a"], 1, 3)
    []
    """
    return sorted(items)[rank::world_size]


def shard_path(cache_path, run, rank, world_size):
    """``<cache>.shard-<run>-<rank>-of-<K>.sqlite``, beside the cache."""
    cache_path = Path(cache_path)
    return cache_path.with_name(f"{cache_path.name}.shard-{run}-{rank}-of-{world_size}.sqlite")


def shard_files(cache_path):
    """The files named like a shard of ``cache_path`` in its folder (sorted; their content unchecked)."""
    cache_path = Path(cache_path)
    prefix = f"{cache_path.name}.shard-"
    try:
        names = sorted(p.name for p in cache_path.parent.iterdir())
    except OSError:
        return []
    return [cache_path.parent / n for n in names if n.startswith(prefix) and n.endswith(".sqlite")]


# --------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------


class ShardWriter:
    """One rank's shard: a new SQLite file (rollback journal, no WAL: it may lie on a network file system).

    Quacks like :class:`covreport.cache.ScoreCache` for the scoring loop
    (``put_many``, ``path``); each call is one transaction.

    Raises
    ------
    ScoresError
        If the file exists already (it is never replaced) or cannot be written.
    """

    def __init__(self, path, **meta):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # never another's file
        except FileExistsError:
            raise ScoresError(f"score shard {self.path} exists already; not replaced") from None
        except OSError as exc:
            raise ScoresError(f"cannot create the score shard {self.path}: {exc.strerror or exc}; use "
                              "--cache PATH in a folder every rank can write") from None
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None)
            self._conn.execute("PRAGMA journal_mode = DELETE")
            self._conn.execute("PRAGMA synchronous = FULL")
            items = {"application": SHARD_APPLICATION, "schema_version": str(SHARD_SCHEMA_VERSION), **meta}

            def create(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in items.items()])

            self._write(create)
        except sqlite3.Error as exc:
            raise ScoresError(f"cannot write the score shard {self.path}: {exc}") from None

    def _write(self, fn):
        ScoreCache._write(self._conn, fn)

    def put_many(self, rows):
        """Store ``(key, labels, probabilities, features)`` rows (as :meth:`ScoreCache.put_many`)."""
        params = encode_rows(rows)
        try:
            self._write(lambda c: c.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)", params))
        except sqlite3.Error as exc:
            raise ScoresError(f"cannot write the score shard {self.path}: {exc}") from None
        return len(params)

    def put_failed(self, failed, weights_sha256, preprocessing):
        """Store ``{image_sha256: reason}`` for the images this rank could not score."""
        params = [(s, weights_sha256, preprocessing, str(r)) for s, r in failed.items()]
        try:
            self._write(lambda c: c.executemany("INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?)", params))
        except sqlite3.Error as exc:
            raise ScoresError(f"cannot write the score shard {self.path}: {exc}") from None

    def close(self):
        self._conn.close()


def read_shard(path, images, weights_sha256, preprocessing, labels, *, run=None):
    """The usable rows of a shard file for ``images``, checked as the cache checks its rows.

    Parameters
    ----------
    path : path
    images : sequence of str
        Image content SHA-256s wanted; rows for other images are not read.
    weights_sha256, preprocessing : str
        The cache key's other parts: rows of other weights or preprocessing
        are never read.
    labels : sequence of str
        The model's labels: a row with other labels is not used.
    run : str, optional
        The run that must have written the file (its ``meta`` says so).

    Returns
    -------
    (dict, dict)
        ``{image_sha256: (probabilities, features)}`` (float32 arrays) and
        ``{image_sha256: reason}`` for the images the rank could not score.

    Raises
    ------
    ScoresError
        If the file is not a regular file, not SQLite, not a covreport score
        shard (of ``run``), or cannot be read (e.g. a rank was killed in the
        middle of a commit, leaving a journal only a writer may roll back).
    """
    path = Path(path)
    name = safe_text(str(path))
    regular_file(path, "score shard", limit=1 << 60, error_class=ScoresError)  # SQLite reads pages lazily
    wanted = set(images)
    outputs, failed = {}, {}
    width = (4 * len(labels), 4 * N_FEATURES)
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "scores", "failed"} <= tables:
                raise ScoresError(f"{name} is not a covreport score shard (no meta, scores and failed tables)")
            meta = dict(conn.execute("SELECT key, value FROM meta LIMIT 100").fetchall())
            if (meta.get("application") != SHARD_APPLICATION
                    or meta.get("schema_version") != str(SHARD_SCHEMA_VERSION)):
                raise ScoresError(f"{name} is not a covreport score shard (schema {SHARD_SCHEMA_VERSION})")
            if run is not None and meta.get("run") != run:
                raise ScoresError(f"{name} was not written by this run ({run})")
            todo = sorted(wanted)
            for i in range(0, len(todo), _CHUNK):
                chunk = todo[i:i + _CHUNK]
                where = (f"weights_sha256 = ? AND preprocessing = ? AND image_sha256 IN "
                         f"({','.join('?' * len(chunk))})")
                for image, names, probs, feats in conn.execute(
                        "SELECT image_sha256, labels, probabilities, features FROM scores WHERE "
                        f"{where} AND length(probabilities) = ? AND length(features) = ? "
                        "AND length(labels) <= 100000",
                        [weights_sha256, preprocessing, *chunk, *width]):
                    if image not in wanted:
                        continue
                    value = ScoreCache._decode(names, probs, feats)
                    problem = "undecodable" if value is None else row_problem(value, labels, N_FEATURES)
                    if problem is not None:
                        log.warning("score shard %s: row for image %s not used (%s)", name, image, problem)
                        continue
                    outputs[image] = (value.probabilities, value.features)
                for image, reason in conn.execute(f"SELECT image_sha256, reason FROM failed WHERE {where}",
                                                  [weights_sha256, preprocessing, *chunk]):
                    if image in wanted and image not in outputs:
                        failed[image] = safe_text(reason, limit=300) if isinstance(reason, str) else "failed"
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ScoresError(f"score shard {name} cannot be read ({safe_text(exc)})") from None
    return outputs, failed


def _store(cache, outputs, weights_sha256, preprocessing, labels):
    rows = [(CacheKey(s, weights_sha256, preprocessing), labels, p, f) for s, (p, f) in outputs.items()]
    for i in range(0, len(rows), _CHUNK):
        cache.put_many(rows[i:i + _CHUNK])


def take_leftover_shards(cache, images, weights_sha256, preprocessing, labels):
    """Rows for ``images`` from shards an interrupted run left beside ``cache``, now stored in the cache.

    Files that fail :func:`read_shard`'s checks are skipped with a warning
    (not merged, not deleted). The shards themselves are left in place.

    Returns
    -------
    dict
        ``{image_sha256: (probabilities, features)}``.
    """
    found = {}
    for path in shard_files(cache.path):
        rest = [s for s in images if s not in found]
        if not rest:
            break
        try:
            outputs, _ = read_shard(path, rest, weights_sha256, preprocessing, labels)
        except ScoresError as exc:
            warnings.warn(f"{exc}; not merged into the score cache, and left in place", RuntimeWarning,
                          stacklevel=2)
            continue
        if outputs:
            _store(cache, outputs, weights_sha256, preprocessing, labels)
            found.update(outputs)
            log.warning("took %d score(s) from %s, left by a torchrun run that did not finish; "
                        "they are in the cache now and the file can be deleted", len(outputs), path)
    return found


# --------------------------------------------------------------------------
# The ranks
# --------------------------------------------------------------------------


class Shards:
    """This process's part in a torchrun scoring: its rank, device and shard file.

    Create it with :meth:`from_env`; :func:`covreport.scoring.score_images`
    calls :meth:`share`, :meth:`sink` and :meth:`finish` in that order, on
    every rank.
    """

    def __init__(self, cache_path):
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise ScoresError("this torch has no torch.distributed: score in one process (without torchrun)")
        self.rank, self.local_rank, self.world_size = world()
        self.cache_path = Path(cache_path).expanduser() if cache_path is not None else default_cache_path()
        self._owned = not dist.is_initialized()
        self._group = None  # the default group, or a gloo one beside the caller's (e.g. NCCL) group
        if self._owned:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        elif dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo", timeout=TIMEOUT)
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise ScoresError("RANK / WORLD_SIZE differ from the process group's")
        token = torch.tensor(list(secrets.token_bytes(4)), dtype=torch.uint8)
        dist.broadcast(token, src=0, group=self._group)
        self.run = bytes(token.tolist()).hex()  # names this run's shard files
        self._planned = []

    @classmethod
    def from_env(cls, cache_path, use_cache=True):
        """The :class:`Shards` of this process under torchrun (``WORLD_SIZE`` > 1), else None.

        Raises
        ------
        ScoresError
            Under torchrun without a cache: the ranks hand their scores to
            rank 0 through shard files beside it.
        """
        if world()[2] <= 1:
            return None
        if not use_cache:
            raise ScoresError("under torchrun the ranks hand their scores to rank 0 through shard files beside "
                              "the score cache: drop --no-cache (give --cache PATH in a folder every rank can "
                              "reach)")
        return cls(cache_path)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def device(self):
        """``cuda:LOCAL_RANK`` when CUDA is available (made this process's current GPU), else the CPU."""
        import torch

        if not torch.cuda.is_available():
            return torch.device("cpu")
        if self.local_rank >= torch.cuda.device_count():
            raise ModelError(f"LOCAL_RANK {self.local_rank} but {torch.cuda.device_count()} GPU(s): give "
                             "torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(self.local_rank)  # pinned memory and CUDA's context on this rank's GPU
        return torch.device(f"cuda:{self.local_rank}")

    def share(self, distinct, todo):
        """This rank's share of ``todo`` (rank 0's: the images the cache lacks; other ranks pass any list).

        ``distinct`` is every image content hash, in the order this rank
        found them; all ranks must hold the same list (checked).
        """
        import torch
        import torch.distributed as dist

        digest = torch.tensor(list(hashlib.sha256("\n".join(distinct).encode()).digest()), dtype=torch.uint8)
        every = [torch.empty_like(digest) for _ in range(self.world_size)]
        dist.all_gather(every, digest, group=self._group)
        differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
        if differ:
            raise ScoresError(f"rank {differ[0]} found other images than rank 0: every rank must read the same "
                              "manifest and image files (did a file change while the ranks started?)")
        wanted = set(todo)
        mask = torch.tensor([s in wanted for s in distinct], dtype=torch.uint8)
        if len(distinct):
            dist.broadcast(mask, src=0, group=self._group)
        self._planned = [s for s, m in zip(distinct, mask.tolist()) if m]
        return split(self._planned, self.rank, self.world_size)

    def sink(self, cache, weights_sha256, preprocessing):
        """Where this rank stores its scores: the cache on rank 0, its new shard file on the others."""
        if self.is_main:
            return cache
        return ShardWriter(shard_path(self.cache_path, self.run, self.rank, self.world_size), run=self.run,
                           rank=self.rank, world_size=self.world_size, weights_sha256=weights_sha256,
                           preprocessing=preprocessing)

    def finish(self, sink, failed, cache, weights_sha256, preprocessing, labels):
        """Wait for every rank; on rank 0 take the other ranks' shards into ``cache``.

        Parameters
        ----------
        sink : what :meth:`sink` returned
        failed : dict
            ``{image_sha256: reason}`` for the images this rank could not score.

        Returns
        -------
        (dict, dict)
            On rank 0, the other ranks' ``{image_sha256: (probabilities,
            features)}`` and ``{image_sha256: reason}``; empty on the others.

        Raises
        ------
        ScoresError
            On rank 0, if a shard of this run cannot be read or lacks images
            of its share (the rows that could be read are in the cache: a
            rerun scores only the rest).
        """
        import torch.distributed as dist

        if not self.is_main:
            sink.put_failed(failed, weights_sha256, preprocessing)
            sink.close()
        dist.barrier(group=self._group)
        if not self.is_main:
            return {}, {}
        outputs, bad, problems = {}, {}, []
        for r in range(1, self.world_size):
            share = split(self._planned, r, self.world_size)
            path = shard_path(self.cache_path, self.run, r, self.world_size)
            try:
                got, lost = read_shard(path, share, weights_sha256, preprocessing, labels, run=self.run)
            except ScoresError as exc:
                problems.append(str(exc))
                continue
            _store(cache, got, weights_sha256, preprocessing, labels)
            missing = [s for s in share if s not in got and s not in lost]
            if missing:
                problems.append(f"score shard {safe_text(str(path))} lacks {len(missing)} of the {len(share)} "
                                f"images of rank {r}")
                continue
            outputs.update(got)
            bad.update(lost)
            path.unlink()  # this run's rank r wrote it, and every row is in the cache now
        if problems:
            raise ScoresError("; ".join(problems) + ". The rows that could be read are in the score cache: run "
                              "the command again to score the rest (the files are left in place)")
        return outputs, bad

    def close(self):
        """Leave the process group if this object joined it."""
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
