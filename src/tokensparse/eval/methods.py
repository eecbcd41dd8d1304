"""Attention methods an evaluation compares, and their spec strings.

A method spec is ``name`` or ``name:key=value,key=value``, e.g. ``dense``,
``token_sparse`` (coverage 0.005), ``token_sparse:coverage=0.02`` or
``token_sparse:budget=keep_ratio,keep_ratio=0.5``. For ``token_sparse`` the keys
are the fields of :class:`tokensparse.TokenSparseConfig`; ``keep_ratio=`` or
``keep_tokens=`` alone imply the matching budget mode; ``sparse_layers`` is a
list like ``15-29`` or ``3;5;7``.

Each spec has a canonical label (settings that differ from the defaults, in field
order, plus the coverage whenever the budget mode uses it), which keys result
files, so ``token_sparse`` and ``token_sparse:coverage=0.005`` are the same method.

Adding a method is one :func:`register_method` call: a function that enables it
on a model and one that disables it, plus (optionally) a settings parser and a
reader of the per-layer selection record.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..config import TokenSparseConfig

Settings = dict[str, str]


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Attributes:
        name: the name used in specs.
        enable: ``enable(model, config)`` switches the model to the method; ``config``
            is what ``parse`` returned.
        disable: ``disable(model)`` undoes ``enable``.
        parse: ``parse(settings) -> (config, canonical settings)``; settings are the
            raw ``key=value`` strings of the spec. The default accepts none.
        selection: ``selection(model)`` returns and clears the per-prefill records
            (list of {layer: LayerRecord}) of the prefills since the last call, or
            None when the method keeps none.
        description: one line for help texts.
    """

    name: str
    enable: Callable[[Any, Any], None]
    disable: Callable[[Any], None]
    parse: Callable[[Settings], tuple[Any, Settings]] | None = None
    selection: Callable[[Any], list[dict[int, Any]]] | None = None
    description: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec.

    Attributes:
        name: method name (a registry key).
        config: the method's settings object: a TokenSparseConfig for token_sparse,
            None for dense.
        settings: canonical settings (strings), the part of the label after ':'.
    """

    name: str
    config: Any
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """Canonical spec string, e.g. ``token_sparse:coverage=0.02``."""
        if not self.settings:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.settings)

    @property
    def slug(self) -> str:
        """The label as a file name."""
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", self.label.replace(":", "__").replace("=", "-"))

    @property
    def method(self) -> Method:
        return get_method(self.name)


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace`` to overwrite an entry)."""
    if not re.fullmatch(r"[A-Za-z0-9_+.-]+", method.name):
        raise ValueError(f"method name {method.name!r} may hold only letters, digits and _+.-")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def known_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return _REGISTRY[name]


def parse_method(spec: str) -> MethodSpec:
    """Parse one spec string ``name[:key=value,...]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    method = get_method(name.strip())
    raw: Settings = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method {method.name!r}: setting {item!r} is not key=value")
        if key.strip() in raw:
            raise ValueError(f"method {method.name!r}: setting {key.strip()!r} given twice")
        raw[key.strip()] = value.strip()
    if method.parse is None:
        if raw:
            raise ValueError(f"method {method.name!r} takes no settings, got {sorted(raw)}")
        return MethodSpec(method.name, None, ())
    config, canonical = method.parse(raw)
    return MethodSpec(method.name, config, tuple(canonical.items()))


def spec_for(name: str, config: Any = None) -> MethodSpec:
    """The spec of method ``name`` run with ``config`` (a settings object built in
    code), so results made outside an eval (benchmarks) carry the eval's label."""
    if config is None:
        return parse_method(name)
    default = type(config)()
    raw = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "attention" or value == getattr(default, field.name):
            continue
        raw[field.name] = ";".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return parse_method(name + (":" + ",".join(f"{k}={v}" for k, v in raw.items()) if raw else ""))


def parse_methods(text: str | list[str]) -> list[MethodSpec]:
    """Parse a comma-separated list of specs (or a list of such strings).

    A piece with '=' but no ':' continues the previous spec's settings, so
    ``dense,token_sparse:budget=keep_ratio,keep_ratio=0.5`` is two methods.
    Duplicates (same label) are dropped.
    """
    parts = [text] if isinstance(text, str) else list(text)
    specs: list[str] = []
    for part in parts:
        for piece in filter(None, (p.strip() for p in part.split(","))):
            if "=" in piece and ":" not in piece:
                if not specs:
                    raise ValueError(f"setting {piece!r} comes before any method name")
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    if not specs:
        raise ValueError(f"no methods given; known methods: {', '.join(known_methods())}")
    out: dict[str, MethodSpec] = {}
    for spec in specs:
        parsed = parse_method(spec)
        out.setdefault(parsed.label, parsed)
    return list(out.values())


# ---------------------------------------------------------------- dense
def _dense_enable(model: Any, config: Any) -> None:
    del model, config  # the model as loaded is the reference


def _dense_disable(model: Any) -> None:
    del model


# ---------------------------------------------------------------- token_sparse
def _to_int_list(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, re.split(r"[;+ ]", text)):
        if "-" in part:
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _convert(field: dataclasses.Field, value: str) -> Any:
    hint = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if value.lower() == "none" and "None" in hint:
        return None
    if field.name == "sparse_layers":
        return _to_int_list(value)
    if hint.startswith("float"):
        return float(value)
    if hint.startswith("int"):
        return int(value)
    return value


def token_sparse_settings(raw: Settings) -> tuple[TokenSparseConfig, Settings]:
    """Build a TokenSparseConfig from spec settings; errors name the bad key."""
    fields = {f.name: f for f in dataclasses.fields(TokenSparseConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"token_sparse: unknown setting {key!r}; known settings: {', '.join(fields)}")
        try:
            values[key] = _convert(fields[key], value)
        except ValueError:
            raise ValueError(f"token_sparse: setting {key!r} has a bad value {value!r}") from None
    if "budget" not in values:
        if "keep_ratio" in values:
            values["budget"] = "keep_ratio"
        elif "keep_tokens" in values:
            values["budget"] = "keep_tokens"
    config = TokenSparseConfig(**values)
    default = TokenSparseConfig()
    canonical: Settings = {}
    uses_coverage = config.budget in ("coverage", "head_coverage")
    for name in fields:
        value = getattr(config, name)
        if name == "coverage" and not uses_coverage:
            continue
        if value != getattr(default, name) or (name == "coverage" and uses_coverage):
            if name == "sparse_layers":
                canonical[name] = ";".join(str(i) for i in value)
            else:
                canonical[name] = f"{value:g}" if isinstance(value, float) else str(value)
    return config, canonical


def _token_sparse_enable(model: Any, config: TokenSparseConfig) -> None:
    from ..integrations.transformers import enable

    enable(model, config, record=True)


def _token_sparse_disable(model: Any) -> None:
    from ..integrations.transformers import disable

    disable(model)


def _token_sparse_selection(model: Any) -> list[dict[int, Any]]:
    from ..integrations.transformers import selection_report

    return selection_report(model, clear=True)


register_method(Method("dense", _dense_enable, _dense_disable, description="the model's own attention (SDPA)"))
register_method(
    Method(
        "token_sparse",
        _token_sparse_enable,
        _token_sparse_disable,
        parse=token_sparse_settings,
        selection=_token_sparse_selection,
        description="Token Sparse Attention; settings are TokenSparseConfig fields",
    )
)


def _flexprefill_enable(model: Any, config: Any) -> None:
    from ..integrations.flexprefill import enable_flexprefill

    enable_flexprefill(model, config)


def _flexprefill_disable(model: Any) -> None:
    from ..integrations.flexprefill import disable_flexprefill

    disable_flexprefill(model)


def _flexprefill_settings(raw: Settings) -> tuple[Any, Settings]:
    from ..integrations.flexprefill import flexprefill_settings

    return flexprefill_settings(raw)


def _composition_settings(raw: Settings) -> tuple[TokenSparseConfig, Settings]:
    if "attention" in raw:
        raise ValueError("token_sparse+flexprefill: 'attention' is fixed to flexprefill")
    config, settings = token_sparse_settings(raw)
    return config.replace(attention="flexprefill"), settings


register_method(
    Method(
        "flexprefill",
        _flexprefill_enable,
        _flexprefill_disable,
        parse=_flexprefill_settings,
        description="FlexPrefill block-sparse attention on every layer (gamma, tau, min_budget, block_size, backend)",
    )
)
register_method(
    Method(
        "token_sparse+flexprefill",
        _token_sparse_enable,
        _token_sparse_disable,
        parse=_composition_settings,
        selection=_token_sparse_selection,
        description="Token Sparse, then FlexPrefill on the kept tokens; settings are TokenSparseConfig fields",
    )
)


def sparse_layers(model: Any) -> tuple[int, ...]:
    """Sparse layers of a model with tokensparse enabled (empty if it is not)."""
    from ..integrations.transformers import sparse_layers_of

    try:
        return sparse_layers_of(model)
    except ValueError:
        return ()


__all__ = [
    "Method",
    "MethodSpec",
    "register_method",
    "known_methods",
    "get_method",
    "parse_method",
    "parse_methods",
    "spec_for",
    "token_sparse_settings",
    "sparse_layers",
]
