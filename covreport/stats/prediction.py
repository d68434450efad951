"""The ``prediction`` block of ``results.json``: LOPO prediction of the pair outcome.

Binary task: Worse (positive, 1) against Improved (0), from one CXR's pooled
DenseNet features, by leave-one-patient-out cross-validation
(:mod:`covreport.stats.lopo`) with a permutation test of the accuracy
(:mod:`covreport.stats.permutation`), for the ``nested`` and ``global``
protocols and the reversed-order control.

References
----------
.. [1] Duchesne S, Gourdeau D, et al. Tracking and predicting COVID-19
   radiological trajectory using deep learning on chest X-rays: initial
   accuracy testing. medRxiv 2020.05.01.20086207.
"""

import os

import numpy as np
import pandas as pd

from covreport.constants import IMPROVED, OUTCOMES, WORSE
from covreport.errors import StatsError
from covreport.stats._logistic import _newton_batch  # noqa: F401  (re-exported)
from covreport.stats._util import canonical_order, check_alpha, to_python
from covreport.stats.lopo import (  # noqa: F401  (re-exported)
    PROTOCOLS, SELECTION_ALPHA, SOLVERS, THRESHOLD, _check_protocol, _feature_matrix, _Lopo, lopo_predict,
)
from covreport.stats.permutation import (  # noqa: F401  (re-exported)
    PERMUTATION_METHOD, permutation_p, permuted_outcomes,
)

_ENGINES = {
    "newton": "a vectorised damped Newton solver (batched over folds) to its unique optimum",
    "chord": "vectorised chord iterations from the all-pairs fit, refitted by Newton where they "
             "do not converge, to its unique optimum",
    "sklearn": "scikit-learn's lbfgs fold by fold",
    "none": "no solver (every training fold held one class)",
}


def _pipeline_method(protocol, features_from, alpha, engine):
    where = ("inside each fold, on the training pairs only" if protocol == "nested" else
             "once on all pairs before the cross-validation (optimistic: the held-out pairs "
             "take part in the selection)")
    fitted = _ENGINES.get(engine, engine)
    checked = "" if engine == "sklearn" else " (checked against scikit-learn in the tests)"
    return (
        f"Leave-one-patient-out cross-validation on the {features_from} CXR's pooled DenseNet "
        f"features, Worse (positive) vs Improved: chi-square feature selection (scikit-learn chi2, "
        f"keep p < {alpha:g}, else the single feature with the lowest p) {where}; then "
        "LogisticRegression() with scikit-learn's defaults (L2 penalty, C = 1, intercept "
        f"unpenalised), fitted by {fitted}{checked}; a pair is predicted Worse when its "
        "out-of-fold probability is >= 0.5; all pairs of the held-out patient are left out of "
        "selection and fitting; a training fold holding one class predicts that class; pairs "
        "counted as independent."
    )


BALANCED_METHOD = ("balanced accuracy = (sensitivity + specificity) / 2; no pair-level interval "
                   "(see the patient-level cluster bootstrap)")


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


#: From this many permutations on, predict_outcome runs the protocols' permutation tests in
#: parallel processes (when more than one core is available); the results are the same.
PARALLEL_MIN_PERMUTATIONS = 200


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        return os.cpu_count() or 1


def _permutation_tests(tasks, n_permutations, seed, solver, n_jobs):
    """Permutation tests of the protocols in ``tasks`` ({key: (X, y, groups, protocol)}).

    With ``n_jobs`` > 1 (and at least :data:`PARALLEL_MIN_PERMUTATIONS`
    permutations), the first ``n_jobs - 1`` tests run in fresh Python
    processes (``python -c``: they import covreport only, never the caller's
    script) while this process runs the rest; each test is deterministic, so
    the results are the same as in one process. A process that fails is
    replaced by running its test here.
    """
    from covreport import progress
    from covreport.stats.permutation import start_permutation_process

    keys = list(tasks)
    results, running = {}, {}
    if n_jobs > 1 and len(keys) > 1 and n_permutations >= PARALLEL_MIN_PERMUTATIONS:
        for key in keys[:n_jobs - 1][:len(keys) - 1]:
            X, y, groups, protocol = tasks[key]
            try:
                running[key] = start_permutation_process(X, y, groups, protocol=protocol,
                                                         n_permutations=n_permutations, seed=seed, solver=solver)
            except OSError as exc:
                progress.say(f"could not start a process for the {key} permutation test ({exc}); "
                             "running it here")
        if running:
            progress.say(f"Permutation tests of {', '.join(running)} running in {len(running)} other "
                         f"process{'es' if len(running) > 1 else ''}")
    try:
        for key in keys:
            if key not in running:
                X, y, groups, protocol = tasks[key]
                results[key] = permutation_p(X, y, groups, protocol=protocol, n_permutations=n_permutations,
                                             seed=seed, solver=solver, desc=f"Permutations ({key})")
    except BaseException:  # an error, Ctrl-C or SIGTERM here: stop the other processes, remove their files
        for proc in running.values():
            proc.close()
        raise
    for key, proc in running.items():
        try:
            res = proc.result()
        except BaseException:
            for other in running.values():
                other.close()
            raise
        if res is None:
            progress.say(f"the process of the {key} permutation test failed; running it here")
            X, y, groups, protocol = tasks[key]
            res = permutation_p(X, y, groups, protocol=protocol, n_permutations=n_permutations, seed=seed,
                                solver=solver, desc=f"Permutations ({key})")
        results[key] = res
    return {key: results[key] for key in keys}


def predict_outcome(first, second, outcome, groups, pair_ids, *, order_keys=None, headline="nested",
                    n_permutations=1000, seed=0, alpha=0.05, solver="fast", predictive_ci="exact",
                    n_jobs=None):
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
    order_keys : pandas.DataFrame, optional
        Columns that order the pairs canonically by content, one row per pair
        (the pipeline gives the first date or offset, the first and the second
        image); pairs are ordered by patient, then these columns, then pair
        id. Without it, by patient then pair id. Every random stream and fold
        order sees the pairs in this order, and the ``pairs`` lists follow
        it, so that the results do not depend on row order (nor, with
        content keys, on how pair ids are spelled).
    headline : {"nested", "global"}
        Headline protocol: the protocol of the reversed-order control.
    n_permutations : int
        Permutations of each protocol's permutation test (0 skips them).
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
        Processes for the three permutation tests (from
        :data:`PARALLEL_MIN_PERMUTATIONS` permutations on); default: the
        cores available. 1 runs them in this process. The results are the
        same either way.

    Returns
    -------
    dict
        ``headline``, ``positive_class``, ``negative_class`` and one block for
        each of ``nested``, ``global`` (first CXR) and ``reversed`` (second
        CXR, headline protocol), with the keys of docs/RESULTS.md.
    """
    from covreport.stats.calibration import calibration

    headline = _check_protocol(headline)
    alpha = check_alpha(alpha)
    outcome = np.asarray(outcome, dtype=object)
    n = len(outcome)
    for name, arr in (("groups", groups), ("pair_ids", pair_ids)):
        if len(arr) != n:
            raise StatsError(f"{name} has {len(arr)} values but there are {n} outcomes; they must be aligned")
    if order_keys is not None and len(order_keys) != n:
        raise StatsError(f"order_keys has {len(order_keys)} rows but there are {n} pairs; they must be aligned")
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
    y = (outcome[keep][order] == WORSE).astype(np.int64)
    n_patients = len(set(groups_k.tolist()))

    out = {"headline": headline, "positive_class": WORSE, "negative_class": IMPROVED}
    specs = (("nested", "nested", "first"), ("global", "global", "first"), ("reversed", headline, "second"))
    fits, tasks = {}, {}
    for key, protocol, source in specs:
        X = _as_frame_rows(feats[source], keep, order)
        if n_patients < 2:
            if len(y):
                _feature_matrix(X)                      # still report bad features
            out[key] = _empty_block(protocol, source, len(y), n_patients, pairs_k, groups_k, y)
            if key == "reversed":
                _describe_reversed(out[key], y)
            continue
        fits[key] = lopo_predict(X, y, groups_k, protocol=protocol, solver=solver)
        out[key] = None                                  # keeps the key order
        if n_permutations:
            tasks[key] = (X, y, groups_k, protocol)
    jobs = _available_cores() if n_jobs is None else int(n_jobs)
    # the two nested-protocol tests cost most: they go first (to the other processes)
    tasks = dict(sorted(tasks.items(), key=lambda kv: kv[1][3] != "nested"))
    perms = _permutation_tests(tasks, n_permutations, seed, solver, jobs) if tasks else {}
    for key, protocol, source in specs:
        if key not in fits:
            continue
        res = fits[key]
        prob, pred = res["probabilities"], res["predicted"]
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
            "calibration": calibration(y, prob, alpha=alpha),
            "selected_features": [{"feature": f, "folds_selected": c, "fraction": c / n_folds}
                                  for f, c in selected],
            "features_selected": _features_block(fitted),
            "one_class_folds": res["one_class_folds"],
            "permutation_p": p_perm,
            "permutations": n_perm,
            "permutation_method": PERMUTATION_METHOD.format(n=n_perm) if n_perm else None,
            "pairs": [{"pair_id": to_python(pid), "patient_id": to_python(pat),
                       "outcome": WORSE if yy else IMPROVED, "probability": float(pr),
                       "predicted": WORSE if hit else IMPROVED}
                      for pid, pat, yy, pr, hit in zip(pairs_k, groups_k, y, prob, pred)],
            "solver": res["engine"],
            "method": _pipeline_method(protocol, source, SELECTION_ALPHA, res["engine"]),
            "note": None,
        }
        if key == "reversed":
            _describe_reversed(block, y)
        out[key] = block
    return out


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
    "always predicting the more frequent outcome) with its permutation p"
)


def _describe_reversed(block, y):
    n = len(y)
    n_worse = int(y.sum())
    block["majority_rate"] = max(n_worse, n - n_worse) / n if n else None
    block["majority_class"] = (WORSE if n_worse >= n - n_worse else IMPROVED) if n else None
    block["control_method"] = REVERSED_METHOD


def _empty_block(protocol, source, n_pairs, n_patients, pair_ids, patients, y):
    """A prediction block that could not be computed (fewer than 2 patients), with the reason."""
    from covreport.stats.calibration import calibration

    reason = (f"not computed: leave-one-patient-out needs Worse or Improved pairs of at least 2 "
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
                   "outcome": WORSE if yy else IMPROVED, "probability": None, "predicted": None}
                  for pid, pat, yy in zip(pair_ids, patients, y)],
        "solver": None,
        "method": _pipeline_method(protocol, source, SELECTION_ALPHA, "none"),
        "note": reason,
    }
