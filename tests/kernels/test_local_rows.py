"""Sink + local attention written in place into the dropped rows (kernels/local_rows.py).

Both paths (Triton under TRITON_INTERPRET=1 or on a GPU, and PyTorch) against the
float64 definition: rows a head kept stay bit for bit what they were, every other
real row gets causal attention over the sink block and its own and previous block,
padded rows get zeros.
"""

import pytest
import torch
from kernel_testing import CAN_RUN, DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

from tokensparse.kernels.block_sparse import block_mask_from_lists, num_blocks
from tokensparse.kernels.local_rows import fill_dropped_rows_torch, fill_dropped_rows_triton, kept_row_mask
from tokensparse.local_attention import fill_dropped_rows
from tokensparse.local_attention import sink_local_pattern

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not CAN_RUN, reason="needs a GPU or TRITON_INTERPRET=1"))]


def local_definition(q, k, v, block, lens):
    """(B, H, L, Dv) float64: sink + own + previous block, causal, over each sequence's real tokens."""
    batch, heads, seq_len, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, seq_len, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(batch):
        n = int(lens[b])
        pad = seq_len - n
        t = torch.arange(n, device=q.device)
        kb, qb = t[None, :] // block, t[:, None] // block
        allowed = (t[None, :] <= t[:, None]) & ((kb == 0) | (kb == qb) | (kb == qb - 1))
        keys = k[b, :, pad:].double().repeat_interleave(group, 0)
        vals = v[b, :, pad:].double().repeat_interleave(group, 0)
        logits = (q[b, :, pad:].double() @ keys.transpose(1, 2)) * dim**-0.5
        out[b, :, pad:] = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vals
    return out


def random_kept_idx(batch, heads, seq_len, lens, share, generator):
    """(B, H, K) ascending kept positions among the real ones, padded with L; head 0 keeps nothing."""
    rows = []
    for b in range(batch):
        pad = seq_len - int(lens[b])
        for h in range(heads):
            pick = torch.rand(seq_len, generator=generator) < (0.0 if h == 0 else share)
            pick[:pad] = False
            rows.append(torch.nonzero(pick).flatten())
    width = max(1, max(len(r) for r in rows))
    idx = torch.full((batch * heads, width), seq_len, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
    return idx.view(batch, heads, width).to(DEVICE)


def make_case(batch, heads, kv_heads, seq_len, dim, dtype, lens, layout, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=g).to(DEVICE, dtype)
    lens = torch.tensor(lens if lens is not None else [seq_len] * batch, device=DEVICE)
    kept_idx = random_kept_idx(batch, heads, seq_len, lens, 0.5, g)
    kept = kept_row_mask(kept_idx, seq_len)[..., :seq_len]
    # Kept rows hold "token sparse output" (random values), the rest poison.
    sparse = torch.randn(batch, heads, seq_len, dim, generator=g).to(DEVICE, dtype)
    poisoned = torch.where(kept[..., None], sparse, torch.full_like(sparse, float("nan")))
    if layout == "blhd":
        store = poisoned.transpose(1, 2).contiguous()
        out = store.transpose(1, 2)
    else:
        store = poisoned.clone()
        out = store
    return q, k, v, lens, kept_idx, kept, out, store


CASES = [
    # batch, heads, kv_heads, seq_len, dim, block, lens
    (1, 2, 2, 77, 16, 16, None),  # MHA, partial last block
    (2, 4, 1, 100, 32, 32, [100, 61]),  # GQA 4, left padding not a multiple of the block
    (2, 6, 2, 45, 16, 16, [45, 3]),  # GQA 3, fewer than 3 blocks, a sequence shorter than a block
    (1, 4, 2, 160, 16, 16, [150]),  # many blocks, padding of 10
    (1, 8, 1, 100, 16, 48, [90]),  # GQA 8, a block that is not a power of two
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}bs{c[5]}")
def test_fill_matches_definition_and_keeps_kept_rows(case, dtype, layout, backend):
    batch, heads, kv_heads, seq_len, dim, block, lens = case
    q, k, v, lens_t, kept_idx, kept, out, store = make_case(
        batch, heads, kv_heads, seq_len, dim, dtype, lens, layout, seed=seq_len + heads
    )
    before = out.clone()
    got = fill_dropped_rows(out, q, k, v, kept_idx, block, seq_lens=None if lens is None else lens_t, backend=backend)
    assert got is out
    assert not got.isnan().any(), "a row to write was left unwritten"
    # Kept rows untouched bit for bit, through the caller's storage.
    assert torch.equal(got[kept].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       before[kept].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    ref = local_definition(q, k, v, block, lens_t)
    tol = 2e-2 if dtype == torch.bfloat16 else (1e-4 if backend == "triton" else 1e-5)
    torch.testing.assert_close(got[~kept].double(), ref[~kept], atol=tol, rtol=tol)
    if layout == "blhd":
        assert store.data_ptr() == got.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_all_rows_matches_block_sparse_pattern(backend):
    # kept_idx=None writes every row: the fixed pattern as block lists, expanded densely.
    from tokensparse.kernels.block_sparse import block_sparse_attention_ref

    q, k, v, *_ = make_case(1, 4, 2, 90, 32, torch.float32, None, "bhld", seed=7)
    idx, cnt = sink_local_pattern(num_blocks(90, 32), q.device)
    nb = num_blocks(90, 32)
    assert block_mask_from_lists(idx, cnt, nb)[0, 0, 2].tolist() == [True, True, True]
    out = torch.full((1, 4, 90, 32), float("nan"), device=DEVICE)
    got = fill_dropped_rows(out, q, k, v, None, 32, backend=backend)
    ref = block_sparse_attention_ref(
        q.double(), k.double(), v.double(), idx.expand(1, 4, -1, -1), cnt.expand(1, 4, -1), 32
    )
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_torch_path_chunks_give_the_same_rows():
    q, k, v, lens, kept_idx, _, out, _ = make_case(2, 4, 2, 150, 16, torch.float32, [150, 97], "bhld", seed=3)
    whole = fill_dropped_rows_torch(out.clone(), q, k, v, kept_idx, 16, seq_lens=lens)
    chunked = fill_dropped_rows_torch(out.clone(), q, k, v, kept_idx, 16, seq_lens=lens, chunk_rows=32)
    torch.testing.assert_close(chunked, whole, equal_nan=True, atol=1e-6, rtol=1e-6)


def test_every_row_kept_writes_nothing():
    q, k, v, *_ = make_case(1, 2, 1, 40, 16, torch.float32, None, "bhld", seed=4)
    kept_idx = torch.arange(40, device=DEVICE).expand(1, 2, 40)
    out = torch.randn(1, 2, 40, 16, device=DEVICE)
    before = out.clone()
    assert torch.equal(fill_dropped_rows_torch(out, q, k, v, kept_idx, 16), before)
    if CAN_RUN:
        assert torch.equal(fill_dropped_rows(out, q, k, v, kept_idx, 16, backend="triton"), before)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns on storage it did not receive."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(result):
            if t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return result


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_output_sized_buffer(backend):
    # B 2, L 160, 4 heads of 32 bf16 values: the output is 80 KiB; the torch path's
    # chunks of 32 rows (24 KiB of logits) and the kernel's kept-row mask stay below half of it.
    q, k, v, lens, kept_idx, _, out, _ = make_case(2, 4, 2, 160, 32, torch.bfloat16, [160, 131], "blhd", seed=9)
    out_bytes = out.numel() * out.element_size()
    with _LargestAllocation() as seen:
        if backend == "torch":
            fill_dropped_rows_torch(out, q, k, v, kept_idx, 16, seq_lens=lens, chunk_rows=32)
        else:
            fill_dropped_rows(out, q, k, v, kept_idx, 16, seq_lens=lens, backend="triton")
    assert 0 < seen.largest < out_bytes / 2, f"allocated {seen.largest} bytes, output is {out_bytes}"


def test_validates_arguments():
    q = torch.randn(1, 2, 32, 16)
    out = torch.empty(1, 2, 32, 16)
    with pytest.raises(ValueError, match="block_size"):
        fill_dropped_rows(out, q, q, q, None, 24)
    with pytest.raises(ValueError, match="out must be"):
        fill_dropped_rows(out[:, :1], q, q, q, None, 16)
    with pytest.raises(ValueError, match="kept_idx must be"):
        fill_dropped_rows(out, q, q, q, torch.zeros(1, 3, 4, dtype=torch.long), 16)
    if CAN_RUN:
        with pytest.raises(ValueError, match="BLOCK_M"):
            fill_dropped_rows_triton(out, q, q, q, None, 16, tiles=(24, 16, 4, 1))
