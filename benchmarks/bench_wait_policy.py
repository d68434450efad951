"""OpenMP wait policy of the training: passive against a bounded spin, alone and beside busy loops (issue 21.1).

Run:  python benchmarks/bench_wait_policy.py [--rounds 2] [--busy 2]

Trains the quick demo's recipe (covreport.demo.QUICK: 640 + 150 images of
64 px, one epoch, batches of 16) on a fresh quick phantom, once per policy
and round, the policies alternating so that both see the same machine:
first alone, then beside ``--busy`` busy-loop processes. Each training runs
in its own process with the policy set in its environment before torch
starts (covreport/_threads.py: ``PASSIVE_ENV`` and ``BOUNDED_SPIN_ENV``).
Prints each wall time and, per condition, the ratio bounded spin / passive.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = """
import sys
from covreport.demo import QUICK
from covreport.train import TrainConfig, train
train(sys.argv[1], sys.argv[2], TrainConfig(**QUICK["training"], seed=0, device="cpu"), progress=False)
"""


def _time(env_extra, chex, out):
    from covreport._threads import BOUNDED_SPIN_ENV, PASSIVE_ENV

    policy = set(PASSIVE_ENV) | set(BOUNDED_SPIN_ENV)     # every variable either policy sets
    env = {k: v for k, v in os.environ.items() if k not in policy}
    env.update(env_extra)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", TRAIN, str(chex), str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    from covreport import _threads
    from covreport.demo import QUICK
    from covreport.phantom import CHEXPERT_DIRNAME, make_study

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the contended runs")
    args = ap.parse_args()
    policies = {"passive": _threads.PASSIVE_ENV, "bounded spin": _threads.BOUNDED_SPIN_ENV}
    print(f"CPUs available: {_threads.available_cpus()}; load average {os.getloadavg()} before")
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp) / "quick", seed=0, **QUICK["study"])
        chex, out = study.root / CHEXPERT_DIRNAME, Path(tmp) / "w.pt"
        for condition in ("alone", f"beside {args.busy} busy loops"):
            loops = []
            if condition != "alone":
                loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
                time.sleep(1.0)
            try:
                walls = {name: [] for name in policies}
                for _ in range(args.rounds):
                    for name, env in policies.items():
                        walls[name].append(_time(env, chex, out))
            finally:
                for p in loops:
                    p.kill()
                    p.wait()
            for name, w in walls.items():
                print(f"  {condition:<22} {name:<13} " + ", ".join(f"{x:.1f} s" for x in w))
            ratio = statistics.median(walls["bounded spin"]) / statistics.median(walls["passive"])
            print(f"  {condition:<22} bounded spin / passive (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
