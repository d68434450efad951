"""Figures: content drawn from the results, grayscale-safe styles, deterministic files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from covreport.constants import OUTCOMES
from covreport.figures import GROUP_STYLE, cam_figure, change_boxplots, flow_diagram, roc_grid, save_figure

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"


@pytest.fixture(scope="module")
def results():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _texts(fig):
    out = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        out += [t.get_text() for t in ax.texts] + [ax.get_title()]
    return "\n".join(out)


def test_flow_diagram_shows_counts_and_every_reason(results):
    fig = flow_diagram(results)
    assert isinstance(fig, Figure)
    text = _texts(fig)
    flow = results["flow"]
    assert f"n = {flow['pairs_in_manifest']} pairs of {flow['patients_in_manifest']} patients" in text
    assert f"n = {flow['pairs_analysed']} pairs of {flow['patients_analysed']} patients" in text
    for c in flow["exclusion_counts"]:
        assert c["reason"].split(" (")[0] in text.replace("\n   ", " ")
    assert "Index test not performed, n = 3 pairs" in text
    assert "Reference standard not available, n = 1 pair" in text
    for o in OUTCOMES:
        g = flow["by_outcome"][o]
        assert f"Final category: {o}\n{g['pairs']} pairs of {g['patients']} patients" in text
    # pairs left after the index-test stage: 64 - 3
    assert "Index test performed on both CXRs\nn = 61 pairs" in text
    assert "(not performed: 0)" not in text and "(not available: 0)" not in text


def test_flow_diagram_survives_mathtext_and_many_reasons(results, tmp_path):
    r = copy.deepcopy(results)
    r["flow"]["exclusion_counts"] = [{"stage": "index test not done", "reason": f"$bad^ reason {i}", "pairs": 1}
                                     for i in range(7)]
    fig = flow_diagram(r)
    save_figure(fig, "flow", tmp_path)  # drawing would raise on unescaped mathtext
    assert "3 other reasons (n = 3)" in _texts(fig)


def test_roc_grid_draws_stored_curves_and_marks_non_estimable(results):
    fig = roc_grid(results)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == len(results["labels"])
    by_title = {ax.get_title().replace("\n", " "): ax for ax in axes}
    curve = results["roc_curves"]["Edema"]
    lines = by_title["Edema"].get_lines()
    drawn = [ln for ln in lines if len(ln.get_xdata()) == len(curve["fpr"])]
    assert drawn and np.allclose(drawn[0].get_xdata(), curve["fpr"]) and np.allclose(drawn[0].get_ydata(),
                                                                                        curve["tpr"])
    auc = {r["label"]: r for r in results["validation_auc"]}["Edema"]["auc"]
    assert f"AUC {auc:.3f}" in "\n".join(t.get_text() for t in by_title["Edema"].texts)
    assert "not estimable" in "\n".join(t.get_text() for t in by_title["Pleural Other"].texts)


def test_change_boxplots_medians_match_the_pairs(results):
    fig = change_boxplots(results)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == len(results["labels"])
    for ax, lab in zip(axes, results["labels"]):
        medians = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_color() == "white"]
        groups = [np.array([p[f"{lab} change"] for p in results["pairs"] if p["outcome"] == o]) for o in OUTCOMES]
        expected = [np.median(g) for g in groups]
        assert np.allclose(medians, expected)  # reference: numpy.median of the fixture's changes
        # Tukey's rule, computed here with numpy: the upper whisker ends at the largest pair <= Q3 + 1.5 IQR
        q1, q3 = np.percentile(groups[0], [25, 75])
        top = groups[0][groups[0] <= q3 + 1.5 * (q3 - q1)].max()
        assert any(np.allclose(ln.get_ydata(), [q3, top]) for ln in ax.get_lines())


def test_group_styles_read_in_grayscale():
    hatches = [GROUP_STYLE[o]["hatch"] for o in OUTCOMES]
    markers = [GROUP_STYLE[o]["marker"] for o in OUTCOMES]
    lum = [np.dot(to_rgb(GROUP_STYLE[o]["face"]), (0.299, 0.587, 0.114)) for o in OUTCOMES]
    assert len(set(hatches)) == 3 and len(set(markers)) == 3
    assert min(abs(a - b) for i, a in enumerate(lum) for b in lum[i + 1:]) > 0.15


def test_cam_figure_overlays_maps_of_any_size():
    rng = np.random.default_rng(0)
    cams = [{"pair_id": "P1-1", "label": "Edema",
             "first": {"image": rng.random((40, 30)), "heatmap": rng.random((7, 7))},
             "second": {"image": rng.random((40, 30)), "heatmap": np.zeros((7, 7))}}]
    fig = cam_figure(cams)
    assert len(fig.axes) == 3  # two panels and the colour bar
    assert "Pair P1-1, first CXR" in _texts(fig)
    assert "No class activation maps" in _texts(cam_figure([]))


def test_save_figure_is_deterministic(results, tmp_path):
    a = save_figure(roc_grid(results), "roc", tmp_path / "a")
    b = save_figure(roc_grid(results), "roc", tmp_path / "b")
    for ext in ("png", "svg"):
        assert a[ext].read_bytes() == b[ext].read_bytes()
    svg = a["svg"].read_text()
    assert "<dc:date>" not in svg and svg.lstrip().startswith("<?xml")
    assert a["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["roc.png", "roc.svg"]


def test_cam_figure_puts_both_cxrs_of_a_pair_on_one_scale():
    img = np.zeros((16, 16))
    heat = np.arange(16.0).reshape(4, 4)
    cams = [{"pair_id": "P1-1", "label": "Edema", "outcome": "Worse", "probability": 0.8,
             "label_first": 0.2, "label_second": 0.6,
             "first": {"image": img, "heatmap": heat}, "second": {"image": img, "heatmap": 2 * heat}}]
    fig = cam_figure(cams)
    first, second = (ax.get_images()[1].get_array() for ax in fig.axes[:2])
    # one scale for the pair: 0 at the lower minimum (0), 1 at the higher maximum (30), computed here
    assert np.allclose(first, heat / 30.0) and np.allclose(second, 2 * heat / 30.0)
    assert "Pair P1-1 (Worse), first CXR\nEdema: probability 0.20" in _texts(fig)


def test_cam_pairs_follow_the_stated_rule():
    import pandas as pd

    from covreport.pipeline import _cam_pairs

    rng = np.random.default_rng(1)
    n = 15
    pairs = pd.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "outcome": ["Worse"] * 7 + ["Improved"] * 5
                          + ["Stable"] * 3, "A first": rng.random(n), "A second": rng.random(n),
                          "B first": rng.random(n) / 10, "B second": rng.random(n) / 10})
    pairs["A change"] = pairs["A second"] - pairs["A first"]
    pairs["B change"] = pairs["B second"] - pairs["B first"]
    probs = rng.random(12)
    prediction = {"headline": "nested", "nested": {"pairs": [{"pair_id": f"p{i}", "probability": float(probs[i])}
                                                             for i in range(12)]}}
    chosen, label = _cam_pairs(pairs, ["A", "B"], prediction)
    assert label == "A"  # higher mean probability over all CXRs
    got = {rec["outcome"]: rec["pair_id"] for rec, _p in chosen}
    # reference: numpy median and argmin, per category
    w = probs[:7]
    assert got["Worse"] == f"p{np.argmin(np.abs(w - np.median(w)))}"
    i = probs[7:12]
    assert got["Improved"] == f"p{7 + np.argmin(np.abs(i - np.median(i)))}"
    s = pairs["A change"].to_numpy()[12:]
    assert got["Stable"] == f"p{12 + np.argmin(np.abs(s - np.median(s)))}"


def test_flow_diagram_without_exclusions_draws_the_stard_boxes_with_zero(results):
    r = copy.deepcopy(results)
    r["flow"].update(exclusion_counts=[], pairs_in_manifest=r["flow"]["pairs_analysed"])
    r["projection_changes"] = [{"outcome": o, "projection_change": kind, "pairs": n}
                               for o, kind, n in (("Worse", "changed", 5), ("Worse", "same", 39),
                                                  ("Stable", "same", 8), ("Improved", "changed", 1),
                                                  ("Improved", "same", 7))]
    text = _texts(flow_diagram(r))
    # STARD 2015's diagram: eligible, and every exclusion box with its n, here 0
    n = r["flow"]["pairs_analysed"]
    assert f"Eligible\nn = {n} pairs" in text
    assert "Excluded, n = 0 pairs\n- no pair met an exclusion criterion" in text
    assert "Index test not performed, n = 0 pairs" in text and "Reference standard not available, n = 0 pairs" in text
    assert "Worse\n44 pairs of 34 patients\nprojection changed: 5" in text
    assert "Stable\n8 pairs of 8 patients\nprojection changed: 0" in text
    assert "projection changed: 1" in text


def test_flow_diagram_has_the_stard_boxes(results):
    text = _texts(flow_diagram(results))
    c = results["prediction"]["nested"]["confusion"]
    assert "Source population" in text and "Index test performed" in text and "Reference standard available" in text
    # STARD's order: index test result, then the reference standard of its pairs (the confusion matrix)
    assert (f"Index test positive\n(predicts Worse)\nn = {c['tp'] + c['fp']} pairs" in text
            and f"Reference standard\nWorse: {c['tp']}\nImproved: {c['fp']}" in text)
    assert (f"Index test negative\n(predicts Improved)\nn = {c['fn'] + c['tn']} pairs" in text
            and f"Reference standard\nWorse: {c['fn']}\nImproved: {c['tn']}" in text)
    assert "Index test inconclusive\n(no prediction)\nn = 0 pairs" in text
    by = results["flow"]["by_outcome"]
    counted = sum(g["patients"] for g in by.values())
    assert f"the groups count {counted} patients for {results['flow']['patients_analysed']} patients" in text


def test_flow_diagram_counts_the_pairs_missing_a_clinical_predictor(results):
    # issue 22.1: a pair missing a predictor is left out of the added-value models and counted with its reason
    res = copy.deepcopy(results)
    res["added_value"] = {"predictors": [{"name": "age"}, {"name": "spo2"}], "pairs_analysed": 40,
                          "patients_analysed": 30, "excluded": [
                              {"pair_id": "a", "patient_id": "P1", "reason": "missing spo2"},
                              {"pair_id": "b", "patient_id": "P2", "reason": "missing spo2"},
                              {"pair_id": "c", "patient_id": "P3", "reason": "missing age, spo2"}]}
    text = _texts(flow_diagram(res))
    assert "(clinical predictors: age, spo2)\n40 pairs of 30 patients with every predictor" in text
    assert "Not in these models, missing a predictor: 3 pairs\n- missing spo2 (n = 2)\n- missing age, spo2 (n = 1)" in text
    assert "Added value of the images" not in _texts(flow_diagram(results))
