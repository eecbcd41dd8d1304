"""Token sparse prefill inside vLLM: an attention backend that wraps the platform's own.

Use (after ``pip install tokensparse[vllm]``, which registers the plugin)::

    TOKENSPARSE_METHOD="token_sparse:coverage=0.02,sparse_layers=2-29" \\
        python -c '...LLM(model, attention_backend="CUSTOM")...'

The ``vllm.general_plugins`` entry point calls :func:`register` in every vLLM
process. It registers :class:`TokenSparseBackend` as vLLM's ``CUSTOM`` attention
backend; on the CPU platform (whose backend choice ignores ``CUSTOM``) it also
points ``CPU_ATTN`` at a resolver that gives vLLM's own CPU backend unless the
run asked for ``CUSTOM``, so installing the plugin changes nothing by itself.

In each step, for each layer of the method's plan (``sparse_layers`` apply by
the index in vLLM's layer name, ``model.layers.7.self_attn.attn`` -> 7), the
prefill requests at or above the gate run the method on their own queries
with their keys/values: the chunk's own plus, for later chunks of a chunked
prefill, the cached prefix read out of the paged KV cache. Decode tokens, short
prompts, and everything the method does not take run the wrapped backend,
in the same step, on a sub-batch of just those requests. Settings come from
the environment (:class:`tokensparse.integrations.serving.ServingSettings`).

Layouts at vLLM's boundary: query (T, H, D), key/value (T, Hkv, D) flat over
the batch's T scheduled tokens, output (T, H, D); the method gets SDPA's (1, H, L, D).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from ..log import warn_once
from .serving import (
    RequestRunner,
    RequestSpan,
    ServingSettings,
    layer_index,
    probe_block_order,
    read_paged,
    span_rows,
    split_batch,
    sub_batch_offsets,
)

logger = logging.getLogger(__name__)

BACKEND_NAME = "CUSTOM"


# ---------------------------------------------------------------- registration
def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the backend (safe to call repeatedly)."""
    from vllm.platforms import current_platform

    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.TokenSparseBackend")
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.CpuBackendChoice")


def _custom_requested() -> bool:
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config().attention_config.backend == AttentionBackendEnum.CUSTOM


def __getattr__(name: str) -> Any:
    # vLLM resolves a backend by its qualified name when a layer is built (its
    # config is current then). On the CPU the platform always asks for
    # CPU_ATTN, which the plugin points here: the token sparse backend if the
    # run asked for CUSTOM, else vLLM's own CPU backend, untouched.
    if name == "CpuBackendChoice":
        if _custom_requested():
            return _cpu_classes()[0]
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    if name == "TokenSparseBackend":
        from vllm.platforms import current_platform

        return _cpu_classes()[0] if current_platform.is_cpu() else _flash_classes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- what both backends share
@functools.cache
def _settings() -> ServingSettings:
    settings = ServingSettings.from_env()
    logger.info("tokensparse vLLM backend: %s (gate %s tokens)", settings.method.label, settings.min_length)
    return settings


@functools.cache
def _plan(num_layers: int):
    return _settings().plan(num_layers)


def _num_layers() -> int:
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    return config.model_config.get_num_layers(config.parallel_config)


class _SparsePrefill:
    """The token sparse part of an attention impl; the impl supplies the cache reads and the dense sub-batch."""

    def __init__(self, impl: Any, reason: str | None) -> None:
        self.impl = impl
        self.reason = reason  # why this layer runs the wrapped backend for every token, or None
        self.num_layers = _num_layers() if reason is None else 0
        self.runners: dict[str, RequestRunner | None] = {}

    def runner(self, layer_name: str) -> RequestRunner | None:
        if layer_name not in self.runners:
            index = layer_index(layer_name)
            entry = None if index is None else _plan(self.num_layers).entry(index)
            if index is None:
                warn_once(logger, f"no layer index in vLLM layer name {layer_name!r}: it runs the wrapped backend")
            self.runners[layer_name] = None if entry is None else RequestRunner(entry, index, _settings().record)
        return self.runners[layer_name]

    def forward(self, layer, query, key, value, kv_cache, meta, output, wrapped) -> torch.Tensor:
        """Sparse requests through the method, the rest through ``wrapped`` (the platform impl's forward)."""
        runner = self.runner(layer.layer_name)
        unsupported = self.impl._unsupported_metadata(meta)
        if unsupported:
            warn_once(logger, f"{unsupported}: running the wrapped backend ({self.impl.wrapped_name})")
        if runner is None or unsupported or meta.max_query_len <= 1:  # the last: a decode-only step
            return wrapped(layer, query, key, value, kv_cache, meta, output)
        spans = split_batch(meta.query_start_loc, meta.seq_lens, meta.num_actual_tokens)
        dense: list[RequestSpan] = []
        sparse = 0
        for span in spans:
            out = None
            if runner.wants(span):
                keys, values = self.impl._request_kv(layer, key, value, kv_cache, meta, span)
                out = runner.run(query[span.query_start:span.query_end], keys, values, self.impl.scale, span)
            if out is None:
                dense.append(span)
            else:
                output[span.query_start:span.query_end] = out.to(output.dtype)
                sparse += 1
        if sparse == 0:
            return wrapped(layer, query, key, value, kv_cache, meta, output)
        if dense:
            self._dense_sub_batch(layer, query, key, value, kv_cache, meta, output, dense, wrapped)
        return output

    def _dense_sub_batch(self, layer, query, key, value, kv_cache, meta, output, spans, wrapped) -> None:
        rows = span_rows(spans, device=query.device)
        starts, seq_lens = sub_batch_offsets(spans)
        index = torch.tensor([s.index for s in spans], device=meta.seq_lens.device)
        sub_meta = self.impl._sub_metadata(
            layer,
            meta,
            num_tokens=len(rows),
            query_start_loc=torch.tensor(starts, dtype=meta.query_start_loc.dtype, device=meta.query_start_loc.device),
            seq_lens=torch.tensor(seq_lens, dtype=meta.seq_lens.dtype, device=meta.seq_lens.device),
            block_table=meta.block_table[index],
            slot_mapping=meta.slot_mapping[rows.to(meta.slot_mapping.device)],
            max_query_len=max(s.query_len for s in spans),
            max_seq_len=max(seq_lens),
        )
        sub_out = output.new_empty((len(rows),) + tuple(output.shape[1:]))
        wrapped(layer, query[rows], key[rows], value[rows], kv_cache, sub_meta, sub_out)
        output[rows] = sub_out


def _layer_reason(impl: Any) -> str | None:
    """Why an impl cannot run the method at all (then every token runs the wrapped backend), or None."""
    if not _custom_requested():
        return "the run did not ask for the CUSTOM backend"
    if impl.attn_type != AttentionType.DECODER:
        return f"attention type {impl.attn_type}"
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
        return "sliding-window attention"
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi"
    if getattr(impl, "sinks", None) is not None:
        return "attention sinks"
    if getattr(impl, "logits_soft_cap", 0):
        return "logits soft-capping"
    if str(impl.kv_cache_dtype) != "auto":
        return f"a quantized KV cache ({impl.kv_cache_dtype})"
    if getattr(impl, "kv_sharing_target_layer_name", None) is not None:
        return "a KV cache shared with another layer"
    return None


def _init_sparse(impl: Any) -> None:
    reason = _layer_reason(impl)
    if reason is not None and _custom_requested():
        warn_once(logger, f"{reason} is not supported: those layers run the wrapped backend ({impl.wrapped_name})")
    impl._tokensparse = _SparsePrefill(impl, reason)


def _forward(impl, wrapped, layer, query, key, value, kv_cache, meta, output, output_scale, output_block_scale):
    if (meta is None or impl._tokensparse.reason is not None or output_scale is not None
            or output_block_scale is not None):
        return wrapped(layer, query, key, value, kv_cache, meta, output, output_scale, output_block_scale)
    return impl._tokensparse.forward(layer, query, key, value, kv_cache, meta, output, wrapped)


class _TokenSparseImpl:
    """Mixed in ahead of a platform attention impl: token sparse prefill on the layers of the plan.

    The impl supplies ``wrapped_name``, ``_read_prefix`` (the cached prefix out of
    its paged layout), ``_unsupported_metadata`` and ``_sub_metadata``.
    """

    wrapped_name: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _init_sparse(self)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query (T, H, D), key/value (T, Hkv, D), kv_cache (num_blocks, Hkv, block_size, 2 D)."""
        return _forward(self, super().forward, layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)

    def _request_kv(self, layer, key, value, kv_cache, meta, span: RequestSpan):
        """(Lk, Hkv, D) keys and values of one request: cached prefix (read from the pages) + the chunk's own."""
        chunk = slice(span.query_start, span.query_end)
        if span.context_len == 0:
            return key[chunk], value[chunk]
        prefix_k, prefix_v = self._read_prefix(layer, kv_cache, meta, span)
        return torch.cat([prefix_k, key[chunk]]), torch.cat([prefix_v, value[chunk]])


# ---------------------------------------------------------------- CPU: wraps vLLM's CPU attention
@functools.cache
def _cpu_classes() -> tuple[type, type]:
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    class TokenSparseCPUImpl(_TokenSparseImpl, CPUAttentionBackendImpl):
        """vLLM's CPU attention with token sparse prefill on the layers of the plan."""

        wrapped_name = "CPU_ATTN"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            from vllm.config import get_current_vllm_config

            super().__init__(*args, **kwargs)
            self._model_dtype = get_current_vllm_config().model_config.dtype

        def _unsupported_metadata(self, meta) -> str | None:
            if meta.dynamic_causal is not None or meta.causal is not True:
                return "a non-causal or dynamically causal batch"
            return None

        def _read_prefix(self, layer, kv_cache, meta, span: RequestSpan):
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
            key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
            key_order, value_order = _cpu_block_order(layer.isa, block_size, self.head_size, kv_cache.dtype)
            row = meta.block_table[span.index]
            return (read_paged(key_cache, row, span.context_len, block_order=key_order).transpose(0, 1),
                    read_paged(value_cache, row, span.context_len, block_order=value_order).transpose(0, 1))

        def _sub_metadata(self, layer, meta, *, num_tokens, query_start_loc, seq_lens, block_table,
                          slot_mapping, max_query_len, max_seq_len):
            scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=seq_lens.shape[0],
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size,
                seq_lens=seq_lens,
                dtype=self._model_dtype,
                query_start_loc=query_start_loc,
                causal=True,
                sliding_window_size=self.sliding_window,
                isa=layer.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            return dataclasses.replace(
                meta, num_actual_tokens=num_tokens, max_query_len=max_query_len, query_start_loc=query_start_loc,
                max_seq_len=max_seq_len, seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping,
                scheduler_metadata=scheduler_metadata,
            )

    class TokenSparseCPUBackend(CPUAttentionBackend):
        """vLLM's CPU attention backend with token sparse prefill (registered as CUSTOM)."""

        @staticmethod
        def get_name() -> str:
            return BACKEND_NAME

        @staticmethod
        def get_impl_cls() -> type:
            return TokenSparseCPUImpl

    return TokenSparseCPUBackend, TokenSparseCPUImpl


@functools.cache
def _cpu_block_order(isa: str, block_size: int, head_size: int, dtype: torch.dtype):
    """How vLLM's CPU cache-write op (for this ISA) lays out a block, found once by running it."""
    from vllm import _custom_ops as ops

    def write(key, value, key_cache, value_cache):
        slots = torch.arange(key.shape[0], dtype=torch.long)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    orders = probe_block_order(write, block_size, head_size, dtype)
    logger.info("vLLM CPU KV cache (isa %s): keys %s, values %s", isa,
                "reordered" if orders[0] is not None else "plain", "reordered" if orders[1] is not None else "plain")
    return orders


# ---------------------------------------------------------------- CUDA: wraps vLLM's FlashAttention
@functools.cache
def _flash_classes() -> tuple[type, type]:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    class TokenSparseFlashImpl(_TokenSparseImpl, FlashAttentionImpl):
        """vLLM's FlashAttention with token sparse prefill on the layers of the plan."""

        wrapped_name = "FLASH_ATTN"

        def _unsupported_metadata(self, meta) -> str | None:
            if not isinstance(meta.causal, bool) or not meta.causal:
                return "a non-causal or dynamically causal batch"
            if meta.max_dcp_context_kv_len is not None or meta.mm_prefix_query_range_tensor is not None:
                return "decode context parallelism or a multimodal prefix"
            if meta.rswa_prefix_lens is not None:
                return "reference sliding-window attention"
            return None

        def _read_prefix(self, layer, kv_cache, meta, span: RequestSpan):
            # (num_blocks, Hkv, block_size, 2 D) -> (num_blocks, block_size, Hkv, D) each, as the impl reads it
            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            row = meta.block_table[span.index]
            return (read_paged(key_cache, row, span.context_len, layout="bnhd").transpose(0, 1),
                    read_paged(value_cache, row, span.context_len, layout="bnhd").transpose(0, 1))

        def _sub_metadata(self, layer, meta, *, num_tokens, query_start_loc, seq_lens, block_table,
                          slot_mapping, max_query_len, max_seq_len):
            # Ahead-of-time scheduling and split counts were planned for the whole batch: drop them.
            return dataclasses.replace(
                meta, num_actual_tokens=num_tokens, max_query_len=max_query_len, query_start_loc=query_start_loc,
                max_seq_len=max_seq_len, seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping,
                scheduler_metadata=None, max_num_splits=0,
            )

    class TokenSparseFlashBackend(FlashAttentionBackend):
        """vLLM's FlashAttention backend with token sparse prefill (registered as CUSTOM)."""

        @staticmethod
        def get_name() -> str:
            return BACKEND_NAME

        @staticmethod
        def get_impl_cls() -> type:
            return TokenSparseFlashImpl

    return TokenSparseFlashBackend, TokenSparseFlashImpl


__all__ = ["BACKEND_NAME", "register"]
