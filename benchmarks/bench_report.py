"""Benchmark: render the STARD report (figures, HTML and PDF) of the fixed results fixture, and a study at scale.

Target (issue 6): HTML and PDF for the demo study within 15 seconds on the CI machine.

    .venv/bin/python benchmarks/bench_report.py [--results tests/fixtures/results.json] [--repeat 3]

Prints one line per repeat with wall-clock and CPU seconds per stage, then the
median total; exits with status 1 if the median total exceeds --budget.

Target (issue 12, scale): a 200,000-pair manifest of which 12 pairs can be
analysed (the others have no score, so they are excluded) through
``covreport run --scores`` with the PDF within 60 s and 2 GB peak memory:

    .venv/bin/python benchmarks/bench_report.py --scale [--pairs 200000]

Prints the wall time, the peak resident memory of the ``covreport`` process
(``getrusage`` of the child), and the sizes of report.html, report.pdf and
results.json; exits with status 1 when over either budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def scale(n_pairs, n_analysed=12, seconds=60.0, megabytes=2048.0, keep=None):
    """The issue-12 scale benchmark: see the module docstring. Returns the exit status."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_validate import tiny_png, write_manifest  # the validation benchmark's generators

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(keep) if keep else Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        manifest = tmp / "manifest.csv"
        write_manifest(manifest, n_pairs)
        # the analysable pairs: the first pair of patients spread over the manifest, Worse and Improved only
        chosen, seen = [], set()
        with open(manifest, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["patient_id"] in seen or row["outcome"] not in ("Worse", "W", "Improved", "i"):
                    continue
                seen.add(row["patient_id"])
                if len(seen) % 97 == 1:
                    chosen.append(row)
                if len(chosen) == n_analysed:
                    break
        images = [img for r in chosen for img in (r["first_image"], r["second_image"])]
        for img in images:  # only these images exist: every other pair is excluded (file not found)
            (tmp / img).parent.mkdir(parents=True, exist_ok=True)
            tiny_png(tmp / img)
        rng = np.random.default_rng(0)
        from covreport.constants import CHEXPERT_LABELS, feature_columns

        labels = list(CHEXPERT_LABELS[:4])
        with open(tmp / "scores.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["image", *labels, *feature_columns()])
            for img in images:
                w.writerow([img, *np.round(rng.random(len(labels)), 6), *np.round(rng.gamma(1.0, 1.0, 1024), 5)])
        out = tmp / "out"
        cmd = [sys.executable, "-m", "covreport", "run", str(manifest), "--scores", str(tmp / "scores.csv"),
               "--out", str(out), "--permutations", "100"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB (Linux)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            return 2
        sizes = {name: (out / name).stat().st_size / 1e6 for name in ("report.html", "report.pdf", "results.json")}
        n_rows = sum(1 for _ in open(out / "tables" / "exclusions.csv", encoding="utf-8")) - 1
        print(f"scale: {n_pairs} pairs in the manifest, {len(chosen)} analysable: covreport run --scores with the "
              f"PDF took {wall:.1f} s wall, peak RSS {peak:.0f} MiB; report.html {sizes['report.html']:.2f} MB, "
              f"report.pdf {sizes['report.pdf']:.2f} MB, results.json {sizes['results.json']:.1f} MB; "
              f"tables/exclusions.csv {n_rows} rows")
        ok = wall <= seconds and peak <= megabytes
        print(f"{'within' if ok else 'OVER'} the budget of {seconds:.0f} s and {megabytes:.0f} MiB")
        return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "tests" / "fixtures" / "results.json")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=15.0, help="seconds allowed for the median total")
    ap.add_argument("--scale", action="store_true", help="run the issue-12 scale benchmark instead")
    ap.add_argument("--pairs", type=int, default=200_000, help="pairs in the scale benchmark's manifest")
    ap.add_argument("--keep", type=Path, default=None, help="keep the scale benchmark's files in this folder")
    args = ap.parse_args(argv)
    if args.scale:
        return scale(args.pairs, keep=args.keep)

    from covreport.report import render as report  # imported here so the import time is not counted per repeat

    results = json.loads(args.results.read_text(encoding="utf-8"))
    totals = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            figs, wf, cf = _timed(lambda: report._make_figures(results, None, tmp / "figures"))
            html, wh, ch = _timed(lambda: report.render_html(results, figures=figs))
            _, wp, cp = _timed(lambda: report.write_pdf(html, tmp / "report.pdf"))
            total = wf + wh + wp
            totals.append(total)
            print(f"run {i + 1}: figures {wf:.2f} s (cpu {cf:.2f}), html {wh:.2f} s (cpu {ch:.2f}), "
                  f"pdf {wp:.2f} s (cpu {cp:.2f}); total {total:.2f} s; html {len(html) / 1e6:.2f} MB, "
                  f"pdf {(tmp / 'report.pdf').stat().st_size / 1e6:.2f} MB")
    med = statistics.median(totals)
    verdict = "within" if med <= args.budget else "OVER"
    print(f"median total {med:.2f} s: {verdict} the {args.budget:.0f} s budget")
    return 0 if med <= args.budget else 1


if __name__ == "__main__":
    sys.exit(main())
