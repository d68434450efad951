"""covreport run in reviewer mode (--scores): outputs, exclusions, determinism."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.constants import DEFAULT_LABELS, feature_columns
from covreport.pipeline import RunOptions, run

EXAMPLE = Path(__file__).resolve().parent.parent / "data_manifests" / "example" / "manifest.csv"


def _scores(path, images, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"image": images})
    for lab in DEFAULT_LABELS:
        df[lab] = rng.random(len(images))
    feats = pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())
    pd.concat([df, feats], axis=1).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    m = pd.read_csv(EXAMPLE)
    images = sorted(set(m["first_image"]) | set(m["second_image"]))
    return tmp, _scores(tmp / "scores.csv", images), images


def _run(tmp, scores, name, **kw):
    opts = RunOptions(manifest=EXAMPLE, out=tmp / name, scores=scores, permutations=20, pdf=False, **kw)
    return run(opts)


def test_run_writes_results_tables_and_report(example):
    tmp, scores, _ = example
    out = _run(tmp, scores, "a")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results)[:6] == ["covreport_version", "provenance", "study", "labels", "flow", "pairs"]
    assert results["flow"]["pairs_analysed"] == 6
    assert results["flow"]["by_outcome"] == {"Worse": {"pairs": 3, "patients": 3},
                                             "Stable": {"pairs": 1, "patients": 1},
                                             "Improved": {"pairs": 2, "patients": 2}}
    # The change of a label is second minus first, per pair (independent recomputation).
    s = pd.read_csv(scores).set_index("image")
    for rec in results["pairs"]:
        want = s.loc[rec["second_image"], "Edema"] - s.loc[rec["first_image"], "Edema"]
        assert rec["Edema change"] == pytest.approx(want)
    for block in ("nested", "global", "reversed"):
        assert set(results["prediction"][block]["metrics"]) == {
            "accuracy", "sensitivity", "specificity", "ppv", "npv", "lr_positive", "lr_negative",
            "balanced_accuracy"}
    assert all(r["method"] for r in results["group_differences"])
    for name in ("table1.csv", "group_differences.csv", "pairs.csv", "prediction_nested_metrics.csv"):
        assert (out / "tables" / name).is_file()
    assert (out / "report.html").is_file()
    assert not list(tmp.glob(".a.tmp-*"))


def test_same_inputs_give_the_same_results_json(example):
    tmp, scores, _ = example
    texts = []
    for name in ("d1", "d2"):
        r = json.loads((_run(tmp, scores, name) / "results.json").read_text(encoding="utf-8"))
        r["provenance"].pop("created")
        r["provenance"].pop("command")
        texts.append(json.dumps(r, sort_keys=True))
    assert texts[0] == texts[1]


def test_images_without_scores_become_exclusions(example):
    tmp, _, images = example
    partial = _scores(tmp / "partial.csv", [i for i in images if i != "images/P03_3.png"])
    results = json.loads((_run(tmp, partial, "p") / "results.json").read_text(encoding="utf-8"))
    flow = results["flow"]
    assert flow["pairs_analysed"] == 5
    assert flow["exclusions"][0]["pair_id"] == "pair06"
    assert flow["exclusions"][0]["stage"] == "index test not done"
    assert flow["exclusion_counts"] == [{"stage": "index test not done",
                                         "reason": "second image: no score for this image in the scores file",
                                         "pairs": 1}]


def test_strict_refuses_pairs_without_scores(example):
    tmp, _, images = example
    partial = _scores(tmp / "partial2.csv", [i for i in images if i != "images/P03_3.png"])
    result = CliRunner().invoke(main, ["run", str(EXAMPLE), "--scores", str(partial), "--strict",
                                       "--out", str(tmp / "strict"), "--no-pdf", "--permutations", "0"])
    assert result.exit_code == 1
    # stage messages ("Reading manifest ...") may come first on stderr; the error ends it
    error = result.stderr[result.stderr.index("Error: "):]
    assert error.startswith("Error: 1 pair(s) have no score (--strict):\npair pair06: second image:")
    assert not (tmp / "strict").exists()


def test_force_replaces_whole_and_previous_is_compared(example):
    tmp, scores, _ = example
    first = _run(tmp, scores, "f")
    again = _run(tmp, scores, "f", force=True, previous=(first / "results.json",))
    results = json.loads((again / "results.json").read_text(encoding="utf-8"))
    assert results["revalidation"]["added"]
    assert (again / "tables" / "revalidation_headline.csv").is_file()
    assert not list(tmp.glob(".f.old-*"))


def test_reviewer_mode_needs_only_the_two_csv_files(tmp_path, monkeypatch):
    """Issue 11.1: a reviewer holds manifest.csv and scores.csv, never the images."""
    import covreport.manifest

    shutil.copy(EXAMPLE, tmp_path / "manifest.csv")
    m = pd.read_csv(EXAMPLE)
    images = sorted(set(m["first_image"]) | set(m["second_image"]))
    _scores(tmp_path / "scores.csv", [i for i in images if i != "images/P03_3.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "scores.csv"]

    def no_lookup(path):
        raise AssertionError(f"reviewer mode looked up the image {path}")

    monkeypatch.setattr(covreport.manifest, "probe_image", no_lookup)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["validate", "manifest.csv", "--scores", "scores.csv"])
    assert res.exit_code == 0, res.output
    assert "not looked up (reviewer mode" in res.output
    assert "5 of 6 pairs can be analysed" in res.output
    assert ("pair pair06 (patient P03): index test not done: second image: "
            "no score for this image in the scores file (images/P03_3.png)") in res.output
    res = runner.invoke(main, ["validate", "manifest.csv", "--scores", "scores.csv", "--strict"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: 1 pair(s) have no score (--strict):\n"
                                 "pair pair06: second image: no score")

    res = runner.invoke(main, ["run", "manifest.csv", "--scores", "scores.csv", "--out", "out",
                               "--permutations", "20", "--no-pdf"])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["flow"]["pairs_analysed"] == 5
    assert [e["pair_id"] for e in results["flow"]["exclusions"]] == ["pair06"]
    # Provenance names inputs relative to the manifest's folder, never by an absolute path.
    assert results["provenance"]["inputs"]["manifest"]["path"] == "manifest.csv"
    assert results["provenance"]["inputs"]["scores"]["path"] == "scores.csv"
    assert str(tmp_path) not in (tmp_path / "out" / "results.json").read_text(encoding="utf-8")
    assert results["provenance"]["options"]["permutations"] == 20


def test_weights_mode_still_checks_images(tmp_path):
    """Without --scores the images are probed: a missing file is an exclusion with its reason."""
    from covreport.manifest import read_manifest

    shutil.copy(EXAMPLE, tmp_path / "manifest.csv")
    m = read_manifest(tmp_path / "manifest.csv")
    assert len(m.exclusions) == 6
    assert set(m.exclusions["stage"]) == {"index test not done"}
    assert all("file not found" in r for r in m.exclusions["reason"])


def test_unscored_pair_without_outcome_is_at_the_index_test_stage_in_both_modes(tmp_path):
    """STARD order: the index test before the reference standard, whether images or scores are missing."""
    from covreport.manifest import read_manifest

    text = ("patient_id,first_image,second_image,outcome\n"
            "P1,a.png,b.png,\n"          # no outcome, and b.png has neither a file nor a score
            "P1,b.png,c.png,Worse\n")
    (tmp_path / "m.csv").write_text(text)
    weights_mode = read_manifest(tmp_path / "m.csv")  # no image files at all
    reviewer = read_manifest(tmp_path / "m.csv", check_images=False).exclude_unscored(["a.png", "c.png"])
    for m in (weights_mode, reviewer):
        first = m.exclusions[m.exclusions["pair_id"] == m.pairs["pair_id"][0]]
        assert list(first["stage"]) == ["index test not done"]
