"""Probes of a real model: what Token Sparse Attention keeps, layer by layer.

:func:`kept_shares` was scripts/kept_shares.py (its CPU run on the embedded
SmolLM2 with an 8K needle prompt: results/profile/kept_shares_8k.json).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from ..config import TokenSparseConfig
from ..integrations.transformers import disable, enable, selection_report
from ..report import summarize_selection


def kept_shares(
    model: torch.nn.Module, input_ids: torch.Tensor, configs: Mapping[str, TokenSparseConfig]
) -> dict[str, Any]:
    """Kept share per sparse layer of one prefill, for each setting, against dense.

    One dense forward pass, then one per setting with Token Sparse Attention
    enabled (``enable(model, config, record=True)``, the sparse layers as
    ``enable`` chooses them) and disabled again afterwards. No generation.

    Args:
        model: a transformers causal LM, dense when called.
        input_ids: (1, L) token ids of one prompt.
        configs: setting name -> config.

    Returns:
        ``{"prompt_tokens", "dense_seconds", "settings": {name: {"config",
        "seconds", "next_token_same_as_dense", "max_abs_logit_diff", "layers":
        {layer: {"kept_mean", "kept_min", "kept_max", "dropped_max", "dense"}},
        "kept_mean_all_layers"}}}`` (a layer that ran dense keeps every token);
        seconds are wall-clock forward passes.
    """
    dense_logits, dense_s = _last_logits(model, input_ids)
    settings = {}
    for name, config in configs.items():
        enable(model, config, record=True)
        try:
            logits, seconds = _last_logits(model, input_ids)
            recorded = selection_report(model, clear=True)
            prefill = recorded[-1] if recorded else {}
        finally:
            disable(model)
        settings[name] = {
            "config": config.to_dict(),
            "seconds": round(seconds, 3),
            "next_token_same_as_dense": int(logits.argmax()) == int(dense_logits.argmax()),
            "max_abs_logit_diff": float((logits - dense_logits).abs().max()),
            **_layer_shares(prefill),
        }
    return {"prompt_tokens": int(input_ids.shape[-1]), "dense_seconds": round(dense_s, 3), "settings": settings}


@torch.no_grad()
def _last_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """float32 logits of the last position, and the forward pass's wall-clock seconds."""
    start = time.perf_counter()
    logits = model(input_ids=input_ids, use_cache=False).logits[0, -1].float()
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return logits, time.perf_counter() - start


def _layer_shares(prefill) -> dict[str, Any]:
    rows = summarize_selection(prefill)
    layers = {
        str(r.layer): {
            "kept_mean": r.kept_mean, "kept_min": r.kept_min, "kept_max": r.kept_max,
            "dropped_max": r.dropped_max, "dense": r.dense,
        }
        for r in rows
    }
    return {"layers": layers, "kept_mean_all_layers": sum(r.kept_mean for r in rows) / max(len(rows), 1)}
