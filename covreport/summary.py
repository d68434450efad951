"""The headline of a results folder, for the terminal (``covreport summary``).

``covreport run`` and ``covreport demo`` print it on stdout when they finish;
``covreport summary DIR`` prints it for any results folder, ``--json`` as a
record, ``--config`` as a TOML run config that ``covreport run --config``
reads back. A submitted results.json is untrusted: it is read through
:func:`covreport.inputs.read_bytes`, every value is checked before it is used,
a missing part is said to be missing, and any text from it is shown through
:func:`covreport.inputs.safe_text`.

What the summary holds:

- pairs and patients analysed (and in the manifest);
- per contrast, the labels whose change differs between the groups after Holm
  adjustment across labels (p_holm < :data:`ALPHA`), with the effect and its
  95% CI: the clustered theta (Obuchowski) when the primary unit is the
  patient, Cohen's d when it is the pair;
- the prediction of the headline protocol (read from results.json, never
  assumed): accuracy and AUC with their 95% intervals (patient bootstrap and
  Obuchowski's clustered AUC when the patient is the primary unit, else the
  pair-level Clopper-Pearson interval and DeLong's);
- the paths of report.html, report.pdf and results.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from covreport.errors import CovreportError
from covreport.inputs import read_bytes, safe_text

#: Significance level of the adjusted p-values (the report's ``ALPHA``; a test checks they agree).
ALPHA = 0.05

#: Prediction quantities shown, in order: (results.json metric key, label printed).
_METRICS = (("accuracy", "accuracy"), ("auc", "AUC"))


class ResultsError(CovreportError):
    """A results folder or its results.json cannot be read or summarised."""


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _dict(x):
    return x if isinstance(x, dict) else {}


def _list(x):
    return x if isinstance(x, list) else []


def _text(x, limit=200):
    return safe_text(str(x), limit=limit) if x is not None else None


def read_results(folder):
    """The results.json of a results folder (or the file itself), checked to be a JSON object.

    Parameters
    ----------
    folder : str or os.PathLike
        A folder written by ``covreport run`` or ``covreport demo``
        (``covreport-demo/report``), or its results.json.

    Returns
    -------
    results : dict
    path : pathlib.Path
        The results.json read.

    Raises
    ------
    ResultsError
        The file is missing, not a regular file, too large, not UTF-8 JSON or
        not a JSON object.
    """
    path = Path(folder)
    if path.is_dir():
        path = path / "results.json"
    raw = read_bytes(path, "results", error_class=ResultsError)
    name = safe_text(str(path))
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{name} is not UTF-8 text (byte offset {exc.start}) -- give the results.json "
                           "that `covreport run` wrote") from None
    except (ValueError, RecursionError) as exc:
        raise ResultsError(f"{name} is not valid JSON ({safe_text(str(exc), limit=120)}) -- give the "
                           "results.json that `covreport run` wrote") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{name} holds a JSON {type(data).__name__}, not an object -- give the results.json "
                           "that `covreport run` wrote")
    return data, path


def _interval(estimate, low, high, method, unit):
    return {"estimate": estimate if _finite(estimate) else None,
            "ci_low": low if _finite(low) else None, "ci_high": high if _finite(high) else None,
            "method": _text(method), "unit": unit}


def _significant(results, unit, missing):
    key = "group_differences_clustered" if unit == "patient" else "group_differences"
    rows = results.get(key)
    if not isinstance(rows, list):
        missing.append(f"'{key}' (the group comparisons)")
        return []
    contrasts = {}
    for r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("contrast"), str):
            continue
        c = contrasts.setdefault(r["contrast"], {"contrast": _text(r["contrast"]), "labels_tested": 0,
                                                 "significant": []})
        if not _finite(r.get("p_holm")):
            continue
        c["labels_tested"] += 1
        if r["p_holm"] < ALPHA:
            if unit == "patient":
                effect = _interval(r.get("theta"), r.get("ci_low"), r.get("ci_high"), None, unit)
                effect["name"] = "theta"
            elif _finite(r.get("hedges_g")):
                effect = _interval(r.get("hedges_g"), r.get("g_ci_low"), r.get("g_ci_high"), None, unit)
                effect["name"] = "Hedges' g"
            else:   # a results.json written before Hedges' g
                effect = _interval(r.get("cohen_d"), r.get("d_ci_low"), r.get("d_ci_high"), None, unit)
                effect["name"] = "Cohen's d"
            c["significant"].append({"label": _text(r.get("label")), "effect": effect,
                                     "p": r.get("p") if _finite(r.get("p")) else None,
                                     "p_holm": r["p_holm"]})
    for c in contrasts.values():
        c["significant"].sort(key=lambda s: s["p_holm"])
    return list(contrasts.values())


def _sites(results):
    """The pooled AUC by site (``sites.meta.auc``, main estimator), or None without a site analysis."""
    rec = _dict(results.get("sites"))
    auc = _dict(_dict(rec.get("meta")).get("auc"))
    main = _dict(_dict(auc.get("estimators")).get(auc.get("primary")))
    if not rec or not isinstance(rec.get("n_sites"), int):
        return None
    out = {"column": _text(rec.get("column"), limit=80), "n_sites": rec["n_sites"],
           "estimator": _text(auc.get("primary"), limit=40), "note": _text(auc.get("note"))}
    out["auc"] = _interval(main.get("estimate"), main.get("ci_low"), main.get("ci_high"), main.get("method"), "pair")
    out["pi"] = [v if _finite(v) else None for v in (main.get("pi_low"), main.get("pi_high"))]
    out["i2"] = main.get("i2") if _finite(main.get("i2")) else None
    return out


def _prediction(results, unit, missing):
    pred = results.get("prediction")
    if not isinstance(pred, dict):
        missing.append("'prediction'")
        return None
    options = _dict(_dict(results.get("provenance")).get("options"))
    protocol = pred.get("headline")
    if not isinstance(protocol, str):
        protocol = options.get("protocol") if isinstance(options.get("protocol"), str) else None
    if protocol is None:
        missing.append("'prediction.headline' (the headline protocol)")
        return None
    block = pred.get(protocol)
    out = {"protocol": _text(protocol, limit=60), "n_pairs": None, "n_patients": None, "permutation_p": None,
           "classes": [_text(pred.get(k) or d, limit=80) for k, d in (("positive_class", "Worse"),
                                                                      ("negative_class", "Improved"))]}
    if not isinstance(block, dict) or not isinstance(block.get("metrics"), dict):
        out["note"] = f"the {out['protocol']} protocol has no results (it could not run)"
        return out
    out["n_pairs"] = block.get("n_pairs") if isinstance(block.get("n_pairs"), int) else None
    out["n_patients"] = block.get("n_patients") if isinstance(block.get("n_patients"), int) else None
    if _finite(block.get("permutation_p")):
        out["permutation_p"] = block["permutation_p"]
    acc = _dict(_dict(block.get("metrics")).get("accuracy"))
    boot = _dict(_dict(_dict(_dict(results.get("bootstrap")).get("prediction")).get(protocol)).get("accuracy"))
    if unit == "patient" and _finite(boot.get("ci_low")) and _finite(boot.get("ci_high")):
        out["accuracy"] = _interval(acc.get("estimate"), boot["ci_low"], boot["ci_high"],
                                    "patient-level cluster bootstrap, percentile", "patient")
    else:
        out["accuracy"] = _interval(acc.get("estimate"), acc.get("ci_low"), acc.get("ci_high"),
                                    acc.get("method"), "pair")
    clustered = _dict(block.get("auc_clustered"))
    auc = clustered if unit == "patient" and _finite(clustered.get("auc")) else _dict(block.get("auc"))
    out["auc"] = _interval(auc.get("auc"), auc.get("ci_low"), auc.get("ci_high"), auc.get("method"),
                           "patient" if auc is clustered else "pair")
    return out


def summarise(folder):
    """The headline of a results folder as a plain record.

    Parameters
    ----------
    folder : str or os.PathLike
        A results folder (or its results.json).

    Returns
    -------
    dict
        ``folder``, ``synthetic``, ``pairs_analysed``, ``patients_analysed``,
        ``pairs_in_manifest``, ``patients_in_manifest``, ``primary_unit``
        (``"patient"`` or ``"pair"``), ``alpha``, ``adjustment``,
        ``contrasts`` (per contrast: ``labels_tested`` and the
        ``significant`` labels with ``effect``, ``p`` and ``p_holm``),
        ``prediction`` (``protocol``, ``accuracy`` and ``auc`` with
        ``estimate``, ``ci_low``, ``ci_high``, ``method``, ``unit``),
        ``sites`` (None without a site analysis, else ``column``,
        ``n_sites``, ``estimator``, ``auc`` (the pooled AUC as above),
        ``pi`` (its 95% prediction interval), ``i2``, ``note``),
        ``files`` (``report_html``, ``report_pdf``, ``results_json``: a path,
        or None when the file is absent) and ``missing`` (the parts
        results.json lacks, said in words).

    Examples
    --------
    >>> s = summarise("covreport-demo/report")  # doctest: +SKIP
    >>> s["prediction"]["accuracy"]["estimate"]  # doctest: +SKIP
    0.8
    """
    results, path = read_results(folder)
    where = path.parent
    missing = []
    flow = results.get("flow")
    if not isinstance(flow, dict):
        missing.append("'flow' (the pairs and patients analysed)")
        flow = {}
    prov = _dict(results.get("provenance"))
    unit = _dict(results.get("primary_analysis")).get("unit")
    if unit not in ("patient", "pair"):
        missing.append("'primary_analysis.unit'")
        unit = "pair"

    def count(key):
        v = flow.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    files = {}
    for key, name in (("report_html", "report.html"), ("report_pdf", "report.pdf")):
        files[key] = str(where / name) if (where / name).is_file() else None
    files["results_json"] = str(path)
    return {
        "folder": str(where),
        "synthetic": prov.get("synthetic") is True,
        "pairs_analysed": count("pairs_analysed"), "patients_analysed": count("patients_analysed"),
        "pairs_in_manifest": count("pairs_in_manifest"), "patients_in_manifest": count("patients_in_manifest"),
        "primary_unit": unit, "alpha": ALPHA, "adjustment": "Holm, across labels within each contrast",
        "contrasts": _significant(results, unit, missing),
        "prediction": _prediction(results, unit, missing),
        "sites": _sites(results),
        "files": files,
        "missing": missing,
    }


# --- text ------------------------------------------------------------------------


def _num(x):
    return "-" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def _p(x):
    return "-" if x is None else "< 0.001" if x < 0.001 else f"{x:.3f}"


def _ci(rec):
    if rec["ci_low"] is None or rec["ci_high"] is None:
        return "no CI"
    return f"95% CI {_num(rec['ci_low'])} to {_num(rec['ci_high'])}"


def _count(n, word):
    return f"? {word}s" if n is None else f"{n} {word}{'' if n == 1 else 's'}"


def format_summary(summary):
    """The summary as lines of text for the terminal (see :func:`summarise`).

    Returns
    -------
    str
        Lines ``Analysed``, one per contrast, ``Prediction``, ``Report``,
        ``PDF`` and ``Results``, ending in a newline.
    """
    s = summary
    lines = []
    synthetic = " (synthetic data)" if s["synthetic"] else ""
    lines.append(f"Analysed    {_count(s['pairs_analysed'], 'pair')} of "
                 f"{_count(s['patients_analysed'], 'patient')}{synthetic}; in the manifest "
                 f"{_count(s['pairs_in_manifest'], 'pair')} of {_count(s['patients_in_manifest'], 'patient')}")
    unit = ("patient-clustered (Obuchowski theta)" if s["primary_unit"] == "patient"
            else "pairs as independent (Cohen's d)")
    lines.append(f"Primary     {unit}; significant: Holm-adjusted p < {s['alpha']:g} across labels")
    for c in s["contrasts"]:
        head = f"{c['contrast']}:"
        if not c["labels_tested"]:
            lines.append(f"  {head} not computed (too few pairs)")
        elif not c["significant"]:
            lines.append(f"  {head} no label significant ({c['labels_tested']} tested)")
        else:
            lines.append(f"  {head} {len(c['significant'])} of {c['labels_tested']} labels significant")
            for r in c["significant"]:
                e = r["effect"]
                lines.append(f"    {r['label']}: {e['name']} {_num(e['estimate'])} ({_ci(e)}), "
                             f"p {_p(r['p'])}, Holm p {_p(r['p_holm'])}")
    pred = s["prediction"]
    if pred is not None:
        if "accuracy" not in pred:
            lines.append(f"Prediction  {pred['protocol']}: {pred.get('note', 'not computed')}")
        else:
            parts = []
            for key, word in _METRICS:
                rec = pred[key]
                parts.append(f"{word} {_num(rec['estimate'])} ({_ci(rec)}, {rec['unit']} level)")
            pos, neg = pred.get("classes") or ("Worse", "Improved")
            lines.append(f"Prediction  {pred['protocol']} protocol, {_count(pred['n_pairs'], f'{pos}/{neg} pair')}: "
                         + "; ".join(parts)
                         + ("" if pred["permutation_p"] is None else f"; permutation p {_p(pred['permutation_p'])}"))
    st = s.get("sites")
    if st is not None:
        if st["auc"]["estimate"] is None:
            lines.append(f"Sites       {st['n_sites']} ({st['column']}): pooled AUC {st['note'] or 'not pooled'}")
        else:
            pi = st["pi"]
            lines.append(f"Sites       {st['n_sites']} ({st['column']}): pooled AUC {_num(st['auc']['estimate'])} "
                         f"({_ci(st['auc'])}, {st['estimator']})"
                         + ("" if st["i2"] is None else f", I\u00b2 {100 * st['i2']:.0f}%")
                         + ("" if pi[0] is None else f"; a new site: {_num(pi[0])} to {_num(pi[1])} "
                                                     "(95% prediction interval)"))
    for text in s["missing"]:
        lines.append(f"Missing     {text} is not in results.json")
    files = s["files"]
    lines.append(f"Report      {files['report_html'] or 'report.html not found'}")
    lines.append(f"PDF         {files['report_pdf'] or 'none in the folder (the run had --no-pdf?)'}")
    lines.append(f"Results     {files['results_json']}")
    return "\n".join(lines) + "\n"


# --- run config ------------------------------------------------------------------

#: results.json input keys that are options of ``covreport run`` of the same name.
_INPUT_OPTIONS = ("manifest", "scores", "weights", "validation_csv", "validation_scores", "reference_csv", "study")


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and math.isfinite(v):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ResultsError(f"cannot write {v!r} as a TOML value")


def run_config(folder, run_keys):
    """The run options recorded in a results folder, as a TOML run config.

    ``covreport run --config FILE`` reads it back. Inputs are written with the
    paths results.json records (relative to the manifest's folder), so the
    file belongs beside the manifest: relative paths in a run config start at
    the config file's folder.

    Parameters
    ----------
    folder : str or os.PathLike
        A results folder (or its results.json).
    run_keys : collection of str
        The option names ``covreport run`` accepts; a recorded option it does
        not know is written as a comment.

    Returns
    -------
    str
        TOML text.
    """
    results, path = read_results(folder)
    prov = _dict(results.get("provenance"))
    inputs = _dict(prov.get("inputs"))
    options = prov.get("options")
    lines = [f"# covreport run config, from {safe_text(str(path))}",
             "# Relative paths start at this file's folder; the inputs are the paths results.json records",
             "# (relative to the manifest's folder): keep this file beside the manifest.",
             "# Use: covreport run --config THIS.toml [options; those given override this file]"]
    if not inputs.get("manifest"):
        raise ResultsError(f"{safe_text(str(path))}: provenance.inputs.manifest is missing -- cannot write a run "
                           "config without the manifest; is this a results.json written by `covreport run`?")
    for key in _INPUT_OPTIONS:
        rec = _dict(inputs.get(key))
        if isinstance(rec.get("path"), str) and rec["path"]:
            lines.append(f"{key} = {_toml_value(rec['path'])}")
    previous = [_dict(inputs.get(f"previous_{i}")).get("path") for i in range(1, 1000)
                if f"previous_{i}" in inputs]
    if previous and all(isinstance(p, str) for p in previous):
        lines.append(f"previous = {_toml_value(previous)}")
    if isinstance(prov.get("templates"), str):
        lines.append(f"templates = {_toml_value(prov['templates'])}")
    for key, value in _dict(prov.get("report_options")).items():
        if key in run_keys and isinstance(value, (bool, str)):
            lines.append(f"{key} = {_toml_value(value)}")
    if not isinstance(options, dict):
        lines.append("# provenance.options is missing: the run's statistical options were not recorded")
        options = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            continue
        try:
            text = _toml_value(value)
        except ResultsError:
            continue
        lines.append(f"{key} = {text}" if key in run_keys else f"# {key} = {text}  (not an option of this "
                                                                "covreport run)")
    return "\n".join(lines) + "\n"


def read_run_config(path, params):
    """Read a TOML run config into values for ``covreport run``'s parameters.

    Parameters
    ----------
    path : str or os.PathLike
        The TOML file.
    params : dict
        Parameter name -> :class:`click.Parameter` of ``covreport run``; each
        value is checked with the parameter's own type (ranges and choices
        included). Relative paths start at the config file's folder.

    Returns
    -------
    dict
        Parameter name -> value, for ``click.Context.default_map``.

    Raises
    ------
    click.BadParameter
        Naming the file, the key and what is wrong (unknown key, wrong type,
        value out of range).
    """
    import tomllib

    import click

    name = safe_text(str(path))
    raw = read_bytes(path, "run config", limit=1 << 20, error_class=ResultsError)
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{name} is not UTF-8 text (byte offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{name}: not valid TOML ({safe_text(str(exc), limit=160)})") from None
    base = Path(path).parent
    values = {}
    for key, value in data.items():
        param = params.get(key.replace("-", "_"))
        if param is None:
            import difflib

            close = difflib.get_close_matches(key.replace("-", "_"), list(params), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise click.BadParameter(f"{name}: unknown key '{safe_text(key, limit=60)}' -- {hint}the keys are "
                                     f"the options of `covreport run`: {', '.join(sorted(params))}")
        where = f"{name}: {key} = {safe_text(repr(value), limit=60)}"
        multiple = getattr(param, "multiple", False)
        items = value if multiple else [value]
        if multiple and not isinstance(value, list):
            raise click.BadParameter(f"{where} -- give a list, e.g. {key} = [\"a\", \"b\"]")
        if getattr(param, "is_flag", False) and not getattr(param, "multiple", False):
            if not isinstance(value, bool):
                raise click.BadParameter(f"{where} -- give true or false")
            values[param.name] = value
            continue
        converted = []
        for item in items:
            if isinstance(item, (dict, list)) or isinstance(item, bool):
                raise click.BadParameter(f"{where} -- give a {param.type.name} value")
            if isinstance(param.type, click.Path) and isinstance(item, str) and not Path(item).is_absolute():
                item = str(base / item)
            elif isinstance(param.type, (click.IntRange, click.FloatRange)) or param.type in (click.INT,
                                                                                              click.FLOAT):
                if not isinstance(item, (int, float)):
                    raise click.BadParameter(f"{where} -- give a number, without quotes")
            try:
                converted.append(param.type.convert(item, param, None))
            except click.BadParameter as exc:
                raise click.BadParameter(f"{where} -- {exc.message}") from None
        values[param.name] = tuple(converted) if multiple else converted[0]
    return values


__all__ = ["ALPHA", "ResultsError", "format_summary", "read_results", "read_run_config", "run_config", "summarise"]
