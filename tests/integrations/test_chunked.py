"""Token sparse after a cached prefix inside transformers: chunked prefill and a pre-filled cache."""

import pytest
import torch

import tokensparse
from tokensparse.integrations.transformers import _reset_warnings

from tiny_models import tiny_llama

# keep_tokens: each chunk attends over at most 32 + 16 keys whatever the prefix length.
SPEC = "token_sparse:keep_tokens=32,window=16,min_tokens=16,sparse_layers=0"


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _reset_warnings()


def sharp(model):
    with torch.no_grad():  # sharper attention than random init, so selection matters
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(4.0)
    return model


def padded_batch(lengths, total):
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, total - n:] = torch.randint(1, 128, (n,))
        mask[b, total - n:] = 1
    return ids, mask


def test_dense_chunked_prefill_equals_one_pass():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 150))
    cache, last = tokensparse.prefill(model, ids, chunk_size=64)
    _, whole = tokensparse.prefill(model, ids)
    assert cache.get_seq_length() == 150
    torch.testing.assert_close(last, whole, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        tokensparse.prefill(model, ids, chunk_size=0)


@pytest.mark.parametrize("padded", [False, True])
def test_one_layer_chunked_equals_whole_prompt(padded):
    """With one layer the cached keys do not depend on attention, so the last chunk's
    selection and output are exactly the whole prompt's last rows."""
    model = sharp(tiny_llama(num_layers=1))
    if padded:
        ids, mask = padded_batch([200, 170], 200)
    else:
        ids, mask = torch.randint(0, 128, (1, 200)), None
    tokensparse.enable(model, SPEC, record=True)
    _, whole = tokensparse.prefill(model, ids, attention_mask=mask)
    cache, chunked = tokensparse.prefill(model, ids, chunk_size=120, attention_mask=mask)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    whole_record, first, second = (p[0] for p in tokensparse.selection_report(model))
    assert second.seq_lens == whole_record.seq_lens and second.num_kept == whole_record.num_kept
    assert all(n == 32 + 16 for row in second.num_kept for n in row)  # the fixed key budget
    tokensparse.disable(model)
    _, dense = tokensparse.prefill(model, ids, attention_mask=mask)
    assert not torch.allclose(chunked, dense, atol=1e-4)  # tokens were really dropped


def test_second_turn_over_a_prefilled_cache_runs_sparse():
    model = sharp(tiny_llama())
    document = torch.randint(0, 128, (1, 300))
    question = torch.randint(0, 128, (1, 40))
    tokensparse.enable(model, SPEC.replace("sparse_layers=0", "sparse_layers=2-3"), record=True)
    cache, _ = tokensparse.prefill(model, document)
    cache, logits = tokensparse.prefill(model, question, cache=cache)
    assert cache.get_seq_length() == 340 and torch.isfinite(logits).all()
    turn = tokensparse.selection_report(model)[-1]
    assert sorted(turn) == [2, 3] and all(r.seq_lens == [340] and r.num_kept == [[48] * 4] for r in turn.values())


def test_short_chunks_run_the_models_own_attention():
    """Chunks shorter than the window have no window to score with: dense, bitwise the model's own."""
    model = sharp(tiny_llama())
    ids = torch.randint(0, 128, (1, 200))
    cache, _ = tokensparse.prefill(model, ids[:, :190])
    _, ref = tokensparse.prefill(model, ids[:, 190:], cache=cache)
    dense_cache, _ = tokensparse.prefill(model, ids[:, :190])
    tokensparse.enable(model, SPEC.replace("sparse_layers=0", "sparse_layers=0-3"))
    _, short = tokensparse.prefill(model, ids[:, 190:], cache=dense_cache)
    assert torch.equal(short, ref)


def test_left_padded_prefill_numbers_real_tokens():
    """A padded row's cache holds the keys its unpadded prompt gives (RoPE by real position,
    as generate numbers tokens), so generate can continue from it."""
    model = tiny_llama()
    ids, mask = padded_batch([150, 110], 150)
    cache, last = tokensparse.prefill(model, ids, chunk_size=64, attention_mask=mask)
    alone, alone_last = tokensparse.prefill(model, ids[1:, 40:], chunk_size=64)
    for padded_layer, layer in zip(cache.layers, alone.layers):
        torch.testing.assert_close(padded_layer.keys[1:, :, 40:], layer.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[1:], alone_last, atol=1e-5, rtol=1e-5)


def test_local_rows_run_sparse_on_chunks(caplog):
    """Local rows take chunks too: every chunk after the first is recorded sparse, and dropped
    rows get attention (the logits differ from zero rows), with no fallback warning."""
    model = sharp(tiny_llama())
    ids = torch.randint(0, 128, (1, 200))
    results = {}
    for rows in ("zero", "local"):
        tokensparse.enable(model, SPEC.replace("sparse_layers=0", "sparse_layers=0-2") + f",dropped_rows={rows}",
                           record=True)
        with caplog.at_level("WARNING", logger="tokensparse"):
            _, results[rows] = tokensparse.prefill(model, ids, chunk_size=80)
        chunks = tokensparse.selection_report(model)
        tokensparse.disable(model)
        assert [c[0].seq_lens for c in chunks] == [[80], [160], [200]]
        assert chunks[-1][2].num_kept == [[48] * 4]
    assert "own attention" not in caplog.text
    assert not torch.allclose(results["local"], results["zero"], atol=1e-4)
