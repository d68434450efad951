"""The ``covreport`` command line: parse options, call the library, map errors.

Every command is a thin layer over a library function. A
:class:`~covreport.errors.CovreportError` becomes ``Error: <message>`` on
stderr with exit status 1; anything else is a bug and keeps its traceback.
Heavy modules (torch, matplotlib) are imported inside the commands so that
``covreport --help`` stays fast.
"""

import json
import sys
from pathlib import Path

import click

from covreport import __version__, _threads
from covreport._io import _on_sigterm
from covreport.errors import CovreportError
from covreport.inputs import safe_text

# The command line is the application: before torch (imported lazily by the
# commands) starts its threads, OpenMP threads are made to sleep instead of
# spinning while they wait, and no more threads than the cores this process
# may use. Variables the user set are kept (issue 14.9; covreport/_threads.py).
# A library caller who wants the same calls _threads.prepare_environment()
# before importing torch; importing covreport itself changes nothing.
_threads.prepare_environment()


class _Group(click.Group):
    def invoke(self, ctx):
        import signal
        import threading

        # SIGTERM ends a command like Ctrl-C does: cleanup (temporary folders, helper
        # processes) runs on the way out; exit status 128 + 15.
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().invoke(ctx)
        except CovreportError as exc:
            click.echo(f"Error: {safe_text(str(exc), limit=20000)}", err=True)
            ctx.exit(1)
        except (MemoryError, RecursionError, OverflowError, ZeroDivisionError) as exc:
            # Reachable from a hostile input (a huge or deeply nested file, an absurd number): an
            # error with its true name, never a traceback (issue 18.6).
            click.echo(f"Error: {_resource_message(exc, ctx)}", err=True)
            ctx.exit(1)
        finally:
            from covreport import parallel

            parallel.shutdown()                   # no worker process outlives the command
            if old is not None:
                signal.signal(signal.SIGTERM, old)


def _resource_message(exc, ctx):
    command = ctx.invoked_subcommand or "covreport"
    if isinstance(exc, MemoryError):
        what = "ran out of memory"
        fix = "an input is larger than this machine can hold, or malformed: check the files given"
    elif isinstance(exc, RecursionError):
        what = "met data nested too deeply to process"
        fix = "an input (JSON, TOML or template) is nested too deeply: check the files given"
    else:
        what = f"met a number it cannot compute with ({type(exc).__name__}: {safe_text(str(exc))})"
        fix = "an input holds a value out of any sensible range: check the files and options given"
    return f"covreport {command} {what} -- {fix}"


def _set_quiet(ctx, param, value):
    from covreport import progress

    progress.set_quiet(bool(value))  # also resets it, for a caller invoking several commands
    return value


def _quiet_too(ctx, param, value):
    if value:
        from covreport import progress

        progress.set_quiet(True)
    return value


#: ``--quiet`` of each long command (the same as ``covreport --quiet CMD``).
quiet_option = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet_too,
                            help="No stage messages or progress bars on stderr (as `covreport --quiet`).")


def parallel_options(command):
    """--jobs and --dask-scheduler: where the permutation tests and the refitting bootstrap run (no result changes)."""
    command = click.option(
        "--dask-scheduler", metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS", show_envvar=True,
        help="Run the permutation tests and the refitting bootstrap on the Dask cluster at ADDRESS "
             "(tcp://host:8786; pip install 'covreport[dask]'); results are the same as on one core.")(command)
    return click.option(
        "--jobs", type=click.IntRange(min=1), default=None,
        help="Worker processes for the permutation tests and the refitting bootstrap (default: the cores this "
             "process may use; 1: no other process); results are the same for any number.")(command)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="covreport")
@click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet, is_eager=True,
              help="No stage messages or progress bars on stderr; errors and results still print.")
def main():
    """Validate a chest X-ray deep-learning study and report it along STARD 2015.

    Data flow: manifest -> images -> model scores (cached) -> statistics -> report.
    Long steps say on stderr what they are doing, with their size and time;
    stdout carries only results. --quiet (here or after a command) silences them.
    """


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, allow_nan=False))


# --- validate (manifest) ---------------------------------------------------

_VALIDATE_LIST_LIMIT = 20


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON (pairs, patients, outcomes, images, exclusions, warnings).")
@click.option("--strict", is_flag=True,
              help="Treat missing or unreadable images and empty outcomes as errors, not exclusions.")
@click.option("--no-images", is_flag=True,
              help="Do not open the image files (only the manifest itself is checked).")
@click.option("--scores", type=click.Path(dir_okay=False, path_type=str),
              help="Check the manifest against this scores file (reviewer mode): a pair can be analysed "
                   "when both its images have a row in it. No image file is opened or looked up.")
@quiet_option
def validate(manifest, as_json, strict, no_images, scores):
    """Check a pair manifest and summarise it; nothing is written.

    MANIFEST is a CSV (UTF-8; comma-, semicolon- or tab-separated) or an .xlsx
    workbook with one row per pair of CXRs and the columns patient_id,
    first_image, second_image, outcome (Worse/Stable/Improved); see
    data_manifests/README.md. Every problem is listed at once with its line,
    column, value and fix, and the exit status is 1. Missing or unreadable
    images and empty outcomes are exclusions (exit 0) unless --strict. With --scores, as in
    `covreport run --scores`, the images are not looked up and a pair
    whose images lack a score is the exclusion. When no pair is left to
    analyse the exit status is 1; each analysis the pairs left are too few
    for (a group comparison needs 2 pairs per group; the prediction needs
    Worse and Improved pairs of 2 patients) is listed as one that cannot run.
    """
    from covreport.analysable import manifest_analyses
    from covreport.manifest import read_manifest

    if scores is not None:
        from covreport.scores_file import read_scores

        m = read_manifest(manifest, strict=strict, check_images=False)
        m = m.exclude_unscored(read_scores(scores, require_features=True)["image"], strict=strict)
    else:
        m = read_manifest(manifest, strict=strict, check_images=not no_images)
    summary = m.summary()
    if scores is not None:
        summary["scores"] = scores
    n_analysable, analyses = manifest_analyses(m)
    summary["analyses"] = analyses
    blocked = [a for a in analyses if not a["can_run"]]
    if as_json:
        _echo_json(summary)
        if not n_analysable:
            raise _nothing_to_analyse(summary)
        return
    images = summary["images"]
    outcomes = summary["pairs_per_outcome"]
    per_outcome = ", ".join(f"{k} {v}" for k, v in outcomes.items() if k != "empty" or v)
    if images["checked"]:
        image_line = (f"{images['total']} files: {images['found']} found, "
                      f"{images['missing']} missing, {images['unreadable']} unreadable")
    elif scores is not None:
        image_line = f"{images['total']} files, not looked up (reviewer mode: index-test results from {scores})"
    else:
        image_line = f"{images['total']} files, not checked (--no-images)"
    click.echo(f"Manifest    {manifest}")
    click.echo(f"SHA-256     {summary['sha256']}")
    patients = summary["patients"]
    click.echo(f"Pairs       {summary['pairs']} ({patients} patient{'' if patients == 1 else 's'})")
    click.echo(f"Outcomes    {per_outcome}")
    click.echo(f"Images      {image_line}")
    excluded = summary["exclusions"]
    click.echo(f"Exclusions  {len(excluded) or 'none'}")
    for rec in excluded[:_VALIDATE_LIST_LIMIT]:
        click.echo(f"  pair {rec['pair_id']} (patient {rec['patient_id']}): {rec['stage']}: {rec['reason']}")
    if len(excluded) > _VALIDATE_LIST_LIMIT:
        click.echo(f"  ... and {len(excluded) - _VALIDATE_LIST_LIMIT} more (see --json)")
    click.echo(f"Warnings    {len(summary['warnings']) or 'none'}")
    for text in summary["warnings"]:
        click.echo(f"  {text}")
    if n_analysable:
        click.echo(f"Analyses    {len(analyses) - len(blocked)} of {len(analyses)} can run")
        for rec in blocked:
            click.echo(f"  cannot run: {rec['analysis']}: {rec['reason']}")
    if not n_analysable:
        raise _nothing_to_analyse(summary)
    if len(blocked) == len(analyses):
        click.echo(f"Warning: {n_analysable} of {summary['pairs']} pairs can be analysed, but none of the "
                   f"{len(analyses)} analyses can run (listed above); the report would hold only the flow "
                   "diagram and Table 1.")
        return
    click.echo(f"OK: the manifest is usable; {n_analysable} of {summary['pairs']} pairs can be analysed"
               + (f"; {len(blocked)} analys{'i' if len(blocked) == 1 else 'e'}s cannot run (listed above)."
                  if blocked else "."))


def _nothing_to_analyse(summary):
    from covreport.errors import ManifestError

    n = summary["pairs"]
    return ManifestError(f"{summary['manifest']}: no pair can be analysed: all {n} pair{'' if n == 1 else 's'} "
                         "are excluded (see the exclusions listed); remove their causes (missing images or scores, "
                         "empty outcomes), then validate again. `covreport run` would stop here.")


# --- diagnostic (stats) ----------------------------------------------------


class _FloatRange(click.FloatRange):
    """click.FloatRange that refuses NaN too (click's lets it through every bound)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv != rv:
            self.fail(f"{value!r} is not a number in the range {self._describe_range()}.", param, ctx)
        return rv


#: A number strictly between 0 and 1 (a prevalence, an alpha).
_OPEN_UNIT = _FloatRange(0, 1, min_open=True, max_open=True)


@main.command()
@click.option("--tp", type=click.IntRange(min=0), required=True, help="True positives: disease present, test positive.")
@click.option("--fp", type=click.IntRange(min=0), required=True, help="False positives: disease absent, test positive.")
@click.option("--fn", type=click.IntRange(min=0), required=True, help="False negatives: disease present, test negative.")
@click.option("--tn", type=click.IntRange(min=0), required=True, help="True negatives: disease absent, test negative.")
@click.option("--prevalence", type=_OPEN_UNIT, default=None,
              help="Disease prevalence in the target population, 0 < P < 1. Recomputes PPV, NPV "
                   "and accuracy by Bayes' rule (default: the table's own prevalence).")
@click.option("--alpha", type=_OPEN_UNIT, default=0.05, show_default=True,
              help="1 - confidence level of the intervals, 0 < A < 1.")
@click.option("--predictive-ci", type=click.Choice(["exact", "logit"]), default="exact", show_default=True,
              help="PPV/NPV interval: Clopper-Pearson (a cohort's binomial proportion), or Mercaldo's "
                   "logit with the sample prevalence taken as known (MedCalc; the original study).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON keyed by measure instead of a table, plus 'input': the 2x2 counts, "
                   "prevalence, alpha and --predictive-ci; missing or infinite values are null with a note.")
def diagnostic(tp, fp, fn, tn, prevalence, alpha, predictive_ci, as_json):
    """Diagnostic accuracy of a 2x2 table, with confidence intervals.

    Prints accuracy, sensitivity, specificity, ppv, npv, lr_positive and
    lr_negative with their intervals, computed as MedCalc's diagnostic test
    calculator does: Clopper-Pearson exact intervals for sensitivity,
    specificity and accuracy; the log method (Altman et al. 2000) for the
    likelihood ratios. Predictive values: Clopper-Pearson exact intervals by
    default (in a consecutive cohort PPV and NPV are binomial proportions);
    --predictive-ci logit gives the standard logit interval (Mercaldo et al.
    2007) with the table's prevalence taken as known, as MedCalc prints; with
    --prevalence, the logit interval with that prevalence. A degenerate logit
    interval is replaced by Clopper-Pearson, with a note. No continuity
    correction: a measure a zero cell makes undefined is reported missing,
    with the reason.

    Example: covreport diagnostic --tp 40 --fp 3 --fn 4 --tn 5
    """
    from covreport.stats._util import records
    from covreport.stats.diagnostic import diagnostic_metrics

    table = diagnostic_metrics(tp, fp, fn, tn, prevalence=prevalence, alpha=alpha,
                               predictive_ci=predictive_ci)
    if as_json:
        measures = {}
        for rec in records(table):
            entry = {k: rec[k] for k in ("estimate", "ci_low", "ci_high", "method")}
            if rec.get("note"):
                entry["note"] = rec["note"]
            measures[rec["measure"]] = entry
        n = tp + fp + fn + tn
        measures["input"] = {
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": n,
            "prevalence": prevalence if prevalence is not None else ((tp + fn) / n if n else None),
            "prevalence_source": "given (--prevalence)" if prevalence is not None else "table: (TP+FN)/N",
            "alpha": alpha, "confidence_level": 1 - alpha, "predictive_ci": predictive_ci,
        }
        _echo_json(measures)
        return

    def fmt(x):
        if x != x:  # NaN
            return "-"
        if x in (float("inf"), float("-inf")):
            return "inf" if x > 0 else "-inf"
        return f"{x:.4f}"

    level = f"{100 * (1 - alpha):g}% CI"
    header = ("measure", "estimate", level, "method", "note")
    lines = []
    for r in table.itertuples(index=False):
        ci = "-" if r.ci_low != r.ci_low else f"{fmt(r.ci_low)} to {fmt(r.ci_high)}"
        lines.append((r.measure, fmt(r.estimate), ci, r.method, r.note))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:3])]
    click.echo(f"2x2 table: TP={tp} FP={fp} FN={fn} TN={tn}"
               + ("" if prevalence is None else f"; prevalence {prevalence:g}"))
    for line in (header, *lines):
        cells = [line[i].ljust(widths[i]) if i == 0 else line[i].rjust(widths[i]) for i in range(3)]
        text = "  ".join(cells) + "  " + line[3]
        if line[4]:
            text += f"  [{line[4]}]"
        click.echo(text.rstrip())


# --- train / score (model) -------------------------------------------------

# train


def _split_labels(values):
    labels = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return tuple(labels)


@main.command()
@click.option("--chexpert-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="CheXpert folder holding train.csv and valid.csv (CheXpert-v1.0 or CheXpert-v1.0-small); "
                   "their Path column is relative to this folder's parent.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to keep (lowest validation loss), e.g. model/densenet121.pt. Beside it: "
                   "NAME.validation_auc.csv, NAME.validation_scores.csv, and NAME.epochN.pt every epoch "
                   "while training (deleted at the end unless --keep-epochs).")
@click.option("--labels", multiple=True,
              help="Label columns to learn, comma-separated (repeatable); default: the study's 10 labels.")
@click.option("--uncertainty", type=click.Choice(["zeros", "ones", "ignore"]), default="zeros", show_default=True,
              help="Uncertain (-1) labels become 0, 1, or are left out of the loss. Blank is always 0.")
@click.option("--init", default="imagenet", show_default=True,
              help="Start weights: imagenet (torchvision's, from the torch hub cache; offline it fails "
                   "with instructions), none (random), or a checkpoint / DenseNet121 state-dict FILE.")
@click.option("--image-size", type=click.IntRange(min=64), default=320, show_default=True,
              help="Square input side in pixels.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per step (per process under torchrun).")
@click.option("--lr", type=_FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adam's fixed learning rate (betas 0.9/0.999).")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Use at most N images of each CSV (a seeded random sample), for small runs.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of initialisation, shuffling, sampling.")
@click.option("--resume", is_flag=True,
              help="Continue from the last NAME.epochN.pt beside --out, with its optimizer state.")
@click.option("--keep-epochs", is_flag=True,
              help="Keep every NAME.epochN.pt (with optimizer state) after a completed run, e.g. to "
                   "--resume later with more --epochs; by default only the kept checkpoint stays.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes decoding images [default: on a CPU none up to 4 cores, then "
                   "cores/4 (at most 4), the training's threads taking the other cores; on a GPU min(4, cores)].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when available (bf16 autocast, channels_last), else CPU float32.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@quiet_option
def train(chexpert_root, out, labels, uncertainty, init, image_size, epochs, batch_size, lr, max_images,
          seed, resume, keep_epochs, workers, device, no_progress):
    """Train the study's DenseNet121 on a CheXpert-layout folder.

    The defaults are the study's recipe: ImageNet initialisation, 320x320
    input, all single views, uncertain labels as negative (U-zeros),
    class-weighted binary cross-entropy (pos_weight = negatives/positives per
    label), Adam lr 1e-4 fixed, batch 16, 3 epochs, a checkpoint every epoch,
    keeping the one with the lowest validation loss (the epoch checkpoints
    are deleted at the end unless --keep-epochs; an interrupted run keeps
    them for --resume). Validation AUCs with
    DeLong CIs go into the checkpoint and NAME.validation_auc.csv.

    \b
    Multi-GPU or multi-process (DistributedDataParallel, rank 0 writes):
      torchrun --nproc_per_node N -m covreport train ...

    \b
    Example:
      covreport train --chexpert-root CheXpert-v1.0-small --out model/densenet121.pt
    """
    import os

    from covreport.model import load_checkpoint
    from covreport.train import TrainConfig, train as train_model

    kwargs = {}
    if labels:
        kwargs["labels"] = _split_labels(labels)
        repeated = sorted({lab for lab in kwargs["labels"] if kwargs["labels"].count(lab) > 1})
        if repeated:
            raise click.BadParameter(f"{', '.join(map(repr, repeated))} given more than once -- name each label "
                                     "once", param_hint="--labels")
    if workers is not None:
        kwargs["num_workers"] = workers
    config = TrainConfig(uncertainty=uncertainty, image_size=image_size, epochs=epochs, batch_size=batch_size,
                         lr=lr, init=init, seed=seed, max_images=max_images,
                         device=None if device == "auto" else device, **kwargs)
    path = train_model(chexpert_root, out, config, progress=not no_progress, resume=resume,
                       keep_epochs=keep_epochs)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    loaded = load_checkpoint(path)
    meta = loaded.metadata
    click.echo(f"Checkpoint: {path} (epoch {meta.get('epoch')} of {epochs}, "
               f"validation loss {meta.get('val_loss', float('nan')):.4f})")
    click.echo(f"SHA-256: {loaded.sha256}")
    click.echo(f"Validation AUCs: {path.with_name(path.stem + '.validation_auc.csv')}")


# score

_SCORE_FAILED_LIMIT = 20


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--weights", help="Checkpoint (.pt) to score with, or xrv:NAME for a torchxrayvision "
              "DenseNet whose weight file is on disk; default: the newest checkpoint in model/.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Scores file to write: .csv or .parquet (by suffix). Provenance (weights SHA-256, "
                   "preprocessing, counts, failed images) goes beside it in OUT.json.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Score cache (SQLite) to read and extend; default: scores.sqlite under the user's "
                   "cache folder (or $COVREPORT_CACHE_DIR).")
@click.option("--no-cache", is_flag=True, help="Score every image afresh and store nothing.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Processes decoding images in parallel (0: decode in the main process).")
@click.option("--precision", type=click.Choice(["float32", "bf16"]), default="float32", show_default=True,
              help="bf16 runs the network under bfloat16 autocast (faster on CPUs with AVX512-BF16/AMX "
                   "and recent GPUs; probabilities within about 0.02 of float32). bf16 outputs are "
                   "cached apart from float32 ones.")
@click.option("--strict", is_flag=True,
              help="Fail (exit 1, nothing written) if any image is missing or unreadable, instead of "
                   "leaving it out.")
@click.option("--force", is_flag=True, help="Replace an existing scores file (never an input).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@quiet_option
def score(manifest, weights, out, cache, no_cache, batch_size, workers, precision, strict, force, no_progress):
    """Score every image of MANIFEST once: label probabilities and 1,024 features.

    Writes OUT with one row per image: 'image' (the path as the manifest
    writes it), one probability column per label, feat_0000 ... feat_1023.
    Images already in the cache for these weights and preprocessing are not
    run again; unreadable images are listed with their reason and left out
    (the report counts them as exclusions).

    \b
    Example:
      covreport score manifest.csv --weights model/densenet121.pt --out scores.csv
      torchrun --nproc_per_node 4 -m covreport score manifest.csv --out scores.csv
    """
    from covreport.scoring import score_to_file

    if cache is not None and no_cache:
        raise click.UsageError("give --cache or --no-cache, not both")
    res, loaded = score_to_file(manifest, out, weights=weights, cache_path=cache, use_cache=not no_cache,
                                batch_size=batch_size, num_workers=workers, precision=precision,
                                strict=strict, force=force, progress=not no_progress)
    from covreport.distributed import is_main

    if not is_main():  # under torchrun rank 0 writes the scores file and prints the summary
        return
    n_images = len(res.scores) + len(res.failed)
    click.echo(f"Weights     {loaded.source} (SHA-256 {loaded.sha256})")
    click.echo(f"Images      {n_images} in the manifest, {len(res.scores)} with scores")
    click.echo(f"Scored      {res.scored} (distinct images run through the network, {precision})")
    click.echo(f"From cache  {res.from_cache}" + ("" if not no_cache else " (--no-cache)"))
    click.echo(f"Failed      {len(res.failed) or 'none'}")
    for path, reason in list(res.failed.items())[:_SCORE_FAILED_LIMIT]:
        click.echo(f"  {path}: {reason}")
    if len(res.failed) > _SCORE_FAILED_LIMIT:
        click.echo(f"  ... and {len(res.failed) - _SCORE_FAILED_LIMIT} more (see {out}.json)")
    click.echo(f"Scores      {out}")


# --- pairs (revalidation) ---------------------------------------------------

_PAIRS_LIST_LIMIT = 10


@main.command()
@click.argument("images", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Pair manifest to write (CSV, written whole). May be the --update manifest itself.")
@click.option("--update", "previous", type=click.Path(dir_okay=False, path_type=Path),
              help="Existing pair manifest: its rows are kept as they are (outcomes, pair ids, notes) and only "
                   "pairs it does not hold yet are appended, with an empty outcome.")
@click.option("--preset", type=click.Choice(["ieee8023"]),
              help="Column mapping of a known export: ieee8023 = covid-chestxray-dataset metadata.csv "
                   "(patientid, offset, view, age, sex, folder/filename; X-ray rows only).")
@click.option("--map", "map_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Column mapping file: TOML (patient_id = \"patientid\") or CSV with the header "
                   "manifest_column,export_column.")
@click.option("--patient-col", help="Export column of the patient id [default: patient_id, patientid or patient].")
@click.option("--date-col", help="Export column of the acquisition date (ISO 8601 unless --date-format).")
@click.option("--date-format", help="strptime format of the dates, e.g. '%d/%m/%Y' [default: ISO 8601].")
@click.option("--offset-col", help="Export column of the day offset (e.g. days since admission), used to "
                                   "order the images when there is no date.")
@click.option("--view-col", help="Export column of the view (AP, AP Supine, PA, L/Lateral; any case).")
@click.option("--path-col", multiple=True,
              help="Export column of the image path; repeat it to join several columns with '/' "
                   "(--path-col folder --path-col filename). Relative paths start at the export's folder.")
@click.option("--age-col", help="Export column of the age in years.")
@click.option("--sex-col", help="Export column of the sex (M, F, Male, Female).")
@click.option("--views", default="AP,AP Supine,PA", show_default=True,
              help="Views to keep, comma-separated, or 'all' to keep every row whatever its view.")
@click.option("--filter", "filters", multiple=True, metavar="COL=VALUE",
              help="Keep only rows whose COL equals VALUE (COL!=VALUE: differs; COL~TEXT: contains TEXT); "
                   "case-insensitive, '|' separates alternatives; repeat to require several.")
@click.option("--source", help="Text for the source column of new pairs [default: the preset or export name].")
@click.option("--json", "as_json", is_flag=True, help="Print the report (exclusions, ties, counts) as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing --out file (not needed when --out is the "
                                            "--update manifest itself; never the export or the map).")
def pairs(images, out, previous, preset, map_file, patient_col, date_col, date_format, offset_col, view_col,
          path_col, age_col, sex_col, views, filters, source, as_json, force):
    """Build the pair manifest from an image-level export (one row per image).

    Per patient, the images that pass --filter and show one of --views are
    ordered by date (or day offset); images with the same date are put in
    the order of their paths and every such tie is listed. Each image is
    paired with the next one (k images give k-1 pairs, pair_id
    <patient>-<k>), with an empty outcome for the readers to fill in
    (Worse, Stable, Improved). With --update, pairs already in the manifest
    keep their outcome and every other cell, and only new pairs are appended;
    an old labelled pair that no longer arises is kept and listed, an
    unlabelled one replaced by new pairs is dropped and listed. See
    data_manifests/README.md.

    \b
    Example (ieee8023 covid-chestxray-dataset, from its folder):
      covreport pairs metadata.csv --preset ieee8023 --filter "finding~COVID-19" --out pairs.csv
    """
    from covreport._io import check_out_file
    from covreport.errors import ManifestError
    from covreport.pairs import build_pairs, read_column_map, write_pairs

    # The export and the map are never overwritten; the --update manifest may be (that is its
    # purpose); any other existing file needs --force (it may hold the readers' outcomes).
    from covreport._io import _file_id

    in_place = previous is not None and _file_id(out) is not None and _file_id(out) == _file_id(previous)
    check_out_file(out, inputs=[images, map_file], force=force or in_place, error_class=ManifestError)
    columns = dict(read_column_map(map_file)) if map_file else {}
    for key, value in (("patient_id", patient_col), ("date", date_col), ("offset_days", offset_col),
                       ("view", view_col), ("age", age_col), ("sex", sex_col)):
        if value:
            columns[key] = value
    if path_col:
        columns["image"] = tuple(path_col)
    view_list = None if views.strip().lower() == "all" else [v.strip() for v in views.split(",") if v.strip()]
    if view_list is not None and not view_list:
        raise click.BadParameter("give at least one view, or 'all'", param_hint="--views")
    from covreport.inputs import safe_text
    from covreport.pairs import normalize_view, parse_filter

    for v in view_list or ():
        if normalize_view(v) is None:
            raise click.BadParameter(f"{safe_text(repr(v))} is not a view -- use AP, AP Supine, PA or Lateral "
                                     "(any case), comma-separated, or 'all'", param_hint="--views")
    for f in filters:
        try:
            parse_filter(f)
        except ManifestError as exc:
            raise click.BadParameter(f"{safe_text(repr(f))}: " + str(exc).split(": ", 1)[-1],
                                     param_hint="--filter") from None
    table, report = build_pairs(images, columns=columns, views=view_list, previous=previous, filters=filters,
                                preset=preset, date_format=date_format, source=source,
                                out_dir=out.parent if str(out.parent) else Path("."))
    write_pairs(table, out)
    if as_json:
        _echo_json(report)
        return
    counts = report["excluded_counts"]
    order = {"date": "date", "offset_days": "day offset"}[report["order_by"]]
    views_text = "all views" if report["views"] is None else ", ".join(report["views"])
    click.echo(f"Export      {images}: {report['images_in_export']} rows, {report['images_eligible']} eligible "
               f"({views_text}; ordered by {order})")
    for why, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_PAIRS_LIST_LIMIT]:
        click.echo(f"  excluded: {why}: {k}")
    if len(counts) > _PAIRS_LIST_LIMIT:
        click.echo(f"  ... and {len(counts) - _PAIRS_LIST_LIMIT} more reasons (see --json)")
    ties = report["ties"]
    click.echo(f"Ties        {len(ties) or 'none'}" + (f" (same {order}: put in the order of their paths)" if ties else ""))
    for tie in ties[:_PAIRS_LIST_LIMIT]:
        click.echo(f"  patient {tie['patient_id']}, {order} {tie['order_key']}: "
                   + " < ".join(tie["images"]) + f" (lines {', '.join(map(str, tie['lines']))})")
    if len(ties) > _PAIRS_LIST_LIMIT:
        click.echo(f"  ... and {len(ties) - _PAIRS_LIST_LIMIT} more (see --json)")
    click.echo(f"Patients    {report['patients']} with eligible images, {report['patients_with_pairs']} with a pair")
    if previous is not None:
        click.echo(f"Pairs       {report['pairs']}: {report['pairs_kept']} kept from {previous} "
                   f"({report['pairs_kept_labelled']} labelled), {report['pairs_new']} new")
        stale, dropped = report["stale"], report["dropped"]
        if stale:
            click.echo(f"Kept        {len(stale)} pair(s) of {previous} that the export no longer gives "
                       "(delete them if they should not be analysed):")
            for rec in stale[:_PAIRS_LIST_LIMIT]:
                label = rec["outcome"] or "no outcome"
                click.echo(f"  line {rec['line']}: pair {rec['pair_id']} (patient {rec['patient_id']}, {label}): "
                           f"{rec['first_image']} -> {rec['second_image']}; {rec['reason']}")
            if len(stale) > _PAIRS_LIST_LIMIT:
                click.echo(f"  ... and {len(stale) - _PAIRS_LIST_LIMIT} more (see --json)")
        if dropped:
            click.echo(f"Dropped     {len(dropped)} unlabelled pair(s) of {previous} replaced by new pairs "
                       "(an image now lies between them or is gone):")
            for rec in dropped[:_PAIRS_LIST_LIMIT]:
                click.echo(f"  line {rec['line']}: pair {rec['pair_id']} (patient {rec['patient_id']}): "
                           f"{rec['first_image']} -> {rec['second_image']}")
            if len(dropped) > _PAIRS_LIST_LIMIT:
                click.echo(f"  ... and {len(dropped) - _PAIRS_LIST_LIMIT} more (see --json)")
    else:
        click.echo(f"Pairs       {report['pairs']}")
    for text in report["warnings"]:
        click.echo(f"Warning     {text}")
    click.echo(f"Wrote {out}: fill in the outcome (Worse, Stable, Improved) of the "
               f"{report['pairs_new']} new pair{'' if report['pairs_new'] == 1 else 's'}, then "
               f"`covreport validate {out}`.")


# --- run / demo (pipeline) -------------------------------------------------


def _echo_summary(folder):
    """The headline of a results folder on stdout (covreport/summary.py)."""
    from covreport.summary import format_summary, summarise

    if folder is None:  # a torchrun rank other than 0 of `run --weights`: rank 0 writes and prints
        return
    click.echo(format_summary(summarise(folder)), nl=False)


def _run_params(command):
    return {p.name: p for p in command.params if p.name not in ("config", "quiet", "help")}


def _read_run_config(ctx, param, value):
    """--config of `covreport run`: the file's values become the defaults the command line overrides."""
    if value is None:
        return None
    from covreport.summary import read_run_config

    try:
        values = read_run_config(value, _run_params(ctx.command))
    except click.BadParameter as exc:
        exc.ctx, exc.param = ctx, param
        raise
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _default_weights_or_explain():
    """The newest checkpoint in the model folder, or a ModelError saying every way to get one."""
    from covreport import demo
    from covreport.errors import ModelError
    from covreport.model import MODEL_DIR_ENV, TRAIN_HINT, XRV_PREFIX, default_model_dir, default_weights

    found = default_weights()
    if found is not None:
        return found
    lines = [
        f"no --weights given and no checkpoint (.pt) in {default_model_dir()}. Either:",
        f"  - train the DenseNet121 on CheXpert: `{TRAIN_HINT}`;",
        f"  - put a covreport checkpoint in {default_model_dir()} (or set {MODEL_DIR_ENV} to its folder), "
        "or pass --weights FILE;",
        f"  - pass --weights {XRV_PREFIX}densenet121-res224-chex with torchxrayvision's weight file on disk;",
        "  - or, without a model or images (reviewer mode), pass --scores SCORES.csv written by `covreport score`.",
    ]
    trained = demo.weights_path()
    if trained.is_file():
        lines.append(f"The weights `covreport demo` trained are at {trained}; they learnt the synthetic "
                     f"phantom and suit only its images (`--weights {trained}`).")
    raise ModelError("\n".join(lines))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scores", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Scores file (CSV or Parquet) from `covreport score`: reviewer mode, no model needed.")
@click.option("--weights", help="Checkpoint to score the images with (through the cache); "
              "default: the newest checkpoint in model/.")
@click.option("--validation-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CheXpert-layout valid.csv with ground-truth labels, for per-label AUCs.")
@click.option("--validation-scores", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Scores of the validation images ('image' = the CSV's Path); with --weights they are computed.")
@click.option("--reference-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CheXpert-format CSV (Sex, Age) for the reference row of Table 1.")
@click.option("--study", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="study.toml with the author's fields of the report (see docs/study.example.toml).")
@click.option("--templates", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of templates overriding the built-in report templates.")
@click.option("--protocol", type=click.Choice(["penalised", "nested", "global"]), default="penalised",
              show_default=True,
              help="Headline prediction protocol: penalised (main: standardised L2 logistic regression, "
                   "penalty tuned by nested patient-grouped CV; its permutation tests run at most 200 "
                   "permutations), or the original study's chi-square recipe, replicated: nested (selection "
                   "inside each fold) or global (once on all pairs).")
@click.option("--permutations", type=click.IntRange(min=0, max=100_000), default=1000, show_default=True,
              help="Permutations for each protocol's permutation p-value of the accuracy (0 to skip).")
@click.option("--bootstrap", type=click.IntRange(min=0, max=100_000), default=2000, show_default=True,
              help="Patient-level cluster bootstrap resamples for percentile CIs (0 to skip); the "
                   "cross-validated prediction measures and calibration's intervals (ICI, E50, E90, curve band) "
                   "use min(this, 200) resamples, as recorded.")
@click.option("--predictive-ci", type=click.Choice(["exact", "logit"]), default="exact", show_default=True,
              help="PPV/NPV interval: Clopper-Pearson (a cohort's binomial proportion), or Mercaldo's "
                   "logit with the sample prevalence taken as known (MedCalc; the original study).")
@click.option("--threshold", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.5,
              show_default=True,
              help="Classification threshold: a pair is predicted Worse when its out-of-fold probability is at "
                   "least this (prespecified; the decision curve shows every threshold from 0.05 to 0.95).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the permutation tests and the bootstrap.")
@click.option("--predictors", default="", metavar="LIST",
              help="Clinical predictors measured at the first CXR, manifest columns separated by commas: NAME "
                   "(numeric) or NAME=LEVEL1/LEVEL2 (categorical, the first level the reference), e.g. "
                   "'age,sex=F/M,spo2'; interval_days and projection_change may be named too. Adds the "
                   "clinical, imaging and combined models and what the images add (AUC, Brier, NRI, IDI).")
@click.option("--target", default="", metavar="COLUMN",
              help="Predict the binary clinical outcome held in this manifest column (e.g. intubation or death "
                   "within 14 days of the first CXR) instead of Worse vs Improved, on every analysed pair with "
                   "it recorded; the change analysis keeps the radiological outcome. Needs --positive.")
@click.option("--positive", default="", metavar="VALUE",
              help="The --target column's value of the positive class (e.g. 1 or yes); its one other value "
                   "is the negative class, a blank cell not recorded.")
@click.option("--site", default="source", show_default=True, metavar="COLUMN",
              help="Manifest column naming each pair's site: with 2 or more sites the report adds the "
                   "performance per site and a random-effects meta-analysis of the AUC and the calibration "
                   "slope (tau^2, I^2, prediction interval) with a forest plot. '' turns it off.")
@click.option("--validation", type=click.Choice(["leave-one-patient-out", "leave-one-site-out"]),
              default="leave-one-patient-out", show_default=True,
              help="leave-one-site-out adds internal-external cross-validation: each site's pairs predicted by "
                   "the headline protocol fitted on the other sites, with its own site meta-analysis (needs 2 "
                   "or more sites in the --site column).")
@click.option("--table1-tests", is_flag=True, help="Show baseline p-values in Table 1 beside the "
              "standardised differences (journals ask for SMDs instead; the p-values are in results.json).")
@click.option("--style", type=click.Choice(["radiology", "vancouver"]), default="radiology", show_default=True,
              help="Number style of the report: radiology (RSNA/AMA: P = .006, 95% CI: 0.87, 0.99, minus "
                   "sign U+2212) or vancouver (p = 0.0060, 0.87\u20130.99). The CSVs keep full precision.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Score cache (SQLite); default under the user's cache folder.")
@click.option("--no-cache", is_flag=True, help="Score every image afresh and store nothing.")
@click.option("--strict", is_flag=True, help="Refuse missing or unreadable images and empty outcomes.")
@click.option("--no-pdf", is_flag=True, help="Write the HTML report only.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("covreport-out"),
              show_default=True, help="Output folder (written whole, at the end).")
@click.option("--force", is_flag=True, help="Replace an existing output folder that covreport wrote (it holds a "
              ".covreport-output file); never a folder holding an input.")
@click.option("--previous", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="results.json of an earlier validation (repeat, oldest first): the report shows what moved.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), is_eager=True, expose_value=False,
              callback=_read_run_config,
              help="TOML run config: option = value lines, named as the options (manifest = \"m.csv\", "
                   "permutations = 2000); options on the command line override it. `covreport summary DIR "
                   "--config` writes one from a results folder.")
@parallel_options
@quiet_option
def run(manifest, scores, weights, validation_csv, validation_scores, reference_csv, study, templates,
        protocol, permutations, bootstrap, predictive_ci, threshold, seed, predictors, target, positive, site,
        validation, cache, no_cache, strict, no_pdf, out, force, previous, table1_tests, style, jobs,
        dask_scheduler):
    """Run the whole study on MANIFEST and write the STARD report.

    Writes OUT/report.html, OUT/report.pdf, OUT/results.json, OUT/tables/*.csv
    and OUT/figures/*. Give --scores (reviewer mode) or --weights.
    """
    from covreport import parallel
    from covreport.pipeline import RunOptions, command_line, run as run_study

    if scores is not None and weights is not None:
        raise click.UsageError("give --scores or --weights, not both")
    if scores is None and weights is None:
        weights = str(_default_weights_or_explain())
    opts = RunOptions(manifest=manifest, out=out, scores=scores, weights=weights,
                      validation_csv=validation_csv, validation_scores=validation_scores,
                      reference_csv=reference_csv, study=study, templates=templates, protocol=protocol,
                      permutations=permutations, bootstrap=bootstrap, predictive_ci=predictive_ci,
                      threshold=threshold, predictors=predictors, target=target, positive=positive, site=site,
                      validation=validation,
                      table1_tests=table1_tests, style=style,
                      seed=seed, force=force, strict=strict, cache=cache,
                      use_cache=not no_cache, pdf=not no_pdf, previous=tuple(previous), command=command_line())
    with parallel.engine(jobs, dask_scheduler):
        written = run_study(opts)
    _echo_summary(written)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("covreport-demo"),
              show_default=True, help="Folder for the phantom study, weights, cache and report.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the phantom and the training.")
@click.option("--quick", is_flag=True, help="A first look: a smaller phantom, 1 epoch, 50 permutations, "
              "20 resamples and no PDF (kept apart: study-quick/, report-quick/).")
@click.option("--sites", is_flag=True, help="The next study instead: a second phantom of 80 patients at three "
              "sites, one shifted, scored by the same model, with its performance per site, their meta-analysis "
              "and leave-one-site-out validation (study-sites/, report-sites/).")
@quiet_option
def demo(out, seed, quick, sites):
    """Run the whole study on a synthetic phantom: generate, train, score, test, report.

    Needs no data and no weights. The first run trains a DenseNet121 on the
    phantom's CheXpert-layout set (a few minutes on a CPU); later runs reuse
    the weights and the score cache. The data are synthetic and the report
    says so.
    """
    from covreport.demo import run_demo

    result = run_demo(out, seed=seed, quick=quick, sites=sites)
    took = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    _echo_summary(result.report)
    if quick:
        click.echo("The quick demo writes the HTML report only; `covreport demo` writes its PDF too.")
    click.echo(f"Time: {took}" + ("" if result.trained else " (weights reused)"))
    click.echo(f"Regenerate with:\n  {result.command}")
    click.echo(f"Verify with:\n  {result.verify_command}")


# --- summary (results) ------------------------------------------------------


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON (counts, per contrast the significant labels, the prediction, "
                   "the file paths).")
@click.option("--config", "as_config", is_flag=True,
              help="Print the run options results.json records as a TOML run config for "
                   "`covreport run --config` (redirect it to a file beside the manifest).")
def summary(folder, as_json, as_config):
    """Print the headline of a results folder written by `covreport run` or `demo`.

    FOLDER holds results.json (or is that file). Prints the pairs and
    patients analysed; per contrast, the labels whose change differs after
    Holm adjustment across labels (p < 0.05), with the effect (the clustered
    theta when the patient is the primary unit, else Cohen's d), its 95% CI
    and p; the headline protocol's accuracy and AUC with their 95% intervals;
    and the paths of report.html, report.pdf and results.json. Nothing is
    written.

    \b
    Example:
      covreport summary covreport-demo/report
      covreport summary covreport-out --config > run.toml
    """
    from covreport.summary import format_summary, run_config, summarise

    if as_json and as_config:
        raise click.UsageError("give --json or --config, not both")
    if as_config:
        click.echo(run_config(folder, set(_run_params(run))), nl=False)
    elif as_json:
        _echo_json(summarise(folder))
    else:
        click.echo(format_summary(summarise(folder)), nl=False)


# --- plan (sample size) -------------------------------------------------------


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--half-width", type=_OPEN_UNIT, default=0.05, show_default=True,
              help="Target half-width of the 95% CIs of sensitivity, specificity and AUC.")
@click.option("--power", type=_OPEN_UNIT, default=0.8, show_default=True,
              help="Target power of each label's change contrast.")
@click.option("--alpha", type=_OPEN_UNIT, default=0.05, show_default=True,
              help="Two-sided significance level of the change contrasts, divided by the labels tested.")
@click.option("--shrinkage", type=_OPEN_UNIT, default=0.9, show_default=True,
              help="Target expected shrinkage of the prediction model (Riley et al. 2020, criterion 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of the table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write plan.json (default: beside results.json).")
@click.option("--force", is_flag=True, help="Replace an existing plan.json that covreport did not write.")
def plan(folder, half_width, power, alpha, shrinkage, as_json, out, force):
    """How many more pairs and patients a revalidation needs.

    FOLDER holds results.json (or is that file) from `covreport run`. For
    the headline protocol: the pairs for the target half-width of the CIs of
    sensitivity and specificity at the observed prevalence (Buderer 1996) and
    of the AUC (Hanley-McNeil); for each label's change contrast, the power
    at 2, 5 and 10 times the pairs and the pairs for the target power
    (Noether 1987); the minimum size of the prediction model for its
    candidate predictors (Riley et al. BMJ 2020). Each times the design effect
    measured in the study, in patients at the observed pairs per patient.
    Prints a table and writes plan.json.

    \b
    Example:
      covreport plan covreport-demo/report --half-width 0.1
    """
    from covreport.plan import format_plan, plan_folder, write_plan

    result, path = plan_folder(folder, half_width=half_width, power=power, alpha=alpha, shrinkage=shrinkage)
    written = write_plan(result, path, out, force=force)
    if as_json:
        _echo_json(result)
    else:
        click.echo(format_plan(result))
        click.echo(f"Plan        {written}")


# --- verify (reviewer) ---------------------------------------------------------

_VERIFY_LIST_LIMIT = 50


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="The manifest the run read (default: found from results.json).")
@click.option("--scores", type=click.Path(dir_okay=False, path_type=Path),
              help="The scores file of a reviewer-mode run (or one made with the run's weights).")
@click.option("--weights", help="The weights of a weights-mode run (file or xrv: spec).")
@click.option("--validation-csv", type=click.Path(dir_okay=False, path_type=Path),
              help="The CheXpert-layout validation CSV the run was given (validation AUCs).")
@click.option("--validation-scores", type=click.Path(dir_okay=False, path_type=Path),
              help="Scores of the validation images (the run's, or made with its weights).")
@click.option("--reference-csv", type=click.Path(dir_okay=False, path_type=Path),
              help="The reference population CSV of Table 1 the run was given.")
@click.option("--study", type=click.Path(dir_okay=False, path_type=Path),
              help="The study.toml the run was given.")
@click.option("--previous", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The earlier results.json files the run was given with --previous, in the same order.")
@click.option("--templates", type=click.Path(file_okay=False, path_type=Path),
              help="The --templates folder the run used, to check its report's text.")
@click.option("--ignore-hashes", is_flag=True,
              help="Rerun even when an input's SHA-256 differs from the recorded one (still a failure).")
@click.option("--cache", "cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Score cache (SQLite) for weights-mode scoring; default the one `covreport run` uses "
                   "without --cache. Never one named by the submission.")
@click.option("--no-cache", is_flag=True, help="Score the images again instead of using the score cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the verification as a JSON record.")
@parallel_options
@quiet_option
def verify(folder, manifest, scores, weights, validation_csv, validation_scores, reference_csv, study,
           previous, templates, ignore_hashes, cache, no_cache, as_json, jobs, dask_scheduler):
    """Re-derive every number of a results folder (FOLDER holds results.json).

    Checks each input against the SHA-256 recorded in the run's provenance,
    reruns the analysis with the recorded options (protocol, seed,
    permutations, bootstrap resamples, predictive-value interval, strict)
    into a temporary folder and compares every number of the new
    results.json with the submitted one; then checks that tables/*.csv and
    the text of report.html carry the submitted values. Exit 0: every number
    regenerated; exit 1: the differences are listed.

    Inputs not given as options are taken from results.json: at their path
    relative to FOLDER, then relative to the manifest's folder. A recorded
    path is used only if it stays inside the folder holding FOLDER (resp.
    the manifest's folder), passes no symbolic link, names a regular file,
    and has the recorded SHA-256; absolute paths are never looked at.

    \b
    Examples:
      covreport verify covreport-demo/report --cache covreport-demo/cache.sqlite
      covreport verify submitted/ --manifest manifest.csv --scores scores.csv
    """
    from covreport import parallel
    from covreport.verify import verify as verify_folder

    inputs = {"manifest": manifest, "scores": scores, "weights": weights, "validation_csv": validation_csv,
              "validation_scores": validation_scores, "reference_csv": reference_csv, "study": study}
    with parallel.engine(jobs, dask_scheduler):
        result = verify_folder(folder, {k: v for k, v in inputs.items() if v is not None}, previous=previous,
                               templates=templates, ignore_hashes=ignore_hashes, use_cache=not no_cache,
                               cache=cache)
    if as_json:
        _echo_json(result.to_dict())
    else:
        for role in result.found:
            click.echo(f"input {role}: {safe_text(result.inputs[role])} (found from results.json)")
        for m in result.hash_mismatches:
            click.echo(f"input changed: {m['input']} {safe_text(m['path'])}: SHA-256 {m['sha256']}, "
                       f"recorded {m['recorded_sha256']}")
        diffs = result.differences + result.report_differences
        if diffs:
            click.echo(f"NOT verified: {len(result.differences)} difference(s) in results.json, "
                       f"{len(result.report_differences)} in the report files ({result.tolerance})")
            shown = 0
            for title, rows in (("path\tsubmitted\tregenerated", result.differences),
                                ("report file\tin the file\tfrom the submitted results.json",
                                 result.report_differences)):
                if rows:
                    click.echo(title)
                for d in rows[:max(0, _VERIFY_LIST_LIMIT - shown)]:
                    click.echo("\t".join(safe_text(d[k], limit=2000) for k in ("path", "submitted", "regenerated")))
                shown += len(rows)
            if shown > _VERIFY_LIST_LIMIT:
                click.echo(f"... and {shown - _VERIFY_LIST_LIMIT} more (see --json)")
        elif result.ok:
            click.echo(f"verified: {result.numbers_compared} numbers regenerated exactly ({result.tolerance})")
        click.echo(f"report files checked: {', '.join(result.report_checked) or 'none'}")
        for text in result.report_not_checked:
            click.echo(f"not checked: {safe_text(text)}")
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
