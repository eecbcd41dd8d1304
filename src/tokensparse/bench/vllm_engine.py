"""Run one vLLM engine on token-id prompts and write its greedy generations as JSON.

    python -m tokensparse.bench.vllm_engine JOB.json OUT.json

JOB: {"model": folder, "prompts": [[ids], ...], "max_tokens": n, "custom": bool,
      "max_model_len": n, "max_num_batched_tokens": n or null, "batched": bool,
      "repeats": n (timed passes of the whole job, default 1), "warmup": bool (one untimed pass first)}.
OUT: {"tokens": [[ids], ...], "seconds": [per pass; with "batched": false, [per prompt] per pass], "backend": name, "vllm": version}.
The engine is created under ``__main__`` (its core runs in a spawned process);
settings for tokensparse come from the environment (TOKENSPARSE_METHOD, ...).
"""

import json
import sys
import time


def main(job_path: str, out_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(open(job_path).read())
    kwargs = dict(
        model=job["model"], max_model_len=job["max_model_len"], dtype="bfloat16", enforce_eager=True,
        enable_prefix_caching=False, seed=0,
    )
    if job.get("custom"):
        kwargs["attention_backend"] = "CUSTOM"
    if job.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = job["max_num_batched_tokens"]
        kwargs["enable_chunked_prefill"] = True
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=job.get("ignore_eos", False))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    seconds, tokens = [], []
    if job.get("warmup"):
        llm.generate(prompts[:1], params, use_tqdm=False)
    for _ in range(job.get("repeats", 1)):
        start = time.perf_counter()
        if job.get("batched", True):
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        else:  # one prompt at a time, each timed
            outs, each = [], []
            for prompt in prompts:
                start = time.perf_counter()
                outs.append(llm.generate([prompt], params, use_tqdm=False)[0])
                each.append(time.perf_counter() - start)
            seconds.append(each)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    backend = llm.llm_engine.vllm_config.attention_config.backend
    with open(out_path, "w") as f:
        json.dump({"tokens": tokens, "seconds": seconds, "backend": str(backend), "vllm": vllm.__version__}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
