"""One parallel layer for the resampling: fixed chunks of work on joblib (loky) or a Dask cluster.

The permutation tests and the refitting bootstrap of the prediction are cut
into chunks of permutations or resamples. What a chunk returns depends on its
arguments only (each permutation and each resample is drawn from its own
place in a seeded stream), so ``results.json`` is the same for any number of
workers and any backend; only the time changes.

Where the chunks run is set for a block of code by :func:`engine` (the
command line's ``--jobs`` and ``--dask-scheduler``); without it, on this
process's cores. Locally the workers are joblib's loky processes: each is
limited to its share of the cores for BLAS and OpenMP threads (workers x
threads <= cores), they stop with the command (an error, Ctrl-C or SIGTERM
ends them at once; a worker whose parent was killed, even by SIGKILL, ends
within a second), and the temporary files joblib uses to share large arrays
are then removed by joblib's resource tracker. On a Dask
cluster the chunks run through joblib's Dask backend; the cluster's workers
need covreport installed (same version).

References
----------
.. [1] joblib: running Python functions as pipeline jobs.
   https://joblib.readthedocs.io (Parallel, parallel_config, the loky and dask backends).
"""

import contextlib
import contextvars
import os
import threading
import time
from typing import Callable, NamedTuple

from covreport import progress
from covreport.errors import CovreportError

#: Environment variable naming a Dask scheduler when ``--dask-scheduler`` is not given.
SCHEDULER_VARIABLE = "DASK_SCHEDULER_ADDRESS"

#: Seconds to wait for a Dask scheduler to answer.
CONNECT_TIMEOUT = 20

#: Without an explicit number of jobs, work of fewer items than this runs in this process
#: (starting the worker processes costs more than it saves).
PARALLEL_MIN_ITEMS = 200

_ENGINE = contextvars.ContextVar("covreport_parallel_engine", default=None)


class ParallelError(CovreportError):
    """The parallel engine cannot be set up as asked (no Dask, scheduler unreachable, bad --jobs)."""


def available_cores():
    """The cores this process may run on (its CPU affinity on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        return os.cpu_count() or 1


def check_jobs(jobs):
    """``jobs`` as a whole number >= 1, or None (the default: every available core)."""
    if jobs is None:
        return None
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParallelError(f"the number of jobs must be a whole number >= 1, got {jobs!r}")
    return jobs


@contextlib.contextmanager
def engine(jobs=None, scheduler=None):
    """Run the chunks of :func:`run_chunks` inside this block with ``jobs`` workers, or on a Dask cluster.

    Parameters
    ----------
    jobs : int, optional
        Worker processes (1: everything in this process). Default: the
        cores this process may use; on a Dask cluster, every worker of the
        cluster.
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``); default
        the :data:`SCHEDULER_VARIABLE` environment variable, else no
        cluster. Needs ``pip install 'covreport[dask]'``.
    """
    jobs = check_jobs(jobs)
    scheduler = scheduler or os.environ.get(SCHEDULER_VARIABLE) or None
    client = _connect(scheduler) if scheduler else None
    token = _ENGINE.set({"jobs": jobs, "client": client, "scheduler": scheduler})
    try:
        yield
    finally:
        _ENGINE.reset(token)
        if client is not None:
            client.close()


def _connect(address):
    try:
        from distributed import Client
    except ImportError:
        raise ParallelError(f"a Dask scheduler was given ({address}) but Dask is not installed: "
                            "pip install 'covreport[dask]'") from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ParallelError(f"could not connect to the Dask scheduler at {address} ({exc}); start it "
                            "(`dask scheduler`) or give another --dask-scheduler / "
                            f"{SCHEDULER_VARIABLE}") from None


def current():
    """The active engine: ``{"jobs", "client", "scheduler"}`` (defaults outside :func:`engine`)."""
    return _ENGINE.get() or {"jobs": None, "client": None, "scheduler": None}


def workers(jobs=None):
    """Local workers :func:`run_chunks` would use (``jobs`` overrides the engine's)."""
    jobs = check_jobs(jobs) or current()["jobs"]
    return min(jobs, available_cores()) if jobs else available_cores()


def run_chunks(func, chunks, *, sizes=None, desc=None, unit="item", jobs=None):
    """``[func(*args) for args in chunks]``, computed by the active engine's workers.

    Parameters
    ----------
    func : callable
        A module-level function (the workers import it by name).
    chunks : list of tuple
        The arguments of each call.
    sizes : list of int, optional
        Items in each chunk, for the progress bar (default 1 each).
    desc, unit : str
        Progress bar label and unit (stderr; :mod:`covreport.progress`).
    jobs : int, optional
        Overrides the engine's number of workers (1: in this process).

    Returns
    -------
    list
        The results in the order of ``chunks``, whatever order they finish in.
    """
    chunks = list(chunks)
    sizes = [1] * len(chunks) if sizes is None else list(sizes)
    state = current()
    client = state["client"]
    n = workers(jobs)
    if not (check_jobs(jobs) or state["jobs"]) and sum(sizes) < PARALLEL_MIN_ITEMS:
        n = 1                             # by default, too little work to pay for starting workers
    bar = progress.bar(None, total=sum(sizes), desc=desc, unit=unit)
    try:
        if client is None and (n == 1 or len(chunks) <= 1):
            out = []
            for args, size in zip(chunks, sizes):
                out.append(func(*args))
                bar.update(size)
            return out
        from joblib import Parallel, delayed, parallel_config

        if client is not None:
            config = parallel_config(backend="dask", client=client, n_jobs=check_jobs(jobs) or state["jobs"] or -1)
        else:
            config = parallel_config(backend="loky", n_jobs=n, inner_max_num_threads=max(1, available_cores() // n))
        out = [None] * len(chunks)
        with config:
            run = Parallel(return_as="generator_unordered")
            parent = None if client is not None else os.getpid()
            for i, res in run(delayed(_indexed)(i, parent, func, *args) for i, args in enumerate(chunks)):
                out[i] = res
                bar.update(sizes[i])
        return out
    finally:
        bar.close()


_GUARDED = set()


def _indexed(i, parent, func, *args):
    # the arguments are passed one by one, so that joblib's Dask backend sends each large array once
    progress.set_quiet(True)             # a worker never draws on the terminal
    if parent is not None and parent not in _GUARDED and os.getpid() != parent:
        _GUARDED.add(parent)
        threading.Thread(target=_orphan_guard, args=(parent,), daemon=True).start()
    return i, func(*args)


def _orphan_guard(parent):
    """A local worker whose parent died (even by SIGKILL) stops within half a second.

    loky's workers on Linux outlive a killed parent (they wait for their next
    task), holding the study's features; ending them also lets joblib's
    resource tracker remove the shared-memory files.
    """
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


#: Most items (permutations, resamples) in one chunk: the progress bar moves at least this often.
MAX_CHUNK = 20


def chunk_bounds(total, jobs=None):
    """Consecutive (start, stop) pieces of ``range(total)``: about 4 per worker, at most :data:`MAX_CHUNK` items each.

    How the work is cut changes no result (each item is computed alone); it
    only balances the workers.
    """
    total = int(total)
    if total <= 0:
        return []
    size = max(1, min(MAX_CHUNK, -(-total // (4 * workers(jobs)))))
    return [(a, min(a + size, total)) for a in range(0, total, size)]


class Plan(NamedTuple):
    """Work cut into chunks: ``func(*args)`` for each of ``chunks``, then ``finish(results)`` here."""

    func: Callable
    chunks: list
    sizes: list
    finish: Callable


def run_plans(plans, *, desc=None, unit="item", jobs=None):
    """Run the chunks of several :class:`Plan` together (one pool, one progress bar); their finished results."""
    flat = [(plan.func, *args) for plan in plans for args in plan.chunks]
    sizes = [size for plan in plans for size in plan.sizes]
    results = run_chunks(_call, flat, sizes=sizes, desc=desc, unit=unit, jobs=jobs)
    out, k = [], 0
    for plan in plans:
        out.append(plan.finish(results[k:k + len(plan.chunks)]))
        k += len(plan.chunks)
    return out


def _call(func, *args):
    return func(*args)


def shutdown():
    """Stop loky's idle worker processes now (the command line calls it when a command ends)."""
    import sys

    if "joblib" not in sys.modules:
        return
    from joblib.externals.loky import process_executor, reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if isinstance(executor, process_executor.ProcessPoolExecutor):
        executor.shutdown(wait=True, kill_workers=True)
