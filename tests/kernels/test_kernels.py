"""Every Triton kernel against its PyTorch reference.

Small odd shapes on the CPU (TRITON_INTERPRET=1, as CI runs them); long ones
when a GPU is present. Fresh seeded random inputs per case, never zeros.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tokensparse.kernels import reference as ref
from tokensparse.selection import top_k_per_head as top_k_ref

from kernel_testing import DEVICE, ON_GPU, requires_kernels

pytestmark = [requires_kernels, pytest.mark.usefixtures("poison_uninitialized_memory")]

# (B, H, Hkv, L, D, W): odd lengths, GQA 1 and 4, head_dim 64 and 128.
if ON_GPU:
    SHAPES = [(1, 32, 8, 32771, 128, 128), (2, 8, 8, 8191, 64, 100), (1, 4, 1, 65537, 128, 128)]
else:
    SHAPES = [(1, 4, 1, 157, 64, 40), (2, 2, 2, 131, 128, 33)]
DTYPES = [torch.bfloat16, torch.float32]


def _seed(*parts) -> int:
    """A per-case seed that is the same in every run (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


def _rand(*shape, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _padding_mask(batch, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g)
    lens[0] = seq_len
    pos = torch.arange(seq_len)
    return (pos[None, :] >= (seq_len - lens)[:, None]).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_window_mass(shape, dtype, padded):
    from tokensparse.kernels.window_mass import window_mass

    b, h, hkv, seq_len, d, w = shape
    seed = _seed((shape, str(dtype), padded))
    q = _rand(b, h, seq_len, d, dtype=dtype, seed=seed) * 2  # peaked softmax
    k = _rand(b, hkv, seq_len, d, dtype=dtype, seed=seed + 1)
    mask = _padding_mask(b, seq_len, seed) if padded else None
    out = window_mass(q, k, w, key_padding_mask=mask)
    expected = ref.window_mass_ref(q, k, w, key_padding_mask=mask)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert _rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-4)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)), rtol=1e-4, atol=1e-4)


def _scores_with_ties(b, h, prefix, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, h, prefix, generator=g)
    s[..., ::3] = 0.25  # many exact ties: the lower index must win
    s[..., 1::7] = 0.0
    return s.to(DEVICE)


@pytest.mark.parametrize("case", ["fixed", "per_head_padded"])
def test_top_k_matches_reference_exactly(case):
    from tokensparse.kernels.topk import top_k_per_head

    b, h, w = 2, 2, 17
    prefix = 20000 if ON_GPU else 301
    seed = _seed(case)
    scores = _scores_with_ties(b, h, prefix, seed)
    seq_len = prefix + w
    if case == "fixed":
        seq_lens = torch.full((b,), seq_len, device=DEVICE)
        keep = torch.full((b, h), prefix // 3, device=DEVICE)
    else:
        seq_lens = torch.tensor([seq_len, seq_len - prefix // 2], device=DEVICE)
        g = torch.Generator().manual_seed(seed)
        keep = torch.randint(0, prefix // 2 - w, (b, h), generator=g).to(DEVICE)
        keep[0, 0] = prefix  # everything
        keep[1, 1] = 0  # nothing
        pad = seq_len - seq_lens
        scores = scores.masked_fill(torch.arange(prefix, device=DEVICE)[None, None, :] < pad[:, None, None], 0.0)
    got, got_n = top_k_per_head(scores, keep, seq_lens, w)
    want, want_n = top_k_ref(scores, keep, seq_lens, w)
    assert torch.equal(got, want)
    assert torch.equal(got_n, want_n)


def test_top_k_signed_scores_match_reference_exactly():
    """Both signs, +-0.0, ties cut through by the threshold, keys one ulp apart."""
    from tokensparse.kernels.topk import top_k_per_head

    b, h, w = 2, 3, 17
    prefix = 20000 if ON_GPU else 301
    seq_len = prefix + w
    g = torch.Generator().manual_seed(1234)
    scores = torch.randn(b, h, prefix, generator=g) * 4
    scores[..., ::5] = -0.75
    scores[..., 1::9] = 0.0
    scores[..., 2::9] = -0.0
    scores[..., 3::11] = 1.5
    # One ulp from a tie group: only the last radix digit tells them apart.
    scores[..., 4::13] = torch.nextafter(torch.tensor(1.5), torch.tensor(2.0))
    scores[..., 6::13] = torch.nextafter(torch.tensor(-0.75), torch.tensor(-1.0))
    seq_lens = torch.tensor([seq_len, seq_len - prefix // 3])
    pad = seq_len - seq_lens
    # Padding keeps large scores: they must still never be taken.
    scores[1, :, : int(pad[1])] = 100.0
    real = ~(torch.arange(prefix)[None, None, :] < pad[:, None, None])

    def cut_through(i, j, value):
        # A keep whose threshold falls inside the tie group at ``value``.
        s, r = scores[i, j], real[i, 0]
        return int(((s > value) & r).sum()) + int(((s == value) & r).sum()) // 2

    keep = torch.tensor([
        [prefix, cut_through(0, 1, -0.75), cut_through(0, 2, 0.0)],
        [int(real[1, 0].sum()), 0, cut_through(1, 2, 1.5)],
    ])
    scores, keep, seq_lens = scores.to(DEVICE), keep.to(DEVICE), seq_lens.to(DEVICE)
    got, got_n = top_k_per_head(scores, keep, seq_lens, w)
    want, want_n = top_k_ref(scores, keep, seq_lens, w)
    assert torch.equal(got, want)
    assert torch.equal(got_n, want_n)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_kept(shape, dtype):
    from tokensparse.kernels.gather import gather_kept

    b, h, hkv, seq_len, d, w = shape
    seed = _seed((shape, str(dtype)))
    q = _rand(b, h, seq_len, d, dtype=dtype, seed=seed)
    # Non-contiguous K/V, as transformers hands them over.
    k = _rand(b, seq_len, hkv, d, dtype=dtype, seed=seed + 1).transpose(1, 2)
    v = _rand(b, seq_len, hkv, d, dtype=dtype, seed=seed + 2).transpose(1, 2)
    idx = _random_kept_idx(b, h, seq_len, w, seed)
    got = gather_kept(q, k, v, idx)
    want = ref.gather_kept_ref(q, k, v, idx)
    for x, y in zip(got, want):
        assert x.shape == y.shape
        assert torch.equal(x, y)


def _random_kept_idx(b, h, seq_len, w, seed):
    g = torch.Generator().manual_seed(seed)
    prefix = seq_len - w
    keep = torch.randint(prefix // 4, prefix // 2, (b, h), generator=g)
    width = int(keep.max()) + w
    rows = torch.full((b, h, width), seq_len, dtype=torch.long)
    for i in range(b):
        for j in range(h):
            kept = torch.randperm(prefix, generator=g)[: keep[i, j]].sort().values
            row = torch.cat([kept, torch.arange(prefix, seq_len)])
            rows[i, j, : row.numel()] = row
    return rows.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_scatter_kept(shape, dtype, layout):
    from tokensparse.kernels.scatter import scatter_kept

    b, h, _, seq_len, d, w = shape
    seed = _seed((shape, str(dtype), layout))
    idx = _random_kept_idx(b, h, seq_len, w, seed)
    out_c = _rand(b, h, idx.shape[-1], d, dtype=dtype, seed=seed)
    got = scatter_kept(out_c, idx, seq_len, layout)
    want = ref.scatter_kept_ref(out_c, idx, seq_len, layout)
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("num_streams", [1, 2, 3])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_attend_kept_in_head_chunks(layout, num_streams):
    from tokensparse.kernels.pipeline import attend_kept

    b, h, hkv, seq_len, d, w = SHAPES[0]
    dtype = torch.bfloat16
    seed = 7 + len(layout)
    q = _rand(b, h, seq_len, d, dtype=dtype, seed=seed)
    k = _rand(b, hkv, seq_len, d, dtype=dtype, seed=seed + 1)
    v = _rand(b, hkv, seq_len, d, dtype=dtype, seed=seed + 2)
    idx = _random_kept_idx(b, h, seq_len, w, seed)
    # A budget of one head's compact tensors forces one head per chunk.
    # On CUDA the chunks alternate between ``num_streams`` streams (the CPU uses one).
    got = attend_kept(q, k, v, idx, layout=layout, chunk_budget=1, num_streams=num_streams)
    q_c, k_c, v_c = ref.gather_kept_ref(q, k, v, idx)
    out_c = torch.nn.functional.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True)
    want = ref.scatter_kept_ref(out_c, idx, seq_len, layout)
    assert torch.isfinite(got).all()
    assert _rel_err(got, want) < 1e-2


@pytest.mark.parametrize("kept_share", [0.2, 0.4, 0.9])
def test_attend_kept_stages_compact_tensors_in_output(kept_share):
    """One sequence, (B, H, L, D): q, k, v of a chunk live in its own output rows (3, 2, 1 of them)."""
    from tokensparse.kernels.pipeline import _num_staged, attend_kept

    h, hkv, seq_len, d, w = 4, 2, 301, 64, 8
    seed = int(kept_share * 10)
    q = _rand(1, h, seq_len, d, dtype=torch.bfloat16, seed=seed)
    k = _rand(1, hkv, seq_len, d, dtype=torch.bfloat16, seed=seed + 1)
    v = _rand(1, hkv, seq_len, d, dtype=torch.bfloat16, seed=seed + 2)
    g = torch.Generator().manual_seed(seed)
    width = int(kept_share * seq_len)
    rows = [torch.cat([torch.randperm(seq_len - w, generator=g)[: width - w].sort().values,
                       torch.arange(seq_len - w, seq_len)]) for _ in range(h)]
    rows[1][-3:] = seq_len  # padding entries
    idx = torch.stack(rows)[None].to(DEVICE)
    out_probe = torch.empty(1, h, seq_len, d)
    assert _num_staged(out_probe, "bhld", width, d) == min(3, seq_len // width)
    assert _num_staged(out_probe.transpose(1, 2), "blhd", width, d) == 0
    want_c = torch.nn.functional.scaled_dot_product_attention(*ref.gather_kept_ref(q, k, v, idx), is_causal=True)
    want = ref.scatter_kept_ref(want_c, idx, seq_len, "bhld")
    for budget in (1, 2**30):  # one head per chunk, every head in one chunk
        got = attend_kept(q, k, v, idx, chunk_budget=budget)
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="launch candidates are tried on GPUs only")
def test_window_mass_every_launch_candidate():
    from tokensparse.kernels.window_mass import MASS_CONFIGS, STATS_CONFIGS, window_mass

    b, h, hkv, seq_len, d, w = SHAPES[0]
    q = _rand(b, h, seq_len, d, dtype=torch.bfloat16, seed=5) * 2
    k = _rand(b, hkv, seq_len, d, dtype=torch.bfloat16, seed=6)
    expected = ref.window_mass_ref(q, k, w)
    for stats in STATS_CONFIGS:
        for mass in MASS_CONFIGS:
            out = window_mass(q, k, w, stats_config=stats, mass_config=mass)
            assert _rel_err(out, expected) < 1e-4, (stats, mass)


@pytest.mark.parametrize("num_heads, step", [(32, 12), (32, 2), (32, 29), (32, 32), (8, 3), (9, 4), (3, 2), (5, 1)])
def test_chunk_sizes_cover_every_head_with_small_edges(num_heads, step):
    from tokensparse.kernels.pipeline import chunk_sizes

    sizes = chunk_sizes(num_heads, step)
    assert sum(sizes) == num_heads and all(0 < s <= step for s in sizes)
    if num_heads > step:
        assert sizes[0] == sizes[-1] == max(1, step // 4)


@requires_kernels
def test_attend_kept_with_uneven_chunks():
    """8 heads, 3 per chunk by the budget: chunks of 1, 3, 3, 1 heads (small first and last)."""
    from tokensparse.kernels.pipeline import attend_kept, chunk_sizes, heads_per_chunk

    h, hkv, seq_len, d, w = 8, 2, 203, 64, 8
    seed = _seed("uneven chunks")
    q = _rand(1, h, seq_len, d, dtype=torch.bfloat16, seed=seed)
    k = _rand(1, hkv, seq_len, d, dtype=torch.bfloat16, seed=seed + 1)
    v = _rand(1, hkv, seq_len, d, dtype=torch.bfloat16, seed=seed + 2)
    idx = _random_kept_idx(1, h, seq_len, w, seed)
    # Staging is off in layout blhd: a head's compact q, k, v and out, bf16.
    budget = 3 * idx.shape[-1] * 4 * d * 2
    assert chunk_sizes(h, heads_per_chunk(q, v, idx.shape[-1], budget)) == [1, 3, 3, 1]
    got = attend_kept(q, k, v, idx, layout="blhd", chunk_budget=budget, num_streams=1)
    want_c = torch.nn.functional.scaled_dot_product_attention(*ref.gather_kept_ref(q, k, v, idx), is_causal=True)
    want = ref.scatter_kept_ref(want_c, idx, seq_len, "blhd")
    assert torch.isfinite(got).all()
    assert _rel_err(got, want) < 1e-2
