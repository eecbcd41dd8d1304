"""enable()/disable() on tiny random models of several families."""

import logging

import pytest
import torch
import transformers

import tokensparse
from tokensparse import TokenSparseConfig
from tokensparse.integrations.transformers import _reset_warnings, sparse_layers_of

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}
SPARSE = TokenSparseConfig(coverage=0.3, window=16, min_tokens=16)


def tiny_model(family, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    # Random init gives near-uniform attention; sharper queries make selection matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(8.0)
    return model


def logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _reset_warnings()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_coverage_zero_equals_stock_sdpa(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 150))
    ref = logits(model, ids)
    tokensparse.enable(model, TokenSparseConfig(coverage=0.0, window=16, min_tokens=16))
    assert model.config._attn_implementation == "tokensparse"
    assert torch.equal(logits(model, ids), ref)
    tokensparse.disable(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_prefill_drops_tokens_in_sparse_layers_only(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 200))
    dense = logits(model, ids)
    tokensparse.enable(model, SPARSE, record=True)
    assert sparse_layers_of(model) == (2, 3)  # fallback: the second half
    sparse = logits(model, ids)
    report = tokensparse.selection_report(model, clear=True)
    assert len(report) == 1 and sorted(report[0]) == [2, 3]
    for record in report[0].values():
        assert record.seq_lens == [200]
        assert record.mean_kept_share < 1.0
        assert all(16 + 16 <= n <= 200 for n in record.num_kept[0])
        assert 0.0 < record.max_dropped_mass < 1.0
    assert torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)
    tokensparse.disable(model)


def test_explicit_sparse_layers_and_bad_layers():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 200))
    tokensparse.enable(model, SPARSE.replace(sparse_layers=(0,)), record=True)
    logits(model, ids)
    assert sorted(tokensparse.selection_report(model)[0]) == [0]
    with pytest.raises(ValueError, match="beyond the model's 4 layers"):
        tokensparse.enable(model, SPARSE.replace(sparse_layers=(7,)))
    tokensparse.disable(model)
    with pytest.raises(ValueError, match="not enabled"):
        tokensparse.selection_report(model)


def test_recording_off_keeps_nothing():
    model = tiny_model("llama")
    tokensparse.enable(model, SPARSE)
    logits(model, torch.randint(0, 128, (1, 200)))
    with pytest.raises(ValueError, match="recording is off"):
        tokensparse.selection_report(model)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padded_batch_matches_each_prompt_alone(family):
    model = tiny_model(family)
    tokensparse.enable(model, SPARSE)
    lengths = [200, 137]
    seqs = [torch.randint(1, 128, (n,)) for n in lengths]
    ids = torch.zeros(2, 200, dtype=torch.long)
    mask = torch.zeros(2, 200, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, 200 - len(s):] = s
        mask[b, 200 - len(s):] = 1
    batch = logits(model, ids, attention_mask=mask)
    for b, s in enumerate(seqs):
        alone = logits(model, s[None])
        torch.testing.assert_close(batch[b, 200 - len(s):], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_sparse_prefill_dense_decode_full_cache(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 180))
    tokensparse.enable(model, SPARSE, record=True)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 186)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    # The cache holds every token: the prompt and all but the last generated one.
    assert cache.get_seq_length() == 185
    prefills = tokensparse.selection_report(model)
    assert len(prefills) == 1, "decode steps must not run selection"
    assert all(r.mean_kept_share < 1.0 for r in prefills[0].values())


def test_generation_continues_like_dense_when_nothing_is_dropped():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 60))
    with torch.inference_mode():
        dense = model.generate(ids, max_new_tokens=8, do_sample=False)
        tokensparse.enable(model, TokenSparseConfig())  # 60 tokens <= window + min_tokens: dense
        sparse = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(dense, sparse)


def test_chunked_prefill_falls_back_where_the_method_takes_no_chunks(caplog):
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 260))

    def two_chunks():
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=ids[:, :200], past_key_values=cache, use_cache=True)
            return model(input_ids=ids[:, 200:], past_key_values=cache, use_cache=True).logits

    dense_second = two_chunks()
    # A composition takes no chunks: its block-sparse inner method needs Lq == Lk.
    tokensparse.enable(model, "token_sparse+flexprefill:coverage=0.3,window=16,min_tokens=16,block_size=32,min_budget=32")
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        sparse_second = two_chunks()
    assert "queries after a cached prefix" in caplog.text
    assert caplog.text.count("queries after a cached prefix") == 1  # once only
    # The first chunk ran sparse; the second chunk is the model's own SDPA.
    assert torch.isfinite(sparse_second).all()
    tokensparse.disable(model)
    # With nothing dropped in the first chunk, the two runs agree exactly.
    tokensparse.enable(model, TokenSparseConfig(coverage=0.0, window=16, min_tokens=16))
    assert torch.equal(two_chunks(), dense_second)


def test_sliding_window_shorter_than_prompt_runs_dense_with_warning(caplog):
    model = tiny_model("mistral", sliding_window=64)
    ids = torch.randint(0, 128, (1, 200))
    ref = logits(model, ids)
    tokensparse.enable(model, SPARSE)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        out = logits(model, ids)
    assert "sliding-window" in caplog.text
    assert torch.equal(out, ref)


def test_enable_rejects_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="TokenSparseConfig"):
        tokensparse.enable(model, {"coverage": 0.1})
    with pytest.raises(ValueError, match="PreTrainedModel"):
        tokensparse.enable(torch.nn.Linear(2, 2))
