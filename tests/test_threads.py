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
    _threads.prepare_environment(env, idle=False)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "3"}
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    _threads.prepare_environment(env, idle=False)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1", "KMP_BLOCKTIME": "0"}


def test_an_idle_cpu_gets_a_bounded_spin_unless_the_user_chose_a_wait_policy(monkeypatch):
    monkeypatch.setattr(_threads, "available_cpus", lambda: 2)
    env = {}
    _threads.prepare_environment(env, idle=True)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "2"}
    for user in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):   # either one keeps the user's wait
        env = dict(user)
        _threads.prepare_environment(env, idle=True)
        assert env == {**user, "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "2"}


@pytest.mark.parametrize("load, cpus, idle", [(0.2, 2, True), (1.4, 2, True), (1.5, 2, False), (6.0, 2, False),
                                              (0.4, 1, True), (0.5, 1, False)])
def test_the_cpu_is_idle_below_its_cores_less_half_a_core(load, cpus, idle):
    assert _threads.cpu_is_idle(load, cpus) is idle


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
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_the_command_line_sets_the_environment_torch_starts_with():
    code = ("import os, covreport.cli, torch; print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'), "
            "torch.get_num_threads(), len(os.sched_getaffinity(0)))")
    policy, spin, threads, cpus = _python(code)
    assert (policy, spin) in {("PASSIVE", "None"), ("ACTIVE", "10000")}   # busy or idle as it started
    assert int(threads) <= int(cpus)


def test_importing_the_library_changes_no_environment():
    code = "import os; before = dict(os.environ); import covreport.pipeline; print(dict(os.environ) == before)"
    assert _python(code) == ["True"]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_one_allowed_core_gives_one_thread():
    code = "import os, covreport.cli, torch; print(torch.get_num_threads(), len(os.sched_getaffinity(0)))"
    threads, cpus = _python(code, "taskset", "-c", "0")
    assert (threads, cpus) == ("1", "1")
