"""Coverage of the refitting patient bootstrap intervals of cross-validated performance (issue 19, part 2).

Run:  python benchmarks/bench_cv_coverage.py [--replicates 1000] [--resamples 200] [--patients 20 40 100]
                                             [--protocol nested|global|penalised] [--features 20]
                                             [--seed 0] [--jobs N] [--save part.json]
      python benchmarks/bench_cv_coverage.py --combine part0.json part1.json

On a few cores, run one process per core with ``--jobs 1``, different ``--seed`` and ``--save``, then
``--combine`` pools their replicates (the coverage against Err then uses the pooled mean of Err_XY). The
saved file is rewritten after each replicate, so a run stopped early still counts what it finished.

Each replicate simulates a study: patients with 1 to 4 pairs (uniform), a
patient random effect on the logit of Worse (SD ``--patient-sd``, default 1.0:
a within-patient correlation of the outcome of about 0.2 on the latent
scale), non-negative gamma features of which 5 carry the outcome. It computes
the leave-one-patient-out measures of the protocol and their intervals from
:func:`covreport.stats.prediction.cv_bootstrap` (nominal 95%).

The target: the cross-validated estimate estimates the performance of the
protocol trained on a study of this size, on new patients. For each replicate
the protocol is refitted on all its pairs and scored on 4,000 new pairs of new
patients (Err_XY, Bates, Hastie & Tibshirani 2023); coverage is reported
against the mean of Err_XY over the replicates (Err, what cross-validation
estimates) and against the replicate's own Err_XY.

Prints, per number of patients and measure: coverage against Err and Err_XY,
with the binomial standard error of the coverage, the median width, and the
estimate's bias for Err, its SD over the replicates and the mean bootstrap SE.
"""

import argparse
import json
import math
import time

import numpy as np
from scipy import special

from covreport import progress
from covreport._io import atomic_write_bytes
from covreport.stats.prediction import _measures, cv_bootstrap, lopo_predict

MEASURES = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")


def simulate(n_patients, rng, n_features=20, patient_sd=1.0, signal=0.6, new=False, n_pairs=None):
    """(X, y, groups) of one study; ``n_pairs`` new pairs of new patients when given."""
    if n_pairs is None:
        sizes = rng.integers(1, 5, n_patients)
    else:
        sizes = rng.integers(1, 5, n_pairs)
        sizes = sizes[np.cumsum(sizes) <= n_pairs]
    groups = np.repeat(np.arange(len(sizes)), sizes)
    u = rng.normal(0.0, patient_sd, len(sizes))[groups]
    y = (rng.random(len(groups)) < special.expit(1.0 + u)).astype(int)
    X = rng.gamma(2.0, 0.5, (len(y), n_features))
    X[:, :5] *= 1 + signal * y[:, None]
    return X, y, groups


def fit_predict(X, y, groups, Xnew, protocol):
    """Probabilities of the protocol refitted on all of (X, y), for the new rows."""
    if protocol == "penalised":
        from covreport.stats.lopo import _group_codes
        from covreport.stats.penalised import Penalised

        codes, pats = _group_codes(groups, len(y))
        fm = Penalised(X.astype(float), codes, len(pats), outer=False).final(y.astype(float))
        keep = fm["kept"]
        z = fm["intercept"] + ((Xnew[:, keep] - fm["mean"][keep]) / fm["sd"][keep]) @ fm["coefficients"][keep]
        return special.expit(z)
    from sklearn.feature_selection import chi2
    from sklearn.linear_model import LogisticRegression

    p = chi2(X, y)[1]
    sel = p < 0.05
    if not sel.any():
        sel[np.nanargmin(p)] = True
    return LogisticRegression().fit(X[:, sel], y).predict_proba(Xnew[:, sel])[:, 1]


def run(args):
    rng = np.random.default_rng(args.seed)
    print(f"protocol {args.protocol}, {args.replicates} replicates, {args.resamples} resamples, "
          f"{args.features} features, patient SD {args.patient_sd}, seed {args.seed}")
    saved = {}
    for n_pat in args.patients:
        start = time.process_time()
        rows = []
        for _ in progress.bar(range(args.replicates), total=args.replicates, desc=f"{n_pat} patients"):
            while True:
                X, y, g = simulate(n_pat, rng, args.features, args.patient_sd)
                if 3 <= y.sum() <= len(y) - 3:
                    break
            Xn, yn, _gn = simulate(None, rng, args.features, args.patient_sd, n_pairs=4000)
            truth = _measures(yn, fit_predict(X, y, g, Xn, args.protocol))
            est = _measures(y, lopo_predict(X, y, g, protocol=args.protocol, final_model=False)["probabilities"])
            ci = cv_bootstrap(X, y, g, protocol=args.protocol, n_resamples=args.resamples,
                              seed=int(rng.integers(2**31)), estimates=est, jobs=args.jobs)
            rows.append(({m: float(truth[m]) for m in MEASURES},
                         {m: [ci[m]["ci_low"], ci[m]["ci_high"]] for m in MEASURES},
                         {m: [_num(est[m]), _num(ci[m].get("bootstrap_se"))] for m in MEASURES}))
            saved[str(n_pat)] = {"cpu_s": time.process_time() - start, "rows": rows}
            if args.save:   # after every replicate, so that a run stopped early still counts what it did
                atomic_write_bytes(args.save, json.dumps({"args": vars(args), "patients": saved}).encode())
        summarise(n_pat, rows, time.process_time() - start)


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


def summarise(n_pat, rows, cpu):
    """Print the coverage of each measure over ``rows`` ((truth, {measure: [low, high]}[, {measure: [estimate,
    bootstrap SE]}]) per replicate) and, where the estimates were saved, the estimate's bias for Err, its SD
    over the replicates and the mean bootstrap SE (what the interval's width rests on)."""
    print(f"\n{n_pat} patients, {len(rows)} replicates ({cpu:.0f} CPU-s):")
    print(f"  {'measure':<18} {'cover Err':>10} {'cover Err_XY':>13} {'median width':>13}  "
          f"{'bias for Err':>12} {'SD of est.':>10} {'mean boot SE':>12}")
    for m in MEASURES:
        err = np.nanmean([r[0][m] for r in rows])
        ok = [(r[1][m][0], r[1][m][1], r[0][m]) for r in rows if r[1][m][0] is not None and np.isfinite(r[0][m])]
        if not ok:
            continue
        lo, hi, txy = map(np.array, zip(*ok))
        c_err = np.mean((lo <= err) & (err <= hi))
        c_xy = np.mean((lo <= txy) & (txy <= hi))
        se = math.sqrt(c_err * (1 - c_err) / len(ok))
        line = f"  {m:<18} {c_err:>7.3f}±{se:.3f} {c_xy:>13.3f} {np.median(hi - lo):>13.3f}"
        est = np.array([[np.nan if v is None else v for v in r[2][m]] for r in rows if len(r) > 2], dtype=float)
        if len(est):
            line += (f"  {np.nanmean(est[:, 0]) - err:>+12.3f} {np.nanstd(est[:, 0], ddof=1):>10.3f} "
                     f"{np.nanmean(est[:, 1]):>12.3f}")
        print(line + f"  (n={len(ok)})")


def combine(paths):
    """Pool the replicates saved by runs with different ``--seed`` (``--save``) and print their coverage."""
    pooled = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        print(f"{path}: seed {saved['args']['seed']}, protocol {saved['args']['protocol']}, "
              f"{saved['args']['resamples']} resamples")
        for n_pat, part in saved["patients"].items():
            rows, cpu = pooled.get(n_pat, ([], 0.0))
            pooled[n_pat] = (rows + [tuple(r) for r in part["rows"]], cpu + part["cpu_s"])
    for n_pat, (rows, cpu) in pooled.items():
        summarise(n_pat, rows, cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--patients", type=int, nargs="+", default=[20, 40, 100])
    ap.add_argument("--protocol", default="nested", choices=["nested", "global", "penalised"])
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--patient-sd", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=None, help="workers of each bootstrap (default: every core)")
    ap.add_argument("--save", help="write every replicate's truth and intervals to this JSON file (rewritten "
                                   "after each replicate)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="pool the replicates of runs saved with --save (different --seed) and print their coverage")
    args = ap.parse_args()
    progress.set_quiet(True)
    if args.combine:
        combine(args.combine)
    else:
        run(args)


if __name__ == "__main__":
    main()
