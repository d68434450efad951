"""Monte Carlo error of the permutation p and the classification threshold (issue 19, sections 3 and 4).

Independent references: scipy's ``binomtest(...).proportion_ci(method="exact")``
(Clopper-Pearson); the standard error sqrt(p (1 - p) / N) computed by hand;
the confusion counts recounted from the stored out-of-fold probabilities.
"""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from covreport.errors import StatsError
from covreport.stats.permutation import monte_carlo_error, permutation_p


@pytest.mark.parametrize("b,m", [(0, 999), (7, 200), (50, 50), (13, 1000)])
def test_monte_carlo_error_against_scipy_clopper_pearson(b, m):
    rec = monte_carlo_error(b, m)
    ci = binomtest(b, m).proportion_ci(confidence_level=0.99, method="exact")
    assert rec["ci_low"] == pytest.approx(ci.low, abs=1e-12)
    assert rec["ci_high"] == pytest.approx(ci.high, abs=1e-12)
    p = (b + 1) / (m + 1)
    assert rec["p"] == pytest.approx(p) and rec["se"] == pytest.approx(math.sqrt(p * (1 - p) / m))
    assert rec["unit"] == "permutation" and "Phipson & Smyth 2010" in rec["method"] and rec["reference"]
    assert "renaming the patients" in rec["method"]


def test_monte_carlo_error_refuses_impossible_counts():
    with pytest.raises(StatsError, match="b <= N"):
        monte_carlo_error(5, 4)
    with pytest.raises(StatsError, match="N >= 1"):
        monte_carlo_error(0, 0)


def _study(seed=0, patients=12):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3, patients)
    groups = np.repeat([f"P{i:02d}" for i in range(patients)], sizes)
    y = (rng.random(len(groups)) < 0.6).astype(int)
    y[:2] = [0, 1]
    X = rng.random((len(y), 30)) + 0.8 * y[:, None] * (np.arange(30) < 3)
    return X, y, groups


def test_permutation_p_uses_the_threshold_and_reports_its_monte_carlo_error():
    X, y, groups = _study()
    a = permutation_p(X, y, groups, protocol="nested", n_permutations=30, seed=1)
    b = permutation_p(X, y, groups, protocol="nested", n_permutations=30, seed=1, threshold=0.9)
    assert a["monte_carlo"] == monte_carlo_error(a["n_at_least_observed"], 30)
    from covreport.stats.lopo import lopo_predict

    prob = lopo_predict(X, y, groups, protocol="nested")["probabilities"]
    assert b["observed_accuracy"] == pytest.approx(np.mean((prob >= 0.9) == (y == 1)))
    assert a["observed_accuracy"] == pytest.approx(np.mean((prob >= 0.5) == (y == 1)))
    with pytest.raises(StatsError, match="threshold"):
        permutation_p(X, y, groups, protocol="nested", n_permutations=2, threshold=1.0)


def test_predict_outcome_threshold_and_records():
    from covreport.stats.prediction import predict_outcome

    X, y, groups = _study(1)
    outcome = np.where(y == 1, "Worse", "Improved")
    ids = [f"q{i}" for i in range(len(y))]
    res = predict_outcome(X, X, outcome, groups, ids, headline="nested", n_permutations=20, seed=0, threshold=0.3,
                          n_jobs=1)
    for name in ("nested", "global"):
        block = res[name]
        prob = np.array([r["probability"] for r in block["pairs"]])
        worse = np.array([r["outcome"] == "Worse" for r in block["pairs"]])
        hit = prob >= 0.3
        assert [r["predicted"] == "Worse" for r in block["pairs"]] == hit.tolist()
        assert block["confusion"] == {"tp": int((hit & worse).sum()), "fp": int((hit & ~worse).sum()),
                                      "fn": int((~hit & worse).sum()), "tn": int((~hit & ~worse).sum())}
        assert block["threshold"]["value"] == 0.3 and block["threshold"]["source"] == "prespecified"
        assert "0.3" in block["threshold"]["method"] and block["threshold"]["reference"]
        mc = block["permutation_monte_carlo"]
        assert mc["p"] == pytest.approx(block["permutation_p"]) and mc["n_permutations"] == 20
        folds = [r["fold"] for r in block["pairs"]]
        assert folds == [sorted(set(groups)).index(g) + 1 for g in (r["patient_id"] for r in block["pairs"])]
        assert block["calibration"]["one_class_pairs"] == sum(r["one_class_fold"] for r in block["pairs"])
