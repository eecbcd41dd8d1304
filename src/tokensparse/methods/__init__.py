"""Attention methods: one registry, one module per method.

``dense`` (the model's own attention), ``token_sparse`` (Token Sparse Attention,
zero or sink + local rows), ``flexprefill`` and ``xattention`` (block-sparse), and
the compositions ``token_sparse+flexprefill`` / ``token_sparse+xattention`` (Token
Sparse selection with the block-sparse method on the kept tokens). Every entry
point takes their spec strings, see :mod:`tokensparse.methods.registry`.
"""

from . import dense, flexprefill, token_sparse, xattention
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
from .token_sparse import CompositionConfig, composition_spec, register_composition

for _inner in ("flexprefill", "xattention"):
    register_composition(_inner)

__all__ = [
    "Method",
    "MethodSpec",
    "CompositionConfig",
    "as_spec",
    "composition_spec",
    "get_method",
    "known_methods",
    "parse_method",
    "parse_methods",
    "register_method",
    "register_composition",
    "spec_for",
    "dense",
    "flexprefill",
    "token_sparse",
    "xattention",
]
