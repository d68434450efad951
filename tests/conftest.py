"""Shared pytest configuration. Area-specific fixtures live beside their tests.

Tests write only under pytest's temporary folders: never into the checkout
(the user's ``covreport-demo/`` and ``model/`` included) nor into the user's
score cache, which :func:`_private_score_cache` points at a temporary folder.
"""

import pytest

# As the CLI does, before torch is imported: OMP_NUM_THREADS = the cores this
# process may use and OMP_WAIT_POLICY=PASSIVE (covreport/_threads.py), so that
# torch and BLAS neither oversubscribe the 2-core CI machine nor spin.
import os

from covreport import _threads

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: each gets its share of
# threads, so that two trainings at once do not run 4 threads on 2 cores (measured: 7x slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, _threads.available_cpus()
                                            // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
_threads.prepare_environment()


@pytest.fixture(scope="session", autouse=True)
def _private_score_cache(tmp_path_factory):
    """The default score cache of every test lives in a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVREPORT_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(autouse=True)
def _same_working_folder():
    """A test that changes the working folder must undo it (``monkeypatch.chdir``): a passing test's
    ``tmp_path`` is deleted when it ends (pyproject's retention policy), and a worker left inside it would
    fail every later test with FileNotFoundError."""
    before = os.getcwd()
    yield
    try:
        after = os.getcwd()
    except FileNotFoundError:
        after = None
    if after != before:
        os.chdir(before)
        pytest.fail(f"the test left the working folder at {after}; use monkeypatch.chdir")


@pytest.fixture(scope="session")
def phantom_demo(tmp_path_factory):
    """``covreport demo`` run once per session in a temporary folder (trains the phantom model).

    Returns the demo's :class:`covreport.demo.DemoResult`; its folder
    (``result.report.parent``) holds the phantom study, the trained weights
    (``model/densenet121-phantom.pt``) and the score cache, for any test that
    needs a trained phantom model.
    """
    from covreport.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("covreport-demo"), progress=False)
