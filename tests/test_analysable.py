"""Which analyses a manifest allows (issue 14.3): the library rule and ``covreport validate``."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.analysable import MIN_GROUP_SIZE, PREDICTION, analyses
from covreport.cli import main
from covreport.constants import CONTRASTS, OUTCOMES

EXAMPLE = Path(__file__).resolve().parents[1] / "data_manifests" / "example" / "manifest.csv"


def _pairs(outcomes, patients=None):
    patients = patients or [f"P{i}" for i in range(len(outcomes))]
    return pd.DataFrame({"patient_id": patients, "outcome": outcomes})


def test_min_group_size_is_the_statistics_own():
    from covreport.stats import groups

    assert MIN_GROUP_SIZE == groups.MIN_GROUP_SIZE


@pytest.mark.parametrize("seed", range(30))
def test_contrasts_can_run_exactly_when_compare_groups_computes_them(seed):
    # Oracle: covreport.stats.compare_groups itself (a contrast it cannot compute has p = NaN).
    from covreport.stats import compare_groups

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 7))
    outcomes = list(rng.choice(OUTCOMES, size=n))
    changes = pd.DataFrame({"outcome": outcomes, "Edema": rng.normal(size=n)})
    table = compare_groups(changes, ["Edema"])
    computed = {r.contrast: not math.isnan(r.p) for r in table.itertuples()}
    got = {a["analysis"]: a["can_run"] for a in analyses(_pairs(outcomes))}
    for g1, g2 in CONTRASTS:
        assert got[f"{g1} vs {g2}"] == computed[f"{g1} vs {g2}"], (outcomes, got, computed)


def test_prediction_needs_worse_and_improved_pairs_of_two_patients():
    def reason(outcomes, patients=None):
        (rec,) = [a for a in analyses(_pairs(outcomes, patients)) if a["analysis"] == PREDICTION]
        assert rec["can_run"] == (rec["reason"] is None)
        return rec["reason"]

    assert reason(["Worse", "Worse", "Improved", "Improved"]) is None
    assert reason(["Worse", "Worse", "Stable"]) == \
        "no Improved pair; it needs at least one Worse and one Improved pair"
    assert reason(["Stable"]) == "no Worse and Improved pair; it needs at least one Worse and one Improved pair"
    assert reason(["Worse", "Improved", "Stable"], ["P1", "P1", "P2"]) == \
        "the 2 pairs Worse or Improved come from 1 patient; leave-one-patient-out needs at least 2 patients"


def test_prediction_cannot_run_when_a_training_fold_holds_one_class():
    # Issue 21.5: Improved was one pair of one patient; leaving that patient out trained on Worse alone.
    def reason(outcomes, patients):
        (rec,) = [a for a in analyses(_pairs(outcomes, patients)) if a["analysis"] == PREDICTION]
        assert rec["can_run"] == (rec["reason"] is None)
        return rec["reason"]

    assert reason(["Worse", "Worse", "Worse", "Improved"], ["P1", "P2", "P3", "P4"]) == (
        "leaving out patient P4, the only patient with an Improved pair (1 pair), trains on Worse pairs alone; "
        "leave-one-patient-out needs Worse and Improved pairs from at least 2 patients each")
    assert reason(["Worse", "Improved", "Improved", "Worse"], ["P1", "P2", "P3", "P1"]) == (
        "leaving out patient P1, the only patient with a Worse pair (2 pairs), trains on Improved pairs alone; "
        "leave-one-patient-out needs Worse and Improved pairs from at least 2 patients each")
    assert reason(["Worse", "Improved"], ["P1", "P2"]).count("leaving out patient") == 2


@pytest.mark.parametrize("seed", range(12))
def test_prediction_can_run_exactly_when_no_training_fold_holds_one_class(seed):
    # Oracle: covreport.stats.predict_outcome itself, which counts the folds that trained on one class.
    from covreport.stats import predict_outcome

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    outcomes = list(rng.choice(["Worse", "Improved"], size=n))
    patients = list(rng.choice([f"P{i}" for i in range(int(rng.integers(2, 5)))], size=n))
    if len(set(patients)) < 2 or len(set(outcomes)) < 2:
        pytest.skip("the other reasons are tested above")
    feats = rng.random((n, 8))
    block = predict_outcome(feats, feats + 0.1, outcomes, patients, [f"p{i}" for i in range(n)],
                            n_permutations=0)["nested"]
    (rec,) = [a for a in analyses(_pairs(outcomes, patients)) if a["analysis"] == PREDICTION]
    assert rec["can_run"] == (block["one_class_folds"] == 0), (outcomes, patients, rec, block["one_class_folds"])


def test_reasons_give_the_counts():
    recs = {a["analysis"]: a for a in analyses(_pairs(["Worse", "Worse", "Improved", "Stable"]))}
    assert recs["Worse vs Improved"]["reason"] == \
        "Improved has 1 pair; a group comparison needs at least 2 pairs per group"
    assert recs["Worse vs Stable"]["reason"] == \
        "Stable has 1 pair; a group comparison needs at least 2 pairs per group"
    assert recs["Stable vs Improved"]["reason"] == \
        "Stable has 1 pair and Improved has 1 pair; a group comparison needs at least 2 pairs per group"


# --- covreport validate ------------------------------------------------------------


def _write(tmp_path, rows):
    path = tmp_path / "m.csv"
    path.write_text("patient_id,first_image,second_image,outcome\n" + "".join(r + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def test_validate_exits_1_when_no_pair_can_be_analysed(tmp_path):
    # The case: two pairs, both excluded ("OK ... 0 of 2 pairs" with exit 0 before).
    m = _write(tmp_path, ["P1,a.png,b.png,", "P2,c.png,d.png,Worse"])
    result = CliRunner().invoke(main, ["validate", m])
    assert result.exit_code == 1, result.output
    assert "OK" not in result.stdout
    assert "Exclusions  2" in result.stdout
    assert result.stderr.startswith(f"Error: {m}: no pair can be analysed: all 2 pairs are excluded")


def test_validate_json_exits_1_and_still_prints_the_summary(tmp_path):
    m = _write(tmp_path, ["P1,a.png,b.png,", "P2,c.png,d.png,Worse"])
    result = CliRunner().invoke(main, ["validate", m, "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["pairs_analysable"] == 0
    assert [a["can_run"] for a in summary["analyses"]] == [False] * 4


def test_validate_json_lists_the_analyses_of_the_example():
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    got = {a["analysis"]: a["can_run"] for a in json.loads(result.stdout)["analyses"]}
    assert got == {"Worse vs Improved": True, "Worse vs Stable": False, "Stable vs Improved": False,
                   PREDICTION: True}


def test_validate_says_so_when_every_analysis_is_blocked(tmp_path):
    m = _write(tmp_path, ["P1,a.png,b.png,Worse"])
    result = CliRunner().invoke(main, ["validate", m, "--no-images"])
    assert result.exit_code == 0, result.output
    assert "Analyses    0 of 4 can run" in result.stdout
    assert "OK" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith("Warning: 1 of 1 pairs can be analysed, but none of the 4")
