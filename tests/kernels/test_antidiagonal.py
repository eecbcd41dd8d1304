"""XAttention's antidiagonal block scores: the Triton kernel against the PyTorch
reference and both against a float64 definition written from the docstring.

Runs the kernel on CUDA, or on the CPU with TRITON_INTERPRET=1 (CI); without
either, only the reference and the dispatch are tested.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tokensparse.kernels import TORCH_OPS, ops_for
from tokensparse.kernels.antidiagonal import antidiagonal_scores, antidiagonal_scores_ref, kernel_supports

from kernel_testing import DEVICE, requires_kernels

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


def definition(q, k, n, *, stride, block, scale=None):
    """Normalised scores of ONE head whose first n positions are real: q, k (L, D) ->
    (NB, NB) float64, NB = ceil(L / block) (rows and columns past n's blocks zero)."""
    seq_len, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    nb = -(-seq_len // block)
    scores = torch.zeros(nb, nb, dtype=torch.float64)
    if n == 0:
        return scores
    m = -(-n // stride)  # reshaped rows holding a real token
    qp = F.pad(q[:n].double().cpu(), (0, 0, 0, m * stride - n))
    kp = F.pad(k[:n].double().cpu(), (0, 0, 0, m * stride - n))
    logits = sum(qp[stride - 1 - i :: stride] @ kp[i::stride].T for i in range(stride)) * scale / stride
    probs = torch.softmax(logits.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), -math.inf), dim=-1)
    tile = block // stride
    for r in range(m):
        for c in range(r + 1):
            scores[r // tile, c // tile] += probs[r, c]
    return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-300)


def make_inputs(batch, heads, kv_heads, length, dim, dtype, lens=None):
    """Random q/k (peaked: a few heavy keys) and (B, H) lengths, junk past each length."""
    q = torch.randn(batch, heads, length, dim, device=DEVICE) * 2.0 / dim**0.25
    k = torch.randn(batch, kv_heads, length, dim, device=DEVICE) / dim**0.25
    heavy = torch.randperm(length)[: max(1, length // 30)]
    k[:, :, heavy] += q.mean(dim=(1, 2))[:, None, None, :]
    seq_lens = None
    if lens is not None:
        seq_lens = torch.tensor(lens, device=DEVICE)
        pos = torch.arange(length, device=DEVICE)
        junk = 1e3 * torch.randn(batch, heads, length, dim, device=DEVICE)
        q = torch.where((pos >= seq_lens[..., None])[..., None], junk, q)
        kv_lens = seq_lens[:, :: heads // kv_heads]
        k = torch.where((pos >= kv_lens[..., None])[..., None], junk[:, :kv_heads], k)
    return q.to(dtype), k.to(dtype), seq_lens


def rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def check_against_definition(scores, q, k, seq_lens, *, stride, block, tol):
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    for b in range(batch):
        for h in range(heads):
            n = length if seq_lens is None else int(seq_lens[b, h])
            ref = definition(q[b, h], k[b, h // group], n, stride=stride, block=block)
            err = (scores[b, h].double().cpu() - ref).abs().max().item()
            assert err <= tol, f"head {b},{h}: max error {err:.2e} > {tol:.2e}"
            nq = -(-n // block)
            assert (scores[b, h, nq:] == 0).all(), "rows past the head's length must be zero"


CASES = [
    # batch, heads, kv_heads, length, dim, stride, block, dtype, tiles, lens
    (1, 2, 2, 128, 32, 2, 32, torch.float32, (16, 16, 4, 1), None),  # MHA, whole blocks, T = 16
    (2, 4, 2, 157, 16, 4, 64, torch.float32, None, None),  # GQA, L not a multiple of S or B
    (2, 3, 1, 203, 24, 2, 32, torch.bfloat16, (32, 16, 4, 1), None),  # MQA, D not a power of 2
    (1, 2, 1, 150, 16, 4, 16, torch.float32, (32, 32, 4, 1), None),  # T = 4: 8 query blocks a program
    (2, 4, 4, 130, 16, 3, 48, torch.float32, (16, 16, 4, 1), [[130, 71, 16, 1], [0, 129, 64, 33]]),  # lens
    (2, 4, 2, 250, 32, 4, 64, torch.bfloat16, (64, 32, 4, 1), [[250, 250, 97, 97], [13, 13, 200, 200]]),
    (1, 2, 2, 77, 16, 16, 16, torch.float16, None, [[77, 40]]),  # T = 1, fp16
]


@requires_kernels
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "B{}H{}/{}L{}D{}S{}B{}-{}".format(*c[:7], str(c[7])[6:])
)
def test_kernel_matches_reference_and_definition(case):
    batch, heads, kv_heads, length, dim, stride, block, dtype, tiles, lens = case
    assert kernel_supports(stride, block)
    q, k, seq_lens = make_inputs(batch, heads, kv_heads, length, dim, dtype, lens)
    nb = -(-length // block)
    out = torch.empty(batch, heads, nb, nb, dtype=torch.float32, device=DEVICE)  # NaN: poisoned
    got = antidiagonal_scores(q, k, stride=stride, block_size=block, seq_lens=seq_lens, out=out, tiles=tiles)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    assert not got.isnan().any(), "unwritten or NaN output"
    exact = antidiagonal_scores_ref(q.double(), k.double(), stride=stride, block_size=block, seq_lens=seq_lens)
    low = antidiagonal_scores_ref(q, k, stride=stride, block_size=block, seq_lens=seq_lens)
    # The kernel keeps float32 logits; the reference rounds half-precision logits to
    # the input dtype, so its own error bounds the kernel's.
    tol = 2 * rel_err(low, exact) + 1e-5
    assert rel_err(got, exact) <= tol
    tol_def = 1e-5 if dtype == torch.float32 else 5e-3
    check_against_definition(got, q, k, seq_lens, stride=stride, block=block, tol=tol_def)
    check_against_definition(exact, q, k, seq_lens, stride=stride, block=block, tol=1e-12)
    if dtype == torch.float32:
        torch.testing.assert_close(got, low, rtol=1e-4, atol=1e-6)
    assert torch.triu(got, diagonal=1).abs().max() == 0, "scores above the diagonal must be zero"


@requires_kernels
def test_kernel_default_tiles_and_no_out():
    q, k, _ = make_inputs(2, 4, 2, 300, 16, torch.float32)
    got = antidiagonal_scores(q, k, stride=4, block_size=128, scale=0.3)
    exact = antidiagonal_scores_ref(q.double(), k.double(), stride=4, block_size=128, scale=0.3)
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-6)


@requires_kernels
def test_grids_the_kernel_does_not_take_run_the_reference():
    # T = 48 / 4 = 12 is not a power of two.
    assert not kernel_supports(4, 48) and kernel_supports(8, 128) and kernel_supports(16, 16)
    q, k, _ = make_inputs(1, 2, 1, 100, 16, torch.float32)
    got = antidiagonal_scores(q, k, stride=4, block_size=48)
    torch.testing.assert_close(got, antidiagonal_scores_ref(q, k, stride=4, block_size=48))


def test_reference_chunking_and_out():
    q, k, seq_lens = make_inputs(2, 4, 2, 150, 16, torch.float32, [[150, 150, 40, 40], [90, 90, 149, 149]])
    whole = antidiagonal_scores_ref(q, k, stride=2, block_size=32, seq_lens=seq_lens)
    out = torch.empty_like(whole)
    chunked = antidiagonal_scores_ref(q, k, stride=2, block_size=32, seq_lens=seq_lens, out=out, chunk_bytes=1)
    assert chunked.data_ptr() == out.data_ptr()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    check_against_definition(whole, q, k, seq_lens, stride=2, block=32, tol=1e-5)


def test_dispatch_and_validation():
    cpu = torch.empty(0)
    assert ops_for(cpu, "torch").antidiagonal_scores is antidiagonal_scores_ref
    assert ops_for(cpu, "auto") is TORCH_OPS
    q, k, _ = make_inputs(1, 3, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of key heads"):
        antidiagonal_scores_ref(q, k, stride=4, block_size=32)
    q, k, _ = make_inputs(1, 2, 1, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="stride"):
        antidiagonal_scores_ref(q, k, stride=3, block_size=32)
    with pytest.raises(ValueError, match="out must be"):
        antidiagonal_scores_ref(q, k, stride=4, block_size=32, out=torch.empty(1, 2, 2, 2))
