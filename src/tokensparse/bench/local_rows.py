"""What ``dropped_rows="local"`` costs over zero rows: time and peak memory of one layer.

For every length: dense causal SDPA (cuDNN on CUDA, PyTorch's choice elsewhere),
then for every ``keep_ratio`` Token Sparse Attention end to end with zero rows and
with local rows (the same inputs, so the same selection), the in-place fill of
the dropped rows alone (:func:`tokensparse.kernels.local_rows.fill_dropped_rows`),
and, with ``legacy``, the fill it replaced (the block-sparse kernel with the
sink + local pattern for every row into a second buffer, then a ``torch.where``
with the kept mask). Times are
medians of CUDA-event timings after warm-up (:func:`tokensparse.bench.timing.time_fn`),
on CUDA also with launches queued ahead; peak memory is the allocator's peak
with the inputs counted, so ``memory_over_dense`` compares like with like.
Defaults: Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim
128, bf16). Results are a JSON-ready dict.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..attention import attend_selected, token_sparse_attention
from ..config import TokenSparseConfig
from ..kernels.local_rows import kept_row_mask
from ..local_attention import fill_dropped_rows
from ..kernels import block_sparse, ops_for
from ..local_attention import sink_local_pattern
from ..selection import select_tokens
from .attention import DTYPES, dense_attention, make_inputs
from .timing import machine_info, peak_memory, time_fn

logger = logging.getLogger(__name__)


def run_local_rows_bench(
    lengths: tuple[int, ...] = (16384, 32768, 65536, 131072),
    *,
    keep_ratios: tuple[float, ...] = (0.5, 0.25),
    batch: int = 1,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    local_block: int = 64,
    left_pad: int = 0,
    window: int = 128,
    min_tokens: int = 1024,
    backend: str = "auto",
    legacy: bool = True,
    warmup: int = 2,
    min_reps: int = 5,
    budget_ms: float = 1000.0,
    seed: int = 0,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time and peak memory of zero rows vs local rows; returns ``{"meta", "config", "results"}``.

    Args:
        lengths: sequence lengths L (padding included).
        keep_ratios: fixed kept shares of the prefix (``budget="keep_ratio"``).
        batch, num_heads, num_kv_heads, head_dim, dtype: the attention shapes.
        local_block: ``TokenSparseConfig.local_block``.
        left_pad: padded positions at the start of every sequence (as transformers
            pads), passed as ``key_padding_mask``.
        window, min_tokens, backend: the rest of the :class:`TokenSparseConfig`.
        legacy: also time the fill this replaced (costs a second output buffer;
            only without ``left_pad``, where it needed no shifted copies).
        warmup, min_reps, budget_ms: see :func:`tokensparse.bench.timing.time_fn`.
        seed: input seed.
        device: default CUDA when available.
        progress: called with one line per measurement.

    Returns:
        ``results``: one dict per length with ``dense`` (``ms``, ``memory``) and
        ``sparse``: per keep ratio ``zero`` and ``local`` (end to end: ``ms``,
        ``queued_ms`` on CUDA, ``memory``, ``memory_over_dense``), ``fill_ms``,
        ``local_minus_zero_ms`` (lone and queued) and, with ``legacy``, ``legacy``.
    """
    say = progress or (lambda msg: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = dict(
        lengths=list(lengths), keep_ratios=list(keep_ratios), batch=batch, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, local_block=local_block, left_pad=left_pad,
        window=window, min_tokens=min_tokens, backend=backend, legacy=legacy, warmup=warmup, min_reps=min_reps,
        budget_ms=budget_ms, seed=seed,
    )
    timing = dict(warmup=warmup, min_reps=min_reps, budget_ms=budget_ms)
    results = []
    for length in lengths:
        q, k, v = make_inputs("random", batch, num_heads, num_kv_heads, length, head_dim, DTYPES[dtype], dev, seed)
        padding = None
        if left_pad:
            padding = torch.ones(batch, length, dtype=torch.bool, device=dev)
            padding[:, :left_pad] = False
        row: dict[str, Any] = {"seq_len": length, "dense": _bench_dense(q, k, v, padding, dev, timing), "sparse": []}
        say(f"L={length} dense {row['dense']['backend']} {row['dense']['ms']:.3f} ms")
        for ratio in keep_ratios:
            base = TokenSparseConfig(
                window=window, min_tokens=min_tokens, budget="keep_ratio", keep_ratio=ratio, backend=backend,
                local_block=local_block,
            )
            entry = _bench_keep_ratio(base, q, k, v, padding, dev, timing, legacy, row["dense"])
            row["sparse"].append(entry)
            say(_line(length, entry))
        results.append(row)
        del q, k, v
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"meta": machine_info(dev), "config": config, "results": results}


def _bench_dense(q, k, v, padding, device, timing) -> dict[str, Any]:
    backend = "cudnn" if device.type == "cuda" else "default"
    if padding is None:
        fn, gqa = dense_attention(backend, q, k, v)
    else:
        from ..attention import dense_causal_attention

        fn, gqa, backend = (lambda: dense_causal_attention(q, k, v, key_padding_mask=padding)), "enable_gqa", "masked"
    mem = peak_memory(fn, device)
    t = time_fn(fn, device, **timing)
    return {"backend": backend, "gqa": gqa, "ms": t.median_ms, "time": t.to_dict(), "memory": mem}


def _bench_keep_ratio(base, q, k, v, padding, device, timing, legacy, dense) -> dict[str, Any]:
    entry: dict[str, Any] = {"keep_ratio": base.keep_ratio}
    selection = select_tokens(q, k, base, key_padding_mask=padding)
    if selection.kept_idx is None:
        return {**entry, "dense_fallback": True}
    entry["kept_share"] = float(selection.kept_share.mean())
    for rows in ("zero", "local"):
        config = base.replace(dropped_rows=rows)
        entry[rows] = _end_to_end(lambda: token_sparse_attention(q, k, v, config=config, key_padding_mask=padding),
                                  device, timing, dense)
    entry["local_minus_zero_ms"] = entry["local"]["ms"] - entry["zero"]["ms"]
    if "queued_ms" in entry["zero"]:
        entry["local_minus_zero_queued_ms"] = entry["local"]["queued_ms"] - entry["zero"]["queued_ms"]
    if legacy and padding is None:  # before ``out`` below exists, so that its peak memory is the op's own
        entry["legacy"] = _end_to_end(lambda: _legacy_op(q, k, v, selection, base, padding), device, timing, dense)
    out = attend_selected(q, k, v, selection, backend=base.backend, config=base)

    def fill():
        return fill_dropped_rows(out, q, k, v, selection.kept_idx, base.local_block,
                                 seq_lens=selection.seq_lens, backend=base.backend)

    entry["fill_ms"] = time_fn(fill, device, **timing).median_ms
    if "legacy" in entry:
        entry["legacy"]["fill_ms"] = time_fn(lambda: _legacy_fill(out, q, k, v, selection, base), device,
                                             **timing).median_ms
    return entry


def _end_to_end(fn, device, timing, dense) -> dict[str, Any]:
    result: dict[str, Any] = {"memory": peak_memory(fn, device)}
    t = time_fn(fn, device, **timing)
    result.update(ms=t.median_ms, time=t.to_dict())
    if device.type == "cuda":
        result["queued_ms"] = time_fn(fn, device, queued=True, **timing).median_ms
    if result["memory"] and dense.get("memory"):
        result["memory_over_dense"] = result["memory"]["peak_bytes"] / dense["memory"]["peak_bytes"]
    return result


def _legacy_fill(out, q, k, v, selection, base) -> torch.Tensor:
    """The fill this replaced (without padding): the block-sparse kernel with the sink + local
    pattern for every row into a second buffer, then a select with the kept mask."""
    batch, num_heads, seq_len, _ = q.shape
    block_idx, block_cnt = sink_local_pattern(block_sparse.num_blocks(seq_len, base.local_block), q.device)
    local = ops_for(q, base.backend).block_sparse_attention(
        q, k, v, block_idx.expand(batch, num_heads, -1, -1), block_cnt.expand(batch, num_heads, -1).contiguous(),
        base.local_block,
    )
    kept = kept_row_mask(selection.kept_idx, q.shape[2])[..., : q.shape[2], None]
    return torch.where(kept, out, local)


def _legacy_op(q, k, v, selection, base, padding) -> torch.Tensor:
    zero = token_sparse_attention(q, k, v, config=base, key_padding_mask=padding)
    return _legacy_fill(zero, q, k, v, selection, base)


def _line(length: int, entry: dict[str, Any]) -> str:
    if entry.get("dense_fallback"):
        return f"L={length} keep {entry['keep_ratio']:g}: dense fallback"
    mem = entry["local"].get("memory_over_dense")
    mem_text = "" if mem is None else f", memory {mem:.3f}x dense (zero {entry['zero']['memory_over_dense']:.3f}x)"
    return (f"L={length} keep {entry['keep_ratio']:g}: zero {entry['zero']['ms']:.3f} ms, local {entry['local']['ms']:.3f} ms "
            f"(+{entry['local_minus_zero_ms']:.3f}), fill alone {entry['fill_ms']:.3f} ms{mem_text}")


__all__ = ["run_local_rows_bench"]
