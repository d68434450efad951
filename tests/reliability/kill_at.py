"""Run the covreport CLI and SIGKILL this very process at a chosen point (fault injection).

Usage: ``python kill_at.py POINT covreport-arguments...``, POINT one of

- ``pdf``: when the report starts writing its PDF (results.json, tables,
  figures and report.html are already in the temporary output folder);
- ``move``: when the finished temporary folder is about to be moved into place;
- ``swap``: with ``--force`` over an existing output folder, right after the
  old folder was moved aside and before the new one is moved in;
- ``term``: SIGTERM (not SIGKILL) when the tables start being written
  (the handler must remove the temporary folder);
- ``none``: no kill (a control run).

SIGKILL runs no cleanup code at all: what is left on disk is what a power
cut or ``kill -9`` would leave.
"""

import os
import signal
import sys


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, args = sys.argv[1], sys.argv[2:]
    import covreport.pipeline as pipeline
    import covreport.report.render as report

    if point == "pdf":
        report.write_pdf = lambda *a, **k: _die()
    elif point == "term":
        real_tables = pipeline._write_tables

        def tables(*a, **k):  # results.json is already in the temporary folder
            os.kill(os.getpid(), signal.SIGTERM)
            return real_tables(*a, **k)

        pipeline._write_tables = tables
    elif point == "move":
        pipeline._replace_dir = lambda *a, **k: _die()
    elif point == "swap":
        real = os.replace

        def replace(src, dst, *a, **k):
            real(src, dst, *a, **k)
            if ".old-" in os.path.basename(str(dst)):
                _die()

        os.replace = replace
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    from covreport.cli import main as cli

    cli(args, prog_name="covreport")


if __name__ == "__main__":
    main()
