"""Backend choice, and the whole op through the Triton kernels against the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.attention import attend_selected
from tokensparse.kernels import TORCH_OPS, ops_for, triton_available

from kernel_testing import DEVICE, ON_GPU, requires_kernels

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


def test_auto_picks_torch_on_cpu_and_torch_forces_reference():
    x = torch.randn(1)
    assert ops_for(x, "auto") is TORCH_OPS
    assert ops_for(x, "torch") is TORCH_OPS
    with pytest.raises(ValueError, match="backend"):
        ops_for(x, "cuda")


def test_without_triton_auto_falls_back_and_triton_raises(monkeypatch):
    import sys

    from tokensparse import kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    kernels._triton_ops.cache_clear()
    try:
        x = torch.randn(1)
        assert ops_for(x, "auto") is TORCH_OPS
        with pytest.raises(ValueError, match="triton"):
            ops_for(x, "triton")
    finally:
        kernels._triton_ops.cache_clear()


@requires_kernels
def test_triton_backend_has_every_stage():
    ops = ops_for(torch.randn(1, device=DEVICE), "triton")
    assert ops.name == "triton"
    assert ops.top_k is not None and ops.attend_kept is not None


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    # Without the check Triton fails deep in its launcher with "0 active drivers".
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU"):
        ops_for(torch.randn(1), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops_for(torch.randn(1), "triton").name == "triton"
    assert ops_for(torch.randn(1), "auto") is TORCH_OPS  # "auto" never picks the interpreter


@pytest.mark.skipif(not (ON_GPU and triton_available()), reason="needs a GPU and triton")
def test_auto_picks_triton_on_cuda():
    assert ops_for(torch.randn(1, device="cuda"), "auto").name == "triton"


def _structured(b, h, hkv, seq_len, d, dtype, seed):
    """Random q/k/v with a few heavy keys, so the coverage budget drops tokens."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, h, seq_len, d, generator=g, device=DEVICE)
    k = torch.randn(b, hkv, seq_len, d, generator=g, device=DEVICE)
    v = torch.randn(b, hkv, seq_len, d, generator=g, device=DEVICE)
    heavy = torch.randperm(seq_len // 2, generator=torch.Generator().manual_seed(seed))[:8].to(DEVICE)
    direction = torch.randn(d, generator=g, device=DEVICE)
    k[:, :, heavy] += 3 * direction
    q += direction
    return q.to(dtype), k.to(dtype), v.to(dtype)


@requires_kernels
@pytest.mark.parametrize(
    "config",
    [
        TokenSparseConfig(window=16, min_tokens=32, coverage=0.3),
        TokenSparseConfig(window=16, min_tokens=16, budget="keep_ratio", keep_ratio=0.4, kernel_size=3),
    ],
    ids=["coverage", "keep_ratio_padded"],
)
def test_token_sparse_attention_triton_matches_torch(config):
    b, h, hkv, d = 2, 4, 2, 64
    seq_len = 30011 if ON_GPU else 149
    if ON_GPU:
        config = config.replace(window=128, min_tokens=1024)
    dtype = torch.bfloat16
    padded = config.budget == "keep_ratio"  # one case of each, to keep CI short
    q, k, v = _structured(b, h, hkv, seq_len, d, dtype, seed=11 + padded)
    mask = None
    if padded:
        mask = torch.ones(b, seq_len, dtype=torch.bool, device=DEVICE)
        mask[1, : seq_len // 5] = False
    out_t, sel_t = token_sparse_attention(
        q, k, v, key_padding_mask=mask, config=config.replace(backend="triton"), return_stats=True
    )
    out_r, sel_r = token_sparse_attention(
        q, k, v, key_padding_mask=mask, config=config.replace(backend="torch"), return_stats=True
    )
    assert sel_r.kept_idx is not None and sel_t.kept_idx is not None, "the case must drop tokens"
    # Kernel and reference scores differ in the last bits, so a near-tie at the
    # budget's edge may pick another token (top-k alone is tested bit-exact on
    # shared scores): the budgets agree and the kept sets almost entirely.
    assert int((sel_t.num_kept - sel_r.num_kept).abs().max()) <= max(2, seq_len // 100)
    assert _overlap(sel_t.kept_idx, sel_r.kept_idx, seq_len) > 0.95
    # The Triton output is the reference attention over the Triton selection.
    want = attend_selected(q, k, v, sel_t, backend="torch")
    if mask is not None:
        out_t = out_t.masked_fill(~mask[:, None, :, None], 0)
        want = want.masked_fill(~mask[:, None, :, None], 0)
    assert torch.isfinite(out_t).all()
    err = float((out_t.double() - want.double()).norm() / want.double().norm())
    assert err < 1e-2


def _overlap(idx_a, idx_b, seq_len):
    """Share of ``idx_b``'s kept tokens that ``idx_a`` keeps too (padding ignored)."""
    b, h, _ = idx_a.shape

    def as_mask(idx):
        m = torch.zeros(b, h, seq_len + 1, dtype=torch.bool, device=idx.device)
        return m.scatter_(2, idx, True)[..., :seq_len]

    a, ref = as_mask(idx_a), as_mask(idx_b)
    return float((a & ref).sum() / ref.sum())


@pytest.mark.parametrize("seq_len", [100, 228, 1153, 1154, 5000, 131072])
@pytest.mark.parametrize(
    "config",
    [
        TokenSparseConfig(budget="keep_ratio", keep_ratio=0.3),
        TokenSparseConfig(budget="keep_ratio", keep_ratio=0.55, min_tokens=0),  # 100 * 0.55 = 55.000000000000007
        TokenSparseConfig(budget="keep_ratio", keep_ratio=1 / 3, max_tokens=2000),
        TokenSparseConfig(budget="keep_tokens", keep_tokens=1500, min_tokens=0),
        TokenSparseConfig(budget="keep_tokens", keep_tokens=10),
    ],
)
def test_host_budget_equals_device_budget(config, seq_len):
    """Fixed budgets are computed on the host (no device op, no sync); every head's value must equal token_budget's."""
    from tokensparse.selection import fixed_budget, token_budget

    prefix = seq_len - config.window
    scores = torch.rand(2, 3, max(prefix, 0))
    keep = token_budget(scores, torch.full((2,), prefix), config)
    host = fixed_budget(config, seq_len, None)
    assert bool((keep == host).all()), (host, keep)
    assert fixed_budget(config, seq_len, torch.ones(2, seq_len, dtype=torch.bool)) is None
