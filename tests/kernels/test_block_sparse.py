"""The block-sparse causal attention kernel against its PyTorch reference.

Runs the Triton kernel on CUDA, or on the CPU with TRITON_INTERPRET=1 (CI);
without either, only the reference and the dispatch are tested.
"""

import pytest
import torch
import torch.nn.functional as F

from tokensparse.kernels import TORCH_OPS, ops_for, triton_runnable
from tokensparse.kernels.block_sparse import (
    block_mask_from_lists,
    block_sparse_attention,
    block_sparse_attention_ref,
    lists_from_block_mask,
    num_blocks,
    visited_share,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL = triton_runnable(torch.empty(0, device=DEVICE))
needs_kernel = pytest.mark.skipif(not KERNEL, reason="needs CUDA or TRITON_INTERPRET=1")


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_pattern(batch, heads, length, block, density, *, keep_diag=True):
    nb = num_blocks(length, block)
    mask = torch.rand(batch, heads, nb, nb) < density
    if keep_diag:
        mask |= torch.eye(nb, dtype=torch.bool)
    return lists_from_block_mask(mask.to(DEVICE))


def make_qkv(batch, heads, kv_heads, length, dim, dim_v, dtype):
    q = torch.randn(batch, heads, length, dim, device=DEVICE).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, device=DEVICE).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim_v, device=DEVICE).to(dtype)
    return q, k, v


def check(q, k, v, idx, cnt, block, *, seq_lens=None, out=None, tiles=None):
    """Kernel vs float64 reference; the tolerance comes from the error of the
    reference itself run at the inputs' precision."""
    if out is not None:
        out.fill_(float("nan"))  # poison: every element must be written
    got = block_sparse_attention(q, k, v, idx, cnt, block, seq_lens=seq_lens, out=out, tiles=tiles)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "unwritten or NaN output"
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), idx, cnt, block, seq_lens=seq_lens)
    low = block_sparse_attention_ref(q, k, v, idx, cnt, block, seq_lens=seq_lens)
    tol = 3 * rel_err(low, ref) + (3e-4 if DEVICE == "cuda" else 1e-6)
    err = rel_err(got, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.2e}"
    if seq_lens is not None:
        rows = torch.arange(q.shape[2], device=DEVICE)
        past = rows[None, None, :] >= seq_lens[..., None]
        assert (got.masked_select(past[..., None]) == 0).all(), "rows past seq_lens must be zero"
    return got


CASES = [
    # batch, heads, kv_heads, length, dim, dim_v, block, dtype, tiles
    (1, 2, 2, 128, 32, 32, 32, torch.float32, (32, 32, 4, 1)),  # MHA, whole blocks
    (2, 4, 2, 157, 32, 32, 32, torch.bfloat16, None),  # GQA, partial last block
    (2, 3, 1, 97, 64, 64, 16, torch.float16, (16, 16, 4, 1)),  # MQA, tiny blocks
    (1, 4, 2, 203, 48, 32, 64, torch.float32, (32, 16, 4, 1)),  # D not a power of 2, Dv != D, tiles < block
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}D{c[4]}bs{c[6]}-{c[7]}".replace("torch.", ""))
def test_kernel_matches_reference(case):
    batch, heads, kv_heads, length, dim, dim_v, block, dtype, tiles = case
    q, k, v = make_qkv(batch, heads, kv_heads, length, dim, dim_v, dtype)
    idx, cnt = random_pattern(batch, heads, length, block, 0.4)
    out = torch.empty(batch, heads, length, dim_v, dtype=dtype, device=DEVICE)
    check(q, k, v, idx, cnt, block, out=out, tiles=tiles)


@needs_kernel
def test_kernel_per_head_lengths_and_missing_diagonal():
    # Compressed sequences: per-head valid rows, padding at the end holding junk;
    # some query blocks without their diagonal block, some heads shorter than a block.
    q, k, v = make_qkv(2, 4, 4, 150, 32, 32, torch.float32)
    k[..., 120:, :] = 1e4  # junk past every head's length must never be read
    lens = torch.tensor([[120, 90, 33, 7], [1, 64, 100, 119]], device=DEVICE)
    idx, cnt = random_pattern(2, 4, 150, 32, 0.5, keep_diag=False)
    mask = block_mask_from_lists(idx, cnt, 5)
    mask[..., 0] = True  # every row sees at least block 0
    nq = (lens + 31) // 32
    mask &= torch.arange(5, device=DEVICE)[:, None] < nq[..., None, None]
    idx, cnt = lists_from_block_mask(mask)
    check(q, k, v, idx, cnt, 32, seq_lens=lens, tiles=(16, 32, 4, 1))


@needs_kernel
def test_kernel_writes_transformers_layout():
    # out may be a (B, L, H, Dv) tensor seen through .transpose(1, 2).
    q, k, v = make_qkv(2, 4, 2, 100, 32, 32, torch.float32)
    idx, cnt = random_pattern(2, 4, 100, 32, 0.5)
    blhd = torch.empty(2, 100, 4, 32, device=DEVICE)
    got = check(q, k, v, idx, cnt, 32, out=blhd.transpose(1, 2))
    assert torch.equal(blhd, got.transpose(1, 2))


@needs_kernel
def test_kernel_reads_strided_inputs():
    # transformers hands over q/k/v as (B, L, H, D) projections seen through .transpose(1, 2).
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(2, 4, 2, 90, 32, 32, torch.float16))
    assert not q.is_contiguous()
    idx, cnt = random_pattern(2, 4, 90, 16, 0.5)
    check(q, k, v, idx, cnt, 16, tiles=(16, 16, 4, 1))


@needs_kernel
def test_full_pattern_is_causal_sdpa():
    q, k, v = make_qkv(1, 4, 2, 181, 32, 32, torch.float32)
    nb = num_blocks(181, 32)
    idx, cnt = lists_from_block_mask(torch.ones(1, 4, nb, nb, dtype=torch.bool, device=DEVICE))
    got = block_sparse_attention(q, k, v, idx, cnt, 32)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert rel_err(got, ref) < (1e-3 if DEVICE == "cuda" else 1e-5)


def test_reference_full_pattern_is_causal_sdpa():
    q, k, v = make_qkv(2, 6, 2, 77, 16, 16, torch.float64)
    nb = num_blocks(77, 16)
    idx, cnt = lists_from_block_mask(torch.ones(2, 6, nb, nb, dtype=torch.bool, device=DEVICE))
    got = block_sparse_attention_ref(q, k, v, idx, cnt, 16, chunk=20)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(got, ref) < 1e-12


def test_reference_skips_unlisted_blocks():
    # Only the diagonal: each query block attends within itself only.
    q, k, v = make_qkv(1, 2, 2, 64, 16, 16, torch.float64)
    idx, cnt = lists_from_block_mask(torch.eye(4, dtype=torch.bool, device=DEVICE).expand(1, 2, 4, 4))
    got = block_sparse_attention_ref(q, k, v, idx, cnt, 16)
    for qb in range(4):
        s = slice(16 * qb, 16 * qb + 16)
        ref = F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True)
        torch.testing.assert_close(got[:, :, s], ref)


def test_pattern_formats_round_trip():
    mask = torch.rand(2, 3, 6, 6) < 0.5
    idx, cnt = lists_from_block_mask(mask)
    tril = mask & torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(block_mask_from_lists(idx, cnt, 6), tril)
    assert idx.dtype == cnt.dtype == torch.int32
    valid = torch.arange(idx.shape[-1]) < cnt[..., None]
    assert (idx[..., 1:] > idx[..., :-1])[valid[..., 1:]].all(), "listed blocks must be strictly ascending"
    share = visited_share(cnt, torch.full((2, 3), 96), 16)
    torch.testing.assert_close(share, tril.sum((-1, -2)).float() / 21)


def test_dispatch(monkeypatch):
    cpu = torch.empty(0)
    assert ops_for(cpu, "torch").block_sparse_attention is block_sparse_attention_ref
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops_for(cpu, "auto") is TORCH_OPS
    with pytest.raises(ValueError, match="backend='triton'"):
        ops_for(cpu, "triton")
    with pytest.raises(ValueError, match="backend"):
        ops_for(cpu, "fast")
    # The CPU fallback is the reference.
    q, k, v = make_qkv(1, 2, 1, 40, 16, 16, torch.float32)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    idx, cnt = lists_from_block_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool))
    got = ops_for(q, "auto").block_sparse_attention(q, k, v, idx, cnt, 16)
    torch.testing.assert_close(got, block_sparse_attention_ref(q, k, v, idx, cnt, 16))


def test_launcher_validates():
    q, k, v = make_qkv(1, 2, 1, 40, 16, 16, torch.float32)
    idx, cnt = lists_from_block_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, idx, cnt, 24)
    with pytest.raises(ValueError, match="NQB"):
        block_sparse_attention(q, k, v, idx[:, :, :2], cnt[:, :, :2], 16)
    if KERNEL:
        idx, cnt = lists_from_block_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="BLOCK_M"):
            block_sparse_attention(q, k, v, idx, cnt, 32, tiles=(24, 16, 4, 1))
