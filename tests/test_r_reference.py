"""covreport against values R computed (tests/fixtures/r_reference.json).

The fixture was written by ``Rscript tests/fixtures/r_reference.R`` (R 4.2.2,
epiR 2.0.57; each record names the R call). The tests never need R.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from covreport.stats.diagnostic import diagnostic_metrics
from covreport.stats.groups import MW_EXACT, mannwhitney

REF = json.loads((Path(__file__).parent / "fixtures" / "r_reference.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("rec", REF["binom_test"], ids=lambda r: r["call"])
def test_exact_ppv_interval_is_r_binom_test(rec):
    # PPV = TP/(TP+FP) in a consecutive cohort: its default interval is R's binom.test (Clopper-Pearson).
    x, n = rec["x"], rec["n"]
    m = diagnostic_metrics(x, n - x, 3, 4).set_index("measure")
    assert m.loc["ppv", "ci_low"] == pytest.approx(rec["ci_low"], abs=1e-12)
    assert m.loc["ppv", "ci_high"] == pytest.approx(rec["ci_high"], abs=1e-12)


@pytest.mark.parametrize("rec", REF["epi_tests_exact"], ids=lambda r: r["call"])
def test_predictive_values_and_accuracy_match_epir_exact(rec):
    m = diagnostic_metrics(rec["tp"], rec["fp"], rec["fn"], rec["tn"]).set_index("measure")
    for ours, theirs in (("ppv", "ppv"), ("npv", "npv"), ("sensitivity", "se"), ("specificity", "sp")):
        est, low, high = rec[theirs]
        if est is None:  # epiR: NaN estimate (0/0); covreport: missing with a note
            assert np.isnan(m.loc[ours, "estimate"]) and m.loc[ours, "note"]
            continue
        assert m.loc[ours, "estimate"] == pytest.approx(est, abs=1e-12), ours
        assert m.loc[ours, "ci_low"] == pytest.approx(low, abs=1e-12), ours
        assert m.loc[ours, "ci_high"] == pytest.approx(high, abs=1e-12), ours


@pytest.mark.parametrize("rec", REF["wilcox_test"], ids=lambda r: r["case"])
def test_mann_whitney_follows_r_wilcox_test(rec):
    u, p, method = mannwhitney(np.array(rec["x"]), np.array(rec["y"]))
    assert u == pytest.approx(rec["W"])  # R's W is the first sample's U
    assert p == pytest.approx(rec["p"], rel=1e-9)
    assert (method == MW_EXACT) == ("exact" in rec["method"])
