"""Thread and worker counts under a busy CPU (issue 14.9): covreport._threads."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from covreport import _threads

REPO = Path(__file__).resolve().parents[1]


def test_prepare_environment_sets_passive_wait_and_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(_threads, "available_cpus", lambda: 3)
    env = {}
    _threads.prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "3"}
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    _threads.prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1", "KMP_BLOCKTIME": "0"}


def test_available_cpus_is_the_affinity():
    assert _threads.available_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 0), (4, 0), (8, 2), (16, 4), (64, 4)])
def test_cpu_workers_leave_the_cores_to_the_training_threads(monkeypatch, cpus, workers):
    monkeypatch.setattr(_threads, "available_cpus", lambda: cpus)
    assert _threads.cpu_workers() == workers
    assert _threads.cpu_workers(3) == 3  # asked for: kept


@pytest.mark.parametrize("cpus, workers, processes, threads", [(2, 0, 1, 2), (8, 2, 1, 6), (2, 0, 2, 1),
                                                                (1, 2, 1, 1), (16, 4, 2, 6)])
def test_configure_torch_never_asks_for_more_threads_than_cores(monkeypatch, cpus, workers, processes, threads):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(_threads, "available_cpus", lambda: cpus)
    monkeypatch.setenv("OMP_NUM_THREADS", str(cpus))          # as prepare_environment sets it
    try:
        assert _threads.configure_torch(workers, processes=processes) == threads
        assert torch.get_num_threads() == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "1")            # the user's (or a test runner's) limit holds
        assert _threads.configure_torch(workers, processes=processes) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "junk")         # not a count: ignored
        assert _threads.configure_torch(workers, processes=processes) == threads
    finally:
        torch.set_num_threads(before)


def _python(code, *prefix, env=None):
    env = dict(os.environ if env is None else env)
    for key in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_the_command_line_sets_the_environment_torch_starts_with():
    code = ("import os, covreport.cli, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), "
            "len(os.sched_getaffinity(0)))")
    policy, threads, cpus = _python(code)
    assert policy == "PASSIVE"
    assert int(threads) <= int(cpus)


def test_importing_the_library_changes_no_environment():
    code = "import os; before = dict(os.environ); import covreport.pipeline; print(dict(os.environ) == before)"
    assert _python(code) == ["True"]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_one_allowed_core_gives_one_thread():
    code = "import os, covreport.cli, torch; print(torch.get_num_threads(), len(os.sched_getaffinity(0)))"
    threads, cpus = _python(code, "taskset", "-c", "0")
    assert (threads, cpus) == ("1", "1")
