"""Configuration of Token Sparse Attention.

Defaults are the reference hyperparameters of the paper (coverage tau 0.005,
observation window 128, pooling kernel 7, at least 1024 prefix tokens kept).
The attention that runs on the kept tokens is not a field here: a composition
(``token_sparse+flexprefill``, ``token_sparse+xattention``) is a method of
:mod:`tokensparse.methods` that passes its inner attention to the op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BUDGET_MODES = ("coverage", "head_coverage", "keep_ratio", "keep_tokens")
DROPPED_ROWS = ("zero", "local")


@dataclass(frozen=True)
class TokenSparseConfig:
    """Settings of Token Sparse Attention for one model.

    Attributes:
        coverage: tau, the share of the window's attention mass (after pooling and
            averaging over heads) that may be dropped, in [0, 1). 0 keeps every token.
            Used by the ``coverage`` and ``head_coverage`` budget modes.
        window: W, number of trailing queries that score the prefix tokens. The W
            window tokens are always kept.
        kernel_size: width of the average pool that smooths scores along the
            sequence (odd, zeros padded and counted, as ``avg_pool1d`` does).
        min_tokens: floor on the number of prefix tokens each head keeps. Sequences
            of ``window + min_tokens`` tokens or fewer run dense.
        max_tokens: optional cap on the number of prefix tokens each head keeps,
            applied after every budget mode (``None``: no cap). The floor wins
            where the two disagree.
        budget: how many tokens each head keeps:
            ``coverage``: one count per sequence from the head-averaged coverage
            rule (the paper's Dynamic Token Coverage);
            ``head_coverage``: each head keeps tokens until its own dropped mass
            would exceed ``coverage``;
            ``keep_ratio``: a fixed share ``keep_ratio`` of the prefix tokens;
            ``keep_tokens``: a fixed count ``keep_tokens`` of prefix tokens.
        keep_ratio: share of prefix tokens kept in ``keep_ratio`` mode, in (0, 1].
        keep_tokens: prefix tokens kept in ``keep_tokens`` mode, >= 1.
        sparse_layers: indices of the decoder layers that use the method; ``None``
            means a layer profile or the fallback (the second half of the layers)
            decides when the config is applied to a model.
        backend: ``"auto"`` (Triton kernels on CUDA tensors, PyTorch elsewhere),
            ``"triton"`` or ``"torch"``.
        dropped_rows: what the rows of tokens a head did not keep get:
            ``"zero"`` (the paper: the token skips the layer's attention) or
            ``"local"`` (sink + local attention,
            :mod:`tokensparse.local_attention`: the first ``local_block`` tokens
            and the row's own and previous block of ``local_block`` tokens; linear
            in the length).
        local_block: the block of ``dropped_rows="local"``, a positive multiple of 16.
    """

    coverage: float = 0.005
    window: int = 128
    kernel_size: int = 7
    min_tokens: int = 1024
    max_tokens: int | None = None
    budget: str = "coverage"
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    sparse_layers: tuple[int, ...] | None = None
    backend: str = "auto"
    dropped_rows: str = "zero"
    local_block: int = 64

    def __new__(cls, *args: Any, **kwargs: Any) -> "TokenSparseConfig":
        # The generated __init__ would raise TypeError for an unknown keyword; users
        # building configs from files expect a ValueError that names the field.
        known = {f.name for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name not in known:
                raise ValueError(
                    f"TokenSparseConfig: unknown field {name!r}; expected one of {sorted(known)}"
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ValueError(
                f"TokenSparseConfig.{field} must be {expected}, got {getattr(self, field)!r}"
            )

        if not _is_real(self.coverage) or not 0.0 <= self.coverage < 1.0:
            fail("coverage", "a number in [0, 1)")
        if not _is_int(self.window) or self.window < 1:
            fail("window", "an integer >= 1")
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail("kernel_size", "an odd integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "None or an integer >= 1")
        if self.budget not in BUDGET_MODES:
            fail("budget", f"one of {BUDGET_MODES}")
        if self.budget == "keep_ratio":
            if not _is_real(self.keep_ratio) or not 0.0 < self.keep_ratio <= 1.0:
                fail("keep_ratio", "a number in (0, 1] when budget='keep_ratio'")
        elif self.keep_ratio is not None:
            fail("keep_ratio", "None unless budget='keep_ratio'")
        if self.budget == "keep_tokens":
            if not _is_int(self.keep_tokens) or self.keep_tokens < 1:
                fail("keep_tokens", "an integer >= 1 when budget='keep_tokens'")
        elif self.keep_tokens is not None:
            fail("keep_tokens", "None unless budget='keep_tokens'")
        if self.sparse_layers is not None:
            layers = self.sparse_layers
            iterable = isinstance(layers, (list, tuple, set, frozenset, range))
            if not iterable or not all(_is_int(i) and i >= 0 for i in layers):
                fail("sparse_layers", "None or a sequence of layer indices >= 0")
            # Normalise lists (e.g. from JSON) to a sorted tuple so the config stays hashable.
            object.__setattr__(self, "sparse_layers", tuple(sorted(set(int(i) for i in layers))))
        if self.backend not in ("auto", "triton", "torch"):
            fail("backend", "one of 'auto', 'triton', 'torch'")
        if self.dropped_rows not in DROPPED_ROWS:
            fail("dropped_rows", f"one of {DROPPED_ROWS}")
        if not _is_int(self.local_block) or self.local_block < 16 or self.local_block % 16:
            fail("local_block", "a positive multiple of 16")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TokenSparseConfig":
        """Build a config from a mapping (e.g. parsed JSON); unknown keys raise ValueError."""
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.sparse_layers is not None:
            out["sparse_layers"] = list(self.sparse_layers)
        return out

    def replace(self, **changes: Any) -> "TokenSparseConfig":
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
