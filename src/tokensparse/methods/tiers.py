"""Tiers: different methods, or one method at different settings, on different layers.

A tiered spec joins method specs with ``|``::

    token_sparse:coverage=0.02,dropped_rows=local,sparse_layers=3-6;9-13 | token_sparse:keep_ratio=0.5,dropped_rows=local

Each decoder layer runs the first tier that has a method for it (see
:func:`tokensparse.plan.build_plan`); layers no tier takes run the model's own
attention. A tier takes the layers its spec would take alone, except that a
token-sparse tier after the first that names no ``sparse_layers`` takes every
layer left. So the example runs coverage 0.02 on layers 3-6 and 9-13 and keep
0.5 on all the others; with ``sparse_layers`` left out of the first tier too and
``profile="sensitivity"``, the first tier takes the profile's safe layers and
the second the fragile ones.

A tiered spec is a layer plan, not one attention op: the op-level entry points
(``bench attention``, ``bench overhead``) refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import LAYERS_SPARSE, TIER_SEPARATOR, TIERS, Method, MethodSpec, register_method


@dataclass(frozen=True)
class TiersConfig:
    """The tiers of a tiered spec, first match first.

    Attributes:
        tiers: two or more method specs, none of them dense or tiered itself.
    """

    tiers: tuple[MethodSpec, ...]

    def __post_init__(self) -> None:
        tiers = tuple(self.tiers) if isinstance(self.tiers, (list, tuple)) else None
        if tiers is None or len(tiers) < 2 or not all(isinstance(t, MethodSpec) for t in tiers):
            raise ValueError(f"TiersConfig.tiers must be two or more method specs, got {self.tiers!r}")
        for tier in tiers:
            if tier.name == TIERS:
                raise ValueError("a tier cannot itself be tiered")
            if tier.method.prefill is None:
                raise ValueError(
                    f"tier {tier.label!r} changes nothing: layers no tier takes run the model's own attention already"
                )
        object.__setattr__(self, "tiers", tiers)


def _refuse_op(*args, **kwargs):
    raise ValueError(
        "a tiered spec ('A | B') is a layer plan, not one attention op: give the op-level entry points one method"
    )


def _refuse_settings(raw):
    raise ValueError(f"write tiers as 'SPEC | SPEC', not with {TIERS}: settings")


TIERS_METHOD = register_method(
    Method(
        TIERS,
        config_type=TiersConfig,
        prefill=_refuse_op,
        layers=LAYERS_SPARSE,
        canonical=lambda config: {},
        label=lambda config: f" {TIER_SEPARATOR} ".join(t.label for t in config.tiers),
        parse=_refuse_settings,
        description="methods or settings per layer: 'SPEC | SPEC | ...', first tier that takes a layer runs it",
    )
)


def tiers_of(spec: MethodSpec) -> tuple[MethodSpec, ...]:
    """The tiers of ``spec``: its own tiers for a tiered spec, else ``(spec,)``."""
    return spec.config.tiers if spec.name == TIERS else (spec,)


__all__ = ["TIERS", "TIER_SEPARATOR", "TiersConfig", "tiers_of"]
