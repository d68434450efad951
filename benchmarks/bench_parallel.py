"""Benchmark: the parallel layer (issue 23), 1 worker against every core, side by side in one run.

Run:  python benchmarks/bench_parallel.py [--permutations N] [--bootstrap N] [--big-permutations N]
                                         [--no-big | --no-small]

Prints
  (a) the 100-pair / 60-patient study (1,024 features; bench_lopo.py's
      generator, 15% Stable): ``predict_outcome`` with 1,000 permutations per
      protocol (200 for the penalised primary) and the refitting bootstrap
      (2,000 requested, 200 run), with 1 worker and with every core: wall,
      CPU seconds (this process and its workers), the ratio, and a check that
      both gave the same results (byte for byte, as JSON).
  (b) a 10,000-pair / 5,000-patient study: the nested protocol's permutation
      test with ``--big-permutations`` permutations (default 100) with 1 worker
      and with every core, the CPU seconds per permutation, and the wall time
      of 1,000 permutations extrapolated to this machine's cores and to 16.
      Goal: 1,000 permutations within 10 minutes on 16 cores.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopo import make_study  # noqa: E402

from covreport import parallel  # noqa: E402
from covreport.progress import set_quiet  # noqa: E402


def cpu_timed(fn):
    """Wall and CPU seconds of fn(), this process and its (reaped) workers."""
    t0, c0 = time.perf_counter(), os.times()
    out = fn()
    parallel.shutdown()                     # reaps the workers, so their CPU time is counted
    c1 = os.times()
    cpu = sum(getattr(c1, k) - getattr(c0, k) for k in ("user", "system", "children_user", "children_system"))
    return time.perf_counter() - t0, cpu, out


def dump(obj):
    return json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def bench_study(args, cores):
    from covreport.stats.prediction import predict_outcome

    X1, y, groups = make_study(60, 100, seed=0)
    X2, _, _ = make_study(60, 100, seed=1)
    outcome = np.where(y == 1, "Worse", "Improved").astype(object)
    outcome[np.random.default_rng(0).random(100) < 0.15] = "Stable"
    ids = [f"pair{i:03d}" for i in range(100)]
    kw = dict(n_permutations=args.permutations, n_bootstrap=args.bootstrap, seed=0)
    print(f"(a) 100 pairs / 60 patients, {args.permutations} permutations per protocol, "
          f"refitting bootstrap {args.bootstrap} requested")
    rows = {}
    for jobs in (1, cores):
        rows[jobs] = cpu_timed(lambda: dump(predict_outcome(X1, X2, outcome, groups, ids, n_jobs=jobs, **kw)))
        print(f"    {jobs} worker(s): {rows[jobs][0]:7.1f} s wall, {rows[jobs][1]:7.1f} CPU-s")
    print(f"    speed-up {rows[1][0] / rows[cores][0]:.2f}x on {cores} cores; CPU ratio "
          f"{rows[cores][1] / rows[1][1]:.2f}; same results: {rows[1][2] == rows[cores][2]}")
    if rows[1][2] != rows[cores][2]:
        raise SystemExit("the results differ between 1 worker and every core")


def bench_big(args, cores):
    from covreport.stats.permutation import permutation_p

    X, y, groups = make_study(5000, 10000, seed=0)
    n = args.big_permutations
    print(f"(b) 10,000 pairs / 5,000 patients, nested protocol, {n} permutations")
    rows = {}
    for jobs in (1, cores):
        rows[jobs] = cpu_timed(lambda: permutation_p(X, y, groups, protocol="nested", n_permutations=n, seed=0,
                                                     jobs=jobs))
        print(f"    {jobs} worker(s): {rows[jobs][0]:7.1f} s wall, {rows[jobs][1]:7.1f} CPU-s")
    per = rows[1][1] / (n + 1)              # n permutations and the observed run
    print(f"    speed-up {rows[1][0] / rows[cores][0]:.2f}x on {cores} cores; same p: "
          f"{rows[1][2]['p'] == rows[cores][2]['p']}")
    print(f"    {per:.2f} CPU-s per permutation; 1,000 permutations: {1000 * per / 60:.1f} min on 1 core, "
          f"{1000 * per / cores / 60:.1f} min on {cores} cores, {1000 * per / 16 / 60:.1f} min on 16 "
          "(perfect scaling; goal 10 min)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--big-permutations", type=int, default=100)
    ap.add_argument("--no-big", action="store_true", help="skip (b)")
    ap.add_argument("--no-small", action="store_true", help="skip (a)")
    args = ap.parse_args(argv)
    set_quiet(True)
    cores = parallel.available_cores()
    print(f"{cores} cores; load average {os.getloadavg()[0]:.1f}")
    if not args.no_small:
        bench_study(args, cores)
    if not args.no_big:
        bench_big(args, cores)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
