"""Token Sparse Attention as a registry method, and its compositions with block-sparse methods.

``token_sparse``: settings are the fields of :class:`tokensparse.TokenSparseConfig`;
``keep_ratio=`` or ``keep_tokens=`` alone imply the matching budget mode;
``sparse_layers`` is a list like ``15-29`` or ``3;5;7``. The label always shows
the coverage when the budget mode uses it.

``token_sparse+<inner>`` (registered by :func:`register_composition` for every
method with an ``inner`` op): Token Sparse selection, then the inner method on
the kept tokens; the layers that are not sparse run the inner method alone.
Settings: Token Sparse's fields, then the inner method's; ``backend`` applies to
both.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..attention import attend_selected, check_chunk_support
from ..config import TokenSparseConfig
from ..selection import select_tokens, static_dense
from .registry import (
    LAYERS_SPARSE,
    Method,
    MethodSpec,
    Settings,
    convert_settings,
    format_setting,
    get_method,
    register_method,
    spec_for,
)


def token_sparse_config(raw: Settings, method_name: str = "token_sparse") -> TokenSparseConfig:
    """A TokenSparseConfig from spec settings; errors name the bad key."""
    values = convert_settings(method_name, TokenSparseConfig, raw)
    if "budget" not in values:
        if "keep_ratio" in values:
            values["budget"] = "keep_ratio"
        elif "keep_tokens" in values:
            values["budget"] = "keep_tokens"
    return TokenSparseConfig(**values)


def token_sparse_settings(config: TokenSparseConfig) -> Settings:
    """Canonical settings: the non-default fields, and the coverage whenever the budget uses it."""
    default = TokenSparseConfig()
    uses_coverage = config.budget in ("coverage", "head_coverage")
    out: Settings = {}
    for name in config.to_dict():
        value = getattr(config, name)
        if name == "coverage" and not uses_coverage:
            continue
        if value != getattr(default, name) or name == "coverage":
            out[name] = format_setting(value)
    return out


def token_sparse_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: TokenSparseConfig,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    layout: str = "bhld",
    inner=None,
):
    """Select, attend on the kept tokens, decompress; ``(None, selection)`` when nothing is dropped
    and there is no inner attention (the caller's dense attention runs).

    query (B, H, Lq, D) may be a chunk after a cached prefix (Lq <= Lk, see
    :func:`tokensparse.token_sparse_attention`); the caller's dense attention
    must then be bottom-right causal."""
    check_chunk_support(query, key, inner)
    selection = select_tokens(query, key, config, scale=scale, key_padding_mask=key_padding_mask)
    if selection.kept_idx is None:
        if inner is None:
            return None, selection
        out = inner(query, key, value, scale=scale, key_padding_mask=key_padding_mask)
        return (out.transpose(1, 2) if layout == "blhd" else out), selection
    out = attend_selected(
        query, key, value, selection, scale=scale, backend=config.backend, layout=layout, config=config, inner=inner
    )
    return out, selection


TOKEN_SPARSE = register_method(
    Method(
        "token_sparse",
        config_type=TokenSparseConfig,
        prefill=token_sparse_prefill,
        runs_dense=lambda config, seq_len: static_dense(config, seq_len),
        chunks=lambda config: True,
        layers=LAYERS_SPARSE,
        sparse_layers=lambda config: config.sparse_layers,
        canonical=token_sparse_settings,
        parse=token_sparse_config,
        description="Token Sparse Attention; settings are TokenSparseConfig fields",
    )
)


@dataclass(frozen=True)
class CompositionConfig:
    """Token Sparse with another method's attention on the kept tokens.

    Attributes:
        token_sparse: the selection settings.
        inner: the inner method's spec (its name and config).
    """

    token_sparse: TokenSparseConfig
    inner: MethodSpec

    def __post_init__(self) -> None:
        if not isinstance(self.token_sparse, TokenSparseConfig):
            raise ValueError(f"CompositionConfig.token_sparse must be a TokenSparseConfig, got {self.token_sparse!r}")
        if not isinstance(self.inner, MethodSpec) or self.inner.method.inner is None:
            raise ValueError(f"CompositionConfig.inner must be the spec of a method with an inner op, got {self.inner!r}")

    @property
    def method_name(self) -> str:
        """The registry name of this composition."""
        return f"token_sparse+{self.inner.name}"


def register_composition(inner_name: str) -> Method:
    """Register ``token_sparse+<inner_name>`` for a registered method with an ``inner`` op."""
    inner_method = get_method(inner_name)
    if inner_method.inner is None or inner_method.config_type is None:
        raise ValueError(f"method {inner_name!r} has no inner op to compose with")
    name = f"token_sparse+{inner_name}"
    inner_fields = set(inner_method.config_type.__dataclass_fields__)
    outer_fields = set(TokenSparseConfig.__dataclass_fields__)

    def parse(raw: Settings) -> CompositionConfig:
        unknown = [k for k in raw if k not in inner_fields | outer_fields]
        if unknown:
            known = ", ".join(list(TokenSparseConfig.__dataclass_fields__) + sorted(inner_fields - outer_fields))
            raise ValueError(f"{name}: unknown setting {unknown[0]!r}; known settings: {known}")
        outer = token_sparse_config({k: v for k, v in raw.items() if k in outer_fields}, name)
        inner_raw = {k: v for k, v in raw.items() if k in inner_fields}
        if "backend" in inner_fields:
            inner_raw.setdefault("backend", outer.backend)
        inner_config = inner_method.config_type(**convert_settings(name, inner_method.config_type, inner_raw))
        return CompositionConfig(outer, spec_for(inner_name, inner_config))

    def canonical(config: CompositionConfig) -> Settings:
        out = token_sparse_settings(config.token_sparse)
        out.update({k: v for k, v in config.inner.settings if k not in out and k != "backend"})
        return out

    def prefill(query, key, value, config: CompositionConfig, **kwargs):
        inner_op = inner_method.inner(config.inner.config)
        return token_sparse_prefill(query, key, value, config.token_sparse, inner=inner_op, **kwargs)

    def runs_dense(config: CompositionConfig, seq_len: int) -> bool:
        return static_dense(config.token_sparse, seq_len) and inner_method.runs_dense(config.inner.config, seq_len)

    return register_method(
        Method(
            name,
            config_type=CompositionConfig,
            prefill=prefill,
            runs_dense=runs_dense,
            layers=LAYERS_SPARSE,
            sparse_layers=lambda config: config.token_sparse.sparse_layers,
            others=lambda config: config.inner,
            canonical=canonical,
            parse=parse,
            description=f"Token Sparse, then {inner_name} on the kept tokens ({inner_name} alone on the other layers)",
        )
    )


def composition_spec(inner: str | MethodSpec, config: TokenSparseConfig | None = None) -> MethodSpec:
    """The spec of ``token_sparse+<inner>`` with selection settings ``config``."""
    inner_spec = spec_for(inner) if isinstance(inner, str) else inner
    return spec_for(f"token_sparse+{inner_spec.name}", CompositionConfig(config or TokenSparseConfig(), inner_spec))


__all__ = [
    "CompositionConfig",
    "composition_spec",
    "register_composition",
    "token_sparse_config",
    "token_sparse_prefill",
    "token_sparse_settings",
]
