#!/usr/bin/env python3
"""GPU check of sink + local attention for dropped rows (tokensparse.local_attention):
the Triton path against the banded PyTorch path at large shapes, left padding included,
and the whole op with ``dropped_rows="local"`` against the zero-row op on kept rows.

    PYTHONPATH=src python3 scripts/gpu_local_check.py
"""

import torch

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.local_attention import sink_local_attention, sink_local_attention_torch


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch, heads, kv, length, dim, block, lens in [
        (1, 32, 8, 32768, 128, 64, None),
        (3, 9, 3, 4000, 64, 64, [4000, 2500, 3333]),
    ]:
        q = torch.randn(batch, heads, length, dim, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv, length, dim, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, kv, length, dim, generator=g, device="cuda", dtype=torch.bfloat16)
        seq_lens = None if lens is None else torch.tensor(lens, device="cuda")
        got = sink_local_attention(q, k, v, block, seq_lens=seq_lens)
        ref = sink_local_attention_torch(q, k, v, block, seq_lens=seq_lens)
        err = rel(got, ref)
        ok &= err < 1e-2 and not got.isnan().any()
        print(f"sink_local B={batch} H={heads}/{kv} L={length} D={dim}: rel err {err:.2e}")
    q = torch.randn(1, 32, 16384, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 16384, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, 16384, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    config = TokenSparseConfig(budget="keep_ratio", keep_ratio=0.5)
    zero, sel = token_sparse_attention(q, k, v, config=config, return_stats=True)
    local = token_sparse_attention(q, k, v, config=config.replace(dropped_rows="local"))
    kept = torch.zeros(1, 32, 16385, dtype=torch.bool, device="cuda").scatter_(2, sel.kept_idx, True)[..., :16384]
    same_kept = bool(torch.equal(zero[kept], local[kept]))
    filled = bool((local[~kept].abs().sum(-1) > 0).all())
    ok &= same_kept and filled
    print(f"token sparse keep 0.5, L=16384: kept rows equal {same_kept}, dropped rows filled {filled}")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
