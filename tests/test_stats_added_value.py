"""Tests of covreport.stats.added_value (issue 22, sections 1 and 3: clinical predictors, images' added value).

References: the design matrix written out by hand; lopo_predict itself (tested against scikit-learn in
test_lopo*.py) and compare_models (tied to R Hmisc improveProb, DeLong and Obuchowski in
test_stats_model_comparison.py); a synthetic study whose answer is known (one informative clinical
predictor, image features that carry more).
"""

import numpy as np
import pandas as pd
import pytest

from covreport.errors import StatsError
from covreport.stats.added_value import added_value, predictor_matrix, predictor_summary
from covreport.stats.decision_curve import THRESHOLDS
from covreport.stats.lopo import lopo_predict
from covreport.stats.model_comparison import compare_models


def test_predictor_matrix_numeric_categorical_and_missing():
    frame = pd.DataFrame({"spo2": ["95", "88.5", "", "91"], "sex": ["M", "F", "M", " "], "line": [2, 3, 4, 5]})
    X, complete, specs = predictor_matrix(frame, ["spo2", "sex=F/M"])
    assert list(X.columns) == ["spo2", "sex[M]"]
    assert X["spo2"].tolist()[:2] == [95.0, 88.5] and np.isnan(X["spo2"][2])
    assert X["sex[M]"].tolist()[:3] == [1.0, 0.0, 1.0] and np.isnan(X["sex[M]"][3])
    assert complete.tolist() == [True, True, False, False]
    assert [(s["name"], s["kind"], s["levels"], s["missing"]) for s in specs] == [
        ("spo2", "numeric", None, 1), ("sex", "categorical", ["F", "M"], 1)]


@pytest.mark.parametrize("frame,predictors,message", [
    ({"spo2": ["95", "9O"], "line": [2, 3]}, ["spo2"],
     "line 3, column 'spo2': '9O' is not a number; write a number, leave it blank when not measured"),
    ({"sex": ["M", "X"]}, ["sex=F/M"], "row 1, column 'sex': 'X' is not one of the levels F/M"),
    ({"age": ["1"]}, ["crp"], "predictor column 'crp' is not in the manifest (its columns: age)"),
    ({"age": ["1"]}, ["age", "age"], "a predictor is named twice"),
    ({"sex": ["M"]}, ["sex=M"], "must list two or more distinct levels, e.g. sex=F/M"),
    ({"age": ["1"]}, [], "no clinical predictor named"),
])
def test_predictor_matrix_errors_name_the_row_column_and_fix(frame, predictors, message):
    with pytest.raises(StatsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predictor_matrix(pd.DataFrame(frame), predictors)


def _study(seed=0, n_patients=36):
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"P{i:02d}" for i in range(n_patients)], rng.integers(1, 3, size=n_patients))
    n = len(pid)
    y = (rng.random(n) < 0.6).astype(int)
    clinical = pd.DataFrame({"spo2": 95 - 3 * y + rng.normal(0, 2, n),    # informative, shifted negative below
                             "noise": rng.normal(size=n)})
    images = np.abs(rng.normal(size=(n, 40)))
    images[:, :6] += 1.2 * y[:, None]
    return images, clinical, y, pid


def test_added_value_models_are_lopo_on_the_same_pairs_and_the_comparison_is_compare_models():
    images, clinical, y, pid = _study()
    out = added_value(images, clinical, y, pid, n_resamples=200, seed=3)
    assert (out["n_pairs"], out["events"]) == (len(y), int(y.sum()))
    # reference: lopo_predict on each design; the clinical columns may be shifted (standardised in each fold)
    for name, X in (("clinical", clinical.to_numpy() + 10.0), ("imaging", images),
                    ("combined", np.hstack([clinical.to_numpy() + 10.0, images]))):
        ref = lopo_predict(X, y, pid, protocol="penalised", final_model=False)["probabilities"]
        assert np.allclose(out["models"][name]["probabilities"], ref, rtol=1e-7, atol=1e-9), name
    comp = pd.DataFrame(out["comparison"])
    ref = compare_models(y, out["models"]["combined"]["probabilities"], out["models"]["clinical"]["probabilities"],
                         pid, name="combined vs clinical", n_resamples=200, seed=3)
    got = comp[comp.comparison == "combined vs clinical"].reset_index(drop=True)
    assert np.allclose(got[["estimate", "lower", "upper"]].to_numpy(dtype=float),
                       ref[["estimate", "lower", "upper"]].to_numpy(dtype=float), equal_nan=True)
    assert set(comp.comparison) == {"combined vs clinical", "imaging vs clinical"}
    # decision curves: net benefit = TP/n - FP/n x t/(1 - t) (Vickers & Elkin 2006), written out
    curve = pd.DataFrame(out["decision_curve"])
    assert len(curve) == 3 * len(THRESHOLDS)
    p = np.asarray(out["models"]["combined"]["probabilities"])
    for t in (0.2, 0.5, 0.8):
        row = curve[(curve.model == "combined") & np.isclose(curve.threshold, t)].iloc[0]
        hit = p >= t
        want = (hit & (y == 1)).sum() / len(y) - (hit & (y == 0)).sum() / len(y) * t / (1 - t)
        assert row.net_benefit == pytest.approx(want, abs=1e-12)
        assert row.treat_all == pytest.approx(y.mean() - (1 - y.mean()) * t / (1 - t), abs=1e-12)


def test_added_value_recovers_the_known_answer():
    images, clinical, y, pid = _study(1, n_patients=60)
    out = added_value(images, clinical, y, pid, n_resamples=200)
    m = out["models"]
    assert m["clinical"]["auc"]["ci_low"] > 0.5                 # the informative predictor beats chance
    assert m["combined"]["auc"]["auc"] > m["clinical"]["auc"]["auc"]
    comp = pd.DataFrame(out["comparison"]).set_index(["comparison", "measure"])
    assert comp.loc[("combined vs clinical", "idi"), "lower"] > 0      # the images add discrimination
    assert comp.loc[("combined vs clinical", "brier_difference"), "estimate"] < 0
    # noise alone does not
    noise = added_value(images, clinical[["noise"]], y, pid, n_resamples=50)
    assert noise["models"]["clinical"]["auc"]["ci_low"] < 0.5 < noise["models"]["imaging"]["auc"]["ci_low"]


def test_added_value_needs_complete_predictors():
    images, clinical, y, pid = _study()
    clinical.iloc[0, 0] = np.nan
    with pytest.raises(StatsError, match="missing values"):
        added_value(images, clinical, y, pid, n_resamples=10)


def test_predictor_summary_is_pandas_describe_and_value_counts_per_group():
    # reference: pandas' mean, std (ddof 1), quantile (linear) and value_counts of the same columns
    rng = np.random.default_rng(4)
    n = 30
    frame = pd.DataFrame({"spo2": [str(v) for v in rng.integers(85, 99, n)],
                          "sex": rng.choice(["F", "M"], n).astype(object),
                          "outcome": rng.choice(["Worse", "Stable", "Improved"], n)})
    frame.loc[[3, 7], "spo2"] = ""
    frame.loc[5, "sex"] = " "
    out = predictor_summary(frame, ["spo2", "sex=F/M"], frame["outcome"])
    assert list(out.group.unique()) == ["All pairs", "Worse", "Stable", "Improved"]
    for group in out.group.unique():
        sub = frame if group == "All pairs" else frame[frame.outcome == group]
        v = pd.to_numeric(sub.spo2.replace("", np.nan)).dropna()
        row = out[(out.predictor == "spo2") & (out.group == group)].iloc[0]
        assert (row.pairs, row.n, row.missing) == (len(sub), len(v), len(sub) - len(v))
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-14) and row.sd == pytest.approx(v.std(), rel=1e-14)
        assert (row.q1, row["median"], row.q3) == pytest.approx(tuple(v.quantile([0.25, 0.5, 0.75])), rel=1e-14)
        known = sub.sex[sub.sex.str.strip() != ""]
        for level in ("F", "M"):
            row = out[(out.predictor == "sex") & (out.level == level) & (out.group == group)].iloc[0]
            assert row["count"] == (known == level).sum() and row.n == len(known)
            assert row.percent == pytest.approx(100 * (known == level).mean(), rel=1e-14)
            assert row.missing == len(sub) - len(known)
    assert out.loc[out.kind == "numeric", "count"].isna().all() and out.note.notna().all()
