"""Tiny random transformers models shared by the tests."""

import torch


def tiny_llama(num_layers=4, seed=0):
    """A 4-layer Llama (hidden 64, 4 query / 2 KV heads) with random weights, on SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()
