"""The registry of attention methods and their spec strings.

A method spec is ``name`` or ``name:key=value,key=value``, e.g. ``dense``,
``token_sparse`` (coverage 0.005), ``token_sparse:keep_ratio=0.5,dropped_rows=local``,
``flexprefill:gamma=0.9`` or ``token_sparse+xattention:coverage=0.02``. The keys
are the fields of the method's config dataclass. Every entry point (the
transformers integration, ``eval``, ``bench attention``, ``bench prefill``,
``demo``) takes the same strings.

Each spec has a canonical label (the settings that differ from the defaults, in
field order; a method may add settings it always shows), which keys result
files, so ``token_sparse`` and ``token_sparse:coverage=0.005`` are one method.

A method is one module that builds a :class:`Method` and calls
:func:`register_method`; nothing else needs to know it exists.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

Settings = dict[str, str]
TIERS = "tiers"  # the method of tiered specs, registered by tokensparse.methods.tiers
TIER_SEPARATOR = "|"
LAYERS_ALL = "all"
LAYERS_SPARSE = "sparse"


@dataclass(frozen=True)
class Method:
    """One attention method.

    Attributes:
        name: the name used in specs.
        config_type: the frozen dataclass of its settings; ``None`` for a method
            without settings (its config is ``None``).
        prefill: the op-level prefill, ``prefill(query, key, value, config, *, scale,
            key_padding_mask, layout) -> (out, stats)``: query (B, H, L, D), key/value
            (B, Hkv, L, D), key_padding_mask (B, L) bool left padding or None, layout
            ``"bhld"`` or ``"blhd"`` for the output. ``out`` is ``None`` when the
            method decides at run time to attend densely (the caller then runs its
            own dense attention, so outputs equal it bitwise); ``stats`` is what the
            method can report (a :class:`tokensparse.TokenSelection`, a block
            pattern) or None. ``None`` for the method that changes nothing (dense).
        runs_dense: ``runs_dense(config, seq_len)``: True when a call of that length
            would attend densely whatever its values, so callers skip all selection
            work (e.g. prompts shorter than the method's minimum budget).
        inner: ``inner(config)`` returns the method's op as the attention on Token
            Sparse's kept tokens (:class:`tokensparse.attention.InnerAttention`);
            ``None`` if the method cannot serve there.
        estimate: ``estimate(query, key, config)`` -> the block pattern alone, for
            block-sparse methods (benchmarks time it apart from the kernel).
        chunks: ``chunks(config)``: True when ``prefill`` takes a chunk after a cached
            prefix (query (B, H, Lq, D) at the last Lq of Lk key positions);
            otherwise such calls run the caller's own attention.
        layers: ``"all"``: the method runs on every decoder layer;
            ``"sparse"``: on the model's sparse layers (from ``sparse_layers(config)``,
            else a layer profile), with ``others(config)`` on the rest.
        sparse_layers: ``sparse_layers(config)`` -> the layer indices the config
            names, or None.
        others: ``others(config)`` -> the spec the non-sparse layers run (None: the
            model's own attention).
        canonical: ``canonical(config)`` -> canonical settings; default: the fields
            that differ from the defaults.
        label: ``label(config)`` -> the whole spec string, for a method whose
            specs are not ``name:settings`` (tiers); default: None.
        parse: ``parse(raw)`` -> config from the raw ``key=value`` strings; default:
            the config dataclass's fields, converted by their type.
        description: one line for help texts.
    """

    name: str
    config_type: type | None = None
    prefill: Callable[..., tuple[Any, Any]] | None = None
    runs_dense: Callable[[Any, int], bool] = lambda config, seq_len: False
    inner: Callable[[Any], Callable[..., Any]] | None = None
    estimate: Callable[..., Any] | None = None
    chunks: Callable[[Any], bool] = lambda config: False
    layers: str = LAYERS_ALL
    sparse_layers: Callable[[Any], tuple[int, ...] | None] = lambda config: None
    others: Callable[[Any], "MethodSpec | None"] = lambda config: None
    canonical: Callable[[Any], Settings] | None = None
    label: Callable[[Any], str] | None = None
    parse: Callable[[Settings], Any] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_+.-]+", self.name):
            raise ValueError(f"method name {self.name!r} may hold only letters, digits and _+.-")
        if self.layers not in (LAYERS_ALL, LAYERS_SPARSE):
            raise ValueError(f"Method.layers must be {LAYERS_ALL!r} or {LAYERS_SPARSE!r}, got {self.layers!r}")

    def build(self, raw: Settings) -> Any:
        """The config of the raw spec settings (errors name the method and the key)."""
        if self.parse is not None:
            return self.parse(raw)
        if self.config_type is None:
            if raw:
                raise ValueError(f"method {self.name!r} takes no settings, got {sorted(raw)}")
            return None
        return self.config_type(**convert_settings(self.name, self.config_type, raw))

    def settings(self, config: Any) -> Settings:
        """Canonical settings of ``config``."""
        if self.canonical is not None:
            return self.canonical(config)
        return non_default_settings(config)


@dataclass(frozen=True)
class MethodSpec:
    """A method with its settings.

    Attributes:
        name: method name (a registry key).
        config: the method's settings object (an instance of its ``config_type``,
            None for a method without settings).
        settings: canonical settings (strings), the part of the label after ':'.
    """

    name: str
    config: Any
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """Canonical spec string, e.g. ``token_sparse:coverage=0.02``."""
        if self.method.label is not None:
            return self.method.label(self.config)
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

    def __str__(self) -> str:
        return self.label


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace`` to overwrite an entry)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def known_methods() -> list[str]:
    """Names a spec may start with (tiers are written ``SPEC | SPEC``, not by name)."""
    return sorted(name for name in _REGISTRY if name != TIERS)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return _REGISTRY[name]


def parse_method(spec: str) -> MethodSpec:
    """Parse one spec string ``name[:key=value,...]``, or tiers of them joined by ``|``
    (:mod:`tokensparse.methods.tiers`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method spec must be a non-empty string, got {spec!r}")
    if TIER_SEPARATOR in spec:
        tiers = get_method(TIERS)
        return spec_for(TIERS, tiers.config_type(tuple(parse_method(part) for part in spec.split(TIER_SEPARATOR))))
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
    return spec_for(method.name, method.build(raw))


def spec_for(name: str, config: Any = None) -> MethodSpec:
    """The spec of method ``name`` run with ``config`` (a settings object built in
    code; None: the method's defaults), labelled as the same spec string would be."""
    method = get_method(name)
    if config is None and method.config_type is not None:
        config = method.build({})
    if method.config_type is not None and not isinstance(config, method.config_type):
        raise ValueError(
            f"method {name!r} takes a {method.config_type.__name__}, got {type(config).__name__}"
        )
    return MethodSpec(method.name, config, tuple(method.settings(config).items()) if config is not None else ())


def as_spec(method: "str | MethodSpec | Any") -> MethodSpec:
    """A spec from a spec string, a MethodSpec, or a config object of a registered method."""
    if isinstance(method, MethodSpec):
        return method
    if isinstance(method, str):
        return parse_method(method)
    if isinstance(getattr(method, "method_name", None), str):
        return spec_for(method.method_name, method)
    for entry in _REGISTRY.values():
        if entry.config_type is not None and type(method) is entry.config_type:
            return spec_for(entry.name, method)
    raise ValueError(
        f"expected a method: a spec string, a MethodSpec, a TokenSparseConfig or another method's config; "
        f"got {type(method).__name__}"
    )


def parse_methods(text: str | list[str]) -> list[MethodSpec]:
    """Parse a comma-separated list of specs (or a list of such strings).

    A piece with '=' but no ':' continues the previous spec's settings, so
    ``dense,token_sparse:budget=keep_ratio,keep_ratio=0.5`` is two methods; what
    follows a ``|`` is the next tier of the same spec.
    Duplicates (same label) are dropped.
    """
    parts = [text] if isinstance(text, str) else list(text)
    specs: list[str] = []
    for part in parts:
        for piece in filter(None, (p.strip() for p in part.split(","))):
            head, *tiers = (t.strip() for t in piece.split(TIER_SEPARATOR))
            if head and "=" in head and ":" not in head:
                if not specs:
                    raise ValueError(f"setting {head!r} comes before any method name")
                specs[-1] += "," + head
            elif head:
                specs.append(head)
            if tiers and not specs:
                raise ValueError(f"{piece!r}: a '{TIER_SEPARATOR}' comes before any method name")
            for tier in tiers:
                specs[-1] += f" {TIER_SEPARATOR} " + tier
    if not specs:
        raise ValueError(f"no methods given; known methods: {', '.join(known_methods())}")
    out: dict[str, MethodSpec] = {}
    for spec in specs:
        parsed = parse_method(spec)
        out.setdefault(parsed.label, parsed)
    return list(out.values())


def parse_op_methods(text: str | list[str]) -> list[MethodSpec]:
    """:func:`parse_methods` for the entry points that time one attention op: ``dense``
    left out (they always time it), tiered specs refused (they are layer plans)."""
    specs = [s for s in parse_methods(text) if s.name != "dense"]
    tiered = [s.label for s in specs if s.name == TIERS]
    if tiered:
        raise ValueError(f"methods: {tiered[0]!r} is a layer plan (tiers); this benchmark times one method per op")
    return specs


# ---------------------------------------------------------------- settings <-> dataclass fields
def convert_settings(method_name: str, config_type: type, raw: Settings) -> dict[str, Any]:
    """Typed keyword arguments for ``config_type`` from spec strings; errors name the key."""
    hints = typing.get_type_hints(config_type)
    fields = [f.name for f in dataclasses.fields(config_type)]
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in hints or key not in fields:
            raise ValueError(f"{method_name}: unknown setting {key!r}; known settings: {', '.join(fields)}")
        try:
            values[key] = _convert(hints[key], text)
        except ValueError:
            raise ValueError(f"{method_name}: setting {key!r} has a bad value {text!r}") from None
    return values


def _convert(hint: Any, text: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), text)
    if typing.get_origin(hint) is tuple:
        return tuple(_int_list(text))
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if hint is float:
        return float(text)
    if hint is int:
        return int(text)
    return text


def _int_list(text: str) -> list[int]:
    """``15-29`` or ``3;5;7`` (or a mix) as a list of ints."""
    out: list[int] = []
    for part in filter(None, re.split(r"[;+ ]", text)):
        lo, dash, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if dash else [int(part)])
    return out


def format_setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ";".join(str(v) for v in value)
    return str(value)


def non_default_settings(config: Any) -> Settings:
    """The fields of a config dataclass that differ from a default instance, as strings."""
    default = type(config)()
    return {
        f.name: format_setting(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(default, f.name)
    }


__all__ = [
    "Method",
    "MethodSpec",
    "Settings",
    "register_method",
    "known_methods",
    "get_method",
    "parse_method",
    "parse_methods",
    "parse_op_methods",
    "spec_for",
    "as_spec",
    "convert_settings",
    "non_default_settings",
]
