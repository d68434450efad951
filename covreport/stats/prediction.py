"""Leave-one-patient-out (LOPO) prediction of the pair outcome, with a permutation test.

Binary task: Worse (positive, 1) against Improved (0), from one CXR's pooled
DenseNet features. The pipeline, as the study describes it:

1. chi-square feature selection (:func:`sklearn.feature_selection.chi2`),
   keeping the features with p < 0.05; if none passes, the single feature
   with the lowest p;
2. ``sklearn.linear_model.LogisticRegression()`` with its defaults (L2
   penalty, C = 1, intercept unpenalised, lbfgs);
3. a pair is predicted Worse when its out-of-fold probability is >= 0.5.

Every fold leaves out all pairs of one patient, from both selection and
fitting. A training fold holding one class only predicts that class
(probability 1.0 or 0.0). Two protocols: ``nested`` selects the features inside
each fold on the training pairs only; ``global`` selects them once on all
pairs and cross-validates the model only (the original study's protocol,
optimistic because the held-out pairs take part in the selection).

Fast path
---------
The permutation test reruns the whole pipeline a thousand times, so the
default solver (``solver="fast"``) computes the same numbers without a
Python loop over folds:

* chi-square statistics of every fold at once, by subtracting the held-out
  patient's feature and class sums from the totals (the formula of
  scikit-learn's ``chi2``: observed sums per class against the feature
  totals times the class frequencies); where the held-out patient holds
  more than half of a total, that fold's sums are recomputed from its
  training pairs, so an all-zero training column stays exactly 0 (NaN
  statistic, as in scikit-learn) and no precision is lost;
* the L2-penalised logistic regression minimises
  ``0.5 ||w||^2 + C sum_i log-loss_i`` (C = 1, the intercept unpenalised),
  which is strictly convex with a unique optimum; scikit-learn's lbfgs stops
  near it (tol=1e-4: out-of-fold probabilities typically within ~1e-3), the
  fast path goes to it:

  - ``solver="newton"``: damped Newton iterations batched over folds (the
    held-out pairs weighted 0), solved in the n x n dual form by Woodbury's
    identity when a fold keeps more features than pairs;
  - ``solver="chord"`` (large studies): each distinct feature set is fitted
    on all pairs, then each fold takes chord steps from its set's fit with
    its Hessian there (the set's all-pairs Hessian minus the held-out pairs,
    by Woodbury's identity, so one inverse serves all folds of a set); the
    first step needs no pass over the data (the training gradient at the
    all-pairs fit is minus the held-out pairs' part). A fold that does not
    converge is refitted by Newton.

  ``solver="fast"`` picks chord from 400 pairs on, Newton below. The fast
  path runs with single-threaded BLAS (its work is many small products).

``solver="sklearn"`` runs the literal pipeline (scikit-learn's ``chi2`` and
``LogisticRegression()`` fold by fold) and is the reference the tests compare
the fast path against.

References
----------
.. [1] Duchesne S, Gourdeau D, et al. Tracking and predicting COVID-19
   radiological trajectory using deep learning on chest X-rays: initial
   accuracy testing. medRxiv 2020.05.01.20086207.
.. [2] Ambroise C, McLachlan GJ. Selection bias in gene extraction on the
   basis of microarray gene-expression data. PNAS 2002;99:6562-6566
   (selection outside the cross-validation is optimistic).
.. [3] Ojala M, Garriga GC. Permutation tests for studying classifier
   performance. JMLR 2010;11:1833-1863.
.. [4] Phipson B, Smyth GK. Permutation p-values should never be zero.
   Stat Appl Genet Mol Biol 2010;9:39 (p = (1 + b) / (1 + N)).
.. [5] Nocedal J, Wright SJ. Numerical Optimization, 2nd ed. 2006, ch. 3
   (Newton's method with backtracking line search).
"""

import math
import warnings

import numpy as np
import pandas as pd
from scipy import special

from covreport.constants import IMPROVED, OUTCOMES, WORSE, feature_columns
from covreport.errors import StatsError
from covreport.stats._util import check_alpha, to_python

#: Threshold of the chi-square feature selection (keep features with p < 0.05).
SELECTION_ALPHA = 0.05

#: Protocols of :func:`lopo_predict`.
PROTOCOLS = ("nested", "global")

#: Solvers of :func:`lopo_predict`; "fast" picks "newton" or "chord".
SOLVERS = ("fast", "newton", "chord", "sklearn")

#: A pair is predicted Worse when its out-of-fold probability is >= this.
THRESHOLD = 0.5

# Convergence of the solvers: Newton stops after the step whose decrement
# g' H^-1 g (twice the objective gap, to second order) is below _NEWTON_TOL;
# chord iterations stop when a step moves no linear predictor by more than _CHORD_TOL.
_NEWTON_TOL = 1e-12
_NEWTON_MAX_ITER = 100
_CHORD_TOL = 1e-6
_CHORD_MAX_ITER = 40
# BLAS threads of the fast path (see _blas_limits).
_BLAS_THREADS = 1
# chord targets sharing a feature set with at least this many share its Hessian inverse
_SHARED_MIN = 8
# "fast" uses chord iterations above this many pairs.
_CHORD_MIN_PAIRS = 400

PERMUTATION_METHOD = (
    "permutation test of the accuracy: whole patients' outcome vectors permuted between "
    "patients with the same number of pairs (numpy default_rng(seed)), the whole pipeline "
    "rerun each time; p = (1 + #{{permuted accuracy >= observed}}) / (1 + N), N = {n}"
)


# --------------------------------------------------------------------------- inputs


def _feature_matrix(X):
    """Return (float64 array, feature names) after checking X is finite and non-negative."""
    if isinstance(X, pd.DataFrame):
        names = [str(c) for c in X.columns]
        try:
            values = X.to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            bad = [str(c) for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
            raise StatsError(f"feature column(s) {bad[:5]} are not numeric; the features must be "
                             "numbers (the pooled DenseNet outputs feat_0000 ... feat_1023)") from None
    else:
        try:
            values = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError):
            raise StatsError("the feature matrix must be numeric") from None
        if values.ndim != 2:
            raise StatsError(f"the feature matrix must be two-dimensional (pairs x features), "
                             f"got shape {values.shape}")
        names = feature_columns(values.shape[1])
    if values.shape[1] == 0:
        raise StatsError("the feature matrix has no feature columns")
    finite = np.isfinite(values)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise StatsError(f"feature column {names[j]!r} has a missing or infinite value in row {i} "
                         "(counting from 0); drop that pair or re-score its image")
    negative = values < 0
    if negative.any():
        i, j = np.argwhere(negative)[0]
        raise StatsError(f"feature column {names[j]!r} has a negative value ({values[i, j]:g} in row "
                         f"{i}, counting from 0); chi-square feature selection needs non-negative "
                         "features, as the DenseNet's pooled ReLU outputs are: check that the "
                         "feat_* columns hold those pooled features")
    return np.ascontiguousarray(values), names


def _outcome_vector(y, n):
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise StatsError(f"the outcome vector must have one value per pair ({n}), got shape {y.shape}")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise StatsError("the outcome vector must hold 0 (Improved) and 1 (Worse) only") from None
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StatsError(f"the outcome vector must hold 0 (Improved) and 1 (Worse) only; "
                         f"position {i} holds {y[i]!r}")
    return yf


def _group_codes(groups, n):
    groups = np.asarray(groups, dtype=object)
    if groups.ndim != 1 or len(groups) != n:
        raise StatsError(f"groups (patient ids) must have one value per pair ({n}), got shape {groups.shape}")
    codes, uniques = pd.factorize(pd.Series(groups), sort=False)
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise StatsError(f"patient id missing at position {i}; every pair needs its patient id")
    # Canonical fold order: patients sorted by id (as text when ids mix types).
    keys = [str(u) for u in uniques] if len({type(u) for u in uniques}) > 1 else list(uniques)
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[np.argsort(np.array(keys, dtype=object), kind="stable")] = np.arange(len(uniques))
    codes = rank[codes]
    ordered = np.empty(len(uniques), dtype=object)
    ordered[rank] = np.array(list(uniques), dtype=object)
    return codes, ordered


def _check_protocol(protocol):
    if protocol not in PROTOCOLS:
        raise StatsError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


# --------------------------------------------------------------------------- selection


def _select(pvalues, alpha):
    """Boolean masks (rows) of the kept features: p < alpha, else the single lowest p."""
    pv = np.atleast_2d(pvalues)
    keep = pv < alpha
    none = ~keep.any(axis=1)
    if none.any():
        best = np.where(np.isnan(pv[none]), np.inf, pv[none]).argmin(axis=1)
        keep[np.flatnonzero(none), best] = True
    return keep


def _chi2_stat(n, n1, total, obs1):
    """scikit-learn's chi2 statistic of a 0/1 outcome from sums (arrays broadcast over folds).

    ``total`` holds each feature's sum over the pairs and ``obs1`` its sum over
    the class-1 pairs; ``n`` and ``n1`` the numbers of pairs (1-d over folds
    when the sums are 2-d). With q1 = n1/n, q0 = 1 - q1, the expected sums are
    q0*total and q1*total, and sum over classes (O - E)^2 / E reduces to
    (obs1 - q1*total)^2 / (q0 q1 total), since O0 - E0 = -(O1 - E1).
    A zero total gives NaN, as in scikit-learn.
    """
    n = np.asarray(n, dtype=np.float64)
    q1 = np.asarray(n1, dtype=np.float64) / n
    q0 = 1.0 - q1
    if q1.ndim:
        q1, q0 = q1[:, None], q0[:, None]
    dev = obs1 - q1 * total
    with np.errstate(invalid="ignore", divide="ignore"):
        return dev * dev / ((q0 * q1) * total)


def _select_from_stat(stat, alpha):
    """Rows of kept features from chi2 statistics: p < alpha, else the single lowest p.

    p = chdtrc(1, stat) as scikit-learn computes it; p < alpha is decided on
    the statistic (p falls as the statistic rises) except within a relative
    1e-9 of the critical value, where p itself is computed.
    """
    stat = np.atleast_2d(stat)
    crit = special.chdtri(1, alpha)
    keep = stat > crit * (1 + 1e-9)
    near = np.abs(stat - crit) <= crit * 1e-9
    if near.any():
        keep[near] = special.chdtrc(1, stat[near]) < alpha
    for r in np.flatnonzero(~keep.any(axis=1)):
        # the lowest p is at the highest statistic; p is computed for the
        # statistics within rounding of the highest, so that ties in p go to
        # the first feature as np.argmin over scikit-learn's p would have it
        row = np.where(np.isnan(stat[r]), -np.inf, stat[r])
        top = row.max()
        if not np.isfinite(top):
            keep[r, 0] = True
            continue
        cand = np.flatnonzero(row >= top - 1e-6 * abs(top))
        keep[r, cand[np.argmin(special.chdtrc(1, row[cand]))]] = True
    return keep


# --------------------------------------------------------------------------- solvers


def _spd_solve(M, b):
    """Solve M x = b for a batch of symmetric positive-definite M.

    numpy's batched LU solver (a C loop over the batch); run it with
    single-threaded BLAS (:func:`_blas_limits`), as threads make small
    factorisations erratic. A singular matrix falls back to least squares.
    """
    try:
        return np.linalg.solve(M, b)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(Mi, bi, rcond=None)[0] for Mi, bi in zip(M, b)])


def _objective(z, y, m, w, pen):
    """0.5 w'Pw + sum_i m_i log-loss(z_i, y_i) for a batch (rows of z, m and w)."""
    loss = np.logaddexp(0.0, z) - y * z
    return 0.5 * np.einsum("fk,k,fk->f", w, pen, w) + (m * loss).sum(axis=1)


def _newton_batch(Xa, y, m, w0):
    """Minimise 0.5 w'Pw + sum_i m_i log-loss_i for a batch of problems.

    Parameters
    ----------
    Xa : ndarray (F, n, k+1)
        Design matrices, the last column the intercept (ones); padding
        columns are all zero (their weight stays exactly 0).
    y : ndarray (n,)
        0/1 outcomes shared by the problems.
    m : ndarray (F, n)
        Row weights, 1 for training pairs and 0 for held-out pairs.
    w0 : ndarray (F, k+1)
        Starting points.

    Returns
    -------
    (ndarray (F, k+1), ndarray (F,) of bool)
        Solutions and whether each converged.

    Notes
    -----
    Damped Newton with Armijo backtracking (Nocedal & Wright 2006, ch. 3),
    P = diag(1, ..., 1, 0) (the intercept unpenalised). The Newton system is
    solved in the primal ((k+1) x (k+1)) when k <= n, otherwise in the n x n
    dual form by Woodbury's identity:
    (I + X'WX)^-1 v = v - X'D (I + D K D)^-1 D X v with D = W^(1/2), K = XX',
    and the intercept by block elimination.
    """
    Xa = np.ascontiguousarray(Xa, dtype=np.float64)
    F, n, k1 = Xa.shape
    pen = np.ones(k1)
    pen[-1] = 0.0
    w = np.array(w0, dtype=np.float64, copy=True)
    z = np.einsum("fnk,fk->fn", Xa, w)
    f = _objective(z, y, m, w, pen)
    done = np.zeros(F, dtype=bool)
    dual = k1 - 1 > n
    if dual:
        Xf_all = np.ascontiguousarray(Xa[..., :-1])
        K_all = Xf_all @ Xf_all.transpose(0, 2, 1)
        eye_n = np.eye(n)
    for _ in range(_NEWTON_MAX_ITER):
        act = np.flatnonzero(~done)
        if len(act) == 0:
            break
        every = len(act) == F
        X = Xa if every else Xa[act]
        ma, wa, za, fa = m[act], w[act], z[act], f[act]
        p = special.expit(za)
        r = ma * (p - y)
        g = pen * wa + np.einsum("fnk,fn->fk", X, r)
        W = ma * p * (1.0 - p)
        if not dual:
            H = (X * W[..., None]).transpose(0, 2, 1) @ X
            H[:, np.arange(k1), np.arange(k1)] += pen
            step = _spd_solve(H, g[..., None])[..., 0]
        else:
            Xf = Xf_all if every else Xf_all[act]
            K = K_all if every else K_all[act]
            D = np.sqrt(W)
            B = D[:, :, None] * K * D[:, None, :] + eye_n
            gw, gb = g[:, :-1], g[:, -1]
            u = np.einsum("fnk,fn->fk", Xf, W)
            V = np.stack([gw, u], axis=2)                              # (F, k, 2)
            sol = _spd_solve(B, D[..., None] * np.einsum("fnk,fkj->fnj", Xf, V))
            MinvV = V - np.einsum("fnk,fnj->fkj", Xf, D[..., None] * sol)
            Mg, Mu = MinvV[..., 0], MinvV[..., 1]
            c = W.sum(axis=1)
            db = (gb - (u * Mg).sum(1)) / (c - (u * Mu).sum(1))
            step = np.concatenate([Mg - db[:, None] * Mu, db[:, None]], axis=1)
        dec = (g * step).sum(axis=1)
        dz = np.einsum("fnk,fk->fn", X, step)
        t = np.ones(len(act))
        new_w, new_z = wa - step, za - dz
        new_f = _objective(new_z, y, ma, new_w, pen)
        pending = ~(new_f <= fa - 1e-4 * dec + 1e-13 * np.abs(fa))
        for _ls in range(60):
            if not pending.any():
                break
            i = np.flatnonzero(pending)
            t[i] *= 0.5
            new_w[i] = wa[i] - t[i, None] * step[i]
            new_z[i] = za[i] - t[i, None] * dz[i]
            new_f[i] = _objective(new_z[i], y, ma[i], new_w[i], pen)
            ok = new_f[i] <= fa[i] - 1e-4 * t[i] * dec[i] + 1e-13 * np.abs(fa[i])
            pending[i[ok]] = False
        # a step that the line search could not accept is not taken
        keep = ~pending
        w[act[keep]], z[act[keep]], f[act[keep]] = new_w[keep], new_z[keep], new_f[keep]
        finished = (dec <= _NEWTON_TOL) | pending | ~np.isfinite(dec)
        done[act[finished]] = True
    return w, done


class _Lopo:
    """Precomputed structure of one LOPO problem (features and patients), reused across outcomes."""

    def __init__(self, X, codes, n_groups):
        from scipy import sparse

        self.X = X
        self.n, self.p = X.shape
        self.codes = codes
        self.n_groups = n_groups
        order = np.argsort(codes, kind="stable")
        self.order = order
        sizes = np.bincount(codes, minlength=n_groups)
        self.sizes = sizes
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.starts = starts
        # patient x pair indicator: per-patient sums are one sparse product
        self.member = sparse.csr_matrix((np.ones(self.n), (codes, np.arange(self.n))),
                                        shape=(n_groups, self.n))
        self.total = X.sum(axis=0)
        self.total_g = np.asarray(self.member @ X)
        rmax = int(sizes.max())
        pos = starts[:, None] + np.arange(rmax)[None, :]
        self.row_valid = np.arange(rmax)[None, :] < sizes[:, None]
        pos = np.where(self.row_valid, pos, starts[:, None])
        self.held_rows = order[pos]                     # (G, rmax), padded by repeats

    # ------------------------------------------------------------------ helpers
    def fold_rows(self, g):
        return self.order[self.starts[g]:self.starts[g] + self.sizes[g]]

    def select_all(self, y, alpha):
        """Selection on all pairs (the global protocol; the warm start of nested)."""
        stat = _chi2_stat(self.n, y.sum(), self.total, self.X.T @ y)
        return _select_from_stat(stat, alpha)[0]

    def fold_statistics(self, y, folds, chunk=256):
        """Yield (slice, chi2 statistics) of the folds in ``folds``, ``chunk`` folds at a time.

        Each fold's statistics are scikit-learn's chi2 on its training pairs:
        the totals minus the held-out patient's sums. Where the held-out
        patient holds more than half of a total (so that the subtraction could
        lose precision, or leave a rounding residue instead of an exact 0),
        the training sums are recomputed directly from the training pairs.
        """
        from scipy import sparse

        weighted = sparse.csr_matrix((y, (self.codes, np.arange(self.n))), shape=self.member.shape)
        n1_g = self.member @ y
        obs1_g = np.asarray(weighted @ self.X)
        obs1 = self.X.T @ y
        n1 = y.sum()
        for s in range(0, len(folds), chunk):
            f = folds[s:s + chunk]
            tg, og = self.total_g[f], obs1_g[f]
            total = self.total - tg
            o1 = obs1 - og
            risky = (tg > 0.5 * self.total) | (og > 0.5 * obs1)
            for r in np.flatnonzero(risky.any(axis=1)):
                cols = np.flatnonzero(risky[r])
                train = self.codes != f[r]
                Xt = self.X[np.ix_(train, cols)]
                total[r, cols] = Xt.sum(axis=0)
                o1[r, cols] = y[train] @ Xt
            yield slice(s, s + len(f)), _chi2_stat(self.n - self.sizes[f], n1 - n1_g[f], total, o1)

    def select_folds(self, y, folds, alpha):
        """Selection of each fold in ``folds`` on its training pairs (nested protocol)."""
        sel = np.empty((len(folds), self.p), dtype=bool)
        for sl, stat in self.fold_statistics(y, folds):
            sel[sl] = _select_from_stat(stat, alpha)
        return sel

    # ------------------------------------------------------------------ pipeline
    def run(self, y, protocol, alpha, solver="fast", fold_hook=None):
        G, n, p = self.n_groups, self.n, self.p
        if fold_hook is not None:
            all_rows = np.arange(n)
            for g in range(G):
                test = self.fold_rows(g)
                fold_hook(np.setdiff1d(all_rows, test, assume_unique=True), np.sort(test))
        n1_g = np.bincount(self.codes, weights=y, minlength=G)
        n1_t = y.sum() - n1_g
        n_t = n - self.sizes
        one_class = (n1_t == 0) | (n1_t == n_t)
        prob = np.empty(n)
        for g in np.flatnonzero(one_class):
            prob[self.fold_rows(g)] = 1.0 if n1_t[g] > 0 else 0.0
        two = np.flatnonzero(~one_class)
        counts = np.zeros(p, dtype=np.int64)
        if len(two) == 0:
            return prob, counts, int(one_class.sum())

        sel_all = self.select_all(y, alpha)
        if protocol == "global":
            sel = np.broadcast_to(sel_all, (len(two), p))
        else:
            sel = self.select_folds(y, two, alpha)
        counts += sel.sum(axis=0)

        union = np.flatnonzero(sel.any(axis=0))
        u = len(union)
        pos_in_union = np.full(p, u, dtype=np.int64)          # u = the zero dummy column
        pos_in_union[union] = np.arange(u)
        ksel = sel[:, union].sum(axis=1)
        kmax = int(ksel.max())
        # positions (in union space) of each fold's features, padded with the dummy
        idx = np.full((len(two), kmax + 1), u, dtype=np.int64)
        rank = np.cumsum(sel[:, union], axis=1) - 1
        rr, cc = np.nonzero(sel[:, union])
        idx[rr, rank[rr, cc]] = cc
        idx[:, kmax] = u + 1                                  # intercept
        A = np.concatenate([self.X[:, union], np.zeros((n, 1)), np.ones((n, 1))], axis=1)

        # warm start: the fit on all pairs with the all-pairs selection (within the union)
        base = np.zeros(u + 2)
        base_feats = pos_in_union[sel_all]
        base_feats = base_feats[base_feats < u]
        if len(base_feats) and 0 < y.sum() < n:
            Xb = A[:, np.concatenate([base_feats, [u + 1]])][None]
            wb, _ = _newton_batch(Xb, y, np.ones((1, n)), np.zeros((1, len(base_feats) + 1)))
            base[base_feats] = wb[0, :-1]
            base[u + 1] = wb[0, -1]
        else:
            ybar = min(max(y.mean(), 1e-12), 1 - 1e-12)
            base[u + 1] = math.log(ybar / (1 - ybar))

        engine = solver
        if engine == "fast":
            engine = "chord" if (n >= _CHORD_MIN_PAIRS and kmax + 1 < n // 2) else "newton"
        if engine == "chord":
            W = self._chord(A, y, two, idx, base)
        else:
            W = self._newton_folds(A, y, two, idx, base)
        # out-of-fold probabilities of the held-out pairs
        rows = self.held_rows[two]                             # (F, rmax)
        Xt = A[rows[:, :, None], idx[:, None, :]]              # (F, rmax, kmax+1)
        zt = np.einsum("frk,fk->fr", Xt, W)
        pt = special.expit(zt)
        valid = self.row_valid[two]
        prob[rows[valid]] = pt[valid]
        return prob, counts, int(one_class.sum())

    def _newton_targets(self, A, y, idx, rows, row_valid, w0):
        """Exact damped Newton for each target (feature positions ``idx``, held-out ``rows``)."""
        n = self.n
        T, k1 = idx.shape
        out = np.empty((T, k1))
        block = max(1, int(3_000_000 // (n * k1 + (n * n if k1 - 1 > n else 0))))
        for s in range(0, T, block):
            sl = slice(s, s + block)
            Xa = np.ascontiguousarray(A[:, idx[sl]].transpose(1, 0, 2))     # (F, n, k+1)
            m = np.ones((Xa.shape[0], n))
            if rows.shape[1]:
                rr = np.where(row_valid[sl], rows[sl], -1)
                fr = np.broadcast_to(np.arange(Xa.shape[0])[:, None], rr.shape)
                m[fr[rr >= 0], rr[rr >= 0]] = 0.0
            w, conv = _newton_batch(Xa, y, m, w0[sl])
            if not conv.all():
                warnings.warn(f"{int((~conv).sum())} LOPO fit(s) stopped before Newton convergence",
                              RuntimeWarning, stacklevel=3)
            out[sl] = w
        return out

    def _newton_folds(self, A, y, folds, idx, base):
        return self._newton_targets(A, y, idx, self.held_rows[folds], self.row_valid[folds], base[idx])

    def _chord(self, A, y, folds, idx, base):
        """Chord iterations, each fold with its own Hessian at the all-pairs fit.

        Level 1 fits each distinct feature set on all pairs (from the all-pairs
        fit of the all-pairs selection); level 2 starts each fold from its
        set's fit, whose training gradient is minus the held-out pairs' part,
        so the first step needs no pass over the data. Targets that do not
        converge are refitted by Newton.
        """
        u2 = A.shape[1]
        z0 = A @ base
        p0 = special.expit(z0)
        W0 = p0 * (1.0 - p0)
        HU = (A * W0[:, None]).T @ A
        pen_u = np.ones(u2)
        pen_u[-1] = 0.0
        HU[np.arange(u2), np.arange(u2)] += pen_u
        dummy = u2 - 2
        HU[dummy, :] = 0.0
        HU[:, dummy] = 0.0
        ctx = (A, np.ascontiguousarray(A.T), np.abs(A).max(axis=0), HU, W0, y, dummy)
        rows, row_valid = self.held_rows[folds], self.row_valid[folds]
        sets, inverse = np.unique(idx, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        if len(sets) <= max(1, len(folds) // 3):
            none = np.zeros((len(sets), 0), dtype=np.int64)
            set_w, failed = _chord_batch(ctx, sets, none, none.astype(bool), base[sets], None)
            if len(failed):
                set_w[failed] = self._newton_targets(A, y, sets[failed], none[failed],
                                                     none[failed].astype(bool), base[sets[failed]])
            w0 = set_w[inverse]
            # training gradient at the set's all-pairs fit: minus the held-out pairs' part
            AR = A[rows[:, :, None], idx[:, None, :]]
            resid = (special.expit(np.einsum("frk,fk->fr", AR, w0)) - y[rows]) * row_valid
            g0 = -np.einsum("frk,fr->fk", AR, resid)
            g0[idx == dummy] = 0.0
        else:
            w0, g0 = base[idx], None
        out, failed = _chord_batch(ctx, idx, rows, row_valid, w0, g0)
        if len(failed):
            out[failed] = self._newton_targets(A, y, idx[failed], rows[failed], row_valid[failed],
                                               base[idx[failed]])
        return out


def _chord_batch(ctx, idx, rows, row_valid, w0, g0):
    """Chord iterations for a batch of targets, grouped by feature set.

    Targets sharing a feature set with at least _SHARED_MIN others share the
    inverse of the set's all-pairs Hessian and take their held-out pairs out
    of it by Woodbury's identity (:func:`_chord_shared`); the others get
    their own Hessian (:func:`_chord_each`). Returns the solutions and the
    indices of targets that did not converge.
    """
    out = np.array(w0, dtype=np.float64, copy=True)
    sets, inverse = np.unique(idx, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.bincount(inverse, minlength=len(sets))
    failed = []
    rest = np.flatnonzero(sizes[inverse] < _SHARED_MIN)
    for j in np.flatnonzero(sizes >= _SHARED_MIN):
        t = np.flatnonzero(inverse == j)
        w, bad = _chord_shared(ctx, sets[j], rows[t], row_valid[t], out[t],
                               None if g0 is None else g0[t])
        out[t] = w
        failed.extend(t[bad])
    if len(rest):
        w, bad = _chord_each(ctx, idx[rest], rows[rest], row_valid[rest], out[rest],
                             None if g0 is None else g0[rest])
        out[rest] = w
        failed.extend(rest[bad])
    return out, np.array(sorted(failed), dtype=np.int64)


def _chord_shared(ctx, ib, rows, row_valid, w0, g0):
    """Chord iterations for targets that share the feature positions ``ib``.

    With H_S the set's penalised Hessian on all pairs at the all-pairs fit and
    U = W0_R^(1/2) A_R a target's held-out rows, its Hessian is H_S - U'U and
    (H_S - U'U)^-1 g = H_S^-1 g + P' (I - P U')^-1 P g with P = U H_S^-1
    (Woodbury), so that one k x k inverse serves every target.
    """
    A, _At, colmax, HU, W0, y, dummy = ctx
    n, u2 = A.shape
    k1 = len(ib)
    valid = ib != dummy
    H = HU[np.ix_(ib, ib)] * (valid[:, None] & valid[None, :])
    H[np.arange(k1), np.arange(k1)] += ~valid
    Hinv = _spd_solve(H, np.eye(k1))
    AS = np.ascontiguousarray(A[:, ib])                          # (n, k1); dummy columns are 0
    ASt = np.ascontiguousarray(AS.T)
    pen = np.where(ib == u2 - 1, 0.0, 1.0)
    cmax = colmax[ib]
    out = np.array(w0, dtype=np.float64, copy=True)
    T = len(out)
    rmax = rows.shape[1]
    failed = []
    block = max(1, min(512, int(20_000_000 // (n + k1 * (rmax + 1)))))
    for s in range(0, T, block):
        sl = slice(s, s + block)
        rws, rv = rows[sl], row_valid[sl]
        nb = len(rws)
        if rmax:
            U = np.sqrt(W0[rws] * rv)[..., None] * AS[rws]           # (nb, r, k1)
            P = U @ Hinv                                             # (nb, r, k1)
            C = np.eye(rmax) - P @ U.transpose(0, 2, 1)              # (nb, r, r)
            Cinv = _spd_solve(C, np.broadcast_to(np.eye(rmax), C.shape))

        def solve(g, sel):
            x = g @ Hinv
            if rmax:
                Pg = np.einsum("frk,fk->fr", P[sel], g)
                x += np.einsum("frk,fr->fk", P[sel], np.einsum("frs,fs->fr", Cinv[sel], Pg))
            return x

        w = out[sl]
        act = np.arange(nb)
        for it in range(_CHORD_MAX_ITER):
            if len(act) == 0:
                break
            if it == 0 and g0 is not None:
                g = g0[sl]
            else:
                R = special.expit(AS @ w[act].T)                     # (n, na)
                R -= y[:, None]
                if rmax:
                    ra = rws[act]
                    R[ra, np.broadcast_to(np.arange(len(act))[:, None], ra.shape)] = 0.0
                g = (ASt @ R).T + pen * w[act]
                g[:, ~valid] = 0.0
            step = solve(g, act)
            w[act] -= step
            moved = (np.abs(step) * cmax).sum(axis=1)
            bad = ~np.isfinite(moved)
            failed.extend(act[bad] + s)
            act = act[~bad & (moved > _CHORD_TOL)]
        failed.extend(act + s)
        out[sl] = w
    return out, np.array(sorted(failed), dtype=np.int64)


def _chord_each(ctx, idx, rows, row_valid, w0, g0):
    """Chord iterations w <- w - H_t^-1 g_t(w) for a batch of targets.

    ``ctx`` = (A, A', column maxima of |A|, H_U, W0, y, dummy): the union
    design (dummy zero column, then intercept), the penalised Hessian on all
    pairs at the all-pairs fit and its weights. Each target's Hessian is H_U
    restricted to its features minus its held-out pairs' part. ``g0``, when
    given, is the gradient at ``w0`` (no pass over the data for the first
    step). Returns the solutions and the indices of targets that did not
    converge within _CHORD_MAX_ITER steps or went non-finite.
    """
    A, At, colmax, HU, W0, y, dummy = ctx
    n, u2 = A.shape
    T, k1 = idx.shape
    out = np.array(w0, dtype=np.float64, copy=True)
    failed = []
    block = max(1, min(256, int(20_000_000 // (n + k1 * k1))))
    for s in range(0, T, block):
        sl = slice(s, s + block)
        ib = idx[sl]
        nb = len(ib)
        valid = ib != dummy                                       # intercept counts as valid
        H = HU[ib[:, :, None], ib[:, None, :]]
        H *= valid[:, :, None] & valid[:, None, :]
        H[:, np.arange(k1), np.arange(k1)] += ~valid
        rws, rv = rows[sl], row_valid[sl]
        if rws.shape[1]:
            AR = A[rws[:, :, None], ib[:, None, :]]               # (nb, rmax, k1)
            H -= (AR * (W0[rws] * rv)[..., None]).transpose(0, 2, 1) @ AR
        Hinv = _spd_solve(H, np.broadcast_to(np.eye(k1), H.shape))
        pen = np.where(ib == u2 - 1, 0.0, 1.0)
        w = out[sl]
        act = np.arange(nb)
        g_first = None if g0 is None else g0[sl]
        for it in range(_CHORD_MAX_ITER):
            if len(act) == 0:
                break
            ia = ib[act]
            if it == 0 and g_first is not None:
                g = g_first
            else:
                ca = np.arange(len(act))
                Wfull = np.zeros((u2, len(act)))
                Wfull[ia.T, ca[None, :]] = w[act].T
                Wfull[dummy] = 0.0
                R = special.expit(A @ Wfull)
                R -= y[:, None]
                if rws.shape[1]:
                    ra = rws[act]
                    R[ra, np.broadcast_to(ca[:, None], ra.shape)] = 0.0   # held-out pairs
                g = (At @ R)[ia, ca[:, None]] + pen[act] * w[act]
                g[~valid[act]] = 0.0
            step = np.einsum("fij,fj->fi", Hinv[act], g)
            w[act] -= step
            # bound on how far the step moved any linear predictor
            moved = (np.abs(step) * colmax[ia]).sum(axis=1)
            bad = ~np.isfinite(moved)
            failed.extend(act[bad] + s)
            act = act[~bad & (moved > _CHORD_TOL)]
        failed.extend(act + s)
        out[sl] = w
    return out, np.array(sorted(set(int(f) for f in failed)), dtype=np.int64)


def _reference_run(X, y, codes, n_groups, protocol, alpha, fold_hook=None, logreg=None):
    """The literal pipeline with scikit-learn, fold by fold (the tests' reference).

    ``logreg`` holds extra LogisticRegression arguments (the tests tighten
    lbfgs's tolerance to compare optima); None keeps scikit-learn's defaults.
    """
    from sklearn.feature_selection import chi2
    from sklearn.linear_model import LogisticRegression

    n, p = X.shape
    prob = np.empty(n)
    counts = np.zeros(p, dtype=np.int64)
    one_class = 0
    sel_global = None
    if protocol == "global" and 0 < y.sum() < n:
        sel_global = _select(chi2(X, y)[1], alpha)[0]
    for g in range(n_groups):
        test = np.flatnonzero(codes == g)
        train = np.flatnonzero(codes != g)
        if fold_hook is not None:
            fold_hook(train, test)
        yt = y[train]
        if yt.min() == yt.max():
            prob[test] = float(yt[0])
            one_class += 1
            continue
        if protocol == "global":
            sel = sel_global
        else:
            sel = _select(chi2(X[train], yt)[1], alpha)[0]
        counts += sel
        model = LogisticRegression(**(logreg or {})).fit(X[np.ix_(train, np.flatnonzero(sel))], yt.astype(int))
        prob[test] = model.predict_proba(X[np.ix_(test, np.flatnonzero(sel))])[:, 1]
    return prob, counts, one_class


def _blas_limits():
    """Run the fast path with single-threaded BLAS (scoped; restored on exit).

    Its work is many small batched matrix products and factorisations, for
    which BLAS threads cost more than they give, and far more when other
    processes share the cores.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=_BLAS_THREADS, user_api="blas")


def _confusion(y, predicted):
    y = y.astype(bool)
    predicted = predicted.astype(bool)
    return {"tp": int((predicted & y).sum()), "fp": int((predicted & ~y).sum()),
            "fn": int((~predicted & y).sum()), "tn": int((~predicted & ~y).sum())}


def _prepare(X, y, groups):
    values, names = _feature_matrix(X)
    n = values.shape[0]
    yf = _outcome_vector(y, n)
    codes, patients = _group_codes(groups, n)
    if len(patients) < 2:
        raise StatsError(f"leave-one-patient-out needs at least 2 patients, got {len(patients)}")
    return values, names, yf, codes, patients


def lopo_predict(X, y, groups, *, protocol="nested", alpha=SELECTION_ALPHA, fold_hook=None, solver="fast"):
    """Leave-one-patient-out prediction: chi-square selection, then logistic regression.

    Parameters
    ----------
    X : pandas.DataFrame or ndarray (n_pairs, n_features)
        Non-negative features, one row per pair. DataFrame columns are the
        feature names; an array's are ``feat_0000``, ``feat_0001``, ...
    y : array_like of 0/1
        1 = Worse (positive class), 0 = Improved.
    groups : array_like
        Patient id of each pair; a fold leaves out all pairs of one patient.
    protocol : {"nested", "global"}
        ``nested``: selection inside each fold on its training pairs;
        ``global``: selection once on all pairs (optimistic).
    alpha : float
        Threshold of the chi-square selection (keep p < alpha; 0.05 in the study).
    fold_hook : callable, optional
        Called as ``fold_hook(train_idx, test_idx)`` once per fold (patients in
        sorted order) with the row indices of the pairs used for selection
        (nested) and fitting, and of the held-out pairs.
    solver : {"fast", "newton", "chord", "sklearn"}
        ``sklearn`` runs scikit-learn's ``chi2`` and ``LogisticRegression()``
        fold by fold; the others compute the same pipeline vectorised
        (module docstring).

    Returns
    -------
    dict
        ``probabilities`` (out-of-fold, per pair, input order), ``predicted``
        (1 when the probability is >= 0.5), ``confusion`` {tp, fp, fn, tn},
        ``selected_features`` {feature: number of folds that selected it}
        (features selected at least once, in column order), ``n_folds``
        (= patients), ``one_class_folds`` (folds whose training pairs hold one
        class: they predict it and select nothing), ``protocol``, ``solver``.

    Raises
    ------
    StatsError
        Negative, missing or non-numeric features (naming the column),
        outcomes other than 0/1, missing patient ids, fewer than 2 patients,
        or an unknown protocol.
    """
    protocol = _check_protocol(protocol)
    alpha = check_alpha(alpha)
    if solver not in SOLVERS:
        raise StatsError(f"solver must be one of {SOLVERS}, got {solver!r}")
    values, names, yf, codes, patients = _prepare(X, y, groups)
    if solver == "sklearn":
        prob, counts, one = _reference_run(values, yf, codes, len(patients), protocol, alpha, fold_hook)
    else:
        with _blas_limits():
            prob, counts, one = _Lopo(values, codes, len(patients)).run(yf, protocol, alpha, solver,
                                                                         fold_hook)
    predicted = (prob >= THRESHOLD).astype(np.int64)
    return {
        "probabilities": prob,
        "predicted": predicted,
        "confusion": _confusion(yf, predicted),
        "selected_features": {names[j]: int(counts[j]) for j in np.flatnonzero(counts)},
        "n_folds": len(patients),
        "one_class_folds": one,
        "protocol": protocol,
        "solver": solver,
    }


# --------------------------------------------------------------------------- permutations


def _strata(codes, n_groups, sizes):
    """Row-index matrices of the patients of each stratum of equal pair count."""
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for c in np.unique(sizes):
        pats = np.flatnonzero(sizes == c)
        rows = order[starts[pats][:, None] + np.arange(c)[None, :]]   # (patients, c)
        out.append(rows)
    return out


def permuted_outcomes(y, groups, n_permutations, seed=0):
    """Yield the permuted outcome vectors of :func:`permutation_p`.

    Patients are sorted by id and grouped by their number of pairs (strata in
    increasing pair count); for each permutation and each stratum in turn,
    ``rng.permutation`` of the stratum's patients (``rng =
    numpy.random.default_rng(seed)``) says whose outcome vector (pairs in
    input order) each patient receives.

    Yields
    ------
    ndarray
        The permuted outcome vector (input order).
    """
    y = np.asarray(y)
    codes, patients = _group_codes(groups, len(y))
    sizes = np.bincount(codes, minlength=len(patients))
    strata = _strata(codes, len(patients), sizes)
    rng = np.random.default_rng(seed)
    for _ in range(n_permutations):
        new = np.empty_like(y)
        for rows in strata:
            perm = rng.permutation(len(rows))
            new[rows.ravel()] = y[rows[perm].ravel()]
        yield new


def permutation_p(X, y, groups, *, protocol, n_permutations=1000, seed=0, alpha=SELECTION_ALPHA,
                  solver="fast"):
    """Permutation p-value of the LOPO accuracy.

    Parameters
    ----------
    X, y, groups, protocol, alpha, solver
        As in :func:`lopo_predict`.
    n_permutations : int
        Number of permutations N (0 skips the test: p is None).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    dict
        ``p`` = (1 + #{permuted accuracy >= observed}) / (1 + N) (Phipson &
        Smyth 2010), ``observed_accuracy``, ``n_permutations``,
        ``n_at_least_observed``, ``method``.

    Notes
    -----
    Outcome vectors are permuted between whole patients with the same number
    of pairs (:func:`permuted_outcomes`), so each patient keeps a coherent
    vector and the fold structure is unchanged; the whole pipeline (selection
    included) is rerun on each permutation (Ojala & Garriga 2010).
    """
    protocol = _check_protocol(protocol)
    alpha = check_alpha(alpha)
    if solver not in SOLVERS:
        raise StatsError(f"solver must be one of {SOLVERS}, got {solver!r}")
    try:
        n_perm = int(n_permutations)
    except (TypeError, ValueError):
        raise StatsError(f"n_permutations must be a whole number >= 0, got {n_permutations!r}") from None
    if n_perm < 0 or n_perm != n_permutations:
        raise StatsError(f"n_permutations must be a whole number >= 0, got {n_permutations!r}")
    values, _names, yf, codes, patients = _prepare(X, y, groups)
    G = len(patients)
    if solver == "sklearn":
        def correct(yy):
            prob, _, _ = _reference_run(values, yy, codes, G, protocol, alpha)
            return int(((prob >= THRESHOLD) == (yy == 1)).sum())
    else:
        problem = _Lopo(values, codes, G)

        def correct(yy):
            prob, _, _ = problem.run(yy, protocol, alpha, solver)
            return int(((prob >= THRESHOLD) == (yy == 1)).sum())
    with _blas_limits():
        observed = correct(yf)
        at_least = 0
        for yp in permuted_outcomes(yf, groups, n_perm, seed):
            at_least += correct(yp) >= observed
    n = len(yf)
    method = PERMUTATION_METHOD.format(n=n_perm)
    if n_perm == 0:
        return {"p": None, "observed_accuracy": observed / n, "n_permutations": 0,
                "n_at_least_observed": None, "method": method,
                "note": "permutation test skipped (0 permutations)"}
    return {"p": (1 + at_least) / (1 + n_perm), "observed_accuracy": observed / n,
            "n_permutations": n_perm, "n_at_least_observed": int(at_least), "method": method,
            "note": None}


# --------------------------------------------------------------------------- results block


def _pipeline_method(protocol, features_from, alpha):
    where = ("inside each fold, on the training pairs only" if protocol == "nested" else
             "once on all pairs before the cross-validation (optimistic: the held-out pairs "
             "take part in the selection)")
    return (
        f"Leave-one-patient-out cross-validation on the {features_from} CXR's pooled DenseNet "
        f"features, Worse (positive) vs Improved: chi-square feature selection (scikit-learn chi2, "
        f"keep p < {alpha:g}, else the single feature with the lowest p) {where}; then "
        "LogisticRegression() with scikit-learn's defaults (L2 penalty, C = 1, intercept "
        "unpenalised), fitted to its unique optimum by a vectorised Newton solver checked against "
        "scikit-learn; a pair is predicted Worse when its out-of-fold probability is >= 0.5; all "
        "pairs of the held-out patient are left out of selection and fitting; a training fold "
        "holding one class predicts that class."
    )


def _metrics_block(confusion, alpha):
    from covreport.stats.diagnostic import diagnostic_metrics

    table = diagnostic_metrics(confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"],
                               alpha=alpha)
    out = {}
    for row in table.to_dict("records"):
        rec = {key: to_python(row.get(key)) for key in ("estimate", "ci_low", "ci_high", "method", "note")}
        if rec["note"] == "":
            rec["note"] = None
        out[row["measure"]] = rec
    return out


def _auc_block(y, prob, alpha):
    from covreport.stats.auc import delong_auc

    try:
        res = delong_auc(y.astype(int), prob, alpha=alpha)
    except StatsError as exc:
        return {"auc": None, "se": None, "ci_low": None, "ci_high": None, "method": None,
                "note": f"AUC not estimable: {exc}"}
    rec = {key: to_python(res.get(key)) for key in ("auc", "se", "ci_low", "ci_high", "method", "note")}
    rec["n_pos"] = to_python(res.get("n_pos"))
    rec["n_neg"] = to_python(res.get("n_neg"))
    if rec["note"] == "":
        rec["note"] = None
    return rec


def predict_outcome(first, second, outcome, groups, pair_ids, *, headline="nested", n_permutations=1000,
                    seed=0, alpha=0.05, solver="fast"):
    """The ``prediction`` block of ``results.json`` (docs/RESULTS.md).

    Parameters
    ----------
    first, second : pandas.DataFrame or ndarray (n_pairs, n_features)
        Pooled features of each pair's first and second CXR (rows aligned
        with ``outcome``).
    outcome : array_like of str
        ``Worse``, ``Stable`` or ``Improved`` per pair; Stable pairs are left
        out (binary task Worse vs Improved).
    groups : array_like
        Patient id per pair.
    pair_ids : array_like
        Pair id per pair.
    headline : {"nested", "global"}
        Headline protocol: it gets the permutation test and is the protocol
        of the reversed-order control.
    n_permutations : int
        Permutations of the tests (0 skips them).
    seed : int
        Seed of the permutations.
    alpha : float
        1 - confidence level of the metrics' and the AUC's intervals (the
        feature selection keeps p < 0.05 whatever alpha is).
    solver : str
        As in :func:`lopo_predict`.

    Returns
    -------
    dict
        ``headline``, ``positive_class``, ``negative_class`` and one block for
        each of ``nested``, ``global`` (first CXR) and ``reversed`` (second
        CXR, headline protocol), with the keys of docs/RESULTS.md.
    """
    headline = _check_protocol(headline)
    alpha = check_alpha(alpha)
    outcome = np.asarray(outcome, dtype=object)
    n = len(outcome)
    for name, arr in (("groups", groups), ("pair_ids", pair_ids)):
        if len(arr) != n:
            raise StatsError(f"{name} has {len(arr)} values but there are {n} outcomes; they must be aligned")
    unknown = [i for i, o in enumerate(outcome) if o not in OUTCOMES]
    if unknown:
        i = unknown[0]
        raise StatsError(f"pair {pair_ids[i]!r} has outcome {outcome[i]!r}; outcomes must be one of "
                         f"{OUTCOMES} (exclude pairs without a reference standard first)")
    feats = {}
    for which, X in (("first", first), ("second", second)):
        if len(X) != n:
            raise StatsError(f"the {which} CXR's features have {len(X)} rows but there are {n} pairs")
        feats[which] = X
    keep = np.flatnonzero(np.isin(outcome, (WORSE, IMPROVED)))
    groups_k = np.asarray(groups, dtype=object)[keep]
    pairs_k = np.asarray(pair_ids, dtype=object)[keep]
    y = (outcome[keep] == WORSE).astype(np.int64)
    # canonical order (patient, pair id) so that results do not depend on row order
    order = np.lexsort((pairs_k.astype(str), groups_k.astype(str)))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))

    def rows(X):
        if isinstance(X, pd.DataFrame):
            return X.iloc[keep].iloc[order].reset_index(drop=True)
        return np.asarray(X)[keep][order]

    out = {"headline": headline, "positive_class": WORSE, "negative_class": IMPROVED}
    specs = (("nested", "nested", "first"), ("global", "global", "first"), ("reversed", headline, "second"))
    n_patients = len(set(groups_k.tolist()))
    for key, protocol, source in specs:
        X = rows(feats[source])
        ys, gs = y[order], groups_k[order]
        if n_patients < 2:
            if len(ys):
                _feature_matrix(X)                      # still report bad features
            out[key] = _empty_block(protocol, source, len(y), n_patients, pairs_k, groups_k, y)
            continue
        res = lopo_predict(X, ys, gs, protocol=protocol, solver=solver)
        prob = res["probabilities"][inverse]
        pred = res["predicted"][inverse]
        n_folds = res["n_folds"]
        selected = sorted(res["selected_features"].items(), key=lambda kv: (-kv[1], kv[0]))
        if protocol == headline and n_permutations:
            perm = permutation_p(X, ys, gs, protocol=protocol, n_permutations=n_permutations,
                                 seed=seed, solver=solver)
            p_perm, n_perm = perm["p"], perm["n_permutations"]
        else:
            p_perm, n_perm = None, 0
        out[key] = {
            "protocol": protocol,
            "features_from": source,
            "n_pairs": int(len(y)),
            "n_patients": int(n_folds),
            "confusion": res["confusion"],
            "metrics": _metrics_block(res["confusion"], alpha),
            "auc": _auc_block(y, prob, alpha),
            "selected_features": [{"feature": f, "folds_selected": c, "fraction": c / n_folds}
                                  for f, c in selected],
            "one_class_folds": res["one_class_folds"],
            "permutation_p": p_perm,
            "permutations": n_perm,
            "permutation_method": PERMUTATION_METHOD.format(n=n_perm) if n_perm else None,
            "pairs": [{"pair_id": to_python(pid), "patient_id": to_python(pat),
                       "outcome": WORSE if yy else IMPROVED, "probability": float(pr),
                       "predicted": WORSE if hit else IMPROVED}
                      for pid, pat, yy, pr, hit in zip(pairs_k, groups_k, y, prob, pred)],
            "method": _pipeline_method(protocol, source, SELECTION_ALPHA),
            "note": None,
        }
    return out


def _empty_block(protocol, source, n_pairs, n_patients, pair_ids, patients, y):
    """A prediction block that could not be computed (fewer than 2 patients), with the reason."""
    reason = (f"not computed: leave-one-patient-out needs Worse or Improved pairs of at least 2 "
              f"patients, got {n_pairs} pair(s) of {n_patients} patient(s)")
    return {
        "protocol": protocol, "features_from": source, "n_pairs": int(n_pairs),
        "n_patients": int(n_patients), "confusion": None, "metrics": {},
        "auc": {"auc": None, "se": None, "ci_low": None, "ci_high": None, "method": None, "note": reason},
        "selected_features": [], "one_class_folds": 0, "permutation_p": None, "permutations": 0,
        "permutation_method": None,
        "pairs": [{"pair_id": to_python(pid), "patient_id": to_python(pat),
                   "outcome": WORSE if yy else IMPROVED, "probability": None, "predicted": None}
                  for pid, pat, yy in zip(pair_ids, patients, y)],
        "method": _pipeline_method(protocol, source, SELECTION_ALPHA),
        "note": reason,
    }
