"""token_sparse_attention and select_tokens against the independent float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from reference import reference_attention, reference_selection
from tokensparse import TokenSparseConfig, select_tokens, token_sparse_attention

SHAPES = [
    # batch, heads, kv heads, length, head_dim
    (1, 2, 2, 157, 32),
    (2, 6, 2, 211, 64),
    (3, 4, 1, 173, 32),
    (2, 8, 2, 301, 32),
]


def make_qkv(batch, heads, kv_heads, length, dim, dtype=torch.float64):
    q = torch.randn(batch, heads, length, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, dtype=dtype)
    return q, k, v


def check_against_reference(q, k, v, sel, out, *, coverage, window, kernel_size, min_tokens, atol):
    batch, heads, length, _ = q.shape
    for b in range(batch):
        ref = reference_selection(q[b], k[b], coverage=coverage, window=window, kernel_size=kernel_size, min_tokens=min_tokens)
        kept = None if ref is None else ref[0]
        assert bool(sel.dense[b]) == (kept is None)
        for h in range(heads):
            expected = list(range(length)) if kept is None else kept[h]
            assert int(sel.num_kept[b, h]) == len(expected)
            if sel.kept_idx is not None:
                got = sel.kept_idx[b, h, : len(expected)].tolist()
                assert got == expected
                assert (sel.kept_idx[b, h, len(expected):] == length).all()
        ref_out = reference_attention(q[b], k[b], v[b], kept)
        torch.testing.assert_close(out[b].double(), ref_out, atol=atol, rtol=atol)
        if kept is not None:
            mass = ref[1]
            for h in range(heads):
                dropped = sorted(set(range(length - window)) - set(kept[h]))
                assert float(sel.dropped_mass[b, h]) == pytest.approx(float(mass[h, dropped].sum()), abs=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "coverage, window, kernel_size, min_tokens",
    [(0.05, 16, 7, 32), (0.2, 32, 3, 16), (0.4, 8, 1, 64), (0.02, 16, 5, 8), (0.3, 24, 7, 150)],
)
def test_matches_reference(shape, coverage, window, kernel_size, min_tokens):
    q, k, v = make_qkv(*shape)
    out, sel = token_sparse_attention(
        q, k, v, coverage=coverage, window=window, kernel_size=kernel_size, min_tokens=min_tokens, return_stats=True
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    check_against_reference(q, k, v, sel, out, coverage=coverage, window=window, kernel_size=kernel_size, min_tokens=min_tokens, atol=1e-9)


def test_some_cases_really_drop_and_floor_holds():
    q, k, v = make_qkv(2, 4, 2, 300, 32)
    _, sel = token_sparse_attention(q, k, v, coverage=0.4, window=16, min_tokens=32, return_stats=True)
    assert not sel.dense.any()
    prefix_kept = sel.num_kept - 16
    assert (prefix_kept < 284).all() and (prefix_kept >= 32).all()
    _, sel = token_sparse_attention(q, k, v, coverage=0.9, window=16, min_tokens=200, return_stats=True)
    assert (sel.num_kept - 16 == 200).all()  # the floor binds


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype, atol):
    q, k, v = make_qkv(2, 4, 2, 190, 64, dtype=dtype)
    out, sel = token_sparse_attention(q, k, v, coverage=0.1, window=16, min_tokens=32, return_stats=True)
    assert out.dtype == dtype
    check_against_reference(q, k, v, sel, out, coverage=0.1, window=16, kernel_size=7, min_tokens=32, atol=atol)


def test_rows_of_dropped_tokens_are_zero_and_window_kept():
    q, k, v = make_qkv(2, 6, 3, 250, 32, dtype=torch.float32)
    out, sel = token_sparse_attention(q, k, v, coverage=0.3, window=20, min_tokens=40, return_stats=True)
    for b in range(2):
        for h in range(6):
            valid = sel.kept_idx[b, h, : sel.num_kept[b, h]]
            assert torch.all(valid[1:] > valid[:-1])  # sorted, unique
            assert set(range(230, 250)) <= set(valid.tolist())  # window kept
            dropped = torch.ones(250, dtype=torch.bool)
            dropped[valid] = False
            assert dropped.any()
            assert (out[b, h, dropped] == 0).all()
            assert (out[b, h, valid].abs().sum(-1) > 0).all()


def test_short_input_and_zero_coverage_run_dense():
    q, k, v = make_qkv(2, 4, 2, 100, 32, dtype=torch.float32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, sel = token_sparse_attention(q, k, v, return_stats=True)  # 100 <= 128 + 1024
    assert sel.all_dense and sel.kept_idx is None and torch.equal(out, dense)
    out, sel = token_sparse_attention(q, k, v, coverage=0.0, window=8, min_tokens=8, return_stats=True)
    assert sel.all_dense and torch.equal(out, dense)


def test_stats_of_a_dense_call():
    """The documented contract of a call that runs dense: no indices, every real token
    counted as kept, nothing dropped, every sequence marked dense."""
    q, k, v = make_qkv(2, 4, 2, 100, 32, dtype=torch.float32)
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, :30] = False  # the second sequence has 70 real tokens
    out, sel = token_sparse_attention(q, k, v, key_padding_mask=mask, return_stats=True)  # 100 <= 128 + 1024
    assert sel.kept_idx is None and sel.all_dense and sel.dense.tolist() == [True, True]
    assert sel.seq_lens.tolist() == [100, 70] and sel.seq_len == 100
    assert sel.num_kept.tolist() == [[100] * 4, [70] * 4]
    assert torch.equal(sel.kept_share, torch.ones(2, 4)) and torch.equal(sel.dropped_mass, torch.zeros(2, 4))
    assert sel.dropped_mass.dtype == torch.float32 and sel.num_kept.dtype == torch.int64


def test_scale_is_used():
    q, k, v = make_qkv(1, 2, 1, 120, 16)
    out = token_sparse_attention(q, k, v, coverage=0.2, window=8, min_tokens=16, scale=0.3)
    sel = select_tokens(q, k, TokenSparseConfig(coverage=0.2, window=8, min_tokens=16), scale=0.3)
    kept = [sel.kept_idx[0, h, : sel.num_kept[0, h]].tolist() for h in range(2)]
    torch.testing.assert_close(out[0], reference_attention(q[0], k[0], v[0], kept, scale=0.3))


def test_config_argument_and_conflict():
    q, k, v = make_qkv(1, 2, 1, 200, 16)
    cfg = TokenSparseConfig(coverage=0.2, window=8, min_tokens=16)
    a = token_sparse_attention(q, k, v, config=cfg)
    b = token_sparse_attention(q, k, v, coverage=0.2, window=8, min_tokens=16)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="either config"):
        token_sparse_attention(q, k, v, config=cfg, coverage=0.1)


@pytest.mark.parametrize("batch_lengths", [(180, 250, 97), (300, 299)])
def test_left_padded_batch_equals_each_sequence_alone(batch_lengths):
    heads, kv_heads, dim, length = 4, 2, 32, max(batch_lengths)
    cfg = dict(coverage=0.2, window=16, min_tokens=24)
    q, k, v = make_qkv(len(batch_lengths), heads, kv_heads, length, dim, dtype=torch.float32)
    mask = torch.zeros(len(batch_lengths), length, dtype=torch.bool)
    for b, n in enumerate(batch_lengths):
        mask[b, length - n :] = True
    # Garbage in padded positions must not matter.
    q = q.masked_fill(~mask[:, None, :, None], 1e3)
    out, sel = token_sparse_attention(q, k, v, key_padding_mask=mask, return_stats=True, **cfg)
    for b, n in enumerate(batch_lengths):
        pad = length - n
        alone, sel_alone = token_sparse_attention(
            q[b : b + 1, :, pad:], k[b : b + 1, :, pad:], v[b : b + 1, :, pad:], return_stats=True, **cfg
        )
        torch.testing.assert_close(out[b, :, pad:], alone[0], atol=2e-6, rtol=2e-5)
        assert (out[b, :, :pad] == 0).all()
        assert torch.equal(sel.num_kept[b], sel_alone.num_kept[0])
        assert bool(sel.dense[b]) == bool(sel_alone.dense[0])
        assert int(sel.seq_lens[b]) == n
        if sel_alone.kept_idx is not None:
            for h in range(heads):
                count = int(sel.num_kept[b, h])
                assert torch.equal(sel.kept_idx[b, h, :count] - pad, sel_alone.kept_idx[0, h, :count])
        torch.testing.assert_close(sel.dropped_mass[b], sel_alone.dropped_mass[0], atol=1e-6, rtol=1e-5)


def test_each_sequence_gets_its_own_budget():
    # Sequence 0: peaked attention on a few keys (drops a lot); sequence 1: flat (drops little).
    q, k, v = make_qkv(2, 2, 1, 260, 32, dtype=torch.float32)
    k[0, :, 10:14] = q[0, 0, -16:].mean(0) * 4
    q[1] *= 0.01
    _, sel = token_sparse_attention(q, k, v, coverage=0.3, window=16, min_tokens=16, return_stats=True)
    assert int(sel.num_kept[0, 0]) != int(sel.num_kept[1, 0])


def test_tokensparse_in_float64_reference_for_gqa_ratios():
    for heads, kv_heads in [(3, 3), (3, 1), (8, 2)]:
        q, k, v = make_qkv(1, heads, kv_heads, 170, 32)
        out, sel = token_sparse_attention(q, k, v, coverage=0.25, window=16, min_tokens=16, return_stats=True)
        check_against_reference(q, k, v, sel, out, coverage=0.25, window=16, kernel_size=7, min_tokens=16, atol=1e-9)


BAD_INPUTS = [
    (lambda q, k, v: (q[0], k, v), {}, "query must have 4 dims"),
    (lambda q, k, v: (q, k[0], v), {}, "key must have 4 dims"),
    (lambda q, k, v: (q.long(), k, v), {}, "query must be a floating-point"),
    (lambda q, k, v: (q, k.double(), v), {}, "share a dtype"),
    (lambda q, k, v: (q, k[:1], v[:1]), {}, "batch sizes differ"),
    (lambda q, k, v: (q, k[:, :, :50], v[:, :, :50]), {}, "at most the key length"),
    (lambda q, k, v: (q, k, v[:, :, :50]), {}, "key and value must have one sequence length"),
    (lambda q, k, v: (q, k[..., :16], v), {}, "head_dim"),
    (lambda q, k, v: (q, k[:, :1], v), {}, "same number of heads"),
    (lambda q, k, v: (q[:, :3], k, v), {}, "multiple of key/value heads"),
    (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.ones(2, 64)}, "bool"),
    (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.ones(2, 63, dtype=torch.bool)}, r"shape \(B, Lk\)"),
    (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.tensor([[True] * 63 + [False]] * 2)}, "left padding"),
    (lambda q, k, v: (q, k, v), {"coverage": 2.0}, "coverage"),
    (lambda q, k, v: (q, k, v), {"kernel_size": 2}, "kernel_size"),
    (lambda q, k, v: (q, k, v), {"config": {"coverage": 0.1}}, "config must be a TokenSparseConfig"),
    # Empty dimensions are refused by name (they gave RuntimeError / ZeroDivisionError
    # from inside the selection); the sparse settings make sure it is not a short-input shortcut.
    (lambda q, k, v: (q[:0], k[:0], v[:0]), {"window": 8, "min_tokens": 8}, r"query has an empty batch \(B\)"),
    (lambda q, k, v: (q[:, :0], k, v), {"window": 8, "min_tokens": 8}, r"query has an empty heads \(H\)"),
    (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), {}, r"query has an empty sequence length \(L\)"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), {"window": 8, "min_tokens": 8}, r"query has an empty head_dim"),
    (lambda q, k, v: (q, k, v[..., :0]), {"window": 8, "min_tokens": 8}, r"value has an empty head_dim"),
]


@pytest.mark.parametrize("mutate, kwargs, message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(mutate, kwargs, message):
    q, k, v = make_qkv(2, 4, 2, 64, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        token_sparse_attention(*mutate(q, k, v), **kwargs)


def test_tensors_on_different_devices():
    q, k, v = make_qkv(1, 2, 1, 32, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="one device"):
        token_sparse_attention(q, k.to("meta"), v)


def test_backend_argument_forces_the_path():
    q, k, v = make_qkv(1, 4, 2, 200, 32, dtype=torch.float32)
    ref = token_sparse_attention(q, k, v, coverage=0.2, window=16, min_tokens=16, backend="torch")
    auto = token_sparse_attention(q, k, v, coverage=0.2, window=16, min_tokens=16)  # CPU: the reference
    assert torch.equal(ref, auto)
    with pytest.raises(ValueError, match="backend"):
        token_sparse_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="either config"):
        token_sparse_attention(q, k, v, backend="torch", config=TokenSparseConfig())
