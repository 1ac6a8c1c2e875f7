#!/usr/bin/env bash
# Create .venv at the repo root and install xlaserve (editable) with its test extras.
# Then build the native CPU kernels. Idempotent: a second run only checks that the install and
# the kernels' build are current.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.xlaserve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
# The native CPU kernels (ops/native.py): compiled here for this host's ISA; without a compiler
# this only prints why, and the server runs the pure-jnp reference path.
.venv/bin/python -m ops.native
