"""Reliability: rerunning as the test set grows, with inputs whose labels do not match.

A study is rerun for months: the manifest grows, the new run is compared
with the previous ``results.json`` (``--previous``), and validation scores
may come from elsewhere. Each case ends in a report or an ``Error:``, never
a traceback.
"""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from covreport.cli import main
from covreport.constants import CHEXPERT_LABELS
from reliability_helpers import LABELS, make_study, manifest_images, random_scores


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A 6-patient study, the same grown by 2 patients, and scores for all images."""
    root = tmp_path_factory.mktemp("grow")
    big = make_study(root, n_patients=8, images_per_patient=3, seed=12)
    lines = big.read_text(encoding="utf-8").splitlines()
    small = root / "manifest_small.csv"
    small.write_text("\n".join(lines[: 1 + 12]) + "\n", encoding="utf-8")  # 6 patients x 2 pairs
    scores = random_scores(manifest_images(big), root / "scores.csv", seed=12)
    return small, big, scores


def _run(manifest, scores, out, *extra):
    return CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(out),
                                     "--permutations", "0", "--bootstrap", "0", "--no-pdf", *extra])


def test_rerun_after_growth_compares_with_the_previous_results(grown, tmp_path):
    small, big, scores = grown
    first = _run(small, scores, tmp_path / "first")
    assert first.exit_code == 0, first.output
    second = _run(big, scores, tmp_path / "second", "--previous", str(tmp_path / "first" / "results.json"))
    assert second.exit_code == 0, second.output
    results = json.loads((tmp_path / "second" / "results.json").read_text(encoding="utf-8"))
    assert results["flow"]["pairs_analysed"] == 16
    changes = results["revalidation"]["pair_changes"]
    assert changes["pairs_added"] == 4 and changes["pairs_removed"] == 0


def _validation_files(folder, score_labels):
    rng = np.random.default_rng(0)
    paths = [f"CheXpert-v1.0-small/valid/patient{i:05d}/study1/view1_frontal.jpg" for i in range(40)]
    truth = pd.DataFrame({"Path": paths, "Sex": "Male", "Age": 50, "Frontal/Lateral": "Frontal", "AP/PA": "AP"})
    for lab in CHEXPERT_LABELS:
        truth[lab] = rng.integers(0, 2, len(paths)).astype(float)
    truth.to_csv(folder / "valid.csv", index=False)
    vscores = pd.DataFrame({"image": paths})
    for lab in score_labels:
        vscores[lab] = rng.random(len(paths))
    vscores.to_csv(folder / "vscores.csv", index=False)
    return folder / "valid.csv", folder / "vscores.csv"


@pytest.mark.parametrize("score_labels", [LABELS[:-1], ("Other",)], ids=["one-missing", "none-shared"])
def test_validation_scores_without_the_analysis_labels_are_a_clear_error(grown, tmp_path, score_labels):
    small, _, scores = grown
    valid, vscores = _validation_files(tmp_path, score_labels)
    res = _run(small, scores, tmp_path / "out", "--validation-csv", str(valid), "--validation-scores", str(vscores))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    assert res.output[res.output.find("Error: "):].startswith("Error: ") and str(vscores) in res.output
    assert not (tmp_path / "out").exists()


def test_validation_scores_with_the_analysis_labels_give_aucs(grown, tmp_path):
    small, _, scores = grown
    valid, vscores = _validation_files(tmp_path, LABELS)
    res = _run(small, scores, tmp_path / "out", "--validation-csv", str(valid), "--validation-scores", str(vscores))
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert [r["label"] for r in results["validation_auc"]] == list(LABELS)
