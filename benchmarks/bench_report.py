"""Benchmark: render the STARD report (figures, HTML and PDF) of the fixed results fixture.

Target (issue 6): HTML and PDF for the demo study within 15 seconds on the CI machine.

    .venv/bin/python benchmarks/bench_report.py [--results tests/fixtures/results.json] [--repeat 3]

Prints one line per repeat with wall-clock and CPU seconds per stage, then the
median total; exits with status 1 if the median total exceeds --budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "tests" / "fixtures" / "results.json")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=15.0, help="seconds allowed for the median total")
    args = ap.parse_args(argv)

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
