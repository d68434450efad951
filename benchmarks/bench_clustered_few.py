"""Simulation: the primary clustered table with few patients in one group (issue 20, review 2.3 and 2.6).

Run:  python benchmarks/bench_clustered_few.py [--replicates 1000] [--resamples 2000] [--permutations 999]

Design (one replicate), shaped like the reviewer example's Worse vs Improved contrast
(8 patients with an Improved pair against 28 others):
  * ``--small`` patients (8) with 1-2 Improved pairs each and, with probability 1/2, one Worse pair;
  * ``--large`` patients (28) with 1-3 Worse pairs each;
  * change = v_i + e_ij + delta for a Worse pair, v_i ~ N(0, 1) a patient effect and
    e_ij ~ N(0, 1) (intra-patient correlation 1/2), independent of the outcome.
Truths: theta = Phi(delta / 2) for pairs of different patients (with ``--skew``, by Monte Carlo),
d = delta / sqrt(2) (each group's SD is sqrt 2), the difference of medians = delta.

For each replicate, two-sided at the 5% level:
  (a) the cluster permutation p (``clustered_mw_permutation_p``) at delta = 0;
  (b) the coverage of theta's logit-transformed interval with t on (patients - 2) df (covreport
      until issue 20's second review) and with the Welch-Satterthwaite df of the two groups' variance
      terms (``satterthwaite_df``: S10/N on I10 - 1 and S01/M on I01 - 1 df, at most patients - 2;
      covreport's interval now);
  (c) the coverage of the patient-level cluster bootstrap intervals of Hedges' g and of the
      difference of medians (``cluster_bootstrap``, ``--resamples`` resamples): percentile against BCa.
Monte Carlo SE of a 95% coverage over 1,000 replicates: 0.7 percentage points.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covreport import progress  # noqa: E402
from covreport.stats.clustered import (  # noqa: E402
    _codes, cluster_bootstrap, clustered_mw_permutation_p, obuchowski_components,
)
from covreport.stats.effect_sizes import logit_interval  # noqa: E402


def draw(rng, small, large, delta, skew=False):
    """One study: a changes DataFrame (patient_id, outcome, A) of the Worse and Improved pairs."""
    rows = []
    for i in range(small + large):
        v = (rng.chisquare(2) - 2) / 2 if skew else rng.normal()
        if i < small:
            outcomes = ["Improved"] * int(rng.integers(1, 3)) + ["Worse"] * int(rng.random() < 0.5)
        else:
            outcomes = ["Worse"] * int(rng.integers(1, 4))
        for o in outcomes:
            e = (rng.chisquare(2) - 2) / 2 if skew else rng.normal()
            rows.append((f"p{i:03d}", o, v + e + delta * (o == "Worse")))
    return pd.DataFrame(rows, columns=["patient_id", "outcome", "A"])


def theta_truth(delta, skew):
    """P(X > Y) + P(X = Y)/2 for a Worse and an Improved pair of different patients."""
    if not skew:
        return float(sps.norm.cdf(delta / 2))
    t = np.random.default_rng(0).chisquare(2, size=(4, 2_000_000))   # Monte Carlo, SE < 0.0004
    return float(np.mean(t[0] + t[1] - t[2] - t[3] + 2 * delta > 0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--permutations", type=int, default=999)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--large", type=int, default=28)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--skew", action="store_true",
                    help="patient and pair terms (chi2(2) - 2)/2 (mean 0, SD 1, skewness 2) instead of N(0, 1)")
    args = ap.parse_args(argv)
    progress.set_quiet(True)
    rng = np.random.default_rng(args.seed)
    print(f"{args.small} vs {args.large} patients, {'skewed' if args.skew else 'normal'} terms, "
          f"{args.replicates} replicates, {args.resamples} resamples, "
          f"{args.permutations} permutations")
    print("| delta | permutation p rejects | theta, t(patients - 2) | theta, t(Satterthwaite df) (mean df) "
          "| g, percentile | g, BCa | median diff., percentile | median diff., BCa |")
    print("|---|---|---|---|---|---|---|---|")
    for delta in (0.0, 0.5):
        t0 = time.perf_counter()
        truth = {"theta": theta_truth(delta, args.skew), "hedges_g": delta / math.sqrt(2), "median_difference": delta}
        hits = {k: 0 for k in ("perm", "t_k2", "t_sw", "g_pct", "g_bca", "md_pct", "md_bca")}
        dfs = []
        for r in range(args.replicates):
            df = draw(rng, args.small, args.large, delta, args.skew)
            codes = _codes(df.patient_id, len(df))
            w = (df.outcome == "Worse").to_numpy()
            v = df.A.to_numpy()
            if delta == 0.0:
                p = clustered_mw_permutation_p(v, w, codes, args.permutations, rng)
                hits["perm"] += p <= 0.05
            comp = obuchowski_components(v[w], codes[w], v[~w], codes[~w])
            sw = comp["df"]
            se = math.sqrt(comp["var"])
            dfs.append(sw)
            for key, dof in (("t_k2", comp["clusters"] - 2), ("t_sw", sw)):
                lo, hi = logit_interval(comp["theta"], se, dof, 0.05)
                hits[key] += lo <= truth["theta"] <= hi
            boot = cluster_bootstrap(df.patient_id, None, df, ["A"], n_resamples=args.resamples,
                                     seed=int(rng.integers(2 ** 31)), contrasts=[("Worse", "Improved")])
            for rec in boot["group_differences"]:
                q = rec["quantity"]
                if q == "cohen_d":
                    continue
                tag = "g" if q == "hedges_g" else "md"
                hits[f"{tag}_pct"] += rec["percentile_low"] <= truth[q] <= rec["percentile_high"]
                hits[f"{tag}_bca"] += rec["bca_low"] <= truth[q] <= rec["bca_high"]
        n = args.replicates
        pct = {k: 100.0 * h / n for k, h in hits.items()}
        perm = f"{pct['perm']:.2f}%" if delta == 0.0 else "-"
        print(f"| {delta:g} | {perm} | {pct['t_k2']:.1f}% | {pct['t_sw']:.1f}% ({np.mean(dfs):.1f}) | "
              f"{pct['g_pct']:.1f}% | {pct['g_bca']:.1f}% | {pct['md_pct']:.1f}% | {pct['md_bca']:.1f}% |",
              flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
