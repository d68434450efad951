"""What the AI checklists ask of the prediction beyond its overall accuracy (issue 20, section 9).

- :func:`subgroup_performance`: accuracy, sensitivity and specificity with
  Clopper-Pearson intervals and the AUC with DeLong's interval of the out-of-fold
  predictions, by sex, age band, projection of the first CXR and interval band;
- :func:`failure_analysis`: the pairs the model got most wrong, by ``|y - p|``;
- :func:`patient_separation`: what covreport knows of the separation of patients
  between training and test data (the cross-validation folds, and the test CXRs'
  dates against the collection period of CheXpert).

Every function takes the pair records of one prediction protocol (``pair_id``,
``patient_id``, ``outcome``, ``probability``, ``predicted``, ``fold``; see
:func:`covreport.stats.prediction.predict_outcome`), Worse being the positive class.

References
----------
.. [1] Clopper CJ, Pearson ES. The use of confidence or fiducial limits illustrated in the
   case of the binomial. Biometrika 1934;26:404-413.
.. [2] DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more
   correlated receiver operating characteristic curves. Biometrics 1988;44:837-845.
.. [3] Irvin J, Rajpurkar P, Ko M, et al. CheXpert: a large chest radiograph dataset with
   uncertainty labels and expert comparison. Proc AAAI Conf Artif Intell 2019;33:590-597
   (224,316 CXRs of 65,240 patients, Stanford Hospital, October 2002 to July 2017).
"""

import math

import numpy as np
import pandas as pd

from covreport.constants import IMPROVED, WORSE
from covreport.stats.auc import delong_auc
from covreport.stats.diagnostic import CLOPPER_PEARSON, clopper_pearson

#: Age bands in years: (label, lower bound included, upper bound excluded).
AGE_BANDS = (("< 50 years", -math.inf, 50.0), ("50\u201369 years", 50.0, 70.0), ("\u2265 70 years", 70.0, math.inf))
#: Bands of the interval between the two CXRs in days: (label, lower bound excluded, upper bound included).
INTERVAL_BANDS = (("\u2264 3 days", -math.inf, 3.0), ("> 3 and \u2264 7 days", 3.0, 7.0), ("> 7 days", 7.0, math.inf))
#: The subgroup variables, in the order of the table.
VARIABLES = ("sex", "age band", "projection of the first CXR", "interval band")
#: How many of the worst-predicted pairs :func:`failure_analysis` lists.
N_WORST = 5
#: CheXpert's collection period (Irvin et al. 2019), first and last month.
CHEXPERT_PERIOD = ("2002-10-01", "2017-07-31")

SUBGROUP_METHOD = (f"out-of-fold predictions of the headline protocol by subgroup; accuracy, sensitivity and "
                   f"specificity with {CLOPPER_PEARSON} 95% CIs (Clopper & Pearson 1934), AUC with DeLong's 95% CI "
                   f"(DeLong et al. 1988); age bands {', '.join(b[0] for b in AGE_BANDS)}; interval bands "
                   f"{', '.join(b[0] for b in INTERVAL_BANDS)}; exploratory, not adjusted for multiplicity")
FAILURE_METHOD = ("the pairs with the largest absolute error |y - p| of the out-of-fold probability p of "
                  "{positive} (y = 1 for {positive}, else 0), ties in the pairs' canonical order")
NOT_RECORDED = "not recorded"
_SEX = {"F": "female", "M": "male"}


def _blank(v):
    return not v.strip() if isinstance(v, str) else bool(pd.isna(v))


def _band(value, bands, *, right_closed):
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(x):
        return None
    for label, lo, hi in bands:
        if (lo < x <= hi) if right_closed else (lo <= x < hi):
            return label
    return None


def subgroup_labels(covariates):
    """The subgroup of each pair for each of :data:`VARIABLES` (None where not recorded).

    Parameters
    ----------
    covariates : pandas.DataFrame
        One row per pair, with any of ``sex`` ("M", "F"), ``age`` (years),
        ``first_view`` (AP, PA, ...) and ``interval_days``.

    Returns
    -------
    dict
        Variable name to a list of labels, aligned with the rows.
    """
    n = len(covariates)
    col = lambda c: covariates[c].tolist() if c in covariates else [None] * n  # noqa: E731
    return {
        "sex": [None if _blank(v) else _SEX.get(str(v).strip().upper(), str(v).strip()) for v in col("sex")],
        "age band": [_band(v, AGE_BANDS, right_closed=False) for v in col("age")],
        "projection of the first CXR": [None if _blank(v) else str(v).strip() for v in col("first_view")],
        "interval band": [_band(v, INTERVAL_BANDS, right_closed=True) for v in col("interval_days")],
    }


def _proportion(x, n, alpha):
    if n == 0:
        return None, None, None
    lo, hi = clopper_pearson(x, n, alpha)
    return x / n, lo, hi


def _performance(y, p, hit, patients, alpha, classes=(WORSE, IMPROVED)):
    """The measures of one subgroup: counts, three proportions and the AUC, with the reasons for any n/a."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    correct = int((hit == y).sum())
    row = {"n_pairs": int(len(y)), "n_patients": len(set(patients)), "n_worse": n_pos, "n_improved": n_neg}
    for name, x, n in (("accuracy", correct, len(y)), ("sensitivity", int((hit & y).sum()), n_pos),
                       ("specificity", int((~hit & ~y).sum()), n_neg)):
        row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = _proportion(x, n, alpha)
    row["auc"] = row["auc_ci_low"] = row["auc_ci_high"] = None
    notes = []
    if n_pos == 0 or n_neg == 0:
        only = classes[0] if n_neg == 0 else classes[1]
        missing = "specificity" if n_neg == 0 else "sensitivity"
        notes.append(f"{missing} and AUC n/a: one class only (all {len(y)} pairs {only})")
    else:
        auc = delong_auc(y.astype(int), p, alpha=alpha)
        row["auc"] = auc["auc"]
        if math.isfinite(auc["ci_low"]):
            row["auc_ci_low"], row["auc_ci_high"] = auc["ci_low"], auc["ci_high"]
            if auc["note"]:   # complete separation: the exact interval of the comparisons sharing no case
                notes.append(f"AUC {auc['auc']:g} (complete separation): exact Clopper-Pearson interval")
        else:
            notes.append("AUC without CI: " + auc["note"].split(": ", 1)[-1])
    row["note"] = "; ".join(notes)
    return row


def subgroup_performance(records, covariates, *, alpha=0.05, classes=(WORSE, IMPROVED)):
    """Accuracy, sensitivity, specificity and AUC of out-of-fold predictions by subgroup.

    Parameters
    ----------
    records : list of dict
        Pair records of one protocol with ``patient_id``, ``outcome`` (Worse
        or Improved), ``probability`` and ``predicted``; records without a
        probability are left out.
    covariates : pandas.DataFrame
        Aligned with ``records``: see :func:`subgroup_labels`.
    alpha : float
        1 - confidence level.
    classes : (str, str)
        The positive and negative class of the records' ``outcome`` and
        ``predicted`` (the prediction's ``positive_class`` and
        ``negative_class``; ``n_worse`` and ``n_improved`` count them).

    Returns
    -------
    list of dict
        One row per subgroup, variables in :data:`VARIABLES` order and bands
        in their order (other levels sorted; pairs without the variable last,
        as "not recorded"; a variable no pair has is one row with n/a
        measures): ``variable``, ``subgroup``, ``n_pairs``, ``n_patients``,
        ``n_worse``, ``n_improved``, ``accuracy``, ``sensitivity``,
        ``specificity``, ``auc``, each with ``_ci_low`` and ``_ci_high``
        (None when not estimable), and ``note`` (why a measure is n/a);
        empty without a record that has a probability.
    """
    keep = [i for i, r in enumerate(records) if r.get("probability") is not None]
    recs = [records[i] for i in keep]
    if not recs:
        return []
    labels = subgroup_labels(pd.DataFrame(covariates).iloc[keep].reset_index(drop=True))
    y = np.array([r["outcome"] == classes[0] for r in recs], dtype=bool)
    p = np.array([float(r["probability"]) for r in recs], dtype=float)
    hit = np.array([r["predicted"] == classes[0] for r in recs], dtype=bool)
    patients = np.array([r["patient_id"] for r in recs], dtype=object)
    order = {"age band": [b[0] for b in AGE_BANDS], "interval band": [b[0] for b in INTERVAL_BANDS]}
    rows = []
    for var in VARIABLES:
        lab = np.array(labels[var], dtype=object)
        known = [v for v in lab if v is not None]
        if not known:
            rows.append({"variable": var, "subgroup": NOT_RECORDED, "n_pairs": len(recs), "n_patients":
                         len(set(patients)), "n_worse": int(y.sum()), "n_improved": int((~y).sum()),
                         **{f"{m}{s}": None for m in ("accuracy", "sensitivity", "specificity", "auc")
                            for s in ("", "_ci_low", "_ci_high")},
                         "note": f"n/a: {var} not recorded for any pair"})
            continue
        levels = [v for v in order.get(var, sorted(set(known))) if v in set(known)]
        if len(known) < len(lab):
            levels.append(None)
        for level in levels:
            mask = np.array([v == level if level is not None else v is None for v in lab], dtype=bool)
            rows.append({"variable": var, "subgroup": NOT_RECORDED if level is None else level,
                         **_performance(y[mask], p[mask], hit[mask], patients[mask], alpha, classes)})
    return rows


def failure_analysis(records, n=N_WORST, positive=WORSE):
    """The ``n`` pairs with the largest ``|y - p|``, worst first.

    Parameters
    ----------
    records : list of dict
        Pair records of one protocol, in canonical order (ties keep it).
    n : int
        How many pairs to list (all when fewer).
    positive : str
        The positive class of the records' ``outcome`` (y = 1).

    Returns
    -------
    list of dict
        ``rank``, ``pair_id``, ``patient_id``, ``outcome`` (the reference
        standard), ``probability`` (out-of-fold probability of Worse),
        ``predicted``, ``error`` (``|y - p|``), ``correct``.
    """
    recs = [r for r in records if r.get("probability") is not None]
    err = np.array([abs(float(r["outcome"] == positive) - float(r["probability"])) for r in recs], dtype=float)
    worst = np.argsort(-err, kind="stable")[:n]
    return [{"rank": k + 1, "pair_id": recs[i]["pair_id"], "patient_id": recs[i]["patient_id"],
             "outcome": recs[i]["outcome"], "probability": float(recs[i]["probability"]),
             "predicted": recs[i].get("predicted"), "error": float(err[i]),
             "correct": recs[i].get("predicted") == recs[i]["outcome"]} for k, i in enumerate(worst)]


def _dates(values):
    d = pd.to_datetime(pd.Series(list(values), dtype=object), errors="coerce", format="mixed")
    return d.dropna()


def patient_separation(records, *, dates=()):
    """What covreport knows of the separation of patients between training and test data.

    Parameters
    ----------
    records : list of dict
        Pair records of one protocol with ``patient_id`` and ``fold``.
    dates : iterable
        The dates of the test CXRs (both CXRs of every pair); blanks and
        unparseable values are ignored.

    Returns
    -------
    dict
        ``scheme``, ``unit``, ``n_pairs``, ``n_patients``, ``n_folds``,
        ``disjoint`` (each fold holds one patient and each patient one fold,
        as stored; None when the folds are not stored), ``test_first_date``,
        ``test_last_date``, ``chexpert_period``, ``dated_within_chexpert``
        (test CXRs dated within CheXpert's collection period; None without
        dates), and the two statements ``cross_validation`` and ``index_test``.
    """
    patients = [r["patient_id"] for r in records]
    folds = [r.get("fold") for r in records]
    n_pairs, n_patients = len(records), len(set(patients))
    if records and all(f is not None for f in folds):
        by_fold = pd.DataFrame({"fold": folds, "patient": patients})
        disjoint = bool(by_fold.groupby("fold")["patient"].nunique().max() == 1
                        and by_fold.groupby("patient")["fold"].nunique().max() == 1)
        n_folds = int(by_fold["fold"].nunique())
    else:
        disjoint, n_folds = None, None
    if disjoint:
        cv = (f"Leave-one-patient-out: the {n_pairs} pairs of the {n_patients} patients form {n_folds} test folds, "
              "one per patient, so the pairs of a patient are held out together and never in the training data of "
              "their own prediction (checked on the stored folds).")
    elif disjoint is None:
        cv = ("Leave-one-patient-out: the pairs of a patient are held out together by design; the folds are not "
              "stored, so this was not checked.")
    else:
        cv = "The stored folds mix patients: a patient's pairs are in more than one fold, or a fold holds several."
    d = _dates(dates)
    start, end = (pd.Timestamp(x) for x in CHEXPERT_PERIOD)
    source = ("CheXpert, the training data of the original study's network, holds CXRs of Stanford Hospital "
              "from October 2002 to July 2017 (Irvin et al. 2019)")
    if d.empty:
        within = first = last = None
        it = (f"{source}; the manifest gives no CXR dates, so covreport cannot compare the test CXRs with that "
              "period, and CheXpert's patient identifiers are not shared with the test set.")
    else:
        within = int(((d >= start) & (d <= end + pd.Timedelta(days=1))).sum())
        first, last = d.min().date().isoformat(), d.max().date().isoformat()
        if within == 0:
            it = (f"{source}; the test CXRs are dated {first} to {last}, outside that period, so none of them is a "
                  "CheXpert image. CheXpert's patient identifiers are not shared with the test set, so covreport "
                  "cannot compare patients: a test patient can have CXRs in CheXpert only if the test set also "
                  "comes from Stanford Hospital (study.toml: data_collection).")
        else:
            it = (f"{source}; {within} of the {len(d)} dated test CXRs ({first} to {last}) fall within that period, "
                  "so covreport cannot rule out that they, or their patients, are in the training data.")
    return {"scheme": "leave-one-patient-out", "unit": "patient", "n_pairs": n_pairs, "n_patients": n_patients,
            "n_folds": n_folds, "disjoint": disjoint, "test_first_date": first, "test_last_date": last,
            "chexpert_period": list(CHEXPERT_PERIOD), "dated_within_chexpert": within,
            "cross_validation": cv, "index_test": it}
