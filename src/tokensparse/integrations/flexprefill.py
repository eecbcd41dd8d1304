"""FlexPrefill alone inside Hugging Face transformers models (the ``flexprefill`` method).

Like :mod:`tokensparse.integrations.transformers`, it plugs in through
``AttentionInterface`` and ``AttentionMaskInterface``; no model class is patched.
Prefill calls of the chosen layers (default: all) run
:func:`tokensparse.flexprefill.flexprefill_attention`; decode steps, queries after
a cached prefix, prompts short enough to be dense anyway and options FlexPrefill
does not cover go to transformers' stock SDPA (a one-time warning for options).

:func:`flexprefill_prefill` is also what Token Sparse layers configured with
``attention="flexprefill"`` run when a call does not drop tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from ..flexprefill import FlexPrefillConfig, flexprefill_attention
from .transformers import _attach, _attention_layers_checked, _detach, _prefill_guard, _stock, _warn_once

ATTN_NAME = "flexprefill"
_STATE_ATTR = "_tokensparse_flexprefill"
_MODEL_ATTR = "_tokensparse_flexprefill_model"


def enable_flexprefill(
    model: torch.nn.Module,
    config: FlexPrefillConfig | None = None,
    *,
    layers: tuple[int, ...] | list[int] | None = None,
) -> torch.nn.Module:
    """Switch ``model``'s prefill attention to FlexPrefill.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface``.
        config: FlexPrefill settings (default: gamma 0.95, tau 0.1, min budget
            1024, block 128).
        layers: decoder layer indices that use FlexPrefill (default: all).

    Returns:
        The same model, for chaining.
    """
    config = FlexPrefillConfig() if config is None else config
    if not isinstance(config, FlexPrefillConfig):
        raise ValueError(f"config must be a FlexPrefillConfig, got {type(config).__name__}")
    modules = _attention_layers_checked(model)
    chosen = None if layers is None else {int(i) for i in layers}
    previous = getattr(model, _MODEL_ATTR, None)
    previous_attn = previous if previous is not None else (model.config._attn_implementation or "sdpa")
    _attach(
        model, modules, name=ATTN_NAME, forward=flexprefill_attention_forward,
        layer_attr=_STATE_ATTR, layer_state=lambda m: (config, chosen is None or m.layer_idx in chosen),
        model_attr=_MODEL_ATTR, model_state=previous_attn,
    )
    return model


def disable_flexprefill(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_flexprefill`: restore the previous attention implementation."""
    previous_attn = getattr(model, _MODEL_ATTR, None)
    if previous_attn is None:
        return model
    return _detach(model, layer_attr=_STATE_ATTR, model_attr=_MODEL_ATTR, previous_attn=previous_attn)


def flexprefill_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered with ``AttentionInterface`` as ``"flexprefill"``.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D); returns ((B, Lq, H, Dv), None).
    """
    state = getattr(module, _STATE_ATTR, None)
    if state is None or not state[1]:
        return _stock(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    return flexprefill_prefill(
        module, query, key, value, attention_mask, state[0], dropout=dropout, scaling=scaling, **kwargs
    )


def flexprefill_prefill(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: FlexPrefillConfig,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One attention call with FlexPrefill where it applies, stock SDPA elsewhere.

    Same arguments and result as a transformers attention function, plus ``config``.
    """
    seq_len = key.shape[2]
    if query.shape[2] == 1 or config.runs_dense(seq_len):
        return _stock(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    key_padding_mask, reason = _prefill_guard(module, query, key, attention_mask, dropout, kwargs)
    if reason is not None:
        _warn_once(reason + ": running dense SDPA instead of FlexPrefill")
        return _stock(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    out = flexprefill_attention(
        query, key, value, scale=scaling, key_padding_mask=key_padding_mask, layout="blhd", **config.kwargs()
    )
    return out, None


def flexprefill_settings(raw: dict[str, str]) -> tuple[FlexPrefillConfig, dict[str, str]]:
    """Parse an eval method spec's ``key=value`` strings (gamma, tau, min_budget,
    block_size, backend) into a config and its canonical settings (non-defaults)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(FlexPrefillConfig)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            raise ValueError(f"flexprefill: unknown setting {key!r}; known settings: {', '.join(fields)}")
        kind = type(getattr(FlexPrefillConfig(), key))
        try:
            values[key] = kind(text) if kind is not float else float(text)
        except ValueError:
            raise ValueError(f"flexprefill: setting {key!r} has a bad value {text!r}") from None
    config = FlexPrefillConfig(**values)
    default = FlexPrefillConfig()
    canonical = {
        name: (f"{v:g}" if isinstance(v, float) else str(v))
        for name in fields
        if (v := getattr(config, name)) != getattr(default, name)
    }
    return config, canonical


__all__ = [
    "ATTN_NAME",
    "enable_flexprefill",
    "disable_flexprefill",
    "flexprefill_attention_forward",
    "flexprefill_prefill",
    "flexprefill_settings",
]
