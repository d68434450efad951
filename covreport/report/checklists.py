"""The STARD 2015 checklist and the STARD-AI / CLAIM items, with one status rule."""

from __future__ import annotations

from covreport.report.training import training_text


def _study_status(study, fields):
    have = [f for f in fields if study.get(f)]
    miss = [f for f in fields if not study.get(f)]
    return have, miss


#: What items 10a, 14 and 18 add when a training recipe is stored with the weights.
_RECIPE_NOTE = {"10a": "training data and recipe described in words",
                "14": "the index test's own validation (per-label AUCs) and training recipe stated",
                "18": "training and validation set sizes of the index test stated"}


def _recipe(results):
    return training_text(results)


def item_status(auto_ok, fields, have, miss):
    """The one status rule of every checklist row.

    ``"covreport"`` when covreport reports the item and it needs no study.toml
    field; ``"covreport + study.toml"`` when it does and every field is filled;
    ``"study.toml"`` when only the authors' fields report it and all are filled;
    ``"partly"`` when something but not everything is there; ``"author"`` when
    nothing is. A field that says "not applicable" with its reason counts as filled.
    """
    if auto_ok and not miss:
        return "covreport" if not fields else "covreport + study.toml"
    if not auto_ok and fields and not miss:
        return "study.toml"
    if auto_ok or have:
        return "partly"
    return "author"


#: STARD 2015 items: (item, short title, section id, section name, what covreport fills or None, study fields).
STARD_ITEMS = (
    ("1", "Identification as a diagnostic accuracy study, with an accuracy measure", "title", "Title and abstract",
     "title names the design; abstract gives AUC, sensitivity, specificity", ()),
    ("2", "Structured abstract", "abstract", "Abstract", "design, methods and results with key numbers",
     ("conclusions",)),
    ("3", "Background and intended use of the index test", "introduction", "Introduction", None,
     ("background", "intended_use")),
    ("4", "Objectives and hypotheses", "introduction", "Introduction", None, ("objectives", "hypotheses")),
    ("5", "Prospective or retrospective data collection", "methods-design", "Methods: study design", None,
     ("data_collection",)),
    ("6", "Eligibility criteria", "methods-participants", "Methods: participants",
     "exclusions applied by covreport, with reasons", ("eligibility",)),
    ("7", "How participants were identified", "methods-participants", "Methods: participants", None,
     ("identification",)),
    ("8", "Setting, location and dates", "methods-participants", "Methods: participants", None,
     ("setting", "locations", "dates")),
    ("9", "Consecutive, random or convenience series", "methods-participants", "Methods: participants", None,
     ("series",)),
    ("10a", "Index test in detail", "methods-index", "Methods: index test",
     "model, weights SHA-256, training recipe, labels, preprocessing, software versions", ()),
    ("10b", "Reference standard in detail", "methods-reference", "Methods: reference standard",
     "outcome categories and their definitions", ("reference_standard",)),
    ("11", "Rationale for the reference standard", "methods-reference", "Methods: reference standard", None,
     ("rationale_reference_standard",)),
    ("12a", "Index-test positivity cut-offs or categories", "methods-index", "Methods: index test",
     "probabilities (no cut-off) and the prediction threshold, exploratory", ()),
    ("12b", "Reference-standard categories", "methods-reference", "Methods: reference standard",
     "Worse, Stable, Improved with definitions", ()),
    ("13a", "Information available to readers of the index test", "methods-index", "Methods: index test",
     "the model sees only the images", ("blinding_index",)),
    ("13b", "Information available to assessors of the reference standard", "methods-reference",
     "Methods: reference standard", None, ("blinding_reference",)),
    ("14", "Methods for estimating or comparing accuracy", "methods-analysis", "Methods: analysis",
     "every method by name with its reference", ()),
    ("15", "Handling of indeterminate results", "methods-analysis", "Methods: analysis",
     "exclusions by stage; uncertain labels", ()),
    ("16", "Handling of missing data", "methods-analysis", "Methods: analysis", "complete-case analysis", ()),
    ("17", "Analyses of variability", "methods-analysis", "Methods: analysis",
     "per label and contrast; nested vs global; reversed order", ()),
    ("18", "Intended sample size", "methods-analysis", "Methods: analysis", "achieved sample size and precision",
     ("intended_sample_size",)),
    ("19", "Flow of participants, with a diagram", "results-flow", "Results: participants",
     "flow diagram and exclusions table", ()),
    ("20", "Baseline characteristics", "results-characteristics", "Results: participants", "Table 1", ()),
    ("21a", "Distribution of severity in those with the target condition", "results-characteristics",
     "Results: participants", "pairs per outcome category", ("severity",)),
    ("21b", "Alternative diagnoses in those without the target condition", "results-characteristics",
     "Results: participants", None, ("alternative_diagnoses",)),
    ("22", "Interval and interventions between index test and reference standard", "results-interval",
     "Results: participants", "interval between the two CXRs", ("interventions",)),
    ("23", "Cross tabulation of index test by reference standard", "results-prediction", "Results: prediction",
     "confusion matrices, per-pair predictions", ()),
    ("24", "Accuracy estimates with precision", "results-accuracy", "Results: accuracy",
     "AUCs, sensitivity, specificity, PPV, NPV, LRs with 95% CIs", ()),
    ("25", "Adverse events", "results-adverse", "Results: adverse events", None, ("adverse_events",)),
    ("26", "Limitations", "discussion-limitations", "Discussion: limitations", "limitations computed from the numbers",
     ()),
    ("27", "Implications for practice", "discussion-implications", "Discussion: implications", None,
     ("implications",)),
    ("28", "Registration", "other", "Other information", None, ("registration",)),
    ("29", "Protocol", "other", "Other information", None, ("protocol",)),
    ("30", "Funding", "other", "Other information", None, ("funding",)),
)


def _available(item, results):
    """Whether the data behind an item covreport fills are present (and why not)."""
    if item == "20" and not results.get("table1"):
        return "no age or sex in the manifest"
    if item == "22" and not results.get("interval_days"):
        return "no CXR dates or offsets in the manifest"
    if item in ("23",) and not (results.get("prediction") or {}):
        return "no prediction results"
    if item == "24" and not ((results.get("prediction") or {}) or results.get("validation_auc")):
        return "no accuracy results"
    return None


def stard_checklist(results):
    """The STARD 2015 checklist, filled from the results and ``results["study"]``.

    Returns
    -------
    list of dict
        One row per item, in STARD order: ``item``, ``title``, ``section``
        (anchor id), ``section_name``, ``status`` (``"covreport"``,
        ``"study.toml"``, ``"covreport + study.toml"``, ``"partly"`` or
        ``"author"``), ``filled`` (what is reported), ``todo`` (the
        study.toml fields the author must still fill, or why data is missing).
    """
    study = results.get("study") or {}
    recipe = _recipe(results)
    rows = []
    prov = results.get("provenance") or {}
    reviewer = "scores" in (prov.get("inputs") or {}) or not prov.get("weights_sha256")
    for item, title, sec, sec_name, auto, fields in STARD_ITEMS:
        if item == "10a" and reviewer:  # covreport saw a scores file only: the authors describe the model
            auto, fields = "scores file with its SHA-256, labels, software versions", ("index_test",)
        have, miss = _study_status(study, fields)
        gap = _available(item, results) if auto else None
        if auto and gap:
            auto_ok = False
        else:
            auto_ok = bool(auto)
        status = item_status(auto_ok, fields, have, miss)
        filled = []
        if auto_ok:
            filled.append(auto)
        if have:
            filled.append("study.toml: " + ", ".join(have))
        todo = [f"study.toml: {f}" for f in miss]
        if gap:
            todo.append(gap)
        if item in ("10a", "14", "18") and recipe:
            filled.append(_RECIPE_NOTE[item] + (f"; deviations from the original recipe: {', '.join(recipe['deviations'])}"
                                                if recipe["deviations"] else "; the original study's recipe"))
        rows.append({"item": item, "title": title, "section": sec, "section_name": sec_name, "status": status,
                     "filled": "; ".join(filled), "todo": "; ".join(todo)})
    return rows


def ai_checklist(results, *, has_cams=False):
    """STARD-AI and CLAIM items covreport can fill, with their status (same shape as :func:`stard_checklist`)."""
    study = results.get("study") or {}
    prov = results.get("provenance") or {}
    inputs = prov.get("inputs") or {}
    model = prov.get("model") or {}
    # Reviewer mode: covreport read a scores file and never saw the model, so what it would have recorded
    # comes from the authors (study.toml: index_test), and activation maps do not apply.
    reviewer = "scores" in inputs or not prov.get("weights_sha256")
    by_author = ("index_test",) if reviewer else ()
    rows = []

    def add(title, sec, sec_name, ok, filled, fields=(), gap=None):
        have, miss = _study_status(study, fields)
        status = item_status(ok, fields, have, miss)
        todo = [f"study.toml: {f}" for f in miss] + ([gap] if (gap and not ok) else [])
        rows.append({"item": "", "title": title, "section": sec, "section_name": sec_name, "status": status,
                     "filled": "; ".join(([filled] if ok else []) + (["study.toml: " + ", ".join(have)] if have
                                                                      else [])),
                     "todo": "; ".join(todo)})

    add("Data sources, with file checksums", "reproducibility", "Reproducibility", bool(inputs),
        "input files with SHA-256", ("data_collection",))
    add("Data selection, exclusions and partitions", "results-flow", "Results: participants",
        bool(results.get("flow")), "flow diagram; test pairs and patients"
        + ("; training and validation sizes" if model.get("training") else ""))
    add("Reference-standard annotation (who, how)", "methods-reference", "Methods: reference standard", False, "",
        ("reference_standard",))
    add("Acquisition devices and protocols", "methods-participants", "Methods: participants", False, "",
        ("acquisition",))
    add("Preprocessing", "methods-index", "Methods: index test", bool(prov.get("preprocessing")),
        "recorded preprocessing", by_author, gap="preprocessing not recorded (scores file supplied)")
    add("Model and weights (architecture, SHA-256)", "methods-index", "Methods: index test",
        bool(prov.get("weights_sha256")), "weights SHA-256", by_author,
        gap="weights not available (scores file supplied)")
    recipe = _recipe(results)
    add("Model development (training data and recipe)", "methods-index", "Methods: index test",
        bool(recipe) or (reviewer and bool(study.get("index_test"))),
        "training data and recipe in words (initialisation, input size, uncertain labels, loss and class weights, "
        "optimiser, batch, epochs, no augmentation, checkpoint rule)"
        + (f"; deviations from the original recipe: {', '.join(recipe['deviations'])}" if recipe and recipe["deviations"]
           else "") if recipe else "described by the authors (study.toml: index_test)",
        by_author if not recipe else (), gap="no training recipe stored with the weights")
    add("Software versions", "reproducibility", "Reproducibility", bool(prov.get("packages")),
        "Python and package versions")
    add("Performance with 95% CIs", "results-accuracy", "Results: accuracy",
        bool(results.get("prediction") or results.get("validation_auc")), "metrics with CIs")
    add("Error analysis (per-case outputs, control analysis)", "appendix-pairs", "Appendix: per-pair predictions",
        bool(results.get("prediction")), "per-pair predictions; reversed-order control")
    add("Explainability (class activation maps)", "results-cams", "Results: activation maps", has_cams or reviewer,
        "class activation maps" if has_cams else "not applicable: a scores file has no model to compute them from",
        gap="no class activation maps computed")
    add("Code availability", "other", "Other information", True,
        f"covreport {results.get('covreport_version', '')}", ("code_availability",))
    add("Data availability", "other", "Other information", False, "", ("data_availability",))
    add("Stored auditable outputs", "reproducibility", "Reproducibility", True,
        "results.json, tables/*.csv, figures, command, seed")
    return rows




#: What a TRIPOD+AI item's ``needs`` names: the results.json part that must be present (and why not).
TRIPOD_NEEDS = {
    "prediction": (lambda r: bool(r.get("prediction")), "no prediction results"),
    "flow": (lambda r: bool(r.get("flow")), "no participant flow"),
    "table1": (lambda r: bool(r.get("table1")), "no age or sex in the manifest"),
    "reference": (lambda r: any("chexpert" in str(row.get("group", "")).lower() or row.get("counted_by") == "CSV row"
                                for row in (r.get("table1") or []) if isinstance(row, dict)),
                  "no reference population in Table 1 (covreport run --reference-csv)"),
    "final_model": (lambda r: any(isinstance(b, dict) and b.get("final_model")
                                  for b in (r.get("prediction") or {}).values()),
                    "no model refitted on all pairs (the primary protocol was not run)"),
}

TRIPOD_REFERENCE = ("Collins GS, Moons KGM, Dhiman P, et al. TRIPOD+AI statement: updated guidance for reporting "
                    "clinical prediction models that use regression or machine learning methods. BMJ "
                    "2024;385:e078378")


def tripod_items():
    """The TRIPOD+AI sub-items, read from the data file ``tripod_ai.toml`` beside this module."""
    import tomllib
    from importlib import resources

    text = resources.files("covreport.report").joinpath("tripod_ai.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["item"]


def tripod_checklist(results):
    """The TRIPOD+AI 2024 checklist (52 sub-items), filled from the results and ``results["study"]``.

    Returns
    -------
    list of dict
        One row per sub-item, in checklist order, shaped as
        :func:`stard_checklist`'s rows plus ``text`` and ``applies``; a
        sub-item that does not apply has status ``"not applicable"`` and its
        reason in ``filled``.
    """
    study = results.get("study") or {}
    rows = []
    for it in tripod_items():
        fields = tuple(it.get("study", ()))
        row = {"item": it["id"], "title": it["topic"], "text": it["text"], "applies": it["applies"],
               "section": it["where"], "section_name": it["where_name"]}
        if it.get("not_applicable"):
            rows.append({**row, "status": "not applicable", "filled": it["not_applicable"], "todo": ""})
            continue
        auto = it.get("covreport")
        gap = None
        if auto and it.get("needs"):
            present, why = TRIPOD_NEEDS[it["needs"]]
            gap = None if present(results) else why
        auto_ok = bool(auto) and gap is None
        have, miss = _study_status(study, fields)
        filled = ([auto] if auto_ok else []) + (["study.toml: " + ", ".join(have)] if have else [])
        todo = [f"study.toml: {f}" for f in miss] + ([gap] if gap else [])
        rows.append({**row, "status": item_status(auto_ok, fields, have, miss), "filled": "; ".join(filled),
                     "todo": "; ".join(todo)})
    return rows
