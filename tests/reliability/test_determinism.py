"""Reliability: two runs on the same inputs give byte-identical results.

``results.json`` may differ only in ``provenance.created`` (the time of the
run); the tables are byte-identical. Runs with the model through the cache
are covered by ``test_faults.py`` (a resumed run equals an uncached one).
"""

import json
import shutil

import pytest
from click.testing import CliRunner

from covreport.cli import main
from reliability_helpers import make_study, manifest_images, random_scores, strip_lines


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    manifest = make_study(root, n_patients=6, images_per_patient=3, seed=9)
    return manifest, random_scores(manifest_images(manifest), root / "scores.csv", seed=9)


def test_two_runs_are_byte_identical_but_for_the_time(study, tmp_path):
    manifest, scores = study
    out = tmp_path / "out"
    args = ["run", str(manifest), "--scores", str(scores), "--out", str(out), "--permutations", "25",
            "--seed", "3", "--no-pdf"]
    runs = []
    for k in range(2):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        runs.append(tmp_path / f"run{k}")
        shutil.move(str(out), str(runs[-1]))  # same --out both times: same command line
    first, second = ((r / "results.json").read_text(encoding="utf-8") for r in runs)
    a, b = json.loads(first), json.loads(second)
    assert a["prediction"]["nested"]["permutations"] == 25  # the seeded permutation test ran
    del a["provenance"]["created"], b["provenance"]["created"]
    assert a == b
    assert strip_lines(first, ["created"]) == strip_lines(second, ["created"])  # byte for byte
    tables = sorted(p.name for p in (runs[0] / "tables").glob("*.csv"))
    assert tables == sorted(p.name for p in (runs[1] / "tables").glob("*.csv")) and len(tables) >= 5
    for name in tables:
        assert (runs[0] / "tables" / name).read_bytes() == (runs[1] / "tables" / name).read_bytes(), name
    figures = sorted(p.name for p in (runs[0] / "figures").glob("*.svg"))
    for name in figures:  # matplotlib SVGs are written without date and with fixed ids
        assert (runs[0] / "figures" / name).read_bytes() == (runs[1] / "figures" / name).read_bytes(), name
