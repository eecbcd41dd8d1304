"""Which decoder layers are sparse: inter-layer representation drift.

Profile once per model (SPEC, "Which layers are sparse"): run a long calibration
prompt densely and, for every decoder layer l, average over tokens the relative
drift ``||h_out - h_in|| / (||h_in|| + eps)`` of the layer's input and output
hidden states; normalise the per-layer values to sum 1; the layers whose drift is
at or below the ``delta``-quantile (linear interpolation, numpy's default) are
the sparse layers.

Hidden states are read with forward hooks on the decoder layers (no forward is
replaced); the layers are found as the ``nn.ModuleList`` whose i-th element holds
the attention module with ``layer_idx == i``, so no model family is named here.

A profile is a JSON file (:class:`LayerProfile`); the ones shipped with the
package live in ``tokensparse/data/profiles/`` and are matched to a model by the
architecture fields of its :class:`ModelIdentity` (:func:`find_profile`), never by
a name written in code. The same folder holds other kinds of per-layer profiles
(``"kind"`` in the JSON, e.g. :mod:`tokensparse.sensitivity`); each kind is read
by its own class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 1
DRIFT_KIND = "drift"
DEFAULT_DELTA = 0.5
DEFAULT_LENGTH = 4096
DRIFT_EPS = 1e-6
BUILTIN_CALIBRATION = "builtin:pydoc_data.topics"
_PROFILE_DIR = Path(__file__).parent / "data" / "profiles"


# ---------------------------------------------------------------- model identity
@dataclass(frozen=True)
class ModelIdentity:
    """What a profile was measured on: the model's class and config.

    Every field but ``name`` describes the architecture (:meth:`same_architecture`);
    a profile is matched on those alone. ``name`` is the last component of
    ``name_or_path`` (``org/model`` and ``/models/model`` both give ``model``;
    for a GGUF file it is the folder's name): informative only, it depends on
    where a copy of the weights is stored.
    """

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    name: str

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelIdentity":
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def num(attr: str) -> int:
            return int(getattr(text, attr, 0) or 0)

        return cls(
            # The class in use, not config.architectures (unset in some GGUF configs).
            architecture=type(model).__name__,
            model_type=str(getattr(text, "model_type", "") or ""),
            num_layers=num("num_hidden_layers"),
            hidden_size=num("hidden_size"),
            num_heads=num("num_attention_heads"),
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or num("num_attention_heads")),
            intermediate_size=num("intermediate_size"),
            vocab_size=num("vocab_size"),
            max_position_embeddings=_original_context(text),
            name=_short_name(str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelIdentity":
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"profile model identity: unknown fields {sorted(unknown)}")
        missing = known - set(values)
        if missing:
            raise ValueError(f"profile model identity: missing fields {sorted(missing)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def same_architecture(self, other: "ModelIdentity") -> bool:
        """Whether every field but ``name`` is equal (class, type, depth, sizes, heads, vocab, context)."""
        return all(getattr(self, f) == getattr(other, f) for f in self.__dataclass_fields__ if f != "name")


def _original_context(config: Any) -> int:
    # RoPE scaling raises max_position_embeddings; the profile belongs to the
    # weights, so compare the original context where the config records it.
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def _short_name(name_or_path: str) -> str:
    # "org/model", "/models/model" and "C:\\models\\model" all give "model".
    return name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- the profile
@dataclass(frozen=True)
class LayerProfile:
    """Result of profiling one model, stored as JSON.

    Attributes:
        model: identity of the profiled model.
        length: calibration prompt length in tokens.
        delta: quantile that chose the sparse layers.
        drift: per-layer mean relative drift, normalised to sum 1.
        raw_drift: the same before normalisation.
        sparse_layers: chosen layers, ascending (drift at or below the quantile).
        threshold: the delta-quantile of ``drift``.
        calibration: where the prompt came from (``builtin:...`` or a file name)
            and ``calibration_sha256`` of its token ids.
        version: tokensparse version that wrote the profile.
        device, dtype: where the dense run happened.
    """

    model: ModelIdentity
    length: int
    delta: float
    drift: tuple[float, ...]
    raw_drift: tuple[float, ...]
    sparse_layers: tuple[int, ...]
    threshold: float
    calibration: str
    calibration_sha256: str
    version: str
    device: str = "cpu"
    dtype: str = "float32"

    KIND = DRIFT_KIND

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "kind": self.KIND,
            "model": self.model.to_dict(),
            "length": self.length,
            "delta": self.delta,
            "sparse_layers": list(self.sparse_layers),
            "threshold": self.threshold,
            "drift": list(self.drift),
            "raw_drift": list(self.raw_drift),
            "calibration": self.calibration,
            "calibration_sha256": self.calibration_sha256,
            "version": self.version,
            "device": self.device,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LayerProfile":
        check_format(values, cls.KIND, PROFILE_FORMAT)
        try:
            profile = cls(
                model=ModelIdentity.from_dict(values["model"]),
                length=int(values["length"]),
                delta=float(values["delta"]),
                drift=tuple(float(x) for x in values["drift"]),
                raw_drift=tuple(float(x) for x in values["raw_drift"]),
                sparse_layers=tuple(int(i) for i in values["sparse_layers"]),
                threshold=float(values["threshold"]),
                calibration=str(values["calibration"]),
                calibration_sha256=str(values["calibration_sha256"]),
                version=str(values["version"]),
                device=str(values.get("device", "cpu")),
                dtype=str(values.get("dtype", "float32")),
            )
        except KeyError as err:
            raise ValueError(f"profile is missing the field {err.args[0]!r}") from None
        n = profile.model.num_layers
        if len(profile.drift) != n or len(profile.raw_drift) != n:
            raise ValueError(f"profile has {len(profile.drift)} drift values for a model of {n} layers")
        if any(not 0 <= i < n for i in profile.sparse_layers):
            raise ValueError(f"profile sparse_layers {list(profile.sparse_layers)} out of range for {n} layers")
        return profile

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerProfile":
        return cls.from_dict(read_profile_json(path))


def read_profile_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a profile file; FileNotFoundError or ValueError (with the path) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no profile file at {path}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"profile {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"profile {path} is not a JSON object")
    return values


def profile_kind(values: dict[str, Any]) -> str:
    """The ``kind`` of a profile's JSON; files written before kinds existed are drift profiles."""
    return str(values.get("kind", DRIFT_KIND))


def check_format(values: dict[str, Any], kind: str, version: int) -> None:
    """Raise ValueError unless ``values`` is a profile of ``kind`` in format ``version``."""
    if profile_kind(values) != kind:
        raise ValueError(f"profile kind {profile_kind(values)!r} is not {kind!r}")
    if values.get("format") != version:
        raise ValueError(f"profile format {values.get('format')!r} is not supported (expected {version})")


def load_profile(profile: "LayerProfile | str | os.PathLike") -> LayerProfile:
    """A :class:`LayerProfile` from itself or a JSON path."""
    return profile if isinstance(profile, LayerProfile) else LayerProfile.load(profile)


def shipped_profiles() -> list[Path]:
    """Profile files shipped with the package, sorted by name."""
    return sorted(_PROFILE_DIR.glob("*.json")) if _PROFILE_DIR.is_dir() else []


def find_profile(
    model: torch.nn.Module,
    search: Iterable[str | os.PathLike] | None = None,
    *,
    profile_class: type = LayerProfile,
) -> Any:
    """The profile (among the shipped ones by default) measured on ``model``'s architecture.

    A profile matches when the architecture fields of its :class:`ModelIdentity`
    equal the model's (:meth:`ModelIdentity.same_architecture`), so the same
    weights loaded from another folder, file or hub copy find their profile. The
    name only breaks ties: among several matches, the first whose name equals the
    model's wins, else the first in ``search`` order (with a warning).

    Args:
        model: a transformers model.
        search: profile JSON paths, in order of preference (default: :func:`shipped_profiles`).
        profile_class: the kind of profile to find: a class with ``KIND`` and
            ``from_dict`` (:class:`LayerProfile`, or
            :class:`tokensparse.sensitivity.SensitivityProfile`); files of other
            kinds are skipped.

    Returns:
        An instance of ``profile_class``, or None.
    """
    identity = ModelIdentity.from_model(model)
    matches = []
    for path in shipped_profiles() if search is None else search:
        try:
            values = read_profile_json(path)
            if profile_kind(values) != profile_class.KIND:
                continue
            profile = profile_class.from_dict(values)
        except (ValueError, FileNotFoundError) as err:
            logger.warning("tokensparse: skipping unreadable profile %s: %s", path, err)
            continue
        if profile.model.same_architecture(identity):
            matches.append(profile)
    if not matches:
        return None
    named = [p for p in matches if p.model.name == identity.name]
    if named:
        return named[0]
    if len(matches) > 1:
        logger.warning(
            "tokensparse: %d %s profiles match this model's architecture and none its name %r; using the one "
            "measured on %r", len(matches), profile_class.KIND, identity.name, matches[0].model.name,
        )
    else:
        logger.info("tokensparse: %s profile measured on %r matched by architecture (this model: %r)",
                    profile_class.KIND, matches[0].model.name, identity.name)
    return matches[0]


# ---------------------------------------------------------------- calibration text
def builtin_calibration_text() -> str:
    """A long English text available in every CPython installation, deterministic.

    Paragraphs of prose from ``pydoc_data.topics`` (the language reference that
    ``help()`` shows), topics in sorted order, with code blocks, grammar rules
    and heading underlines removed; about 250K characters.
    """
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or any(line.startswith("   ") for line in lines):
                continue  # code, grammar and indented examples
            if all(set(line.strip()) <= set("*=-~^") for line in lines[1:]):
                continue  # headings with their underline
            text = " ".join(line.strip() for line in lines)
            if len(text) >= 80:
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def calibration_ids(tokenizer: Any, length: int, text: str | None = None) -> torch.Tensor:
    """(1, length) int64 token ids of the calibration text (repeated if short).

    ``text`` None uses :func:`builtin_calibration_text`. The tokenizer's special
    tokens (e.g. BOS) are added as in normal use.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    text = builtin_calibration_text() if text is None else text
    if not text.strip():
        raise ValueError("the calibration text is empty")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    while len(ids) < length:
        ids.extend(body)
    return torch.tensor([ids[:length]], dtype=torch.long)


def calibration_sha256(input_ids: torch.Tensor) -> str:
    """SHA-256 of token ids as little-endian int64: which prompt a profile was measured on."""
    return hashlib.sha256(input_ids.cpu().numpy().astype("<i8").tobytes()).hexdigest()


# ---------------------------------------------------------------- drift
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, in order: the ModuleList whose i-th element holds layer i's attention."""
    from .integrations.hf import attention_layers

    attention = attention_layers(model)
    if not attention:
        raise ValueError("model has no attention modules with a layer_idx; is it a transformers decoder model?")
    indices = sorted({m.layer_idx for m in attention})
    for container in model.modules():
        if not isinstance(container, torch.nn.ModuleList) or len(container) < len(indices):
            continue
        found = True
        for i, layer in enumerate(container):
            if not any(m.layer_idx == i for m in attention_layers(layer)):
                found = False
                break
        if found:
            return list(container)
    raise ValueError("could not find the decoder layers (a ModuleList of layers holding attention with layer_idx)")


@torch.no_grad()
def measure_drift(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    eps: float = DRIFT_EPS,
    attention_mask: torch.Tensor | None = None,
) -> list[float]:
    """Mean relative drift of every decoder layer on one dense forward pass.

    Args:
        model: a transformers causal LM (any attention implementation; run it dense).
        input_ids: (B, L) token ids.
        eps: added to ``||h_in||``.
        attention_mask: optional (B, L), 1 for real tokens; padded tokens are not averaged.

    Returns:
        Per layer, the mean over (real) tokens of ``||h_out - h_in|| / (||h_in|| + eps)``,
        norms over the hidden dimension, computed in float32.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    weights = None if attention_mask is None else attention_mask.to(device).float()
    sums: list[torch.Tensor | None] = [None] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            h_in = inputs.pop(index).float()
            drift = (h_out.float() - h_in).norm(dim=-1) / (h_in.norm(dim=-1) + eps)  # (B, L)
            if weights is None:
                sums[index] = drift.mean()
            else:
                sums[index] = (drift * weights).sum() / weights.sum().clamp(min=1)
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, s in enumerate(sums) if s is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run during the forward pass")
    return [float(s) for s in sums]  # one host sync, after the forward pass


def normalise(raw_drift: list[float]) -> list[float]:
    total = sum(raw_drift)
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"drift values must be finite with a positive sum, got {raw_drift}")
    return [x / total for x in raw_drift]


def check_delta(delta: float) -> None:
    """Raise ValueError unless ``delta`` is a number in [0, 1] (a quantile)."""
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be a number in [0, 1], got {delta!r}")


def choose_layers(drift: list[float] | tuple[float, ...], delta: float = DEFAULT_DELTA) -> tuple[tuple[int, ...], float]:
    """Layers whose drift is at or below the ``delta``-quantile, and that quantile.

    The quantile interpolates linearly between sorted values (numpy's default),
    so with 30 layers and delta 0.5 it is the mean of the 15th and 16th smallest
    drifts and exactly 15 layers are chosen (without ties).
    """
    check_delta(delta)
    if not drift:
        raise ValueError("drift is empty")
    ordered = sorted(drift)
    pos = delta * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    # At an exact rank the threshold is that value itself, so it is always chosen.
    threshold = ordered[lo] if pos == lo else ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return tuple(i for i, d in enumerate(drift) if d <= threshold), threshold


def profile_model(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    delta: float = DEFAULT_DELTA,
    calibration: str = BUILTIN_CALIBRATION,
    eps: float = DRIFT_EPS,
) -> LayerProfile:
    """Profile ``model`` on ``input_ids`` (1, L) densely and choose its sparse layers.

    Run the model with dense attention (call this before :func:`tokensparse.enable`
    or after :func:`tokensparse.disable`).
    """
    from .version import __version__

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
    check_delta(delta)  # before the slow dense pass
    raw = measure_drift(model, input_ids, eps=eps)
    drift = normalise(raw)
    layers, threshold = choose_layers(drift, delta)
    param = next(model.parameters())
    return LayerProfile(
        model=ModelIdentity.from_model(model),
        length=int(input_ids.shape[1]),
        delta=float(delta),
        drift=tuple(drift),
        raw_drift=tuple(raw),
        sparse_layers=layers,
        threshold=threshold,
        calibration=calibration,
        calibration_sha256=calibration_sha256(input_ids),
        version=__version__,
        device=param.device.type,
        dtype=str(param.dtype).removeprefix("torch."),
    )


# ---------------------------------------------------------------- output
def format_drift_table(profile: LayerProfile) -> str:
    """Per-layer drift table (raw, normalised, chosen) as text."""
    rows = [f"{'layer':>5}  {'drift':>8}  {'normalised':>10}  sparse"]
    for i, (raw, norm) in enumerate(zip(profile.raw_drift, profile.drift)):
        rows.append(f"{i:>5}  {raw:>8.4f}  {norm:>10.4f}  {'yes' if i in profile.sparse_layers else ''}")
    rows.append(
        f"delta {profile.delta}: threshold {profile.threshold:.4f}, "
        f"{len(profile.sparse_layers)} of {len(profile.drift)} layers sparse: {list(profile.sparse_layers)}"
    )
    return "\n".join(rows)


def plot_profile(profile: LayerProfile, path: str | os.PathLike) -> Path:
    """Bar plot of the normalised drift per layer, sparse layers highlighted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.patches import Patch

    n = len(profile.drift)
    colors = ["tab:blue" if i in profile.sparse_layers else "tab:gray" for i in range(n)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n), 3.5))
    ax.bar(range(n), profile.drift, color=colors)
    # Early layers often drift far more than the rest: a log scale keeps the rest readable.
    ax.set_yscale("log")
    threshold = ax.axhline(profile.threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.legend(
        [Patch(color="tab:blue"), Patch(color="tab:gray"), threshold],
        ["sparse layer", "dense layer", f"{profile.delta:g}-quantile"],
        fontsize=8,
    )
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("normalised drift (log)")
    ax.set_title(f"{profile.model.name or profile.model.architecture}: {profile.length} tokens, "
                 f"{len(profile.sparse_layers)}/{n} layers sparse (delta {profile.delta:g})")
    ax.set_xticks(range(n))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "ModelIdentity",
    "LayerProfile",
    "load_profile",
    "shipped_profiles",
    "find_profile",
    "read_profile_json",
    "profile_kind",
    "check_format",
    "builtin_calibration_text",
    "calibration_ids",
    "calibration_sha256",
    "decoder_layers",
    "measure_drift",
    "normalise",
    "choose_layers",
    "profile_model",
    "format_drift_table",
    "plot_profile",
]
