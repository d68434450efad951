"""Simulation: size and coverage of the clustered Mann-Whitney test with few patients (issue 20, section 3).

Run:  python benchmarks/bench_clustered_null.py [--replicates 2000] [--permutations 999] [--patients 15 40]

Design (one replicate):
  * ``n`` patients, each with 1-5 pairs (uniform);
  * outcome: a patient random effect u_i ~ N(0, 1) plus a pair term e_ij ~ N(0, 1);
    latent = u_i + e_ij, Worse above +0.61, Improved below -0.61 (about a third each, sd sqrt 2),
    Stable in between; only the Worse vs Improved contrast is tested (a patient may have both);
  * change: a patient random effect v_i ~ N(0, 1) plus f_ij ~ N(0, 1), plus ``delta`` for a
    Worse pair; u and v are independent, so with delta = 0 the null holds
    (theta = P(change Worse > change Improved) = 1/2), while outcome and change are each
    correlated within a patient;
  * a replicate with fewer than 2 patients in either group is drawn again (counted).

For each replicate: the two-sided 5% rejection of (a) the cluster permutation p
(``clustered_mw_permutation_p``, ``--permutations`` draws), (b) the old Wald z test
on Obuchowski's SE, (c) the pair-level Mann-Whitney (pairs as independent, R's rule),
and the coverage of (d) the logit-transformed interval with t on covreport's
Welch-Satterthwaite df (``logit_interval``, ``obuchowski_components``' ``df``; beside it the
earlier t on patients - 2 df) and (e) the old Wald interval clipped to [0, 1]. Coverage is
measured at delta = 0 (truth 1/2) and at delta = 0.5, whose true theta is the
probability of superiority of two pairs of different patients, Phi(delta/2) = 0.5987
(the estimator also compares the pairs of one patient, whose difference is
N(delta, 2): a bias of at most a few thousandths at 15 patients, against the interval).
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covreport.stats.clustered import clustered_mw_permutation_p, obuchowski_components  # noqa: E402
from covreport.stats.effect_sizes import logit_interval  # noqa: E402
from covreport.stats.groups import mannwhitney  # noqa: E402

CUT = 0.61


def draw(rng, n, delta):
    """One study: (change, worse?, patient code) of the Worse and Improved pairs."""
    while True:
        k = rng.integers(1, 6, size=n)
        pid = np.repeat(np.arange(n), k)
        u, v = rng.normal(size=n), rng.normal(size=n)
        latent = u[pid] + rng.normal(size=len(pid))
        worse, improved = latent > CUT, latent < -CUT
        change = v[pid] + rng.normal(size=len(pid)) + delta * worse
        keep = worse | improved
        if len(np.unique(pid[worse])) >= 2 and len(np.unique(pid[improved])) >= 2:
            return change[keep], worse[keep], pid[keep]
        draw.redraws += 1


draw.redraws = 0


def true_theta(delta):
    """P(change of a Worse pair > change of an Improved pair of another patient) = Phi(delta / 2).

    Given the outcome the change is N(delta w, 2) (v and f do not depend on u or e), so the
    difference of two pairs of different patients is N(delta, 4).
    """
    return float(sps.norm.cdf(delta / 2))


def replicate(rng, n, delta, theta0, n_perm):
    values, worse, pid = draw(rng, n, delta)
    comp = obuchowski_components(values[worse], pid[worse], values[~worse], pid[~worse])
    theta, se = comp["theta"], math.sqrt(max(comp["var"], 0.0))
    p_perm = clustered_mw_permutation_p(values, worse, pid, n_perm, rng)
    p_wald = 2 * sps.norm.sf(abs(theta - 0.5) / se) if se > 0 else 0.0
    p_pair = mannwhitney(values[worse], values[~worse])[1]
    lo, hi = logit_interval(theta, se, comp["df"])              # covreport's df (Welch-Satterthwaite)
    klo, khi = logit_interval(theta, se, comp["clusters"] - 2)   # the df before issue 20's second review
    z = sps.norm.ppf(0.975)
    wlo, whi = max(0.0, theta - z * se), min(1.0, theta + z * se)
    return (p_perm <= 0.05, p_wald <= 0.05, p_pair <= 0.05,
            bool(lo <= theta0 <= hi), bool(wlo <= theta0 <= whi), bool(hi < theta0), bool(lo > theta0),
            bool(klo <= theta0 <= khi))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=2000)
    ap.add_argument("--permutations", type=int, default=999)
    ap.add_argument("--patients", type=int, nargs="+", default=[15, 40])
    ap.add_argument("--delta", type=float, default=0.5, help="shift of the alternative used for coverage")
    ap.add_argument("--seed", type=int, default=20)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    truth = {0.0: 0.5, args.delta: true_theta(args.delta)}
    print(f"true theta at delta = {args.delta}: {truth[args.delta]:.4f}")
    for n in args.patients:
        for delta, theta0 in truth.items():
            start = time.perf_counter()
            draw.redraws = 0
            res = np.array([replicate(rng, n, delta, theta0, args.permutations) for _ in range(args.replicates)])
            r = res.mean(axis=0)
            se = lambda p: math.sqrt(p * (1 - p) / args.replicates)  # noqa: E731
            label = "null" if delta == 0 else f"delta={delta}"
            print(f"patients={n:3d} {label:10s} reject: permutation {r[0]:.4f} (+/- {1.96 * se(r[0]):.4f}), "
                  f"Wald z {r[1]:.4f}, pair-level MW {r[2]:.4f}; coverage: logit-t {r[3]:.4f} "
                  f"(misses below {r[5]:.4f}, above {r[6]:.4f}), t(patients - 2) {r[7]:.4f}, "
                  f"Wald clipped {r[4]:.4f}; "
                  f"redraws {draw.redraws}; {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
