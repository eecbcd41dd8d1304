"""Token Sparse Attention of a chunk after a cached prefix (Lq <= Lk), against the float64 reference.

``reference_chunk`` (tests/reference.py) is written from the description of
issue 14 with loops over sequences, heads and rows; it shares no code with the
library.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import tokensparse.attention as attention_module
from tokensparse import TokenSparseConfig, select_tokens, token_sparse_attention
from tokensparse.kernels import _warn_chunk_fallback_once, reference as kref, triton_runnable
from reference import reference_chunk

W = 16
KS = 5
MIN = 8

MODES = [
    pytest.param(dict(budget="coverage", coverage=0.3), id="coverage"),
    pytest.param(dict(budget="head_coverage", coverage=0.3), id="head_coverage"),
    pytest.param(dict(budget="keep_ratio", keep_ratio=0.4), id="keep_ratio"),
    pytest.param(dict(budget="keep_tokens", keep_tokens=20), id="keep_tokens"),
    pytest.param(dict(budget="coverage", coverage=0.3, max_tokens=12), id="coverage-max"),
]


def cfg(**kw):
    base = dict(window=W, kernel_size=KS, min_tokens=MIN, backend="torch")
    base.update(kw)
    return TokenSparseConfig(**base)


def make_inputs(batch=2, heads=4, kv_heads=2, seq_len=91, dim=16, dtype=torch.float64, seed=0):
    """Random Q/K/V with per-head sharpness, so heads' score distributions differ."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=torch.float64)
    q = q * torch.linspace(0.5, 3.0, heads, dtype=torch.float64)[None, :, None, None]
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(lens, seq_len):
    return torch.arange(seq_len)[None, :] >= (seq_len - torch.tensor(lens))[:, None]


def kept_lists(selection):
    out = []
    for b in range(selection.num_kept.shape[0]):
        if selection.kept_idx is None or bool(selection.dense[b]):
            out.append(None)
            continue
        out.append([selection.kept_idx[b, h, : int(selection.num_kept[b, h])].tolist()
                    for h in range(selection.num_kept.shape[1])])
    return out


def run_chunk(q, k, v, config, query_len, lens=None):
    seq_len = k.shape[2]
    mask = None if lens is None else padding_mask(lens, seq_len)
    return token_sparse_attention(q[:, :, seq_len - query_len:], k, v, config=config, key_padding_mask=mask,
                                  return_stats=True)


# ---------------------------------------------------------------- Lq == Lk: today's op
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lens", [None, [91, 64]], ids=["unpadded", "padded"])
def test_whole_prompt_is_todays_op_bitwise(mode, lens):
    """Lq == Lk runs today's stages unchanged: select, gather, causal SDPA, scatter."""
    q, k, v = make_inputs(dtype=torch.float32, seed=1)
    config = cfg(**mode)
    mask = None if lens is None else padding_mask(lens, 91)
    out = token_sparse_attention(q, k, v, config=config, key_padding_mask=mask)
    selection = select_tokens(q, k, config, key_padding_mask=mask)
    assert selection.kept_idx is not None, "the inputs should make the layer sparse"
    q_c, k_c, v_c = kref.gather_kept_ref(q, k, v, selection.kept_idx)
    out_c = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True)
    assert torch.equal(out, kref.scatter_kept_ref(out_c, selection.kept_idx, 91))


# ---------------------------------------------------------------- against the float64 reference
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("query_len", [W, W + 7, 53], ids=["window", "window+7", "53"])
def test_chunk_matches_reference(mode, kv_heads, query_len):
    q, k, v = make_inputs(heads=4, kv_heads=kv_heads, seed=2)
    lens = [91, 58]  # the second sequence's padding reaches into the 53-row chunk
    config = cfg(**mode)
    out, sel = run_chunk(q, k, v, config, query_len, lens)
    ref_out, ref_kept, ref_dropped = reference_chunk(q[:, :, 91 - query_len:], k, v, config, lens)
    assert kept_lists(sel) == ref_kept
    assert not sel.all_dense, "the inputs should make the layer sparse"
    for b in range(2):
        for h in range(4):
            expect = lens[b] if ref_kept[b] is None else len(ref_kept[b][h])
            assert int(sel.num_kept[b, h]) == expect
    torch.testing.assert_close(sel.dropped_mass.double(), torch.tensor(ref_dropped, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES[:1] + MODES[3:4])
def test_chunk_with_a_dense_sequence_in_the_batch(mode):
    q, k, v = make_inputs(batch=3, heads=4, kv_heads=2, seq_len=77, seed=3)
    lens = [77, 60, 20]  # the last is too short for the method (<= W + MIN) and runs dense
    config = cfg(**mode)
    out, sel = run_chunk(q, k, v, config, 30, lens)
    ref_out, ref_kept, _ = reference_chunk(q[:, :, -30:], k, v, config, lens)
    assert ref_kept[2] is None and bool(sel.dense[2])
    assert kept_lists(sel) == ref_kept
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("query_len", [W, 40, 91])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_rows_equal_whole_prompt_rows(query_len, dtype):
    """The chunk's selection is the whole prompt's (same window queries, same keys), so are its rows."""
    q, k, v = make_inputs(seed=4, dtype=dtype)
    config = cfg(budget="head_coverage", coverage=0.3)
    mask = padding_mask([91, 70], 91)
    whole, whole_sel = token_sparse_attention(q, k, v, config=config, key_padding_mask=mask, return_stats=True)
    out, sel = run_chunk(q, k, v, config, query_len, [91, 70])
    assert torch.equal(sel.kept_idx, whole_sel.kept_idx)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, whole[:, :, 91 - query_len:], atol=tol, rtol=tol)


@pytest.mark.parametrize("query_len", [1, 5, W - 1])
def test_chunk_shorter_than_window_runs_dense(query_len):
    """Decode-like calls have no full window to score with: exact causal attention by absolute position."""
    q, k, v = make_inputs(heads=4, kv_heads=1, seed=5)
    lens = [91, 40]
    out, sel = run_chunk(q, k, v, cfg(budget="keep_tokens", keep_tokens=4), query_len, lens)
    assert sel.all_dense and sel.kept_idx is None
    ref_out, ref_kept, _ = reference_chunk(q[:, :, 91 - query_len:], k, v, cfg(budget="keep_tokens", keep_tokens=4),
                                           lens)
    assert ref_kept == [None, None]
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)


def test_chunk_rows_in_the_padding_are_zero():
    q, k, v = make_inputs(seed=6)
    lens = [91, 30]
    out, sel = run_chunk(q, k, v, cfg(budget="keep_tokens", keep_tokens=10), 50, lens)
    assert not bool(sel.dense[1])
    assert out[1, :, : 50 - 30].abs().max() == 0
    assert out[:, :, -W:].abs().amax(dim=-1).min() > 0  # window rows are always kept


# ---------------------------------------------------------------- fixed key budget per chunk
def test_keep_tokens_bounds_the_keys_a_chunk_attends_over(monkeypatch):
    """Whatever the prefix length, a chunk attends over keep_tokens + window keys per head."""
    keep, query_len = 12, 24
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    config = cfg(budget="keep_tokens", keep_tokens=keep)
    for seq_len in (61, 150, 400):
        q, k, v = make_inputs(batch=1, heads=2, kv_heads=1, seq_len=seq_len, seed=seq_len)
        calls.clear()
        out, sel = run_chunk(q, k, v, config, query_len)
        assert sel.kept_idx.shape[-1] == keep + W
        assert bool((sel.num_kept == keep + W).all())
        (rows, keys), = calls
        assert keys == keep + W and rows == keep + W  # compact rows: the kept slots, whatever the chunk
        if seq_len == 150:
            ref_out, _, _ = reference_chunk(q[:, :, -query_len:], k, v, config)
            torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- backends and refusals
needs_triton = pytest.mark.skipif(not triton_runnable(torch.zeros(1)),
                                  reason="needs Triton and CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("query_len", [W, 29, 61])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_window_mass_of_a_chunk(query_len, padded):
    from tokensparse.kernels.window_mass import window_mass

    q, k, _ = make_inputs(heads=4, kv_heads=2, seq_len=61, dtype=torch.float32, seed=13)
    mask = padding_mask([61, 37], 61) if padded else None
    chunk = q[:, :, 61 - query_len:]
    got = window_mass(chunk, k, W, key_padding_mask=mask)
    torch.testing.assert_close(got, kref.window_mass_ref(chunk, k, W, key_padding_mask=mask), atol=1e-6, rtol=1e-5)
    # The window rows are the whole prompt's: the same kernel arithmetic, the same bits.
    assert torch.equal(got, window_mass(q, k, W, key_padding_mask=mask))


@needs_triton
def test_triton_backend_runs_chunk_attention_in_torch_with_one_warning(caplog):
    q, k, v = make_inputs(dtype=torch.float32, seed=7)
    mask = padding_mask([91, 66], 91)
    config = cfg(budget="head_coverage", coverage=0.3, backend="triton")
    _warn_chunk_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="tokensparse.kernels"):
        runs = [token_sparse_attention(q[:, :, -30:], k, v, config=config, key_padding_mask=mask, return_stats=True)
                for _ in range(2)]
    assert len([r for r in caplog.records if "no Triton path yet" in r.getMessage()]) == 1
    whole, whole_sel = token_sparse_attention(q, k, v, config=config, key_padding_mask=mask, return_stats=True)
    torch_out, torch_sel = token_sparse_attention(q[:, :, -30:], k, v, config=cfg(budget="head_coverage", coverage=0.3),
                                                  key_padding_mask=mask, return_stats=True)
    for out, sel in runs:
        assert torch.equal(sel.kept_idx, whole_sel.kept_idx) and torch.equal(sel.kept_idx, torch_sel.kept_idx)
        torch.testing.assert_close(out, whole[:, :, -30:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, torch_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens", [None, [91, 64], [91, 25]], ids=["unpadded", "padded", "chunk_in_padding"])
def test_local_dropped_rows_of_a_chunk(lens):
    """Kept rows are the zero-row op's; dropped rows get sink + local attention by absolute position."""
    from test_local_attention import dense_sink_local_ref

    q, k, v = make_inputs(seed=8)
    query_len, block = 30, 16
    zero, sel = run_chunk(q, k, v, cfg(budget="keep_tokens", keep_tokens=20), query_len, lens)
    local, sel_local = run_chunk(q, k, v, cfg(budget="keep_tokens", keep_tokens=20, dropped_rows="local",
                                              local_block=block), query_len, lens)
    assert torch.equal(sel.kept_idx, sel_local.kept_idx)
    seq_len = k.shape[2]
    kept = torch.zeros(q.shape[0], q.shape[1], seq_len + 1, dtype=torch.bool).scatter_(2, sel.kept_idx, True)
    kept = kept[:, :, seq_len - query_len: seq_len]
    seq_lens = torch.tensor(lens if lens else [seq_len] * q.shape[0])
    real = torch.arange(seq_len - query_len, seq_len)[None, :] >= (seq_len - seq_lens)[:, None]  # (B, Lq)
    dropped = ~kept & real[:, None, :]
    assert kept.any() and dropped.any()
    ref = dense_sink_local_ref(q, k, v, block, seq_lens)[:, :, -query_len:]
    torch.testing.assert_close(local[kept], zero[kept], atol=0, rtol=0)
    torch.testing.assert_close(local[dropped], ref[dropped], atol=1e-10, rtol=1e-10)
    padding = ~real[:, None, :].expand_as(kept)
    assert bool(padding.any()) == (lens == [91, 25])
    assert (local[padding] == 0).all()


def test_inner_attention_refused_for_chunks():
    q, k, v = make_inputs(seed=9)
    with pytest.raises(ValueError, match="inner attention needs query and key of one length"):
        token_sparse_attention(q[:, :, -30:], k, v, config=cfg(), inner=lambda *a, **kw: None)


def test_query_longer_than_keys_refused():
    q, k, v = make_inputs(seed=10)
    with pytest.raises(ValueError, match="at most the key length"):
        token_sparse_attention(q, k[:, :, :50], v[:, :, :50], config=cfg())


def test_padding_mask_must_cover_the_keys():
    q, k, v = make_inputs(seed=11)
    with pytest.raises(ValueError, match=r"shape \(B, Lk\)"):
        token_sparse_attention(q[:, :, -30:], k, v, config=cfg(), key_padding_mask=torch.ones(2, 30, dtype=torch.bool))


def test_dense_chunk_attention_is_bottom_right_causal():
    """A chunk that runs dense (too short for the method) is causal by absolute position, padded rows zero."""
    q, k, v = make_inputs(seq_len=20, seed=12)
    lens = [20, 9]
    out, sel = run_chunk(q, k, v, cfg(), 12, lens)
    assert sel.all_dense
    expect = torch.zeros_like(out)
    for b, n in enumerate(lens):
        for h in range(4):
            for i in range(12):
                pos = 20 - 12 + i
                if pos < 20 - n:
                    continue
                keys = torch.arange(20 - n, pos + 1)
                probs = torch.softmax(k[b, h // 2, keys] @ q[b, h, pos] / math.sqrt(16), dim=0)
                expect[b, h, i] = probs @ v[b, h // 2, keys]
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=1e-12)


def test_chunk_blhd_layout_is_the_transpose():
    from tokensparse.attention import attend_selected

    q, k, v = make_inputs(seed=14)
    config = cfg(budget="keep_tokens", keep_tokens=20)
    chunk = q[:, :, -40:]
    selection = select_tokens(chunk, k, config)
    bhld = attend_selected(chunk, k, v, selection, backend="torch", config=config)
    blhd = attend_selected(chunk, k, v, selection, backend="torch", layout="blhd", config=config)
    assert blhd.shape == (2, 40, 4, 16)
    assert torch.equal(blhd, bhld.transpose(1, 2))
