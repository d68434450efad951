"""The ``prediction`` block of ``results.json``: LOPO prediction of the pair outcome.

Binary task: Worse (positive, 1) against Improved (0), or the two classes of
a clinical target (``--target``, :mod:`covreport.stats.target`), from one
CXR's pooled DenseNet features, by leave-one-patient-out cross-validation
(:mod:`covreport.stats.lopo`) with a permutation test of the accuracy
(:mod:`covreport.stats.permutation`), for the primary ``penalised`` protocol
(:mod:`covreport.stats.penalised`), the ``nested`` and ``global`` protocols
(the replication of the original study) and the reversed-order control; each
protocol's performance gets an interval from a patient-level bootstrap that
refits the whole protocol (:func:`cv_bootstrap`).

References
----------
.. [1] Duchesne S, Gourdeau D, et al. Tracking and predicting COVID-19
   radiological trajectory using deep learning on chest X-rays: initial
   accuracy testing. medRxiv 2020.05.01.20086207.
"""

import math

import numpy as np
import pandas as pd
from scipy import special

from covreport.constants import IMPROVED, OUTCOMES, WORSE
from covreport.errors import StatsError
from covreport.stats._logistic import _newton_batch  # noqa: F401  (re-exported)
from covreport.stats._util import canonical_order, check_alpha, kish_design_effect, to_python
from covreport.stats.lopo import (  # noqa: F401  (re-exported)
    PRIMARY_PROTOCOL, PROTOCOLS, SELECTION_ALPHA, SOLVERS, THRESHOLD, _check_protocol, _feature_matrix, _Lopo,
    lopo_predict, protocol_role,
)
from covreport.stats.penalised import FALLBACK_C, INNER_FOLDS, PENALISED_REFERENCE, PENALTY_GRID
from covreport.stats.permutation import (  # noqa: F401  (re-exported)
    PERMUTATION_METHOD, check_threshold, monte_carlo_error, permutation_p, permuted_outcomes,
)

_ENGINES = {
    "newton": "a vectorised damped Newton solver (batched over folds) to its unique optimum",
    "chord": "vectorised chord iterations from the all-pairs fit, refitted by Newton where they "
             "do not converge, to its unique optimum",
    "sklearn": "scikit-learn's lbfgs fold by fold",
    "newton-reduced": "batched damped Newton on the n-dimensional row space of the standardised training "
                      "features (exact for L2 with n pairs < p features)",
    "newton-shared": "Newton steps solved by conjugate gradients preconditioned by Woodbury's identity, "
                     "from exact damped Newton fits of the six shared training sets (every outer and inner "
                     "training set is one of them less at most one patient), to each fit's unique optimum",
    "none": "no solver (every training fold held one class)",
}


def _penalised_method(features_from, engine, classes=(WORSE, IMPROVED)):
    fitted = _ENGINES.get(engine, engine)
    checked = "" if engine == "sklearn" else " (checked against scikit-learn in the tests)"
    if features_from != "first":   # the main protocol's method (prediction.penalised.method), not repeated
        return (f"Reversed-order control: the main protocol (the same standardisation, penalty tuning and "
                f"leave-one-patient-out cross-validation, fitted by {fitted}) on the {features_from} CXR's pooled "
                f"DenseNet features, {classes[0]} (positive) vs {classes[1]} ({PENALISED_REFERENCE}).")
    return (
        "Main protocol"
        f", leave-one-patient-out cross-validation on the {features_from} CXR's pooled DenseNet "
        f"features, {classes[0]} (positive) vs {classes[1]}: inside each training fold only, every feature "
        "standardised with the fold's mean and SD (features constant in the fold dropped), then an L2-penalised logistic "
        "regression (intercept unpenalised, all features, no univariate pre-selection: invariant to the "
        f"features' units) whose penalty C was chosen from {len(PENALTY_GRID)} values log-spaced "
        f"{PENALTY_GRID[0]:g} to {PENALTY_GRID[-1]:g} by an inner patient-grouped {INNER_FOLDS}-fold "
        f"cross-validation (one GroupKFold partition of all patients, fixed before the outer loop, each "
        f"training fold using its part of it; leave-one-patient-out below {2 * INNER_FOLDS} patients; "
        "standardisation redone in each inner training fold) minimising the summed held-out log loss "
        f"(deviance), C = {FALLBACK_C:g} where no inner fold holds both classes; fitted by {fitted}{checked}; "
        f"a pair is predicted {classes[0]} when its out-of-fold probability is >= the classification threshold "
        "(the block's threshold record); a training fold holding one "
        f"class predicts that class ({PENALISED_REFERENCE})."
    )


def _pipeline_method(protocol, features_from, alpha, engine, classes=(WORSE, IMPROVED)):
    if protocol == PRIMARY_PROTOCOL:
        return _penalised_method(features_from, engine, classes)
    where = ("inside each fold, on the training pairs only" if protocol == "nested" else
             "once on all pairs before the cross-validation (optimistic: the held-out pairs "
             "take part in the selection)")
    fitted = _ENGINES.get(engine, engine)
    checked = "" if engine == "sklearn" else " (checked against scikit-learn in the tests)"
    return (
        f"Leave-one-patient-out cross-validation on the {features_from} CXR's pooled DenseNet "
        f"features, {classes[0]} (positive) vs {classes[1]}: chi-square feature selection (scikit-learn chi2, "
        f"keep p < {alpha:g}, else the single feature with the lowest p) {where}; then "
        "LogisticRegression() with scikit-learn's defaults (L2 penalty, C = 1, intercept "
        f"unpenalised), fitted by {fitted}{checked}; replication of the original study's recipe "
        f"(Duchesne et al. 2020); a pair is predicted {classes[0]} when its "
        "out-of-fold probability is >= the classification threshold (the block's threshold record); all "
        "pairs of the held-out patient are left out of "
        "selection and fitting; a training fold holding one class predicts that class; pairs "
        "counted as independent."
    )


BALANCED_METHOD = "balanced accuracy = (sensitivity + specificity) / 2 (Brodersen et al. 2010)"


def _metrics_block(confusion, alpha, predictive_ci="exact"):
    from covreport.stats.diagnostic import diagnostic_metrics

    table = diagnostic_metrics(confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"],
                               alpha=alpha, predictive_ci=predictive_ci)
    out = {}
    for row in table.to_dict("records"):
        rec = {key: to_python(row.get(key)) for key in ("estimate", "ci_low", "ci_high", "method", "note")}
        if rec["note"] == "":
            rec["note"] = None
        rec["unit"] = "pair"
        out[row["measure"]] = rec
    se, sp = out["sensitivity"]["estimate"], out["specificity"]["estimate"]
    bal = {"estimate": None, "ci_low": None, "ci_high": None, "method": BALANCED_METHOD,
           "note": "no pair-level interval; the patient-level cluster bootstrap gives one", "unit": "pair"}
    if se is None or sp is None:
        bal["note"] = "not estimable: sensitivity or specificity is undefined"
    else:
        bal["estimate"] = (se + sp) / 2
    out["balanced_accuracy"] = bal
    return out


def _auc_block(y, prob, alpha):
    from covreport.stats.auc import delong_auc

    try:
        res = delong_auc(y.astype(int), prob, alpha=alpha)
    except StatsError as exc:
        return {"auc": None, "se": None, "ci_low": None, "ci_high": None, "n_pos": None, "n_neg": None,
                "unit": "pair", "method": None, "note": f"AUC not estimable: {exc}"}
    rec = {key: to_python(res.get(key)) for key in ("auc", "se", "ci_low", "ci_high", "method", "note")}
    rec["n_pos"] = to_python(res.get("n_pos"))
    rec["n_neg"] = to_python(res.get("n_neg"))
    rec["unit"] = "pair"
    if rec["note"] == "":
        rec["note"] = None
    return rec


def _auc_clustered_block(y, prob, patients, alpha):
    from covreport.stats.clustered import OBUCHOWSKI_METHOD, obuchowski_auc

    keys = ("auc", "se", "ci_low", "ci_high", "clusters")
    try:
        res = obuchowski_auc(y.astype(int), prob, patients, alpha=alpha)
    except StatsError as exc:
        return {**{k: None for k in keys}, "unit": "patient", "method": OBUCHOWSKI_METHOD,
                "note": f"AUC not estimable: {exc}"}
    rec = {k: to_python(res[k]) for k in keys}
    rec.update(unit="patient", method=res["method"], note=res["note"])
    return rec


def _features_block(per_fold):
    per_fold = [int(k) for k in per_fold]
    if not per_fold:
        return {"median": None, "min": None, "max": None, "per_fold": [],
                "note": "no fold fitted a model (every training fold held one class)"}
    return {"median": float(np.median(per_fold)), "min": min(per_fold), "max": max(per_fold),
            "per_fold": per_fold, "note": None}


def _as_frame_rows(X, keep, order):
    if isinstance(X, pd.DataFrame):
        return X.iloc[keep].iloc[order].reset_index(drop=True)
    return np.asarray(X)[keep][order]


#: Resamples of the refitting patient bootstrap of each protocol's performance: min(requested, this).
CV_BOOTSTRAP_MAX = 200

#: Permutations of the primary (penalised) protocol's tests: min(requested, this); each reruns the inner tuning.
PRIMARY_MAX_PERMUTATIONS = 200

#: Measures of the cross-validated performance that get a refitting-bootstrap interval.
CV_MEASURES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "auc")

CV_BOOTSTRAP_METHOD = (
    "patient-level bootstrap refitting the whole protocol (feature selection, standardisation and penalty "
    "tuning included): {n:,} resamples of the patients with replacement (numpy SeedSequence(seed).spawn, one "
    "stream per resample), the copies of a patient kept in one leave-one-patient-out fold, the cross-validated "
    "measure recomputed in each resample, their SD the standard error of the estimate (Davison & Hinkley 1997, "
    "section 3.8 and 6.4; Efron & Tibshirani 1997, J Am Stat Assoc 92:548-560); it accounts for the patient "
    "clustering and for the variability of the cross-validation. {level:g}% interval, never clipped: for "
    "accuracy, sensitivity, specificity, PPV and NPV, Clopper-Pearson on the effective sample size "
    "n_eff = p(1 - p)/SE^2, at most the pairs in the denominator (design effect at least 1; Korn & Graubard "
    "1998), so never narrower than the exact interval on pairs; for balanced accuracy and AUC, "
    "expit(logit(estimate) +/- z SE/(estimate(1 - estimate))), the SE of balanced accuracy at least the "
    "binomial SE of the mean of sensitivity and specificity (design effect at least 1); where the estimate "
    "is 0 or 1, the wider of the percentile interval of the resamples and the exact Clopper-Pearson interval "
    "of N of N pairs (N the pairs in the denominator; for balanced accuracy and AUC the smaller class), so "
    "again never narrower than the exact interval on pairs (centred intervals use the estimate, not the "
    "resamples' percentiles: resamples hold about 63% distinct patients, so their cross-validated measures are "
    "biased low)"
)

DEGENERATE_METHOD = (
    "Clopper-Pearson interval on the effective sample size n / design effect, with the design effect at its "
    "largest (intra-patient correlation 1: sum of squared pairs per patient / pairs; Kish 1965), because the "
    "bootstrap interval has zero width (its 2.5th and 97.5th percentiles are both {value:g}): resamples without "
    "spread there carry no information on the correlation, and a zero-width interval is never right for a "
    "finite sample"
)


def _measures(y, prob, threshold=THRESHOLD):
    """The CV_MEASURES of one set of out-of-fold probabilities (NaN where undefined)."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    hit = np.asarray(prob) >= threshold
    tp, fp = float((hit & y).sum()), float((hit & ~y).sum())
    fn, tn = float((~hit & y).sum()), float((~hit & ~y).sum())

    def ratio(a, b):
        return a / b if b else math.nan

    se, sp = ratio(tp, tp + fn), ratio(tn, tn + fp)
    n1, n0 = int(y.sum()), int((~y).sum())
    auc = math.nan
    if n1 and n0:
        ranks = rankdata(prob)
        auc = (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return {"accuracy": ratio(tp + tn, len(y)), "sensitivity": se, "specificity": sp, "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "balanced_accuracy": (se + sp) / 2, "auc": auc}


def _denominator_rows(measure, y, hit):
    """Pairs in the denominator of a measure (AUC: the smaller class)."""
    y, hit = np.asarray(y, dtype=bool), np.asarray(hit, dtype=bool)
    rows = {"accuracy": np.ones(len(y), bool), "sensitivity": y, "specificity": ~y, "ppv": hit, "npv": ~hit}
    if measure in rows:
        return rows[measure]
    return y if y.sum() <= (~y).sum() else ~y                  # balanced accuracy, AUC


def _degenerate_interval(measure, value, y, hit, groups, alpha):
    """Clopper-Pearson on n / deff (deff at intra-patient correlation 1) for a zero-spread resample set."""
    from scipy.stats import beta

    rows = _denominator_rows(measure, y, hit)
    deff, n = kish_design_effect(np.asarray(groups, dtype=object)[rows])
    if deff is None:
        return None, None, None
    n_eff = n / deff
    x = value * n_eff
    lo = 0.0 if x <= 0 else float(beta.ppf(alpha / 2, x, n_eff - x + 1))
    hi = 1.0 if x >= n_eff else float(beta.ppf(1 - alpha / 2, x + 1, n_eff - x))
    return lo, hi, {"design_effect": deff, "effective_n": n_eff}


def cv_bootstrap(X, y, groups, *, protocol, n_resamples=CV_BOOTSTRAP_MAX, seed=0, alpha=0.05, solver="fast",
                 estimates=None, desc=None, threshold=THRESHOLD, jobs=None):
    """Interval of each cross-validated measure from a patient bootstrap that refits the whole protocol.

    Parameters
    ----------
    X, y, groups, protocol, solver
        As in :func:`lopo_predict` (y: 1 = Worse).
    n_resamples : int
        Bootstrap resamples B (>= 1).
    seed : int
        Seed of ``numpy.random.SeedSequence``; resample b draws from its
        b-th spawned child, so no result depends on how the work is split.
    alpha : float
        1 - level of the percentile intervals.
    estimates : dict, optional
        The point estimates of the full-data run ({measure: value}); computed
        when not given.
    jobs : int, optional
        Workers (:func:`covreport.parallel.run_chunks`; default the active
        engine's). The result is the same for any number.

    Returns
    -------
    dict
        ``{measure: {"estimate", "ci_low", "ci_high", "resamples", "not_estimable", "method", "unit":
        "patient", "note", "degenerate"}}``.

    Notes
    -----
    Each resample draws the G patients with replacement, with all their
    pairs; the copies of a drawn patient form one patient of the resample,
    so they are left out together and never train the model that predicts
    them. The protocol is rerun from scratch (selection and tuning
    included) and its out-of-fold measures recomputed. Where the bootstrap
    interval has zero width (e.g. sensitivity 1.0 in nearly every resample),
    the interval is Clopper-Pearson on the effective sample size
    (:data:`DEGENERATE_METHOD`).
    """
    from covreport import parallel

    plan = cv_bootstrap_plan(X, y, groups, protocol=protocol, n_resamples=n_resamples, seed=seed, alpha=alpha,
                             solver=solver, estimates=estimates, threshold=threshold, jobs=jobs)
    return parallel.run_plans([plan], desc=desc or f"Refitting bootstrap ({protocol})", unit="resample",
                              jobs=jobs)[0]


def cv_bootstrap_plan(X, y, groups, *, protocol, n_resamples=CV_BOOTSTRAP_MAX, seed=0, alpha=0.05, solver="fast",
                      estimates=None, threshold=THRESHOLD, jobs=None):
    """:func:`cv_bootstrap` as a :class:`covreport.parallel.Plan` (chunks of resamples, then the intervals)."""
    from covreport import parallel
    from covreport.stats.lopo import _prepare

    protocol = _check_protocol(protocol)
    alpha = check_alpha(alpha)
    B = int(n_resamples)
    if B < 1:
        raise StatsError(f"the refitting bootstrap needs at least 1 resample, got {n_resamples}")
    values, _names, yf, codes, patients = _prepare(X, y, groups)
    if estimates is None:
        estimates = _measures(yf, lopo_predict(values, yf, codes, protocol=protocol, solver=solver,
                                               final_model=False)["probabilities"], threshold)
    bounds = parallel.chunk_bounds(B, jobs)
    chunks = [(values, yf, codes, len(patients), protocol, solver, threshold, seed, B, a, b) for a, b in bounds]

    def finish(parts):
        return _cv_intervals(np.concatenate(parts), values, yf, codes, protocol, alpha, solver, estimates, threshold)

    return parallel.Plan(bootstrap_draws, chunks, [b - a for a, b in bounds], finish)


def bootstrap_draws(values, yf, codes, G, protocol, solver, threshold, seed, B, start, stop):
    """The CV_MEASURES of resamples ``start`` to ``stop - 1`` of B (one chunk; NaN rows where not estimable).

    Resample b draws from the b-th child of ``SeedSequence(seed).spawn(B)``,
    so it is the same whichever chunk computes it.
    """
    from covreport.stats._logistic import _blas_limits
    from covreport.stats.lopo import _reference_run

    rows_of = [np.flatnonzero(codes == g) for g in range(G)]
    draws = np.full((stop - start, len(CV_MEASURES)), np.nan)
    children = np.random.SeedSequence(seed).spawn(B)[start:stop]
    with _blas_limits():
        for i, child in enumerate(children):
            pick = np.sort(np.random.default_rng(child).integers(0, G, size=G))
            uniq, new_code = np.unique(pick, return_inverse=True)
            if len(uniq) < 2:
                continue
            rows = np.concatenate([rows_of[g] for g in pick])
            rcodes = np.concatenate([np.full(len(rows_of[g]), c) for g, c in zip(pick, new_code)])
            yb = yf[rows]
            if yb.min() == yb.max():
                continue
            if solver == "sklearn":
                prob = _reference_run(values[rows], yb, rcodes, len(uniq), protocol, SELECTION_ALPHA).prob
            else:
                prob = _Lopo(values[rows], rcodes, len(uniq)).run(yb, protocol, SELECTION_ALPHA, solver).prob
            m = _measures(yb, prob, threshold)
            draws[i] = [m[k] for k in CV_MEASURES]
    return draws


#: The measures that are proportions of pairs (Clopper-Pearson on the effective sample size).
PROPORTIONS = ("accuracy", "sensitivity", "specificity", "ppv", "npv")


def _denominator(measure, estimates, y):
    """Pairs in the denominator of a proportion, from the outcomes and the full-data estimates (None otherwise)."""
    n_pos = float(np.sum(y))
    n_neg = float(len(y)) - n_pos
    se, sp = estimates.get("sensitivity"), estimates.get("specificity")
    known = se is not None and sp is not None and np.isfinite(se) and np.isfinite(sp)
    positive = round(se * n_pos + (1.0 - sp) * n_neg) if known else None
    return {"accuracy": float(len(y)), "sensitivity": n_pos, "specificity": n_neg,
            "ppv": positive, "npv": None if positive is None else len(y) - positive}.get(measure)


def _balanced_se(estimates, y):
    """SE of (sensitivity + specificity) / 2 with the pairs independent: the floor of its bootstrap SE."""
    se_, sp = estimates.get("sensitivity"), estimates.get("specificity")
    n_pos = float(np.sum(y))
    n_neg = float(len(y)) - n_pos
    if se_ is None or sp is None or not (np.isfinite(se_) and np.isfinite(sp)) or not (n_pos and n_neg):
        return None
    return 0.5 * math.sqrt(se_ * (1 - se_) / n_pos + sp * (1 - sp) / n_neg)


def _cv_interval(measure, est, se, percentile, n, alpha, floor_se=None, n_exact=None):
    """(low, high, extra record keys) of one measure's refitting-bootstrap interval (CV_BOOTSTRAP_METHOD).

    ``n`` is the pairs in a proportion's denominator; ``n_exact`` the N of the exact N-of-N interval
    an estimate of 0 or 1 is never narrower than (``n`` for a proportion, the smaller class otherwise).

    Korn EL, Graubard BI. Confidence intervals for proportions with small expected number of positive
    counts estimated from survey data. Survey Methodology 1998;24:193-201.
    """
    from scipy.stats import beta

    from covreport.stats.effect_sizes import logit_interval

    if se <= 0:
        return est, est, {}
    if not 0.0 < est < 1.0:
        low, high = percentile
        if high - low <= 1e-12 or not n_exact:  # (a zero-width one goes to _degenerate_interval)
            return low, high, {"interval": "bootstrap percentile (estimate at 0 or 1)"}
        from covreport.stats.effect_sizes import separation_interval

        exact = separation_interval(est, n_exact, alpha)
        return (float(min(low, exact[0])), float(max(high, exact[1])),
                {"interval": "the wider of the bootstrap percentile interval and the exact interval of N of N "
                             "pairs (estimate at 0 or 1)"})
    if measure in PROPORTIONS and n:
        n_eff = min(float(n), est * (1.0 - est) / se ** 2)
        x = est * n_eff
        return (float(beta.ppf(alpha / 2, x, n_eff - x + 1)), float(beta.ppf(1 - alpha / 2, x + 1, n_eff - x)),
                {"interval": "Clopper-Pearson on the effective sample size", "effective_n": n_eff,
                 "design_effect": float(n) / n_eff})
    extra = {"interval": "logit-transformed"}
    if measure == "balanced_accuracy" and floor_se and floor_se > se:
        se = floor_se
        extra["interval"] = "logit-transformed, with the binomial SE of the two proportions (design effect 1)"
    return (*logit_interval(est, se, math.inf, alpha), extra)


def _cv_intervals(draws, values, yf, codes, protocol, alpha, solver, estimates, threshold):
    """The records of :func:`cv_bootstrap` from its resamples' measures."""
    B = len(draws)
    level = round(100 * (1 - alpha), 6)
    method = CV_BOOTSTRAP_METHOD.format(n=B, level=level)
    hit = None
    out = {}
    for j, key in enumerate(CV_MEASURES):
        d = draws[:, j]
        ok = np.isfinite(d)
        est = estimates.get(key)
        est = None if est is None or not np.isfinite(est) else float(est)
        rec = {"estimate": est, "ci_low": None, "ci_high": None, "resamples": B, "not_estimable": int((~ok).sum()),
               "method": method, "unit": "patient", "note": None, "degenerate": False}
        if ok.sum() == 0:
            rec["note"] = "not estimable: undefined in every resample"
        elif est is None:
            rec["note"] = "not estimable on all pairs"
        else:
            sd = float(np.std(d[ok], ddof=1)) if ok.sum() > 1 else 0.0
            pct = [float(v) for v in np.percentile(d[ok], [100 * alpha / 2, 100 * (1 - alpha / 2)])]
            n = _denominator(key, estimates, yf)
            lo, hi, extra = _cv_interval(key, est, sd, pct, n, alpha,
                                         _balanced_se(estimates, yf) if key == "balanced_accuracy" else None,
                                         n_exact=n if key in PROPORTIONS else min(yf.sum(), len(yf) - yf.sum()))
            rec.update(ci_low=lo, ci_high=hi, bootstrap_se=sd, bootstrap_percentile=pct, **extra)
            if hi - lo <= 1e-12:
                if hit is None:
                    hit = lopo_predict(values, yf, codes, protocol=protocol, solver=solver,
                                       final_model=False)["probabilities"] >= threshold
                clo, chi, info = _degenerate_interval(key, est, yf, hit, codes, alpha)
                if clo is not None:
                    rec.update(ci_low=clo, ci_high=chi, degenerate=True, **info,
                               method=DEGENERATE_METHOD.format(value=pct[0]),
                               note=f"the bootstrap interval has zero width (percentiles both {pct[0]:g}); "
                                    "Clopper-Pearson on the effective sample size")
        out[key] = rec
    return out


def predict_outcome(first, second, outcome, groups, pair_ids, *, order_keys=None, headline=PRIMARY_PROTOCOL,
                    n_permutations=1000, seed=0, alpha=0.05, solver="fast", predictive_ci="exact",
                    n_jobs=None, n_bootstrap=0, threshold=THRESHOLD, calibration_resamples=None, classes=None):
    """The ``prediction`` block of ``results.json`` (docs/RESULTS.md).

    Parameters
    ----------
    first, second : pandas.DataFrame or ndarray (n_pairs, n_features)
        Pooled features of each pair's first and second CXR (rows aligned
        with ``outcome``).
    outcome : array_like of str
        ``Worse``, ``Stable`` or ``Improved`` per pair; Stable pairs are left
        out (binary task Worse vs Improved). With ``classes``, the class of
        each pair's target instead; a pair whose value is neither class (None
        where the target was not recorded) is left out.
    groups : array_like
        Patient id per pair.
    pair_ids : array_like
        Pair id per pair.
    order_keys : pandas.DataFrame, optional
        Columns that order the pairs canonically by content, one row per pair
        (the pipeline gives the first date or offset, the first and the second
        image); pairs are ordered by patient, then these columns, then pair
        id. Without it, by patient then pair id. Every random stream and fold
        order sees the pairs in this order, and the ``pairs`` lists follow
        it, so that the results do not depend on row order (nor, with
        content keys, on how pair ids are spelled).
    headline : {"penalised", "nested", "global"}
        Headline protocol: the protocol of the reversed-order control.
    n_permutations : int
        Permutations of each protocol's permutation test (0 skips them);
        the penalised protocol's tests run min(n_permutations,
        :data:`PRIMARY_MAX_PERMUTATIONS`) (each reruns the inner tuning).
    threshold : float
        Classification threshold: a pair is predicted positive (Worse) when its
        out-of-fold probability is >= threshold (0.5, prespecified, by
        default); used by the metrics, the permutation tests and the
        refitting bootstrap, and recorded in each block's ``threshold``.
    n_bootstrap : int
        Requested resamples of the refitting patient bootstrap of each
        first-CXR protocol's measures (:func:`cv_bootstrap`); min(n_bootstrap,
        :data:`CV_BOOTSTRAP_MAX`) run; 0 skips it.
    classes : (str, str), optional
        The positive and the negative class of a target other than the
        radiological outcome (``--target``; :func:`covreport.stats.target.target_classes`);
        default (Worse, Improved). They name the classes in every record and
        method text.
    calibration_resamples : int, optional
        Patient-bootstrap resamples of each calibration curve's band and of
        the intervals of its measures (:func:`covreport.stats.calibration.calibration`;
        default :data:`~covreport.stats.calibration.CURVE_RESAMPLES`); 0 gives none.
    seed : int
        Seed of the permutations.
    alpha : float
        1 - confidence level of the metrics' and the AUCs' intervals (the
        feature selection keeps p < 0.05 whatever alpha is).
    solver : str
        As in :func:`lopo_predict`.
    predictive_ci : {"exact", "logit"}
        PPV/NPV interval (:func:`covreport.stats.diagnostic_metrics`).
    n_jobs : int, optional
        Workers for the permutation tests and the refitting bootstrap, whose
        chunks run together (:mod:`covreport.parallel`); default the active
        engine's (:func:`covreport.parallel.engine`), else the cores
        available; 1 runs everything in this process. The results are the
        same for any number of workers and any backend.

    Returns
    -------
    dict
        ``headline``, ``primary``, ``positive_class``, ``negative_class`` and
        one block for each of ``penalised``, ``nested``, ``global`` (first
        CXR) and ``reversed`` (second CXR, headline protocol), with the keys
        of docs/RESULTS.md; each block has ``role`` (primary, replication or
        control), ``label``, ``reference``, ``informative`` (False with the
        reason in ``not_informative`` where the AUC is not evidence) and
        ``cv_intervals`` (:func:`cv_bootstrap`, or None).
    """
    from covreport.stats.calibration import CURVE_RESAMPLES, calibration

    headline = _check_protocol(headline)
    alpha = check_alpha(alpha)
    threshold = check_threshold(threshold)
    outcome = np.asarray(outcome, dtype=object)
    n = len(outcome)
    for name, arr in (("groups", groups), ("pair_ids", pair_ids)):
        if len(arr) != n:
            raise StatsError(f"{name} has {len(arr)} values but there are {n} outcomes; they must be aligned")
    if order_keys is not None and len(order_keys) != n:
        raise StatsError(f"order_keys has {len(order_keys)} rows but there are {n} pairs; they must be aligned")
    unknown = [] if classes is not None else [i for i, o in enumerate(outcome) if o not in OUTCOMES]
    classes = (WORSE, IMPROVED) if classes is None else (str(classes[0]), str(classes[1]))
    if unknown:
        i = unknown[0]
        raise StatsError(f"pair {pair_ids[i]!r} has outcome {outcome[i]!r}; outcomes must be one of "
                         f"{OUTCOMES} (exclude pairs without a reference standard first)")
    feats = {}
    for which, X in (("first", first), ("second", second)):
        if len(X) != n:
            raise StatsError(f"the {which} CXR's features have {len(X)} rows but there are {n} pairs")
        feats[which] = X
    keep = np.flatnonzero(np.isin(outcome, classes))
    keys = pd.DataFrame({"patient": np.asarray(groups, dtype=object)[keep]})
    if order_keys is not None:
        extra = pd.DataFrame(order_keys).iloc[keep].reset_index(drop=True)
        for j, col in enumerate(extra.columns):
            keys[f"k{j}"] = extra[col].to_numpy()
    keys["pair"] = np.asarray(pair_ids, dtype=object)[keep]
    order = canonical_order(keys)
    # everything below is in canonical order
    groups_k = np.asarray(groups, dtype=object)[keep][order]
    pairs_k = np.asarray(pair_ids, dtype=object)[keep][order]
    y = (outcome[keep][order] == classes[0]).astype(np.int64)
    n_patients = len(set(groups_k.tolist()))

    out = {"headline": headline, "primary": PRIMARY_PROTOCOL, "positive_class": classes[0],
           "negative_class": classes[1]}
    specs = (("penalised", "penalised", "first"), ("nested", "nested", "first"), ("global", "global", "first"),
             ("reversed", headline, "second"))
    fits, tasks = {}, {}
    for key, protocol, source in specs:
        X = _as_frame_rows(feats[source], keep, order)
        if n_patients < 2:
            if len(y):
                _feature_matrix(X)                      # still report bad features
            out[key] = _empty_block(protocol, source, len(y), n_patients, pairs_k, groups_k, y, classes)
            out[key].update(_role(key, protocol), cv_intervals=None, informative=False,
                            not_informative=out[key]["note"], informative_method=NOT_INFORMATIVE_METHOD)
            if key == "reversed":
                _describe_reversed(out[key], y, classes)
            continue
        fits[key] = lopo_predict(X, y, groups_k, protocol=protocol, solver=solver)
        out[key] = None                                  # keeps the key order
        if n_permutations and not (key == "reversed" and _not_informative(fits[key], y, threshold)):
            tasks[key] = (X, y, groups_k, protocol)
    n_boot = min(int(n_bootstrap), CV_BOOTSTRAP_MAX) if n_bootstrap else 0
    perms, boots = _resampling(tasks, fits, feats, keep, order, y, groups_k, n_permutations=n_permutations,
                               n_bootstrap=n_boot, seed=seed, alpha=alpha, solver=solver, threshold=threshold,
                               predictive_ci=predictive_ci, jobs=n_jobs)
    for key, protocol, source in specs:
        if key not in fits:
            continue
        res = _at_threshold(fits[key], y, threshold)
        prob, pred = res["probabilities"], res["predicted"]
        fold, one_class_row = _fold_of_pairs(y, groups_k)
        n_folds = res["n_folds"]
        selected = sorted(res["selected_features"].items(), key=lambda kv: (-kv[1], kv[0]))
        if key in perms:
            p_perm, n_perm = perms[key]["p"], perms[key]["n_permutations"]
        else:
            p_perm, n_perm = None, 0
        fitted = [k for k, one in zip(res["features_per_fold"], _one_class_folds(y, groups_k)) if not one]
        block = {
            "protocol": protocol,
            "features_from": source,
            "n_pairs": int(len(y)),
            "n_patients": int(n_folds),
            "unit": "pair",
            "confusion": res["confusion"],
            "metrics": _metrics_block(res["confusion"], alpha, predictive_ci),
            "auc": _auc_block(y, prob, alpha),
            "auc_clustered": _auc_clustered_block(y, prob, groups_k, alpha),
            "calibration": calibration(y, prob, alpha=alpha, groups=groups_k, folds=fold, one_class=one_class_row,
                                       predicted=pred, seed=seed,
                                       n_resamples=CURVE_RESAMPLES if calibration_resamples is None
                                       else int(calibration_resamples)),
            "threshold": threshold_record(threshold, classes[0]),
            "selected_features": [{"feature": f, "folds_selected": c, "fraction": c / n_folds}
                                  for f, c in selected],
            "features_selected": _features_block(fitted),
            "one_class_folds": res["one_class_folds"],
            "permutation_p": p_perm,
            "permutations": n_perm,
            "permutation_method": PERMUTATION_METHOD.format(n=n_perm) if n_perm else None,
            "permutation_monte_carlo": (monte_carlo_error(perms[key]["n_at_least_observed"], n_perm)
                                        if n_perm else None),
            "pairs": [{"pair_id": to_python(pid), "patient_id": to_python(pat),
                       "outcome": classes[1 - yy], "probability": float(pr),
                       "predicted": classes[1 - hit], "fold": int(f), "one_class_fold": bool(one)}
                      for pid, pat, yy, pr, hit, f, one in zip(pairs_k, groups_k, y, prob, pred, fold,
                                                               one_class_row)],
            "solver": res["engine"],
            "method": _pipeline_method(protocol, source, SELECTION_ALPHA, res["engine"], classes),
            "note": None,
        }
        block.update(_role(key, protocol))
        if n_permutations and key == "reversed" and key not in perms:
            block["permutation_note"] = ("no permutation test: the reversed-order control is not informative "
                                         "(one predicted class, or an AUC below chance), so whether it beats the "
                                         "outcome labels alone is not a question")
        elif n_perm < n_permutations and protocol == PRIMARY_PROTOCOL:
            block["permutations_requested"] = int(n_permutations)
            block["permutation_note"] = (f"{n_perm:,} of the {n_permutations:,} permutations requested: each "
                                         "permutation reruns the inner tuning of the penalty "
                                         f"(at most {PRIMARY_MAX_PERMUTATIONS} for the main protocol)")
        if protocol == PRIMARY_PROTOCOL:
            block.update(_penalised_details(res, y, fitted, groups_k, classes[0]))
        block["cv_intervals"] = boots.get(key)
        if key in boots:
            block["cv_bootstrap_requested"] = int(n_bootstrap)
        _informative(block, pred, classes)
        if key == "reversed":
            _describe_reversed(block, y, classes)
        out[key] = block
    return out


def _resampling(tasks, fits, feats, keep, order, y, groups, *, n_permutations, n_bootstrap, seed, alpha, solver,
                threshold, predictive_ci, jobs):
    """The permutation tests of ``tasks`` and the refitting bootstraps of the first-CXR protocols, run together.

    Their chunks share one pool of workers (:func:`covreport.parallel.run_plans`),
    the costliest (penalised, then nested) first; returns ``({key: permutation
    result}, {key: cv_bootstrap record})``.
    """
    from covreport import parallel
    from covreport.stats.permutation import permutation_plan

    cost = {"penalised": 0, "nested": 1}
    plans, names = [], []
    for key, (X, yy, gg, protocol) in sorted(tasks.items(), key=lambda kv: cost.get(kv[1][3], 2)):
        n_perm = min(n_permutations, PRIMARY_MAX_PERMUTATIONS) if protocol == PRIMARY_PROTOCOL else n_permutations
        plans.append(permutation_plan(X, yy, gg, protocol=protocol, n_permutations=n_perm, seed=seed, solver=solver,
                                      threshold=threshold, jobs=jobs, observed=fits[key]["probabilities"]))
        names.append(("perm", key))
    if n_bootstrap:
        for key in sorted((k for k in fits if k != "reversed"), key=lambda k: cost.get(fits[k]["protocol"], 2)):
            res = _at_threshold(fits[key], y, threshold)
            metrics = _metrics_block(res["confusion"], alpha, predictive_ci)
            est = {k: (metrics.get(k) or {}).get("estimate") for k in CV_MEASURES if k != "auc"}
            est["auc"] = _auc_block(y, res["probabilities"], alpha).get("auc")
            est = {k: (math.nan if v is None else v) for k, v in est.items()}
            X = _as_frame_rows(feats["first"], keep, order)
            plans.append(cv_bootstrap_plan(X, y, groups, protocol=fits[key]["protocol"], n_resamples=n_bootstrap,
                                           seed=seed, alpha=alpha, solver=solver, estimates=est, threshold=threshold,
                                           jobs=jobs))
            names.append(("boot", key))
    if not plans:
        return {}, {}
    done = parallel.run_plans(plans, desc="Permutations and refitting bootstrap", unit="fit", jobs=jobs)
    out = {"perm": {}, "boot": {}}
    for (kind, key), result in zip(names, done):
        out[kind][key] = result
    return out["perm"], out["boot"]


#: How each block is labelled in results.json and the report.
_LABELS = {"penalised": "main: standardised L2-penalised logistic regression, penalty tuned by nested "
                        "patient-grouped cross-validation",
           "nested": "replication of the original study: chi-square selection inside each fold",
           "global": "replication of the original study: chi-square selection once on all pairs (optimistic)",
           "reversed": "reversed-order control (second CXR), descriptive"}


def _role(key, protocol):
    role = "control" if key == "reversed" else protocol_role(protocol)
    reference = (PENALISED_REFERENCE if protocol == PRIMARY_PROTOCOL else
                 "Duchesne S, Gourdeau D, et al. medRxiv 2020.05.01.20086207 (the recipe replicated)")
    why = {"primary": "invariant to the features' units, tuned inside the training folds only, no univariate "
                      "pre-selection (TRIPOD+AI)",
           "replication": "the original study's recipe, kept to reproduce its numbers; chi-square selection "
                          "of continuous features depends on their units",
           "control": "the outcome was read on the second CXR: no value is expected; described, not tested"}[role]
    return {"role": role, "label": _LABELS[key], "reference": reference, "role_reason": why}


def _penalised_details(res, y, fitted, groups, positive=WORSE):
    """Per-fold tuning, events per candidate predictor and the final model (TRIPOD+AI 12c, 22)."""
    from covreport.stats.lopo import _group_codes

    _codes, patients = _group_codes(groups, len(y))
    final = res.get("final_model")
    n_feat = len(final["features"]) if final else None
    events = int(min(y.sum(), len(y) - y.sum()))
    candidates = int(final["kept"].sum()) if final else None
    per_fold = [{"patient_id": to_python(pat), "C": c, "nonzero_coefficients": int(k)}
                for pat, c, k in zip(patients, res["penalty_per_fold"], res["nonzero_per_fold"])]
    chosen = [c for c in res["penalty_per_fold"] if c is not None]
    tuning = {
        "grid": list(PENALTY_GRID), "inner_folds": INNER_FOLDS, "criterion": "summed inner held-out log loss "
        "(deviance)", "fallback_C": FALLBACK_C, "per_fold": per_fold,
        "C_median": float(np.median(chosen)) if chosen else None,
        "C_min": min(chosen) if chosen else None, "C_max": max(chosen) if chosen else None,
        "nonzero_median": float(np.median(fitted)) if fitted else None,
        "unit": "fold", "method": "per outer fold: the C chosen by the inner cross-validation and the number of "
                                  "non-zero coefficients of the model refitted at that C",
        "reference": PENALISED_REFERENCE,
    }
    epv = {"events": events, "candidate_predictors": candidates,
           "value": (events / candidates) if candidates else None, "unit": "pair",
           "method": "events per candidate predictor = pairs of the less frequent class / features entering "
                     "the model (non-constant on all pairs); no pre-selection, so every feature is a candidate",
           "reference": "Riley RD et al. BMJ 2020;368:m441 (sample size for prediction models)"}
    model = None
    if final:
        keep = final["kept"]
        sd = np.where(keep, final["sd"], np.nan)
        coef_std = final["coefficients"]
        with np.errstate(divide="ignore", invalid="ignore"):
            coef_raw = np.where(keep, coef_std / sd, 0.0)
        model = {
            "C": final["C"], "intercept": final["intercept"], "n_coefficients": int((coef_std != 0).sum()),
            "n_features": n_feat, "dropped_constant": [f for f, k in zip(final["features"], keep) if not k],
            "intercept_original_units": float(final["intercept"] - np.nansum(coef_raw * final["mean"])),
            "standardisation": "z = (x - mean) / SD over all analysed pairs (SD with ddof 0, as scikit-learn's "
                               "StandardScaler); constant features dropped",
            "inner_deviance": final["inner_deviance"],
            "coefficients": [{"feature": f, "mean": float(m), "sd": (float(v) if k else None),
                              "coefficient": float(c), "coefficient_original_units": float(r)}
                             for f, m, v, k, c, r in zip(final["features"], final["mean"], final["sd"], keep,
                                                         coef_std, coef_raw)],
            "unit": "pair",
            "method": "the main protocol refitted on all analysed pairs: standardisation on all pairs, C tuned "
                      f"by the same inner patient-grouped cross-validation, logit P({positive}) = intercept + "
                      "sum coefficient x z (TRIPOD+AI item 22)",
            "reference": PENALISED_REFERENCE,
        }
    return {"tuning": tuning, "events_per_candidate_predictor": epv, "final_model": model}


NOT_INFORMATIVE_METHOD = (
    "an AUC is reported as a result only where it is informative: not where the protocol predicts one class "
    "for every pair (its ranking then reflects the folds' class balance, not the images) nor where it is "
    "below 0.5; leave-one-patient-out with a majority class moves each training fold's balance against the "
    "held-out patient's outcome, so cross-validated AUCs below chance are an artefact of the resampling, not "
    "evidence (Parker BJ, Gunter S, Bedo J, BMC Bioinformatics 2007;8:326)"
)


def _not_informative(res, y, threshold):
    """Whether a fit will be marked not informative (:func:`_informative`), before any block is built.

    The reversed-order control then gets no permutation test: testing whether a degenerate
    predictor beats the labels alone answers no question (and costs the primary protocol's price).
    """
    prob = np.asarray(res["probabilities"])
    pred = prob >= threshold
    if len(pred) and pred.min() == pred.max():
        return True
    auc = _auc_block(np.asarray(y), prob, 0.05)["auc"]
    return auc is not None and auc < 0.5


def _informative(block, pred, classes=(WORSE, IMPROVED)):
    """Mark a block's AUC "not informative" where it is degenerate (one predicted class, or below 0.5)."""
    pred = np.asarray(pred)
    reasons = []
    if len(pred) and (pred.min() == pred.max()):
        reasons.append(f"the protocol predicts {classes[0] if pred[0] else classes[1]} for every pair")
    auc = (block.get("auc") or {}).get("auc")
    if auc is not None and auc < 0.5:
        reasons.append(f"its AUC ({auc:.3f}) is below chance")
    block["informative"] = not reasons
    block["not_informative"] = ("not informative: " + " and ".join(reasons)) if reasons else None
    block["informative_method"] = NOT_INFORMATIVE_METHOD


THRESHOLD_METHOD = (
    "classification threshold {value:g}: a pair is predicted {positive} when its out-of-fold probability is >= "
    "{value:g}; {source}; the decision curve shows the net benefit at every threshold from 0.05 to 0.95"
)


def threshold_record(threshold, positive=WORSE):
    """The ``threshold`` record of a prediction block: the value, where it comes from, method, unit, reference."""
    t = float(threshold)
    source = ("prespecified (covreport's default, the original study's cut-off; not tuned on these data)"
              if t == THRESHOLD else "prespecified by the user (--threshold); not tuned on these data")
    return {"value": t, "source": "prespecified", "unit": "probability",
            "method": THRESHOLD_METHOD.format(value=t, source=source, positive=positive),
            "reference": "Vickers AJ, Elkin EB. Med Decis Making 2006;26:565-574 (the threshold probability)"}


def _at_threshold(res, y, threshold):
    """``lopo_predict``'s result with ``predicted`` and ``confusion`` at ``threshold``."""
    from covreport.stats.lopo import _confusion

    predicted = (np.asarray(res["probabilities"]) >= threshold).astype(np.int64)
    return dict(res, predicted=predicted, confusion=_confusion(np.asarray(y), predicted))


def _fold_of_pairs(y, groups):
    """Each pair's fold (1-based: its patient's rank in sorted order, as lopo_predict) and whether it trains on one class."""
    from covreport.stats.lopo import _group_codes

    codes, _patients = _group_codes(groups, len(y))
    return codes + 1, _one_class_folds(y, groups)[codes]


def _one_class_folds(y, groups):
    """Whether each fold (patients in sorted order, as lopo_predict) trains on one class."""
    from covreport.stats.lopo import _group_codes

    codes, patients = _group_codes(groups, len(y))
    G = len(patients)
    n1_t = y.sum() - np.bincount(codes, weights=y, minlength=G)
    n_t = len(y) - np.bincount(codes, minlength=G)
    return (n1_t == 0) | (n1_t == n_t)


REVERSED_METHOD = (
    "reversed-order control, descriptive: the same prediction from the second CXR of each pair, on "
    "which the outcome was read; its accuracy is set beside the majority rate (the accuracy of "
    "always predicting the more frequent outcome), with its permutation p when it is informative"
)


def _describe_reversed(block, y, classes=(WORSE, IMPROVED)):
    n = len(y)
    n_worse = int(y.sum())
    block["majority_rate"] = max(n_worse, n - n_worse) / n if n else None
    block["majority_class"] = (classes[0] if n_worse >= n - n_worse else classes[1]) if n else None
    block["control_method"] = REVERSED_METHOD


def _empty_block(protocol, source, n_pairs, n_patients, pair_ids, patients, y, classes=(WORSE, IMPROVED)):
    """A prediction block that could not be computed (fewer than 2 patients), with the reason."""
    from covreport.stats.calibration import calibration

    reason = (f"not computed: leave-one-patient-out needs {classes[0]} or {classes[1]} pairs of at least 2 "
              f"patients, got {n_pairs} pair(s) of {n_patients} patient(s)")
    cal = calibration([], [])
    cal["note"] = reason
    return {
        "protocol": protocol, "features_from": source, "n_pairs": int(n_pairs),
        "n_patients": int(n_patients), "unit": "pair", "confusion": None, "metrics": {},
        "auc": {"auc": None, "se": None, "ci_low": None, "ci_high": None, "n_pos": None, "n_neg": None,
                "unit": "pair", "method": None, "note": reason},
        "auc_clustered": {"auc": None, "se": None, "ci_low": None, "ci_high": None, "clusters": None,
                          "unit": "patient", "method": None, "note": reason},
        "calibration": cal,
        "selected_features": [], "features_selected": {"median": None, "min": None, "max": None,
                                                       "per_fold": [], "note": reason},
        "one_class_folds": 0, "permutation_p": None, "permutations": 0,
        "permutation_method": None,
        "pairs": [{"pair_id": to_python(pid), "patient_id": to_python(pat),
                   "outcome": classes[0] if yy else classes[1], "probability": None, "predicted": None}
                  for pid, pat, yy in zip(pair_ids, patients, y)],
        "solver": None,
        "method": _pipeline_method(protocol, source, SELECTION_ALPHA, "none", classes),
        "note": reason,
    }
