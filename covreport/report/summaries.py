"""Small summaries of the results shared by the context, the limitations and the checklists."""

from __future__ import annotations

from covreport.constants import WORSE
from covreport.report.format import _finite

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
    short = {"penalised": "Penalised (primary)", "nested": "Nested", "global": "Global (OPTIMISTIC)",
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


def _threshold(block):
    """The probability cut-off implied by the stored predictions, if it is 0.5."""
    rows = [p for p in block.get("pairs", []) if _finite(p.get("probability"))]
    if rows and all((p["probability"] >= 0.5) == (p["predicted"] == WORSE) for p in rows):
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


