"""Thread and process counts that suit the CPUs this process may use, busy or not.

On a CPU shared with other busy processes, a process that asks for more
threads than it has cores, or whose threads spin while they wait for each
other, slows down far more than its share of the CPU (issue 14.9: the
demo's training took 18 times longer beside two busy loops). So covreport:

- counts the cores it may run on (:func:`available_cpus`, from
  ``os.sched_getaffinity``: a container's or ``taskset``'s limit, not the
  machine's);
- makes OpenMP threads sleep rather than spin while they wait
  (``OMP_WAIT_POLICY=PASSIVE``, ``KMP_BLOCKTIME=0`` for Intel's runtime) when
  the CPU is busy as covreport starts, and spin only briefly before they
  sleep when it is idle (``GOMP_SPINCOUNT=10000``, :func:`cpu_is_idle`), set
  by :func:`prepare_environment` before torch is imported, unless the user
  set them;
- gives torch's intra-op pool the available cores (``torch.set_num_threads``),
  one inter-op thread, and on a CPU decodes images in the training process
  itself unless there are cores to spare for DataLoader workers
  (:func:`cpu_workers`), so that threads plus worker processes never
  outnumber the cores.

References
----------
OpenMP Architecture Review Board. OpenMP API 5.2, section 6.7 (OMP_WAIT_POLICY).
PyTorch documentation, "CPU threading and TorchScript inference"
(torch.set_num_threads, torch.set_num_interop_threads).
"""

from __future__ import annotations

import os

#: Environment set before torch starts its threads on a busy CPU, unless already set.
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: The same on an idle CPU: a thread spins 10,000 times (microseconds) waiting for the others, then sleeps.
#: benchmarks/bench_wait_policy.py, the quick demo's training on the 2-core machine: 0.69 of the passive
#: time alone, 2.55 times it beside two busy loops (benchmarks/README.md), hence passive on a busy CPU.
BOUNDED_SPIN_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}
#: The variables that set how long an OpenMP thread spins (the user's choice of either keeps both as they are).
_WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def available_cpus() -> int:
    """Number of cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def current_load():
    """The larger of the 1-minute load average and the tasks running now besides this one (``/proc/loadavg``).

    The average lags by a minute behind work that has just started; the count of runnable tasks does not.
    None where neither can be read.
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            fields = fh.read().split()
        return max(float(fields[0]), float(fields[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_is_idle(load=None, cpus=None) -> bool:
    """True when the load (:func:`current_load`) is below the cores this process may use less half a core.

    Where the load cannot be read, the CPU counts as busy (the safe choice).
    """
    load = current_load() if load is None else load
    if load is None:
        return False
    return load < (available_cpus() if cpus is None else cpus) - 0.5


def prepare_environment(environ=None, *, idle=None) -> None:
    """Set the OpenMP wait policy and the thread count before torch is imported.

    The policy is :data:`BOUNDED_SPIN_ENV` when the CPU is idle
    (:func:`cpu_is_idle`, unless ``idle`` says), else :data:`PASSIVE_ENV`.
    Leaves every variable the user set alone (and the wait policy whole when
    the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``). ``OMP_NUM_THREADS``
    defaults to :func:`available_cpus` (torch would otherwise count the
    machine's physical cores, which may exceed what this process may use).
    Has no effect on a torch already imported: call it first (the CLI does).
    """
    environ = os.environ if environ is None else environ
    chosen = BOUNDED_SPIN_ENV if (cpu_is_idle() if idle is None else idle) else PASSIVE_ENV
    user_wait = any(key in environ for key in _WAIT_KEYS)
    for key, value in chosen.items():
        if not (user_wait and key in _WAIT_KEYS):
            environ.setdefault(key, value)
    environ.setdefault("OMP_NUM_THREADS", str(available_cpus()))


def thread_cap(environ=None):
    """``OMP_NUM_THREADS`` as a whole number >= 1 (the user's, or :func:`prepare_environment`'s), else None.

    A user (or a test runner sharing the cores between processes) who sets
    ``OMP_NUM_THREADS=1`` gets one thread, not the process's share of the cores.
    """
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def cpu_workers(requested=None) -> int:
    """DataLoader worker processes for CPU work: ``requested``, else 0 up to 4 cores, then cores // 4 (at most 4).

    Each worker is a process that needs a core while it decodes; on a CPU
    the training's own threads need every core, so on up to 4 cores images
    are decoded in the training process itself (decoding a radiograph costs
    milliseconds, a training step on a CPU seconds).
    """
    if requested is not None:
        return int(requested)
    cpus = available_cpus()
    return 0 if cpus <= 4 else min(4, cpus // 4)


def configure_torch(workers=0, processes=1) -> int:
    """Give torch's intra-op pool the available cores left over by ``workers``; return that count.

    ``processes`` is the number of such processes sharing the cores (torchrun's
    ``LOCAL_WORLD_SIZE``): each gets its share, and never more than
    ``OMP_NUM_THREADS`` (:func:`thread_cap`).

    Also asks for one inter-op thread (possible only before torch runs any
    parallel work; silently kept otherwise) and limits BLAS/OpenMP pools
    loaded by other libraries (numpy's OpenBLAS) to the same count through
    threadpoolctl.
    """
    import torch

    threads = max(1, (available_cpus() - int(workers)) // max(1, int(processes)))
    cap = thread_cap()
    if cap is not None:
        threads = min(threads, cap)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    except Exception:  # threadpoolctl is an optimisation, never a reason to fail
        pass
    return threads


__all__ = ["PASSIVE_ENV", "BOUNDED_SPIN_ENV", "available_cpus", "cpu_is_idle", "current_load", "prepare_environment",
           "thread_cap", "cpu_workers", "configure_torch"]
