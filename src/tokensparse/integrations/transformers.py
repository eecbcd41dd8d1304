"""Sparse attention methods inside Hugging Face transformers models.

The methods plug in through ``AttentionInterface`` (one attention function for
every method) and ``AttentionMaskInterface`` (the mask builder, so that left
padding reaches the function); no model class is patched. Any model family that
routes attention through the interface works; layers are found by their
``layer_idx`` attribute.

:func:`enable` builds a :class:`tokensparse.plan.LayerPlan` (which method runs
in which decoder layer) and switches the model to the one attention function.
Prefill calls of a layer with a method run it; everything else (decode steps,
layers the plan leaves alone, prompts below the length gate, queries after a
cached prefix, options the methods do not cover) runs the model's own attention
implementation as loaded, with a one-time warning for unsupported options.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..config import TokenSparseConfig
from ..distributed import HeadGroup, split_heads
from ..log import reset_warnings, warn_once
from ..methods import MethodSpec
from ..methods.registry import LAYERS_SPARSE
from ..plan import LayerPlan, build_plan
from ..selection import TokenSelection
from .hf import (
    attach,
    cache_kwarg,
    attention_layers,
    attention_layers_checked,
    detach,
    left_padding_from_mask,
    num_hidden_layers,
    own_attention,
    prefill_guard,
    registered_name,
    tensor_parallel_group,
)

if TYPE_CHECKING:
    from ..profile import LayerProfile

logger = logging.getLogger(__name__)

ATTN_NAME = "tokensparse"
_STATE_ATTR = "_tokensparse_layer"
_MODEL_ATTR = "_tokensparse_model"


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
    plan: LayerPlan
    previous_attn: str
    record: bool
    prefills: list[dict[int, LayerRecord]] = field(default_factory=list)
    # Tensor parallelism: whether the heads are split, and over which group (None: the world).
    heads_split: bool = False
    tp_group: Any = None
    # The model's own attention function per attention class (looked up once, not per call).
    own: dict[type, Any] = field(default_factory=dict)

    def own_attention(self, module: torch.nn.Module):
        kind = type(module)
        if kind not in self.own:
            self.own[kind] = own_attention(module, self.previous_attn)
        return self.own[kind]

    def add(self, record: LayerRecord) -> None:
        # A layer seen again means a new prefill has started.
        if not self.prefills or record.layer in self.prefills[-1]:
            self.prefills.append({})
        self.prefills[-1][record.layer] = record


def enable(
    model: torch.nn.Module,
    config: "TokenSparseConfig | MethodSpec | LayerPlan | str | Any | None" = None,
    *,
    profile: "LayerProfile | str | os.PathLike | None" = None,
    record: bool = False,
    min_length: "int | dict[str, int] | str" = 0,
    tp_group: Any = "auto",
) -> torch.nn.Module:
    """Switch ``model``'s prefill to a sparse attention method.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface``.
        config: the method: a :class:`TokenSparseConfig` (Token Sparse Attention,
            the default), a spec string such as ``"token_sparse+flexprefill:keep_ratio=0.5"``,
            a :class:`tokensparse.methods.MethodSpec`, a method's config object,
            or a ready :class:`tokensparse.plan.LayerPlan`. For token sparse the
            sparse layers are, in order of precedence: the config's
            ``sparse_layers``; the layers of ``profile``; those of a profile
            shipped with the package whose model identity matches ``model``;
            else the second half of the decoder layers (the paper's fallback),
            with a one-time warning.
        profile: a layer profile (:class:`tokensparse.profile.LayerProfile` or the
            path of a JSON written by ``tokensparse profile``); only used when
            the config does not name the sparse layers.
        record: keep a per-prefill, per-layer, per-head record of what was kept,
            read with :func:`selection_report`. Off, nothing is copied to the host.
        min_length: the length gate: prefills with fewer tokens run the model's
            own attention (one length, one per method name, or ``"auto"``: each
            method's crossover length measured on the H200).
        tp_group: under tensor parallelism, the process group the layers' heads
            are split over; the ``coverage`` budget then averages every rank's
            heads (:mod:`tokensparse.distributed`) so each rank keeps what one
            device would. ``"auto"``: transformers' tensor-parallel group when
            the model was loaded split (``DistributedConfig(tp_size=N)``), else
            none. A ``torch.distributed`` group (``torch.distributed.group.WORLD``
            for the default one) names it; ``None`` exchanges nothing (each rank
            budgets from its own heads).

    Returns:
        The same model, for chaining.
    """
    layers = attention_layers_checked(model)
    num_layers = num_hidden_layers(model, layers)
    if isinstance(config, LayerPlan):
        if profile is not None:
            raise ValueError("pass either a LayerPlan or profile, not both")
        plan = config.with_min_length(min_length) if min_length else config
        if len(plan.layers) != num_layers:
            raise ValueError(f"the plan has {len(plan.layers)} layers, the model {num_layers}")
    else:
        method = TokenSparseConfig() if config is None else config
        plan = build_plan(model, method, num_layers=num_layers, profile=profile, min_length=min_length)

    previous = getattr(model, _MODEL_ATTR, None)
    previous_attn = previous.previous_attn if previous else (model.config._attn_implementation or "sdpa")
    state = _ModelState(plan, previous_attn, record)
    if isinstance(tp_group, str) and tp_group == "auto":
        group = tensor_parallel_group(model)
        state.heads_split, state.tp_group = group is not None, group
    elif tp_group is not None:
        state.heads_split, state.tp_group = True, tp_group
    attach(
        model, layers, name=registered_name(ATTN_NAME, previous_attn), forward=sparse_attention_forward,
        mask_of=previous_attn, layer_attr=_STATE_ATTR, layer_state=lambda m: state,
        model_attr=_MODEL_ATTR, model_state=state,
    )
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable`: restore the previous attention implementation."""
    state = getattr(model, _MODEL_ATTR, None)
    if state is None:
        return model
    return detach(model, layer_attr=_STATE_ATTR, model_attr=_MODEL_ATTR, previous_attn=state.previous_attn)


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


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    chunk_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[Any, torch.Tensor]:
    """Prefill a prompt into a KV cache, ``chunk_size`` tokens per forward pass.

    Each chunk after the first attends over the cached prefix: with a token
    sparse method enabled (zero rows, no inner block-sparse method), its last
    ``window`` queries score every key so far, and with ``budget="keep_tokens"``
    a chunk attends over at most ``keep_tokens + window`` keys whatever the
    prefix length. Other methods run those chunks with the model's own attention
    (a warning once).

    Args:
        model: a transformers causal LM (enabled or not).
        input_ids: (B, L) token ids.
        chunk_size: tokens per forward pass (default: the whole prompt at once).
        attention_mask: optional (B, L) padding mask (1 = real token, left padding);
            positions then count real tokens only (as ``generate`` numbers them), so
            a padded row's cache is the one its unpadded prompt would give.
        cache: a cache to extend (e.g. holding an earlier turn); default a new
            ``DynamicCache``.
        on_chunk: called with (start, end) token offsets in ``input_ids`` after
            each chunk's forward is issued (a benchmark marks time there).

    Returns:
        (cache, logits): the filled cache (continue with ``model.generate(...,
        past_key_values=cache)``) and (B, V) logits of the last position.
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (B, L) with L >= 1, got {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if chunk_size is None:
        chunk_size = length
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    cache = DynamicCache(config=model.config) if cache is None else cache
    past = cache.get_seq_length()
    arg = cache_kwarg(model)
    mask = positions = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], past), attention_mask], dim=1)
        if _takes_position_ids(model):
            # Number the real tokens as generate does; the model alone would count the padding too.
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = None
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        kwargs: dict[str, Any] = {arg: cache, "use_cache": True, "logits_to_keep": 1}
        if mask is not None:
            kwargs["attention_mask"] = mask[:, : past + end]
        if positions is not None:
            kwargs["position_ids"] = positions[:, past + start : past + end]
        logits = model(input_ids=input_ids[:, start:end], **kwargs).logits[:, -1]
        if on_chunk is not None:
            on_chunk(start, end)
    return cache, logits


def _takes_position_ids(model: torch.nn.Module) -> bool:
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


def sparse_layers_of(model: torch.nn.Module) -> tuple[int, ...]:
    """Indices of the layers that run the enabled method (token sparse's sparse layers)."""
    return plan_of(model).sparse_layers


def plan_of(model: torch.nn.Module) -> LayerPlan:
    """The layer plan of an enabled model."""
    state = getattr(model, _MODEL_ATTR, None)
    if state is None:
        raise ValueError("tokensparse is not enabled on this model")
    return state.plan


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The function registered with ``AttentionInterface``.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) after the cache update;
    returns ((B, Lq, H, Dv), weights or None) as transformers expects.
    """
    state: _ModelState | None = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(module).__name__} has no tokensparse state: was the model enabled?")

    def own() -> tuple[torch.Tensor, Any]:
        attend = state.own_attention(module)
        return attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    entry = state.plan.entry(module.layer_idx)
    seq_len = key.shape[2]
    if entry is None or query.shape[2] == 1:
        return own()
    method = entry.spec.method
    if seq_len < entry.min_length or method.runs_dense(entry.spec.config, seq_len):
        _record_dense(state, module, query, key, attention_mask, entry)
        return own()
    key_padding_mask, reason = prefill_guard(
        module, query, key, attention_mask, dropout, kwargs, chunks=method.chunks(entry.spec.config)
    )
    if reason is not None:
        warn_once(logger, f"{reason}: running the model's own attention ({state.previous_attn})")
        _record_dense(state, module, query, key, attention_mask, entry)
        return own()
    with split_heads(_head_group(state, module, query)):
        out, stats = method.prefill(
            query, key, value, entry.spec.config, scale=scaling, key_padding_mask=key_padding_mask, layout="blhd"
        )
    if state.record and isinstance(stats, TokenSelection):
        state.add(
            LayerRecord(
                layer=module.layer_idx,
                seq_lens=stats.seq_lens.tolist(),
                num_kept=stats.num_kept.tolist(),
                dropped_mass=stats.dropped_mass.tolist(),
                dense=stats.dense.tolist(),
            )
        )
    if out is None:
        return own()
    return out, None


def _head_group(state: _ModelState, module: torch.nn.Module, query: torch.Tensor) -> HeadGroup | None:
    """The heads' split of this call, or None where the layer holds all of its heads."""
    if not state.heads_split:
        return None
    local = query.shape[1]
    total = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not isinstance(total, int):
        total = local * torch.distributed.get_world_size(state.tp_group)
    return None if total == local else HeadGroup(state.tp_group, total)


def _record_dense(state: _ModelState, module, query, key, attention_mask, entry) -> None:
    """With recording on, a prefill that a token-selecting layer ran densely is recorded as
    such (every head keeps every real token), so a report lists every sparse layer."""
    if not state.record or entry.spec.method.layers != LAYERS_SPARSE:
        return
    batch, num_heads, seq_len = query.shape[0], query.shape[1], key.shape[2]
    real = None if attention_mask is None else left_padding_from_mask(attention_mask, query.shape[2], seq_len)
    seq_lens = [seq_len] * batch if real is None else real.sum(-1).tolist()
    state.add(
        LayerRecord(
            layer=module.layer_idx,
            seq_lens=seq_lens,
            num_kept=[[n] * num_heads for n in seq_lens],
            dropped_mass=[[0.0] * num_heads for _ in seq_lens],
            dense=[True] * batch,
        )
    )


# Tests and tools may reset the once-only warnings.
def _reset_warnings() -> None:
    reset_warnings()


__all__ = [
    "ATTN_NAME",
    "LayerRecord",
    "enable",
    "disable",
    "selection_report",
    "prefill",
    "sparse_layers_of",
    "plan_of",
    "attention_layers",
    "sparse_attention_forward",
]
