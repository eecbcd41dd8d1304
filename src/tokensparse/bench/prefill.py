"""Time to first token of a whole model: dense against Token Sparse Attention.

On a GPU the default model is the Llama-3.1-8B architecture with random bf16
weights, built directly on the device (no download, no CPU initialisation); on
the CPU the embedded SmolLM2. A prefill is one forward pass over the prompt
that fills the KV cache and returns the last position's logits only. Sparse
runs switch the model with :func:`tokensparse.enable` and back with
:func:`tokensparse.disable`, so every mode is measured in the same process on
the same weights. Random weights make attention close to uniform, so the
coverage budget keeps nearly every token there; fixed kept shares
(``keep_ratio``) show the cost at a known sparsity.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..config import TokenSparseConfig
from ..integrations.transformers import disable, enable, selection_report
from .timing import machine_info, time_fn

logger = logging.getLogger(__name__)

LLAMA_8B = "llama-3.1-8b-random"
TINY = "tiny-random"


@dataclass(frozen=True)
class PrefillBenchConfig:
    """What to run. ``model``: "llama-3.1-8b-random", "tiny-random", or a name for
    :func:`tokensparse.models.load` (default: Llama on CUDA, the embedded model on the CPU)."""

    model: str | None = None
    lengths: tuple[int, ...] = (8192, 32768, 131072)
    batch: int = 1
    keep_ratios: tuple[float, ...] = (0.25,)
    coverage: float | None = 0.005
    sparse_layers: tuple[int, ...] | None = None
    window: int = 128
    min_tokens: int = 1024
    backend: str = "auto"
    warmup: int = 1
    min_reps: int = 2
    budget_ms: float = 1.0  # long runs: min_reps decides
    seed: int = 0
    device: str | None = None


def llama_8b_config(num_layers: int = 32):
    """transformers.LlamaConfig of Llama-3.1-8B (128K context, llama3 RoPE scaling)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
    )


def build_model(name: str, device: torch.device) -> tuple[Any, int]:
    """(model in eval mode, vocabulary size)."""
    if name in (LLAMA_8B, TINY):
        from transformers import LlamaForCausalLM

        config = llama_8b_config() if name == LLAMA_8B else tiny_config()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        config.dtype = dtype
        # Build on the device itself: random init there takes seconds, not minutes.
        with device:
            model = LlamaForCausalLM(config).to(dtype)
        model.set_attn_implementation("sdpa")
        return model.eval(), config.vocab_size
    from ..models import load

    loaded = load(name, device=device)
    return loaded.model, int(loaded.model.config.vocab_size)


def _sdpa_priority(device: torch.device):
    """Dense SDPA prefers cuDNN, then flash, for every mode alike (a no-op on the CPU)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order
        return sdpa_kernel(order)


def run_prefill_bench(
    cfg: PrefillBenchConfig,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time to first token per length and mode; returns a JSON-ready dict.

    ``checkpoint`` receives the partial result after every length.
    """
    say = progress or (lambda msg: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = cfg.model or (LLAMA_8B if device.type == "cuda" else "smollm2")
    say(f"building {name} on {device}")
    model, vocab = build_model(name, device)
    num_layers = model.config.num_hidden_layers
    sparse_layers = cfg.sparse_layers or tuple(range(num_layers // 2, num_layers))
    base = TokenSparseConfig(
        window=cfg.window, min_tokens=cfg.min_tokens, sparse_layers=sparse_layers, backend=cfg.backend
    )
    modes: list[tuple[str, TokenSparseConfig | None]] = [("dense", None)]
    if cfg.coverage is not None:
        modes.append((f"coverage {cfg.coverage:g}", base.replace(coverage=cfg.coverage)))
    modes += [(f"keep {r:g}", base.replace(budget="keep_ratio", keep_ratio=r)) for r in cfg.keep_ratios]

    meta = machine_info(device)
    meta.update(model=name, num_layers=num_layers, sparse_layers=list(sparse_layers))
    results = []
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.inference_mode(), _sdpa_priority(device):
        for length in cfg.lengths:
            ids = torch.randint(0, vocab, (cfg.batch, length), generator=g, device=device)

            def prefill(ids: torch.Tensor = ids):
                return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

            row: dict[str, Any] = {"seq_len": length, "batch": cfg.batch, "modes": {}}
            for label, config in modes:
                entry: dict[str, Any] = {}
                warmup = cfg.warmup
                if config is None:
                    disable(model)
                else:
                    # A recorded run (it syncs to copy the kept counts) doubles as warm-up.
                    enable(model, config, record=True)
                    prefill()
                    report = selection_report(model, clear=True)
                    if report:
                        last = report[-1]
                        entry["kept_share_by_layer"] = {str(k): v.mean_kept_share for k, v in last.items()}
                        entry["mean_kept_share"] = sum(v.mean_kept_share for v in last.values()) / max(len(last), 1)
                    enable(model, config, record=False)
                    warmup = max(cfg.warmup - 1, 0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t = time_fn(prefill, device, warmup=warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms)
                entry.update(time=t.to_dict(), ttft_ms=t.median_ms)
                if device.type == "cuda":
                    entry["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
                disable(model)
                row["modes"][label] = entry
                share = entry.get("mean_kept_share")
                say(
                    f"L={length:>7} {label:<16} TTFT {t.median_ms:10.1f} ms"
                    + (f"  kept {share:6.1%} on sparse layers" if share is not None else "")
                )
            dense_ms = row["modes"]["dense"]["ttft_ms"]
            for label, entry in row["modes"].items():
                entry["speedup_vs_dense"] = dense_ms / entry["ttft_ms"]
            results.append(row)
            if checkpoint is not None:
                checkpoint({"meta": meta, "config": asdict(cfg), "results": results})
            del ids
    return {"meta": meta, "config": asdict(cfg), "results": results}


def plot_prefill(data: dict[str, Any], path: str) -> None:
    """TTFT against length per mode (log-log), from the JSON dict only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(data["results"][0]["modes"]) if data["results"] else []
    lengths = [r["seq_len"] for r in data["results"]]
    for label in labels:
        ax1.plot(lengths, [r["modes"][label]["ttft_ms"] / 1e3 for r in data["results"]], "o-", label=label)
        ax2.plot(lengths, [r["modes"][label]["speedup_vs_dense"] for r in data["results"]], "o-", label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("time to first token (s)")
    ax2.set_ylabel("speedup over dense")
    meta = data.get("meta", {})
    fig.suptitle(f"{meta.get('model')} on {meta.get('gpu', meta.get('device'))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for r in data["results"]:
        parts = [
            f"{label} {e['ttft_ms'] / 1e3:.2f}s x{e['speedup_vs_dense']:.2f}"
            + (f" ({e['mean_kept_share']:.0%} kept)" if "mean_kept_share" in e else "")
            for label, e in r["modes"].items()
        ]
        lines.append(f"L={r['seq_len']}: " + " | ".join(parts))
    return lines
