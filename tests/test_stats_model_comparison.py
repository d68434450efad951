"""Tests of covreport.stats.model_comparison (issue 22, section 3: the added value of the images).

Independent references, named at each check: R 4.2.2 with Hmisc 4.8-0 ``improveProb(x1 = p_old,
x2 = p_new, y)`` on tests/fixtures/model_comparison_data.csv (tests/fixtures/r_hmisc_improveprob.R wrote
tests/fixtures/r_hmisc_improveprob.json; R is not needed to run these tests); each bootstrap resample
built explicitly as a table and its measures recomputed; covreport's DeLong and Obuchowski
comparisons, themselves tied to pROC's roc.test and to Obuchowski's formulas in test_stats_auc.py and
test_stats_clustered.py.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covreport.errors import StatsError
from covreport.stats.auc import delong_test
from covreport.stats.clustered import obuchowski_compare, resample_counts
from covreport.stats.model_comparison import COMPARISON_COLUMNS, compare_models, reclassification

FIX = Path(__file__).parent / "fixtures"
REF = json.loads((FIX / "r_hmisc_improveprob.json").read_text(encoding="utf-8"))
DATA = pd.read_csv(FIX / "model_comparison_data.csv")


@pytest.mark.parametrize("case", sorted(REF["cases"]))
def test_nri_and_idi_match_hmisc_improveprob(case):
    d = DATA[DATA.case == case]
    ref = REF["cases"][case]
    got = reclassification(d.y, d.p_new, d.p_old)
    for key in ("nri", "nri_events", "nri_nonevents", "idi"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key
    assert got["n"] == ref["n"]
    # Brier difference written out
    assert got["brier_difference"] == pytest.approx(np.mean((d.p_new - d.y) ** 2) - np.mean((d.p_old - d.y) ** 2),
                                                    rel=1e-12)


def _study(seed=0, n_patients=25):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        u = rng.normal()
        for _ in range(rng.integers(1, 4)):
            y = int(rng.random() < 0.45)
            old = 1 / (1 + np.exp(-(0.7 * y + u + rng.normal())))
            new = 1 / (1 + np.exp(-(1.8 * y + u + rng.normal())))
            rows.append((f"P{i:02d}", y, old, new))
    df = pd.DataFrame(rows, columns=["patient_id", "y", "p_old", "p_new"])
    df.loc[0, "y"], df.loc[1, "y"] = 1, 0
    return df


def test_compare_models_bootstrap_against_explicit_resamples():
    df = _study()
    B, seed = 300, 7
    out = compare_models(df.y, df.p_new, df.p_old, df.patient_id, n_resamples=B, seed=seed).set_index("measure")
    assert list(out.reset_index().columns) == ["measure", *[c for c in COMPARISON_COLUMNS if c != "measure"]]
    patients = sorted(set(df.patient_id))
    draws = {k: [] for k in ("nri", "nri_events", "nri_nonevents", "idi", "brier_difference")}
    for row in resample_counts(len(patients), B, seed):
        e = pd.concat([df[df.patient_id == p] for p, k in zip(patients, row) for _ in range(int(k))])
        if e.y.all() or not e.y.any():
            continue
        r = reclassification(e.y, e.p_new, e.p_old)
        for k in draws:
            draws[k].append(r[k])
    full = reclassification(df.y, df.p_new, df.p_old)
    for k, v in draws.items():
        lo, hi = np.percentile(v, [2.5, 97.5])
        assert (out.loc[k, "lower"], out.loc[k, "upper"]) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12), k
        assert out.loc[k, "estimate"] == pytest.approx(full[k], rel=1e-12, abs=1e-15)
        assert math.isnan(out.loc[k, "p"]) and "patient-bootstrap" in out.loc[k, "method"]


def test_compare_models_auc_rows_are_delong_and_obuchowski():
    df = _study(1)
    out = compare_models(df.y, df.p_new, df.p_old, df.patient_id, n_resamples=50).set_index("measure")
    d = delong_test(df.y, df.p_new, df.p_old)
    c = obuchowski_compare(df.y, df.p_new, df.p_old, df.patient_id)
    assert out.loc["auc_difference", "estimate"] == pytest.approx(d["difference"], rel=1e-12)
    assert out.loc["auc_difference", "p"] == pytest.approx(d["p"], rel=1e-12)
    assert out.loc["auc_difference", "upper"] - out.loc["auc_difference", "lower"] == pytest.approx(
        2 * 1.959963984540054 * d["se"], rel=1e-9)
    assert (out.loc["auc_difference_clustered", "p"], out.loc["auc_difference_clustered", "lower"]) == \
        pytest.approx((c["p"], c["ci_low"]), rel=1e-12)
    # with one pair per patient the clustered comparison is DeLong's paired test
    one = compare_models(df.y, df.p_new, df.p_old, [f"u{i}" for i in range(len(df))], n_resamples=20)
    one = one.set_index("measure")
    assert one.loc["auc_difference_clustered", "p"] == pytest.approx(one.loc["auc_difference", "p"], rel=1e-9)


def test_compare_models_does_not_depend_on_row_order():
    df = _study(2)
    sh = df.sample(frac=1.0, random_state=3)
    a = compare_models(df.y, df.p_new, df.p_old, df.patient_id, n_resamples=200, seed=4)
    b = compare_models(sh.y, sh.p_new, sh.p_old, sh.patient_id, n_resamples=200, seed=4)
    for col in ("estimate", "lower", "upper"):
        assert np.allclose(a[col], b[col], rtol=1e-12, atol=1e-15)


def test_bad_inputs_are_errors():
    with pytest.raises(StatsError, match="aligned"):
        reclassification([1, 0], [0.2], [0.3, 0.4])
    with pytest.raises(StatsError, match="both events and non-events"):
        reclassification([1, 1], [0.2, 0.3], [0.3, 0.4])
    with pytest.raises(StatsError, match=r"p_new must hold probabilities in \[0, 1\]"):
        reclassification([1, 0], [1.2, 0.3], [0.3, 0.4])
    with pytest.raises(StatsError, match="0/1"):
        reclassification([2, 0], [0.2, 0.3], [0.3, 0.4])
    with pytest.raises(StatsError, match="0 or more resamples"):
        compare_models([1, 0, 1, 0], [0.8, 0.2, 0.7, 0.3], [0.6, 0.4, 0.5, 0.5], list("abcd"), n_resamples=-1)
    none = compare_models([1, 0, 1, 0], [0.8, 0.2, 0.7, 0.3], [0.6, 0.4, 0.5, 0.5], list("abcd"), n_resamples=0)
    idi = none.set_index("measure").loc["idi"]
    # events' probabilities rise by 0.2 on average, non-events' fall by 0.2: IDI 0.4
    assert np.isnan(idi.lower) and "no interval" in idi.method and idi.estimate == pytest.approx(0.4)
