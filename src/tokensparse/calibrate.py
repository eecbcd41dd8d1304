"""Calibration runs that switch a model's attention: the per-layer sensitivity measurement.

:mod:`tokensparse.sensitivity` holds the profile it produces (and chooses layers
from it); this module runs the model, one layer token sparse at a time, through
:func:`tokensparse.enable`, so it sits above the integration.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

from .config import TokenSparseConfig
from .integrations.transformers import disable, enable
from .profile import BUILTIN_CALIBRATION, ModelIdentity, calibration_sha256, decoder_layers
from .sensitivity import DEFAULT_CONFIG, DEFAULT_POSITIONS, ProgressFn, SensitivityProfile
from .version import __version__

logger = logging.getLogger(__name__)


def logit_change(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || logits) in nats, share of equal argmax) over positions.

    Args:
        reference, logits: (N, V) logits of the same N positions; computed in float64.
    """
    if reference.shape != logits.shape or reference.dim() != 2:
        raise ValueError(f"logits must both be (N, V), got {tuple(reference.shape)} and {tuple(logits.shape)}")
    ref_logp = reference.double().log_softmax(-1)
    logp = logits.double().log_softmax(-1)
    # Rounding can leave a KL of identical-looking rows at -1e-17; it is >= 0 by definition.
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)
    agree = (reference.argmax(-1) == logits.argmax(-1)).double()
    return float(kl.mean()), float(agree.mean())


@torch.no_grad()
def last_logits(model: torch.nn.Module, input_ids: torch.Tensor, positions: int) -> torch.Tensor:
    """(positions, V) logits of the last ``positions`` tokens of ``input_ids`` (1, L), as the model returns them."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    # The LM head over every position costs as much as several layers; skip it where the model allows.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = positions
    return model(**kwargs).logits[0, -positions:]


def _check_inputs(input_ids: torch.Tensor, config: TokenSparseConfig, positions: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
    length = int(input_ids.shape[1])
    if not isinstance(config, TokenSparseConfig):
        raise ValueError(f"config must be a TokenSparseConfig, got {type(config).__name__}")
    if config.sparse_layers is not None:
        raise ValueError("config.sparse_layers must be None: the profile makes each layer sparse alone")
    if length <= config.window + config.min_tokens:
        raise ValueError(
            f"a {length}-token prompt runs dense under config.window {config.window} + config.min_tokens "
            f"{config.min_tokens}: use a longer prompt or a smaller min_tokens"
        )
    if not isinstance(positions, int) or isinstance(positions, bool) or not 1 <= positions <= length:
        raise ValueError(f"positions must be an integer in [1, {length}], got {positions!r}")


@torch.no_grad()
def measure_sensitivity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: TokenSparseConfig = DEFAULT_CONFIG,
    *,
    positions: int = DEFAULT_POSITIONS,
    progress: ProgressFn | None = None,
) -> tuple[list[float], list[float]]:
    """Per-layer (KL, top-1 agreement) of ``model`` with only that layer sparse.

    Args:
        model: a transformers causal LM; a token-sparse setting enabled on it is
            switched off first (the reference is dense), and it is left dense
            (:func:`tokensparse.disable`) afterwards.
        input_ids: (1, L) token ids; L must exceed ``config.window + config.min_tokens``
            so that the config drops tokens.
        config: the token-sparse setting, with ``sparse_layers`` None.
        positions: the last positions the measures average over.
        progress: called after each layer with (layer, num_layers, kl, top1, seconds).

    Returns:
        (kl, top1): per decoder layer, see :func:`logit_change`. One dense and
        ``num_layers`` sparse forward passes.
    """
    _check_inputs(input_ids, config, positions)
    num_layers = len(decoder_layers(model))
    input_ids = input_ids.to(next(model.parameters()).device)
    disable(model)
    reference = last_logits(model, input_ids, positions)
    kl: list[float] = []
    top1: list[float] = []
    try:
        for layer in range(num_layers):
            start = time.perf_counter()
            enable(model, config.replace(sparse_layers=(layer,)))
            change = logit_change(reference, last_logits(model, input_ids, positions))
            kl.append(change[0])
            top1.append(change[1])
            seconds = time.perf_counter() - start
            logger.info("sensitivity: layer %d (%d of %d) sparse: KL %.4g nats, top-1 %.3f (%.1f s)",
                        layer, layer + 1, num_layers, change[0], change[1], seconds)
            if progress is not None:
                progress(layer, num_layers, change[0], change[1], seconds)
    finally:
        disable(model)
    return kl, top1


def sensitivity_profile(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: TokenSparseConfig = DEFAULT_CONFIG,
    *,
    positions: int = DEFAULT_POSITIONS,
    calibration: str = BUILTIN_CALIBRATION,
    progress: ProgressFn | None = None,
) -> SensitivityProfile:
    """Measure ``model``'s per-layer sensitivity on ``input_ids`` (1, L); see :func:`measure_sensitivity`."""
    kl, top1 = measure_sensitivity(model, input_ids, config, positions=positions, progress=progress)
    param = next(model.parameters())
    return SensitivityProfile(
        model=ModelIdentity.from_model(model),
        length=int(input_ids.shape[1]),
        positions=positions,
        config=config.to_dict(),
        kl=tuple(kl),
        top1=tuple(top1),
        calibration=calibration,
        calibration_sha256=calibration_sha256(input_ids),
        version=__version__,
        device=param.device.type,
        dtype=str(param.dtype).removeprefix("torch."),
    )


__all__ = ["measure_sensitivity", "sensitivity_profile", "logit_change", "last_logits"]
