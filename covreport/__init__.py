"""covreport: validate a chest X-ray deep-learning study and report it along STARD 2015."""

__version__ = "0.1.0"

# Before torch (imported lazily by the modules that need it) starts its threads:
# OpenMP threads sleep instead of spinning while they wait, and no more threads
# than the cores this process may use. Variables already set are kept.
# See covreport/_threads.py (issue 14.9: a busy CPU slowed training 18-fold).
from covreport import _threads

_threads.prepare_environment()
