"""The parallel layer (issue 23): the same results for any number of workers and any backend.

The permutation tests and the refitting bootstrap are cut into chunks
(covreport.parallel); each permutation replays one seeded stream and each
resample has its own SeedSequence child, so results.json must be byte-identical
for 1, 2 and 3 loky workers and for a Dask cluster (distributed.LocalCluster).
"""

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport import parallel
from covreport.cli import main
from covreport.constants import DEFAULT_LABELS, IMPROVED, WORSE, feature_columns
from covreport.stats.prediction import cv_bootstrap, predict_outcome
from covreport.stats.permutation import permutation_p


def _study(seed=0, n_patients=12, n_features=20):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_patients)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], sizes)
    y = (rng.random(len(groups)) < 0.55).astype(int)
    y[0], y[-1] = 1, 0
    X = rng.gamma(2.0, 0.5, (len(y), n_features))
    X[:, :4] *= 1 + 0.8 * y[:, None]
    return X, y, groups


def _dump(obj):
    return json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o), sort_keys=False)


def test_chunk_bounds_cover_the_range_once():
    for total in (0, 1, 7, 20, 21, 1000):
        for jobs in (1, 2, 3, 16):
            bounds = parallel.chunk_bounds(total, jobs)
            covered = [i for a, b in bounds for i in range(a, b)]
            assert covered == list(range(total))
            assert all(0 < b - a <= parallel.MAX_CHUNK for a, b in bounds)


def test_run_chunks_keeps_the_order_of_the_chunks():
    # math.factorial is importable by name in the workers; 3 workers finish in any order
    import math

    chunks = [(k,) for k in (30, 1, 25, 2, 28, 3)]
    for jobs in (1, 2, 3):
        assert parallel.run_chunks(math.factorial, chunks, jobs=jobs) == [math.factorial(k) for (k,) in chunks]


def test_workers_share_the_cores_for_blas_and_openmp_threads():
    # joblib's inner_max_num_threads: workers x threads never exceed the cores
    from threadpoolctl import threadpool_info

    cores = parallel.available_cores()
    infos = parallel.run_chunks(threadpool_info, [()] * 4, jobs=2)
    cap = max(1, cores // min(2, cores))
    for info in infos:
        assert info and all(lib["num_threads"] <= cap for lib in info)


def test_permutation_test_and_bootstrap_are_the_same_for_any_number_of_workers():
    X, y, groups = _study(3)
    perm = [permutation_p(X, y, groups, protocol="nested", n_permutations=45, seed=2, jobs=j) for j in (1, 2, 3)]
    assert perm[0] == perm[1] == perm[2] and perm[0]["n_permutations"] == 45
    boot = [cv_bootstrap(X, y, groups, protocol="global", n_resamples=25, seed=4, jobs=j) for j in (1, 2, 3)]
    assert _dump(boot[0]) == _dump(boot[1]) == _dump(boot[2])


def test_the_shared_penalised_engine_gives_the_same_results_for_any_number_of_workers():
    # a study above SHARED_MIN_ROWS: the penalised protocol's fits come from shared fits in every process
    from covreport.stats.penalised import SHARED_MIN_ROWS

    X, y, groups = _study(5, n_patients=110, n_features=12)
    assert len(y) >= SHARED_MIN_ROWS
    perm = [permutation_p(X, y, groups, protocol="penalised", n_permutations=4, seed=2, jobs=j) for j in (1, 2)]
    assert perm[0] == perm[1] and perm[0]["n_permutations"] == 4
    boot = [cv_bootstrap(X, y, groups, protocol="penalised", n_resamples=4, seed=4, jobs=j) for j in (1, 2)]
    assert _dump(boot[0]) == _dump(boot[1])


def test_the_permutation_stream_is_the_one_of_permuted_outcomes():
    # independent reference: the test written out as a loop over permuted_outcomes (Phipson & Smyth 2010)
    from covreport.stats.lopo import lopo_predict
    from covreport.stats.permutation import permuted_outcomes

    X, y, groups = _study(5, n_patients=9)

    def correct(yy):
        return int(((lopo_predict(X, yy, groups, protocol="global")["probabilities"] >= 0.5) == (yy == 1)).sum())

    observed = correct(y)
    b = sum(correct(yp) >= observed for yp in permuted_outcomes(y, groups, 30, seed=7))
    res = permutation_p(X, y, groups, protocol="global", n_permutations=30, seed=7, jobs=2)
    assert res["n_at_least_observed"] == b and res["p"] == (1 + b) / 31


def test_predict_outcome_is_the_same_on_loky_and_on_a_dask_cluster():
    distributed = pytest.importorskip("distributed")
    X, y, groups = _study(11, n_patients=14)
    outcome = np.where(y == 1, WORSE, IMPROVED)
    ids = [f"p{i}" for i in range(len(y))]
    kw = dict(n_permutations=30, n_bootstrap=12, seed=1)
    serial = _dump(predict_outcome(X, X[::-1] * 1.5, outcome, groups, ids, n_jobs=1, **kw))
    for jobs in (2, 3):
        assert _dump(predict_outcome(X, X[::-1] * 1.5, outcome, groups, ids, n_jobs=jobs, **kw)) == serial
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        with parallel.engine(scheduler=cl.scheduler_address):
            assert parallel.current()["client"] is not None
            on_dask = _dump(predict_outcome(X, X[::-1] * 1.5, outcome, groups, ids, **kw))
    assert on_dask == serial


@pytest.fixture
def scored_study(tmp_path):
    rng = np.random.default_rng(0)
    rows, images = [], []
    for i in range(14):
        for k in range(2):
            first, second = f"img/P{i}_{k}.png", f"img/P{i}_{k + 1}.png"
            rows.append({"patient_id": f"P{i}", "first_image": first, "second_image": second,
                         "outcome": "Worse" if (i + k) % 3 else "Improved"})
            images += [first, second]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    images = sorted(set(images))
    scores = pd.DataFrame({"image": images})
    for lab in DEFAULT_LABELS:
        scores[lab] = rng.random(len(images))
    feats = pd.DataFrame(rng.gamma(2.0, 0.5, (len(images), 1024)), columns=feature_columns())
    pd.concat([scores, feats], axis=1).to_csv(tmp_path / "scores.csv", index=False)
    return tmp_path


def _run(folder, out, *extra):
    args = ["-q", "run", str(folder / "manifest.csv"), "--scores", str(folder / "scores.csv"), "--out",
            str(folder / out), "--permutations", "25", "--bootstrap", "10", "--no-pdf", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return (folder / out / "results.json").read_bytes()


def _children():
    """Pids of this process's children (Linux /proc; empty elsewhere)."""
    me, out = str(os.getpid()), set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if pid.isdigit() and fh.read().rsplit(")", 1)[1].split()[1] == me:
                    out.add(pid)
        except OSError:
            pass
    return out


def test_results_json_is_byte_identical_for_1_2_3_jobs_and_dask(scored_study, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764633600")     # provenance.created: the same time for every run
    one = _run(scored_study, "j1", "--jobs", "1")
    before = _children()
    assert _run(scored_study, "j3", "--jobs", "3") == one
    # the command line stops loky's workers when the command ends (idle, they would wait 300 s)
    assert _children() - before == set()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        assert _run(scored_study, "dask", "--dask-scheduler", cl.scheduler_address) == one
    # verify reruns in parallel too, and regenerates every number
    res = CliRunner().invoke(main, ["-q", "verify", str(scored_study / "j3"), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "verified:" in res.output


def test_the_recorded_command_leaves_out_where_the_work_ran(monkeypatch):
    from covreport.pipeline import command_line

    monkeypatch.setattr(sys, "argv", ["covreport", "run", "m.csv", "--jobs", "4", "--dask-scheduler=tcp://h:1",
                                      "--seed", "3", "--dask-scheduler", "tcp://h:2", "--jobs=2"])
    assert command_line() == "covreport run m.csv --seed 3"


def test_bad_jobs_and_unreachable_or_missing_dask_are_clear_errors(scored_study, monkeypatch):
    res = CliRunner().invoke(main, ["run", str(scored_study / "manifest.csv"), "--scores",
                                    str(scored_study / "scores.csv"), "--jobs", "0"])
    assert res.exit_code == 2 and "'--jobs': 0 is not in the range x>=1" in res.output
    with pytest.raises(parallel.ParallelError, match="whole number >= 1"):
        parallel.check_jobs(0)
    pytest.importorskip("distributed")
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT", 1)
    args = ["run", str(scored_study / "manifest.csv"), "--scores", str(scored_study / "scores.csv"), "--out",
            str(scored_study / "never"), "--dask-scheduler", "tcp://127.0.0.1:9"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output.startswith("Error: could not connect to the Dask scheduler at tcp://127.0.0.1:9 (")
    assert not (scored_study / "never").exists()
    monkeypatch.setitem(sys.modules, "distributed", None)         # Dask not installed
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output == ("Error: a Dask scheduler was given (tcp://127.0.0.1:9) but Dask is not installed: "
                          "pip install 'covreport[dask]'\n")
    # the environment variable names the scheduler too
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:9")
    res = CliRunner().invoke(main, args[:-2])
    assert res.exit_code == 1 and "Dask is not installed" in res.output
