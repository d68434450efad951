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

import numpy as np
import pandas as pd

from covreport.constants import IMPROVED, OUTCOMES, WORSE
from covreport.errors import StatsError
from covreport.stats._logistic import _newton_batch  # noqa: F401  (re-exported)
from covreport.stats._util import check_alpha, to_python
from covreport.stats.lopo import (  # noqa: F401  (re-exported)
    PROTOCOLS, SELECTION_ALPHA, SOLVERS, THRESHOLD, _check_protocol, _feature_matrix, _Lopo, lopo_predict,
)
from covreport.stats.permutation import (  # noqa: F401  (re-exported)
    PERMUTATION_METHOD, permutation_p, permuted_outcomes,
)

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
