"""Results do not depend on row order or on how pair ids are spelled (issue 11, section 2).

Property tests (hypothesis): any permutation of the pairs' rows together with
any renaming of the pair ids leaves every number of the statistics unchanged,
bit for bit; only the pair-id strings change. Checked at the level of
``predict_outcome``, of ``pipeline.compute_statistics`` and of a whole
``covreport run`` on a synthetic scores file.
"""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covreport.constants import DEFAULT_LABELS, IMPROVED, STABLE, WORSE, feature_columns
from covreport.pipeline import RunOptions, compute_statistics, run
from covreport.stats import predict_outcome

N_FEATURES = 24
LABELS = list(DEFAULT_LABELS[:3])


def _study(seed=0, n_patients=9):
    """Pairs of sequential CXRs: patient P.., images P.._k, first offsets in days."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        k = int(rng.integers(1, 4))
        for j in range(k):
            outcome = rng.choice([WORSE, IMPROVED, STABLE], p=[0.45, 0.4, 0.15])
            rows.append({"pair_id": f"pair{len(rows):03d}", "patient_id": f"P{i:02d}",
                         "first_image": f"img/P{i:02d}_{j}.png", "second_image": f"img/P{i:02d}_{j + 1}.png",
                         "first_offset_days": 3.0 * j, "second_offset_days": 3.0 * j + 2,
                         "interval_days": 2.0, "first_date": pd.NaT,
                         "outcome": outcome, "age": 40 + i, "sex": "M" if i % 2 else "F"})
    pairs = pd.DataFrame(rows)
    pairs.loc[0, "outcome"], pairs.loc[len(pairs) - 1, "outcome"] = WORSE, IMPROVED
    images = sorted(set(pairs.first_image) | set(pairs.second_image))
    scores = pd.DataFrame({"image": images})
    for lab in LABELS:
        scores[lab] = rng.random(len(images))
    feats = rng.gamma(2.0, 0.5, (len(images), N_FEATURES))
    scores = pd.concat([scores, pd.DataFrame(feats, columns=feature_columns(N_FEATURES))], axis=1)
    by = scores.set_index("image")
    for lab in LABELS:
        pairs[f"{lab} first"] = by.loc[pairs.first_image, lab].to_numpy()
        pairs[f"{lab} second"] = by.loc[pairs.second_image, lab].to_numpy()
        pairs[f"{lab} change"] = pairs[f"{lab} second"] - pairs[f"{lab} first"]
    return pairs, scores


PAIRS, SCORES = _study()


def _without_pair_ids(obj):
    if isinstance(obj, dict):
        return {k: _without_pair_ids(v) for k, v in obj.items() if k != "pair_id"}
    if isinstance(obj, list):
        return [_without_pair_ids(v) for v in obj]
    return obj


def _shuffled_renamed(pairs, order, names):
    out = pairs.iloc[list(order)].reset_index(drop=True).copy()
    out["pair_id"] = [names[i] for i in range(len(out))]
    return out


_ORIGINAL = {}


def _once(key, compute):
    """The result on the rows as given, computed once for all of a test's examples (it never changes)."""
    if key not in _ORIGINAL:
        _ORIGINAL[key] = compute()
    return _ORIGINAL[key]


renamings = st.lists(st.text(alphabet="abcXYZ019-_", min_size=1, max_size=6), min_size=len(PAIRS),
                     max_size=len(PAIRS), unique=True)


def _predict(pairs):
    by = SCORES.set_index("image")
    feats = feature_columns(N_FEATURES)
    first = by.loc[pairs.first_image, feats].reset_index(drop=True)
    second = by.loc[pairs.second_image, feats].reset_index(drop=True)
    keys = pairs[["first_date", "first_offset_days", "first_image", "second_image"]].reset_index(drop=True)
    return predict_outcome(first, second, pairs.outcome.to_numpy(), pairs.patient_id.to_numpy(),
                           pairs.pair_id.to_numpy(), order_keys=keys, n_permutations=15, seed=3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(len(PAIRS))), renamings)
def test_predict_outcome_ignores_row_order_and_pair_id_spelling(order, names):
    a = _once("predict", lambda: _predict(PAIRS))
    b = _predict(_shuffled_renamed(PAIRS, order, names))
    assert json.dumps(_without_pair_ids(a)) == json.dumps(_without_pair_ids(b))
    # renaming changes only the id strings: same pairs, same canonical order
    rename = dict(zip(PAIRS.iloc[list(order)].pair_id, names))
    assert [rename[p["pair_id"]] for p in a["nested"]["pairs"]] == [p["pair_id"] for p in b["nested"]["pairs"]]


class _Opts:
    protocol, permutations, seed, bootstrap, predictive_ci = "nested", 10, 5, 60, "exact"
    threshold = 0.5
    predictors = "age,sex=F/M"   # the added-value models and their patient bootstrap must not depend on order
    target, positive, site, validation = "", "", "source", "leave-one-patient-out"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(len(PAIRS))), renamings)
def test_compute_statistics_ignores_row_order_and_pair_id_spelling(order, names):
    a = _once("statistics", lambda: compute_statistics(PAIRS, LABELS, SCORES, _Opts()))
    b = compute_statistics(_shuffled_renamed(PAIRS, order, names), LABELS, SCORES, _Opts())
    assert list(a) == list(b)
    for key in a:
        assert json.dumps(_without_pair_ids(a[key])) == json.dumps(_without_pair_ids(b[key])), key


def test_covreport_run_ignores_row_order_and_pair_id_spelling(tmp_path):
    # The whole run on a synthetic scores file: results.json identical but for provenance
    # and the pair-id strings.
    cols = ["pair_id", "patient_id", "first_image", "second_image", "outcome",
            "first_offset_days", "second_offset_days", "age", "sex"]
    manifest = PAIRS[cols].copy()
    # Exclusions too (their list must not follow the row order): one pair without an outcome,
    # one whose second image has no score.
    mid = len(manifest) // 2
    manifest.loc[mid - 1, "outcome"] = ""
    unscored = manifest.loc[mid, "second_image"]
    assert unscored not in set(manifest.loc[[0, len(manifest) - 1], ["first_image", "second_image"]].values.ravel())
    scores = tmp_path / "scores.csv"
    rng = np.random.default_rng(1)
    full = pd.DataFrame(rng.gamma(2.0, 0.5, (len(SCORES), 1024)), columns=feature_columns())
    table = pd.concat([SCORES[["image", *LABELS]], full], axis=1)
    table[table["image"] != unscored].to_csv(scores, index=False)
    order = rng.permutation(len(manifest))
    other = manifest.iloc[order].reset_index(drop=True).copy()
    other["pair_id"] = [f"x{v}" for v in rng.permutation(1000)[:len(other)]]
    results = []
    for name, table in (("a", manifest), ("b", other)):
        path = tmp_path / f"{name}.csv"
        table.to_csv(path, index=False)
        out = run(RunOptions(manifest=path, out=tmp_path / f"out_{name}", scores=scores, permutations=10,
                             bootstrap=50, pdf=False))
        r = json.loads((out / "results.json").read_text(encoding="utf-8"))
        r.pop("provenance")
        results.append(r)
    assert len(results[0]["flow"]["exclusions"]) >= 2
    a, b = (_without_pair_ids(r) for r in results)
    assert list(a) == list(b)
    for key in a:
        assert a[key] == b[key], key


def test_cli_run_bootstrap_and_predictive_ci_options(tmp_path):
    # `covreport run --bootstrap 0 --predictive-ci logit`: no bootstrap block, Mercaldo's PPV interval
    from click.testing import CliRunner

    from covreport.cli import main

    cols = ["pair_id", "patient_id", "first_image", "second_image", "outcome", "first_offset_days",
            "second_offset_days", "age", "sex"]
    PAIRS[cols].to_csv(tmp_path / "m.csv", index=False)
    rng = np.random.default_rng(2)
    full = pd.DataFrame(rng.gamma(2.0, 0.5, (len(SCORES), 1024)), columns=feature_columns())
    pd.concat([SCORES[["image", *LABELS]], full], axis=1).to_csv(tmp_path / "s.csv", index=False)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "m.csv"), "--scores", str(tmp_path / "s.csv"),
                                    "--no-pdf", "--out", str(tmp_path / "o"), "--permutations", "5",
                                    "--bootstrap", "0", "--predictive-ci", "logit"])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))
    assert r["bootstrap"] is None
    ppv = r["prediction"]["nested"]["metrics"]["ppv"]
    assert "Mercaldo" in ppv["method"] or "Clopper-Pearson instead" in (ppv["note"] or "")
    assert r["primary_analysis"]["unit"] == "patient"
    assert all(rec["unit"] == "patient" for rec in r["table1_patients"])
    assert all(rec["unit"] == "pair" for rec in r["group_differences"])
    # the methods name the predictive-value interval that ran (issue 20.1: it was fixed text saying "logit")
    for option, out in (("logit", tmp_path / "o"), ("exact", tmp_path / "e")):
        if option == "exact":
            res = CliRunner().invoke(main, ["run", str(tmp_path / "m.csv"), "--scores", str(tmp_path / "s.csv"),
                                            "--no-pdf", "--out", str(out), "--permutations", "0",
                                            "--bootstrap", "0"])
            assert res.exit_code == 0, res.output
        rr = json.loads((out / "results.json").read_text(encoding="utf-8"))
        head = rr["prediction"][rr["prediction"]["headline"]]
        said = "logit CIs" if "Mercaldo" in head["metrics"]["ppv"]["method"] else "have Clopper-Pearson exact CIs"
        html = (out / "report.html").read_text(encoding="utf-8")
        assert f"positive and negative predictive values {said}" in html, option
    assert "Mercaldo" not in rr["prediction"][rr["prediction"]["headline"]]["metrics"]["ppv"]["method"]
