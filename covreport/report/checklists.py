"""The STARD 2015, TRIPOD+AI, CLAIM 2024 and STARD-AI checklists, with one status rule."""

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
    ("18", "Intended sample size", "methods-analysis", "Methods: analysis",
     "achieved sample size and precision; the sample size a revalidation needs", ("intended_sample_size",)),
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
    reviewer = reviewer_mode(results)
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


def reviewer_mode(results):
    """Whether covreport read a scores file and never saw the model (no weights recorded)."""
    prov = results.get("provenance") or {}
    return "scores" in (prov.get("inputs") or {}) or not prov.get("weights_sha256")


def _rows(key):
    return lambda r: bool((r.get(key) or {}).get("rows"))


#: What an item's ``needs`` names in the checklist data files: (whether the run has it, why not, the study.toml
#: field that takes over without it or None). Without it the item falls to the authors.
NEEDS = {
    "prediction": (lambda r: bool(r.get("prediction")), "no prediction results", None),
    "flow": (lambda r: bool(r.get("flow")), "no participant flow", None),
    "table1": (lambda r: bool(r.get("table1")), "no age or sex in the manifest", None),
    "reference": (lambda r: any("chexpert" in str(row.get("group", "")).lower() or row.get("counted_by") == "CSV row"
                                for row in (r.get("table1") or []) if isinstance(row, dict)),
                  "no reference population in Table 1 (covreport run --reference-csv)", None),
    "final_model": (lambda r: any(isinstance(b, dict) and b.get("final_model")
                                  for b in (r.get("prediction") or {}).values()),
                    "no model refitted on all pairs (the main protocol was not run)", None),
    "interval": (lambda r: bool(r.get("interval_days")), "no CXR dates or offsets in the manifest", None),
    # Reviewer mode: covreport read a scores file, so what it would record of the model comes from the authors.
    "model": (lambda r: not reviewer_mode(r), "covreport read a scores file and did not run the model",
              "index_test"),
    "recipe": (lambda r: bool(_recipe(r)), "no training recipe stored with the weights", "index_test"),
    "cams": (lambda r: not reviewer_mode(r) and bool((r.get("class_activation_maps") or {}).get("pairs")),
             "no class activation maps (they need the model)", "index_test"),
    "subgroups": (_rows("subgroups"), "no subgroup results (no out-of-fold predictions)", None),
    "failures": (_rows("failure_analysis"), "no failure analysis (no out-of-fold predictions)", None),
    "separation": (lambda r: bool((r.get("patient_separation") or {}).get("n_pairs")),
                   "no patient separation statement (no out-of-fold predictions)", None),
}
#: The needs of TRIPOD+AI (one table for every checklist).
TRIPOD_NEEDS = NEEDS

TRIPOD_REFERENCE = ("Collins GS, Moons KGM, Dhiman P, et al. TRIPOD+AI statement: updated guidance for reporting "
                    "clinical prediction models that use regression or machine learning methods. BMJ "
                    "2024;385:e078378")

#: The checklist data files beside this module, by name.
CHECKLIST_FILES = {"tripod_ai": "tripod_ai.toml", "claim": "claim_2024.toml", "stard_ai": "stard_ai.toml"}


def checklist_items(name):
    """The items of a checklist (``"tripod_ai"``, ``"claim"`` or ``"stard_ai"``), read from its data file."""
    import tomllib
    from importlib import resources

    text = resources.files("covreport.report").joinpath(CHECKLIST_FILES[name]).read_text(encoding="utf-8")
    return tomllib.loads(text)["item"]


def tripod_items():
    """The TRIPOD+AI sub-items, read from the data file ``tripod_ai.toml`` beside this module."""
    return checklist_items("tripod_ai")


def fill_checklist(items, results):
    """A checklist's items filled from the results and ``results["study"]``, by one rule.

    An item that does not apply has status ``"not applicable"`` and its reason
    in ``filled``. Otherwise what covreport reports counts when the results
    hold what the item ``needs`` (:data:`NEEDS`); when they do not, the
    need's study.toml field, if it has one, joins the item's fields (reviewer
    mode: the authors describe the model in ``index_test``). The status is
    :func:`item_status` of what covreport reports and the fields.

    Returns
    -------
    list of dict
        One row per item, in the file's order, shaped as
        :func:`stard_checklist`'s rows plus ``text`` and ``applies`` ("" where
        the checklist has no such column).
    """
    study = results.get("study") or {}
    rows = []
    for it in items:
        fields = tuple(it.get("study", ()))
        row = {"item": it["id"], "title": it["topic"], "text": it["text"], "applies": it.get("applies", ""),
               "section": it["where"], "section_name": it["where_name"]}
        if it.get("not_applicable"):
            rows.append({**row, "status": "not applicable", "filled": it["not_applicable"], "todo": ""})
            continue
        auto = it.get("covreport")
        gap = fallback = None
        if auto and it.get("needs"):
            present, why, fallback = NEEDS[it["needs"]]
            gap = None if present(results) else why
            if gap and fallback and fallback not in fields:
                fields += (fallback,)
        auto_ok = bool(auto) and gap is None
        have, miss = _study_status(study, fields)
        filled = ([auto] if auto_ok else []) + (["study.toml: " + ", ".join(have)] if have else [])
        covered = gap and fallback in have           # the authors' field says what covreport could not
        todo = [f"study.toml: {f}" for f in miss] + ([gap] if gap and not covered else [])
        rows.append({**row, "status": item_status(auto_ok, fields, have, miss), "filled": "; ".join(filled),
                     "todo": "; ".join(todo)})
    return rows


def tripod_checklist(results):
    """The TRIPOD+AI 2024 checklist (52 sub-items), filled from the results and ``results["study"]``.

    Rows as :func:`fill_checklist`'s; ``applies`` is D, E or D;E. With a
    clinical target (``prediction_target``), item 8a names it: its
    definition and time horizon are the authors' (``reference_standard``).
    With sites (``sites``), items 12d and 23b are covreport's, and 20b (and,
    with internal-external cross-validation, 12c and 16) say what covreport
    reports by site.
    """
    items = tripod_items()
    target = results.get("prediction_target")
    if isinstance(target, dict):
        said = (f"the clinical target predicted: the manifest column {target.get('column')!s} "
                f"({target.get('positive_class')!s} vs {target.get('negative_class')!s}); the outcome categories "
                "(Worse, Stable, Improved) with their definitions for the change analysis")
        items = [dict(it, covreport=said) if it["id"] == "8a" else it for it in items]
    sites = results.get("sites")
    if isinstance(sites, dict) and sites.get("rows"):
        said = {"12d": "patients as clusters (patient-clustered AUC, refitting patient bootstrap); sites: a "
                       "random-effects meta-analysis of the per-site AUC (logit scale) and calibration slope "
                       "(DerSimonian-Laird and Paule-Mandel tau\u00b2, I\u00b2, 95% prediction interval)",
                "23b": "performance by site with its meta-analysis (tau\u00b2, I\u00b2, prediction interval) and "
                       "forest plot"}
        items = [dict(it, covreport=said[it["id"]], study=[]) if it["id"] in said else it for it in items]
    return fill_checklist(_with_sites(items, results, _TRIPOD_SITES), results)


#: What TRIPOD+AI and STARD-AI items say when the pairs come from several sites (``results["sites"]``): item ->
#: (text, text with internal-external cross-validation (``iecv``)); a text starting "; " is added to what
#: covreport fills, another replaces it (and needs nothing more: the by-site tables are covreport's).
_TRIPOD_SITES = {
    "12c": (None, "; internal-external cross-validation by site: the model refitted without each site and "
                  "evaluated on it, the per-site results pooled"),
    "16": (None, "each held-out site against the others (internal-external cross-validation): its pairs, outcome "
                 "events and performance in the by-site tables"),
    "20b": ("; the pairs and outcome events per site", "; the pairs and outcome events per site"),
}
_STARD_AI_SITES = {
    "15b": (None, "; internal-external cross-validation by site: each site held out in turn, with its pairs"),
    "21": ("; performance by site with a random-effects meta-analysis (tau\u00b2, I\u00b2, prediction interval)",
           "; performance by site with a random-effects meta-analysis (tau\u00b2, I\u00b2, prediction interval), in "
           "the cross-validation and in the internal-external cross-validation"),
    "29": (None, "each site held out in turn is an independent evaluation set (internal-external "
                 "cross-validation): its pairs, outcome events and performance by site"),
}


def _with_sites(items, results, notes):
    """``items`` with the site ``notes`` (added to or replacing what covreport fills), when the results hold sites."""
    sites = results.get("sites")
    if not (isinstance(sites, dict) and sites.get("rows")):
        return items
    external = bool((sites.get("iecv") or {}).get("rows"))
    out = []
    for it in items:
        note = notes.get(it["id"], (None, None))[1 if external else 0]
        if note and note.startswith("; "):
            it = dict(it, covreport=it["covreport"] + note) if it.get("covreport") else it
        elif note:
            it = {**{k: v for k, v in it.items() if k != "needs"}, "covreport": note}
        out.append(it)
    return out


def claim_checklist(results):
    """The CLAIM 2024 checklist (44 items), filled as :func:`fill_checklist` fills it."""
    return fill_checklist(checklist_items("claim"), results)


def stard_ai_checklist(results):
    """The STARD-AI checklist (40 items, 48 sub-items), filled as :func:`fill_checklist` fills it.

    With sites (``sites``), items 21 (variability) and, with internal-external
    cross-validation, 15b (development) and 29 (external evaluation) say what
    covreport reports by site.
    """
    return fill_checklist(_with_sites(checklist_items("stard_ai"), results, _STARD_AI_SITES), results)
