"""Issue 21.1: `covreport demo --quick` keeps the known answer, and training says its time from measured speed."""

import json

import pytest
from click.testing import CliRunner

from covreport.cli import main


@pytest.mark.slow
def test_quick_demo_recovers_the_known_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("COVREPORT_CACHE_DIR", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["-q", "demo", "--quick", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    report = tmp_path / "d" / "report-quick"
    # the HTML report without its PDF (the full demo writes both), and the summary says where it is
    assert (report / "report.html").is_file() and not (report / "report.pdf").exists()
    assert f"Report      {report / 'report.html'}" in res.output
    assert "The quick demo writes the HTML report only; `covreport demo` writes its PDF too." in res.output
    assert "--no-pdf --out" in res.output   # the "Regenerate with" command repeats it
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert results["provenance"]["demo"]["quick"] is True
    assert results["provenance"]["options"]["permutations"] == 50
    assert results["provenance"]["options"]["bootstrap"] == 20
    aucs = {r["label"]: r["auc"] for r in results["validation_auc"]}
    # one epoch on 640 images: the two labels the phantom varies are learnt well above chance (measured
    # 0.85-0.93; Lung Opacity 0.8499 once on a loaded machine), the full demo's bar is 0.85 after 2 epochs
    assert aucs["Consolidation"] >= 0.80 and aucs["Lung Opacity"] >= 0.80, aucs
    rows = {(r["contrast"], r["label"]): r for r in results["group_differences"]}
    for label in ("Consolidation", "Lung Opacity"):  # the phantom's Worse pairs gain severity
        row = rows[("Worse vs Improved", label)]
        assert row["p"] < 0.05 and row["median1"] > row["median2"], row
    assert not (tmp_path / "d" / "report").exists()  # the full demo's folders are left alone


def test_training_eta_comes_from_the_measured_batches(monkeypatch):
    from covreport import train

    said, clock = [], iter([0.0, 10.0, 15.0, 100.0])  # read at: epoch start, batch 1, batch 6, epoch end
    monkeypatch.setattr(train._progress, "say", said.append)
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    eta = train.TrainingEta(batches_per_epoch=20, start_epoch=0, epochs=2, valid_fraction=0.0)
    eta.epoch_start(0)                      # t = 0
    for _ in range(6):                      # first batch at t = 10 (warm-up), then 1 s per batch
        eta.batch_done()
    # 1.00 s per batch measured over batches 2-6; 40 batches in all, 34 left
    assert said == ["Training speed: 1.00 s per batch over batches 2-6; about 34 s left (40 batches in 2 epoch(s))"]
    eta.epoch_done(0)                       # t = 100: the epoch took 100 s, one more to go
    assert said[-1] == "Epoch 1 of 2 took 1.7 minutes; about 1.7 minutes left"
