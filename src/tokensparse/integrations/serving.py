"""Engine-independent pieces of a serving-engine integration (vLLM and the like).

A serving engine hands its attention backend one flat batch: the scheduled
tokens of several requests packed back to back, with per-request offsets
(``query_start_loc``), the length each request reaches after this step
(``seq_lens``), and a paged KV cache addressed through a block table. This
module splits such a batch into requests, decides which requests a layer runs
sparsely (the length gate), reads a request's keys/values out of a paged cache,
runs the method on one request, and holds the settings read from the
environment. Nothing here imports an engine; :mod:`tokensparse.integrations.vllm`
wires it into vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..log import warn_once
from ..methods import MethodSpec, parse_method
from ..plan import LayerEntry, LayerPlan, build_plan, profile_for
from ..selection import TokenSelection

logger = logging.getLogger(__name__)

ENV_METHOD = "TOKENSPARSE_METHOD"
ENV_MIN_LENGTH = "TOKENSPARSE_MIN_LENGTH"
ENV_RECORD = "TOKENSPARSE_RECORD"
ENV_PROFILE = "TOKENSPARSE_PROFILE"
DEFAULT_METHOD = "token_sparse"


# ---------------------------------------------------------------- the flat batch
@dataclass(frozen=True)
class RequestSpan:
    """One request's rows of a flat batch.

    Attributes:
        index: the request's row in ``seq_lens`` and the block table.
        query_start, query_end: its scheduled tokens are rows
            ``[query_start, query_end)`` of the flat query/key/value.
        seq_len: its tokens after this step (cached prefix + scheduled tokens).
    """

    index: int
    query_start: int
    query_end: int
    seq_len: int

    @property
    def query_len(self) -> int:
        return self.query_end - self.query_start

    @property
    def context_len(self) -> int:
        """Tokens already in the KV cache before this step (the cached prefix)."""
        return self.seq_len - self.query_len


def split_batch(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int | None = None) -> list[RequestSpan]:
    """The requests of a flat batch, in batch order, skipping requests with no scheduled tokens.

    Args:
        query_start_loc: (num_reqs + 1,) int offsets of each request's first row (the
            last entry is the number of scheduled tokens); entries past ``num_reqs``
            (padding) are ignored.
        seq_lens: (num_reqs,) tokens of each request after this step.
        num_tokens: rows of the batch that are real (rows past it are padding).
    """
    if query_start_loc.dim() != 1 or seq_lens.dim() != 1:
        raise ValueError(f"query_start_loc and seq_lens must be 1-D, got {tuple(query_start_loc.shape)} "
                         f"and {tuple(seq_lens.shape)}")
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape[0] < num_reqs + 1:
        raise ValueError(f"query_start_loc needs num_reqs + 1 = {num_reqs + 1} entries, got {query_start_loc.shape[0]}")
    starts = query_start_loc[: num_reqs + 1].tolist()
    lens = seq_lens.tolist()
    spans = []
    for i in range(num_reqs):
        start, end = int(starts[i]), int(starts[i + 1])
        if num_tokens is not None:
            end = min(end, num_tokens)
        if end <= start:
            continue
        if lens[i] < end - start:
            raise ValueError(f"seq_lens[{i}] = {lens[i]} is shorter than the request's {end - start} scheduled tokens")
        spans.append(RequestSpan(i, start, end, int(lens[i])))
    return spans


def span_rows(spans: list[RequestSpan], device: torch.device | None = None) -> torch.Tensor:
    """(N,) long: the flat-batch rows of ``spans``, in order."""
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s.query_start, s.query_end, device=device) for s in spans])


def sub_batch_offsets(spans: list[RequestSpan]) -> tuple[list[int], list[int]]:
    """(query_start_loc, seq_lens) of ``spans`` packed back to back as their own batch."""
    starts = [0]
    for s in spans:
        starts.append(starts[-1] + s.query_len)
    return starts, [s.seq_len for s in spans]


# ---------------------------------------------------------------- layers
_LAYERS = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(layer_name: str) -> int | None:
    """The decoder layer index in an engine's layer name (``model.layers.7.self_attn.attn`` -> 7).

    Names without ``layers.N`` fall back to their only integer; None when there
    is no integer or several."""
    found = _LAYERS.search(layer_name)
    if found:
        return int(found.group(1))
    ints = [int(part) for part in layer_name.split(".") if part.isdigit()]
    return ints[0] if len(ints) == 1 else None


# ---------------------------------------------------------------- paged KV cache
def read_paged(
    cache: torch.Tensor,
    block_ids: torch.Tensor,
    length: int,
    *,
    layout: str = "bhnd",
    block_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """One request's first ``length`` positions of one side (keys or values) of a paged cache.

    Args:
        cache: ``layout`` ``"bhnd"``: (num_blocks, Hkv, block_size, D) (vLLM's CPU
            attention); ``"bnhd"``: (num_blocks, block_size, Hkv, D) (FlashAttention).
        block_ids: (n,) the request's row of the block table (at least
            ``ceil(length / block_size)`` valid entries).
        length: positions to read.
        block_order: for ``"bhnd"`` caches that store a block's interior in
            another order (vLLM's CPU kernels keep keys transposed or packed per
            ISA): (block_size * D,) long, entry ``t * D + d`` = the flat offset
            inside a (block, head) slice of position ``t``, channel ``d``
            (see :func:`probe_block_order`).

    Returns:
        (Hkv, length, D).
    """
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    if cache.dim() != 4:
        raise ValueError(f"cache must be 4-D, got shape {tuple(cache.shape)}")
    block_size = cache.shape[2] if layout == "bhnd" else cache.shape[1]
    num = -(-length // block_size)
    if length < 0 or num > block_ids.shape[0]:
        raise ValueError(f"length {length} needs {num} blocks, the block table row has {block_ids.shape[0]}")
    blocks = cache[block_ids[:num].long()]
    if layout == "bnhd":
        blocks = blocks.transpose(1, 2)  # (n, Hkv, block_size, D)
    n, heads, _, dim = blocks.shape
    if block_order is not None:
        blocks = blocks.reshape(n, heads, block_size * dim)[..., block_order].view(n, heads, block_size, dim)
    return blocks.permute(1, 0, 2, 3).reshape(heads, n * block_size, dim)[:, :length]


def probe_block_order(
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    block_size: int,
    head_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """How an engine's cache-write op lays out one block's keys and values, found by running it.

    ``write(key, value, key_cache, value_cache)`` must store key/value (block_size,
    1, D) at slots 0..block_size-1 of a one-block, one-head cache (key_cache,
    value_cache: (1, 1, block_size, D) views it is given). Positions and channels
    are written as small integers (exact in bf16) in three passes.

    Returns:
        (key_order, value_order): :func:`read_paged`'s ``block_order`` for each
        side, None where the side is stored plainly.
    """
    positions = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_size)
    channels = torch.arange(head_size).view(1, 1, head_size).expand(block_size, 1, head_size)
    found: list[list[torch.Tensor]] = [[], []]
    for values in (positions, channels % 128, channels // 128):
        storage = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
        key_cache, value_cache = storage.chunk(2, dim=2)
        data = values.to(dtype).contiguous()
        write(data, data.clone(), key_cache, value_cache)
        for side, cache in enumerate((key_cache, value_cache)):
            found[side].append(cache.reshape(-1).round().long())
    orders: list[torch.Tensor | None] = []
    for pos, low, high in found:
        logical = pos * head_size + low + 128 * high  # flat physical offset -> logical t * D + d
        if sorted(logical.tolist()) != list(range(block_size * head_size)):
            raise ValueError("the cache write op does not store each (position, channel) once; cannot read it back")
        order = torch.empty_like(logical)
        order[logical] = torch.arange(logical.numel())
        orders.append(None if torch.equal(order, torch.arange(order.numel())) else order)
    return orders[0], orders[1]


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServingSettings:
    """What the engine integration runs, read once from the environment.

    Attributes:
        method: the method spec (``TOKENSPARSE_METHOD``, default ``token_sparse``).
        min_length: the length gate (``TOKENSPARSE_MIN_LENGTH``: an integer or
            ``auto``; default 0): requests of fewer tokens run the engine's attention.
        record: a JSON-lines file each sparse request's selection is appended to
            (``TOKENSPARSE_RECORD``), or None.
        profile: a layer profile JSON (``TOKENSPARSE_PROFILE``, drift or
            sensitivity) for a method whose layers come from a profile (a tiered
            spec's first tier without ``sparse_layers``), or None. The engine
            gives no model to match a shipped profile by, so it is a path.
    """

    method: MethodSpec
    min_length: int | str = 0
    record: Path | None = None
    profile: Path | None = None

    @classmethod
    def from_env(cls, environ: "os._Environ[str] | dict[str, str] | None" = None) -> "ServingSettings":
        env = os.environ if environ is None else environ
        spec = env.get(ENV_METHOD, "").strip() or DEFAULT_METHOD
        try:
            method = parse_method(spec)
        except ValueError as err:
            raise ValueError(f"{ENV_METHOD}={spec!r}: {err}") from None
        raw = env.get(ENV_MIN_LENGTH, "").strip() or "0"
        if raw == "auto":
            min_length: int | str = "auto"
        else:
            try:
                min_length = int(raw)
            except ValueError:
                raise ValueError(f"{ENV_MIN_LENGTH} must be an integer >= 0 or 'auto', got {raw!r}") from None
            if min_length < 0:
                raise ValueError(f"{ENV_MIN_LENGTH} must be an integer >= 0 or 'auto', got {raw!r}")
        record = env.get(ENV_RECORD, "").strip()
        profile = env.get(ENV_PROFILE, "").strip()
        if profile and not Path(profile).is_file():
            raise ValueError(
                f"{ENV_PROFILE} must be the path of a profile JSON, got {profile!r} (the shipped ones are in "
                f"{Path(__file__).parents[1] / 'data' / 'profiles'})"
            )
        return cls(method, min_length, Path(record) if record else None, Path(profile) if profile else None)

    def plan(self, num_layers: int) -> LayerPlan:
        """The layer plan for a model of ``num_layers`` decoder layers."""
        return build_plan(None, self.method, num_layers=num_layers, profile=profile_for(self.method, self.profile),
                          min_length=self.min_length)


# ---------------------------------------------------------------- one request
@dataclass
class RequestRunner:
    """Runs one layer's method on the requests of a flat batch that pass the gate.

    Attributes:
        entry: the layer's plan entry.
        layer: the decoder layer index (for records and log lines).
        record: where selections are appended (JSON lines), or None.
    """

    entry: LayerEntry
    layer: int
    record: Path | None = None
    _chunks: bool = field(init=False)

    def __post_init__(self) -> None:
        self._chunks = self.entry.spec.method.chunks(self.entry.spec.config)

    def wants(self, span: RequestSpan) -> bool:
        """True when ``span`` is a prefill this layer may run sparsely (not a decode
        step, at or above the gate, not dense by its length alone)."""
        method, config = self.entry.spec.method, self.entry.spec.config
        if span.query_len <= 1 or span.seq_len < self.entry.min_length or method.runs_dense(config, span.seq_len):
            return False
        if span.context_len > 0 and not self._chunks:
            warn_once(logger, f"{self.entry.spec.label} does not take a chunk after a cached prefix: such chunks "
                      "run the engine's attention")
            return False
        return True

    def run(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, span: RequestSpan
    ) -> torch.Tensor | None:
        """The method on one request.

        Args:
            query: (Lq, H, D) the request's scheduled queries (after RoPE).
            key, value: (Lk, Hkv, D) all its keys/values, cached prefix first (Lq <= Lk).
            scale: the softmax scale.

        Returns:
            (Lq, H, Dv), or None when the method decides to attend densely.
        """
        method, config = self.entry.spec.method, self.entry.spec.config
        q = query.transpose(0, 1).unsqueeze(0)
        k = key.transpose(0, 1).unsqueeze(0)
        v = value.transpose(0, 1).unsqueeze(0)
        out, stats = method.prefill(q, k, v, config, scale=scale, key_padding_mask=None, layout="blhd")
        if self.record is not None and isinstance(stats, TokenSelection):
            self._append(span, stats)
        return None if out is None else out[0]

    def _append(self, span: RequestSpan, stats: TokenSelection) -> None:
        line = {
            "layer": self.layer,
            "request": span.index,
            "seq_len": span.seq_len,
            "query_len": span.query_len,
            "num_kept": stats.num_kept[0].tolist(),
            "dense": bool(stats.dense[0]),
        }
        with open(self.record, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The selections a run appended to ``path`` (``TOKENSPARSE_RECORD``), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


__all__ = [
    "ENV_METHOD",
    "ENV_MIN_LENGTH",
    "ENV_RECORD",
    "RequestSpan",
    "RequestRunner",
    "ServingSettings",
    "layer_index",
    "probe_block_order",
    "read_paged",
    "read_records",
    "span_rows",
    "split_batch",
    "sub_batch_offsets",
]
