"""Fixtures of the evaluation tests: a byte-level tokenizer with a chat template
(one token per byte, so lengths are easy to reason about) and a tiny random
Llama model, both built in memory."""

import pytest

from tiny_models import byte_tokenizer as _byte_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer():
    return _byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_loaded(byte_tokenizer):
    """A LoadedModel with a 2-layer random Llama on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokensparse.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(byte_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=byte_tokenizer.bos_token_id,
        eos_token_id=byte_tokenizer.eos_token_id,
        pad_token_id=byte_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return LoadedModel(model=model, tokenizer=byte_tokenizer, name="tiny-llama", device=torch.device("cpu"))
