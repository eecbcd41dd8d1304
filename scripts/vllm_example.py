"""The README's vLLM example: a needle prompt through vLLM with token sparse prefill.

    .venv-vllm/bin/tokensparse models export smollm2 smollm2-hf
    TOKENSPARSE_METHOD="token_sparse:coverage=0.02,sparse_layers=15-29" TOKENSPARSE_RECORD=kept.jsonl \
    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python scripts/vllm_example.py smollm2-hf
"""

import sys

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from tokensparse.eval.niah import build_needle_prompt

if __name__ == "__main__":  # vLLM's engine core is a spawned process
    folder = sys.argv[1]
    needle = build_needle_prompt(AutoTokenizer.from_pretrained(folder), 4096, 0.5)
    llm = LLM(folder, attention_backend="CUSTOM", max_model_len=8192, dtype="bfloat16", enforce_eager=True)
    prompt = {"prompt_token_ids": needle.input_ids[0].tolist()}
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))
    print(f"{len(prompt['prompt_token_ids'])} tokens, expected {needle.expected}: {out[0].outputs[0].text!r}")
