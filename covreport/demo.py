"""``covreport demo``: the whole study on a synthetic phantom, end to end on a CPU.

Generates the phantom study (:mod:`covreport.phantom`), trains the DenseNet121
on its CheXpert-layout set with settings sized for a laptop CPU, then runs
exactly the pipeline of ``covreport run`` with the trained weights. A second
run reuses the study, the weights and the score cache.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from covreport import progress as _progress

log = logging.getLogger(__name__)

#: Where ``covreport demo`` works by default (relative to the current folder).
DEFAULT_OUT = "covreport-demo"


def weights_path(out=DEFAULT_OUT, *, quick=False):
    """Where the demo keeps (or will keep) its trained phantom weights under ``out``."""
    return Path(out) / "model" / f"densenet121-phantom{'-quick' if quick else ''}.pt"

#: The demo's study.toml: the phantom study described honestly (STARD items that do not apply say why).
DEMO_STUDY_TOML = Path(__file__).with_name("demo_study.toml")


#: The clinical predictors of the demo's added-value models: the phantom's informative ``crp`` and
#: uninformative ``temperature`` (:data:`covreport.phantom.CLINICAL`).
DEMO_PREDICTORS = "crp,temperature"

#: ``covreport demo --quick``: a first look on 2 cores. A smaller phantom (640 training images),
#: one epoch of batches of 16, 50 permutations and 20 bootstrap resamples (each resample of the
#: primary protocol refits its tuning: the cost of the run), the HTML report without its PDF (whose
#: layout is the report's slowest part); kept apart from the full demo (``study-quick``,
#: ``report-quick``, its own weights).
QUICK = {"study": {"image_size": 64, "n_train": 640, "n_valid": 150, "n_patients": 40},
         "training": {"image_size": 64, "epochs": 1, "batch_size": 16, "lr": 1e-3, "init": "none"},
         "permutations": 50, "bootstrap": 20, "pdf": False}


@dataclass
class DemoResult:
    report: Path
    command: str
    trained: bool
    seconds: dict
    verify_command: str = ""


def shown_path(path):
    """``path`` relative to the current folder when it lies below it (as a command shows it), else absolute."""
    p = Path(os.path.abspath(path))
    return Path(os.path.relpath(p)) if p.is_relative_to(Path.cwd()) else p


def verify_command(report, cache):
    """The ``covreport verify`` command that re-derives the demo's results: its folder and its score cache."""
    return shlex.join(["covreport", "verify", str(shown_path(report)), "--cache", str(shown_path(cache))])


def _study_toml(out):
    """The demo's study.toml inside ``out`` (copied there once, so that the run and its provenance name it
    there rather than inside the installed package); the package's own file if ``out`` holds another one."""
    path = out / "study.toml"
    text = DEMO_STUDY_TOML.read_bytes()
    if not path.exists():
        from covreport._io import atomic_write_bytes

        atomic_write_bytes(path, text)
    return path if path.is_file() and path.read_bytes() == text else DEMO_STUDY_TOML


def run_demo(out=DEFAULT_OUT, *, seed=0, permutations=None, progress=True, quick=False):
    """Generate, train, score, test and report the phantom study under ``out``.

    Layout: ``out/study`` (phantom data), ``out/model/densenet121-phantom.pt``
    (weights), ``out/cache.sqlite`` (score cache), ``out/report`` (the report
    of ``covreport run``, replaced at each demo run). ``quick`` (:data:`QUICK`)
    uses ``study-quick``, ``densenet121-phantom-quick.pt`` and ``report-quick``
    instead: a smaller phantom, one epoch, fewer permutations and resamples, and
    the HTML report without its PDF.
    """
    from covreport.phantom import CHEXPERT_DIRNAME, DEMO_STUDY, DEMO_TRAINING, PAIRS_DIRNAME, make_study
    from covreport.pipeline import RunOptions, run
    from covreport.train import TrainConfig, train

    study_cfg, train_cfg = (QUICK["study"], QUICK["training"]) if quick else (DEMO_STUDY, DEMO_TRAINING)
    suffix = "-quick" if quick else ""
    permutations = (QUICK["permutations"] if quick else 1000) if permutations is None else permutations
    bootstrap = QUICK["bootstrap"] if quick else 2000
    pdf = QUICK["pdf"] if quick else True
    out = Path(out)
    seconds = {}
    t0 = time.perf_counter()
    study_dir = out / f"study{suffix}"
    if not (study_dir / "README.txt").exists():  # the phantom is moved into place whole
        if study_dir.exists() and (not study_dir.is_dir() or any(study_dir.iterdir())):
            from covreport.errors import CovreportError

            raise CovreportError(f"{study_dir} exists and is not a phantom study of covreport demo (it has no "
                                 "README.txt); the demo never replaces it: choose another --out or move it away")
        with _progress.stage(f"Generating the synthetic phantom study in {study_dir} "
                             f"({study_cfg['n_train']:,} training and {study_cfg['n_valid']} validation "
                             f"images, pairs of {study_cfg['n_patients']} patients)"):
            make_study(study_dir, seed=seed, overwrite=True, **study_cfg)
    else:
        _progress.say(f"Reusing the phantom study in {study_dir}")
    chex = study_dir / CHEXPERT_DIRNAME
    manifest, valid_csv, train_csv = study_dir / PAIRS_DIRNAME / "manifest.csv", chex / "valid.csv", chex / "train.csv"
    seconds["phantom"] = time.perf_counter() - t0
    predictors = DEMO_PREDICTORS
    with open(manifest, encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    if not set(DEMO_PREDICTORS.split(",")) <= set(header):   # a phantom written before its clinical columns
        predictors = ""
        _progress.say(f"The phantom study in {study_dir} predates its clinical columns ({DEMO_PREDICTORS}): the "
                      f"added value of the images is left out; remove {study_dir} to regenerate it with them")

    t0 = time.perf_counter()
    weights = weights_path(out, quick=quick)
    config = TrainConfig(**train_cfg, seed=seed, device="cpu")
    trained = not weights.exists()
    if trained:
        weights.parent.mkdir(parents=True, exist_ok=True)
        with _progress.stage(f"Training the DenseNet121 on the phantom ({study_cfg['n_train']:,} images of "
                             f"{config.image_size} px, {config.epochs} epoch(s); the time left is said once "
                             f"the first batches are measured) into {weights}"):
            train(chex, weights, config, progress=progress)
    else:
        _progress.say(f"Reusing the trained weights {weights}")
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = out / f"report{suffix}"
    cache = out / "cache.sqlite"
    study_toml = _study_toml(out)
    args = ["covreport", "run", str(shown_path(manifest)), "--weights", str(shown_path(weights)),
            "--validation-csv", str(shown_path(valid_csv)), "--reference-csv", str(shown_path(train_csv)),
            "--cache", str(shown_path(cache)), "--study", str(shown_path(study_toml)),
            "--permutations", str(permutations), "--bootstrap", str(bootstrap), "--seed", str(seed),
            *(["--predictors", predictors] if predictors else []), *([] if pdf else ["--no-pdf"]),
            "--out", str(shown_path(report)), "--force"]
    command = shlex.join(args)
    opts = RunOptions(manifest=manifest, out=report, weights=str(weights), validation_csv=valid_csv,
                      reference_csv=train_csv, cache=cache, permutations=permutations, bootstrap=bootstrap,
                      predictors=predictors, pdf=pdf,
                      study=study_toml,
                      seed=seed, force=True, synthetic=True, command=command,
                      extra_provenance={"demo": {"seed": seed, "quick": quick, "phantom": study_cfg,
                                                 "training": config.to_dict()}})
    _progress.say(f"Running the study: {command}")
    run(opts)
    seconds["run"] = time.perf_counter() - t0
    return DemoResult(report=report, command=command, trained=trained, seconds=seconds,
                      verify_command=verify_command(report, cache))
