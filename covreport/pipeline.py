"""The one place that sequences the stages of ``covreport run``.

manifest -> images -> scores (file, or model through the cache) -> statistics
-> results.json, tables/ and the report. Everything is written into a
temporary folder beside the destination and moved into place whole.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata as _md
from pathlib import Path

import numpy as np
import pandas as pd

from covreport import __version__, progress
from covreport._io import sha256_file
from covreport.constants import (
    CONTRAST_NAMES, CONTRASTS, FEATURE_PREFIX, IMAGE_COLUMN, IMPROVED, OUTCOMES, STAGE_INDEX_TEST_NOT_DONE, WORSE,
)
from covreport.errors import CovreportError, ReportError, ScoresError, StatsError

PACKAGES = (
    "torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "statsmodels",
    "pingouin", "matplotlib", "jinja2", "weasyprint", "pydicom", "pillow",
)


@dataclass
class RunOptions:
    """What ``covreport run`` was asked to do (paths are as given by the user)."""

    manifest: Path
    out: Path
    scores: Path | None = None
    weights: str | None = None
    validation_csv: Path | None = None
    validation_scores: Path | None = None
    reference_csv: Path | None = None
    study: Path | None = None
    templates: Path | None = None
    protocol: str = "penalised"
    permutations: int = 1000
    seed: int = 0
    force: bool = False
    strict: bool = False
    cache: Path | None = None
    use_cache: bool = True
    pdf: bool = True
    synthetic: bool = False
    bootstrap: int = 2000
    predictive_ci: str = "exact"
    threshold: float = 0.5
    predictors: str = ""
    target: str = ""
    positive: str = ""
    site: str = "source"     # DEFAULT_SITE
    validation: str = "leave-one-patient-out"
    table1_tests: bool = False
    style: str = "radiology"
    previous: tuple = ()
    command: str = ""
    extra_provenance: dict = field(default_factory=dict)


def label_columns(scores):
    """Label columns of a scores table: every column but ``image`` and ``feat_*``."""
    return [c for c in scores.columns if c != IMAGE_COLUMN and not str(c).startswith(FEATURE_PREFIX)]


def run(opts: RunOptions) -> Path:
    """Run the whole study and write its outputs to ``opts.out``; return that path.

    With ``opts.scores`` (reviewer mode) the image files are neither opened
    nor looked up: a pair is analysed when both its images have a row in the
    scores file. With weights, every image is checked, scored (through the
    cache) and a pair whose image cannot be scored is an exclusion. Under
    torchrun the ranks share the scoring (:mod:`covreport.distributed`) and
    only rank 0 goes on to the statistics and the report; the other ranks
    return None after scoring.
    """
    from covreport.manifest import read_manifest

    out = Path(opts.out)
    _check_out(opts)
    weights = opts.weights
    if opts.scores is None and weights is None:
        from covreport.model import find_weights

        weights = str(find_weights(None))  # raises with how to train / where to put weights
    loaded, scoring = None, None
    if opts.scores is not None:
        from covreport.scores_file import read_scores

        with progress.stage(f"Reading manifest {opts.manifest}"):
            manifest = read_manifest(opts.manifest, strict=opts.strict, check_images=False)
        _check_out(opts, _manifest_image_paths(manifest))
        _check_predictors(manifest, opts)
        _check_target(manifest, opts)
        _check_site(manifest, opts)
        scores = read_scores(opts.scores, require_features=True)
        manifest = manifest.exclude_unscored(scores[IMAGE_COLUMN], strict=opts.strict)
    else:
        from covreport.model import load_checkpoint
        from covreport.scoring import score_manifest

        with progress.stage(f"Reading manifest {opts.manifest}"):
            manifest = read_manifest(opts.manifest, strict=opts.strict)
        _check_out(opts, _manifest_image_paths(manifest))
        _check_predictors(manifest, opts)
        _check_target(manifest, opts)
        _check_site(manifest, opts)
        loaded = load_checkpoint(weights)
        res = score_manifest(manifest, loaded, cache_path=opts.cache, use_cache=opts.use_cache, progress=True)
        from covreport.distributed import is_main

        if not is_main():  # a torchrun rank other than 0: its scores are merged; rank 0 goes on alone
            return None
        scores = res.scores
        # How this run got its scores describes the run, not the study: provenance, not flow.
        scoring = {"images_computed": int(res.scored), "images_from_cache": int(res.from_cache),
                   "cache_rows_rejected": int(res.cache_rows_rejected)}
        manifest = manifest.exclude_unscored(scores[IMAGE_COLUMN], failed=res.failed, strict=opts.strict)
    labels = label_columns(scores)
    if not labels:
        raise ScoresError(f"{opts.scores}: no label columns (columns other than 'image' and 'feat_*')")

    pairs, exclusions = _analysed_pairs(manifest, scores, labels)
    pairs = canonical_pairs(pairs)   # no result depends on row order or pair-id spelling
    reference = None
    if opts.reference_csv is not None:
        from covreport.chexpert import read_reference_csv

        reference = read_reference_csv(opts.reference_csv)
    validation_auc, roc = _validation(opts, loaded, labels)
    study = {}
    if opts.study is not None:
        from covreport.study import read_study

        study = read_study(opts.study)
    previous = []
    if opts.previous:
        from covreport.revalidation import load_results

        previous = [load_results(p) for p in opts.previous]
        for data, path in zip(previous, opts.previous):  # shown and stored without local folders
            data["_path"] = portable_path(path, Path(manifest.path).parent)

    with progress.stage(f"Statistics on {len(pairs)} pairs"):
        statistics = compute_statistics(pairs, labels, scores, opts, reference=reference,
                                        primary_contrast=study.get("primary_contrast"))
    results = {
        "covreport_version": __version__,
        "provenance": _provenance(opts, manifest, weights, loaded, scoring),
        "study": study,
        "labels": labels,
        "flow": _flow(manifest, pairs, exclusions, scores),
        "pairs": _pairs_records(pairs, labels),
        "interval_days": _interval_summary(pairs["interval_days"]),
        "table1": statistics.pop("table1"),
        "validation_auc": validation_auc,
        "roc_curves": roc,
        **statistics,
    }
    if previous:
        from covreport.revalidation import compare

        results["revalidation"] = compare(results, previous)
    from covreport.plan import make_plan

    results["sample_size"] = make_plan(results)
    # Which pairs the activation maps show depends on the scores and the prediction only, so it is stored in
    # results.json (and the report's text comes from there); the maps themselves need the model.
    selection = _cam_pairs(pairs, labels, results.get("prediction"))
    results["class_activation_maps"] = _cam_record(*selection)
    with progress.stage(f"Writing report to {out}"):
        cams = _cams(loaded, *selection) if loaded is not None else None
        return _write_outputs(results, out, opts, cams)


def compute_statistics(pairs, labels, scores, opts, *, reference=None, primary_contrast=None):
    """Every analysis of the study on the analysed pairs; a dict of results.json keys.

    The pairs are first put in canonical order by content (patient, first
    date or offset, first image, second image; :func:`canonical_pairs`), so
    that no result depends on the manifest's row order or on how pair ids are
    spelled.

    Parameters
    ----------
    pairs : pandas.DataFrame
        The analysed pairs with ``<label> first/second/change`` columns.
    labels : list of str
    scores : pandas.DataFrame
        The scores table (``image``, labels, ``feat_*``).
    opts : RunOptions
        Read only: the statistical options (protocol, permutations, seed,
        bootstrap, predictive_ci).
    reference : pandas.DataFrame, optional
        The reference population of Table 1 (``read_reference_csv``).
    primary_contrast : str, optional
        The contrast of the primary endpoint (``study.toml`` ``primary_contrast``;
        default Worse vs Improved), recorded in ``primary_analysis``.
    """
    from covreport.stats import compare_groups, predict_outcome, table_one
    from covreport.stats.calibration import CURVE_RESAMPLES
    from covreport.stats.clustered import cluster_bootstrap, group_differences_clustered, primary_analysis
    from covreport.stats.decision_curve import decision_curves
    from covreport.stats.table1 import table_one_patients

    pairs = canonical_pairs(pairs)
    demo = pairs[["patient_id", "outcome", "age", "sex"]]
    t1 = table_one(demo, reference)
    t1["unit"] = t1["counted_by"].map({"pair": "pair", "patient": "patient"}).fillna("image")
    t1_patients = table_one_patients(demo, reference)
    changes = pairs[["patient_id", "outcome"]].copy()
    for lab in labels:
        changes[lab] = pairs[f"{lab} change"]
    groups = compare_groups(changes, labels)
    endpoint = primary_analysis(pairs["patient_id"], primary_contrast)
    clustered = group_differences_clustered(changes, labels, changes["patient_id"], seed=opts.seed,
                                            primary=CONTRASTS[CONTRAST_NAMES.index(endpoint["contrast"])])
    sensitivity = _sensitivity(pairs, changes, labels, opts.seed)
    feats = [c for c in scores.columns if str(c).startswith(FEATURE_PREFIX)]
    if not feats:
        raise ScoresError("the scores have no feature columns feat_0000 ... feat_1023; "
                          "rescore with `covreport score` to get them")
    by_image = scores.set_index(IMAGE_COLUMN)
    first = by_image.loc[pairs["first_image"], feats].to_numpy(dtype=float)
    second = by_image.loc[pairs["second_image"], feats].to_numpy(dtype=float)
    task, target = _prediction_outcome(pairs, opts)
    prediction = predict_outcome(
        pd.DataFrame(first, columns=feats), pd.DataFrame(second, columns=feats),
        task, pairs["patient_id"].to_numpy(), pairs["pair_id"].to_numpy(),
        order_keys=_order_keys(pairs).drop(columns=["patient_id"]),
        headline=opts.protocol, n_permutations=opts.permutations, seed=opts.seed,
        predictive_ci=opts.predictive_ci, n_bootstrap=opts.bootstrap, threshold=opts.threshold,
        calibration_resamples=min(opts.bootstrap, CURVE_RESAMPLES),
        classes=(target["positive_class"], target["negative_class"]) if target else None,
    )
    decision = decision_curves(prediction, n_resamples=opts.bootstrap, seed=opts.seed)
    checks = _ai_checks(pairs, prediction)
    sites = _sites(pairs, prediction, opts, first)
    classes = (prediction["positive_class"], prediction["negative_class"])
    added = _added_value(pairs, first, opts, task, classes) if opts.predictors else None
    if opts.predictors:
        from covreport.stats.added_value import predictor_summary

        t1_predictors = predictor_summary(_predictor_frame(pairs), predictor_specs(opts.predictors),
                                          pairs["outcome"].to_numpy())
    bootstrap = None
    if opts.bootstrap:
        predicted, positive = {}, prediction["positive_class"]
        for key in ("penalised", "nested", "global", "reversed"):
            block = prediction.get(key) or {}
            rows = [r for r in block.get("pairs", []) if r["predicted"] is not None]
            if rows:
                predicted[key] = {"patient_id": [r["patient_id"] for r in rows],
                                  "outcome": [r["outcome"] == positive for r in rows],
                                  "predicted": [r["predicted"] == positive for r in rows]}
        bootstrap = cluster_bootstrap(pairs["patient_id"], predicted, changes, labels,
                                      n_resamples=opts.bootstrap, seed=opts.seed)
        bootstrap["group_differences"] = _records(pd.DataFrame(bootstrap["group_differences"]))
    return {
        "primary_analysis": endpoint,
        "table1": _records(t1),
        "table1_patients": _records(t1_patients),
        **({"table1_predictors": _records(t1_predictors)} if opts.predictors else {}),
        **({"prediction_target": target} if target else {}),
        **({"sites": sites} if sites else {}),
        "group_differences": _records(groups),
        "group_differences_clustered": _records(clustered),
        **sensitivity,
        "prediction": prediction,
        "decision_curve": decision,
        "bootstrap": bootstrap,
        **checks,
        **({"added_value": added} if added is not None else {}),
    }


def predictor_specs(text):
    """The ``--predictors`` list: comma-separated ``name`` or ``name=LEVEL1/LEVEL2`` items."""
    return [p.strip() for p in str(text or "").split(",") if p.strip()]


def _predictor_frame(pairs):
    """The pairs' columns a predictor may name: the manifest's, plus ``projection_change`` (same/changed)."""
    from covreport.stats.mixed import _projection

    frame = pairs.copy()
    if "projection_change" not in frame and {"first_view", "second_view"} <= set(frame):
        change = _projection(frame["first_view"], frame["second_view"])
        frame["projection_change"] = np.where(change == "unknown", "", change)
    return frame


def _check_predictors(manifest, opts):
    """--predictors checked on every manifest row before any image is scored (file, line, column, fix)."""
    if not opts.predictors:
        return
    from covreport.stats.added_value import predictor_matrix

    try:
        predictor_matrix(_predictor_frame(manifest.pairs), predictor_specs(opts.predictors))
    except StatsError as exc:
        raise StatsError(f"{opts.manifest}: --predictors: {exc}") from None


def _prediction_outcome(pairs, opts):
    """The prediction's outcome per pair and the ``prediction_target`` record (None without ``--target``).

    By default the radiological outcome (Worse vs Improved, Stable left out);
    with ``--target`` the class of the target column on every analysed pair
    (None where it is blank).
    """
    if not opts.target:
        return pairs["outcome"].to_numpy(), None
    from covreport.stats.target import target_classes, target_record

    try:
        classes, record = target_classes(pairs, opts.target, opts.positive)
    except StatsError as exc:
        raise StatsError(f"--target, among the {len(pairs)} analysed pairs: {exc}") from None
    return classes, target_record(pairs, classes, record)


#: The manifest column the site analysis reads when ``--site`` names none.
DEFAULT_SITE = "source"


#: The validation schemes of ``--validation``.
VALIDATIONS = ("leave-one-patient-out", "leave-one-site-out")


def _check_site(manifest, opts):
    """--site and --validation checked before any image is scored (a named column must exist; the default
    may be absent, unless leave-one-site-out needs it)."""
    from covreport.stats.sites import site_labels

    if opts.validation not in VALIDATIONS:
        raise StatsError(f"--validation must be one of {', '.join(VALIDATIONS)}, got {opts.validation!r}")
    if opts.site and (opts.site != DEFAULT_SITE or opts.validation == VALIDATIONS[1]):
        try:
            labels = site_labels(manifest.pairs, opts.site)
        except StatsError as exc:
            raise StatsError(f"{opts.manifest}: {exc}") from None
    if opts.validation == VALIDATIONS[1]:
        n = len({s for s in labels if s is not None}) if opts.site else 0
        if n < 2:
            raise StatsError(f"{opts.manifest}: --validation leave-one-site-out needs 2 or more sites in the "
                             f"--site column {opts.site!r}; it has {n}: give the column that names each pair's "
                             "site, or validate leave-one-patient-out")


def _sites(pairs, prediction, opts, first):
    """Performance by site and its meta-analysis (issue 22, section 4), or None with fewer than 2 sites.

    With ``--validation leave-one-site-out`` the record also holds the internal-external
    cross-validation (``iecv``): each site predicted by the headline protocol fitted on the others.
    """
    if not opts.site or opts.site not in pairs.columns:
        return None
    from covreport.stats.sites import site_analysis, site_labels

    by_pair = dict(zip(pairs["pair_id"], site_labels(pairs, opts.site)))
    if len({s for s in by_pair.values() if s is not None}) < 2:
        return None
    name = prediction.get("headline")
    classes = (prediction["positive_class"], prediction["negative_class"])
    records = [r for r in (prediction.get(name) or {}).get("pairs") or [] if r.get("probability") is not None]
    if not records:
        return None
    out = site_analysis(records, [by_pair.get(r["pair_id"]) for r in records], column=opts.site, protocol=name,
                        classes=classes)
    out["validation"] = opts.validation
    if opts.validation == VALIDATIONS[1]:
        out["iecv"] = _iecv(pairs, prediction, first, by_pair, classes, opts)
    return out


def _iecv(pairs, prediction, first, by_pair, classes, opts):
    """Internal-external cross-validation by site of the headline protocol, with its own site meta-analysis."""
    from covreport.stats.lopo import iecv_predict
    from covreport.stats.prediction import _at_threshold
    from covreport.stats.sites import site_analysis

    name = prediction["headline"]
    recs = [r for r in prediction[name]["pairs"] if by_pair.get(r["pair_id"]) is not None]
    left_out = len(prediction[name]["pairs"]) - len(recs)
    row_of = {pid: i for i, pid in enumerate(pairs["pair_id"])}
    X = first[[row_of[r["pair_id"]] for r in recs]]
    y = np.array([r["outcome"] == classes[0] for r in recs], dtype=np.int64)
    sites = [by_pair[r["pair_id"]] for r in recs]
    fit = iecv_predict(X, y, [r["patient_id"] for r in recs], sites, protocol=prediction[name]["protocol"])
    hit = _at_threshold({"probabilities": fit["probabilities"]}, y, opts.threshold)["predicted"]
    external = [{"pair_id": r["pair_id"], "patient_id": r["patient_id"], "site": s, "outcome": r["outcome"],
                 "probability": float(p), "predicted": classes[1 - int(h)]}
                for r, s, p, h in zip(recs, sites, fit["probabilities"], hit)]
    res = site_analysis(external, sites, column=opts.site, protocol=name, classes=classes)
    overall = site_analysis(external, ["all sites"] * len(external), column=opts.site, protocol=name,
                            classes=classes)["rows"][0]
    return {"protocol": name, "method": fit["method"], "n_pairs": len(recs), "n_sites": res["n_sites"],
            "pairs_without_site": left_out, "one_class_folds": fit["one_class_folds"], "threshold": opts.threshold,
            "overall": {k: v for k, v in overall.items() if k not in ("site", "pooled", "note")},
            "rows": res["rows"], "meta": res["meta"], "pairs": external, "unit": "pair",
            "reference": "Royston P, Parmar MKB, Sylvester R. Stat Med 2004;23:907-926; Steyerberg EW, Harrell FE. "
                         "J Clin Epidemiol 2016;69:245-247"}


def _check_target(manifest, opts):
    """--target and --positive checked on every manifest row before any image is scored."""
    if not opts.target and not opts.positive:
        return
    if not opts.target:
        raise StatsError(f"--positive {opts.positive} is given without --target: name the manifest column "
                         "that holds the target with --target COLUMN")
    from covreport.stats.target import target_classes

    try:
        target_classes(manifest.pairs, opts.target, opts.positive)
    except StatsError as exc:
        raise StatsError(f"{opts.manifest}: {exc}") from None


def _added_value(pairs, first, opts, task, classes):
    """Clinical, imaging and combined models on the pairs of the prediction with every predictor (issue 22).

    ``task`` is the prediction's outcome per pair (:func:`_prediction_outcome`)
    and ``classes`` its (positive, negative) classes: the models predict the
    same outcome as the prediction, on its pairs.
    """
    from covreport.stats.added_value import added_value, blank_mask, predictor_matrix

    task = np.asarray(task, dtype=object)
    keep = np.isin(task, classes)
    frame = _predictor_frame(pairs.loc[keep].reset_index(drop=True))
    X, complete, specs = predictor_matrix(frame, predictor_specs(opts.predictors))
    blanks = {s["name"]: blank_mask(frame[s["name"]]) for s in specs}
    missing = [{"pair_id": str(frame["pair_id"][i]), "patient_id": str(frame["patient_id"][i]),
                "reason": "missing " + ", ".join(name for name, b in blanks.items() if b[i])}
               for i in np.flatnonzero(~complete)]
    sub = frame.loc[complete].reset_index(drop=True)
    task = task[keep][complete]
    y = (task == classes[0]).astype(int)
    record = {"predictors": specs, "pairs_in_prediction": int(len(frame)), "pairs_analysed": int(len(sub)),
              "patients_analysed": int(sub["patient_id"].nunique()), "excluded": missing, "unit": "pair",
              "interval_unit": "patient", "note": None}
    if len(sub) < 4 or y.sum() < 2 or (1 - y).sum() < 2 or sub["patient_id"].nunique() < 3:
        record["note"] = (f"not run: {len(sub)} pairs ({int(y.sum())} {classes[0]}, {int((1 - y).sum())} "
                          f"{classes[1]}) of "
                          f"{sub['patient_id'].nunique()} patients have every predictor; the models need at least "
                          "2 of each class and 3 patients")
        return record
    res = added_value(first[keep][complete], X.loc[complete].to_numpy(), y, sub["patient_id"].to_numpy(),
                      n_resamples=opts.bootstrap, seed=opts.seed)
    probs = {name: m.pop("probabilities") for name, m in res["models"].items()}
    record.update(res)
    record["pairs"] = [{"pair_id": str(sub["pair_id"][i]), "patient_id": str(sub["patient_id"][i]),
                        "outcome": str(task[i]), **{f"p_{k}": v[i] for k, v in probs.items()}}
                       for i in range(len(sub))]
    return record


def _ai_checks(pairs, prediction):
    """Subgroup performance, failure analysis and patient separation of the headline protocol (issue 20, section 9)."""
    from covreport.stats.subgroups import (
        FAILURE_METHOD, SUBGROUP_METHOD, failure_analysis, patient_separation, subgroup_performance,
    )

    name = prediction.get("headline")
    classes = (prediction.get("positive_class", WORSE), prediction.get("negative_class", IMPROVED))
    records = [r for r in (prediction.get(name) or {}).get("pairs") or [] if r.get("probability") is not None]
    covariates = pairs.set_index("pair_id").reindex([r["pair_id"] for r in records])
    dates = [v for c in ("first_date", "second_date") if c in pairs for v in pairs[c]]  # every analysed pair
    return {"subgroups": {"protocol": name, "method": SUBGROUP_METHOD,
                          "rows": subgroup_performance(records, covariates.reset_index(drop=True),
                                                       classes=classes)},
            "failure_analysis": {"protocol": name, "method": FAILURE_METHOD.format(positive=classes[0]),
                                 "rows": failure_analysis(records, positive=classes[0])},
            "patient_separation": {"protocol": name, **patient_separation(records, dates=dates)}}


def _sensitivity(pairs, changes, labels, seed):
    """Mixed models (interval, projection), the trend test and the projection counts (issue 20, section 4)."""
    from covreport.stats.mixed import jonckheere_terpstra, mixed_model_contrasts, projection_changes

    extra = changes.copy()
    for col in ("interval_days", "first_view", "second_view"):
        if col in pairs.columns:
            extra[col] = pairs[col].to_numpy()
    return {"mixed_model": _records(mixed_model_contrasts(extra, labels)),
            "trend_test": _records(jonckheere_terpstra(changes, labels, changes["patient_id"], seed=seed)),
            "projection_changes": _records(projection_changes(extra))}


#: Columns that order pairs canonically by content (those present are used, in this order).
_ORDER_COLUMNS = ("patient_id", "first_date", "first_offset_days", "first_image", "second_image", "pair_id")


def canonical_pairs(pairs):
    """The pairs in canonical order: patient, first date or offset, first image, second image.

    The pair id comes last, so it only orders pairs identical in all the rest.
    """
    from covreport.stats._util import canonical_order

    return pairs.iloc[canonical_order(_order_keys(pairs))].reset_index(drop=True)


def _order_keys(pairs):
    return pd.DataFrame({c: (pairs[c].to_numpy() if c in pairs.columns else [None] * len(pairs))
                         for c in _ORDER_COLUMNS})


# --- stages ----------------------------------------------------------------


def _analysed_pairs(manifest, scores, labels):
    """The pairs that are not excluded, joined with their probabilities, and the exclusions."""
    exclusions = manifest.exclusions
    if len(exclusions):  # in the pairs' canonical order, like every other list: not in row order
        rank = dict(zip(canonical_pairs(manifest.pairs)["pair_id"], range(len(manifest.pairs))))
        order = np.argsort(exclusions["pair_id"].map(rank).to_numpy(), kind="stable")
        exclusions = exclusions.iloc[order].reset_index(drop=True)
    pairs = manifest.analysable_pairs()
    if pairs.empty:
        raise CovreportError("no pair is left to analyse: every pair was excluded "
                             "(see `covreport validate` for the reasons)")
    probs = scores.set_index(IMAGE_COLUMN)[labels]
    for lab in labels:
        first = probs.loc[pairs["first_image"], lab].to_numpy(dtype=float)
        second = probs.loc[pairs["second_image"], lab].to_numpy(dtype=float)
        pairs[f"{lab} first"] = first
        pairs[f"{lab} second"] = second
        pairs[f"{lab} change"] = second - first
    return pairs, exclusions


def _flow(manifest, pairs, exclusions, scores):
    all_pairs = manifest.pairs
    images = pd.unique(pd.concat([all_pairs["first_image"], all_pairs["second_image"]]))
    counts = (exclusions.groupby(["stage", "cause"], sort=True).size().reset_index(name="pairs")
              .rename(columns={"cause": "reason"})
              if len(exclusions) else pd.DataFrame(columns=["stage", "reason", "pairs"]))
    by_outcome = {}
    for outcome in OUTCOMES:
        sub = pairs[pairs["outcome"] == outcome]
        by_outcome[outcome] = {"pairs": int(len(sub)), "patients": int(sub["patient_id"].nunique())}
    flow = {
        "pairs_in_manifest": int(len(all_pairs)),
        "patients_in_manifest": int(all_pairs["patient_id"].nunique()),
        "exclusions": _records(exclusions[["pair_id", "patient_id", "outcome", "stage", "reason"]]),
        "exclusion_counts": _records(counts),
        "pairs_analysed": int(len(pairs)),
        "patients_analysed": int(pairs["patient_id"].nunique()),
        "by_outcome": by_outcome,
        "images_in_manifest": int(len(images)),
        "images_scored": int(pd.Series(images).isin(scores[IMAGE_COLUMN]).sum()),
    }
    return flow


def _pairs_records(pairs, labels):
    cols = ["pair_id", "patient_id", "outcome", "first_image", "second_image", "interval_days"]
    for lab in labels:
        cols += [f"{lab} first", f"{lab} second", f"{lab} change"]
    return _records(pairs[cols])


def _interval_summary(days):
    d = pd.to_numeric(days, errors="coerce").dropna().to_numpy(dtype=float)
    if d.size == 0:
        return None
    q1, med, q3 = np.percentile(d, [25, 50, 75])
    return {"n": int(d.size), "median": float(med), "q1": float(q1), "q3": float(q3),
            "min": float(d.min()), "max": float(d.max()),
            "method": "median, interquartile range (25th-75th percentiles, linear interpolation) and range "
                      "of second-minus-first CXR dates, in days"}


def _validation(opts, loaded, labels):
    """Per-label validation AUCs with DeLong CIs, and ROC curve points."""
    if opts.validation_csv is None:
        return [], {}
    from covreport.chexpert import read_chexpert_csv
    from covreport.stats.auc import roc_curve_points, validation_auc

    truth = read_chexpert_csv(opts.validation_csv)
    if opts.validation_scores is not None:
        from covreport.scores_file import read_scores

        vscores = read_scores(opts.validation_scores)
    elif loaded is not None:
        from covreport.scoring import score_images

        root = Path(opts.validation_csv).resolve().parent.parent
        paths = [str(root / p) for p in truth["Path"]]
        res = score_images(paths, loaded, cache=_open_cache(opts), what="validation images")
        vscores = res.scores.copy()
        vscores[IMAGE_COLUMN] = vscores[IMAGE_COLUMN].map(dict(zip(paths, truth["Path"])))
    else:
        raise ScoresError("--validation-csv needs --validation-scores (or --weights to score its images)")
    vscores = vscores.set_index(IMAGE_COLUMN)
    missing = [p for p in truth["Path"] if p not in vscores.index]
    if missing:
        raise ScoresError(f"{len(missing)} validation image(s) have no score, e.g. {missing[0]!r}; "
                          "the scores' 'image' column must hold the CSV's Path values")
    use = [lab for lab in labels if lab in truth.columns]
    missing_labels = [lab for lab in use if lab not in vscores.columns]
    if missing_labels:
        source = opts.validation_scores or opts.weights
        raise ScoresError(f"{source}: the validation scores lack the label column(s) {missing_labels} "
                          "that the analysis uses; score the validation images with the same weights")
    aligned = vscores.loc[truth["Path"], use].reset_index(drop=True)
    table = validation_auc(truth[use].reset_index(drop=True), aligned, use)
    roc = {}
    for lab in use:
        y = pd.to_numeric(truth[lab], errors="coerce").to_numpy()
        keep = np.isin(y, (0, 1))
        if keep.sum() and 0 < y[keep].sum() < keep.sum():
            fpr, tpr = roc_curve_points(y[keep].astype(int), aligned[lab].to_numpy(dtype=float)[keep])
            roc[lab] = {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
    return _records(table), roc


def _open_cache(opts):
    if not opts.use_cache:
        return None
    from covreport.cache import ScoreCache

    return ScoreCache(opts.cache)  # None: the default under the user's cache folder


#: How the pairs shown with class activation maps are chosen (stated in the report's caption).
CAM_RULE = ("one pair per reference-standard category: for Worse and Improved, the pair whose out-of-fold "
            "predicted probability of Worse (headline protocol) is closest to the median of its category; for "
            "Stable, which is not predicted, the pair whose change in the label is closest to the category's "
            "median change; the label is the one with the highest mean probability over all analysed CXRs")


def _cam_pairs(pairs, labels, prediction):
    """The pairs shown with activation maps, by :data:`CAM_RULE`: [(row, probability or None)], and the label."""
    label = max(labels, key=lambda lab: float(np.nanmean(np.r_[pairs[f"{lab} first"], pairs[f"{lab} second"]])))
    block = (prediction or {}).get((prediction or {}).get("headline", "nested")) or {}
    prob = {p["pair_id"]: p.get("probability") for p in block.get("pairs") or [] if p.get("probability") is not None}
    chosen = []
    for outcome in OUTCOMES:
        sub = pairs[pairs["outcome"] == outcome]
        if sub.empty:
            continue
        probs = sub["pair_id"].map(prob)
        if probs.notna().any():
            have = sub[probs.notna()]
            p = probs[probs.notna()].astype(float)
            idx = (p - p.median()).abs().idxmin()
            chosen.append((have.loc[idx], float(p.loc[idx])))
        else:
            change = sub[f"{label} change"].astype(float)
            idx = (change - change.median()).abs().idxmin()
            chosen.append((sub.loc[idx], None))
    return chosen, label


def _cam_record(chosen, label):
    """The ``class_activation_maps`` record of results.json: the label, the rule and the chosen pairs."""
    return {"label": label, "rule": CAM_RULE,
            "method": "Class activation maps (Zhou et al. 2016) of the label on the first and second CXR of each "
                      "chosen pair, both CXRs of a pair on one colour scale",
            "pairs": [{"pair_id": rec["pair_id"], "outcome": rec["outcome"], "probability": probability,
                       "label_first": float(rec[f"{label} first"]), "label_second": float(rec[f"{label} second"])}
                      for rec, probability in chosen]}


def _cams(loaded, chosen, label):
    """Class activation maps of the first and second CXR of the chosen pairs (see :data:`CAM_RULE`)."""
    from covreport.images import load_image
    from covreport.model import class_activation_map

    labels = list(loaded.labels)  # the scores' labels are the model's
    cams = []
    for rec, probability in chosen:
        cam = {"pair_id": rec["pair_id"], "label": label, "outcome": rec["outcome"], "probability": probability,
               "label_first": float(rec[f"{label} first"]), "label_second": float(rec[f"{label} second"]),
               "rule": CAM_RULE}
        for which in ("first", "second"):
            image = load_image(rec[f"{which}_path"])
            heat, _overlay = class_activation_map(loaded.model, image, label, labels=labels,
                                                  preprocessing=loaded.preprocessing)
            cam[which] = {"image": image, "heatmap": heat}
        cams.append(cam)
    return cams


# --- provenance and writing --------------------------------------------------


def _is_phantom(manifest):
    """True when every pair comes from covreport's synthetic phantom (its ``source`` column)."""
    source = manifest.pairs.get("source")
    return source is not None and len(source) > 0 and bool((source == "phantom").all())


#: RunOptions fields that change a number of results.json: recorded in
#: ``provenance.options`` so that a rerun (``covreport verify``) can repeat them.
NUMBER_OPTIONS = ("protocol", "seed", "permutations", "bootstrap", "predictive_ci", "threshold", "strict",
                  "predictors", "target", "positive", "site", "validation")


def portable_path(path, base):
    """``path`` relative to ``base`` when it lies below it, else its file name: never an absolute path."""
    p = Path(os.path.abspath(path))
    try:
        return p.relative_to(os.path.abspath(base)).as_posix()
    except ValueError:
        return p.name


def _portable_command(command, base):
    """The command line with every absolute path made portable (see :func:`portable_path`)."""
    try:
        args = shlex.split(command)
    except ValueError:
        return command
    return shlex.join(portable_path(a, base) if os.path.isabs(a) else a for a in args)


def _provenance(opts, manifest, weights, loaded, scoring):
    """Where the results came from, built from what the loaders read; paths relative to the manifest."""
    base = Path(manifest.path).parent
    inputs = {"manifest": {"path": portable_path(manifest.path, base), "sha256": manifest.sha256,
                           **from_results(manifest.path, opts.out)}}
    if opts.scores is not None:
        inputs["scores"] = _input(opts.scores, base, opts.out)
    shown = None
    if loaded is not None:
        shown = portable_path(weights, base) if Path(str(weights)).exists() else str(weights)
        inputs["weights"] = {"path": shown, "sha256": loaded.sha256,
                             **(from_results(weights, opts.out) if Path(str(weights)).exists() else {})}
    if opts.validation_csv is not None:
        inputs["validation_csv"] = _input(opts.validation_csv, base, opts.out)
        if opts.validation_scores is not None:
            inputs["validation_scores"] = _input(opts.validation_scores, base, opts.out)
    for key in ("reference_csv", "study"):
        if getattr(opts, key) is not None:
            inputs[key] = _input(getattr(opts, key), base, opts.out)
    for i, path in enumerate(opts.previous, 1):
        inputs[f"previous_{i}"] = _input(path, base, opts.out)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = _md.version(name)
        except _md.PackageNotFoundError:
            versions[name] = None
    prov = {
        "covreport_version": __version__,
        "python": platform.python_version(),
        "packages": versions,
        "inputs": inputs,
        "weights_sha256": loaded.sha256 if loaded is not None else None,
        "preprocessing": loaded.preprocessing.to_dict() if loaded is not None else None,
        "model": _model_summary(loaded, shown),
        "seed": int(opts.seed),
        "protocol": opts.protocol,
        "permutations": int(opts.permutations),
        "options": {k: getattr(opts, k) for k in NUMBER_OPTIONS},
        "command": _portable_command(opts.command, base),
        "created": _created(),
        "synthetic": bool(opts.synthetic) or _is_phantom(manifest),
        # What the report shows, not a number: Table 1's baseline p-values beside the SMDs, the number style.
        "report_options": {"table1_tests": bool(opts.table1_tests), "style": opts.style},
    }
    if scoring is not None:
        prov["scoring"] = scoring
    if opts.templates is not None:  # the report's own templates (not a number): verify needs them too
        prov["templates"] = portable_path(opts.templates, base)
    prov.update(opts.extra_provenance)
    return prov


def _input(path, base, out):
    return {"path": portable_path(path, base), "sha256": sha256_file(path), **from_results(path, out)}


def from_results(path, out):
    """``{"from_results": "../study/manifest.csv"}``: ``path`` relative to the results folder ``out``.

    Recorded only when ``path`` lies inside the folder that holds ``out``
    (so the path climbs at most that one level and names no local folder
    above it); ``{}`` otherwise. ``covreport verify DIR`` looks for the input
    there first (docs/RESULTS.md).
    """
    p, out = os.path.abspath(path), os.path.abspath(out)
    root = os.path.dirname(out)
    if os.path.commonpath([p, root]) != root or p == root:
        return {}
    return {"from_results": Path(os.path.relpath(p, out)).as_posix()}


def _model_summary(loaded, source):
    if loaded is None:
        return None
    meta = dict(loaded.metadata or {})
    return {"source": source, "labels": list(loaded.labels),
            "training": meta.get("training") or meta.get("config"),
            "training_data_sha256": meta.get("training_data_sha256"),
            "validation_auc": meta.get("validation_auc")}


def _records(df):
    """JSON-safe records of a DataFrame: a null number gets a note saying why."""
    from covreport.stats import records

    return [{k: _clean(v) for k, v in row.items()} for row in records(df)]


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_clean(x) for x in v.tolist()]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def results_json(results):
    """Serialise results deterministically (sorted nothing; insertion order is fixed)."""
    return json.dumps(_clean(results), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _write_tables(results, folder):
    from covreport._io import write_csv_atomic as write_csv

    folder.mkdir()
    for key in ("table1", "table1_patients", "table1_predictors", "group_differences", "group_differences_clustered",
                "mixed_model", "trend_test", "projection_changes", "validation_auc", "pairs"):
        if results.get(key):
            write_csv(pd.DataFrame(results[key]), folder / f"{key}.csv")
    boot = results.get("bootstrap")
    if boot:
        rows = [{"protocol": protocol, "measure": measure, **ci}
                for protocol, measures in (boot.get("prediction") or {}).items() for measure, ci in measures.items()]
        if rows:
            write_csv(pd.DataFrame(rows), folder / "bootstrap_prediction.csv")
        if boot.get("group_differences"):
            write_csv(pd.DataFrame(boot["group_differences"]), folder / "bootstrap_group_differences.csv")
    if results.get("sample_size"):
        from covreport.plan import plan_rows

        rows = plan_rows(results["sample_size"])
        if rows:
            write_csv(pd.DataFrame(rows), folder / "sample_size.csv")
    if results.get("sites"):
        from covreport.stats.sites import META_COLUMNS, meta_rows

        write_csv(pd.DataFrame(results["sites"]["rows"]), folder / "sites.csv")
        write_csv(pd.DataFrame(meta_rows(results["sites"]), columns=list(META_COLUMNS)),
                  folder / "site_meta_analysis.csv")
        iecv = results["sites"].get("iecv")
        if iecv:
            write_csv(pd.DataFrame(iecv["rows"]), folder / "sites_iecv.csv")
            write_csv(pd.DataFrame(meta_rows(iecv), columns=list(META_COLUMNS)),
                      folder / "site_meta_analysis_iecv.csv")
    if (results.get("added_value") or {}).get("comparison"):
        write_csv(pd.DataFrame(results["added_value"]["comparison"]), folder / "model_comparison.csv")
    for key in ("subgroups", "failure_analysis"):
        if (results.get(key) or {}).get("rows"):
            write_csv(pd.DataFrame(results[key]["rows"]), folder / f"{key}.csv")
    flow = results["flow"]
    if flow["exclusions"]:
        write_csv(pd.DataFrame(flow["exclusions"]), folder / "exclusions.csv")
    reval = results.get("revalidation")
    if reval:
        write_csv(pd.DataFrame(reval["headline"]), folder / "revalidation_headline.csv")
    pred = results["prediction"]
    _write_prediction_tables(results, folder, write_csv)
    for name in ("penalised", "nested", "global", "reversed"):
        block = pred.get(name)
        if not block:
            continue
        metrics = pd.DataFrame([{"measure": m, **v} for m, v in block["metrics"].items()])
        write_csv(metrics, folder / f"prediction_{name}_metrics.csv")
        write_csv(pd.DataFrame(block["pairs"]), folder / f"prediction_{name}_pairs.csv")
        if block.get("cv_intervals"):
            write_csv(pd.DataFrame([{"measure": m, **{k: v for k, v in rec.items() if k != "bootstrap_percentile"}}
                                    for m, rec in block["cv_intervals"].items()]),
                      folder / f"prediction_{name}_cv_intervals.csv")
        if (block.get("final_model") or {}).get("coefficients"):
            write_csv(pd.DataFrame(block["final_model"]["coefficients"]), folder / f"prediction_{name}_model.csv")


def _prediction_blocks(prediction):
    """(name, block) of every protocol block of the prediction record, in its order (protocol-agnostic)."""
    return [(name, block) for name, block in (prediction or {}).items()
            if isinstance(block, dict) and isinstance(block.get("pairs"), list)]


def _write_prediction_tables(results, folder, write_csv):
    """tables/predictions.csv, decision_curve.csv and calibration.csv (the issue 19 output contract)."""
    from covreport.stats.calibration import calibration_rows
    from covreport.stats.decision_curve import COLUMNS

    blocks = _prediction_blocks(results.get("prediction"))
    rows = [{"pair_id": r["pair_id"], "patient_id": r["patient_id"], "protocol": name,
             "outcome": int(r["outcome"] == results["prediction"].get("positive_class", WORSE)),
             "probability": r["probability"], "fold": r.get("fold"),
             "one_class_fold": r.get("one_class_fold")}
            for name, block in blocks for r in block["pairs"] if r.get("probability") is not None]
    if rows:
        write_csv(pd.DataFrame(rows), folder / "predictions.csv")
    dca = (results.get("decision_curve") or {}).get("rows")
    if dca:
        write_csv(pd.DataFrame(dca, columns=list(COLUMNS)), folder / "decision_curve.csv")
    cal = [row for name, block in blocks if block.get("calibration") and block.get("confusion")
           for row in calibration_rows(name, block["calibration"])]
    if cal:
        write_csv(pd.DataFrame(cal), folder / "calibration.csv")


def _check_out(opts, images=()):
    """Refuse an --out that is the current folder, holds an input, or is not covreport's to replace."""
    from covreport._io import check_out_dir

    paths = [opts.manifest, opts.scores, opts.weights, opts.validation_csv, opts.validation_scores,
             opts.reference_csv, opts.study, opts.templates, *images]
    if opts.use_cache and (opts.scores is None or opts.validation_csv is not None):
        from covreport.cache import default_cache_path

        paths.append(opts.cache if opts.cache is not None else default_cache_path())
    # --previous results.json may lie in the folder being replaced: it is read before the swap.
    return check_out_dir(opts.out, inputs=paths, force=opts.force, error_class=ReportError)


def _manifest_image_paths(manifest):
    """The folders of the manifest's images (checking folders is enough: --out is a folder).

    Only the path strings are used: no image file is opened or looked up.
    """
    pairs = manifest.pairs
    cols = [c for c in ("first_path", "second_path") if c in pairs.columns]
    return sorted({os.path.dirname(str(p)) or "." for c in cols for p in pairs[c]
                   if isinstance(p, (str, os.PathLike)) and str(p)})


def _write_outputs(results, out, opts, cams):
    """Write everything into a marked temporary folder beside ``out``, then move it into place whole."""
    from covreport._io import staged_dir
    from covreport.report import render_report

    target = _check_out(opts)
    # The tables and the report are made from what results.json holds (NaN as null), as verify remakes them.
    results = _clean(results)
    try:
        with staged_dir(target, force=opts.force, error_class=ReportError,
                        swap=lambda *a, **k: _replace_dir(*a, **k)) as tmp:
            (tmp / "results.json").write_text(results_json(results), encoding="utf-8")
            _write_tables(results, tmp / "tables")
            render_report(results, tmp, templates=opts.templates, cams=cams, pdf=opts.pdf)
    except OSError as exc:
        raise ReportError(f"cannot write the outputs to {out}: {exc}") from exc
    return out


def _replace_dir(tmp, target, *, force):
    """The folder swap (:func:`covreport._io.swap_dir`); a seam for the fault-injection tests."""
    from covreport._io import swap_dir

    swap_dir(tmp, target, force=force, error_class=ReportError)


def _created():
    """Now (UTC, to the second), or the time SOURCE_DATE_EPOCH names (reproducible builds), as ISO 8601."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = _dt.datetime.now(_dt.timezone.utc)
    if epoch.isdigit():
        when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
    return when.replace(microsecond=0).isoformat()


#: Options that say where the work runs, not what is computed: left out of the recorded command, so that
#: results.json is the same for any number of workers and any backend.
EXECUTION_OPTIONS = ("--jobs", "--dask-scheduler")


def command_line():
    """The command that produced these results, for provenance (without :data:`EXECUTION_OPTIONS`)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in EXECUTION_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in EXECUTION_OPTIONS)):
            args.append(arg)
    return shlex.join(["covreport", *args])
