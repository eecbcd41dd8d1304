"""Token Sparse Attention inside Hugging Face transformers models.

The method plugs in through ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask builder, so that left padding reaches the
function); no model class is patched. Any model family that routes attention
through the interface works; layers are found by their ``layer_idx`` attribute.

Prefill calls of sparse layers use the method. Everything else (decode steps,
dense layers, queries after a cached prefix, options the method does not cover)
goes to transformers' stock SDPA function, with a one-time warning for
unsupported options.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..attention import attend_selected
from ..config import TokenSparseConfig
from ..selection import select_tokens, static_dense

if TYPE_CHECKING:
    from ..profile import LayerProfile

logger = logging.getLogger(__name__)

ATTN_NAME = "tokensparse"
_STATE_ATTR = "_tokensparse_layer"
_MODEL_ATTR = "_tokensparse_model"
_warned: set[str] = set()


@dataclass(frozen=True)
class LayerRecord:
    """What one sparse layer kept during one prefill.

    Attributes:
        layer: decoder layer index.
        seq_lens: (B,) real tokens per sequence.
        num_kept: (B, H) tokens each head attended over (window included).
        dropped_mass: (B, H) share of window attention mass on dropped tokens.
        dense: (B,) whether the sequence ran dense in this layer.
    """

    layer: int
    seq_lens: list[int]
    num_kept: list[list[int]]
    dropped_mass: list[list[float]]
    dense: list[bool]

    @property
    def kept_share(self) -> list[list[float]]:
        """(B, H) share of real tokens each head kept."""
        return [[k / max(n, 1) for k in row] for n, row in zip(self.seq_lens, self.num_kept)]

    @property
    def mean_kept_share(self) -> float:
        shares = [s for row in self.kept_share for s in row]
        return sum(shares) / len(shares)

    @property
    def max_dropped_mass(self) -> float:
        return max(m for row in self.dropped_mass for m in row)


@dataclass
class _ModelState:
    config: TokenSparseConfig
    sparse_layers: tuple[int, ...]
    previous_attn: str
    record: bool
    prefills: list[dict[int, LayerRecord]] = field(default_factory=list)

    def add(self, record: LayerRecord) -> None:
        # A layer seen again means a new prefill has started.
        if not self.prefills or record.layer in self.prefills[-1]:
            self.prefills.append({})
        self.prefills[-1][record.layer] = record


def enable(
    model: torch.nn.Module,
    config: TokenSparseConfig | None = None,
    *,
    profile: "LayerProfile | str | os.PathLike | None" = None,
    record: bool = False,
) -> torch.nn.Module:
    """Switch ``model`` to Token Sparse Attention on its sparse layers.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface``.
        config: settings. The sparse layers are, in order of precedence:
            ``config.sparse_layers``; the layers of ``profile``; those of a profile
            shipped with the package whose model identity matches ``model``; else
            the second half of the decoder layers (the paper's fallback), with a
            one-time warning.
        profile: a layer profile (:class:`tokensparse.profile.LayerProfile` or the
            path of a JSON written by ``tokensparse profile``); only used when
            ``config.sparse_layers`` is None.
        record: keep a per-prefill, per-layer, per-head record of what was kept,
            read with :func:`selection_report`. Off, nothing is copied to the host.

    Returns:
        The same model, for chaining.
    """
    config = TokenSparseConfig() if config is None else config
    if not isinstance(config, TokenSparseConfig):
        raise ValueError(f"config must be a TokenSparseConfig, got {type(config).__name__}")
    layers = _attention_layers_checked(model)
    num_layers = _num_hidden_layers(model, layers)
    sparse_layers = config.sparse_layers
    if sparse_layers is None:
        sparse_layers = _profile_layers(model, profile, num_layers)
    elif profile is not None:
        raise ValueError("pass either config.sparse_layers or profile, not both")
    bad = [i for i in sparse_layers if i >= num_layers]
    if bad:
        raise ValueError(f"config.sparse_layers has indices {bad} beyond the model's {num_layers} layers")

    previous = getattr(model, _MODEL_ATTR, None)
    previous_attn = previous.previous_attn if previous else model.config._attn_implementation
    state = _ModelState(config, tuple(sparse_layers), previous_attn or "sdpa", record)
    _attach(
        model, layers, name=ATTN_NAME, forward=token_sparse_attention_forward,
        layer_attr=_STATE_ATTR, layer_state=lambda m: (state, m.layer_idx in state.sparse_layers),
        model_attr=_MODEL_ATTR, model_state=state,
    )
    return model


def _profile_layers(
    model: torch.nn.Module, profile: "LayerProfile | str | os.PathLike | None", num_layers: int
) -> tuple[int, ...]:
    from ..profile import ModelIdentity, find_profile, load_profile

    if profile is not None:
        loaded = load_profile(profile)
        if loaded.model.num_layers != num_layers:
            raise ValueError(
                f"profile was measured on a model of {loaded.model.num_layers} layers, this model has {num_layers}"
            )
        if not loaded.model.same_architecture(ModelIdentity.from_model(model)):
            _warn_once(f"the profile was measured on {loaded.model.name or loaded.model.architecture!r}, "
                       "a model with a different identity; using its layers anyway")
        return loaded.sparse_layers
    shipped = find_profile(model)
    if shipped is not None:
        logger.info("using the shipped layer profile for %s: %s", shipped.model.name, list(shipped.sparse_layers))
        return shipped.sparse_layers
    fallback = tuple(range(num_layers // 2, num_layers))
    identity = ModelIdentity.from_model(model)
    _warn_once(
        f"no layer profile for this model ({identity.architecture}, {identity.num_layers} layers, "
        f"name {identity.name!r}): using the second half of the layers, {list(fallback)}; "
        "run `tokensparse profile --model NAME_OR_PATH` and pass enable(..., profile=PATH)"
    )
    return fallback


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable`: restore the previous attention implementation."""
    state = getattr(model, _MODEL_ATTR, None)
    if state is None:
        return model
    return _detach(model, layer_attr=_STATE_ATTR, model_attr=_MODEL_ATTR, previous_attn=state.previous_attn)


def selection_report(model: torch.nn.Module, *, clear: bool = False) -> list[dict[int, LayerRecord]]:
    """Recorded prefills, oldest first: for each, sparse layer index -> :class:`LayerRecord`.

    Needs ``enable(..., record=True)``. ``clear`` empties the record afterwards.
    """
    state = getattr(model, _MODEL_ATTR, None)
    if state is None:
        raise ValueError("tokensparse is not enabled on this model")
    if not state.record:
        raise ValueError("recording is off: call enable(model, config, record=True)")
    prefills = list(state.prefills)
    if clear:
        state.prefills.clear()
    return prefills


def sparse_layers_of(model: torch.nn.Module) -> tuple[int, ...]:
    """Indices of the layers that run Token Sparse Attention on an enabled model."""
    state = getattr(model, _MODEL_ATTR, None)
    if state is None:
        raise ValueError("tokensparse is not enabled on this model")
    return state.sparse_layers


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention modules of ``model``: those with an int ``layer_idx`` and GQA group count."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups")
    ]


def token_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered with ``AttentionInterface``.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) after the cache update;
    returns ((B, Lq, H, Dv), None) as transformers expects.
    """

    def stock() -> tuple[torch.Tensor, None]:
        return _stock(module, query, key, value, attention_mask, dropout, scaling, kwargs)

    layer_state = getattr(module, _STATE_ATTR, None)
    if layer_state is None or query.shape[2] == 1:
        return stock()
    state: _ModelState = layer_state[0]
    config = state.config

    def dense() -> tuple[torch.Tensor, None]:
        # A prefill call that drops no tokens: FlexPrefill if configured, else SDPA.
        if config.attention != "flexprefill":
            return stock()
        from ..flexprefill import FlexPrefillConfig
        from .flexprefill import flexprefill_prefill

        fp_config = FlexPrefillConfig.from_token_sparse(config)
        return flexprefill_prefill(
            module, query, key, value, attention_mask, fp_config, dropout=dropout, scaling=scaling, **kwargs
        )

    if not layer_state[1] or static_dense(config, key.shape[2]):
        return dense()
    key_padding_mask, reason = _prefill_guard(module, query, key, attention_mask, dropout, kwargs)
    if reason is not None:
        _warn_once(reason + ": running dense SDPA")
        return stock()

    selection = select_tokens(query, key, config, scale=scaling, key_padding_mask=key_padding_mask)
    if state.record:
        state.add(
            LayerRecord(
                layer=module.layer_idx,
                seq_lens=selection.seq_lens.tolist(),
                num_kept=selection.num_kept.tolist(),
                dropped_mass=selection.dropped_mass.tolist(),
                dense=selection.dense.tolist(),
            )
        )
    if selection.kept_idx is None:
        return dense()
    out = attend_selected(
        query, key, value, selection, scale=scaling, backend=config.backend, layout="blhd", config=config
    )
    return out, None


def _prefill_guard(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor | None, str | None]:
    """(key_padding_mask, reason) of a prefill call.

    ``reason`` says why the call must run stock SDPA (None when the sparse path
    applies); ``key_padding_mask`` is the (B, L) bool left padding read from
    ``attention_mask`` (None without a mask, or when ``reason`` is set).
    """
    reason = _unsupported_reason(module, query, key, dropout, kwargs)
    if reason is not None or attention_mask is None:
        return None, reason
    key_padding_mask = _left_padding_from_mask(attention_mask, query.shape[2])
    if key_padding_mask is None:
        return None, "the attention mask is not causal with left padding (packed sequences or a custom mask)"
    return key_padding_mask, None


def _unsupported_reason(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict[str, Any]
) -> str | None:
    if query.shape[2] != key.shape[2]:
        return "queries after a cached prefix (chunked prefill or a pre-filled cache) are not supported"
    if dropout and module.training:
        return "attention dropout during training is not supported"
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        return "non-causal attention is not supported"
    if kwargs.get("position_bias") is not None:
        return "position_bias is not supported"
    if kwargs.get("softcap") is not None:
        return "attention logit softcapping is not supported"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux) are not supported"
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and sliding_window < key.shape[2]:
        return "sliding-window attention shorter than the prompt is not supported"
    return None


def _left_padding_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor | None:
    """(B, L) bool key padding if ``attention_mask`` is causal with left padding, else None.

    Accepts transformers' bool masks (True = attend) and additive float masks
    (0 = attend), shaped (B, 1, L, L).
    """
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (seq_len, seq_len) or attention_mask.shape[1] != 1:
        return None
    allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
    # The last query sees every real key, so its row is the key padding mask.
    real = allowed[:, -1, :]
    if bool((real[:, 1:] < real[:, :-1]).any()):
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=allowed.device).tril()
    expected = causal[None] & real[:, None, :]
    # Rows of padded queries are irrelevant (their output is zeroed).
    if not bool(((allowed == expected) | ~real[:, :, None]).all()):
        return None
    return real


def _stock(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """transformers' stock SDPA attention function on the same call."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _attention_layers_checked(model: torch.nn.Module) -> list[torch.nn.Module]:
    """:func:`attention_layers` of a model that can switch attention implementation, or ValueError."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError("model must be a transformers PreTrainedModel (it has no set_attn_implementation)")
    layers = attention_layers(model)
    if not layers:
        raise ValueError("model has no attention modules with a layer_idx; is it a transformers decoder model?")
    return layers


def _attach(
    model: torch.nn.Module,
    layers: list[torch.nn.Module],
    *,
    name: str,
    forward: Callable[..., tuple[torch.Tensor, None]],
    layer_attr: str,
    layer_state: Callable[[torch.nn.Module], Any],
    model_attr: str,
    model_state: Any,
) -> None:
    """Register ``forward`` as attention ``name``, store the states and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    # Without a registered mask builder, transformers passes attention_mask=None
    # to unknown implementations and left padding would be silently lost.
    AttentionMaskInterface.register(name, sdpa_mask)
    for module in layers:
        setattr(module, layer_attr, layer_state(module))
    setattr(model, model_attr, model_state)
    model.set_attn_implementation(name)


def _detach(model: torch.nn.Module, *, layer_attr: str, model_attr: str, previous_attn: str) -> torch.nn.Module:
    """Undo :func:`_attach`: drop the states and switch ``model`` back to ``previous_attn``."""
    for module in attention_layers(model):
        if hasattr(module, layer_attr):
            delattr(module, layer_attr)
    delattr(model, model_attr)
    model.set_attn_implementation(previous_attn)
    return model


def _num_hidden_layers(model: torch.nn.Module, layers: list[torch.nn.Module]) -> int:
    config = model.config.get_text_config()
    return getattr(config, "num_hidden_layers", None) or (max(m.layer_idx for m in layers) + 1)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("tokensparse: %s", message)


# Tests and tools may reset the once-only warnings.
def _reset_warnings() -> None:
    _warned.clear()


__all__ = [
    "ATTN_NAME",
    "LayerRecord",
    "enable",
    "disable",
    "selection_report",
    "sparse_layers_of",
    "attention_layers",
    "token_sparse_attention_forward",
]
