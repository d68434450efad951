"""Experiment (not product code): the penalised protocol's fits by Woodbury chord steps from shared fits.

Run:  python benchmarks/proto_penalised_chord.py [--patients 200 750] [--tol 1e-6] [--verbose]

Why: the exact penalised primary protocol (covreport/stats/penalised.py) grows as about n^4 (400 pairs:
249 s per run; benchmarks/README.md, "How one penalised run grows"), so it cannot reach consortium size.
This script measures the idea proposed there, on ``bench_lopo.make_study(n_patients, 2 * n_patients)``:

- the inner folds are one fixed GroupKFold(5) partition of all patients, restricted to each outer
  training set, so every training set is S minus at most one patient, with S one of six shared sets
  (all patients but inner fold k, or all patients);
- a standardised L2 fit is, in raw coordinates, z = b + x'v with penalty 0.5 sum_j sd_T,j^2 v_j^2
  (sd_T: the training set's SDs), so S minus a patient differs from S by that patient's rows (taken out
  of S's Hessian by Woodbury's identity) and by a small change of the penalty's diagonal (left to the
  chord iterations);
- each (set, penalty) fits S exactly by Newton, then every S minus a patient by chord steps from it.

It prints the chord targets, the passes they needed and the largest difference of the probabilities
from scikit-learn's exact fit (standardised, LogisticRegression(C, newton-cholesky, tol 1e-10)) on a
few targets. 2026-12-07, 2-core machine, --tol 1e-6: 400 pairs 33 s for the 10,000 targets of all
penalties (the exact protocol: 249 s), 1,500 pairs 100 s (the exact one cannot run: memory); 5-14
passes for C <= 0.2, but 22-60 (the cap, not converged) for C >= 1: with the weak penalty the fit's
weakly determined directions move when a patient leaves, which a fixed Hessian follows slowly. Next
step: Newton steps solved by conjugate gradients preconditioned by that same Woodbury inverse.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import special
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

sys.path.insert(0, str(Path(__file__).parent))
from bench_lopo import make_study  # noqa: E402

GRID = np.logspace(-4, 2, 10)      # covreport.stats.penalised.PENALTY_GRID


def exact_fit(X, y, rows, C):
    """scikit-learn's fit standardised on ``rows``, as (b, v) in raw coordinates (the reference)."""
    Xt = X[rows]
    mu, sd = Xt.mean(0), Xt.std(0)
    m = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-10, max_iter=200).fit((Xt - mu) / sd, y[rows])
    v = m.coef_[0] / sd
    return m.intercept_[0] - mu @ v, v


def newton(X1, y, rows, pen, C, iters=50):
    """Exact Newton on ``rows`` (X1: features then the intercept); returns the fit and its Hessian there."""
    A, yy, w = X1[rows], y[rows], np.zeros(X1.shape[1])
    for _ in range(iters):
        p = special.expit(A @ w)
        g = pen * w + C * A.T @ (p - yy)
        step = np.linalg.solve((A.T * (C * p * (1 - p))) @ A + np.diag(pen), g)
        w -= step
        if g @ step < 1e-20:
            break
    p = special.expit(A @ w)
    return w, (A.T * (C * p * (1 - p))) @ A + np.diag(pen)


def chord(X1, y, in_s, out_rows, pens, C, w0, H, tol, max_pass=60):
    """Fits of S minus the rows ``out_rows[t]`` (padded with -1), penalty ``pens[t]``, by chord steps from
    S's fit ``w0`` with the exact Hessian of each target there, (H - U_t'U_t)^-1 by Woodbury."""
    T = len(out_rows)
    Hinv = np.linalg.inv(H)
    p0 = special.expit(X1 @ w0)
    valid = out_rows >= 0
    r = np.where(valid, out_rows, 0)
    U = np.sqrt(C * p0[r] * (1 - p0[r]) * valid)[..., None] * X1[r]        # (T, rmax, k1)
    P = U @ Hinv
    Cinv = np.linalg.inv(np.eye(r.shape[1]) - P @ U.transpose(0, 2, 1))
    mask = np.repeat(in_s[None].astype(float), T, 0)
    for t in range(T):
        mask[t, out_rows[t][valid[t]]] = 0.0
    W = np.repeat(w0[None], T, 0)
    act, colmax = np.arange(T), np.abs(X1).max(0)
    for used in range(1, max_pass + 1):
        R = (special.expit(X1 @ W[act].T) - y[:, None]) * mask[act].T * C
        G = (X1.T @ R).T + pens[act] * W[act]
        step = G @ Hinv
        Pg = np.einsum("trk,tk->tr", P[act], G)
        step += np.einsum("trk,tr->tk", P[act], np.einsum("trs,ts->tr", Cinv[act], Pg))
        W[act] -= step
        act = act[np.abs(step) @ colmax > tol]
        if len(act) == 0:
            break
    return W, used


def run(n_pat, tol, verbose):
    X, y, g = make_study(n_pat, 2 * n_pat, effect=0.15)
    y = y.astype(float)
    n, p = X.shape
    fold = np.empty(n_pat, int)
    for k, (_train, test) in enumerate(GroupKFold(5).split(X, groups=g)):
        fold[np.unique(g[test])] = k
    X1 = np.hstack([X, np.ones((n, 1))])
    rows_of = [np.flatnonzero(g == i) for i in range(n_pat)]
    rmax = max(len(r) for r in rows_of)
    shared = [fold[g] != k for k in range(5)] + [np.ones(n, bool)]
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    passes, worst, n_targets = [], 0.0, 0
    for C in GRID:
        for si, in_s in enumerate(shared):
            rows = np.flatnonzero(in_s)
            w0, H = newton(X1, y, rows, np.append(X[rows].var(0), 0.0), C)
            pats = np.unique(g[rows])
            out = np.full((len(pats), rmax), -1)
            s1, s2, m = X[rows].sum(0), (X[rows] ** 2).sum(0), len(rows)
            pens = np.zeros((len(pats), p + 1))
            for j, pt in enumerate(pats):
                out[j, :len(rows_of[pt])] = rows_of[pt]
                a, b, mm = s1 - X[rows_of[pt]].sum(0), s2 - (X[rows_of[pt]] ** 2).sum(0), m - len(rows_of[pt])
                pens[j, :p] = np.maximum(b / mm - (a / mm) ** 2, 0.0)     # the target's own variances
            W, used = chord(X1, y, in_s, out, pens, C, w0, H, tol)
            passes.append(used)
            n_targets += len(pats)
            if verbose:
                print(f"  C {C:.0e}, set {si}: {len(pats)} targets, {used} passes", flush=True)
            if C in (GRID[3], GRID[9]) and si in (0, 5):
                for j in rng.choice(len(pats), 2, replace=False):
                    b, v = exact_fit(X, y, np.setdiff1d(rows, rows_of[pats[j]]), C)
                    exact = special.expit(X1 @ np.append(v, b))
                    worst = max(worst, np.abs(exact - special.expit(X1 @ W[j])).max())
    print(f"{2 * n_pat} pairs / {n_pat} patients: {n_targets} chord targets in {time.perf_counter() - t0:.1f} s "
          f"(with the checks), passes per (set, C) median {np.median(passes):g}, max {max(passes)}; "
          f"max |dp| vs scikit-learn on 8 targets {worst:.1e}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[200])
    parser.add_argument("--tol", type=float, default=1e-6, help="stop when no linear predictor moves more")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    for n_pat in args.patients:
        run(n_pat, args.tol, args.verbose)


if __name__ == "__main__":
    main()
