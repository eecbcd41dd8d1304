"""Hugging Face transformers plumbing shared by the integration: finding attention
layers, registering an attention function, the model's own attention, and the
checks that decide whether a prefill call can run a sparse method.

A layer we do not run sparse must run exactly what the model would have run:
:func:`own_attention` returns the model's attention implementation as loaded
(eager included, with its sinks, softcapping or sliding window), and the mask
builder registered beside our function is that implementation's, so the masks
it receives are the ones it expects.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

import torch

AttentionFn = Callable[..., tuple[torch.Tensor, Any]]


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules of ``model``: the innermost modules with an int ``layer_idx``.

    Families number their layers on the attention module (Llama, Qwen, GPT-2) or
    also on the decoder layer around it (OPT, GPT-NeoX); the innermost one is the
    attention. Cross-attention modules are left out.
    """
    numbered = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    inner = []
    for module in numbered:
        if getattr(module, "is_cross_attention", False):
            continue
        if any(sub is not module and isinstance(getattr(sub, "layer_idx", None), int) for sub in module.modules()):
            continue
        inner.append(module)
    return inner


def attention_layers_checked(model: torch.nn.Module) -> list[torch.nn.Module]:
    """:func:`attention_layers` of a model that can switch attention implementation, or ValueError."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError("model must be a transformers PreTrainedModel (it has no set_attn_implementation)")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with a layer_idx; is it a transformers decoder model?"
        )
    return layers


def num_hidden_layers(model: torch.nn.Module, layers: list[torch.nn.Module]) -> int:
    config = model.config.get_text_config()
    return getattr(config, "num_hidden_layers", None) or (max(m.layer_idx for m in layers) + 1)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes a KV cache under: transformers renamed
    ``past_key_values`` to ``cache`` in 5.x; the cache is updated in place either way."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def registered_name(base: str, implementation: str) -> str:
    """Our attention name for a model loaded with ``implementation`` (one mask builder per name)."""
    return base if implementation == "sdpa" else f"{base}_{re.sub(r'[^A-Za-z0-9]+', '_', implementation)}"


def attach(
    model: torch.nn.Module,
    layers: list[torch.nn.Module],
    *,
    name: str,
    forward: AttentionFn,
    mask_of: str,
    layer_attr: str,
    layer_state: Callable[[torch.nn.Module], Any],
    model_attr: str,
    model_state: Any,
) -> None:
    """Register ``forward`` as attention ``name`` (with the mask builder of ``mask_of``),
    store the states and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    # Without a registered mask builder, transformers passes attention_mask=None
    # to unknown implementations and left padding would be silently lost; with
    # the own implementation's builder, falling back to it gets the mask it expects.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS.get(mask_of, sdpa_mask))
    for module in layers:
        setattr(module, layer_attr, layer_state(module))
    setattr(model, model_attr, model_state)
    model.set_attn_implementation(name)


def detach(model: torch.nn.Module, *, layer_attr: str, model_attr: str, previous_attn: str) -> torch.nn.Module:
    """Undo :func:`attach`: drop the states and switch ``model`` back to ``previous_attn``."""
    for module in attention_layers(model):
        if hasattr(module, layer_attr):
            delattr(module, layer_attr)
    delattr(model, model_attr)
    model.set_attn_implementation(previous_attn)
    return model


def own_attention(module: torch.nn.Module, implementation: str) -> AttentionFn:
    """The attention function ``module`` runs under ``implementation``, as its model code picks it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if implementation == "eager" or implementation not in ALL_ATTENTION_FUNCTIONS:
        if eager is None:
            raise ValueError(f"{type(module).__name__}: its model code has no eager_attention_forward")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def prefill_guard(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
    *,
    chunks: bool = False,
) -> tuple[torch.Tensor | None, str | None]:
    """(key_padding_mask, reason) of a prefill call.

    ``reason`` says why the call must run the model's own attention (None when
    a sparse method applies); ``key_padding_mask`` is the (B, Lk) bool left
    padding read from ``attention_mask`` (None without padding information, or
    when ``reason`` is set). ``chunks``: the method takes queries after a cached
    prefix (Lq < Lk).
    """
    reason = unsupported_reason(module, query, key, dropout, kwargs, chunks=chunks)
    if reason is not None or attention_mask is None:
        return None, reason
    key_padding_mask = left_padding_from_mask(attention_mask, query.shape[2], key.shape[2])
    if key_padding_mask is None:
        return None, "the attention mask is not causal with left padding (packed sequences or a custom mask)"
    return key_padding_mask, None


def unsupported_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    dropout: float,
    kwargs: dict[str, Any],
    *,
    chunks: bool = False,
) -> str | None:
    """Why the sparse methods cannot honour this call's attention, or None.

    Every option of transformers' attention call that changes the result is
    listed here; anything it does not name (a family's new keyword) is refused
    by :func:`unknown_options`.
    """
    if query.shape[2] > key.shape[2] or (query.shape[2] < key.shape[2] and not chunks):
        return "queries after a cached prefix (chunked prefill or a pre-filled cache) are not supported by this method"
    if dropout and module.training:
        return "attention dropout during training is not supported"
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        return "non-causal attention is not supported"
    if kwargs.get("position_bias") is not None:
        return "position_bias is not supported"
    if kwargs.get("softcap") is not None:
        return "attention logit softcapping is not supported"
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        return "attention sinks (s_aux) are not supported"
    sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if sliding_window is not None and sliding_window < key.shape[2]:
        return "sliding-window attention shorter than the prompt is not supported"
    unknown = unknown_options(kwargs)
    if unknown:
        return f"attention options {unknown} are not known to tokensparse"
    return None


# Keywords of transformers' attention calls that do not change what is computed
# (or are checked above); any other option makes the call fall back.
_HARMLESS = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value", "output_attentions",
    "is_causal", "sliding_window", "softcap", "s_aux", "position_bias", "head_mask", "layer_head_mask",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "target_dtype", "token_type_ids",
    "query_length", "layer_idx", "output_hidden_states", "return_dict", "attn_mask_type",
})


def unknown_options(kwargs: dict[str, Any]) -> list[str]:
    """Options of an attention call that are set and not known to be harmless."""
    return sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS)


def left_padding_from_mask(
    attention_mask: torch.Tensor, seq_len: int, key_len: int | None = None
) -> torch.Tensor | None:
    """(B, Lk) bool key padding if ``attention_mask`` is causal with left padding, else None.

    Accepts transformers' 4D bool masks (True = attend) and additive float masks
    (0 = attend), shaped (B, 1, Lq, Lk) with the queries at the last Lq positions
    (``seq_len`` = Lq, ``key_len`` = Lk, default Lq), and 2D padding masks (B, Lk)
    (1 = real token, as flash attention's mask builder gives them).
    """
    key_len = seq_len if key_len is None else key_len
    if attention_mask.dim() == 2:
        if attention_mask.shape[-1] != key_len:
            return None
        real = attention_mask.bool()
        return None if bool((real[:, 1:] < real[:, :-1]).any()) else real
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (seq_len, key_len) or attention_mask.shape[1] != 1:
        return None
    allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
    # The last query sees every real key, so its row is the key padding mask.
    real = allowed[:, -1, :]
    if bool((real[:, 1:] < real[:, :-1]).any()):
        return None
    # Causal by absolute position: query i sits at key_len - seq_len + i.
    causal = torch.ones(seq_len, key_len, dtype=torch.bool, device=allowed.device).tril(key_len - seq_len)
    expected = causal[None] & real[:, None, :]
    # Rows of padded queries are irrelevant (their output is zeroed).
    query_real = real[:, key_len - seq_len:]
    if not bool(((allowed == expected) | ~query_real[:, :, None]).all()):
        return None
    return real


def tensor_parallel_group(model: torch.nn.Module) -> Any | None:
    """The process group transformers' tensor parallelism split ``model``'s heads over, or None.

    A model loaded with ``DistributedConfig(tp_size=N)`` (or the older
    ``tp_plan="auto"``) has ``tp_size`` N > 1 and a device mesh with a ``"tp"``
    dimension: 5.2x keeps the meshes in ``model._mesh_manager``; earlier
    releases keep the TP mesh (or a mesh with a "tp" dimension) in
    ``model._device_mesh``. Raises where ``tp_size`` says the model is split but
    no mesh is found (pass ``enable(..., tp_group=GROUP)`` then).
    """
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    if not isinstance(size, int) or size <= 1:
        return None
    mesh = None
    manager = getattr(model, "_mesh_manager", None)
    if manager is not None and hasattr(manager, "get_mesh"):
        mesh = manager.get_mesh("tp")
    else:
        mesh = getattr(model, "_device_mesh", None)
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if mesh is not None and mesh.ndim > 1:
            mesh = mesh["tp"] if "tp" in names else None
    if mesh is None:
        raise ValueError(
            f"the model is split over {size} ranks (tp_size) but has no tensor-parallel device mesh this version "
            "of tokensparse can find; pass enable(..., tp_group=GROUP)"
        )
    return mesh.get_group()


__all__ = [
    "tensor_parallel_group",
    "attention_layers",
    "attention_layers_checked",
    "num_hidden_layers",
    "registered_name",
    "attach",
    "detach",
    "own_attention",
    "prefill_guard",
    "unsupported_reason",
    "left_padding_from_mask",
]
