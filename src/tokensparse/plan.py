"""Which attention method runs in which decoder layer.

A :class:`LayerPlan` holds one entry per decoder layer: the method spec that
layer's prefill runs, or ``None`` for the model's own attention. It is built by
:func:`build_plan` alone and read by the one transformers attention function
(:mod:`tokensparse.integrations.transformers`).

For a method that runs on sparse layers (``token_sparse`` and its compositions)
those layers come from, in this order: the config's ``sparse_layers``; the
``profile`` argument (a drift profile: its calm layers; a sensitivity profile,
or ``"sensitivity"`` for the one shipped for the model: the layers whose KL is
at most 1e-3); a drift profile shipped with the package whose model identity
matches; else the second half of the layers (the paper's fallback), with a
warning once. The other layers run what the method names for them (the inner
method of a composition, the model's own attention for plain token sparse).
Methods that run everywhere (``flexprefill``, ``xattention``) take every layer.
A tiered spec (``A | B``, :mod:`tokensparse.methods.tiers`) gives each layer the
entry of its first tier that has one; only the first tier reads ``profile``,
and a later token-sparse tier that names no layers takes every layer left.

Every entry may also carry a minimum prompt length: shorter prefills run the
model's own attention with no selection work at all (the length gate);
``min_length="auto"`` takes each method's measured crossover length
(``data/min_lengths.json``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .log import warn_once
from .methods import MethodSpec, as_spec, tiers_of
from .methods.registry import LAYERS_SPARSE
from .profile import LayerProfile, ModelIdentity, find_profile, load_profile, profile_kind, read_profile_json
from .sensitivity import DEFAULT_MAX_KL, SENSITIVITY_KIND, SensitivityProfile, find_sensitivity_profile, safe_layers

SHIPPED_SENSITIVITY = "sensitivity"
AUTO = "auto"
_MIN_LENGTHS = Path(__file__).parent / "data" / "min_lengths.json"


@functools.cache
def measured_min_lengths() -> dict[str, int]:
    """Method name -> the measured crossover length of the length gate (``min_length="auto"``)."""
    return {name: int(n) for name, n in json.loads(_MIN_LENGTHS.read_text())["min_length"].items()}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerEntry:
    """What one decoder layer runs during prefill.

    Attributes:
        spec: the method.
        min_length: prefills of fewer key tokens run the model's own attention.
    """

    spec: MethodSpec
    min_length: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, MethodSpec):
            raise ValueError(f"LayerEntry.spec must be a MethodSpec, got {type(self.spec).__name__}")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or self.min_length < 0:
            raise ValueError(f"LayerEntry.min_length must be an integer >= 0, got {self.min_length!r}")


@dataclass(frozen=True)
class LayerPlan:
    """One entry per decoder layer (``None``: the model's own attention).

    Attributes:
        layers: entry of decoder layer i at index i.
        method: the spec the plan was built from (labels results).
    """

    layers: tuple[LayerEntry | None, ...]
    method: MethodSpec

    def entry(self, layer_idx: int) -> LayerEntry | None:
        return self.layers[layer_idx] if 0 <= layer_idx < len(self.layers) else None

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Layers that select tokens (token sparse or a composition, of any tier)."""
        return tuple(i for i, e in enumerate(self.layers) if e is not None and e.spec.method.layers == LAYERS_SPARSE)

    def with_min_length(self, min_length: "int | dict[str, int] | str") -> "LayerPlan":
        """The same plan with a length gate: one length for every entry, one per method name,
        or ``"auto"``: the crossover measured for each method (:func:`measured_min_lengths`)."""
        if min_length == AUTO:
            min_length = measured_min_lengths()
        elif isinstance(min_length, str):
            raise ValueError(f"min_length must be an integer >= 0, a dict of them or 'auto', got {min_length!r}")

        def gate(entry: LayerEntry | None) -> LayerEntry | None:
            if entry is None:
                return None
            length = min_length.get(entry.spec.name, entry.min_length) if isinstance(min_length, dict) else min_length
            return LayerEntry(entry.spec, length)

        return LayerPlan(tuple(gate(e) for e in self.layers), self.method)

    def describe(self) -> list[tuple[str, list[int]]]:
        """(label, layers) groups, in order of first appearance; "own attention" for None."""
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(self.layers):
            label = "own attention" if e is None else e.spec.label + (f" (>= {e.min_length} tokens)" if e.min_length else "")
            groups.setdefault(label, []).append(i)
        return list(groups.items())


def build_plan(
    model: Any,
    method: "str | MethodSpec | Any",
    *,
    num_layers: int | None = None,
    profile: "LayerProfile | str | os.PathLike | None" = None,
    min_length: "int | dict[str, int] | str" = 0,
) -> LayerPlan:
    """The layer plan of ``method`` on ``model``.

    Args:
        model: a transformers model (for its layer count and identity), or None
            with ``num_layers`` and a method that names its layers.
        method: a spec string, a :class:`MethodSpec`, or a method config
            (e.g. a :class:`tokensparse.TokenSparseConfig`).
        num_layers: number of decoder layers (default: read from the model).
        profile: for the sparse layers, when the method's config does not name
            them: a drift or sensitivity profile (object or JSON path), or
            ``"sensitivity"`` for the sensitivity profile shipped for the model.
        min_length: the length gate: one length for every entry, one per method
            name, or ``"auto"`` for the crossovers measured on the H200.
    """
    spec = as_spec(method)
    if num_layers is None:
        num_layers = _num_layers(model)
    layers: list[LayerEntry | None] = [None] * num_layers
    for i, tier in enumerate(tiers_of(spec)):
        taken = _tier_layers(model, tier, num_layers, profile if i == 0 else None, first=i == 0)
        if tier is not spec and not any(new is not None and old is None for old, new in zip(layers, taken)):
            raise ValueError(f"tier {tier.label!r} runs on no layer: the tiers before it take every layer it would")
        layers = [old if old is not None else new for old, new in zip(layers, taken)]
    return LayerPlan(tuple(layers), spec).with_min_length(min_length)


def reads_profile(method: "str | MethodSpec | Any") -> bool:
    """True when :func:`build_plan` takes the layers of ``method`` from a profile: its first
    tier selects tokens and names no ``sparse_layers``. Other methods refuse ``profile``."""
    first = tiers_of(as_spec(method))[0]
    return first.method.layers == LAYERS_SPARSE and first.method.sparse_layers(first.config) is None


def profile_for(method: "str | MethodSpec | Any", profile: Any) -> Any:
    """``profile`` where ``method`` reads one (:func:`reads_profile`), else None: for the entry
    points that run many methods under one ``--profile``."""
    return profile if reads_profile(method) else None


def _tier_layers(
    model: Any, spec: MethodSpec, num_layers: int, profile: Any, *, first: bool
) -> list[LayerEntry | None]:
    """The entries ``spec`` alone gives each layer; a token-sparse tier after the first
    that names no layers takes them all (the tiers before it have taken theirs)."""
    method = spec.method
    if method.prefill is None:
        return [None] * num_layers
    if method.layers != LAYERS_SPARSE:
        if profile is not None:
            raise ValueError(f"method {spec.name!r} runs on every layer; it takes no profile")
        return [LayerEntry(spec)] * num_layers
    named = method.sparse_layers(spec.config)
    if named is not None and profile is not None:
        raise ValueError("pass either the config's sparse_layers or profile, not both")
    if named is None and not first:
        named = tuple(range(num_layers))
    sparse = set(named if named is not None else _profile_layers(model, profile, num_layers))
    bad = sorted(i for i in sparse if i >= num_layers)
    if bad:
        raise ValueError(f"config.sparse_layers has indices {bad} beyond the model's {num_layers} layers")
    other = method.others(spec.config)
    return [LayerEntry(spec) if i in sparse else (None if other is None else LayerEntry(other))
            for i in range(num_layers)]


def _num_layers(model: Any) -> int:
    if model is None:
        raise ValueError("build_plan needs a model or num_layers")
    config = model.config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError("the model's config has no num_hidden_layers; pass num_layers")
    return count


def _load_any_profile(model: Any, profile: Any) -> "LayerProfile | SensitivityProfile":
    if profile == SHIPPED_SENSITIVITY:
        found = find_sensitivity_profile(model) if model is not None else None
        if found is None:
            raise ValueError(
                "no sensitivity profile is shipped for this model; run `tokensparse sensitivity --model NAME_OR_PATH` "
                "and pass profile=PATH"
            )
        return found
    if isinstance(profile, (LayerProfile, SensitivityProfile)):
        return profile
    if profile_kind(read_profile_json(profile)) == SENSITIVITY_KIND:
        return SensitivityProfile.load(profile)
    return load_profile(profile)


def _profile_layers(model: Any, profile: Any, num_layers: int) -> tuple[int, ...]:
    if profile is not None:
        loaded = _load_any_profile(model, profile)
        if loaded.model.num_layers != num_layers:
            raise ValueError(
                f"profile was measured on a model of {loaded.model.num_layers} layers, this model has {num_layers}"
            )
        if model is not None and not loaded.model.same_architecture(ModelIdentity.from_model(model)):
            warn_once(logger, f"the profile was measured on {loaded.model.name or loaded.model.architecture!r}, "
                      "a model with a different identity; using its layers anyway")
        if isinstance(loaded, SensitivityProfile):
            return safe_layers(loaded, max_kl=DEFAULT_MAX_KL)
        return loaded.sparse_layers
    shipped = find_profile(model) if model is not None else None
    if shipped is not None:
        logger.info("using the shipped layer profile for %s: %s", shipped.model.name, list(shipped.sparse_layers))
        return shipped.sparse_layers
    fallback = tuple(range(num_layers // 2, num_layers))
    what = "this model"
    if model is not None:
        identity = ModelIdentity.from_model(model)
        what = f"this model ({identity.architecture}, {identity.num_layers} layers, name {identity.name!r})"
    warn_once(
        logger,
        f"no layer profile for {what}: using the second half of the layers, {list(fallback)}; "
        "run `tokensparse profile --model NAME_OR_PATH` and pass enable(..., profile=PATH)",
    )
    return fallback


__all__ = ["LayerEntry", "LayerPlan", "build_plan", "measured_min_lengths", "profile_for", "reads_profile"]
