"""covreport: validate a chest X-ray deep-learning study and report it along STARD 2015."""

__version__ = "0.1.0"
