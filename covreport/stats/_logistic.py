"""L2-penalised logistic regression solvers of the LOPO fast path.

The model is scikit-learn's ``LogisticRegression()`` with its defaults: it
minimises ``0.5 ||w||^2 + C sum_i log-loss_i`` (C = 1, the intercept
unpenalised), which is strictly convex with a unique optimum. These solvers go
to that optimum for a batch of problems at once (see :mod:`covreport.stats.lopo`
for how the fold loop uses them):

- :func:`_newton_batch`: damped Newton with Armijo backtracking, in the
  primal or, when a problem keeps more features than pairs, in the n x n dual
  form by Woodbury's identity;
- :func:`_chord_batch`: chord iterations from a nearby fit with a fixed
  Hessian (one inverse shared by the targets of a feature set, by Woodbury's
  identity); targets that do not converge are reported for a Newton refit.

References
----------
.. [1] Nocedal J, Wright SJ. Numerical Optimization, 2nd ed. 2006, ch. 3
   (Newton's method with backtracking line search).
.. [2] Woodbury MA. Inverting modified matrices. Memorandum Report 42,
   Statistical Research Group, Princeton University, 1950.
"""

from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from scipy import special

# Convergence of the solvers: Newton stops after the step whose decrement
# g' H^-1 g (twice the objective gap, to second order) is below _NEWTON_TOL;
# chord iterations stop when a step moves no linear predictor by more than _CHORD_TOL, or (targets
# sharing a Hessian) when the steps still to come, extrapolated from the contraction of the last two
# (chord iterations converge linearly), would move none by more than _CHORD_TOL * _CHORD_AHEAD in all.
_NEWTON_TOL = 1e-12
_NEWTON_MAX_ITER = 100
_CHORD_TOL = 1e-6
_CHORD_AHEAD = 1e-2
_CHORD_MAX_ITER = 40
# BLAS threads of the fast path (see _blas_limits).
_BLAS_THREADS = 1
# Products of at least this many multiply-adds are cut into _SPLIT_PARTS blocks of rows, whatever the threads
# (so the same blocks, the same bits), that the BLAS threads the caller had run side by side (_matmul).
_SPLIT_MIN = 200_000_000
_SPLIT_PARTS = 4
_split_threads = 1            # set by the outermost _blas_limits
_blas_depth = 0
_split_pools = {}             # thread pools of _matmul, by size
# chord targets sharing a feature set with at least this many share its Hessian inverse
_SHARED_MIN = 8
# ... and get the set's own Hessian at their common start when they number at least this times its size
# (the product costs about as much as a quarter of a chord step for each of them)
_OWN_HESSIAN_TARGETS = 0.25
# "fast" uses chord iterations above this many pairs.
_CHORD_MIN_PAIRS = 400


def _residual(z, y):
    """expit(z) - y[:, None], in place of ``z`` (n, T): expit as 0.5 + 0.5 tanh(z / 2), numpy's vectorised
    tanh, about 3x scipy's expit on this machine and within 2.3e-16 of it (an absolute error, harmless
    in a gradient)."""
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5
    z -= y[:, None]
    return z


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



class ChordContext(NamedTuple):
    """What every chord iteration of one LOPO problem shares.

    Attributes
    ----------
    A : ndarray (n, u+2)
        The union design: the features selected by any fold, a zero dummy
        column (padding), then the intercept (ones).
    At : ndarray (u+2, n)
        ``A`` transposed, contiguous.
    colmax : ndarray (u+2,)
        Column maxima of ``|A|`` (bound on how far a step moves a predictor).
    HU : ndarray (u+2, u+2)
        Penalised Hessian on all pairs at the all-pairs fit (dummy row and
        column zero).
    W0 : ndarray (n,)
        Logistic weights p(1-p) at the all-pairs fit.
    y : ndarray (n,)
        0/1 outcomes.
    dummy : int
        Index of the dummy column.
    """

    A: np.ndarray
    At: np.ndarray
    colmax: np.ndarray
    HU: np.ndarray
    W0: np.ndarray
    y: np.ndarray
    dummy: int


def _unique_rows(idx):
    """``np.unique(idx, axis=0, return_inverse=True)`` of a 2-d integer array, the same arrays: the rows are
    told apart by their bytes first, so that only the distinct ones are sorted (numpy sorts every row
    field by field: 0.3 s for the 5,000 folds of 318 positions of a 10,000-pair study)."""
    idx = np.ascontiguousarray(idx)
    seen, first = {}, []
    codes = np.empty(len(idx), dtype=np.int64)
    for i, row in enumerate(idx):
        code = seen.setdefault(row.tobytes(), len(first))
        if code == len(first):
            first.append(i)
        codes[i] = code
    sets, inverse = np.unique(idx[first], axis=0, return_inverse=True)
    return sets, inverse.reshape(-1)[codes]


def _chord_batch(ctx, idx, rows, row_valid, w0, g0):
    """Chord iterations for a batch of targets, grouped by feature set.

    Targets sharing a feature set with at least _SHARED_MIN others share the
    inverse of the set's all-pairs Hessian and take their held-out pairs out
    of it by Woodbury's identity (:func:`_chord_shared`); the others get
    their own Hessian (:func:`_chord_each`). Returns the solutions and the
    indices of targets that did not converge.
    """
    out = np.array(w0, dtype=np.float64, copy=True)
    sets, inverse = _unique_rows(idx)
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
    A, colmax, HU, W0, y, dummy = ctx.A, ctx.colmax, ctx.HU, ctx.W0, ctx.y, ctx.dummy
    n, u2 = A.shape
    k1 = len(ib)
    valid = ib != dummy
    AS = np.ascontiguousarray(A[:, ib])                          # (n, k1); dummy columns are 0
    ASt = np.ascontiguousarray(AS.T)
    pen = np.where(ib == u2 - 1, 0.0, 1.0)
    if len(w0) >= _OWN_HESSIAN_TARGETS * k1 and (w0 == w0[0]).all():
        # every target starts from the set's own all-pairs fit: its Hessian there (one n x k1^2 product)
        # contracts the chord steps far better than the all-pairs selection's when the fits differ
        p0 = special.expit(AS @ w0[0])
        W0 = p0 * (1.0 - p0)
        H = (ASt * W0) @ AS
        H[np.arange(k1), np.arange(k1)] += pen * valid
    else:
        H = HU[np.ix_(ib, ib)] * (valid[:, None] & valid[None, :])
    H[np.arange(k1), np.arange(k1)] += ~valid
    Hinv = _spd_solve(H, np.eye(k1))
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
            P = (U.reshape(-1, k1) @ Hinv).reshape(U.shape)          # (nb, r, k1): one product, not nb
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
        before = np.full(nb, np.nan)                                 # each target's previous move
        for it in range(_CHORD_MAX_ITER):
            if len(act) == 0:
                break
            if it == 0 and g0 is not None:
                g = g0[sl]
            else:
                R = _matmul(AS, w[act].T, _residual, y)              # (n, na) residuals
                if rmax:
                    ra = rws[act]
                    R[ra, np.broadcast_to(np.arange(len(act))[:, None], ra.shape)] = 0.0
                g = _matmul(ASt, R).T + pen * w[act]
                g[:, ~valid] = 0.0
            step = solve(g, act)
            w[act] -= step
            moved = (np.abs(step) * cmax).sum(axis=1)
            bad = ~np.isfinite(moved)
            failed.extend(act[bad] + s)
            with np.errstate(divide="ignore", invalid="ignore"):
                rate = moved / before[act]                           # NaN on a target's first step
                ahead = np.where(rate < 0.5, moved * rate / (1.0 - rate), np.inf)
            before[act] = moved
            act = act[~bad & (moved > _CHORD_TOL) & (ahead > _CHORD_TOL * _CHORD_AHEAD)]
        failed.extend(act + s)
        out[sl] = w
    return out, np.array(sorted(failed), dtype=np.int64)


def _chord_each(ctx, idx, rows, row_valid, w0, g0):
    """Chord iterations w <- w - H_t^-1 g_t(w) for a batch of targets.

    ``ctx`` (:class:`ChordContext`): the union
    design (dummy zero column, then intercept), the penalised Hessian on all
    pairs at the all-pairs fit and its weights. Each target's Hessian is H_U
    restricted to its features minus its held-out pairs' part. ``g0``, when
    given, is the gradient at ``w0`` (no pass over the data for the first
    step). Returns the solutions and the indices of targets that did not
    converge within _CHORD_MAX_ITER steps or went non-finite.
    """
    A, At, colmax, HU, W0, y, dummy = ctx.A, ctx.At, ctx.colmax, ctx.HU, ctx.W0, ctx.y, ctx.dummy
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
                R = _matmul(A, Wfull, _residual, y)
                if rws.shape[1]:
                    ra = rws[act]
                    R[ra, np.broadcast_to(ca[:, None], ra.shape)] = 0.0   # held-out pairs
                g = _matmul(At, R)[ia, ca[:, None]] + pen[act] * w[act]
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


@contextmanager
def _blas_limits():
    """Run the fast path with single-threaded BLAS (scoped; restored on exit).

    Its work is many small batched matrix products and factorisations, for
    which BLAS threads cost more than they give, and far more when other
    processes share the cores. Its few large products (:func:`_matmul`) get
    the BLAS threads the caller had instead (one in a worker process of
    :mod:`covreport.parallel`, whose BLAS joblib caps), as Python threads that
    sleep, not spin, while they wait.
    """
    global _split_threads, _blas_depth
    from threadpoolctl import threadpool_limits

    from covreport._threads import available_cpus

    before = _split_threads
    with threadpool_limits(limits=_BLAS_THREADS, user_api="blas") as limiter:   # one scan of the libraries
        if _blas_depth == 0:    # nested inside another: the BLAS threads the outermost caller had
            had = limiter.get_original_num_threads().get("blas") or 1
            _split_threads = max(1, min(had, available_cpus(), _SPLIT_PARTS))
        _blas_depth += 1
        try:
            yield
        finally:
            _blas_depth -= 1
            _split_threads = before


def _matmul(a, b, then=None, y=None):
    """``a @ b`` for 2-d arrays, or ``then(a @ b, y)`` (``then`` works in place, row by row: :func:`_residual`).

    A large product runs in :data:`_SPLIT_PARTS` blocks of rows of ``a``, side by side on the threads
    :func:`_blas_limits` allows (numpy releases the GIL in BLAS and in ufuncs), ``then`` applied to each
    block in its thread. The blocks do not depend on the threads, so neither does a single bit of the result.
    """
    m = a.shape[0]
    if m * a.shape[1] * b.shape[1] < _SPLIT_MIN or m < 2 * _SPLIT_PARTS:
        return a @ b if then is None else then(a @ b, y)
    out = np.empty((m, b.shape[1]), dtype=np.result_type(a, b))
    cuts = np.linspace(0, m, _SPLIT_PARTS + 1).astype(int)
    parts = [slice(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]

    def product(rows):
        np.matmul(a[rows], b, out=out[rows])
        if then is not None:
            then(out[rows], y[rows])

    if _split_threads == 1:
        for rows in parts:
            product(rows)
        return out
    if _split_threads not in _split_pools:
        from concurrent.futures import ThreadPoolExecutor

        _split_pools[_split_threads] = ThreadPoolExecutor(_split_threads, thread_name_prefix="covreport-matmul")
    list(_split_pools[_split_threads].map(product, parts))
    return out
