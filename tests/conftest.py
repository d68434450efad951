"""Shared pytest configuration. Area-specific fixtures live beside their tests."""

import os

# Keep torch and BLAS from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
