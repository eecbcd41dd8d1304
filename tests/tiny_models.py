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


def byte_tokenizer():
    """A byte-level tokenizer (one token per byte) with a chat template and BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_tokens(["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"], special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = "<s>", "</s>", "<pad>"
    tok.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok.padding_side = "left"
    return tok
