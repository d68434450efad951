"""The primary prediction protocol: standardised, L2-penalised logistic regression tuned by nested CV.

Leave-one-patient-out cross-validation (outer folds: all pairs of one
patient). Inside each outer training fold, and using its pairs only:

1. every feature is standardised with the training fold's mean and standard
   deviation (ddof 0, as scikit-learn's ``StandardScaler``); a feature constant
   in the training fold is dropped in that fold;
2. an L2-penalised logistic regression (the intercept unpenalised) is fitted,
   minimising ``0.5 ||w||^2 + C sum_i log-loss_i``;
3. the penalty C is chosen from :data:`PENALTY_GRID` (10 values log-spaced
   from 1e-4 to 1e2) by an inner patient-grouped cross-validation whose
   criterion is the summed held-out log loss (deviance); the inner folds are
   one partition of all the study's patients, fixed before the outer loop
   (:data:`INNER_FOLDS`-fold ``GroupKFold``; leave-one-patient-out below
   ``2 * INNER_FOLDS`` patients), each training fold using its part of it
   (:func:`restrict`), so no held-out patient is in any inner fold; the
   standardisation is redone in each inner training fold; the smallest C
   among equal losses wins;
4. the model refitted on the whole outer training fold at that C predicts the
   held-out patient's pairs.

No univariate pre-selection: every non-constant feature enters, so the
protocol does not depend on the features' units (multiplying a feature by a
positive constant leaves every probability unchanged, up to rounding).

Fast path
---------
With n pairs << p features, the fit depends on the standardised training
features only through their row space: with the thin SVD ``Xs = U S V'`` of
the training rows, ``w = V b`` and the problem is the same penalised logistic
regression on the r <= n - 1 columns ``U S`` (held-out rows ``Xs V``), since
``||w|| = ||b||``. The scale C enters as ``sqrt(C)`` times those columns
(``0.5||w||^2 + C sum loss(x'w)`` has the optimum of ``0.5||v||^2 + sum
loss(sqrt(C) x'v)`` with ``w = sqrt(C) v``). These reduced designs depend on
the features and patients only, so the permutation test computes them once;
each outcome vector then costs batched damped Newton fits
(:func:`covreport.stats._logistic._newton_batch`) of the grid in increasing C,
each warm-started from the previous C. That costs about n^4 (6 fits per
patient, each n^3): from :data:`SHARED_MIN_ROWS` pairs on, the same fits come
from six shared fits instead (:mod:`covreport.stats._penalised_shared`), as
every training set is one of them less at most one patient; about n^2 p.
``solver="sklearn"`` runs the literal
``StandardScaler`` + ``LogisticRegression(C, lbfgs)`` fold by fold (the tests'
reference).

References
----------
.. [1] Steyerberg EW. Clinical Prediction Models: A Practical Approach to
   Development, Validation, and Updating. 2nd ed. Springer; 2019 (penalised
   maximum likelihood; tuning by cross-validated deviance).
.. [2] Van Calster B, van Smeden M, De Cock B, Steyerberg EW. Regression
   shrinkage methods for clinical prediction models do not guarantee improved
   performance: simulation study. Stat Methods Med Res 2020;29:3166-3178.
.. [3] le Cessie S, van Houwelingen JC. Ridge estimators in logistic
   regression. Appl Stat 1992;41:191-201.
.. [4] Varma S, Simon R. Bias in error estimation when using cross-validation
   for model selection. BMC Bioinformatics 2006;7:91 (nested tuning).
"""

import math

import numpy as np
from scipy import special

from covreport.stats._logistic import _newton_batch

#: Penalty grid (C of scikit-learn's LogisticRegression): 10 values log-spaced from 1e-4 to 1e2.
PENALTY_GRID = tuple(float(c) for c in np.logspace(-4, 2, 10))

#: Inner patient-grouped folds for tuning C (GroupKFold); leave-one-patient-out below 2x this many patients.
INNER_FOLDS = 5

#: From this many pairs on, the fits come from shared fits (:mod:`covreport.stats._penalised_shared`), not
#: from a row-space fit of every fold anew (which grows as about n^4).
SHARED_MIN_ROWS = 200

#: C used when no inner fold can be evaluated (e.g. one training patient): scikit-learn's default.
FALLBACK_C = 1.0

PENALISED_REFERENCE = ("Steyerberg EW, Clinical Prediction Models, 2nd ed., Springer 2019; Van Calster B et al., "
                       "Stat Methods Med Res 2020;29:3166-3178; le Cessie S, van Houwelingen JC, Appl Stat "
                       "1992;41:191-201; Varma S, Simon R, BMC Bioinformatics 2006;7:91")


def inner_folds(codes):
    """Inner fold of each row: GroupKFold(5) over the patients ``codes``, LOPO below 10 patients.

    The same assignment as scikit-learn's ``GroupKFold(n_splits).split``
    (largest patients first, each to the lightest fold); returns a list of
    test-row index arrays, or [] with fewer than 2 patients.
    """
    from sklearn.model_selection import GroupKFold

    n_pat = len(np.unique(codes))
    if n_pat < 2:
        return []
    k = INNER_FOLDS if n_pat >= 2 * INNER_FOLDS else n_pat
    dummy = np.zeros((len(codes), 1))
    return [test for _train, test in GroupKFold(n_splits=k).split(dummy, groups=codes)]


def restrict(part, train):
    """The inner folds of a training set ``train`` (sorted row indices) from the fixed partition ``part``.

    Each fold's rows within ``train``, as positions in ``train``; a fold with
    no rows there, or holding all of them, is left out. The partition is of
    all the study's patients, fixed before the outer loop, so it depends on
    no outcome and puts no held-out patient in any inner fold.
    """
    out = []
    for test in part:
        local = np.flatnonzero(np.isin(train, test, assume_unique=True))
        if 0 < len(local) < len(train):
            out.append(local)
    return out


def standardise(X, rows):
    """Mean, SD (ddof 0) and the non-constant columns of ``X[rows]``."""
    Xt = X[rows]
    keep = Xt.max(axis=0) > Xt.min(axis=0)
    mean = Xt.mean(axis=0)
    sd = Xt.std(axis=0)
    return mean, sd, keep


def _deviance(z, y):
    """Log loss of each row from the linear predictor z (stable; -log clipped at 1e-15 as sklearn's log_loss)."""
    loss = np.logaddexp(0.0, z) - y * z
    return np.minimum(loss, -math.log(1e-15))


class Penalised:
    """Reduced designs of every (outer fold, inner fold) fit of one problem, reused across outcome vectors.

    Parameters
    ----------
    X : ndarray (n, p)
    codes : ndarray (n,) of int
        Patient code of each row (0 .. G-1; outer folds in code order).
    n_groups : int
    outer : bool
        True: leave-one-patient-out outer folds (:meth:`run`); False: one
        "fold" training on all rows (the final model, :meth:`final`).
    outer_codes : ndarray (n,) of int, optional
        Outer folds other than the patients: each row's fold (0 .. n_groups-1,
        e.g. its site for internal-external cross-validation), the inner folds
        still grouping by patient (``codes``) within each training set.
    """

    def __init__(self, X, codes, n_groups, outer=True, outer_codes=None):
        self.X = X
        self.n, self.p = X.shape
        self.codes = codes
        self.n_groups = n_groups
        outer_of = codes if outer_codes is None else np.asarray(outer_codes)
        part = inner_folds(codes)
        self.shared = None
        if outer_codes is None and self.n >= SHARED_MIN_ROWS and len(part) >= 2:
            from covreport.stats._penalised_shared import SharedPenalised

            self.shared = SharedPenalised(X, codes, n_groups, part, outer=outer)
            return
        all_rows = np.arange(self.n)
        self.tasks = []          # (outer index, kind "inner"/"outer", train rows, held rows)
        folds = range(n_groups) if outer else [None]
        for g in folds:
            train = all_rows if g is None else np.flatnonzero(outer_of != g)
            held = np.zeros(0, dtype=np.int64) if g is None else np.flatnonzero(outer_of == g)
            for test_local in restrict(part, train):
                itest = train[test_local]
                itrain = np.setdiff1d(train, itest, assume_unique=True)
                self.tasks.append((g, "inner", itrain, itest))
            self.tasks.append((g, "outer", train, held))
        self.bases = []          # (mean, sd, keep, train rows, M) of each task: coefficients = Xs_T' M b
        designs = []
        for _g, _kind, train, held in self.tasks:
            mean, sd, keep = standardise(X, train)
            Xs = (X[:, keep] - mean[keep]) / sd[keep]
            # the row space of the training rows from their Gram matrix: K = U diag(lam) U'
            K = Xs @ Xs[train].T                               # (n, m): every row against the training rows
            lam, U = np.linalg.eigh(K[train])
            big = lam > max(lam[-1], 0.0) * 1e-12 if len(lam) and lam[-1] > 0 else np.zeros(len(lam), bool)
            M = U[:, big] / np.sqrt(lam[big])                  # (m, r)
            D = np.zeros((self.n, int(big.sum())))
            rows = np.concatenate([train, held])
            D[rows] = K[rows] @ M                              # = U sqrt(lam) on the training rows
            designs.append(D)
            self.bases.append((mean, sd, keep, train, M))
        self.kmax = max([d.shape[1] for d in designs] + [0])
        # one batch per kind of task, each padded to its own widest design
        self.batches = {}
        for kind in ("inner", "outer"):
            idx = np.array([t for t, task in enumerate(self.tasks) if task[1] == kind], dtype=np.int64)
            k = max([designs[t].shape[1] for t in idx] + [0])
            A = np.zeros((len(idx), self.n, k + 1))
            mask = np.zeros((len(idx), self.n))
            for j, t in enumerate(idx):
                A[j, :, :designs[t].shape[1]] = designs[t]
                mask[j, self.tasks[t][2]] = 1.0
            A[:, :, -1] = 1.0
            self.batches[kind] = (idx, A, mask)

    def _fit_grid(self, y, kind, active):
        """Fits of the ``kind`` tasks at positions ``active`` of its batch, at every C of the grid.

        Returns (weights (C, T, k+1) on the sqrt(C)-scaled columns, linear
        predictors (C, T, n)). Each C starts from the previous C's linear
        predictor, extrapolated along log C from the two before it.
        """
        _idx, A0, m0 = self.batches[kind]
        A, m = A0[active], m0[active]
        T, k1 = len(active), A.shape[2]
        W = np.zeros((len(PENALTY_GRID), T, k1))
        Z = np.zeros((len(PENALTY_GRID), T, self.n))
        ybar = np.clip((m @ y) / m.sum(axis=1), 1e-12, 1 - 1e-12)
        u = np.zeros((T, k1))                                # weights of the unscaled columns
        u[:, -1] = np.log(ybar / (1 - ybar))
        u_before = u
        for i, c in enumerate(PENALTY_GRID):
            s = math.sqrt(c)
            start = u if i < 2 else 2 * u - u_before
            w0 = start.copy()
            w0[:, :-1] /= s
            Ac = A.copy()
            Ac[:, :, :-1] *= s
            w, _conv = _newton_batch(Ac, y, m, w0)
            W[i] = w
            Z[i] = np.einsum("tnk,tk->tn", Ac, w)
            u_before = u
            u = w.copy()
            u[:, :-1] *= s
        return W, Z

    def _tune(self, y):
        """Chosen C per outer fold and the fits of the two-class outer tasks.

        Returns ({outer fold: (grid index, summed inner deviance per C or
        None)}, {task: (weights, linear predictors) at every C}).
        """
        fits, loss = {}, {}
        for kind in ("inner", "outer"):
            idx = self.batches[kind][0]
            two = [j for j, t in enumerate(idx) if 0 < y[self.tasks[t][2]].sum() < len(self.tasks[t][2])]
            if not two:
                continue
            W, Z = self._fit_grid(y, kind, np.array(two, dtype=np.int64))
            for pos, j in enumerate(two):
                t = int(idx[j])
                g, _kind, _train, held = self.tasks[t]
                if kind == "inner":
                    loss[g] = loss.get(g, 0.0) + _deviance(Z[:, pos, held], y[held]).sum(axis=1)
                else:
                    fits[t] = (W[:, pos], Z[:, pos])
        chosen = {}
        for t in fits:
            g = self.tasks[t][0]
            curve = loss.get(g)
            chosen[g] = (PENALTY_GRID.index(FALLBACK_C), None) if curve is None else (int(np.argmin(curve)), curve)
        return chosen, fits

    def run(self, y, details=False):
        """Out-of-fold probabilities for outcome vector ``y``.

        Returns (probabilities, C per fold (None for a one-class fold),
        non-zero coefficients per fold, folds in which each feature had a
        non-zero coefficient, one-class folds); the coefficient counts are
        computed only with ``details`` (zeros otherwise).
        """
        if self.shared is not None:
            return self.shared.run(y, details)
        G, n = self.n_groups, self.n
        prob = np.empty(n)
        chosen, fits = self._tune(y)
        penalty = [None] * G
        nonzero = np.zeros(G, dtype=np.int64)
        counts = np.zeros(self.p, dtype=np.int64)
        one_class = 0
        for t, (g, kind, train, held) in enumerate(self.tasks):
            if kind != "outer":
                continue
            if t not in fits:
                prob[held] = 1.0 if y[train].sum() > 0 else 0.0
                one_class += 1
                continue
            ci = chosen[g][0]
            W, Z = fits[t]
            prob[held] = special.expit(Z[ci, held])
            penalty[g] = PENALTY_GRID[ci]
            if details:
                nz = self.coefficients(t, W[ci], PENALTY_GRID[ci]) != 0
                nonzero[g] = int(nz.sum())
                counts += nz
        return prob, penalty, nonzero, counts, one_class

    def coefficients(self, t, w, c):
        """Coefficients of task ``t`` on the standardised features (0 for dropped ones).

        ``w`` holds the weights fitted on the sqrt(C)-scaled reduced columns
        (the intercept last); the reduced columns are ``Xs Xs_T' M``, so the
        coefficients are ``Xs_T' M sqrt(C) w[:-1]``.
        """
        mean, sd, keep, train, M = self.bases[t]
        coef = np.zeros(self.p)
        Xs_t = (self.X[np.ix_(train, np.flatnonzero(keep))] - mean[keep]) / sd[keep]
        coef[keep] = Xs_t.T @ (M @ (math.sqrt(c) * w[:M.shape[1]]))
        return coef

    def final(self, y):
        """The model refitted on all rows (built with ``outer=False``), C tuned by the inner CV.

        Returns None when the rows hold one class, else a dict: ``C``,
        ``intercept`` and ``coefficients`` on the standardised features,
        ``mean``, ``sd`` and ``kept`` (the standardisation), ``inner_deviance``
        (summed inner held-out log loss per C, or None without inner folds).
        """
        if self.shared is not None:
            return self.shared.final(y)
        chosen, fits = self._tune(y)
        t = len(self.tasks) - 1
        if t not in fits:
            return None
        ci, curve = chosen[None]
        c = PENALTY_GRID[ci]
        w = fits[t][0][ci]
        mean, sd, keep, _train, _m = self.bases[t]
        return {"C": c, "intercept": float(w[-1]), "coefficients": self.coefficients(t, w, c), "mean": mean,
                "sd": sd, "kept": keep, "inner_deviance": None if curve is None else [float(v) for v in curve]}


def _sk_model(c, logreg):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    kw = {"solver": "lbfgs", "max_iter": 1000, **(logreg or {})}
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, **kw))


def _sk_tune(X, y, codes, logreg, folds=None):
    """scikit-learn's fits of the inner CV: (index of the chosen C or None, summed deviance per C or None).

    ``folds``: the inner folds' test rows (positions in these rows); default
    :func:`inner_folds` of ``codes``.
    """
    folds = inner_folds(codes) if folds is None else folds
    total, used = np.zeros(len(PENALTY_GRID)), 0
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        if y[train].min() == y[train].max():
            continue
        used += 1
        for i, c in enumerate(PENALTY_GRID):
            model = _sk_model(c, logreg).fit(X[train], y[train].astype(int))
            total[i] += _deviance(model.decision_function(X[test]), y[test]).sum()
    if not used:
        return (PENALTY_GRID.index(FALLBACK_C), None)
    return int(np.argmin(total)), total


def reference_run(X, y, codes, n_groups, logreg=None):
    """The literal protocol with scikit-learn, fold by fold (the tests' reference; slow).

    ``StandardScaler`` (a constant training column becomes all zero, so its
    coefficient stays 0: dropped) + ``LogisticRegression(C, lbfgs)`` in every
    inner and outer fit; ``logreg`` holds extra LogisticRegression arguments
    (the tests tighten ``tol``). Returns (probabilities, C per fold (None for a
    one-class fold), non-zero coefficients per fold, one-class folds).
    """
    n = len(y)
    prob = np.empty(n)
    penalty = [None] * n_groups
    nonzero = np.zeros(n_groups, dtype=np.int64)
    one_class = 0
    part = inner_folds(codes)
    for g in range(n_groups):
        test = np.flatnonzero(codes == g)
        train = np.flatnonzero(codes != g)
        yt = y[train]
        if yt.min() == yt.max():
            prob[test] = float(yt[0])
            one_class += 1
            continue
        ci, _curve = _sk_tune(X[train], yt, codes[train], logreg, restrict(part, train))
        model = _sk_model(PENALTY_GRID[ci], logreg).fit(X[train], yt.astype(int))
        prob[test] = model.predict_proba(X[test])[:, 1]
        penalty[g] = PENALTY_GRID[ci]
        nonzero[g] = int((model[-1].coef_[0] != 0).sum())
    return prob, penalty, nonzero, one_class
