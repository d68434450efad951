"""The author's part of the report: reading and checking ``study.toml``.

covreport writes what it can from the analysis itself (methods, results,
limitations). What only the authors know -- background, eligibility, how the
participants were identified, blinding, registration, funding -- comes from a
small TOML file whose fields are listed in :data:`STUDY_FIELDS` and shown with
an example in ``docs/study.example.toml``. A field left out is shown in the
report as "to be completed" and flagged in the STARD 2015 checklist.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import os
import re
import tomllib
from pathlib import Path

from covreport import inputs
from covreport.constants import CONTRAST_NAMES
from covreport.errors import ReportError

#: Documented fields of study.toml: name -> (STARD 2015 / TRIPOD+AI / CLAIM item, what to write).
#: The order is the order in which the example file documents them.
STUDY_FIELDS = {
    "title": ("1", "Title of the report; covreport adds that it is a diagnostic accuracy study."),
    "authors": ("-", "Authors and affiliations (a string or a list of strings)."),
    "background": ("3", "Scientific and clinical background."),
    "intended_use": ("3", "Intended use and clinical role of the index test."),
    "objectives": ("4", "Study objectives."),
    "hypotheses": ("4", "Hypotheses (pre-specified expectations)."),
    "data_collection": ("5", "Prospective or retrospective data collection, and from which sources."),
    "eligibility": ("6", "Eligibility criteria for patients and pairs of CXRs."),
    "identification": ("7", "How potentially eligible participants were identified."),
    "setting": ("8", "Clinical setting (e.g. emergency department, ward, ICU)."),
    "locations": ("8", "Where participants were identified (centres, countries, collections)."),
    "dates": ("8", "When participants were identified (start and end dates)."),
    "series": ("9", "How participants were sampled: begins with consecutive, random or convenience, optionally "
                    "followed by a colon and a description (e.g. \"consecutive: every patient admitted ...\")."),
    "primary_contrast": ("4", "The contrast of the primary endpoint, declared before the analysis: \"Worse vs "
                              "Improved\" (the default, as in the original study), \"Worse vs Stable\" or "
                              "\"Stable vs Improved\". The report leads with it; the other contrasts are secondary."),
    "reference_standard": ("10b", "Who read the pairs (readers, experience), how disagreements were resolved, "
                                  "and the definitions used."),
    "rationale_reference_standard": ("11", "Why this reference standard was chosen."),
    "index_test": ("10a", "Only when covreport reads a scores file (reviewer mode), or the weights come without a "
                          "training recipe: the model that produced the scores as the authors ran it (weights file "
                          "and SHA-256, training data and recipe, preprocessing, software, any explainability "
                          "method), since covreport cannot record them itself."),
    "blinding_index": ("13a", "Whether clinical information and reference-standard results were available "
                              "to those performing or reading the index test."),
    "blinding_reference": ("13b", "Whether clinical information and index-test results were available to "
                                  "the assessors of the reference standard."),
    "intended_sample_size": ("18", "Intended sample size and how it was determined."),
    "severity": ("21a", "Distribution of disease severity in those with the target condition."),
    "alternative_diagnoses": ("21b", "Distribution of alternative diagnoses in those without it."),
    "interventions": ("22", "Clinical interventions between the two CXRs of a pair."),
    "adverse_events": ("25", "Adverse events from the index test or the reference standard."),
    "limitations": ("26", "Limitations the authors add to those covreport derives from the numbers."),
    "implications": ("27", "Implications for practice, including intended use and clinical role."),
    "conclusions": ("2", "The abstract's conclusions."),
    "registration": ("28", "Registration number and name of registry."),
    "protocol": ("29", "Where the full study protocol can be accessed."),
    "funding": ("30", "Sources of funding and other support; role of funders."),
    "health_inequalities": ("TRIPOD+AI 3c", "Known health inequalities between sociodemographic groups in the "
                                            "target population."),
    "heterogeneity": ("TRIPOD+AI 12d, 23b", "How heterogeneity across centres or other clusters was handled, and "
                                            "its results (or that it was not examined, and why)."),
    "fairness": ("TRIPOD+AI 14", "Approaches to model fairness and their rationale (or that none was used)."),
    "ethics": ("TRIPOD+AI 17", "The ethics committee that approved the study, and consent or its waiver."),
    "conflicts_of_interest": ("TRIPOD+AI 18b", "The authors' conflicts of interest and financial disclosures."),
    "patient_involvement": ("TRIPOD+AI 19", "Patient and public involvement, or that there was none."),
    "input_data_handling": ("TRIPOD+AI 27a", "How poor-quality or missing input images should be recognised and "
                                             "handled when the model is used."),
    "users": ("TRIPOD+AI 27b", "Who would use the model, how they interact with it, and the expertise needed."),
    "acquisition": ("CLAIM", "Acquisition devices and protocols of the test-set CXRs."),
    "deidentification": ("CLAIM 11", "How the images and records were de-identified."),
    "reader_agreement": ("CLAIM 18", "Inter- and intra-reader agreement of the reference standard (e.g. Cohen's "
                                     "kappa), and how variability was reduced or disagreements resolved."),
    "representativeness": ("STARD-AI 28", "Whether the test set represents the distribution of the target condition "
                                          "expected in the intended-use population."),
    "data_availability": ("CLAIM", "Where the data can be obtained."),
    "code_availability": ("CLAIM", "Where the code and the model weights can be obtained."),
}


def _as_text(value, key, path):
    """A TOML value as report text: strings as is, lists joined, dates in ISO 8601."""
    if isinstance(value, str):
        problem = inputs.text_problem(value)
        if problem:
            raise ReportError(f"{path}: field '{key}' {problem} -- an invisible direction-control or format "
                              "character can make the text read differently from what it says")
        return value.strip()
    if isinstance(value, bool):
        raise ReportError(f"{path}: field '{key}' is a boolean; write it as text, e.g. {key} = \"yes\"")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "; ".join(_as_text(v, key, path) for v in value)
    raise ReportError(f"{path}: field '{key}' must be text or a list of text, not a table; "
                      f"see docs/study.example.toml")


#: The kinds of series ``series`` may name (STARD 2015 item 9); the first word of the field.
SERIES_KINDS = ("consecutive", "random", "convenience")


def series_kind(text):
    """The kind of series a ``series`` field names (one of :data:`SERIES_KINDS`), or None.

    The field begins with the kind, optionally followed by ``:``, ``;``, ``,``, ``.``, ``-``
    or a space and a description; the kind is the word itself, never a word found later in the text.
    """
    m = re.match(r"\s*([A-Za-z]+)(?:\s*[:;,.\-]|\s|$)", str(text or ""))
    kind = m.group(1).lower() if m else None
    return kind if kind in SERIES_KINDS else None


def validate_study(mapping, *, source="study.toml"):
    """Check the fields of a study mapping and return them as ``{field: str}``.

    Parameters
    ----------
    mapping : dict
        Field name to value (a string, number, date or list of those).
    source : str
        Where the mapping came from, for error messages.

    Returns
    -------
    dict
        The documented fields that hold text, in :data:`STUDY_FIELDS` order;
        empty fields are left out.

    Raises
    ------
    ReportError
        On an unknown field (naming close matches) or a value that is a table.
    """
    out = {}
    for key in mapping:
        if key not in STUDY_FIELDS:
            close = difflib.get_close_matches(str(key), STUDY_FIELDS, n=3, cutoff=0.6)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                    else "documented fields are listed in docs/study.example.toml")
            raise ReportError(f"{source}: unknown field '{inputs.safe_text(key, limit=80)}'; {hint}")
    for key in STUDY_FIELDS:
        if key in mapping and mapping[key] is not None:
            text = _as_text(mapping[key], key, source)
            if key == "series" and text and series_kind(text) is None:
                raise ReportError(f"{source}: field 'series' must begin with consecutive, random or convenience "
                                  f"(STARD 2015 item 9), got {inputs.safe_text(text[:60])!r}; e.g. series = "
                                  "\"convenience: the cases of two public collections\"")
            if key == "primary_contrast" and text:
                text = _contrast(text, source)
            if text:
                out[key] = text
    return out


def _contrast(text, source):
    """The contrast a ``primary_contrast`` field names, spelled as covreport does (case and spaces free)."""
    want = " ".join(text.split()).casefold()
    for name in CONTRAST_NAMES:
        if name.casefold() == want:
            return name
    raise ReportError(f"{source}: field 'primary_contrast' must be one of "
                      f"{', '.join(repr(n) for n in CONTRAST_NAMES)}, got {inputs.safe_text(text[:60])!r}; "
                      f"e.g. primary_contrast = \"{CONTRAST_NAMES[0]}\"")


def read_study(path):
    """Read ``study.toml`` into ``{field: str}`` (see :func:`validate_study`).

    Raises
    ------
    ReportError
        If the file cannot be read, is not valid TOML, or holds an unknown field.
    """
    path = Path(path)
    shown = inputs.safe_text(str(path))
    if not os.path.lexists(path):
        raise ReportError(f"{shown}: cannot read the study file (No such file or directory); check the --study path")
    # A regular file of at most 1 MiB: a FIFO, a device or a huge file is refused before a byte is read.
    raw = inputs.read_bytes(path, "study file", error_class=ReportError)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ReportError(f"{shown}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{shown}: not valid TOML: {exc}; see docs/study.example.toml") from None
    except ValueError:  # e.g. an integer longer than Python converts
        raise ReportError(f"{shown}: holds a number too long to read; write it as text, in quotes") from None
    except RecursionError:  # arrays nested thousands deep
        raise ReportError(f"{shown}: nested too deeply to be a study file; write each field as text or a list "
                          "of text (see docs/study.example.toml)") from None
    return validate_study(data, source=shown)


def missing_fields(study):
    """Documented fields the study leaves empty, in :data:`STUDY_FIELDS` order."""
    return [k for k in STUDY_FIELDS if not (study or {}).get(k)]
