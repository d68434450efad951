"""Small summaries of the results shared by the context, the limitations and the checklists."""

from __future__ import annotations

from covreport.constants import CONTRAST_NAMES, WORSE
from covreport.report.format import _finite
from covreport.stats.mixed import BOUNDARY

#: Thresholds of the limitations derived from the numbers.
SMALL_GROUP = 20          # pairs in an outcome group
WIDE_CI = 0.30            # width of a 95% CI of a proportion or an AUC
IMBALANCE_RATIO = 1.5     # majority:minority ratio in the prediction task
ALPHA = 0.05

# --- derived content: abstract, methods, limitations, checklist -------------------


def _majority_rate(confusion):
    """Accuracy of always predicting the larger class, from a confusion matrix (None without one)."""
    c = confusion or {}
    pos, neg = (c.get("tp") or 0) + (c.get("fn") or 0), (c.get("fp") or 0) + (c.get("tn") or 0)
    return max(pos, neg) / (pos + neg) if pos + neg else None


def _prediction_blocks(results):
    pred = results.get("prediction") or {}
    headline = pred.get("headline", "nested")
    titles = {"penalised": "Primary: penalised logistic regression (standardised, penalty tuned by nested CV)",
              "nested": "Replication: nested (feature selection inside each fold)",
              "global": "Replication: global selection (original study; OPTIMISTIC)",
              "reversed": "Reversed-order control (second CXR)"}
    short = {"penalised": "Penalised (main)", "nested": "Nested", "global": "Global (OPTIMISTIC)",
             "reversed": "Reversed order (control)"}
    blocks = []
    for name in ("penalised", "nested", "global", "reversed"):
        b = pred.get(name)
        if b and b.get("metrics"):  # a protocol that could not run (e.g. one patient) has no metrics
            blocks.append({"name": name, "title": titles[name], "short": short[name], "block": b,
                           "headline": name == headline, "optimistic": name == "global",
                           "majority": b.get("majority_rate") if _finite(b.get("majority_rate"))
                           else _majority_rate(b.get("confusion"))})
    blocks.sort(key=lambda d: (not d["headline"], ("penalised", "nested", "global", "reversed").index(d["name"])))
    return blocks


def _threshold(block, positive=WORSE):
    """The probability cut-off implied by the stored predictions, if it is 0.5."""
    rows = [p for p in block.get("pairs", []) if _finite(p.get("probability"))]
    if rows and all((p["probability"] >= 0.5) == (p["predicted"] == positive) for p in rows):
        return 0.5
    return None


def _validation_summary(results):
    rows = results.get("validation_auc") or []
    est = [r for r in rows if _finite(r.get("auc"))]
    if not est:
        return None
    lo = min(est, key=lambda r: r["auc"])
    hi = max(est, key=lambda r: r["auc"])
    return {"n": len(rows), "estimable": len(est), "not_estimable": [r for r in rows if not _finite(r.get("auc"))],
            "min": lo, "max": hi, "n_pos_neg": (rows[0].get("n_pos", 0) or 0) + (rows[0].get("n_neg", 0) or 0)}


def _family(rows, contrast):
    """One multiplicity family: the tested labels of one contrast, counted exactly as they were adjusted."""
    tested = [r for r in rows if r.get("contrast") == contrast and _finite(r.get("p"))]
    holm = [r for r in tested if _finite(r.get("p_holm")) and r["p_holm"] < ALPHA]
    return {"contrast": contrast, "tests": len(tested), "raw": sum(r["p"] < ALPHA for r in tested),
            "holm": len(holm), "bh": sum(_finite(r.get("p_bh")) and r["p_bh"] < ALPHA for r in tested),
            "holm_rows": sorted(holm, key=lambda r: r["p_holm"])}


def _contrast_order(rows, first):
    """The contrasts of ``rows`` in their order, with ``first`` (the primary contrast) moved to the front."""
    names = []
    for r in rows:
        if r.get("contrast") not in names:
            names.append(r.get("contrast"))
    return sorted(names, key=lambda c: c != first)


def endpoint_summary(results):
    """The primary endpoint and the multiplicity families of the change analysis, primary first.

    Each contrast is one family (Holm and Benjamini-Hochberg across its labels), at each unit of
    analysis. The primary endpoint is the declared contrast (``primary_analysis.contrast``, from
    study.toml ``primary_contrast``; default Worse vs Improved) at the primary unit (patients as
    clusters when a patient has several pairs).

    Returns
    -------
    dict
        ``contrast``, ``contrast_source``, ``unit``, ``order`` (the contrasts, primary first),
        ``primary`` (the family of the primary endpoint, or None when it was not computed), ``other``
        (the other families at the primary unit), ``secondary`` (the pair-level families when the
        primary unit is the patient) and ``tests_total``.
    """
    pa = results.get("primary_analysis") or {}
    pair_rows = results.get("group_differences") or []
    clustered = results.get("group_differences_clustered") or []
    unit = "patient" if pa.get("unit") == "patient" and clustered else "pair"
    lead = clustered if unit == "patient" else pair_rows
    order = _contrast_order(pair_rows or clustered, pa.get("contrast") or CONTRAST_NAMES[0])
    contrast = order[0] if order else None   # the declared contrast, or the first computed one
    families = [_family(lead, c) for c in order]
    primary = families[0] if families and families[0]["tests"] else None
    secondary = [_family(pair_rows, c) for c in order] if unit == "patient" else []
    return {"contrast": contrast, "contrast_source": pa.get("contrast_source", "default"), "unit": unit,
            "order": order, "primary": primary, "other": families[1:], "secondary": secondary,
            "tests_total": sum(f["tests"] for f in families)}


def mixed_summary(results, endpoint):
    """What the mixed model (sensitivity analysis) says about the primary contrast, for one results sentence.

    Returns None without a fitted mixed model; else ``contrast``, ``labels`` (fitted), ``boundary``
    (labels whose patient variance is at the boundary, :data:`covreport.stats.mixed.BOUNDARY`, so the fit is
    least squares of the pairs),
    ``significant`` (labels at P < .05 in the mixed model), ``primary`` (labels significant after Holm
    in the primary analysis), ``only_mixed`` and ``only_primary``.
    """
    contrast = endpoint.get("contrast")
    rows = [r for r in results.get("mixed_model") or [] if r.get("contrast") == contrast and _finite(r.get("p"))]
    if not rows:
        return None
    sig = [r["label"] for r in rows if r["p"] < ALPHA]
    primary = [r["label"] for r in (endpoint.get("primary") or {}).get("holm_rows", [])]
    return {"contrast": contrast, "labels": [r["label"] for r in rows],
            "boundary": [r["label"] for r in rows if _finite(r.get("random_effect_variance"))
                         and _finite(r.get("residual_variance"))
                         and r["random_effect_variance"] <= BOUNDARY * r["residual_variance"]],
            "significant": sig, "primary": primary,
            "only_mixed": [x for x in sig if x not in primary], "only_primary": [x for x in primary if x not in sig]}


def _group_summary(results):
    rows = results.get("group_differences") or []
    tested = [r for r in rows if _finite(r.get("p"))]
    return {
        "tests": len(tested),
        "raw": sum(r["p"] < ALPHA for r in tested),
        "holm": sum(_finite(r.get("p_holm")) and r["p_holm"] < ALPHA for r in tested),
        "bh": sum(_finite(r.get("p_bh")) and r["p_bh"] < ALPHA for r in tested),
        "holm_rows": [r for r in tested if _finite(r.get("p_holm")) and r["p_holm"] < ALPHA],
        "expected_false": ALPHA * len(tested),
    }
