"""Fixtures of the reliability campaign (issue 7): network guard, tiny model.

Every test in this folder runs with the network blocked (see
``netguard/sitecustomize.py``): a connection or name lookup raises and fails
the test. ``covreport`` subprocesses get the same guard through
:func:`reliability_helpers.subprocess_env`. The score cache and the model
folder point into the test's temporary folder, never the user's.
"""

import pytest

from reliability_helpers import LABELS, TINY_SIZE, netguard


# --------------------------------------------------------------------------
# No network, no user folders


@pytest.fixture(scope="module", autouse=True)
def _network_blocked():
    """Block the network for each module of this folder (and only there), fixtures included."""
    netguard.install()
    yield
    netguard.uninstall()
    attempts = list(netguard.ATTEMPTS)
    netguard.ATTEMPTS.clear()
    assert not attempts, f"network access attempted at run time: {attempts}"


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Fail the test if anything tried to reach the network; keep caches in tmp."""
    before = list(netguard.ATTEMPTS)
    netguard.ATTEMPTS.clear()
    assert not before, f"network access attempted while preparing this test: {before}"
    monkeypatch.setenv("COVREPORT_CACHE_DIR", str(tmp_path / "_user_cache"))
    monkeypatch.setenv("COVREPORT_MODEL_DIR", str(tmp_path / "_user_model"))
    yield
    attempts = list(netguard.ATTEMPTS)
    netguard.ATTEMPTS.clear()
    assert not attempts, f"network access attempted at run time: {attempts}"


# --------------------------------------------------------------------------
# A tiny model: a real DenseNet121 (random weights) at 32x32 input


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    import torch

    from covreport.images import Preprocessing
    from covreport.model import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(LABELS)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, model, labels=LABELS, preprocessing=Preprocessing(size=TINY_SIZE),
                    metadata={"note": "random weights for the reliability tests"})
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_weights):
    from covreport.model import load_checkpoint

    return load_checkpoint(tiny_weights)


