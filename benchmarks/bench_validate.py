"""Benchmark: validating a 100,000-pair manifest, and probing one small PNG.

Run: ``python benchmarks/bench_validate.py [--pairs N] [--repeat R]``.

The manifest is generated in a temporary folder (patients with 4-6
sequential CXRs each, every optional column filled, one extra column) and read
with ``check_images=False``, the path issue 2 targets ("a few seconds at
most" for 100,000 pairs). Image probing is timed apart, per image, on a small
PNG: with ``check_images=True`` a manifest costs about that much per distinct
image file on top.
"""

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_manifest(path, n_pairs, seed=0):
    """A valid manifest of ``n_pairs`` pairs (images need not exist)."""
    rng = np.random.default_rng(seed)
    outcomes = np.array(["Worse", "Stable", "Improved", "W", "s", "i"])
    views = np.array(["AP", "AP Supine", "PA"])
    header = ["pair_id", "patient_id", "first_image", "second_image", "outcome", "first_date",
              "second_date", "age", "sex", "first_view", "second_view", "source", "notes", "site"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        k, patient = 0, 0
        while k < n_pairs:
            patient += 1
            n_images = int(rng.integers(4, 7))
            day = np.datetime64("2020-03-01") + int(rng.integers(0, 300))
            age, sex = int(rng.integers(18, 95)), "MF"[patient % 2]
            for v in range(n_images - 1):
                if k == n_pairs:
                    break
                k += 1
                gap = int(rng.integers(1, 8))
                writer.writerow([
                    f"pair{k:06d}", f"P{patient:05d}", f"images/P{patient:05d}_{v}.png",
                    f"images/P{patient:05d}_{v + 1}.png", outcomes[k % 6], str(day), str(day + gap),
                    age, sex, views[v % 3], views[(v + 1) % 3], "benchmark", "", f"site{patient % 7}",
                ])
                day = day + gap


def tiny_png(path):
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(((x * 3 + y * 2) % 256).astype(np.uint8), mode="L").save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--probes", type=int, default=500)
    args = parser.parse_args(argv)

    from covreport.images import probe_image
    from covreport.manifest import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.csv"
        write_manifest(manifest, args.pairs)
        size_mb = manifest.stat().st_size / 1e6
        times, cpu = [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            m = read_manifest(manifest, check_images=False)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        assert len(m.pairs) == args.pairs, len(m.pairs)
        best = min(times)
        print(f"validate (check_images=False): {args.pairs:,} pairs, {m.pairs['patient_id'].nunique():,} patients, "
              f"{size_mb:.1f} MB: best {best:.2f} s of {args.repeat} "
              f"(median {sorted(times)[len(times) // 2]:.2f} s; CPU {min(cpu):.2f} s), {args.pairs / best:,.0f} rows/s")

        png = Path(tmp) / "tiny.png"
        tiny_png(png)
        assert probe_image(png) is None
        t0 = time.perf_counter()
        for _ in range(args.probes):
            probe_image(png)
        per = (time.perf_counter() - t0) / args.probes
        print(f"probe_image on a {png.stat().st_size} B 64x64 PNG: {per * 1e6:.0f} us per image "
              f"({args.probes} probes; a manifest with N distinct images adds about N x this)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load:.1f} "
          "(wall times grow with the load; CPU time does not)")


if __name__ == "__main__":
    main()
