"""Sensitivity analyses of the change of each label: interval, projection and the ordered outcome.

- :func:`mixed_model_contrasts`: for each label the linear mixed model
  ``change ~ C(outcome) + np.log(interval_days) + projection_change`` with a
  random intercept per patient (design by statsmodels ``MixedLM.from_formula``,
  REML by a profiled one-parameter search, :func:`_best_fit`), and its
  outcome contrasts (Worse vs Improved, Worse vs Stable, Stable vs Improved)
  with t CIs and tests on nlme's between/within df; terms that cannot be estimated (no dates, one projection
  pattern) are left out and the formula says so;
- :func:`projection_changes`: counts of the projection of the first and second
  CXR per outcome group (``first_view``, ``second_view`` of the manifest);
- :func:`jonckheere_terpstra`: the trend across the ordered Improved < Stable <
  Worse, pair level (exact or normal with tie correction) and patient-clustered
  (cluster permutation, :func:`covreport.stats.clustered.cluster_permutations`).

References
----------
.. [1] Laird NM, Ware JH. Random-effects models for longitudinal data.
   Biometrics 1982;38:963-974.
.. [2] Jonckheere AR. A distribution-free k-sample test against ordered
   alternatives. Biometrika 1954;41:133-145.
.. [3] Terpstra TJ. The asymptotic normality and consistency of Kendall's test
   against trend, when ties are present in one ranking. Indag Math 1952;14:327-333.
.. [4] Hollander M, Wolfe DA, Chicken E. Nonparametric Statistical Methods,
   3rd ed. Wiley 2014, section 6.2 (variance with ties).
.. [5] Pinheiro JC, Bates DM. Mixed-Effects Models in S and S-PLUS. Springer
   2000, section 4.2.2 (denominator degrees of freedom).
"""

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from covreport.constants import CONTRASTS, IMPROVED, OUTCOMES, STABLE, WORSE
from covreport.errors import StatsError
from covreport.stats._util import check_alpha
from covreport.stats.clustered import _codes, cluster_permutations
from covreport.stats.effect_sizes import mw_null_counts

#: The outcome order of the trend test (increasing).
TREND_ORDER = (IMPROVED, STABLE, WORSE)

MIXED_COLUMNS = (
    "label", "contrast", "group1", "group2", "estimate", "se", "ci_low", "ci_high", "t", "df", "p",
    "n_pairs", "n_patients", "formula", "terms_left_out", "random_effect_variance", "residual_variance",
    "converged", "unit", "analysis", "method", "note",
)

MIXED_METHOD = (
    "linear mixed model (Laird & Ware 1982) with a random intercept per patient, design of statsmodels "
    "MixedLM.from_formula('{formula}', groups=patient_id), fitted by REML: the residual variance profiled "
    "out, the ratio of the two variances maximised over 0 and a grid of 121 values from 1e-8 to 1e4, the "
    "best refined by Brent's method; "
    "contrast = difference of the "
    "outcome coefficients (reference Improved) with its {level:g}% CI and two-sided t test "
    "from the covariance (X' V^-1 X)^-1 of the fixed effects at the REML variance estimates (as R's "
    "nlme vcov(lme(...))), on nlme's between/within degrees of freedom (Pinheiro & Bates 2000, section "
    "4.2.2: pairs - patients - terms that vary within a patient, or patients - 1 - terms constant within "
    "every patient); not adjusted for multiplicity"
)

SENSITIVITY = "sensitivity: adjusted for the interval between the CXRs and projection changes"


def _projection(first, second):
    """'same', 'changed' or 'unknown' for each pair from its two views."""
    out = []
    for a, b in zip(first, second):
        known = all(isinstance(v, str) and v.strip() for v in (a, b))
        out.append("unknown" if not known else ("same" if a == b else "changed"))
    return np.array(out, dtype=object)


def projection_changes(pairs, *, outcome_column="outcome"):
    """Counts of the projections of the first and second CXR per outcome group.

    Parameters
    ----------
    pairs : pandas.DataFrame
        One row per analysed pair with ``patient_id``, the outcome and, when
        the manifest has them, ``first_view`` and ``second_view`` (AP, AP
        Supine, PA, Lateral; blank when not recorded).

    Returns
    -------
    pandas.DataFrame
        One row per outcome group (Worse, Stable, Improved, then All) and
        projection pattern: ``outcome``, ``first_view``, ``second_view``
        ("not recorded" when blank), ``projection_change`` ("same",
        "changed", "unknown"), ``pairs``, ``patients``, ``unit`` "pair".
    """
    n = len(pairs)
    first = pairs["first_view"].to_numpy(dtype=object) if "first_view" in pairs else np.full(n, None)
    second = pairs["second_view"].to_numpy(dtype=object) if "second_view" in pairs else np.full(n, None)
    change = _projection(first, second)
    shown = lambda v: v if isinstance(v, str) and v.strip() else "not recorded"  # noqa: E731
    df = pd.DataFrame({"outcome": pairs[outcome_column].to_numpy(), "patient_id": pairs["patient_id"].to_numpy(),
                       "first_view": [shown(v) for v in first], "second_view": [shown(v) for v in second],
                       "projection_change": change})
    rows = []
    for outcome in (*OUTCOMES, "All"):
        sub = df if outcome == "All" else df[df["outcome"] == outcome]
        for (a, b, c), block in sub.groupby(["first_view", "second_view", "projection_change"], sort=True):
            rows.append({"outcome": outcome, "first_view": a, "second_view": b, "projection_change": c,
                         "pairs": int(len(block)), "patients": int(block["patient_id"].nunique()),
                         "unit": "pair"})
    return pd.DataFrame(rows, columns=["outcome", "first_view", "second_view", "projection_change", "pairs",
                                       "patients", "unit"])


def _design(changes, label, outcome_column):
    """The model frame of one label, the formula and the terms left out (with reasons)."""
    df = pd.DataFrame({
        "change": pd.to_numeric(changes[label], errors="coerce"),
        "outcome": changes[outcome_column].astype(object),
        "patient_id": changes["patient_id"].astype(str),
    })
    left_out = []
    terms = ["C(outcome, Treatment('Improved'))"]
    days = pd.to_numeric(changes["interval_days"], errors="coerce") if "interval_days" in changes else None
    if days is None or days.notna().sum() == 0:
        left_out.append("np.log(interval_days): no interval (no dates or offsets)")
    else:
        df["interval_days"] = days
        if (days.dropna() <= 0).any():
            terms.append("np.log1p(interval_days)")
            left_out.append("np.log(interval_days) replaced by np.log1p(interval_days): an interval of 0 days")
        else:
            terms.append("np.log(interval_days)")
    proj = _projection(changes["first_view"] if "first_view" in changes else [None] * len(changes),
                       changes["second_view"] if "second_view" in changes else [None] * len(changes))
    df["projection_change"] = proj
    levels = sorted(set(proj))
    if len(levels) < 2:
        left_out.append(f"projection_change: every pair is '{levels[0] if levels else 'unknown'}'")
    else:
        ref = "same" if "same" in levels else levels[0]
        terms.append(f"C(projection_change, Treatment('{ref}'))")
    df = df[df["outcome"].isin(OUTCOMES)].dropna(subset=[c for c in ("change", "interval_days") if c in df])
    return df, "change ~ " + " + ".join(terms), left_out


def mixed_model_contrasts(changes, labels, *, outcome_column="outcome", contrasts=CONTRASTS, alpha=0.05):
    """Outcome contrasts of each label's change from a linear mixed model (sensitivity analysis).

    Parameters
    ----------
    changes : pandas.DataFrame
        One row per pair: ``patient_id``, the outcome, ``interval_days``,
        ``first_view``, ``second_view`` (those present) and one change column
        per label.
    labels : sequence of str
    contrasts : sequence of (str, str)
    alpha : float
        1 - confidence level of the t intervals.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`MIXED_COLUMNS`: one row per label and contrast; the
        estimate is the adjusted mean difference of the change (group 1 minus
        group 2), ``unit`` "patient" (the random intercept), ``formula`` the
        formula that was fitted.

    Examples
    --------
    The model of one label (``patient_id`` the groups) is
    ``MixedLM.from_formula("change ~ C(outcome, Treatment('Improved')) +
    np.log(interval_days) + C(projection_change, Treatment('same'))",
    data, groups=data["patient_id"]).fit(reml=True)``.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM

    alpha = check_alpha(alpha)
    if not isinstance(changes, pd.DataFrame):
        raise StatsError("changes must be a pandas DataFrame with one row per pair")
    missing = [c for c in ("patient_id", outcome_column, *labels) if c not in changes.columns]
    if missing:
        raise StatsError(f"the changes table lacks column(s) {missing}")
    level = round(100 * (1 - alpha), 6)
    rows = []
    for label in labels:
        df, formula, left_out = _design(changes, label, outcome_column)
        base = {"label": label, "n_pairs": int(len(df)), "n_patients": int(df["patient_id"].nunique()),
                "formula": formula, "terms_left_out": "; ".join(left_out) or None, "unit": "patient",
                "analysis": SENSITIVITY, "method": MIXED_METHOD.format(formula=formula, level=level)}
        fit, note = None, None
        present = set(df["outcome"])
        if len(present) < 2 or df["patient_id"].nunique() < 3 or float(np.ptp(df["change"])) == 0.0:
            note = "not fitted: fewer than 2 outcome groups or 3 patients, or the change is constant"
        else:
            fit, note = _best_fit(MixedLM.from_formula(formula, data=df, groups=df["patient_id"]))
        for group1, group2 in contrasts:
            row = {**base, "contrast": f"{group1} vs {group2}", "group1": group1, "group2": group2,
                   "estimate": math.nan, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                   "t": math.nan, "df": math.nan, "p": math.nan, "random_effect_variance": math.nan,
                   "residual_variance": math.nan, "converged": None, "note": note}
            if fit is not None and {group1, group2} <= present:
                names = list(fit.fe_params.index)
                vec = np.zeros(len(names))
                for g, sign in ((group1, 1.0), (group2, -1.0)):
                    name = f"C(outcome, Treatment('Improved'))[T.{g}]"
                    if g != IMPROVED:
                        vec[names.index(name)] += sign
                cov = _gls_cov(fit)
                est = float(vec @ fit.fe_params.to_numpy())
                se = float(math.sqrt(vec @ cov @ vec))
                dof = float(min(_nlme_df(fit.model)[vec != 0]))
                q = sps.t.ppf(1 - alpha / 2, dof) if dof >= 1 else math.nan
                row.update({"estimate": est, "se": se, "ci_low": est - q * se, "ci_high": est + q * se,
                            "t": est / se, "df": dof,
                            "p": float(2 * sps.t.sf(abs(est / se), dof)) if dof >= 1 else math.nan,
                            "random_effect_variance": float(fit.cov_re.iloc[0, 0]),
                            "residual_variance": float(fit.scale), "converged": bool(fit.converged)})
            elif fit is not None:
                row["note"] = f"not estimable: {group1 if group1 not in present else group2} has no pair"
            rows.append(row)
    return pd.DataFrame(rows, columns=list(MIXED_COLUMNS))


#: The REML profile of the variance ratio gamma = tau^2 / sigma^2 is evaluated on this grid of log10(gamma)
#: (and at gamma = 0, the boundary); the best point is refined by Brent's method between its neighbours.
GAMMA_GRID = tuple(float(v) for v in np.linspace(-8.0, 4.0, 121))

#: A random-intercept variance at most this fraction of the residual variance is reported as at the boundary.
BOUNDARY = 1e-6


class RemlFit:
    """The REML fit of a random-intercept model: the attributes of statsmodels' ``MixedLMResults`` used here."""

    def __init__(self, model, beta, tau2, sigma2, llf):
        self.model = model
        self.fe_params = pd.Series(beta, index=list(model.exog_names))
        self.cov_re = pd.DataFrame([[tau2]])
        self.scale = sigma2
        self.llf = llf
        self.converged = True


def _reml_profile(model):
    """The profiled REML log-likelihood of ``gamma`` and the fit at a ``gamma``, for one random intercept.

    With V_i = sigma^2 (I + gamma J) per patient, V_i^-1 = (I - c_i J) / sigma^2 with
    c_i = gamma / (1 + n_i gamma), so every term needs only the patients' sums of the design and the
    outcome. sigma^2 is profiled out (sigma^2 = r' V^-1 r / (N - p), V in units of sigma^2); the value
    is statsmodels' ``MixedLM.loglike`` with ``reml=True`` (tests check the two agree).
    """
    X, y = np.asarray(model.exog, float), np.asarray(model.endog, float)
    N, p = X.shape
    dof = N - p
    codes = np.empty(N, dtype=np.int64)                       # the patient of each row
    for i, rows in enumerate(model.row_indices.values()):
        codes[rows] = i
    G = int(codes.max()) + 1
    n_i = np.bincount(codes, minlength=G).astype(float)
    S = np.zeros((G, p))
    np.add.at(S, codes, X)                                    # the patients' column sums
    XtX, Xty, T = X.T @ X, X.T @ y, np.bincount(codes, weights=y, minlength=G)

    def fit(gamma):
        c = gamma / (1.0 + n_i * gamma)
        xvx = XtX - S.T @ (c[:, None] * S)
        xvy = Xty - S.T @ (c * T)
        beta = np.linalg.solve(xvx, xvy)
        res = y - X @ beta
        qf = float(res @ res - (c * np.bincount(codes, weights=res, minlength=G) ** 2).sum())
        _sign, logdet = np.linalg.slogdet(xvx)
        llf = -0.5 * (np.log1p(n_i * gamma).sum() + dof * math.log(qf) + logdet
                      + dof * math.log(2 * math.pi) - dof * math.log(dof) + dof)
        return beta, qf / dof, llf

    return fit


def _best_fit(model):
    """The REML fit of ``model`` (one random intercept) and its note.

    The profiled REML log-likelihood of gamma = tau^2 / sigma^2 is evaluated
    at 0 and on :data:`GAMMA_GRID`; the best grid point is refined by bounded
    Brent minimisation between its neighbours. One parameter, so the global
    maximum on the grid's range is found (statsmodels' gradient optimisers
    often stop short of a variance at the boundary).
    """
    from scipy.optimize import minimize_scalar

    if model.exog.shape[0] <= model.exog.shape[1] or np.linalg.matrix_rank(model.exog) < model.exog.shape[1]:
        return None, "not fitted: the fixed effects cannot be estimated (too few pairs or collinear terms)"
    fit = _reml_profile(model)
    grid = np.array(GAMMA_GRID)
    values = np.array([fit(10.0 ** g)[2] for g in grid])
    best = int(np.argmax(values))
    gamma = 10.0 ** grid[best]
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    opt = minimize_scalar(lambda g: -fit(10.0 ** g)[2], bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-10})
    if -opt.fun > values[best]:
        gamma = 10.0 ** float(opt.x)
    beta, sigma2, llf = fit(gamma)
    beta0, sigma20, llf0 = fit(0.0)
    if llf0 >= llf:
        gamma, beta, sigma2, llf = 0.0, beta0, sigma20, llf0
    if not (np.isfinite(llf) and sigma2 > 0):
        return None, "not fitted: the REML log-likelihood is not finite"
    best_fit = RemlFit(model, beta, gamma * sigma2, sigma2, llf)
    note = None
    if gamma <= BOUNDARY:
        note = ("the random-intercept variance is estimated at 0 (the boundary), so the fit equals ordinary "
                "least squares of the pairs")
    return best_fit, note


def _nlme_df(model):
    """nlme's denominator degrees of freedom of each fixed-effect column, one level of grouping.

    A column that varies within some patient is estimated within patients:
    N - M - (the number of such columns); one constant within every patient
    is estimated between patients: M - 1 - (the number of such columns, the
    intercept not counted); the intercept takes the within df. N pairs, M
    patients (Pinheiro & Bates 2000, section 4.2.2; R nlme's ``getFixDF``).
    """
    X = model.exog
    N, p = X.shape
    groups = list(model.row_indices.values())
    M = len(groups)
    inner = np.array([any(np.ptp(X[rows, j]) > 0 for rows in groups) for j in range(p)])
    intercept = np.array([bool(np.all(X[:, j] == 1.0)) for j in range(p)])
    outer = ~inner & ~intercept
    return np.where(outer, M - 1 - int(outer.sum()), N - M - int(inner.sum())).astype(float)


def _gls_cov(fit):
    """(X' V^-1 X)^-1 at the fitted variances, V = sigma^2 I + tau^2 J per patient (random intercept)."""
    model = fit.model
    sigma2 = float(fit.scale)
    tau2 = float(fit.cov_re.iloc[0, 0])
    info = np.zeros((model.exog.shape[1],) * 2)
    for rows in model.row_indices.values():
        X = model.exog[rows]
        k = len(rows)
        vinv = (np.eye(k) - tau2 / (sigma2 + k * tau2) * np.ones((k, k))) / sigma2
        info += X.T @ vinv @ X
    return np.linalg.inv(info)


# --------------------------------------------------------------------------- trend


def _jt_counts(sizes):
    """Exact null counts of J for groups of ``sizes`` (no ties): the q-multinomial coefficient."""
    dist = np.array([1], dtype=object)
    before = 0
    for n in sizes:
        if before and n:
            step = np.array(mw_null_counts(before, n), dtype=object)
            dist = np.convolve(dist, step)
        before += n
    return dist


def jt_statistic(values, groups):
    """Jonckheere-Terpstra J = sum over ordered group pairs a < b of #(x_a < x_b) + #(x_a = x_b)/2.

    ``groups`` are integer ranks 0, 1, 2, ... in the hypothesised order.
    Accepts one labelling (1-d) or many (2-d, one row each); returns float or array.
    """
    values = np.asarray(values, dtype=float)
    g = np.atleast_2d(np.asarray(groups))
    k = int(g.max()) + 1
    order = np.argsort(values, kind="stable")
    v, g = values[order], g[:, order]
    _, start, counts = np.unique(v, return_index=True, return_counts=True)
    block_start = np.repeat(start, counts)                 # first position of each value's tie block
    block_end = np.repeat(start + counts, counts)          # one past its last position
    total = np.zeros(g.shape[0])
    for lower in range(k - 1):
        cum = np.concatenate([np.zeros((g.shape[0], 1)), np.cumsum(g == lower, axis=1)], axis=1)
        below = cum[:, block_start]
        tied = cum[:, block_end] - below
        contrib = below + 0.5 * tied
        total += (contrib * (g > lower)).sum(axis=1)
    return total if np.ndim(groups) == 2 else float(total[0])


def jonckheere_terpstra(changes, labels, clusters=None, *, outcome_column="outcome", order=TREND_ORDER,
                        n_permutations=4999, seed=0):
    """Trend test of each label's change across the ordered outcome groups.

    Parameters
    ----------
    changes : pandas.DataFrame
        One row per pair: the outcome and one change column per label.
    labels : sequence of str
    clusters : array_like, optional
        Patient id of each row; with it a second row per label gives the
        patient-clustered p (cluster permutation).
    order : sequence of str
        The groups in increasing order (default Improved, Stable, Worse).
    n_permutations : int
    seed : int
        Seed of ``numpy.random.SeedSequence``; the permutations are shared by
        the labels with the same pairs.

    Returns
    -------
    pandas.DataFrame
        Per label a row ``unit`` "pair" (exact p when N <= 100 and no ties,
        as clinfun's ``jonckheere.test``; else normal with the tie-corrected
        variance of Hollander & Wolfe) and, with ``clusters``, a row ``unit``
        "patient" (two-sided cluster permutation p of |J - E J|). Columns
        ``label``, ``order``, ``sizes``, ``J``, ``mean``, ``sd``, ``z``
        (standardised J; positive: the change increases from the first to
        the last group), ``p``, ``p_method``, ``unit``, ``analysis``,
        ``method``, ``note``.
    """
    labels = list(labels)
    order = tuple(order)
    rank = {g: i for i, g in enumerate(order)}
    outcome = changes[outcome_column].to_numpy()
    codes = _codes(clusters, len(changes)) if clusters is not None else None
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    drawn = {}   # permutations of one design (pairs with a change), shared by the labels
    method = ("Jonckheere-Terpstra test (Jonckheere 1954; Terpstra 1952) of a trend of the change across "
              f"{' < '.join(order)}: J = sum over ordered group pairs of #(lower < higher) + ties/2; ")
    rows = []
    for label in labels:
        v = pd.to_numeric(changes[label], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(v) & np.isin(outcome, order)
        x = v[ok]
        g = np.array([rank[o] for o in outcome[ok]], dtype=np.int64)
        sizes = np.bincount(g, minlength=len(order))
        N = int(sizes.sum())
        base = {"label": label, "order": " < ".join(order), "sizes": ", ".join(map(str, sizes)),
                "analysis": "secondary: trend across the ordered outcome", "note": None}
        if (sizes > 0).sum() < 2 or N < 3 or float(np.ptp(x)) == 0.0:
            why = "not tested: constant" if N and float(np.ptp(x)) == 0.0 else "not tested: fewer than 2 groups"
            rows.append({**base, "J": math.nan, "mean": math.nan, "sd": math.nan, "z": math.nan, "p": math.nan,
                         "p_method": None, "unit": "pair", "method": method + "pairs as independent", "note": why})
            continue
        J = jt_statistic(x, g)
        mean = (N * N - float((sizes ** 2).sum())) / 4.0
        _, t = np.unique(x, return_counts=True)
        tied = bool((t > 1).any())
        var = _jt_variance(sizes, t)
        sd = math.sqrt(var)
        z = (J - mean) / sd
        if N <= 100 and not tied:
            dist = _jt_counts([int(s) for s in sizes])
            total = sum(dist)
            lo = int(round(J))
            p_low = sum(dist[: lo + 1]) / total
            p_high = sum(dist[lo:]) / total
            p = float(min(1.0, 2 * min(p_low, p_high)))
            how = "exact null distribution (q-multinomial coefficients), two-sided 2 min(P(J <= j), P(J >= j))"
        else:
            p = float(2 * sps.norm.sf(abs(z)))
            how = "normal approximation with the tie-corrected variance (Hollander & Wolfe 2014, 6.2)"
        rows.append({**base, "J": J, "mean": mean, "sd": sd, "z": z, "p": p, "p_method": how, "unit": "pair",
                     "method": method + "pairs as independent; " + how})
        if codes is not None:
            key = ok.tobytes()
            if key not in drawn:
                drawn[key] = cluster_permutations(codes[ok], g, int(n_permutations), rng)
            perms = drawn[key]
            stats_ = np.abs(jt_statistic(x, perms) - mean)
            obs = abs(J - mean)
            pc = (1 + int((stats_ >= obs - 1e-9 * max(1.0, obs)).sum())) / (1 + int(n_permutations))
            how_c = (f"cluster permutation, {int(n_permutations):,} Monte Carlo permutations: each patient's "
                     "vector of outcomes moves whole to another patient with as many pairs; two-sided p of "
                     "|J - E J|")
            rows.append({**base, "J": J, "mean": mean, "sd": sd, "z": z, "p": pc, "p_method": how_c,
                         "unit": "patient", "method": method + "patients as clusters; " + how_c})
    return pd.DataFrame(rows, columns=["label", "order", "sizes", "J", "mean", "sd", "z", "p", "p_method", "unit",
                                       "analysis", "method", "note"])


def _jt_variance(sizes, ties):
    """Null variance of J with ties (Hollander & Wolfe 2014, eq. 6.19)."""
    n = np.asarray(sizes, dtype=float)
    t = np.asarray(ties, dtype=float)
    N = n.sum()
    a = (N * (N - 1) * (2 * N + 5) - (n * (n - 1) * (2 * n + 5)).sum() - (t * (t - 1) * (2 * t + 5)).sum()) / 72
    b = ((n * (n - 1) * (n - 2)).sum() * (t * (t - 1) * (t - 2)).sum()) / (36 * N * (N - 1) * (N - 2))
    c = ((n * (n - 1)).sum() * (t * (t - 1)).sum()) / (8 * N * (N - 1))
    return float(a + b + c)


__all__ = ["jonckheere_terpstra", "jt_statistic", "mixed_model_contrasts", "projection_changes"]
