"""Messages of the commands a new user tries first (issue 14): what they print and where."""

import json

from click.testing import CliRunner

from covreport.cli import main


def test_diagnostic_json_carries_the_counts_prevalence_and_alpha():
    result = CliRunner().invoke(main, ["diagnostic", "--tp", "40", "--fp", "3", "--fn", "4", "--tn", "5",
                                       "--alpha", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    given = out.pop("input")
    assert {k: given[k] for k in ("tp", "fp", "fn", "tn", "n")} == {"tp": 40, "fp": 3, "fn": 4, "tn": 5, "n": 52}
    assert given["prevalence"] == 44 / 52 and given["prevalence_source"] == "table: (TP+FN)/N"
    assert given["alpha"] == 0.1 and abs(given["confidence_level"] - 0.9) < 1e-12
    # accuracy = (TP + TN) / N by hand
    assert abs(out["accuracy"]["estimate"] - 45 / 52) < 1e-12
    assert set(out) == {"accuracy", "sensitivity", "specificity", "ppv", "npv", "lr_positive", "lr_negative"}


def test_diagnostic_json_names_a_given_prevalence():
    result = CliRunner().invoke(main, ["diagnostic", "--tp", "40", "--fp", "3", "--fn", "4", "--tn", "5",
                                       "--prevalence", "0.2", "--json"])
    given = json.loads(result.stdout)["input"]
    assert (given["prevalence"], given["prevalence_source"]) == (0.2, "given (--prevalence)")
    assert given["alpha"] == 0.05


def test_run_without_weights_lists_every_way_to_get_scores(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COVREPORT_MODEL_DIR", raising=False)
    manifest = str(Path(__file__).resolve().parents[1] / "data_manifests" / "example" / "manifest.csv")
    result = CliRunner().invoke(main, ["run", manifest, "--out", "out"])
    assert result.exit_code == 1
    err = result.stderr
    assert err.startswith(f"Error: no --weights given and no checkpoint (.pt) in {tmp_path / 'model'}.")
    for text in ("covreport train --chexpert-root DIR --out model/densenet121.pt", "COVREPORT_MODEL_DIR",
                 "--weights FILE", "--scores SCORES.csv", "reviewer mode"):
        assert text in err, text
    assert "covreport demo" not in err
    assert not (tmp_path / "out").exists()

    # once the demo has trained, its weights are named (and not used on their own)
    from covreport.demo import weights_path

    weights_path().parent.mkdir(parents=True)
    weights_path().write_bytes(b"")
    result = CliRunner().invoke(main, ["run", manifest, "--out", "out"])
    assert result.exit_code == 1
    assert "The weights `covreport demo` trained are at covreport-demo/model/densenet121-phantom.pt" \
        in result.stderr


# --- progress on stderr, results on stdout, --quiet ------------------------------------


def _example_with_scores(tmp_path):
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from covreport.constants import DEFAULT_LABELS, feature_columns

    manifest = Path(__file__).resolve().parents[1] / "data_manifests" / "example" / "manifest.csv"
    m = pd.read_csv(manifest)
    images = sorted(set(m["first_image"]) | set(m["second_image"]))
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"image": images})
    for lab in DEFAULT_LABELS:
        df[lab] = rng.random(len(images))
    feats = pd.DataFrame(rng.random((len(images), 1024)), columns=feature_columns())
    scores = tmp_path / "scores.csv"
    pd.concat([df, feats], axis=1).to_csv(scores, index=False)
    return str(manifest), str(scores)


def _run_args(tmp_path, name):
    manifest, scores = _example_with_scores(tmp_path)
    return ["run", manifest, "--scores", scores, "--permutations", "20", "--bootstrap", "0", "--no-pdf",
            "--out", str(tmp_path / name)]  # (no refitted bootstrap: the messages are the point, not its minutes)


def test_run_says_each_stage_on_stderr_and_only_the_result_on_stdout(tmp_path):
    import re

    result = CliRunner().invoke(main, _run_args(tmp_path, "out"))
    assert result.exit_code == 0, result.output
    # stdout: the headline of the folder (covreport/summary.py), ending with the paths of the outputs
    from covreport.summary import format_summary, summarise

    assert result.stdout == format_summary(summarise(tmp_path / "out"))
    assert result.stdout.splitlines()[-3:] == [f"Report      {tmp_path / 'out' / 'report.html'}",
                                               "PDF         none in the folder (the run had --no-pdf?)",
                                               f"Results     {tmp_path / 'out' / 'results.json'}"]
    err = result.stderr.splitlines()
    for stage in (r"Reading manifest \S+manifest\.csv", "Statistics on 6 pairs",
                  f"Writing report to {re.escape(str(tmp_path / 'out'))}"):
        starts = [i for i, line in enumerate(err) if re.fullmatch(f"{stage} \\.\\.\\.", line)]
        ends = [i for i, line in enumerate(err) if re.fullmatch(f"{stage}: done in \\d+\\.\\d s", line)]
        assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], (stage, err)


def test_quiet_silences_progress_as_group_or_command_option(tmp_path):
    from covreport import progress

    for i, args in enumerate((["--quiet", *_run_args(tmp_path, "q1")], [*_run_args(tmp_path, "q2"), "-q"])):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert result.stderr == "", (i, result.stderr)
        assert result.stdout.startswith("Analysed    6 pairs of 3 patients")
    # the next command without --quiet speaks again
    result = CliRunner().invoke(main, _run_args(tmp_path, "loud"))
    assert "Statistics on 6 pairs ..." in result.stderr
    assert not progress.is_quiet()


def test_scoring_says_how_many_images_come_from_the_cache(tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from covreport.cache import ScoreCache
    from covreport.images import Preprocessing
    from covreport.model import build_model, load_checkpoint, save_checkpoint
    from covreport.scoring import score_images

    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    save_checkpoint(weights, build_model(("Edema",)), labels=("Edema",), preprocessing=Preprocessing(size=32))
    loaded = load_checkpoint(weights)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(p)
        paths.append(p)
    cache = ScoreCache(tmp_path / "c.sqlite")
    score_images(paths[:2], loaded, cache=cache, num_workers=0)
    capsys.readouterr()
    score_images(paths, loaded, cache=cache, num_workers=0)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Scoring 3 images (2 from the cache) ..."
    assert err[-1].startswith("Scoring 3 images (2 from the cache): done in ")
    cache.close()
