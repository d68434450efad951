"""What a careless or unlucky user hit in the review of issues 11-15: each is refused or handled."""

import numpy as np
import pandas as pd
from click.testing import CliRunner

from covreport.cli import main
from covreport.constants import DEFAULT_LABELS, feature_columns


def _study(folder, patients=("P1", "P2", "P3", "P4"), extra_column=None):
    rows, images = [], []
    for i, p in enumerate(patients):
        for k, outcome in enumerate(("Worse", "Improved", "Stable")):
            first, second = f"img/{p}_{k}.png", f"img/{p}_{k + 1}.png"
            rows.append({"patient_id": p, "first_image": first, "second_image": second, "outcome": outcome})
            images += [first, second]
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    rng = np.random.default_rng(0)
    images = sorted(set(images))
    scores = pd.DataFrame({"image": images})
    for lab in DEFAULT_LABELS:
        scores[lab] = rng.random(len(images))
    if extra_column:
        scores[extra_column] = rng.random(len(images))
    feats = pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())
    pd.concat([scores, feats], axis=1).to_csv(folder / "scores.csv", index=False)


def _run(folder, *extra):
    return CliRunner().invoke(main, ["-q", "run", str(folder / "manifest.csv"), "--scores", str(folder / "scores.csv"),
                                     "--out", str(folder / "out"), "--permutations", "10", "--bootstrap", "10",
                                     "--no-pdf", *extra])


def test_pairs_never_replaces_an_existing_manifest_without_force(tmp_path):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("pair_id,patient_id,first_image,second_image,outcome\nX-1,X,x1.png,x2.png,Worse\n")
    export = tmp_path / "export.csv"
    export.write_text("patient_id,image,date\nA,a1.png,2020-01-01\nA,a2.png,2020-01-02\n")
    before = labelled.read_bytes()
    res = CliRunner().invoke(main, ["pairs", str(export), "--out", str(labelled)])
    assert res.exit_code == 1
    assert res.output.strip().endswith(f"{labelled} exists; choose another --out or add --force to replace it")
    assert labelled.read_bytes() == before
    # --update into itself is the documented in-place use; --force replaces on purpose.
    res = CliRunner().invoke(main, ["pairs", str(export), "--update", str(labelled), "--out", str(labelled)])
    assert res.exit_code == 0, res.output
    assert "X-1,X,x1.png,x2.png,Worse" in labelled.read_text()
    assert CliRunner().invoke(main, ["pairs", str(export), "--out", str(labelled), "--force"]).exit_code == 0


def test_a_scores_column_named_like_a_manifest_column_is_refused(tmp_path):
    _study(tmp_path, extra_column="outcome")
    res = _run(tmp_path)
    assert res.exit_code == 1
    assert ("column(s) 'outcome' would be read as labels but are manifest columns" in
            res.output.strip().splitlines()[-1])
    assert not (tmp_path / "out").exists()


def test_one_patient_with_every_outcome_gives_a_report_that_says_why(tmp_path):
    _study(tmp_path, patients=("P1",))
    res = _run(tmp_path)
    assert res.exit_code == 0, res.output
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "The prediction analysis was not run: not computed: leave-one-patient-out needs" in html


def test_a_negative_seed_is_a_usage_error_before_any_work(tmp_path):
    _study(tmp_path)
    res = _run(tmp_path, "--seed", "-1")
    assert res.exit_code == 2 and "Invalid value for '--seed'" in res.output
    assert not (tmp_path / "out").exists()


def test_previous_with_a_huge_integer_is_refused(tmp_path):
    from covreport.errors import ReportError
    from covreport.revalidation import load_results

    big = tmp_path / "big.json"
    big.write_text('{"provenance": {}, "x": ' + "1" * 5000 + "}")
    try:
        load_results(big)
    except ReportError as exc:
        assert str(exc).startswith(f"{big}: not a results.json covreport wrote (")
    else:
        raise AssertionError("accepted")


def test_an_existing_folder_of_the_users_never_suggests_force(tmp_path):
    _study(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    res = _run(tmp_path)
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 1 and "was not written by covreport" in last and "add --force" not in last
    assert (tmp_path / "out" / "mine.txt").read_text() == "the user's"
