"""Prefill time through vLLM: its own attention backend against the token sparse plugin.

Each method runs in its own engine (a subprocess of the vLLM environment's
Python, :mod:`tokensparse.bench.vllm_engine`): ``dense`` is vLLM's stock backend,
any other spec is the plugin (``attention_backend="CUSTOM"``, the spec in
``TOKENSPARSE_METHOD``). A prefill is one needle prompt generating one token
(prefix caching off, one untimed pass per engine first); the figure is the
median over ``rounds`` engines of ``repeats`` passes each, the engines of the
methods taking turns. The 1-minute load average before each engine is recorded:
on a shared machine, other work slows whichever engine it overlaps. ``max_num_batched_tokens`` at or above the longest prompt
prefills it in one step; smaller values time vLLM's chunked prefill.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..methods import parse_method
from .timing import machine_info

logger = logging.getLogger(__name__)

DENSE = "dense"


def run_vllm_prefill_bench(
    model_folder: str | os.PathLike,
    *,
    lengths: tuple[int, ...] = (4096, 8100),
    methods: tuple[str, ...] = (DENSE, "token_sparse:coverage=0.02,sparse_layers=15-29"),
    repeats: int = 3,
    rounds: int = 1,
    max_num_batched_tokens: int | None = None,
    python: str = sys.executable,
    kv_cache_gib: int = 2,
) -> dict[str, Any]:
    """Median prefill seconds per method and prompt length.

    Args:
        model_folder: a Hugging Face folder (``tokensparse models export smollm2 DIR``).
        lengths: prompt lengths in tokens (needle prompts).
        methods: ``dense`` (vLLM's own backend) and plugin method specs.
        repeats: timed passes per prompt and engine.
        rounds: engines per method, run in turn (dense, plugin, dense, plugin, ...).
        max_num_batched_tokens: vLLM's step budget (default: the longest prompt, no chunking).
        python: the Python of an environment with vLLM installed.
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``.

    Returns:
        ``{"config": ..., "machine": ..., "results": [{"method", "length", "median_s", "min_s", "seconds"}]}``.
    """
    from transformers import AutoTokenizer

    from ..eval.niah import build_needle_prompt

    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats} and {rounds}")
    for spec in methods:
        if spec != DENSE:
            parse_method(spec)  # a bad spec fails here, not inside an engine
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    prompts = [build_needle_prompt(tokenizer, n, 0.5) for n in lengths]
    ids = [p.input_ids[0].tolist() for p in prompts]
    longest = max(len(x) for x in ids)
    batched_tokens = max_num_batched_tokens or longest
    times: dict[str, list[list[float]]] = {spec: [[] for _ in ids] for spec in methods}
    loads: list[float] = []
    out: dict[str, Any] = {}
    for _ in range(rounds):  # engines alternate, so a busy spell of a shared machine hits every method
        for spec in methods:
            loads.append(os.getloadavg()[0])
            out = _engine(python, {
                "model": str(model_folder), "prompts": ids, "max_tokens": 1, "max_model_len": longest + 8,
                "custom": spec != DENSE, "max_num_batched_tokens": batched_tokens, "batched": False,
                "repeats": repeats, "warmup": True,
            }, {} if spec == DENSE else {"TOKENSPARSE_METHOD": spec}, kv_cache_gib)
            for run in out["seconds"]:
                for i, seconds in enumerate(run):
                    times[spec][i].append(seconds)
    results = []
    for spec in methods:
        for i, prompt_ids in enumerate(ids):
            seconds = times[spec][i]
            results.append({"method": spec, "length": len(prompt_ids), "median_s": statistics.median(seconds),
                            "min_s": min(seconds), "seconds": seconds})
            logger.info("%s at %d tokens: %.3f s", spec, len(prompt_ids), statistics.median(seconds))
    return {
        "config": {"model": str(model_folder), "lengths": [len(x) for x in ids], "methods": list(methods),
                   "repeats": repeats, "rounds": rounds, "max_num_batched_tokens": batched_tokens, "dtype": "bfloat16",
                   "vllm": out.get("vllm"), "kv_cache_gib": kv_cache_gib},
        "machine": dict(machine_info(torch.device("cpu")), cpu_count=os.cpu_count(), load_average_1min=loads),
        "results": results,
    }


def _engine(python: str, job: dict[str, Any], env: dict[str, str], kv_cache_gib: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSPARSE_")}
        environ.update({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1", **env})
        done = subprocess.run([python, "-m", "tokensparse.bench.vllm_engine", str(job_path), str(out_path)],
                              env=environ, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the vLLM engine failed:\n{done.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def summary_lines(data: dict[str, Any]) -> list[str]:
    """One line per length: each method's median prefill and its speedup over dense."""
    by_length: dict[int, dict[str, float]] = {}
    for row in data["results"]:
        by_length.setdefault(row["length"], {})[row["method"]] = row["median_s"]
    lines = []
    for length, times in sorted(by_length.items()):
        dense = times.get(DENSE)
        parts = [f"{m}: {t:.2f} s" + (f" ({dense / t:.2f}x)" if dense and m != DENSE else "") for m, t in times.items()]
        lines.append(f"{length} tokens: " + "; ".join(parts))
    return lines


__all__ = ["run_vllm_prefill_bench", "summary_lines"]
