"""Benchmark: reading a scores file with many extra (label) columns.

Run: ``python benchmarks/bench_scores_wide.py [--rows N] [--repeat R]``.

Issue 18 found :func:`covreport.scoring.read_scores` quadratic in the number
of columns (a ``list.count`` per column to find duplicated names, and one
DataFrame insertion per label, each copying the frame's block list): 20,000
extra columns took minutes. The reader is now linear. This script writes
files of 2,000 and 20,000 extra columns (plus ``image`` and the 1,024
``feat_*``), reads each ``--repeat`` times and prints the best wall times
and their ratio: about 10 for linear work, about 100 for quadratic.
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from covreport.constants import feature_columns  # noqa: E402
from covreport.scores_file import read_scores  # noqa: E402


def write_wide(path, n_labels, n_rows, seed=0):
    """A valid scores CSV: ``image``, ``n_labels`` probability columns, the 1,024 features."""
    rng = np.random.default_rng(seed)
    labels = pd.DataFrame(rng.random((n_rows, n_labels)), columns=[f"L{i:05d}" for i in range(n_labels)])
    feats = pd.DataFrame(rng.gamma(1.0, 1.0, (n_rows, 1024)).astype(np.float32), columns=feature_columns())
    image = pd.DataFrame({"image": [f"img/{i}.png" for i in range(n_rows)]})
    pd.concat([image, labels, feats], axis=1).to_csv(path, index=False)
    return path


def best_time(path, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a PerformanceWarning would mean fragmented inserts again
            df = read_scores(path)
        times.append(time.perf_counter() - start)
    return min(times), df.shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in (2_000, 20_000):
            path = write_wide(Path(tmp) / f"wide{n}.csv", n, args.rows)
            results[n] = best_time(path, args.repeat)
            print(f"{n:>6,} extra columns: {results[n][0]:7.2f} s  (frame {results[n][1]})")
        ratio = results[20_000][0] / results[2_000][0]
        print(f"ratio 20,000 / 2,000 columns: {ratio:.1f} (linear ~10, quadratic ~100)")


if __name__ == "__main__":
    main()
