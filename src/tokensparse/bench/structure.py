"""Attention-mass structure: measured on a real model, reproduced in synthetic inputs.

Random q/k give nearly uniform attention, where no sparse method can skip
anything; benchmarks need inputs whose attention looks like a real model's.
This module

* measures the structure of a model's attention (:func:`capture_qk` records the
  post-RoPE q/k of chosen layers through an ``AttentionInterface`` function;
  :func:`attention_stats` summarises one layer: mass on the first tokens, on the
  local band, on the top 1% of keys, the share Token Sparse keeps at a coverage,
  the share of blocks FlexPrefill visits at a gamma), and
* generates Llama-shaped q/k/v with that kind of structure
  (:func:`synthetic_qkv`): RoPE applied to content vectors plus, per KV head, a
  low-frequency direction shared by queries and a few keys (attention sinks and
  heavy tokens, visible at any distance: vertical lines) and a high-frequency
  direction shared by all queries and keys (a local band with periodic
  diagonals: slash lines). Strengths vary per head.

Statistics are computed with the library's own estimators, so synthetic and
measured numbers are comparable. Everything returns plain dicts (JSON-ready).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import TokenSparseConfig
from ..methods.flexprefill import estimate_pattern
from ..kernels.reference import window_mass_ref
from ..selection import select_tokens


@dataclass(frozen=True)
class StructureParams:
    """Strengths of the synthetic structure, in logit units (after the 1/sqrt(D) scale).

    Attributes:
        rope_theta: RoPE base (Llama-3.1: 500000).
        content: std of the content part of the logits (query-key specific).
        sinks: number of attention-sink tokens at the start.
        sink_logit: extra logit of the sinks.
        heavy_share: share of prefix tokens that are heavy hitters.
        heavy_logit: extra logit of heavy tokens (scaled per head).
        key_bias: std of a per-key bias shared by all queries: a smooth random field
            (correlated over ``bias_width`` tokens, partly shared by the KV heads),
            so whole stretches of the text are weak, as in real prompts.
        bias_width: correlation length of the key bias, in tokens.
        bias_shared: share of the key bias's variance common to all KV heads.
        local_logit: extra logit at distance 0 of the high-frequency (local) part.
        head_spread: per-head strengths are multiplied by exp(U(-s, s)).
    """

    rope_theta: float = 500000.0
    content: float = 1.0
    sinks: int = 4
    sink_logit: float = 11.0
    heavy_share: float = 0.01
    heavy_logit: float = 6.0
    key_bias: float = 3.0
    bias_width: int = 128
    bias_shared: float = 0.7
    local_logit: float = 10.0
    head_spread: float = 0.4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, half-split convention (as Llama in transformers). x (..., L, D)."""
    dim = x.shape[-1]
    inv = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)  # (D/2,)
    angle = positions.float()[:, None] * inv[None, :]  # (L, D/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def synthetic_qkv(
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    length: int,
    head_dim: int,
    *,
    params: StructureParams | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured q (B, H, L, D), k and v (B, Hkv, L, D), post-RoPE, non-zero.

    Logits ``q.k / sqrt(D)`` are the sum of a content part (std ``content``), a
    per-key bias, sink and heavy-token boosts along a low-frequency direction
    (the same at any distance) and a local part along a high-frequency direction
    (largest at distance 0, decaying and ringing with distance).
    """
    p = StructureParams() if params is None else params
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)  # small draws (directions, strengths)
    big = torch.Generator(device=device).manual_seed(seed)  # per-token draws, on the device
    group = num_heads // num_kv_heads
    half = head_dim // 2
    root4 = head_dim**0.25
    pos = torch.arange(length, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=big, device=device)

    # Directions: "low" lives on the slowest rotating pairs (long range), "high" on the fastest.
    def direction(lo: int, hi: int) -> torch.Tensor:
        d = torch.zeros(num_kv_heads, head_dim)
        r = torch.randn(num_kv_heads, 2, hi - lo, generator=g)
        d[:, lo:hi], d[:, half + lo : half + hi] = r[:, 0], r[:, 1]
        return (d / d.norm(dim=-1, keepdim=True)).to(device)

    low = direction(half - half // 4, half)  # (Hkv, D), unit
    high = direction(0, half)  # all pairs: a kernel decaying ~log(distance)
    spread = lambda *s: torch.exp((torch.rand(*s, generator=g) * 2 - 1) * p.head_spread).to(device)  # noqa: E731
    head_heavy = spread(num_heads)  # per query head
    head_local = spread(num_heads)
    kv_heavy = spread(num_kv_heads)

    content = math.sqrt(p.content)
    q = rand(batch, num_heads, length, head_dim) * content
    k = rand(batch, num_kv_heads, length, head_dim) * content
    # Key gains along "low": per-key bias, sinks and heavy tokens (positions per sequence and KV head).
    gain = _smooth_field(batch, num_kv_heads, length, p.bias_width, p.bias_shared, big, device) * p.key_bias
    gain[..., : min(p.sinks, length)] += p.sink_logit
    n_heavy = int(p.heavy_share * length)
    if n_heavy:
        heavy = torch.rand(batch, num_kv_heads, length, generator=big, device=device).argsort(dim=-1)[..., :n_heavy]
        gain.scatter_add_(-1, heavy, (p.heavy_logit * kv_heavy)[None, :, None].expand(batch, -1, n_heavy).contiguous())
    k = k + (gain[..., None] * root4) * low[None, :, None, :]
    # Queries: unit gain along "low" (so logit += gain * u.R(d)u, ~gain at any distance for slow pairs),
    # the local part along "high" split between queries and keys.
    low_q = low.repeat_interleave(group, dim=0)[None, :, None, :]
    high_q = high.repeat_interleave(group, dim=0)[None, :, None, :]
    q = q + root4 * head_heavy[None, :, None, None] * low_q
    local = torch.sqrt(p.local_logit * head_local)[None, :, None, None]
    q = q + root4 * local * high_q
    k = k + root4 * math.sqrt(p.local_logit) * high[None, :, None, :]
    q = rope(q, pos, p.rope_theta)
    k = rope(k, pos, p.rope_theta)
    v = rand(batch, num_kv_heads, length, head_dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _smooth_field(batch, heads, length, width, shared, generator, device) -> torch.Tensor:
    """(B, heads, L) unit-variance noise correlated over ``width`` positions; a ``shared``
    share of its variance is common to all heads."""
    pad = width // 2
    noise = torch.randn(batch, heads + 1, length + 2 * pad, generator=generator, device=device)
    field = torch.nn.functional.avg_pool1d(noise, 2 * pad + 1, stride=1) if width > 1 else noise
    field = field / field.std(dim=-1, keepdim=True).clamp(min=1e-6)
    return math.sqrt(shared) * field[:, :1] + math.sqrt(1.0 - shared) * field[:, 1:]


@torch.no_grad()
def attention_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    window: int = 128,
    coverage: float = 0.005,
    gamma: float = 0.95,
    tau: float = 0.1,
    block_size: int = 128,
) -> dict[str, Any]:
    """Structure of one layer's attention. query (B, H, L, D), key (B, Hkv, L, D).

    Returns a dict of means over batch and heads (and per-head lists):
        sink_mass: window queries' mass on the first 4 tokens;
        local_mass: their mass on the last ``window`` + 1024 tokens;
        top1_mass: their mass on each head's top 1% of keys;
        ts_kept_share: share of tokens Token Sparse keeps at ``coverage`` (no floor);
        fp_block_share: share of causal blocks FlexPrefill visits at ``gamma`` (no min budget);
        fp_query_aware: share of heads FlexPrefill makes query-aware at ``tau``.
    """
    length = query.shape[2]
    window = min(window, length - 1)
    mass = window_mass_ref(query, key, window).float()  # (B, H, L)
    top = max(1, length // 100)
    config = TokenSparseConfig(coverage=coverage, window=window, min_tokens=0)
    selection = select_tokens(query, key, config)
    pattern = estimate_pattern(query, key, gamma=gamma, tau=tau, min_budget=0, block_size=block_size)
    per_head = {
        "sink_mass": mass[..., :4].sum(-1),
        "local_mass": mass[..., max(0, length - window - 1024) :].sum(-1),
        "top1_mass": mass.topk(top, dim=-1).values.sum(-1),
        "ts_kept_share": selection.kept_share,
        "fp_block_share": pattern.visited_share,
        "fp_query_aware": pattern.query_aware.float(),
    }
    out: dict[str, Any] = {"length": length, "heads": query.shape[1]}
    for name, value in per_head.items():
        out[name] = float(value.mean())
        out[name + "_per_head"] = [round(float(x), 4) for x in value.flatten()]
    return out


def capture_qk(model: Any, input_ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` once and return {layer: (query, key)} post-RoPE, on the CPU.

    Uses a temporary ``AttentionInterface`` function that records and then runs
    stock SDPA; the model's attention implementation is restored afterwards.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = set(layers)

    def record(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in wanted and query.shape[2] == key.shape[2]:
            captured[module.layer_idx] = (query.detach().float().cpu(), key.detach().float().cpu())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = "tokensparse_capture"
    AttentionInterface.register(name, record)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation or "sdpa"
    model.set_attn_implementation(name)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(model.device))
    finally:
        model.set_attn_implementation(previous)
    return captured


def compare_with_model(
    model_name: str = "smollm2",
    *,
    length: int = 3072,
    layers: tuple[int, ...] = (3, 8, 14, 20, 26),
    synthetic_shape: tuple[int, int, int] = (8, 2, 128),
    params: StructureParams | None = None,
) -> dict[str, Any]:
    """Statistics of a model's attention on the built-in calibration text next to the
    synthetic inputs' at the same length (Llama-3.1-8B-like head dim and RoPE base).

    This is how :class:`StructureParams`' defaults were chosen (see the module's
    ``__main__``; SmolLM2 loads and runs 3072 tokens in a few minutes on 2 CPU cores).
    """
    from .. import models
    from ..profile import calibration_ids

    loaded = models.load(model_name)
    ids = calibration_ids(loaded.tokenizer, length, None)
    captured = capture_qk(loaded.model, ids, list(layers))
    params = StructureParams() if params is None else params
    heads, kv_heads, dim = synthetic_shape
    q, k, _ = synthetic_qkv(1, heads, kv_heads, length, dim, params=params, dtype=torch.float32)
    return {
        "model": model_name,
        "length": int(ids.shape[1]),
        "model_layers": {str(layer): attention_stats(*captured[layer]) for layer in layers if layer in captured},
        "synthetic": {"params": params.to_dict(), "shape": list(synthetic_shape), **attention_stats(q, k)},
    }


__all__ = ["StructureParams", "synthetic_qkv", "attention_stats", "capture_qk", "compare_with_model", "rope"]


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="attention structure: embedded model vs synthetic inputs")
    parser.add_argument("--out", default="runs/flexprefill/structure.json")
    parser.add_argument("--length", type=int, default=3072)
    args = parser.parse_args()
    result = compare_with_model(length=args.length)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    keys = ["sink_mass", "local_mass", "top1_mass", "ts_kept_share", "fp_block_share", "fp_query_aware"]
    print(f"{'source':<12}" + "".join(f"{k:>16}" for k in keys))
    rows = [(f"layer {n}", s) for n, s in result["model_layers"].items()] + [("synthetic", result["synthetic"])]
    for name, stats in rows:
        print(f"{name:<12}" + "".join(f"{stats[k]:>16.3f}" for k in keys))
