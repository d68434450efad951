"""Time `covreport demo`: a first run (generate, train, score, report) and a second run (reuse).

Targets on a 2-core CPU: first run within 5 minutes, second within 60 seconds.
Both runs go in one fresh folder, one after the other, as a new user would run
them; the stage times come from the demo itself.

With ``--contention`` it measures instead how the demo's training copes with
a busy CPU (issue 14.9): the same `covreport train` (the demo's recipe, on
the demo's phantom) runs alone, then beside two busy-loop processes, side by
side in one run; it prints both times, the CPU seconds each used and their
ratio (target: at most 3x). The load average is printed alongside, since
"alone" is only as idle as the machine.

    python benchmarks/bench_demo.py [--keep DIR]
    python benchmarks/bench_demo.py --contention [--busy 2] [--max-images N] [--rounds 1]
"""

import argparse
import os
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


def first_and_second(args):
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


# --- contention ------------------------------------------------------------------


def _load():
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _train(chex, out, max_images, env, workers=None):
    """One `covreport train` with the demo's recipe; (wall s, CPU s of the process and its workers)."""
    from covreport.phantom import DEMO_TRAINING

    t = DEMO_TRAINING
    cmd = [sys.executable, "-m", "covreport", "train", "--chexpert-root", str(chex), "--out", str(out),
           "--init", t["init"], "--image-size", str(t["image_size"]), "--epochs", str(t["epochs"]),
           "--batch-size", str(t["batch_size"]), "--lr", str(t["lr"]), "--device", "cpu", "--no-progress"]
    if max_images:
        cmd += ["--max-images", str(max_images)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"covreport train failed:\n{err[-3000:]}")
    return wall


def _children_cpu():
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def contention(args):
    from covreport.phantom import CHEXPERT_DIRNAME, DEMO_STUDY, make_study

    folder = Path(tempfile.mkdtemp(prefix="covreport-bench-contention-"))
    env = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    try:
        study = folder / "study"
        make_study(study, seed=0, **DEMO_STUDY)
        chex = study / CHEXPERT_DIRNAME
        print(f"CPUs available: {len(os.sched_getaffinity(0))}; {_load()} before")
        print(f"training: the demo's recipe, {args.max_images or 'all'} images per split, "
              f"{args.busy} busy loop(s) beside the contended runs")
        alone, busy = [], []
        for r in range(args.rounds):
            c0 = _children_cpu()
            w = _train(chex, folder / f"alone{r}" / "m.pt", args.max_images, env, args.workers)
            alone.append((w, _children_cpu() - c0))
            print(f"  alone      : {w:7.1f} s wall, {alone[-1][1]:7.1f} CPU-s  ({_load()})", flush=True)
            loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(1.0)
                c0 = _children_cpu()
                w = _train(chex, folder / f"busy{r}" / "m.pt", args.max_images, env, args.workers)
                # read before the busy loops are reaped: their CPU time is not the training's
                busy.append((w, _children_cpu() - c0))
                load = _load()
            finally:
                for p in loops:
                    p.kill()
                for p in loops:
                    p.wait()
            print(f"  {args.busy} busy loops: {w:7.1f} s wall, {busy[-1][1]:7.1f} CPU-s  ({load})", flush=True)
        a = min(w for w, _ in alone)
        b = min(w for w, _ in busy)
        print(f"training alone {a:.1f} s, beside {args.busy} busy loops {b:.1f} s: ratio {b / a:.2f} "
              f"(target <= 3)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the demo folder here instead of a temporary one")
    parser.add_argument("--contention", action="store_true",
                        help="time the demo's training alone and beside busy-loop processes")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the training (default 2)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="train on at most N images of each split (default: all, as the demo)")
    parser.add_argument("--rounds", type=int, default=1, help="alone/busy pairs to run (the best of each is kept)")
    parser.add_argument("--workers", type=int, default=None, help="--workers of covreport train (default: its own)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the training processes (to compare settings)")
    args = parser.parse_args()
    if args.contention:
        contention(args)
    else:
        first_and_second(args)


if __name__ == "__main__":
    main()
