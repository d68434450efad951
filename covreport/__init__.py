"""covreport: validate a chest X-ray deep-learning study and report it along STARD 2015.

The command line (``covreport --help``) is a thin layer over these functions:

- :func:`run`: the whole study, from a manifest and a scores file (reviewer
  mode) or weights, to ``report.html``, ``report.pdf`` and ``results.json``;
- :func:`read_manifest`: read and check a pair manifest;
- :func:`score`: score every image of a manifest once (label probabilities and
  1,024 features), through the score cache;
- :func:`verify`: re-derive every number of a submitted results folder;
- :func:`summarise`: the headline of a results folder;
- the statistics, pure functions on arrays or tidy DataFrames:
  :func:`diagnostic_metrics`, :func:`clopper_pearson`, :func:`delong_auc`,
  :func:`delong_test`, :func:`validation_auc`, :func:`obuchowski_auc`,
  :func:`compare_groups`, :func:`group_differences_clustered`,
  :func:`cluster_bootstrap`, :func:`predict_outcome`, :func:`calibration`,
  :func:`table_one`, :func:`table_one_patients`, :func:`primary_analysis` and
  :func:`permutation_p` (see :mod:`covreport.stats`).

``import covreport`` imports none of numpy, pandas, torch or matplotlib: each
name is loaded on first use (PEP 562 module ``__getattr__``).

Examples
--------
>>> import covreport
>>> covreport.diagnostic_metrics(40, 3, 4, 5).set_index("measure").loc["sensitivity", "estimate"]
0.9090909090909091
"""

import importlib as _importlib
import sys as _sys
import types as _types
from pathlib import Path as _Path

__version__ = "0.1.0"

#: Public name -> (module, attribute) loaded on first access.
_LAZY = {
    "read_manifest": ("covreport.manifest", "read_manifest"),
    "read_scores": ("covreport.scores_file", "read_scores"),
    "score": ("covreport.scoring", "score_to_file"),
    "RunOptions": ("covreport.pipeline", "RunOptions"),
    "summarise": ("covreport.summary", "summarise"),
    "read_results": ("covreport.summary", "read_results"),
    "CovreportError": ("covreport.errors", "CovreportError"),
    **{name: ("covreport.stats", name) for name in (
        "diagnostic_metrics", "clopper_pearson", "delong_auc", "delong_test", "validation_auc", "obuchowski_auc",
        "compare_groups", "group_differences_clustered", "cluster_bootstrap", "predict_outcome", "calibration",
        "table_one", "table_one_patients", "primary_analysis", "permutation_p")},
}

#: RunOptions fields that hold a path.
_PATH_FIELDS = ("manifest", "out", "scores", "validation_csv", "validation_scores", "reference_csv", "study",
                "templates", "cache")


def run(manifest, *, out="covreport-out", **options):
    """Run the whole study on a manifest and write the report; return the output folder.

    The library form of ``covreport run``: the same stages, checks and
    outputs (``report.html``, ``report.pdf`` unless ``pdf=False``,
    ``results.json``, ``tables/``, ``figures/``), written into a temporary
    folder and moved into place whole.

    Parameters
    ----------
    manifest : str, os.PathLike or covreport.pipeline.RunOptions
        The pair manifest; or a complete :class:`~covreport.pipeline.RunOptions`
        (then no other argument may be given).
    out : str or os.PathLike, default "covreport-out"
        Output folder; an existing one needs ``force=True``.
    **options
        Any field of :class:`~covreport.pipeline.RunOptions`, named as the
        options of ``covreport run``: ``scores`` (reviewer mode) or
        ``weights``, ``validation_csv``, ``validation_scores``,
        ``reference_csv``, ``study``, ``templates``, ``protocol``,
        ``permutations``, ``bootstrap``, ``predictive_ci``, ``seed``,
        ``strict``, ``cache``, ``use_cache``, ``pdf``, ``force``,
        ``previous`` (a sequence of results.json paths).

    Returns
    -------
    pathlib.Path
        The output folder; :func:`summarise` gives its headline.

    Raises
    ------
    CovreportError
        A bad input (naming the file, line, column, value and the fix).

    Examples
    --------
    >>> folder = covreport.run("manifest.csv", scores="scores.csv", out="out",
    ...                        permutations=0, pdf=False)  # doctest: +SKIP
    >>> covreport.summarise(folder)["prediction"]["auc"]  # doctest: +SKIP
    """
    from covreport.pipeline import RunOptions, run as run_study

    if isinstance(manifest, RunOptions):
        if options or out != "covreport-out":
            raise TypeError("give a RunOptions alone, or a manifest path with keyword options")
        return run_study(manifest)
    fields = {"manifest": manifest, "out": out, **options}
    for key in _PATH_FIELDS:
        if fields.get(key) is not None:
            fields[key] = _Path(fields[key])
    if "previous" in fields:
        fields["previous"] = tuple(_Path(p) for p in fields["previous"])
    if fields.get("weights") is not None:
        fields["weights"] = str(fields["weights"])
    return run_study(RunOptions(**fields))


class _CallableModule(_types.ModuleType):
    """``covreport.verify``: the module, which called is its :func:`verify` function."""

    def __call__(self, *args, **kwargs):
        return self.verify(*args, **kwargs)


class _Package(_types.ModuleType):
    """The covreport package: ``covreport.verify`` stays both the module and the function."""

    @property
    def verify(self):
        """Re-derive every number of a submitted results folder: :func:`covreport.verify.verify`.

        ``covreport.verify(folder, inputs, ...)`` calls the function;
        ``covreport.verify.VerifyError`` etc. are the module's names.
        """
        module = _importlib.import_module("covreport.verify")
        if type(module) is _types.ModuleType:
            module.__class__ = _CallableModule
        return module

    @verify.setter
    def verify(self, module):
        # The import system records the submodule here; it stays in sys.modules and the getter returns it.
        pass


_sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    """Load a public name on first access (PEP 562); nothing heavy is imported before."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'covreport' has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"verify"})


__all__ = ["__version__", "run", "verify", *_LAZY]
