"""The penalised protocol's fits from six shared fits, for studies too large to fit every fold anew.

Every training set of the protocol (:mod:`covreport.stats.penalised`) is one of
K + 1 shared sets S (all patients but inner fold k, k = 0 .. K-1, or all
patients) minus at most one patient, because the inner folds are one fixed
partition of the study's patients:

- outer fold i (patient i left out), inner fold k not holding i: S_k minus i,
  scored on inner fold k;
- outer fold i, the inner fold holding i: S_k itself, scored on the rest of
  inner fold k;
- outer fold i's refit: S_K (all patients) minus i, scored on patient i.

For each penalty C of the grid (in increasing order, each shared fit
warm-started from the one before) this module fits every shared set exactly
(damped Newton, :func:`covreport.stats._logistic._newton_batch`), then every
"S minus a patient" target from that fit by Newton steps whose systems are
solved by conjugate gradients (Nocedal & Wright 2006, ch. 7), preconditioned
by the shared set's Hessian with the patient's rows taken out (Woodbury's
identity). A target's standardisation is its own: in the coordinates
standardised on S, standardising on the target instead changes only the
intercept (absorbed: it is unpenalised) and the penalty's diagonal, to
(sd_target / sd_S)^2 per feature. A target whose Newton-CG has not converged
after :data:`_MAX_STEPS` steps, or in which a feature of S is nearly constant
(the exact protocol drops a constant one), is refitted by damped Newton with
the target's own design. Each target stops when a Newton step moves no linear
predictor by more than :data:`_TOL` (a bound: the step's absolute values
times the largest absolute value of each column).

Cost per penalty: K + 1 Newton fits in the feature space (n p^2) and about
30 Hessian-vector products per target (n p each), against the exact
engine's 6 row-space fits per patient (n^3 each), so about n^2 p in all
instead of n^4.
"""

import math

import numpy as np
from scipy import linalg, special

from covreport.stats._logistic import _matmul, _newton_batch
from covreport.stats.penalised import FALLBACK_C, PENALTY_GRID, _deviance, standardise

_TOL = 1e-9            # a converged target: no linear predictor moved by more in the last Newton step
_MAX_STEPS = 30        # Newton steps of a target before its exact refit
_MAX_CG = 60           # conjugate-gradient iterations per Newton step
_CHUNK = 512           # targets solved side by side (memory: about 4 x rows x chunk doubles)
_NEAR_CONSTANT = 1e-8  # a feature whose variance falls below this fraction of S's on a target: exact refit


class SharedSet:
    """One shared training set: its rows, standardisation, design and the patients it can lose."""

    def __init__(self, X, rows, patients, rows_of):
        self.mean, self.sd, self.keep = standardise(X, rows)
        cols = np.flatnonzero(self.keep)
        self.rows = rows
        # the standardised design of every row (features of S, then the intercept)
        self.A = np.empty((X.shape[0], len(cols) + 1))
        self.A[:, :-1] = (X[:, cols] - self.mean[cols]) / self.sd[cols]
        self.A[:, -1] = 1.0
        self.patients = patients
        # each target's penalty diagonal: (its SD / S's SD)^2, from S's centred sums less the patient's rows
        m = len(rows)
        centred = self.A[rows, :-1]
        ss = np.einsum("ij,ij->j", centred, centred)
        self.ratio = np.empty((len(patients), len(cols) + 1))
        for j, pat in enumerate(patients):
            d = self.A[rows_of[pat], :-1]
            mt = m - len(d)
            s1 = -d.sum(axis=0)
            var = (ss - np.einsum("ij,ij->j", d, d)) / mt - (s1 / mt) ** 2
            self.ratio[j, :-1] = var / (ss / m)
        self.ratio[:, -1] = 0.0
        self.near_constant = (self.ratio[:, :-1] < _NEAR_CONSTANT).any(axis=1)


def _hessian(A, d, C, pen):
    """pen + C A' diag(d) A."""
    H = _matmul((A * (C * d)[:, None]).T, A)
    H[np.diag_indices_from(H)] += pen
    return H


def _spd_inverse(H):
    """Inverse of a symmetric positive-definite matrix from its Cholesky factor (LAPACK potrf + potri)."""
    c, info = linalg.lapack.dpotrf(H, lower=True)
    if info == 0:
        inv, info = linalg.lapack.dpotri(c, lower=True)
    if info != 0:
        return np.linalg.pinv(H, hermitian=True)
    inv = np.tril(inv)
    return inv + np.tril(inv, -1).T


def _targets(s, A, y, C, W0, H_inv, d0, rows_of, sel):
    """Fits of S minus each patient ``s.patients[sel]`` at penalty C by preconditioned Newton-CG from ``W0``
    (T, k+1), the preconditioner being S's Hessian at its fit (``d0``: p(1 - p) on S's rows) less the patient;
    ``A`` is S's rows of its design.

    Returns (weights (T, k+1), converged (T,) bool).
    """
    yS = y[s.rows]
    pos = np.full(len(y), -1)
    pos[s.rows] = np.arange(len(s.rows))
    T = len(sel)
    own = [pos[rows_of[s.patients[j]]] for j in sel]  # each target's rows, as positions in S
    rmax = max(len(r) for r in own)
    idx = np.zeros((T, rmax), dtype=np.int64)
    valid = np.zeros((T, rmax))
    for t, r in enumerate(own):
        idx[t, :len(r)], valid[t, :len(r)] = r, 1.0
    mask = np.ones((len(s.rows), T))
    for t, r in enumerate(own):
        mask[r, t] = 0.0
    # Woodbury: (H - U'U)^-1 = H^-1 + H^-1 U' (I - U H^-1 U')^-1 U H^-1, U the patient's rows at S's fit
    U = np.sqrt(C * d0[idx] * valid)[..., None] * A[idx]          # (T, r, k+1)
    P = _matmul(U.reshape(-1, U.shape[2]), H_inv).reshape(U.shape)   # (T, r, k+1)
    inner = np.linalg.inv(np.eye(rmax) - P @ U.transpose(0, 2, 1))

    def precondition(R, act):
        out = _matmul(R, H_inv)
        q = np.einsum("trk,tk->tr", P[act], R)
        out += np.einsum("trk,tr->tk", P[act], np.einsum("trs,ts->tr", inner[act], q))
        return out

    pen = s.ratio[sel]
    W = np.array(W0, dtype=np.float64, copy=True)
    colmax = np.abs(A).max(axis=0)
    done = np.zeros(T, dtype=bool)
    for step in range(_MAX_STEPS):
        act = np.flatnonzero(~done)
        if len(act) == 0:
            break
        prob = special.expit(_matmul(A, W[act].T))                # (m, a)
        ma = mask[:, act]
        G = _matmul(((prob - yS[:, None]) * ma * C).T, A) + pen[act] * W[act]
        D = prob * (1.0 - prob) * ma * C
        # conjugate gradients on H_t s = G, to a relative residual eta (0.1, then sqrt(|g|) once small)
        gnorm = np.linalg.norm(G, axis=1)
        eta = np.full(len(act), 0.1) if step == 0 else np.minimum(0.1, np.sqrt(gnorm))
        S = np.zeros_like(G)
        R = G.copy()
        Z = precondition(R, act)
        rz = (R * Z).sum(axis=1)
        stop = np.sqrt(np.maximum(rz, 0.0)) * eta
        run = rz > 0
        Pd = Z.copy()
        for _ in range(_MAX_CG):
            if not run.any():
                break
            HP = _matmul((D * _matmul(A, Pd.T)).T, A) + pen[act] * Pd
            curv = (Pd * HP).sum(axis=1)
            alpha = np.where(run & (curv > 0), rz / np.where(curv > 0, curv, 1.0), 0.0)
            S += alpha[:, None] * Pd
            R -= alpha[:, None] * HP
            Z = precondition(R, act)
            rz_new = (R * Z).sum(axis=1)
            run &= np.sqrt(np.maximum(rz_new, 0.0)) > stop
            Pd = Z + (rz_new / np.where(rz > 0, rz, 1.0))[:, None] * Pd
            rz = rz_new
        W[act] -= S
        moved = np.abs(S) @ colmax
        done[act[(moved <= _TOL) & np.isfinite(moved)]] = True
    ok = done & np.isfinite(W).all(axis=1)
    return W, ok


def _exact_target(s, y, C, w0, rows_of, j):
    """Damped Newton on the target S minus patient ``s.patients[j]`` with its own penalty (the fallback).

    A feature constant on the target's rows is dropped (weight 0), as the exact protocol drops it.
    """
    rows = np.setdiff1d(s.rows, rows_of[s.patients[j]], assume_unique=True)
    At = s.A[rows]
    drop = np.append(At[:, :-1].max(axis=0) <= At[:, :-1].min(axis=0), False)
    ratio = np.where(drop, 1.0, s.ratio[j])
    scale = np.where(drop, 0.0, 1.0)
    scale[:-1] /= np.sqrt(ratio[:-1])                 # w = scale * a, so that ratio * w^2 = a^2
    a0 = np.where(drop, 0.0, w0 / np.where(scale > 0, scale, 1.0))
    a, _ = _newton_batch((At * scale)[None], y[rows], np.full((1, len(rows)), C), a0[None])
    return a[0] * scale


class SharedPenalised:
    """The penalised protocol's leave-one-patient-out fits from shared fits (module docstring).

    Parameters
    ----------
    X : ndarray (n, p)
    codes : ndarray (n,) of int
        Patient code of each row (0 .. n_groups-1).
    n_groups : int
    inner : list of ndarray
        The fixed inner partition: each inner fold's rows (whole patients), as
        :func:`covreport.stats.penalised.inner_folds` of all the rows.
    outer : bool
        False: the final model only (:meth:`final`), no targets.
    """

    def __init__(self, X, codes, n_groups, inner, outer=True):
        self.grid = PENALTY_GRID
        self.n, self.p = X.shape
        self.codes, self.G, self.K = codes, n_groups, len(inner)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
        self.rows_of = [order[bounds[g]:bounds[g + 1]] for g in range(n_groups)]
        self.fold_rows = list(inner)
        fold_of_pat = np.full(n_groups, -1)
        for k, rows in enumerate(inner):
            fold_of_pat[codes[rows]] = k
        self.sets = []
        for k in range(self.K + 1):
            patients = np.flatnonzero(fold_of_pat != k) if k < self.K else np.arange(n_groups)
            rows = np.sort(np.concatenate([self.rows_of[g] for g in patients]))
            self.sets.append(SharedSet(X, rows, patients if outer else patients[:0], self.rows_of))

    def _shared_fit(self, k, y, A):
        """Yield (grid index, C, S_k's weights, its linear predictor on every row) for every C, or nothing
        when S_k holds one class; ``A`` is S_k's rows of its design."""
        s = self.sets[k]
        yS = y[s.rows]
        if yS.min() == yS.max():
            return
        w = np.zeros(A.shape[1])
        w[-1] = math.log(yS.mean() / (1 - yS.mean()))
        for ci, C in enumerate(self.grid):
            w = _newton_batch(A[None], yS, np.full((1, len(yS)), C), w[None])[0][0]
            yield ci, C, w, s.A @ w

    def _inner_loss_of_fold(self, k, y, z, ci, loss, has):
        """Inner fold k scored by S_k's own fit: the term of each patient of fold k (its rows left out)."""
        rows = self.fold_rows[k]
        dev = _deviance(z[rows], y[rows])
        total = dev.sum()
        pos = np.full(self.n, -1)
        pos[rows] = np.arange(len(rows))
        for pat in np.unique(self.codes[rows]):
            own = pos[self.rows_of[pat]]
            if len(own) == len(rows):
                continue                                   # the fold is this patient only: nothing held out
            loss[pat, ci] += total - dev[own].sum()
            has[pat] = True

    def run(self, y, details=False):
        """Out-of-fold probabilities, as :meth:`covreport.stats.penalised.Penalised.run`."""
        G, n_c = self.G, len(self.grid)
        loss, has = np.zeros((G, n_c)), np.zeros(G, dtype=bool)
        rmax = max(len(r) for r in self.rows_of)
        z_out = np.zeros((G, n_c, rmax))
        fitted = np.zeros(G, dtype=bool)
        nz_out = np.zeros((G, n_c, self.p), dtype=bool) if details else None
        pos_y = np.array([y[r].sum() for r in self.rows_of])
        size = np.array([len(r) for r in self.rows_of])
        for k, s in enumerate(self.sets):
            m, m1 = len(s.rows), y[s.rows].sum()
            two = np.flatnonzero((m1 - pos_y[s.patients] > 0) & (m1 - pos_y[s.patients] < m - size[s.patients]))
            cols = np.flatnonzero(s.keep)
            shift = np.zeros((len(two), len(cols) + 1))   # each target's fit less S's, at the previous C
            A = s.A[s.rows]
            for ci, C, w, z in self._shared_fit(k, y, A):
                if k < self.K:
                    self._inner_loss_of_fold(k, y, z, ci, loss, has)
                if len(two) == 0:
                    continue
                d = special.expit(z[s.rows])
                d *= 1.0 - d
                pen = np.ones(A.shape[1])
                pen[-1] = 0.0
                H = _hessian(A, d, C, pen)
                H_inv = _spd_inverse(H)
                for lo in range(0, len(two), _CHUNK):
                    sel = two[lo:lo + _CHUNK]
                    W, ok = _targets(s, A, y, C, w + shift[lo:lo + _CHUNK], H_inv, d, self.rows_of, sel)
                    for t in np.flatnonzero(~ok | s.near_constant[sel]):
                        W[t] = _exact_target(s, y, C, w, self.rows_of, sel[t])
                    shift[lo:lo + _CHUNK] = W - w
                    pats = s.patients[sel]
                    if k < self.K:
                        rows = self.fold_rows[k]
                        loss[pats, ci] += _deviance(_matmul(s.A[rows], W.T), y[rows][:, None]).sum(axis=0)
                        has[pats] = True
                    else:
                        for t, pat in enumerate(pats):
                            z_out[pat, ci, :size[pat]] = s.A[self.rows_of[pat]] @ W[t]
                        fitted[pats] = True
                        if details:
                            nz_out[pats[:, None], ci, cols[None, :]] = W[:, :-1] != 0
        prob = np.empty(self.n)
        penalty = [None] * G
        nonzero = np.zeros(G, dtype=np.int64)
        counts = np.zeros(self.p, dtype=np.int64)
        one_class = 0
        total1 = y.sum()
        for pat in range(G):
            rows = self.rows_of[pat]
            if not fitted[pat]:
                prob[rows] = 1.0 if total1 - pos_y[pat] > 0 else 0.0
                one_class += 1
                continue
            ci = int(np.argmin(loss[pat])) if has[pat] else self.grid.index(FALLBACK_C)
            prob[rows] = special.expit(z_out[pat, ci, :size[pat]])
            penalty[pat] = self.grid[ci]
            if details:
                nonzero[pat] = int(nz_out[pat, ci].sum())
                counts += nz_out[pat, ci]
        return prob, penalty, nonzero, counts, one_class

    def final(self, y):
        """The model refitted on all rows, C tuned by the inner CV, as :meth:`Penalised.final`."""
        loss, used = np.zeros(len(self.grid)), False
        for k in range(self.K):
            for ci, _c, _w, z in self._shared_fit(k, y, self.sets[k].A[self.sets[k].rows]):
                rows = self.fold_rows[k]
                loss[ci] += _deviance(z[rows], y[rows]).sum()
                used = True
        ci = int(np.argmin(loss)) if used else self.grid.index(FALLBACK_C)
        w = None
        s = self.sets[self.K]
        for i, _c, w_i, _z in self._shared_fit(self.K, y, s.A[s.rows]):
            if i == ci:
                w = w_i
                break
        if w is None:
            return None
        coef = np.zeros(self.p)
        coef[s.keep] = w[:-1]
        return {"C": self.grid[ci], "intercept": float(w[-1]), "coefficients": coef, "mean": s.mean,
                "sd": s.sd, "kept": s.keep, "inner_deviance": [float(v) for v in loss] if used else None}
