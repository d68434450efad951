"""The penalised primary protocol's two engines side by side: each fold fitted anew vs shared fits.

Run:  python benchmarks/bench_penalised.py [--pairs 200 400] [--shared-only 1000 2000]

On ``bench_lopo.make_study(pairs / 2, pairs, effect=0.15)`` (1,024 correlated features) it runs one
out-of-fold run of the protocol (``Penalised(...).run``, every patient an outer fold, 10 penalties, 5 inner
folds) with the exact row-space engine and with the shared-fit engine
(:mod:`covreport.stats._penalised_shared`), one after the other in this process, and prints their wall and
CPU seconds, the ratio, the peak memory each added, and how far apart their probabilities and chosen
penalties are. ``--shared-only`` sizes run the shared engine alone (the exact one needs about n^4 time and
n^3 memory: 400 pairs took 249 s and 300 pairs 4.1 GB).
"""

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_lopo import make_study  # noqa: E402


def one(X, y, groups, n_patients, shared):
    from covreport.stats import penalised
    from covreport.stats._logistic import _blas_limits

    penalised.SHARED_MIN_ROWS = 0 if shared else 10**12
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    with _blas_limits():
        prob, penalty, *_ = penalised.Penalised(X, groups, n_patients).run(y)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    return prob, penalty, wall, cpu, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="*", default=[200, 400])
    parser.add_argument("--shared-only", type=int, nargs="*", default=[1000, 2000])
    args = parser.parse_args()
    for n in args.pairs + args.shared_only:
        X, y, groups = make_study(n // 2, n, effect=0.15)
        y = y.astype(float)
        p_s, c_s, w_s, cpu_s, m_s = one(X, y, groups, n // 2, shared=True)
        line = f"{n} pairs, {n // 2} patients: shared {w_s:.1f} s wall / {cpu_s:.1f} CPU-s, peak {m_s:.2f} GiB"
        if n in args.pairs:
            p_e, c_e, w_e, cpu_e, m_e = one(X, y, groups, n // 2, shared=False)
            line += (f"; exact {w_e:.1f} s / {cpu_e:.1f} CPU-s, peak {m_e:.2f} GiB; exact / shared "
                     f"{w_e / w_s:.2f}x; max |dp| {np.abs(p_e - p_s).max():.1e}, penalties differ in "
                     f"{sum(a != b for a, b in zip(c_e, c_s))} of {len(c_s)} folds")
        print(line, flush=True)


if __name__ == "__main__":
    main()
