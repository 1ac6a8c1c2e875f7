"""Shared fixtures. Tests run on CPU; XLA gets 2 threads like the CI machine."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
