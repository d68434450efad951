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

See Also
--------
covreport.stats._logistic : the solvers.
covreport.stats.permutation : the permutation test.

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
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import special

from covreport.constants import feature_columns
from covreport.errors import StatsError
from covreport.stats._logistic import (
    ChordContext, _blas_limits, _chord_batch, _newton_batch, _unique_rows,
)
from covreport.stats._util import check_alpha

#: Threshold of the chi-square feature selection (keep features with p < 0.05).
SELECTION_ALPHA = 0.05

#: Protocols of :func:`lopo_predict` (the registry): the primary first, then the replication of the study.
PROTOCOLS = ("penalised", "nested", "global")

#: The primary protocol: scale-free, tuned inside the training folds (:mod:`covreport.stats.penalised`).
PRIMARY_PROTOCOL = "penalised"

#: The original study's recipe (chi-square selection + LogisticRegression()), kept as its replication.
REPLICATION_PROTOCOLS = ("nested", "global")


def protocol_role(protocol):
    """``"primary"`` for the penalised protocol, ``"replication"`` for the study's chi2 recipe."""
    return "primary" if protocol == PRIMARY_PROTOCOL else "replication"

#: Solvers of :func:`lopo_predict`; "fast" picks "newton" or "chord".
SOLVERS = ("fast", "newton", "chord", "sklearn")

#: A pair is predicted Worse when its out-of-fold probability is >= this.
THRESHOLD = 0.5

# "fast" uses chord iterations above this many pairs.
_CHORD_MIN_PAIRS = 400


class LopoRun(NamedTuple):
    """One run of the LOPO pipeline on one outcome vector.

    Attributes
    ----------
    prob : ndarray (n,)
        Out-of-fold probability of each pair (input order).
    counts : ndarray (p,)
        Number of folds that selected each feature.
    one_class : int
        Folds whose training pairs hold one class (they select nothing).
    per_fold : ndarray (folds,)
        Number of features each fold selected (folds in sorted patient order;
        0 for a one-class fold).
    engine : str
        The solver that ran: ``"newton"``, ``"chord"`` or ``"sklearn"``.
    """

    prob: np.ndarray
    counts: np.ndarray
    one_class: int
    per_fold: np.ndarray
    engine: str
    penalty: object = None


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
    def penalised(self):
        """The reduced designs of the penalised protocol (built once, on first use)."""
        if getattr(self, "_penalised", None) is None:
            from covreport.stats.penalised import Penalised

            self._penalised = Penalised(self.X, self.codes, self.n_groups)
        return self._penalised

    def run(self, y, protocol, alpha, solver="fast", fold_hook=None, details=False):
        G, n, p = self.n_groups, self.n, self.p
        if protocol == PRIMARY_PROTOCOL:
            if fold_hook is not None:
                for g in range(G):
                    test = self.fold_rows(g)
                    fold_hook(np.setdiff1d(np.arange(n), test, assume_unique=True), np.sort(test))
            engine = self.penalised()
            prob, penalty, nonzero, counts, one_class = engine.run(y, details=details)
            return LopoRun(prob, counts, one_class, nonzero,
                           "newton-reduced" if engine.shared is None else "newton-shared", penalty)
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
        per_fold = np.zeros(G, dtype=np.int64)
        if len(two) == 0:
            return LopoRun(prob, counts, int(one_class.sum()), per_fold, "none")

        sel_all = self.select_all(y, alpha)
        if protocol == "global":
            sel = np.broadcast_to(sel_all, (len(two), p))
        else:
            sel = self.select_folds(y, two, alpha)
        counts += sel.sum(axis=0)
        per_fold[two] = sel.sum(axis=1)

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
        return LopoRun(prob, counts, int(one_class.sum()), per_fold, engine)

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
        ctx = ChordContext(A=A, At=np.ascontiguousarray(A.T), colmax=np.abs(A).max(axis=0), HU=HU, W0=W0,
                           y=y, dummy=dummy)
        rows, row_valid = self.held_rows[folds], self.row_valid[folds]
        sets, inverse = _unique_rows(idx)
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


def _reference_run(X, y, codes, n_groups, protocol, alpha, fold_hook=None, logreg=None):
    """The literal pipeline with scikit-learn, fold by fold (the tests' reference).

    ``logreg`` holds extra LogisticRegression arguments (the tests tighten
    lbfgs's tolerance to compare optima); None keeps scikit-learn's defaults.
    """
    from sklearn.feature_selection import chi2
    from sklearn.linear_model import LogisticRegression

    n, p = X.shape
    if protocol == PRIMARY_PROTOCOL:
        from covreport.stats.penalised import reference_run

        if fold_hook is not None:
            for g in range(n_groups):
                fold_hook(np.flatnonzero(codes != g), np.flatnonzero(codes == g))
        prob, penalty, nonzero, one_class = reference_run(X, y, codes, n_groups, logreg)
        return LopoRun(prob, np.zeros(p, dtype=np.int64), one_class, nonzero, "sklearn", penalty)
    prob = np.empty(n)
    counts = np.zeros(p, dtype=np.int64)
    one_class = 0
    per_fold = np.zeros(n_groups, dtype=np.int64)
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
        per_fold[g] = sel.sum()
        model = LogisticRegression(**(logreg or {})).fit(X[np.ix_(train, np.flatnonzero(sel))], yt.astype(int))
        prob[test] = model.predict_proba(X[np.ix_(test, np.flatnonzero(sel))])[:, 1]
    return LopoRun(prob, counts, one_class, per_fold, "sklearn")


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


def lopo_predict(X, y, groups, *, protocol="nested", alpha=SELECTION_ALPHA, fold_hook=None, solver="fast",
                 final_model=True):
    """Leave-one-patient-out prediction by one protocol of the registry (:data:`PROTOCOLS`).

    Parameters
    ----------
    X : pandas.DataFrame or ndarray (n_pairs, n_features)
        Non-negative features, one row per pair. DataFrame columns are the
        feature names; an array's are ``feat_0000``, ``feat_0001``, ...
    y : array_like of 0/1
        1 = Worse (positive class), 0 = Improved.
    groups : array_like
        Patient id of each pair; a fold leaves out all pairs of one patient.
    protocol : {"penalised", "nested", "global"}
        ``penalised`` (the primary protocol, :mod:`covreport.stats.penalised`):
        standardised features, L2-penalised logistic regression with C tuned
        by an inner patient-grouped CV, no pre-selection; ``nested`` and
        ``global`` (the study's recipe, its replication): chi-square
        selection inside each fold on its training pairs, or once on all
        pairs (optimistic).
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
        class: they predict it and select nothing), ``features_per_fold``
        (features selected in each fold, patients in sorted order; 0 for a
        one-class fold), ``protocol``, ``solver`` (as asked) and ``engine``
        (the solver that ran: ``newton``, ``chord``, ``sklearn``, or ``none``
        when every fold held one class). The penalised protocol adds
        ``penalty_per_fold`` (chosen C, None for a one-class fold),
        ``nonzero_per_fold`` (non-zero coefficients; ``features_per_fold``
        holds the same numbers) and ``final_model`` (the model refitted on all
        pairs with C tuned by the inner CV, as :meth:`Penalised.final` plus
        ``features``; None with ``final_model=False`` or one class).

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
        fit = _reference_run(values, yf, codes, len(patients), protocol, alpha, fold_hook)
    else:
        with _blas_limits():
            fit = _Lopo(values, codes, len(patients)).run(yf, protocol, alpha, solver, fold_hook, details=True)
    predicted = (fit.prob >= THRESHOLD).astype(np.int64)
    extra = {}
    if protocol == PRIMARY_PROTOCOL:
        from covreport.stats.penalised import Penalised

        final = None
        if final_model and 0 < yf.sum() < len(yf):
            with _blas_limits():
                final = Penalised(values, codes, len(patients), outer=False).final(yf)
            if final is not None:
                final["features"] = names
        extra = {"penalty_per_fold": list(fit.penalty), "nonzero_per_fold": [int(k) for k in fit.per_fold],
                 "final_model": final}
    return {**extra,
        "probabilities": fit.prob,
        "predicted": predicted,
        "confusion": _confusion(yf, predicted),
        "selected_features": {names[j]: int(fit.counts[j]) for j in np.flatnonzero(fit.counts)},
        "features_per_fold": [int(k) for k in fit.per_fold],
        "n_folds": len(patients),
        "one_class_folds": fit.one_class,
        "protocol": protocol,
        "solver": solver,
        "engine": fit.engine,
    }


IECV_METHOD = (
    "internal-external cross-validation by site (Royston, Parmar & Sylvester 2004; Steyerberg & Harrell 2016): "
    "the {protocol} protocol fitted on the pairs of every site but one and applied to the pairs of the site left "
    "out, each site in turn{inner}; a training set holding one class predicts that class")


def iecv_predict(X, y, patients, sites, *, protocol="penalised", alpha=SELECTION_ALPHA):
    """Internal-external cross-validation: each site's pairs predicted by the protocol fitted on the others.

    Parameters
    ----------
    X, y : as in :func:`lopo_predict`
    patients : array_like
        Patient id of each pair: the inner patient-grouped folds of the
        penalised protocol's tuning within each training set.
    sites : array_like
        Site of each pair (every pair needs one): the outer folds.
    protocol : {"penalised", "nested", "global"}
        For ``nested`` and ``global`` (no inner tuning) the outer folds are
        the sites, as :func:`lopo_predict` with the sites as groups.

    Returns
    -------
    dict
        ``probabilities`` (out of site, input order), ``sites`` (the sites
        in fold order), ``one_class_folds`` and ``method``.
    """
    protocol = _check_protocol(protocol)
    values, _names, yf, codes, patients_u = _prepare(X, y, patients)
    site_codes, site_names = _group_codes(sites, len(yf))
    if len(site_names) < 2:
        raise StatsError(f"internal-external cross-validation needs at least 2 sites, got {len(site_names)}")
    inner = ""
    with _blas_limits():
        if protocol == PRIMARY_PROTOCOL:
            from covreport.stats.penalised import INNER_FOLDS, Penalised

            prob, _c, _nz, _counts, one_class = Penalised(values, codes, len(site_names),
                                                          outer_codes=site_codes).run(yf)
            inner = (f"; the penalty tuned by an inner patient-grouped {INNER_FOLDS}-fold cross-validation "
                     "within the training sites")
        else:
            fit = _Lopo(values, site_codes, len(site_names)).run(yf, protocol, alpha, "fast", None)
            prob, one_class = fit.prob, fit.one_class
    return {"probabilities": np.asarray(prob, dtype=float), "sites": [str(v) for v in site_names],
            "one_class_folds": int(one_class), "method": IECV_METHOD.format(protocol=protocol, inner=inner),
            "n_patients": len(patients_u)}

