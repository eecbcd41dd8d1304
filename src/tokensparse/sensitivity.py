"""Which decoder layers tolerate token sparse: per-layer logit sensitivity.

The drift profile (:mod:`tokensparse.profile`) reads hidden states of one dense
run; it says where representations change little, not what dropping tokens in
a layer does to the answers. This profile measures that directly: on the
calibration prompt, run the model densely once, then for every decoder layer l
run it again with only layer l sparse (a given :class:`TokenSparseConfig`) and
compare the next-token distributions of the last ``positions`` tokens:

* ``kl[l]``: mean over those positions of KL(dense || sparse), in nats,
  computed in float64 from the logits;
* ``top1[l]``: share of those positions whose most likely token is unchanged.

Averaging over the last positions (64 by default, inside the default 128-token
observation window, so every one of them attends over the kept tokens only)
keeps one token's noise out of the measure. The model is switched with the
public :func:`tokensparse.enable` / :func:`tokensparse.disable` only.

A profile is a JSON file (:class:`SensitivityProfile`, ``"kind": "sensitivity"``)
beside the drift profiles in ``tokensparse/data/profiles/``, matched to a model
by :func:`tokensparse.profile.find_profile` like them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .config import TokenSparseConfig
from .profile import (
    BUILTIN_CALIBRATION,
    ModelIdentity,
    calibration_sha256,
    check_format,
    choose_layers,
    find_profile,
    read_profile_json,
)

logger = logging.getLogger(__name__)

SENSITIVITY_KIND = "sensitivity"
SENSITIVITY_FORMAT = 1
DEFAULT_POSITIONS = 64
# A thousandth of a nat per layer: small changes add up roughly, so 30 such layers
# stay near 0.03 nats. On SmolLM2 (keep 0.25, local rows) it sets aside the 7 layers
# of largest KL (0-2, 7, 8, 14, 17); every layer there is below 0.0025 nats.
DEFAULT_MAX_KL = 1e-3
# A floor of 256 prefix tokens lets keep 0.25 drop 75% of a 4096-token prompt
# (the default floor of 1024 would keep 26%, and all of a 1152-token one).
DEFAULT_CONFIG = TokenSparseConfig(budget="keep_ratio", keep_ratio=0.25, min_tokens=256, dropped_rows="local")

ProgressFn = Callable[[int, int, float, float, float], None]


# ---------------------------------------------------------------- the profile
@dataclass(frozen=True)
class SensitivityProfile:
    """Per-layer change of the output when only that layer runs token sparse.

    Attributes:
        model: identity of the profiled model.
        length: calibration prompt length in tokens.
        positions: how many final positions the measures average over.
        config: ``TokenSparseConfig.to_dict()`` of the sparse setting measured
            (``sparse_layers`` None: each layer was sparsified alone).
        kl: per layer, mean KL(dense || sparse) of the next-token distributions, nats.
        top1: per layer, share of positions whose argmax token is unchanged, in [0, 1].
        calibration, calibration_sha256: the prompt's source and its token ids' hash.
        version: tokensparse version that wrote the profile.
        device, dtype: where the runs happened.
    """

    model: ModelIdentity
    length: int
    positions: int
    config: dict[str, Any]
    kl: tuple[float, ...]
    top1: tuple[float, ...]
    calibration: str
    calibration_sha256: str
    version: str
    device: str = "cpu"
    dtype: str = "float32"

    KIND = SENSITIVITY_KIND

    def token_sparse_config(self) -> TokenSparseConfig:
        """The measured setting as a config (raises ValueError if its fields no longer exist)."""
        return TokenSparseConfig.from_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SENSITIVITY_FORMAT,
            "kind": self.KIND,
            "model": self.model.to_dict(),
            "length": self.length,
            "positions": self.positions,
            "config": dict(self.config),
            "kl": list(self.kl),
            "top1": list(self.top1),
            "calibration": self.calibration,
            "calibration_sha256": self.calibration_sha256,
            "version": self.version,
            "device": self.device,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SensitivityProfile":
        check_format(values, cls.KIND, SENSITIVITY_FORMAT)
        try:
            profile = cls(
                model=ModelIdentity.from_dict(values["model"]),
                length=int(values["length"]),
                positions=int(values["positions"]),
                config=dict(values["config"]),
                kl=tuple(float(x) for x in values["kl"]),
                top1=tuple(float(x) for x in values["top1"]),
                calibration=str(values["calibration"]),
                calibration_sha256=str(values["calibration_sha256"]),
                version=str(values["version"]),
                device=str(values.get("device", "cpu")),
                dtype=str(values.get("dtype", "float32")),
            )
        except KeyError as err:
            raise ValueError(f"sensitivity profile is missing the field {err.args[0]!r}") from None
        n = profile.model.num_layers
        if len(profile.kl) != n or len(profile.top1) != n:
            raise ValueError(f"sensitivity profile has {len(profile.kl)} KL and {len(profile.top1)} top-1 "
                             f"values for a model of {n} layers")
        if not all(math.isfinite(x) and x >= 0 for x in profile.kl):
            raise ValueError(f"sensitivity profile kl must be finite and >= 0, got {list(profile.kl)}")
        if not all(0.0 <= x <= 1.0 for x in profile.top1):
            raise ValueError(f"sensitivity profile top1 must lie in [0, 1], got {list(profile.top1)}")
        return profile

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityProfile":
        return cls.from_dict(read_profile_json(path))


def find_sensitivity_profile(
    model: torch.nn.Module, search: Iterable[str | os.PathLike] | None = None
) -> SensitivityProfile | None:
    """The sensitivity profile (shipped ones by default) of ``model``'s architecture, or None."""
    return find_profile(model, search, profile_class=SensitivityProfile)


# ---------------------------------------------------------------- measuring
# ---------------------------------------------------------------- choosing layers
def safe_layers(
    profile: SensitivityProfile,
    *,
    max_kl: float | None = None,
    count: int | None = None,
    quantile: float | None = None,
) -> tuple[int, ...]:
    """Layers that may run the profiled setting, ascending; give exactly one rule.

    Args:
        profile: a sensitivity profile.
        max_kl: layers whose KL is at most ``max_kl`` nats.
        count: the ``count`` layers of lowest KL (ties: the lower index first).
        quantile: layers whose KL is at or below the ``quantile`` of the per-layer
            KL (linear interpolation, as :func:`tokensparse.profile.choose_layers`).
    """
    given = [name for name, value in (("max_kl", max_kl), ("count", count), ("quantile", quantile)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of max_kl, count, quantile; got {given or 'none'}")
    kl = profile.kl
    if max_kl is not None:
        if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not max_kl >= 0:
            raise ValueError(f"max_kl must be a number >= 0, got {max_kl!r}")
        return tuple(i for i, x in enumerate(kl) if x <= max_kl)
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(kl):
            raise ValueError(f"count must be an integer in [0, {len(kl)}], got {count!r}")
        return tuple(sorted(sorted(range(len(kl)), key=lambda i: (kl[i], i))[:count]))
    try:
        return choose_layers(kl, quantile)[0]
    except ValueError as err:
        raise ValueError(str(err).replace("delta", "quantile")) from None


# ---------------------------------------------------------------- output
def format_sensitivity_table(profile: SensitivityProfile, chosen: Iterable[int] = ()) -> str:
    """Per-layer table (layer, KL, top-1, chosen) as text."""
    chosen = set(chosen)
    rows = [f"{'layer':>5}  {'KL (nats)':>10}  {'top-1':>6}  safe"]
    for i, (kl, top1) in enumerate(zip(profile.kl, profile.top1)):
        rows.append(f"{i:>5}  {kl:>10.3g}  {top1:>6.3f}  {'yes' if i in chosen else ''}")
    rows.append(f"{profile.length} tokens, last {profile.positions} positions; "
                f"{len(chosen)} of {len(profile.kl)} layers chosen: {sorted(chosen)}")
    return "\n".join(rows)


def config_label(config: dict[str, Any]) -> str:
    """A short description of a config dict, e.g. ``keep_ratio 0.25, min_tokens 256, local rows``."""
    budget = config.get("budget")
    label = f"{budget} {config.get(budget)}" if budget in ("keep_ratio", "keep_tokens") else f"{budget} {config.get('coverage')}"
    return f"{label}, min_tokens {config.get('min_tokens')}, {config.get('dropped_rows')} rows"


def plot_sensitivity(profile: SensitivityProfile, path: str | os.PathLike, max_kl: float | None = None) -> Path:
    """Bar plot of per-layer KL (log scale) with top-1 agreement on a second axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(profile.kl)
    chosen = set(safe_layers(profile, max_kl=max_kl)) if max_kl is not None else set()
    # A KL of exactly 0 has no place on a log axis; draw it at a visible floor.
    floor = min([x for x in profile.kl if x > 0], default=1e-6) / 10
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n), 4.0))
    ax.bar(range(n), [max(x, floor) for x in profile.kl],
           color=["tab:blue" if i in chosen else "tab:gray" for i in range(n)])
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (the only sparse one)")
    ax.set_ylabel("KL(dense || sparse), nats (log)")
    handles = [Patch(color="tab:gray"), Line2D([], [], color="tab:red", marker="o", linestyle="")]
    labels = ["KL", "top-1 agreement"]
    if max_kl is not None:
        handles[:1] = [Patch(color="tab:blue"), Patch(color="tab:gray"),
                       ax.axhline(max_kl, color="black", linestyle="--", linewidth=1)]
        labels[:1] = [f"KL <= {max_kl:g}", "KL above", "max_kl"]
    right = ax.twinx()
    right.plot(range(n), profile.top1, "o", color="tab:red", markersize=4)
    right.set_ylim(0, 1.02)
    right.set_ylabel("top-1 agreement")
    # Below the axes: inside, it would hide the bars or the top-1 markers.
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(labels),
              frameon=False)
    ax.set_title(f"{profile.model.name or profile.model.architecture}: {profile.length} tokens, "
                 f"last {profile.positions} positions; {config_label(profile.config)}", fontsize=9)
    ax.set_xticks(range(n))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_POSITIONS",
    "DEFAULT_MAX_KL",
    "SensitivityProfile",
    "find_sensitivity_profile",
    "safe_layers",
    "format_sensitivity_table",
    "config_label",
    "plot_sensitivity",
]
