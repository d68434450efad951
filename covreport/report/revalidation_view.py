"""What the report shows of ``results["revalidation"]`` (``covreport run ... --previous``)."""

from __future__ import annotations

import json
import numbers

from covreport.constants import IMPROVED, WORSE
from covreport.report.format import _finite, fmt_est, fmt_num, fmt_p

# --- revalidation: what moved since the last validation --------------------------

#: Stem of the trend figure (figures/<stem>.png and .svg), drawn when 2 or more previous results are given.
REVALIDATION_FIGURE = "revalidation_trend"
#: Characters of a SHA-256 shown in the report (the full value is in results.json).
SHA_SHOWN = 12

_PROTOCOL_TITLES = {"penalised": "penalised protocol (main)", "nested": "nested protocol", "global": "global protocol (original study; OPTIMISTIC)",
                    "reversed": "reversed-order control (second CXR)"}
_PREDICTION_ORDER = ("accuracy", "sensitivity", "specificity", "AUC")
_WVI_D = f"{WORSE} vs {IMPROVED} Cohen's d"
_WVI_P = f"{WORSE} vs {IMPROVED} p"


def _short_sha(sha):
    """The first :data:`SHA_SHOWN` characters of a SHA-256 and an ellipsis, or "not recorded"."""
    if not sha:
        return "not recorded"
    sha = str(sha)
    return sha if len(sha) <= SHA_SHOWN else sha[:SHA_SHOWN] + "\u2026"


def _date(created):
    """The date part of an ISO-8601 time stamp ("date not recorded" when missing)."""
    return str(created)[:10] if created else "date not recorded"


def _not_comparable_why(entry, provenance):
    """A short phrase saying why a previous result is not comparable with the new one (None if it is)."""
    if entry.get("comparable") is not False:
        return None
    why = []
    old, new = entry.get("weights_sha256"), provenance.get("weights_sha256")
    if not old or not new:
        why.append("weights SHA-256 not recorded, so the same model cannot be confirmed")
    elif old != new:
        why.append(f"different weights (SHA-256 {_short_sha(old)} then, {_short_sha(new)} now)")
    if json.dumps(entry.get("preprocessing"), sort_keys=True, default=str) != \
            json.dumps(provenance.get("preprocessing"), sort_keys=True, default=str):
        why.append("different preprocessing")
    return "; ".join(why) or str(entry.get("reason") or "not comparable")


def _reval_format(quantity, estimate, lo, hi):
    if quantity.endswith(" p"):
        return fmt_p(estimate)
    return fmt_est({"estimate": estimate, "ci_low": lo, "ci_high": hi}, 2 if "Cohen" in quantity else 3)


def _reval_change(quantity, change):
    if not _finite(change):
        return "n/a"
    if quantity.endswith(" p") and change != 0 and abs(change) < 0.001:
        return f"{change:+.1e}"
    return f"{change:+.{2 if 'Cohen' in quantity else 3}f}"


def _reval_groups(rev, results):
    """The headline rows of the revalidation record, grouped and ordered for reading.

    Order: the prediction of the headline protocol, the other protocols
    (global, then the reversed-order control), the validation AUC of each
    label, then Worse vs Improved per label (Cohen's d, then the p-value);
    labels in the order of ``results["labels"]``. Rows of any other quantity
    come last, in record order.
    """
    labels = list(results.get("labels") or [])
    head = rev.get("headline_protocol") or (results.get("prediction") or {}).get("headline") or "nested"
    protocols = [head] + [p for p in ("penalised", "nested", "global", "reversed") if p != head]
    pred = results.get("prediction") or {}
    task = f"{pred.get('positive_class') or WORSE} vs {pred.get('negative_class') or IMPROVED}"
    prefix = None
    previous = rev.get("previous") or []
    if previous and previous[-1].get("comparable") is False:
        prefix = "not comparable: " + str(previous[-1].get("reason") or "")

    def label_rank(label):
        return labels.index(label) if label in labels else len(labels)

    groups = {}
    for i, h in enumerate(rev.get("headline") or []):
        q, label, protocol = h.get("quantity") or "", h.get("label"), h.get("protocol")
        if protocol is not None and q in _PREDICTION_ORDER:
            rank = protocols.index(protocol) if protocol in protocols else len(protocols)
            key = (0, rank, str(protocol))
            title = (f"Prediction of {task}, "
                     + _PROTOCOL_TITLES.get(protocol, f"{protocol} protocol")
                     + (" [headline]" if protocol == head else ""))
            name = q if q == "AUC" else q.capitalize()
            short = f"{q} ({protocol})"
            order = (_PREDICTION_ORDER.index(q), i)
        elif q == "validation AUC":
            key, title = (1, 0, ""), "Validation AUC of each label"
            name, short, order = str(label), f"{label} validation AUC", (label_rank(label), i)
        elif q in (_WVI_D, _WVI_P):
            key = (2, 0, "")
            title = f"{WORSE} vs {IMPROVED}: change of each label (Cohen's d; Mann-Whitney U p)"
            what = "Cohen's d" if q == _WVI_D else "p"
            name, short = f"{label}: {what}", f"{what} of {label} ({WORSE} vs {IMPROVED})"
            order = (label_rank(label), 0 if q == _WVI_D else 1, i)
        else:
            key, title = (3, 0, ""), "Other"
            name = " ".join(str(x) for x in (q, label, protocol) if x)
            short, order = name, (i,)
        note = h.get("note") or ""
        if prefix and note.startswith(prefix):
            rest = note[len(prefix):].lstrip("; ")
            note = "not comparable" + (f"; {rest}" if rest else "")
        excludes = h.get("new_ci_excludes_old")
        row = {
            "name": name, "short": short, "quantity": q, "label": label, "protocol": protocol,
            "old": _reval_format(q, h.get("old_estimate"), h.get("old_ci_low"), h.get("old_ci_high")),
            "new": _reval_format(q, h.get("new_estimate"), h.get("new_ci_low"), h.get("new_ci_high")),
            "change": _reval_change(q, h.get("change")),
            "excludes": excludes,
            "excludes_text": {True: "yes", False: "no"}.get(excludes, "n/a"),
            "note": note,
        }
        groups.setdefault(key, {"title": title, "rows": []})["rows"].append((order, row))
    out = []
    for key in sorted(groups):
        g = groups[key]
        out.append({"title": g["title"], "rows": [r for _o, r in sorted(g["rows"], key=lambda t: t[0])]})
    return out


def _count_phrase(n, what):
    """"12 pairs added", "1 pair fewer", "no pair added"."""
    if not isinstance(n, numbers.Integral):
        return None
    if n == 0:
        return f"no {what} added"
    word = what if abs(n) == 1 else what + "s"
    return f"{abs(n)} {word} " + ("added" if n > 0 else "fewer")


def revalidation_view(results):
    """What the report shows of ``results["revalidation"]`` (None when there is none).

    Returns
    -------
    dict or None
        ``previous`` (the record's entries with ``date``, ``sha_short``,
        ``why`` (short reason when not comparable) and ``latest``),
        ``latest``, ``comparable``, ``added`` (rows per outcome and Total,
        with ``pairs_new_in``/``pairs_removed`` from ``pair_changes`` when
        known), ``pair_changes``, ``groups`` (headline rows grouped and
        ordered, see :func:`_reval_groups`), ``n_rows``, ``n_flagged``
        (rows with a CI), ``excluded`` (rows whose new CI excludes the old
        estimate), ``abstract`` (one sentence for the abstract),
        ``warnings``, ``methods`` and ``figure`` (the stem of the trend
        figure when 2 or more previous results were given).
    """
    rev = results.get("revalidation")
    if not rev:
        return None
    prov = results.get("provenance") or {}
    entries = list(rev.get("previous") or [])
    previous = []
    for i, p in enumerate(entries):
        previous.append({**p, "n": i + 1, "date": _date(p.get("created")),
                         "sha_short": _short_sha(p.get("weights_sha256")),
                         "why": _not_comparable_why(p, prov), "latest": i == len(entries) - 1})
    latest = previous[-1] if previous else None
    comparable = bool(rev.get("comparable")) if latest else None
    pc = rev.get("pair_changes") or None
    pc_by = {b.get("outcome"): b for b in (pc or {}).get("by_outcome") or []}
    added = []
    for a in rev.get("added") or []:
        b = pc_by.get(a.get("outcome")) or {}
        if a.get("outcome") == "Total" and pc:
            b = pc
        added.append({**a, "pairs_new_in": b.get("pairs_added"), "pairs_removed": b.get("pairs_removed")})
    total = next((a for a in added if a.get("outcome") == "Total"), None)
    groups = _reval_groups(rev, results)
    rows = [r for g in groups for r in g["rows"]]
    excluded = [r for r in rows if r["excludes"] is True]
    n_flagged = sum(r["excludes"] is not None for r in rows)

    abstract = None
    if latest:
        parts = []
        if total:
            pairs = _count_phrase(total.get("pairs_added"), "pair")
            patients = _count_phrase(total.get("patients_added"), "patient")
            if pairs:
                parts.append(pairs + (f" ({fmt_num(total.get('pairs_old'))} to {fmt_num(total.get('pairs_new'))} "
                                      "pairs analysed)" if total.get("pairs_old") is not None else ""))
            if patients:
                parts.append(patients)
        if pc and pc.get("pairs_relabelled"):
            parts.append(f"{pc['pairs_relabelled']} pair(s) relabelled")
        if n_flagged:
            names = ", ".join(r["short"] for r in excluded[:5]) + (
                f" and {len(excluded) - 5} more" if len(excluded) > 5 else "")
            parts.append(f"the new 95% CI excludes the previous estimate for {len(excluded)} of {n_flagged} "
                         "headline numbers" + (f" ({names})" if excluded else ""))
        lead = f"Compared with the previous validation ({latest['date']})"
        if not comparable:
            lead += f", which is NOT comparable ({latest['why']})"
        abstract = lead + ": " + "; ".join(parts or ["no headline number to compare"]) + "."

    methods = [m for m in (rev.get("method"), rev.get("added_method"), (pc or {}).get("method")) if m]
    return {
        "previous": previous,
        "latest": latest,
        "comparable": comparable,
        "not_comparable": [p for p in previous if p.get("comparable") is False],
        "added": added,
        "pair_changes": pc,
        "groups": groups,
        "n_rows": len(rows),
        "n_flagged": n_flagged,
        "excluded": excluded,
        "abstract": abstract,
        "warnings": [str(w) for w in rev.get("warnings") or []],
        "methods": methods,
        "figure": REVALIDATION_FIGURE if len(previous) >= 2 else None,
        "new_created": prov.get("created"),
        "new_sha_short": _short_sha(prov.get("weights_sha256")),
    }


