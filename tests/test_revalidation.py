"""Tests of covreport.revalidation: the `revalidation` record and its trend figure.

The results dicts are built here, small, following docs/RESULTS.md. The
expected counts, differences and flags are worked out by hand from those
dicts (the reference is the arithmetic written next to each check); nothing
here estimates a statistic.
"""

import copy
import json
from pathlib import Path

import pytest

from covreport.errors import ReportError
from covreport.revalidation import compare, load_results, trend_figure

SHA_A = "a" * 64
SHA_B = "b" * 64
PRE = {"size": 320, "channels": 3, "normalisation": "ImageNet mean and SD"}
LABELS = ("Edema", "Consolidation")
FIXTURE = Path(__file__).parent / "fixtures" / "results.json"


def _metric(est, lo, hi):
    return {"estimate": est, "ci_low": lo, "ci_high": hi, "method": "Clopper-Pearson exact", "note": None}


def _results(created, *, sha=SHA_A, pre=PRE, by_outcome=((10, 8), (3, 3), (4, 4)), auc=(0.80, 0.70, 0.90),
             accuracy=(0.75, 0.60, 0.86), pairs=None, d=(0.9, 0.2, 1.6), p=0.01):
    """A minimal results.json dict (docs/RESULTS.md) with adjustable headline numbers."""
    outcome = dict(zip(("Worse", "Stable", "Improved"), by_outcome))
    if pairs is None:
        pairs = [{"pair_id": f"{o[0]}{i}", "patient_id": f"{o[0]}P{i}", "outcome": o,
                  "first_image": f"{o}/{i}a.png", "second_image": f"{o}/{i}b.png"}
                 for o, (n, _pat) in outcome.items() for i in range(n)]
    block = {
        "protocol": "nested", "features_from": "first", "n_pairs": 14, "n_patients": 12,
        "confusion": {"tp": 8, "fp": 2, "fn": 2, "tn": 2},
        "metrics": {"accuracy": _metric(*accuracy), "sensitivity": _metric(0.8, 0.44, 0.97),
                    "specificity": _metric(0.5, 0.07, 0.93), "ppv": _metric(0.8, 0.5, 0.94)},
        "auc": {"auc": 0.7, "se": 0.1, "ci_low": 0.5, "ci_high": 0.9, "method": "DeLong", "note": None},
        "pairs": [], "method": "LOPO",
    }
    return {
        "covreport_version": "0.1.0",
        "provenance": {"created": created, "weights_sha256": sha, "preprocessing": copy.deepcopy(pre)},
        "labels": list(LABELS),
        "flow": {"pairs_analysed": sum(n for n, _ in by_outcome), "patients_analysed": sum(k for _, k in by_outcome),
                 "by_outcome": {o: {"pairs": n, "patients": k} for o, (n, k) in outcome.items()}},
        "pairs": pairs,
        "validation_auc": [
            {"label": "Edema", "n_pos": 40, "n_neg": 60, "auc": auc[0], "se": 0.05, "ci_low": auc[1],
             "ci_high": auc[2], "method": "DeLong", "note": None},
            {"label": "Consolidation", "n_pos": 0, "n_neg": 100, "auc": None, "se": None, "ci_low": None,
             "ci_high": None, "method": "DeLong", "note": "no positive case"},
        ],
        "group_differences": [
            {"contrast": "Worse vs Improved", "label": lab, "group1": "Worse", "group2": "Improved",
             "p": p, "cohen_d": d[0], "d_ci_low": d[1], "d_ci_high": d[2]} for lab in LABELS
        ] + [{"contrast": "Worse vs Stable", "label": "Edema", "group1": "Worse", "group2": "Stable",
              "p": 0.5, "cohen_d": 0.1, "d_ci_low": -0.5, "d_ci_high": 0.7}],
        "prediction": {"headline": "nested", "positive_class": "Worse", "negative_class": "Improved",
                       "nested": block, "global": copy.deepcopy(block), "reversed": copy.deepcopy(block)},
    }


def _row(rev, quantity, label=None, protocol=None):
    rows = [r for r in rev["headline"] if (r["quantity"], r["label"], r["protocol"]) == (quantity, label, protocol)]
    assert len(rows) == 1, (quantity, label, protocol)
    return rows[0]


def test_added_per_outcome_group():
    old = _results("2024-01-01T00:00:00+00:00")
    new = _results("2024-06-01T00:00:00+00:00", by_outcome=((13, 10), (3, 3), (6, 5)))
    rev = compare(new, [old])
    # By hand: Worse 13-10 = 3 pairs, 10-8 = 2 patients; Stable 0, 0; Improved 6-4 = 2, 5-4 = 1; total 5 and 3.
    assert [(r["outcome"], r["pairs_added"], r["patients_added"]) for r in rev["added"]] == [
        ("Worse", 3, 2), ("Stable", 0, 0), ("Improved", 2, 1), ("Total", 5, 3)]
    assert rev["added"][0]["pairs_old"] == 10 and rev["added"][0]["pairs_new"] == 13
    # Pair lists: Worse 10..12 and Improved 4..5 are new pairs of new patients; nothing removed or relabelled.
    changes = rev["pair_changes"]
    assert (changes["pairs_added"], changes["pairs_removed"], changes["pairs_relabelled"]) == (5, 0, 0)
    assert [(r["outcome"], r["pairs_added"]) for r in changes["by_outcome"]] == [
        ("Worse", 3), ("Stable", 0), ("Improved", 2)]


def test_relabelled_and_removed_pairs_are_counted():
    old = _results("2024-01-01T00:00:00+00:00")
    new = copy.deepcopy(old)
    new["provenance"]["created"] = "2024-06-01T00:00:00+00:00"
    new["pairs"][0]["outcome"] = "Stable"  # W0 relabelled Worse -> Stable
    del new["pairs"][-1]                   # the last Improved pair is gone
    changes = compare(new, [old])["pair_changes"]
    assert (changes["pairs_added"], changes["pairs_removed"], changes["pairs_relabelled"]) == (0, 1, 1)
    assert changes["relabelled"] == [{"patient_id": "WP0", "pair": "Worse/0a.png -> Worse/0b.png",
                                      "old_outcome": "Worse", "new_outcome": "Stable"}]


def test_new_ci_excludes_old_estimate():
    old = _results("2024-01-01T00:00:00+00:00", auc=(0.80, 0.70, 0.90), accuracy=(0.75, 0.60, 0.86))
    # New Edema AUC CI 0.82-0.95 excludes 0.80; new accuracy CI 0.70-0.85 contains 0.75.
    new = _results("2024-06-01T00:00:00+00:00", auc=(0.89, 0.82, 0.95), accuracy=(0.78, 0.70, 0.85))
    rev = compare(new, [old])
    edema = _row(rev, "validation AUC", "Edema")
    assert edema["new_ci_excludes_old"] is True
    assert edema["change"] == pytest.approx(0.89 - 0.80)
    assert (edema["old_estimate"], edema["old_ci_low"], edema["old_ci_high"]) == (0.80, 0.70, 0.90)
    assert (edema["new_estimate"], edema["new_ci_low"], edema["new_ci_high"]) == (0.89, 0.82, 0.95)
    acc = _row(rev, "accuracy", protocol="nested")
    assert acc["new_ci_excludes_old"] is False
    assert acc["change"] == pytest.approx(0.03)
    # Boundary: an old estimate equal to a CI limit is inside the CI (not excluded).
    new2 = _results("2024-06-01T00:00:00+00:00", auc=(0.85, 0.80, 0.95))
    assert _row(compare(new2, [old]), "validation AUC", "Edema")["new_ci_excludes_old"] is False
    # Not estimable (Consolidation AUC null): None, not False.
    cons = _row(rev, "validation AUC", "Consolidation")
    assert cons["new_ci_excludes_old"] is None and cons["change"] is None
    # A p-value has no CI: None.
    p_row = _row(rev, "Worse vs Improved p", "Edema")
    assert p_row["new_ci_excludes_old"] is None and p_row["note"] == "a p-value has no CI"
    d_row = _row(rev, "Worse vs Improved Cohen's d", "Edema")
    assert d_row["new_ci_excludes_old"] is False and d_row["change"] == 0.0


def test_headline_rows_cover_every_headline_number():
    rev = compare(_results("2024-06-01T00:00:00+00:00"), [_results("2024-01-01T00:00:00+00:00")])
    keys = [(r["quantity"], r["label"], r["protocol"]) for r in rev["headline"]]
    expected = [("validation AUC", lab, None) for lab in LABELS]
    for lab in LABELS:
        expected += [("Worse vs Improved p", lab, None), ("Worse vs Improved Cohen's d", lab, None)]
    for protocol in ("nested", "global", "reversed"):
        expected += [(m, None, protocol) for m in ("accuracy", "sensitivity", "specificity", "AUC")]
    assert keys == expected  # Worse vs Stable is not a headline number
    assert all(r["comparable"] is True for r in rev["headline"])


def test_different_weights_are_not_comparable_but_listed():
    old = _results("2024-01-01T00:00:00+00:00", sha=SHA_B)
    new = _results("2024-06-01T00:00:00+00:00", sha=SHA_A)
    rev = compare(new, [old])
    assert rev["comparable"] is False
    prev = rev["previous"][0]
    assert prev["comparable"] is False
    assert prev["reason"] == f"different weights: previous SHA-256 {SHA_B}, new SHA-256 {SHA_A}"
    assert prev["weights_sha256"] == SHA_B and prev["created"] == "2024-01-01T00:00:00+00:00"
    assert len(rev["headline"]) == 2 + 2 * 2 + 3 * 4  # still listed (AUCs, p and d per label, 4 per protocol) ...
    assert all(r["comparable"] is False and r["note"].startswith("not comparable: different weights")
               for r in rev["headline"])  # ... but marked


def test_different_preprocessing_or_unknown_weights_are_not_comparable():
    old = _results("2024-01-01T00:00:00+00:00", pre={**PRE, "size": 224})
    rev = compare(_results("2024-06-01T00:00:00+00:00"), [old])
    assert rev["comparable"] is False
    assert rev["previous"][0]["reason"] == "different preprocessing (size: 224 -> 320)"
    old = _results("2024-01-01T00:00:00+00:00", sha=None)
    reason = compare(_results("2024-06-01T00:00:00+00:00"), [old])["previous"][0]["reason"]
    assert reason.startswith("weights SHA-256 not recorded in the previous result")
    assert f"previous unknown, new {SHA_A}" in reason


def test_series_has_one_point_per_validation_oldest_first():
    olds = [_results(f"2024-0{m}-01T00:00:00+00:00", auc=(0.70 + m / 100, 0.6, 0.9)) for m in (1, 2, 3)]
    olds[0]["provenance"]["weights_sha256"] = SHA_B  # the oldest used other weights
    new = _results("2024-06-01T00:00:00+00:00", auc=(0.9, 0.8, 0.97))
    rev = compare(new, olds)
    assert len(rev["previous"]) == 3
    assert [p["comparable"] for p in rev["previous"]] == [False, True, True]
    assert rev["comparable"] is True  # the most recent previous decides the headline rows
    assert len(rev["series"]) == len(rev["headline"])
    for s in rev["series"]:
        assert len(s["points"]) == 4
        assert [p["which"] for p in s["points"]] == ["previous 1", "previous 2", "previous 3", "new"]
    edema = next(s for s in rev["series"] if (s["quantity"], s["label"]) == ("validation AUC", "Edema"))
    assert [p["estimate"] for p in edema["points"]] == [0.71, 0.72, 0.73, 0.9]
    assert [p["comparable"] for p in edema["points"]] == [False, True, True, True]
    assert [p["created"][:7] for p in edema["points"]] == ["2024-01", "2024-02", "2024-03", "2024-06"]
    # Headline rows compare with the most recent previous: 0.73 -> 0.9.
    assert _row(rev, "validation AUC", "Edema")["old_estimate"] == 0.73
    assert rev["warnings"] == []


def test_out_of_order_results_are_warned_about():
    rev = compare(_results("2024-01-01T00:00:00+00:00"), [_results("2024-06-01T00:00:00+00:00")])
    assert rev["warnings"] == ["the results are not in time order (previous oldest first, then the new one): "
                               "2024-06-01T00:00:00+00:00, 2024-01-01T00:00:00+00:00"]


def test_record_is_json_serialisable_and_strict():
    rev = compare(_results("2024-06-01T00:00:00+00:00"), [_results("2024-01-01T00:00:00+00:00")])
    json.dumps(rev, allow_nan=False)


def test_load_results_and_paths(tmp_path):
    old = _results("2024-01-01T00:00:00+00:00")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    rev = compare(_results("2024-06-01T00:00:00+00:00"), [path])
    assert rev["previous"][0]["path"] == str(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'x': 1\n}")
    with pytest.raises(ReportError) as exc:
        load_results(bad)
    assert str(exc.value).startswith(f"{bad} line 2: not valid JSON")
    with pytest.raises(ReportError, match="does not exist -- give --previous the results.json of an earlier run"):
        load_results(tmp_path / "nope.json")
    with pytest.raises(ReportError, match="no previous results to compare with"):
        compare(old, [])


@pytest.mark.skipif(not FIXTURE.exists(), reason="tests/fixtures/results.json not written yet")
def test_fixture_against_itself():
    fixture = json.loads(FIXTURE.read_text())
    rev = compare(fixture, [copy.deepcopy(fixture)])
    assert rev["comparable"] is True
    assert all(r["pairs_added"] == 0 for r in rev["added"])
    assert all(r["change"] in (0.0, None) for r in rev["headline"])
    # An estimate lies inside its own CI: never excluded.
    assert all(r["new_ci_excludes_old"] in (False, None) for r in rev["headline"])


def test_trend_figure(tmp_path):
    olds = [_results(f"2024-0{m}-01T00:00:00+00:00") for m in (1, 2)]
    olds[0]["provenance"]["weights_sha256"] = SHA_B
    rev = compare(_results("2024-06-01T00:00:00+00:00"), olds)
    fig = trend_figure(rev)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    # Panels: nested accuracy, nested AUC, Edema and Consolidation validation AUCs.
    assert [ax.get_title() for ax in visible] == [
        "Prediction accuracy (nested)", "Prediction AUC (nested)", "Edema: validation AUC",
        "Consolidation: validation AUC"]
    assert [t.get_text() for t in visible[0].get_xticklabels()] == ["2024-01-01", "2024-02-01", "2024-06-01\n(new)"]
    # Grayscale: every line and marker colour is a gray (r = g = b).
    from matplotlib.colors import to_rgba
    for ax in visible:
        for line in ax.get_lines():
            for colour in (line.get_color(), line.get_markerfacecolor(), line.get_markeredgecolor()):
                r, g, b, _a = to_rgba(colour)
                assert r == g == b
    # The not-comparable oldest validation is drawn with an open (white) marker.
    faces = [to_rgba(line.get_markerfacecolor()) for line in visible[0].get_lines() if line.get_marker() == "o"]
    assert (1.0, 1.0, 1.0, 1.0) in faces
    assert visible[3].texts[0].get_text() == "not estimable"
    out = tmp_path / "trend.png"
    fig.savefig(out)
    assert out.stat().st_size > 1000
    with pytest.raises(ReportError, match="nothing to plot"):
        trend_figure({"series": []})
