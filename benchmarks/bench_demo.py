"""Time `covreport demo`: a first run (generate, train, score, report) and a second run (reuse).

Targets on a 2-core CPU: first run within 5 minutes, second within 60 seconds.
Both runs go in one fresh folder, one after the other, as a new user would run
them; the stage times come from the demo itself.

    python benchmarks/bench_demo.py [--keep DIR]
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(out):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "covreport", "demo", "--out", str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"covreport demo failed:\n{proc.stderr[-3000:]}")
    stages = re.search(r"^Time: (.*)$", proc.stdout, re.M)
    return wall, stages.group(1) if stages else "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the demo folder here instead of a temporary one")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="covreport-bench-demo-"))
    out = folder / "demo"
    try:
        first, first_stages = run_once(out)
        second, second_stages = run_once(out)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"first run : {first:7.1f} s  ({first_stages})  target 300 s  -> {first / 300:.2f} of target")
    print(f"second run: {second:7.1f} s  ({second_stages})  target 60 s   -> {second / 60:.2f} of target")
    print(f"second / first: {second / first:.3f}")


if __name__ == "__main__":
    main()
