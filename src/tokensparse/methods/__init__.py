"""Attention methods: one registry, one module per method.

``dense`` (the model's own attention), ``token_sparse`` (Token Sparse Attention,
zero or sink + local rows), ``flexprefill`` and ``xattention`` (block-sparse), the
compositions ``token_sparse+flexprefill`` / ``token_sparse+xattention`` (Token
Sparse selection with the block-sparse method on the kept tokens), and tiers of
them on different layers (``SPEC | SPEC``, :mod:`tokensparse.methods.tiers`).
Every entry point takes their spec strings, see :mod:`tokensparse.methods.registry`.
"""

from . import dense, flexprefill, tiers, token_sparse, xattention
from .registry import (
    Method,
    MethodSpec,
    as_spec,
    get_method,
    known_methods,
    parse_method,
    parse_methods,
    register_method,
    spec_for,
)
from .tiers import TiersConfig, tiers_of
from .token_sparse import CompositionConfig, composition_spec, register_composition

for _inner in ("flexprefill", "xattention"):
    register_composition(_inner)

__all__ = [
    "Method",
    "MethodSpec",
    "CompositionConfig",
    "TiersConfig",
    "as_spec",
    "composition_spec",
    "get_method",
    "known_methods",
    "parse_method",
    "parse_methods",
    "register_method",
    "register_composition",
    "spec_for",
    "tiers_of",
    "dense",
    "flexprefill",
    "tiers",
    "token_sparse",
    "xattention",
]
