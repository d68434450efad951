"""The ``covreport`` command line: parse options, call the library, map errors.

Every command is a thin layer over a library function. A
:class:`~covreport.errors.CovreportError` becomes ``Error: <message>`` on
stderr with exit status 1; anything else is a bug and keeps its traceback.
Heavy modules (torch, matplotlib) are imported inside the commands so that
``covreport --help`` stays fast.
"""

import json
import sys

import click

from covreport import __version__
from covreport.errors import CovreportError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CovreportError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="covreport")
def main():
    """Validate a chest X-ray deep-learning study and report it along STARD 2015.

    Data flow: manifest -> images -> model scores (cached) -> statistics -> report.
    """


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, allow_nan=False))


# --- validate (manifest) ---------------------------------------------------


# --- diagnostic (stats) ----------------------------------------------------


# --- train / score (model) -------------------------------------------------


# --- run / demo (pipeline) -------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
