"""Benchmark: DeLong AUC with its variance on 100,000 scores.

Run:  python benchmarks/bench_delong.py [N] [REPEATS]

Prints the best-of-REPEATS wall time of covreport.stats.delong_auc (AUC, DeLong
SE and CI, Sun & Xu 2014 midrank algorithm) and of scikit-learn's
roc_auc_score (AUC only) on the same data, and their ratio. Target: DeLong
well under a second for N = 100,000.
"""

import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from covreport.stats.auc import delong_auc, delong_test


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(n=100_000, repeats=5):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    score = rng.normal(size=n) + 0.7 * y
    other = score + rng.normal(size=n)
    score_tied = np.round(score, 2)  # many ties, as with rounded probabilities

    res = delong_auc(y, score)
    assert abs(res["auc"] - roc_auc_score(y, score)) < 1e-12
    t_delong = best_time(lambda: delong_auc(y, score), repeats)
    t_tied = best_time(lambda: delong_auc(y, score_tied), repeats)
    t_test = best_time(lambda: delong_test(y, score, other), repeats)
    t_sklearn = best_time(lambda: roc_auc_score(y, score), repeats)

    print(f"n = {n:,} scores ({int(y.sum()):,} positive), best of {repeats}")
    print(f"delong_auc (AUC, SE, CI):          {t_delong * 1e3:8.1f} ms   AUC {res['auc']:.4f} SE {res['se']:.5f}")
    print(f"delong_auc, scores with ties:      {t_tied * 1e3:8.1f} ms")
    print(f"delong_test (two correlated AUCs): {t_test * 1e3:8.1f} ms")
    print(f"sklearn roc_auc_score (AUC only):  {t_sklearn * 1e3:8.1f} ms")
    print(f"ratio delong_auc / roc_auc_score:  {t_delong / t_sklearn:8.2f}")
    return t_delong


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
