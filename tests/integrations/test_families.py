"""Families loaded with their default attention: what enable() honours, and what it leaves to the model.

A layer tokensparse does not run sparse must run exactly what the model would
have run (its own implementation as loaded, eager included): coverage 0 gives
the model's own logits bitwise. Families whose attention the sparse methods
cannot reproduce (learned sinks, logit softcapping) run their own attention in
every layer, with a warning naming the reason.
"""

import logging

import pytest
import torch
import transformers

import tokensparse
from tokensparse import TokenSparseConfig
from tokensparse.integrations.transformers import _reset_warnings

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)
FAMILIES = {
    # family: (config class, model class, extra config, attention as loaded, what the sparse path does)
    "llama_eager": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, "eager", "sparse"),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"] * 2), None, "attention sinks"),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(head_dim=16, sliding_window=512), None, "softcapping"),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, {}, None, "sparse"),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM, dict(ffn_dim=128, word_embed_proj_dim=64), None, "sparse"),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=64, n_layer=4, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=0), None, "sparse"),
}
SPARSE = TokenSparseConfig(coverage=0.3, window=16, min_tokens=16)
# FlexPrefill visiting every block: the sparse path's own dense attention, to compare with the model's.
DENSE_VIA_KERNEL = "flexprefill:gamma=1,tau=0,min_budget=16,block_size=16,backend=torch"


def tiny(family):
    config_cls, model_cls, extra, attn, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{**BASE, **extra})
    if attn is not None:
        config._attn_implementation = attn
    model = model_cls(config).eval()
    with torch.no_grad():  # sharper attention than random init, so selection matters
        for name, p in model.named_parameters():
            if any(part in name for part in ("q_proj.weight", "k_proj.weight", "query_key_value.weight", "c_attn.weight")):
                p.mul_(4.0)
    return model


def logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _reset_warnings()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_coverage_zero_is_the_models_own_attention(family):
    model = tiny(family)
    loaded_with = model.config._attn_implementation
    ids = torch.randint(0, 128, (2, 150))
    ref = logits(model, ids)
    tokensparse.enable(model, TokenSparseConfig(coverage=0.0, window=16, min_tokens=16), record=True)
    assert torch.equal(logits(model, ids), ref)
    # Every sparse layer reports the prefill, as dense.
    (prefill,) = tokensparse.selection_report(model)
    assert sorted(prefill) == [2, 3] and all(r.dense == [True, True] and r.mean_kept_share == 1.0 for r in prefill.values())
    tokensparse.disable(model)
    assert model.config._attn_implementation == loaded_with
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_config_runs_or_falls_back_with_a_reason(family, caplog):
    model = tiny(family)
    expect = FAMILIES[family][4]
    ids = torch.randint(0, 128, (1, 200))
    ref = logits(model, ids)
    tokensparse.enable(model, SPARSE, record=True)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        sparse = logits(model, ids)
    (prefill,) = tokensparse.selection_report(model)
    assert torch.isfinite(sparse).all()
    if expect == "sparse":
        assert min(r.mean_kept_share for r in prefill.values()) < 1.0
        assert not torch.equal(sparse, ref)
    else:
        # The model's own attention everywhere, said once, and recorded as dense.
        assert expect in caplog.text and "running the model's own attention" in caplog.text
        assert all(r.dense == [True] for r in prefill.values())
        assert torch.equal(sparse, ref)


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec[4] == "sparse"])
def test_sparse_path_reproduces_the_models_attention(family):
    """Scale, masks and head layout reach the sparse path as the model means them."""
    model = tiny(family)
    ids = torch.randint(0, 128, (1, 150))
    ref = logits(model, ids)
    tokensparse.enable(model, DENSE_VIA_KERNEL)
    torch.testing.assert_close(logits(model, ids), ref, atol=2e-4, rtol=2e-4)


def test_eager_left_padding_reaches_the_sparse_path():
    """Eager models get eager masks (float, additive); left padding is still read from them."""
    model = tiny("llama_eager")
    seqs = [torch.randint(1, 128, (n,)) for n in (160, 101)]
    ids = torch.zeros(2, 160, dtype=torch.long)
    mask = torch.zeros(2, 160, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, 160 - len(s):] = s
        mask[b, 160 - len(s):] = 1
    tokensparse.enable(model, SPARSE, record=True)
    batch = logits(model, ids, attention_mask=mask)
    (prefill,) = tokensparse.selection_report(model, clear=True)
    assert all(r.seq_lens == [160, 101] for r in prefill.values())
    for b, s in enumerate(seqs):
        alone = logits(model, s[None])
        torch.testing.assert_close(batch[b, 160 - len(s):], alone[0], atol=1e-4, rtol=1e-4)
