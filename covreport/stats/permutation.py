"""Permutation test of the leave-one-patient-out accuracy.

References
----------
.. [1] Ojala M, Garriga GC. Permutation tests for studying classifier
   performance. JMLR 2010;11:1833-1863.
.. [2] Phipson B, Smyth GK. Permutation p-values should never be zero.
   Stat Appl Genet Mol Biol 2010;9:39 (p = (1 + b) / (1 + N)).
.. [3] Clopper CJ, Pearson ES. The use of confidence or fiducial limits
   illustrated in the case of the binomial. Biometrika 1934;26:404-413.
"""

import itertools

import numpy as np

from covreport.errors import StatsError
from covreport.stats._logistic import _blas_limits
from covreport.stats._util import check_alpha
from covreport.stats.lopo import (
    SELECTION_ALPHA, SOLVERS, THRESHOLD, _check_protocol, _group_codes, _Lopo, _prepare, _reference_run,
)

PERMUTATION_METHOD = (
    "permutation test of the accuracy: whole patients' outcome vectors permuted between "
    "patients with the same number of pairs (patients sorted by id, pairs in canonical order; "
    "numpy default_rng(seed)), the whole pipeline (feature selection included) rerun each time; "
    "p = (1 + #{{permuted accuracy >= observed}}) / (1 + N), N = {n:,}"
)

#: Level of the Monte Carlo interval of a permutation p-value.
MC_LEVEL = 0.99

MC_METHOD = (
    "Monte Carlo error of the permutation p: b of the N permutations had an accuracy at least the observed; "
    "p = (b + 1) / (N + 1) (Phipson & Smyth 2010); Monte Carlo standard error sqrt(p (1 - p) / N); "
    "{level:g}% Clopper-Pearson interval of b out of N, the range of the exact permutation p (the limit of "
    "infinitely many permutations) compatible with the draws; another seed, or renaming the patients (they "
    "are sorted by id before the permuted vectors are drawn), draws other permutations and moves p within "
    "this interval"
)

MC_REFERENCE = ("Phipson B, Smyth GK. Stat Appl Genet Mol Biol 2010;9:39; Clopper CJ, Pearson ES. "
                "Biometrika 1934;26:404-413")


def monte_carlo_error(at_least, n_permutations, *, level=MC_LEVEL):
    """Monte Carlo standard error and interval of a permutation p-value.

    Parameters
    ----------
    at_least : int
        b, the permutations whose statistic was at least the observed one.
    n_permutations : int
        N, the permutations drawn (>= 1).
    level : float
        Level of the Clopper-Pearson interval (0.99 by default).

    Returns
    -------
    dict
        ``p`` = (b + 1) / (N + 1), ``se`` = sqrt(p (1 - p) / N), ``ci_low``
        and ``ci_high`` (Clopper-Pearson interval of b / N), ``level``,
        ``at_least``, ``n_permutations``, ``unit`` ("permutation"),
        ``method``, ``reference``.

    References
    ----------
    Phipson & Smyth 2010; Clopper & Pearson 1934.

    Examples
    --------
    >>> rec = monte_carlo_error(0, 999)
    >>> rec["p"], round(rec["ci_high"], 5)
    (0.001, 0.00529)
    """
    from scipy.stats import beta

    b, m = int(at_least), int(n_permutations)
    if m < 1 or not 0 <= b <= m:
        raise StatsError(f"a Monte Carlo error needs 0 <= b <= N and N >= 1, got b = {at_least}, N = {n_permutations}")
    if not 0 < level < 1:
        raise StatsError(f"level must lie strictly between 0 and 1, got {level!r}")
    a = 1 - level
    p = (b + 1) / (m + 1)
    lo = 0.0 if b == 0 else float(beta.ppf(a / 2, b, m - b + 1))
    hi = 1.0 if b == m else float(beta.ppf(1 - a / 2, b + 1, m - b))
    return {"p": p, "se": float(np.sqrt(p * (1 - p) / m)), "ci_low": lo, "ci_high": hi, "level": level,
            "at_least": b, "n_permutations": m, "unit": "permutation",
            "method": MC_METHOD.format(level=100 * level), "reference": MC_REFERENCE}


def check_threshold(threshold):
    """A classification threshold strictly between 0 and 1, as a float (else StatsError)."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise StatsError(f"the classification threshold must be a number between 0 and 1, got {threshold!r}") from None
    if not 0 < t < 1:
        raise StatsError(f"the classification threshold must lie strictly between 0 and 1, got {threshold!r}")
    return t


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
                  solver="fast", desc=None, threshold=THRESHOLD, jobs=None):
    """Permutation p-value of the LOPO accuracy.

    Parameters
    ----------
    X, y, groups, protocol, alpha, solver
        As in :func:`lopo_predict`.
    n_permutations : int
        Number of permutations N (0 skips the test: p is None).
    seed : int
        Seed of ``numpy.random.default_rng``.
    desc : str, optional
        Label of the progress bar (stderr; :mod:`covreport.progress`).
    threshold : float
        Classification threshold of the accuracy: a pair is predicted Worse
        when its out-of-fold probability is >= threshold (0.5 by default).
    jobs : int, optional
        Workers (:func:`covreport.parallel.run_chunks`; default the active
        engine's). The result is the same for any number.

    Returns
    -------
    dict
        ``p`` = (1 + #{permuted accuracy >= observed}) / (1 + N) (Phipson &
        Smyth 2010), ``observed_accuracy``, ``n_permutations``,
        ``n_at_least_observed``, ``method``, ``monte_carlo``
        (:func:`monte_carlo_error`, None without permutations).

    Notes
    -----
    Outcome vectors are permuted between whole patients with the same number
    of pairs (:func:`permuted_outcomes`), so each patient keeps a coherent
    vector and the fold structure is unchanged; the whole pipeline (selection
    included) is rerun on each permutation (Ojala & Garriga 2010).
    """
    from covreport import parallel

    plan = permutation_plan(X, y, groups, protocol=protocol, n_permutations=n_permutations, seed=seed, alpha=alpha,
                            solver=solver, threshold=threshold, jobs=jobs)
    return parallel.run_plans([plan], desc=desc or f"Permutations ({protocol})", unit="perm", jobs=jobs)[0]


def permutation_plan(X, y, groups, *, protocol, n_permutations=1000, seed=0, alpha=SELECTION_ALPHA, solver="fast",
                     threshold=THRESHOLD, jobs=None, observed=None):
    """:func:`permutation_p` as a :class:`covreport.parallel.Plan` (chunks of permutations, then the p-value).

    ``observed`` (the out-of-fold probabilities of the unpermuted run) saves
    refitting them when the caller has them.
    """
    from covreport import parallel

    protocol = _check_protocol(protocol)
    alpha = check_alpha(alpha)
    threshold = check_threshold(threshold)
    if solver not in SOLVERS:
        raise StatsError(f"solver must be one of {SOLVERS}, got {solver!r}")
    try:
        n_perm = int(n_permutations)
    except (TypeError, ValueError):
        raise StatsError(f"n_permutations must be a whole number >= 0, got {n_permutations!r}") from None
    if n_perm < 0 or n_perm != n_permutations:
        raise StatsError(f"n_permutations must be a whole number >= 0, got {n_permutations!r}")
    values, _names, yf, codes, patients = _prepare(X, y, groups)
    groups = np.asarray(groups, dtype=object)
    if observed is None:
        with _blas_limits():
            observed = _correct_counter(values, codes, len(patients), protocol, alpha, solver, threshold)(yf)
    else:
        observed = int(((np.asarray(observed) >= threshold) == (yf == 1)).sum())
    bounds = parallel.chunk_bounds(n_perm, jobs)
    chunks = [(values, yf, groups, protocol, a, b, seed, alpha, solver, threshold) for a, b in bounds]

    def finish(counts):
        n = len(yf)
        method = PERMUTATION_METHOD.format(n=n_perm)
        if n_perm == 0:
            return {"p": None, "observed_accuracy": observed / n, "n_permutations": 0,
                    "n_at_least_observed": None, "method": method, "monte_carlo": None,
                    "note": "permutation test skipped (0 permutations)"}
        at_least = int(sum(int((c >= observed).sum()) for c in counts))
        return {"p": (1 + at_least) / (1 + n_perm), "observed_accuracy": observed / n,
                "n_permutations": n_perm, "n_at_least_observed": at_least, "method": method,
                "monte_carlo": monte_carlo_error(at_least, n_perm), "note": None}

    return parallel.Plan(permuted_correct, chunks, [b - a for a, b in bounds], finish)


def _correct_counter(values, codes, G, protocol, alpha, solver, threshold):
    """A function of an outcome vector: how many pairs the protocol's LOPO run predicts correctly."""
    if solver == "sklearn":
        def correct(yy):
            prob = _reference_run(values, yy, codes, G, protocol, alpha).prob
            return int(((prob >= threshold) == (yy == 1)).sum())
    else:
        problem = _Lopo(values, codes, G)

        def correct(yy):
            prob = problem.run(yy, protocol, alpha, solver).prob
            return int(((prob >= threshold) == (yy == 1)).sum())
    return correct


def permuted_correct(values, y, groups, protocol, start, stop, seed, alpha, solver, threshold):
    """Correct predictions of permutations ``start`` to ``stop - 1`` of :func:`permuted_outcomes` (one chunk).

    The stream of permutations is replayed from its start, so each
    permutation is the same whichever chunk computes it.
    """
    _values, _names, yf, codes, patients = _prepare(values, y, groups)
    correct = _correct_counter(values, codes, len(patients), protocol, alpha, solver, threshold)
    perms = itertools.islice(permuted_outcomes(yf, groups, stop, seed), start, stop)
    with _blas_limits():
        return np.array([correct(yp) for yp in perms], dtype=np.int64)
