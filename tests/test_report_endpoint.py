"""Issue 20, sections 2, 4, 5 and 7 in the report: the primary endpoint first, one multiplicity family per
contrast, the effect sizes beside the tests, the sensitivity analyses and the projection counts.

Every expected number is recomputed here from the results.json the same run wrote (the statistics
themselves are tied to R and statsmodels in test_stats_groups, test_stats_effect_sizes and
test_stats_mixed); these tests check that the report says what was computed, in the declared order.
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.report.format import fmt_ci, fmt_count, fmt_num, fmt_p

EXAMPLE = Path(__file__).parent.parent / "data_manifests" / "reviewer_example"
EN = "\u2013"


def _study(tmp, primary):
    text = (EXAMPLE / "study.toml").read_text(encoding="utf-8")
    if primary is not None:
        text += f'\nprimary_contrast = "{primary}"\n'
    (tmp / "study.toml").write_text(text, encoding="utf-8")


def _run(tmp, primary=None):
    """The reviewer example with a projection change in every fifth pair, run with the given primary contrast."""
    for name in ("scores.csv", "validation.csv", "validation_scores.csv", "reference.csv"):
        shutil.copy(EXAMPLE / name, tmp / name)
    manifest = pd.read_csv(EXAMPLE / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[manifest.index % 5 == 0, "second_view"] = "PA"
    manifest.to_csv(tmp / "manifest.csv", index=False)
    _study(tmp, primary)
    res = CliRunner().invoke(main, [
        "-q", "run", str(tmp / "manifest.csv"), "--scores", str(tmp / "scores.csv"),
        "--validation-csv", str(tmp / "validation.csv"), "--validation-scores", str(tmp / "validation_scores.csv"),
        "--reference-csv", str(tmp / "reference.csv"), "--study", str(tmp / "study.toml"),
        "--permutations", "20", "--bootstrap", "0", "--no-pdf", "--out", str(tmp / "report")])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp / "report" / "results.json").read_text(encoding="utf-8"))
    page = (tmp / "report" / "report.html").read_text(encoding="utf-8")
    return results, page


def _text(page):
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def declared_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("declared"), "worse VS  stable")


def _family(rows, contrast):
    tested = [r for r in rows if r["contrast"] == contrast and r.get("p") is not None]
    return [r for r in tested if r["p_holm"] < 0.05], tested


def test_default_primary_endpoint_leads_the_abstract_and_results(default_run):
    results, page = default_run
    pa = results["primary_analysis"]
    assert (pa["unit"], pa["contrast"], pa["contrast_source"]) == ("patient", "Worse vs Improved", "default")
    holm, tested = _family(results["group_differences_clustered"], "Worse vs Improved")
    text = _text(page)
    abstract = text[text.index("Abstract"):text.index("Conclusions.")]
    sentence = (f"Primary endpoint (covreport's default), the change of each label's probability, Worse vs "
                f"Improved, patients as clusters: {len(holm)} of {len(tested)} labels differed after Holm adjustment")
    assert sentence in abstract
    # the primary sentence comes before the pair-level (secondary) counts and before the prediction
    assert abstract.index(sentence) < abstract.index("Secondary, pairs treated as independent") \
        < abstract.index("Predicting Worse vs Improved")
    # every family is counted exactly as adjusted: within its contrast, at its unit
    for contrast in ("Worse vs Stable", "Stable vs Improved"):
        h, t = _family(results["group_differences_clustered"], contrast)
        assert f"{contrast}, {len(h)} of {len(t)}" in abstract
    pair = "; ".join(f"{c}, {len(_family(results['group_differences'], c)[0])} of "
                     f"{len(_family(results['group_differences'], c)[1])}"
                     for c in ("Worse vs Improved", "Worse vs Stable", "Stable vs Improved"))
    assert f"Secondary, pairs treated as independent as in the original study: {pair}" in abstract
    # Table 2 is the primary (clustered) table, the pair-level one is 2b and labelled secondary
    assert "Table 2. Change in probability compared between outcome groups, patients as clusters [primary analysis]" \
        in text
    assert ("Table 2b. Change in probability (second minus first CXR) compared between outcome groups, pairs as "
            "units [secondary: pairs treated as independent, as in the original study]") in text
    assert text.index("Table 2. Change") < text.index("Table 2b. Change")


def test_declared_primary_contrast_is_recorded_and_comes_first(declared_run):
    results, page = declared_run
    pa = results["primary_analysis"]
    assert (pa["contrast"], pa["contrast_source"]) == ("Worse vs Stable", "study.toml")
    assert results["study"]["primary_contrast"] == "Worse vs Stable"   # spelled as covreport does
    labelled = {r["contrast"]: r["analysis"] for r in results["group_differences_clustered"]}
    assert labelled["Worse vs Stable"].startswith("primary: the change of each label, Worse vs Stable")
    assert labelled["Worse vs Improved"].startswith("secondary")
    text = _text(page)
    holm, tested = _family(results["group_differences_clustered"], "Worse vs Stable")
    assert (f"Primary endpoint (declared in study.toml), the change of each label's probability, Worse vs Stable, "
            f"patients as clusters: {len(holm)} of {len(tested)}") in text
    table2 = text[text.index("Table 2. Change"):text.index("Table 2b. Change")]
    assert table2.index("Worse vs Stable (group 1 vs group 2), primary endpoint") < table2.index("Worse vs Improved")


def test_a_primary_contrast_covreport_does_not_know_is_an_error(tmp_path):
    _study(tmp_path, "Worse vs Dead")
    res = CliRunner().invoke(main, [
        "-q", "run", str(EXAMPLE / "manifest.csv"), "--scores", str(EXAMPLE / "scores.csv"),
        "--study", str(tmp_path / "study.toml"), "--no-pdf", "--out", str(tmp_path / "report")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'study.toml'}: field 'primary_contrast' must be one of 'Worse vs Improved', "
        "'Worse vs Stable', 'Stable vs Improved', got 'Worse vs Dead'; e.g. primary_contrast = \"Worse vs Improved\"")
    assert not (tmp_path / "report").exists()


def test_pair_table_gives_hodges_lehmann_rank_biserial_and_hedges_g(default_run):
    results, page = default_run
    text = _text(page)
    table = text[text.index("Table 2b. Change"):]
    for g in results["group_differences"][:10]:
        if g.get("hl_shift") is None:
            continue
        hl = f"{fmt_num(g['hl_shift'], 3)} ({fmt_ci(g['hl_ci_low'], g['hl_ci_high'], 3)})"   # a line break between
        hg = f"{fmt_num(g['hedges_g'])} ({fmt_ci(g['g_ci_low'], g['g_ci_high'], 2)})"
        assert f"{hl} " in table and hg in table, g["label"]
    assert "Hedges' g (95% CI)" in table and "Cohen's d (95% CI)" not in table


def test_sensitivity_tables_show_the_mixed_model_and_the_trend_test(default_run):
    results, page = default_run
    text = _text(page)
    mixed = text[text.index("Table 2c."):text.index("Table 2d.")]
    assert "projection" in " ".join(r["formula"] for r in results["mixed_model"]), "projection changes enter"
    for row in results["mixed_model"]:
        if row["estimate"] is not None and row["contrast"] == "Worse vs Improved":
            est = f"{fmt_num(row['estimate'], 3)} ({fmt_ci(row['ci_low'], row['ci_high'], 3)}) {fmt_p(row['p'])}"
            assert est in mixed, row["label"]
    trend = text[text.index("Table 2d."):]
    for lab in results["labels"]:
        rows = [r for r in results["trend_test"] if r["label"] == lab]
        pair = next(r for r in rows if r["unit"] == "pair")
        clus = next(r for r in rows if r["unit"] == "patient")
        if pair["p"] is not None:
            assert f"{lab} {pair['sizes']} {fmt_count(pair['J'])} {fmt_num(pair['z'])} {fmt_p(pair['p'])} " \
                   f"{fmt_p(clus['p'])}" in trend


def test_projection_changes_are_counted_in_table1_and_the_flow_diagram(default_run, tmp_path):
    results, page = default_run
    changed = {o: sum(r["pairs"] for r in results["projection_changes"]
                      if r["outcome"] == o and r["projection_change"] == "changed")
               for o in ("Worse", "Stable", "Improved", "All")}
    total = {o: sum(r["pairs"] for r in results["projection_changes"] if r["outcome"] == o)
             for o in changed}
    assert changed["All"] == 12 and total["All"] == 60      # every fifth of 60 pairs made PA
    text = _text(page)
    t1 = text[text.index("Table 1. Demographics"):text.index("Table 1b.")]
    assert "Projection changed" in t1
    from covreport.report.format import fmt_pct
    for o in ("Worse", "Stable", "Improved"):
        assert fmt_pct(changed[o], total[o]) in t1
    from covreport.figures import flow_diagram
    fig = flow_diagram(results)
    drawn = "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)
    for o in ("Worse", "Stable", "Improved"):
        assert f"Final category: {o}" in drawn and f"projection changed: {changed[o]}" in drawn


def test_limitations_count_each_family_as_adjusted(default_run):
    results, page = default_run
    text = _text(page)
    holm, tested = _family(results["group_differences_clustered"], "Worse vs Improved")
    raw = sum(r["p"] < 0.05 for r in tested)
    assert ("Holm and Benjamini-Hochberg adjust within each family, not across them. Primary endpoint (Worse vs "
            f"Improved, patients as clusters): {raw} of {len(tested)} had unadjusted P < .05, {len(holm)} after Holm") \
        in text


def test_limitation_names_each_family_once_even_when_two_families_count_alike():
    # Two families with the same counts and no significant label are equal as dicts: the pair-level
    # ones must still be named "(pairs)" and the clustered ones not.
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from report_fixtures import with_contract_keys

    from covreport.report.limitations import limitations

    r = with_contract_keys()
    for row in r["group_differences"] + r["group_differences_clustered"]:
        row.update(p=0.5, p_holm=1.0, p_bh=1.0)
    text = {f["kind"]: f["text"] for f in limitations(r)}["Multiple comparisons"]
    assert ("60 tests of the change were run (6 families: Worse vs Improved, Worse vs Stable, Stable vs Improved, "
            "Worse vs Improved (pairs), Worse vs Stable (pairs), Stable vs Improved (pairs))") in text
