"""tokensparse: Token Sparse Attention for long-context prefill.

Public API:
    TokenSparseConfig        frozen, validated settings
    token_sparse_attention   the op, a drop-in for causal SDPA
    select_tokens            the selection stage alone (scores, budget, top-k)
    TokenSelection           what select_tokens returns
    enable / disable         switch a transformers model to a method (spec, config or plan) and back
    prefill                  fill a KV cache chunk by chunk (token sparse after the cached prefix)
    methods                  the registry of attention methods and their spec strings
    build_plan / LayerPlan   which method runs in which decoder layer
    selection_report         per-layer, per-head kept counts of recorded prefills
    models.load              hub ids, local paths, and the embedded SmolLM2 ("smollm2")
    format_selection_report  a per-layer table of one recorded prefill
"""

from . import methods, models
from .attention import token_sparse_attention
from .config import TokenSparseConfig
from .integrations.transformers import disable, enable, prefill, selection_report
from .plan import LayerPlan, build_plan
from .report import format_selection_report, summarize_selection
from .selection import TokenSelection, select_tokens
from .version import __version__

__all__ = [
    "models",
    "methods",
    "LayerPlan",
    "build_plan",
    "TokenSparseConfig",
    "TokenSelection",
    "token_sparse_attention",
    "select_tokens",
    "enable",
    "disable",
    "prefill",
    "selection_report",
    "format_selection_report",
    "summarize_selection",
    "__version__",
]
