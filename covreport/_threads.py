"""Thread and process counts that suit the CPUs this process may use, busy or not.

On a CPU shared with other busy processes, a process that asks for more
threads than it has cores, or whose threads spin while they wait for each
other, slows down far more than its share of the CPU (issue 14.9: the
demo's training took 18 times longer beside two busy loops). So covreport:

- counts the cores it may run on (:func:`available_cpus`, from
  ``os.sched_getaffinity``: a container's or ``taskset``'s limit, not the
  machine's);
- makes OpenMP threads sleep rather than spin while they wait
  (``OMP_WAIT_POLICY=PASSIVE``, ``KMP_BLOCKTIME=0`` for Intel's runtime),
  set by :func:`prepare_environment` before torch is imported, unless the
  user set them;
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

#: Environment set before torch starts its threads, unless already set.
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def available_cpus() -> int:
    """Number of cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def prepare_environment(environ=None) -> None:
    """Set the passive OpenMP wait policy and the thread count before torch is imported.

    Leaves every variable the user set alone. ``OMP_NUM_THREADS`` defaults
    to :func:`available_cpus` (torch would otherwise count the machine's
    physical cores, which may exceed what this process may use). Has no
    effect on a torch already imported: call it first (the CLI does).
    """
    environ = os.environ if environ is None else environ
    for key, value in PASSIVE_ENV.items():
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


__all__ = ["PASSIVE_ENV", "available_cpus", "prepare_environment", "thread_cap", "cpu_workers", "configure_torch"]
