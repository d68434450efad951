"""Several sites (issue 22, section 4): performance per site and its random-effects meta-analysis.

- :func:`site_performance`: per site, the accuracy, sensitivity and specificity
  (Clopper-Pearson) and the AUC (DeLong) of the out-of-fold predictions, with
  the logit AUC and the calibration slope that the meta-analysis pools;
- :func:`meta_analysis`: a random-effects meta-analysis of one measure over the
  sites, DerSimonian-Laird and Paule-Mandel (checked against R metafor and
  statsmodels ``combine_effects``),
  with tau^2, I^2, Cochran's Q and a 95% prediction interval;
- :func:`site_analysis`: both, for the AUC (logit scale) and the calibration
  slope: what ``results.json`` ``sites`` holds.

References
----------
DerSimonian R, Laird N. Meta-analysis in clinical trials. Control Clin Trials
1986;7:177-188.
Paule RC, Mandel J. Consensus values and weighting factors. J Res Natl Bur
Stand 1982;87:377-385.
Higgins JPT, Thompson SG. Quantifying heterogeneity in a meta-analysis. Stat
Med 2002;21:1539-1558 (I^2).
Higgins JPT, Thompson SG, Spiegelhalter DJ. A re-evaluation of random-effects
meta-analysis. J R Stat Soc A 2009;172:137-159 (the prediction interval).
Riley RD, Higgins JPT, Deeks JJ. Interpretation of random effects
meta-analyses. BMJ 2011;342:d549.
Debray TPA, Damen JAAG, Snell KIE, et al. A guide to systematic review and
meta-analysis of prediction model performance. BMJ 2017;356:i6460 (the AUC
pooled on the logit scale, the calibration slope as it is).
"""

import math

import numpy as np
import pandas as pd
from scipy import special, stats

from covreport.constants import IMPROVED, WORSE
from covreport.errors import StatsError
from covreport.stats._util import check_alpha, z_quantile
from covreport.stats.auc import delong_auc

#: The random-effects estimators of tau^2, and how the method text names them.
ESTIMATORS = {"DerSimonian-Laird": "DerSimonian-Laird (moment estimator, truncated at 0)",
              "Paule-Mandel": "Paule-Mandel (the generalised Q statistic set to k - 1, solved by Brent's method)"}
#: The estimator of the headline figures (Paule-Mandel: less biased for tau^2 with few sites; Veroniki 2016).
PRIMARY_ESTIMATOR = "Paule-Mandel"
NOT_RECORDED = "not recorded"

META_METHOD = (
    "random-effects meta-analysis over the sites: inverse-variance weights 1/(v_i + tau^2), tau^2 by "
    "{estimator}, as R metafor rma and statsmodels combine_effects (tested); {level:g}% CI of the pooled "
    "value mu +/- z SE; Cochran's Q with k - 1 degrees of freedom; I^2 = max(0, (Q - (k - 1))/Q) (Higgins & "
    "Thompson 2002); {level:g}% prediction "
    "interval mu +/- t(k - 2) sqrt(tau^2 + SE^2) for the value at a new site (Higgins, Thompson & "
    "Spiegelhalter 2009; Riley, Higgins & Deeks 2011), from 3 sites")
SITE_METHOD = (
    "out-of-fold predictions of the headline protocol by site: accuracy, sensitivity and specificity with "
    "Clopper-Pearson {level:g}% CIs, the AUC with DeLong's {level:g}% CI and its SE on the logit scale by the "
    "delta method, SE(logit AUC) = SE(AUC)/(AUC(1 - AUC)) (Debray et al. 2017); the calibration slope by "
    "logistic regression of the outcome on the logit of the probability (statsmodels GLM) with its Wald SE; "
    "pairs counted as independent within a site")
REFERENCE = ("DerSimonian R, Laird N. Control Clin Trials 1986;7:177-188; Paule RC, Mandel J. J Res Natl Bur Stand "
             "1982;87:377-385; Higgins JPT, Thompson SG, Spiegelhalter DJ. J R Stat Soc A 2009;172:137-159; "
             "Debray TPA et al. BMJ 2017;356:i6460")


def _tau2(eff, var, estimator):
    """tau^2 by DerSimonian-Laird (moment estimator, truncated at 0) or Paule-Mandel (generalised Q = k - 1)."""
    from scipy import optimize

    w = 1 / var
    mu = np.sum(w * eff) / np.sum(w)
    q = float(np.sum(w * (eff - mu) ** 2))
    k = len(eff)
    if estimator == "DerSimonian-Laird":
        return max(0.0, (q - (k - 1)) / (np.sum(w) - np.sum(w ** 2) / np.sum(w))), q

    def excess(t):
        wt = 1 / (var + t)
        m = np.sum(wt * eff) / np.sum(wt)
        return float(np.sum(wt * (eff - m) ** 2)) - (k - 1)

    if excess(0.0) <= 0:
        return 0.0, q
    hi = max(float(np.var(eff, ddof=1)), 1e-12)
    while excess(hi) > 0:             # the generalised Q falls to 0 as tau^2 grows
        hi *= 4
    return float(optimize.brentq(excess, 0.0, hi, xtol=1e-14, rtol=1e-14, maxiter=500)), q


def meta_analysis(effects, variances, *, alpha=0.05, estimator=PRIMARY_ESTIMATOR):
    """Random-effects meta-analysis of one measure over k sites.

    Parameters
    ----------
    effects, variances : array_like (k,)
        Each site's estimate and its variance (finite, variances > 0).
    alpha : float
        1 - the level of the CI and of the prediction interval.
    estimator : {"DerSimonian-Laird", "Paule-Mandel"}
        The estimator of tau^2: DerSimonian-Laird's moment estimator
        (truncated at 0; as statsmodels ``combine_effects(method_re="chi2")``
        and R metafor ``rma(method="DL")``), or Paule-Mandel's root of the
        generalised Q statistic equal to k - 1 (as metafor ``method="PM"``;
        statsmodels' ``"iterated"`` stops earlier).

    Returns
    -------
    dict
        ``k``, ``estimate``, ``se``, ``ci_low``, ``ci_high``, ``tau2``,
        ``i2`` (from Q, whatever the estimator), ``q``, ``q_df``, ``q_p``,
        ``pi_low``, ``pi_high`` (None below 3 sites), ``weights`` (relative
        random-effects weights), ``estimator``, ``method``, ``reference``.

    Raises
    ------
    StatsError
        Fewer than 2 sites, a non-finite effect, or a variance that is not
        positive.
    """
    alpha = check_alpha(alpha)
    eff = np.asarray(effects, dtype=float)
    var = np.asarray(variances, dtype=float)
    if eff.shape != var.shape or eff.ndim != 1:
        raise StatsError("effects and variances must be 1-d and aligned")
    if len(eff) < 2:
        raise StatsError(f"a meta-analysis needs at least 2 sites, got {len(eff)}")
    if not (np.isfinite(eff).all() and np.isfinite(var).all() and (var > 0).all()):
        raise StatsError("every site needs a finite estimate and a positive finite variance")
    if estimator not in ESTIMATORS:
        raise StatsError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    k = len(eff)
    tau2, q = _tau2(eff, var, estimator)
    w = 1 / (var + tau2)
    mu, se = float(np.sum(w * eff) / np.sum(w)), float(1 / math.sqrt(np.sum(w)))
    z = z_quantile(alpha)
    out = {"k": k, "estimate": mu, "se": se, "ci_low": mu - z * se, "ci_high": mu + z * se, "tau2": tau2,
           "i2": max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0, "q": q, "q_df": k - 1,
           "q_p": float(stats.chi2.sf(q, k - 1)), "pi_low": None, "pi_high": None,
           "weights": [float(v) for v in w / w.sum()], "estimator": estimator, "level": 1 - alpha,
           "method": META_METHOD.format(estimator=ESTIMATORS[estimator], level=round(100 * (1 - alpha), 6)),
           "reference": REFERENCE, "note": None}
    if k >= 3:
        half = float(stats.t.ppf(1 - alpha / 2, k - 2)) * math.sqrt(tau2 + se ** 2)
        out["pi_low"], out["pi_high"] = mu - half, mu + half
    else:
        out["note"] = "no prediction interval: it needs at least 3 sites (t with k - 2 degrees of freedom)"
    return out


def _slope(y, p):
    """Calibration slope and its Wald SE (None, None, reason where not estimable)."""
    import statsmodels.api as sm

    from covreport.stats.calibration import _glm

    fit_rows = (p > 0) & (p < 1)
    yf, pf = y[fit_rows], p[fit_rows]
    if len(yf) < 3 or yf.min() == yf.max():
        return None, None, "calibration slope n/a: one class only"
    lp = np.log(pf / (1 - pf))
    if np.ptp(lp) == 0:
        return None, None, "calibration slope n/a: every probability is the same"
    fit, why = _glm(yf, sm.add_constant(lp, has_constant="add"))
    if fit is None:
        return None, None, f"calibration slope n/a ({why})"
    return float(fit.params[1]), float(fit.bse[1]), None


def site_performance(records, sites, *, alpha=0.05, classes=(WORSE, IMPROVED)):
    """Per site, the performance of out-of-fold predictions, with the measures a meta-analysis pools.

    Parameters
    ----------
    records : list of dict
        Pair records of one protocol (``patient_id``, ``outcome``,
        ``probability``, ``predicted``); records without a probability are
        left out.
    sites : array_like
        The site of each record (None or blank: not recorded).
    alpha : float
        1 - confidence level.
    classes : (str, str)
        The positive and negative class of ``outcome`` and ``predicted``.

    Returns
    -------
    list of dict
        One row per site, sorted by name, pairs without a site last (as
        "not recorded"): ``site``, ``n_pairs``, ``n_patients``, ``n_pos``,
        ``n_neg``, ``accuracy``, ``sensitivity``, ``specificity``, ``auc``
        (each with ``_ci_low`` and ``_ci_high``), ``auc_se``, ``logit_auc``,
        ``logit_auc_se``, ``slope``, ``slope_se``, ``slope_ci_low``,
        ``slope_ci_high``, ``pooled`` (whether the site's AUC and slope enter
        the meta-analysis) and ``note``.
    """
    from covreport.stats.subgroups import _performance

    alpha = check_alpha(alpha)
    if len(sites) != len(records):
        raise StatsError(f"sites has {len(sites)} values but there are {len(records)} records")
    keep = [i for i, r in enumerate(records) if r.get("probability") is not None]
    recs = [records[i] for i in keep]
    site = np.array([NOT_RECORDED if (s is None or (isinstance(s, float) and math.isnan(s)) or not str(s).strip())
                     else str(s).strip() for s in (sites[i] for i in keep)], dtype=object)
    y = np.array([r["outcome"] == classes[0] for r in recs], dtype=bool)
    p = np.array([float(r["probability"]) for r in recs], dtype=float)
    hit = np.array([r["predicted"] == classes[0] for r in recs], dtype=bool)
    patients = np.array([r["patient_id"] for r in recs], dtype=object)
    z = z_quantile(alpha)
    names = sorted(set(site.tolist()) - {NOT_RECORDED}) + ([NOT_RECORDED] if NOT_RECORDED in site else [])
    rows = []
    for name in names:
        m = site == name
        perf = _performance(y[m], p[m], hit[m], patients[m], alpha, classes)
        row = {"site": name, "n_pairs": perf["n_pairs"], "n_patients": perf["n_patients"],
               "n_pos": perf["n_worse"], "n_neg": perf["n_improved"]}
        row.update({k: v for k, v in perf.items() if k.startswith(("accuracy", "sensitivity", "specificity", "auc"))})
        notes = [perf["note"]] if perf["note"] else []
        row.update(auc_se=None, logit_auc=None, logit_auc_se=None)
        if row["n_pos"] and row["n_neg"]:
            d = delong_auc(y[m].astype(int), p[m], alpha=alpha)
            a, se = d["auc"], d["se"]
            if 0 < a < 1 and math.isfinite(se) and se > 0:
                row.update(auc_se=se, logit_auc=float(special.logit(a)), logit_auc_se=se / (a * (1 - a)))
            elif not (0 < a < 1):
                notes.append(f"AUC {a:g}: no logit, not pooled")
        slope, slope_se, why = _slope(y[m].astype(float), p[m])
        row.update(slope=slope, slope_se=slope_se,
                   slope_ci_low=None if slope is None else slope - z * slope_se,
                   slope_ci_high=None if slope is None else slope + z * slope_se)
        if why:
            notes.append(why)
        row["pooled"] = name != NOT_RECORDED
        if name == NOT_RECORDED:
            notes.append("pairs without a site: not pooled")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


def _pool(rows, effect, se, transform=None, alpha=0.05):
    """The meta-analyses (both estimators) of ``effect`` over the pooled rows that have it."""
    use = [r for r in rows if r["pooled"] and r.get(effect) is not None and r.get(se)]
    out = {"sites": [r["site"] for r in use], "k": len(use), "scale": "logit" if transform else "as is"}
    if len(use) < 2:
        out.update(estimators={}, note=f"not pooled: {len(use)} site(s) have it, the meta-analysis needs 2")
        return out
    eff = [r[effect] for r in use]
    var = [r[se] ** 2 for r in use]
    out["estimators"] = {}
    for name in ESTIMATORS:
        res = meta_analysis(eff, var, alpha=alpha, estimator=name)
        if transform:
            for key in ("estimate", "ci_low", "ci_high", "pi_low", "pi_high"):
                res[f"{key}_logit"] = res[key]
                res[key] = None if res[key] is None else float(transform(res[key]))
        out["estimators"][name] = res
    out["primary"] = PRIMARY_ESTIMATOR
    out["note"] = None
    return out


def site_analysis(records, sites, *, column, alpha=0.05, classes=(WORSE, IMPROVED), protocol=None):
    """The ``sites`` record of ``results.json``: per-site performance and the meta-analyses.

    The AUC is pooled on the logit scale and back-transformed (``estimate``
    etc. on the AUC scale, ``*_logit`` on the logit scale); the calibration
    slope as it is. Sites with one class, an AUC of 0 or 1, or no estimable
    slope are left out of that measure's meta-analysis (their rows say why).
    """
    rows = site_performance(records, sites, alpha=alpha, classes=classes)
    level = round(100 * (1 - alpha), 6)
    return {"column": column, "protocol": protocol, "n_sites": sum(r["site"] != NOT_RECORDED for r in rows),
            "rows": rows, "unit": "pair", "method": SITE_METHOD.format(level=level),
            "meta": {"auc": _pool(rows, "logit_auc", "logit_auc_se", special.expit, alpha),
                     "calibration_slope": _pool(rows, "slope", "slope_se", None, alpha)},
            "reference": REFERENCE}


def site_labels(frame, column):
    """Each pair's site from the manifest ``column`` (None where blank); StatsError if the column is absent."""
    if column not in frame.columns:
        raise StatsError(f"site column {column!r} is not in the manifest (its columns: "
                         f"{', '.join(map(str, frame.columns[:20]))}); add it or fix the name given to --site")
    raw = pd.Series(frame[column]).astype(object)
    return [None if (v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip()) else str(v).strip()
            for v in raw]


#: Columns of tables/site_meta_analysis.csv.
META_COLUMNS = ("measure", "scale", "estimator", "k", "estimate", "ci_low", "ci_high", "pi_low", "pi_high", "tau2",
                "i2", "q", "q_df", "q_p", "method")


def meta_rows(record):
    """tables/site_meta_analysis.csv: one row per pooled measure and estimator of a ``sites`` record."""
    rows = []
    for measure, rec in (record.get("meta") or {}).items():
        for name, res in (rec.get("estimators") or {}).items():
            rows.append({"measure": measure, "scale": rec.get("scale"), "estimator": name,
                         **{k: res.get(k) for k in META_COLUMNS[3:]}})
    return rows
