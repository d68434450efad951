"""The one exception family of covreport.

The CLI turns any :class:`CovreportError` into ``Error: <message>`` on stderr
and exit status 1; any other exception is a bug and keeps its traceback.
"""


class CovreportError(Exception):
    """Base class of every error covreport raises on purpose."""


class ManifestError(CovreportError):
    """A pair manifest cannot be read or fails validation."""


class ImageError(CovreportError):
    """An image cannot be read or decoded."""


class ModelError(CovreportError):
    """Weights or a checkpoint cannot be built, loaded or trusted."""


class ScoresError(CovreportError):
    """A scores file is missing columns, images or has bad values."""


class StatsError(CovreportError):
    """A statistic cannot be computed from the data given (e.g. one class only)."""


class ReportError(CovreportError):
    """The report or its output folder cannot be written."""
