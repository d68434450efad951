"""`covreport run` with several sites (issue 22, section 4), end to end on the reviewer example.

The example's patients are spread over three sites in the manifest's `source` column, and a clinical
target (`--target`) keeps the prediction imperfect so that every site's AUC and slope can be pooled.
Checks: results.json `sites`, tables/sites.csv and site_meta_analysis.csv, the report's section and
forest plot, TRIPOD+AI 12d and 23b, verify, and a missing `--site` column stopping the run before
scoring. The numbers are tied to scikit-learn here and to R metafor in test_stats_sites.py.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from covreport.cli import main
from covreport.stats.sites import meta_analysis

EXAMPLE = Path(__file__).parent.parent / "data_manifests" / "reviewer_example"
SITES = ("Hospital A", "Hospital B", "Hospital C")


def _study(tmp):
    for name in ("manifest.csv", "scores.csv"):
        shutil.copy(EXAMPLE / name, tmp / name)
    table = pd.read_csv(tmp / "manifest.csv", dtype=str, keep_default_na=False)
    patients = sorted(table.patient_id.unique())
    table["source"] = table.patient_id.map({p: SITES[i % 3] for i, p in enumerate(patients)})
    yes = (np.arange(len(table)) % 3 == 0) | ((table.outcome == "Worse") & (table.age.astype(int) > 60))
    table["icu"] = np.where(yes, "yes", "no")
    table.to_csv(tmp / "manifest.csv", index=False)
    return tmp / "manifest.csv", tmp / "scores.csv", table


def _run(manifest, scores, out, *extra):
    return CliRunner().invoke(main, ["-q", "run", str(manifest), "--scores", str(scores), "--target", "icu",
                                     "--positive", "yes", *extra, "--permutations", "0", "--bootstrap", "0",
                                     "--no-pdf", "--out", str(out)])


@pytest.fixture(scope="module")
def sites_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sites")
    manifest, scores, table = _study(tmp)
    res = _run(manifest, scores, tmp / "out")
    assert res.exit_code == 0, res.output
    return tmp / "out", table


def test_each_site_and_the_meta_analysis_are_recorded(sites_run):
    out, table = sites_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    st = results["sites"]
    assert st["column"] == "source" and st["n_sites"] == 3 and st["protocol"] == results["prediction"]["headline"]
    head = results["prediction"][st["protocol"]]
    site_of = dict(zip(table.pair_id, table.source))
    for row in st["rows"]:
        recs = [r for r in head["pairs"] if site_of[r["pair_id"]] == row["site"]]
        y = [r["outcome"] == "icu = yes" for r in recs]
        assert row["n_pairs"] == len(recs) and row["n_pos"] == sum(y)
        assert row["auc"] == pytest.approx(roc_auc_score(y, [r["probability"] for r in recs]))
    assert [r["site"] for r in st["rows"]] == list(SITES)
    pm = st["meta"]["auc"]["estimators"]["Paule-Mandel"]
    ref = meta_analysis([r["logit_auc"] for r in st["rows"]], [r["logit_auc_se"] ** 2 for r in st["rows"]])
    assert pm["estimate_logit"] == pytest.approx(ref["estimate"]) and pm["tau2"] == pytest.approx(ref["tau2"])
    assert results["provenance"]["options"]["site"] == "source"
    from covreport.summary import format_summary, summarise

    line = next(x for x in format_summary(summarise(out)).splitlines() if x.startswith("Sites"))
    assert line.startswith(f"Sites       3 (source): pooled AUC {pm['estimate']:.3f} (95% CI {pm['ci_low']:.3f} to ")
    rows = pd.read_csv(out / "tables" / "sites.csv")
    assert list(rows.site) == list(SITES)
    meta = pd.read_csv(out / "tables" / "site_meta_analysis.csv")
    assert set(zip(meta.measure, meta.estimator)) == {(m, e) for m in ("auc", "calibration_slope")
                                                      for e in ("DerSimonian-Laird", "Paule-Mandel")}


def test_the_report_shows_the_sites_and_the_checklist_counts_them(sites_run):
    from covreport.report.checklists import tripod_checklist

    out, _ = sites_run
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<h4 id="results-sites">Performance by site</h4>' in page and 'id="table-site-meta"' in page
    assert "<strong>Sites.</strong> The pairs come from 3 sites" in page
    assert "Forest plots of the AUC (left) and the calibration slope (right) by site" in page
    assert (out / "figures" / "site_forest.png").is_file()
    assert "Paule RC, Mandel J. Consensus values" in page          # cited in the references
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {r["item"]: r for r in tripod_checklist(results)}
    assert rows["23b"]["filled"].startswith("performance by site") and not rows["23b"]["todo"]
    assert rows["20b"]["filled"].startswith("Table 1 and the interval between the two CXRs; the pairs and outcome "
                                            "events per site")
    assert "internal-external" not in rows["12c"]["filled"]     # no leave-one-site-out in this run
    from covreport.report.checklists import stard_ai_checklist

    stard = {r["item"]: r for r in stard_ai_checklist(results)}
    assert stard["21"]["filled"].endswith("; performance by site with a random-effects meta-analysis "
                                          "(tau\u00b2, I\u00b2, prediction interval)")
    assert "internal-external" not in stard["15b"]["filled"] + stard["29"]["filled"]


def test_verify_repeats_the_site_analysis(sites_run):
    out, _ = sites_run
    res = CliRunner().invoke(main, ["-q", "verify", str(out)])
    assert res.exit_code == 0, res.output


def test_one_site_gives_no_site_analysis_and_a_missing_column_stops_the_run(tmp_path):
    manifest, scores, table = _study(tmp_path)
    table.assign(source="one hospital").to_csv(manifest, index=False)
    res = _run(manifest, scores, tmp_path / "one")
    assert res.exit_code == 0, res.output
    assert "sites" not in json.loads((tmp_path / "one" / "results.json").read_text(encoding="utf-8"))
    res = _run(manifest, scores, tmp_path / "out", "--site", "hospital")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {manifest}: site column 'hospital' is not in the manifest (its columns: ")
    assert not (tmp_path / "out").exists()


def test_leave_one_site_out_adds_the_internal_external_cross_validation(tmp_path):
    from covreport.stats.lopo import iecv_predict

    manifest, scores, table = _study(tmp_path)
    res = _run(manifest, scores, tmp_path / "out", "--validation", "leave-one-site-out")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    ie = results["sites"]["iecv"]
    assert results["sites"]["validation"] == "leave-one-site-out" and ie["n_sites"] == 3
    head = results["prediction"][ie["protocol"]]
    assert [p["pair_id"] for p in ie["pairs"]] == [p["pair_id"] for p in head["pairs"]]
    feats = pd.read_csv(scores).set_index("image")
    first = dict(zip(table.pair_id, table.first_image))
    X = feats.loc[[first[p["pair_id"]] for p in ie["pairs"]], [c for c in feats.columns if c.startswith("feat_")]]
    y = [p["outcome"] == "icu = yes" for p in ie["pairs"]]
    direct = iecv_predict(X.to_numpy(dtype=float), np.array(y, dtype=int), [p["patient_id"] for p in ie["pairs"]],
                          [p["site"] for p in ie["pairs"]], protocol=ie["protocol"])
    np.testing.assert_allclose([p["probability"] for p in ie["pairs"]], direct["probabilities"], atol=1e-12)
    assert ie["overall"]["auc"] == pytest.approx(roc_auc_score(y, direct["probabilities"]))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="table-sites-iecv"' in page and "<strong>Internal-external cross-validation.</strong>" in page
    assert (out / "figures" / "site_forest_iecv.png").is_file()
    assert list(pd.read_csv(out / "tables" / "sites_iecv.csv").site) == list(SITES)
    assert len(pd.read_csv(out / "tables" / "site_meta_analysis_iecv.csv")) == 4
    assert results["provenance"]["options"]["validation"] == "leave-one-site-out"
    from covreport.report.checklists import stard_ai_checklist, tripod_checklist

    tripod = {r["item"]: r for r in tripod_checklist(results)}
    stard = {r["item"]: r for r in stard_ai_checklist(results)}
    assert tripod["12c"]["filled"].split("; ")[1] == ("internal-external cross-validation by site: the model "
                                                      "refitted without each site and evaluated on it, the per-site "
                                                      "results pooled")
    assert tripod["16"]["filled"].startswith("each held-out site against the others (internal-external")
    assert stard["29"]["filled"].startswith("each site held out in turn is an independent evaluation set")
    assert tripod["16"]["status"] == stard["29"]["status"] == "covreport"   # no reference CSV needed
    # 15b needs the network's training recipe, which a scores-only run lacks: there the note joins what
    # covreport says of the item when the weights carry their recipe
    from covreport.report.checklists import _STARD_AI_SITES, _with_sites, checklist_items

    item = {it["id"]: it for it in _with_sites(checklist_items("stard_ai"), results, _STARD_AI_SITES)}["15b"]
    assert item["covreport"].endswith("; internal-external cross-validation by site: each site held out in turn, "
                                      "with its pairs") and item["needs"] == "recipe"
    for row in (tripod["12c"], tripod["16"], stard["29"]):   # rendered as the checklist rows say
        assert row["filled"].split("; ")[0] in page
    table.assign(source="one hospital").to_csv(manifest, index=False)
    res = _run(manifest, scores, tmp_path / "one", "--validation", "leave-one-site-out")
    assert res.exit_code == 1
    assert res.output.replace("\n", " ").startswith(
        f"Error: {manifest}: --validation leave-one-site-out needs 2 or more sites in the --site column 'source'; "
        "it has 1")
