"""Tests of covreport.stats.decision_curve and the issue 19 output tables.

Independent references: ``dcurves.dca`` (net benefit, treat all, net
interventions avoided, the latter per 1 pair there, per 100 here) on the same
data; a net benefit worked by hand; a pair-level bootstrap of the same draws
for the patient-level band (duplicated pairs).
"""

import numpy as np
import pandas as pd
import pytest

from covreport.errors import StatsError
from covreport.stats.decision_curve import THRESHOLDS, decision_curve, decision_curves, net_benefit


def _data(seed, n=120):
    rng = np.random.default_rng(seed)
    p = np.round(rng.beta(2, 1.5, n), 2)                      # rounded: ties at the thresholds themselves
    y = (rng.random(n) < p).astype(int)
    p[:4] = [0.0, 1.0, 0.5, 0.05]
    return y, p


@pytest.mark.parametrize("seed", [0, 1])
def test_against_dcurves(seed):
    # Reference: dcurves.dca on the same data and thresholds (it treats probability >= threshold).
    from dcurves import dca

    y, p = _data(seed)
    ours = decision_curve(y, p, n_resamples=0)
    ref = dca(data=pd.DataFrame({"y": y, "m": p}), outcome="y", modelnames=["m"], thresholds=list(THRESHOLDS))
    model = ref[ref["model"] == "m"].reset_index(drop=True)
    everyone = ref[ref["model"] == "all"].reset_index(drop=True)
    np.testing.assert_allclose(ours["threshold"], model["threshold"], atol=1e-12)
    np.testing.assert_allclose(ours["net_benefit"], model["net_benefit"], atol=1e-12)
    np.testing.assert_allclose(ours["treat_all"], everyone["net_benefit"], atol=1e-12)
    np.testing.assert_allclose(ours["net_interventions_avoided"], 100 * model["net_intervention_avoided"],
                               atol=1e-9)
    assert (ours["treat_none"] == 0).all() and ours["lower"].isna().all()


def test_hand_worked_net_benefit():
    # By hand: y = 1 1 0 0 1, p = .9 .6 .7 .2 .3.
    # pt = 0.25: treated p >= .25 -> pairs 1, 2, 3, 5: TP 3, FP 1; NB = 3/5 - 1/5 x 1/3 = 0.53333;
    #   treat all = 3/5 - 2/5 x 1/3 = 0.46667; avoided per 100 = (0.06667) x 100 x 0.75/0.25 = 20.
    # pt = 0.5: TP 2, FP 1; NB = 2/5 - 1/5 = 0.2; treat all = 0.6 - 0.4 = 0.2; avoided 0.
    df = decision_curve([1, 1, 0, 0, 1], [0.9, 0.6, 0.7, 0.2, 0.3], thresholds=[0.25, 0.5], n_resamples=0)
    assert df["tp"].tolist() == [3, 2] and df["fp"].tolist() == [1, 1]
    assert df["net_benefit"].tolist() == pytest.approx([8 / 15, 0.2], abs=1e-12)
    assert df["treat_all"].tolist() == pytest.approx([7 / 15, 0.2], abs=1e-12)
    assert df["net_interventions_avoided"].tolist() == pytest.approx([20.0, 0.0], abs=1e-9)
    assert float(net_benefit([1, 0], [0.6, 0.6], [0.5])["net_benefit"][0]) == pytest.approx(0.0)


def test_patient_bootstrap_band_resamples_patients():
    # Reference: with every pair duplicated within its patient, the patient bootstrap draws the same
    # resamples as the pair bootstrap of the single pairs (same seed), so the bands coincide.
    y, p = _data(2, n=60)
    single = decision_curve(y, p, n_resamples=300, seed=5)
    groups = np.repeat([f"P{i:02d}" for i in range(60)], 2)
    doubled = decision_curve(np.repeat(y, 2), np.repeat(p, 2), groups=groups, n_resamples=300, seed=5)
    np.testing.assert_allclose(doubled["lower"], single["lower"], atol=1e-12)
    np.testing.assert_allclose(doubled["upper"], single["upper"], atol=1e-12)
    again = decision_curve(y, p, n_resamples=300, seed=5)
    other = decision_curve(y, p, n_resamples=300, seed=6)
    assert again["lower"].equals(single["lower"]) and not other["lower"].equals(single["lower"])
    inside = (single["lower"] <= single["net_benefit"] + 1e-12) & (single["net_benefit"] <= single["upper"] + 1e-12)
    assert inside.mean() > 0.95 and (single["nia_lower"] <= single["nia_upper"]).all()


def test_decision_curves_loop_over_whatever_protocols_the_prediction_holds():
    y, p = _data(3, n=30)
    pairs = [{"pair_id": f"q{i}", "patient_id": f"P{i // 2}", "outcome": "Worse" if yy else "Improved",
              "probability": float(pp)} for i, (yy, pp) in enumerate(zip(y, p))]
    prediction = {"headline": "anything", "positive_class": "Worse",
                  "anything": {"pairs": pairs, "role": "primary"},
                  "other": {"pairs": [dict(r, probability=1 - r["probability"]) for r in pairs]},
                  "not_run": {"pairs": [dict(r, probability=None) for r in pairs]}}
    rec = decision_curves(prediction, thresholds=[0.2, 0.4], n_resamples=10, seed=1)
    assert [r["protocol"] for r in rec["rows"]] == ["anything", "anything", "other", "other"]
    assert set(rec["protocols"]) == {"anything", "other"} and rec["protocols"]["anything"]["role"] == "primary"
    assert rec["unit"] == "pair" and rec["interval_unit"] == "patient"
    assert "Vickers & Elkin 2006" in rec["method"] and rec["reference"] and rec["thresholds"] == [0.2, 0.4]
    direct = decision_curve(y, p, groups=[r["patient_id"] for r in pairs], thresholds=[0.2, 0.4], n_resamples=10,
                            seed=1)
    assert [r["net_benefit"] for r in rec["rows"][:2]] == pytest.approx(direct["net_benefit"].tolist())
    assert [r["lower"] for r in rec["rows"][:2]] == pytest.approx(direct["lower"].tolist())


@pytest.mark.parametrize("bad", [[0.0, 0.5], [0.5, 1.0], ["x"], []])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(StatsError, match="threshold"):
        decision_curve([0, 1], [0.2, 0.8], thresholds=bad)


def test_bad_inputs_are_refused():
    with pytest.raises(StatsError, match="aligned"):
        decision_curve([0, 1], [0.2])
    with pytest.raises(StatsError, match="between 0 and 1"):
        decision_curve([0, 1], [0.2, 1.5])
    with pytest.raises(StatsError, match="0 and 1 only"):
        decision_curve([0, 2], [0.2, 0.5])


def test_output_tables_of_the_contract(tmp_path):
    # tables/predictions.csv, decision_curve.csv and calibration.csv from a results mapping (pipeline writer).
    from covreport._io import write_csv_atomic
    from covreport.pipeline import _write_prediction_tables
    from covreport.stats.calibration import calibration

    y, p = _data(4, n=20)
    groups = [f"P{i // 2}" for i in range(20)]
    pairs = [{"pair_id": f"q{i}", "patient_id": g, "outcome": "Worse" if yy else "Improved",
              "probability": float(pp), "predicted": "Worse", "fold": i // 2 + 1, "one_class_fold": False}
             for i, (g, yy, pp) in enumerate(zip(groups, y, p))]
    block = {"pairs": pairs, "confusion": {"tp": 1}, "calibration": calibration(y, p, groups=groups, n_resamples=5)}
    results = {"prediction": {"headline": "new", "new": block, "old": dict(block)}}
    results["decision_curve"] = decision_curves(results["prediction"], n_resamples=5)
    _write_prediction_tables(results, tmp_path, write_csv_atomic)
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert list(pred.columns[:6]) == ["pair_id", "patient_id", "protocol", "outcome", "probability", "fold"]
    assert len(pred) == 40 and set(pred["protocol"]) == {"new", "old"}
    assert pred["outcome"].tolist()[:20] == y.tolist()
    dca = pd.read_csv(tmp_path / "decision_curve.csv")
    assert list(dca.columns[:6]) == ["protocol", "threshold", "net_benefit", "lower", "upper", "treat_all"]
    assert len(dca) == 2 * len(THRESHOLDS)
    cal = pd.read_csv(tmp_path / "calibration.csv")
    assert len(cal) == 14 and {"estimate", "ci_low", "ci_high", "method", "reference"} <= set(cal.columns)


def test_run_threshold_option_is_checked_recorded_and_used(tmp_path):
    # `covreport run --threshold`: out of (0, 1) is a usage error; a valid value reaches the prediction
    # blocks, provenance.options (what `covreport verify` reruns with) and the decision-curve table.
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from covreport.cli import main
    from covreport.constants import DEFAULT_LABELS, feature_columns

    example = Path(__file__).resolve().parent.parent / "data_manifests" / "example" / "manifest.csv"
    m = pd.read_csv(example)
    images = sorted(set(m["first_image"]) | set(m["second_image"]))
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"image": images, **{lab: rng.random(len(images)) for lab in DEFAULT_LABELS}})
    scores = pd.concat([scores, pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())], axis=1)
    scores.to_csv(tmp_path / "scores.csv", index=False)
    base = ["run", str(example), "--scores", str(tmp_path / "scores.csv"), "--permutations", "0", "--bootstrap", "0",
            "--no-pdf", "--quiet"]
    bad = CliRunner().invoke(main, base + ["--out", str(tmp_path / "bad"), "--threshold", "1.5"])
    assert bad.exit_code == 2 and "threshold" in bad.output
    good = CliRunner().invoke(main, base + ["--out", str(tmp_path / "out"), "--threshold", "0.3"])
    assert good.exit_code == 0, good.output
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["provenance"]["options"]["threshold"] == 0.3
    for name, block in results["prediction"].items():
        if isinstance(block, dict) and block.get("confusion"):
            assert block["threshold"]["value"] == 0.3
            assert all((r["probability"] >= 0.3) == (r["predicted"] == "Worse") for r in block["pairs"])
    assert (tmp_path / "out" / "tables" / "decision_curve.csv").is_file()
    assert "at least 0.3" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
