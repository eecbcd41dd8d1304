"""Time to first token of a whole model: dense against every attention method, by spec.

On a GPU the default model is the Llama-3.1-8B architecture with random bf16
weights, built directly on the device (no download, no CPU initialisation); on
the CPU the embedded SmolLM2. ``--model smollm2 --rope-scaling 16`` runs the
embedded model's real weights with YaRN past its 8K context. A prefill is one
forward pass over the prompt that fills the KV cache and returns the last
position's logits only. Each method spec (:mod:`tokensparse.methods`) switches
the model with :func:`tokensparse.enable` and back with :func:`tokensparse.disable`,
so every method is measured in the same process on the same weights, beside
dense. With ``chunk_size`` the prompt is prefilled in chunks through a KV cache
(:func:`tokensparse.prefill`), dense and sparse alike, and the time of every
chunk is recorded against the prefix before it; the layers that do not
sparsify run flash SDPA with lower-right causality and no materialised mask
(:mod:`tokensparse.integrations.chunk_sdpa`), the best chunked dense there is.
The time outside attention is measured once per length by running the
same forward with an attention that does nothing; a method's attention time is
its TTFT minus that. Random weights make attention close to uniform, so coverage
budgets keep nearly every token there; fixed kept shares (``keep_ratio``) show
the cost at a known sparsity.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..integrations.chunk_sdpa import CHUNK_SDPA, chunk_sdpa
from ..integrations.transformers import disable, enable, plan_of, prefill, selection_report
from ..methods import parse_methods
from ..plan import profile_for
from .timing import machine_info, time_fn

logger = logging.getLogger(__name__)

LLAMA_8B = "llama-3.1-8b-random"
TINY = "tiny-random"


@dataclass(frozen=True)
class PrefillBenchConfig:
    """What to run.

    Attributes:
        model: "llama-3.1-8b-random", "tiny-random", or a name for
            :func:`tokensparse.models.load` (default: Llama on CUDA, the embedded
            model on the CPU).
        methods: method specs; ``dense`` is always run first.
        rope_scaling: YaRN factor for a loaded model (prompts past its context).
        profile: layer profile (a JSON path, or ``"sensitivity"`` for the one shipped
            for the model) of the methods that name no sparse layers (default: the
            model's shipped drift profile, else the second half of the layers).
        min_lengths: length gates; every method runs at each (prefills shorter
            run dense; 0: no gate; "auto": each method's measured crossover),
            labelled ``spec @ N`` unless 0.
        chunk_size: prefill in chunks of this many tokens (None: the whole
            prompt in one forward).
        rounds: times every mode is timed, the modes taking turns; TTFT is the
            median of the rounds' medians.
    """

    model: str | None = None
    lengths: tuple[int, ...] = (8192, 32768, 131072)
    batch: int = 1
    methods: tuple[str, ...] = ("token_sparse:keep_ratio=0.25",)
    rope_scaling: float | None = None
    profile: str | None = None
    min_lengths: tuple[int | str, ...] = (0,)
    warmup: int = 1
    min_reps: int = 2
    budget_ms: float = 1.0  # long runs: min_reps decides
    seed: int = 0
    device: str | None = None
    chunk_size: int | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        parse_methods(list(self.methods) or ["dense"])  # raises ValueError naming a bad spec
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if not self.min_lengths or any(n != "auto" and (not isinstance(n, int) or n < 0) for n in self.min_lengths):
            raise ValueError(f"min_lengths must be integers >= 0 or 'auto', got {self.min_lengths}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {self.chunk_size!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")


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


def build_model(name: str, device: torch.device, rope_scaling: float | None = None) -> tuple[Any, int]:
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

    loaded = load(name, device=device, rope_scaling_factor=rope_scaling)
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
    """Time to first token per length and method; returns a JSON-ready dict.

    ``checkpoint`` receives the partial result after every length.
    """
    say = progress or (lambda msg: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = cfg.model or (LLAMA_8B if device.type == "cuda" else "smollm2")
    say(f"building {name} on {device}")
    model, vocab = build_model(name, device, cfg.rope_scaling)
    specs = parse_methods(["dense", *cfg.methods])
    # (label, spec, gate) of every run; dense once.
    runs = [("dense", specs[0], 0)] + [
        (spec.label + (f" @ {gate}" if gate else ""), spec, gate) for spec in specs[1:] for gate in cfg.min_lengths
    ]
    plans = {}
    for spec in specs[1:]:
        enable(model, spec, profile=profile_for(spec, cfg.profile))
        plans[spec.label] = [(label, layers) for label, layers in plan_of(model).describe()]
        disable(model)

    meta = machine_info(device)
    meta.update(model=name, num_layers=model.config.num_hidden_layers, plans=plans, rope_scaling=cfg.rope_scaling,
                chunk_size=cfg.chunk_size, chunk_attention=CHUNK_SDPA if cfg.chunk_size else None)
    results = []
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    chunked = chunk_sdpa(model) if cfg.chunk_size else contextlib.nullcontext()
    with torch.inference_mode(), _sdpa_priority(device), chunked:
        for length in cfg.lengths:
            ids = torch.randint(0, vocab, (cfg.batch, length), generator=g, device=device)
            clock = _ChunkClock(device)

            def run(ids: torch.Tensor = ids, clock: _ChunkClock = clock):
                if cfg.chunk_size is None:
                    return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
                clock.start()
                return prefill(model, ids, chunk_size=cfg.chunk_size, on_chunk=clock.mark)[1]

            row: dict[str, Any] = {"seq_len": length, "batch": cfg.batch, "modes": {}}
            if cfg.chunk_size:
                row["chunk_prefix_tokens"] = list(range(0, length, cfg.chunk_size))
            row["outside_attention_ms"] = _outside_attention_ms(model, run, device, cfg)
            # Rounds take the modes in turn, so a drift of the GPU's clocks or of the host
            # reaches every mode alike instead of the modes timed last.
            rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in runs}
            for _ in range(cfg.rounds):
                for label, spec, gate in runs:
                    entry = _time_method(model, spec, gate, run, device, cfg)
                    if cfg.chunk_size:
                        entry["chunk_ms"] = clock.chunk_ms()  # of its last timed run
                    rounds[label].append(entry)
            for label, _, _ in runs:
                entry = _merge_rounds(rounds[label])
                entry["attention_ms"] = entry["ttft_ms"] - row["outside_attention_ms"]
                row["modes"][label] = entry
                share = entry.get("mean_kept_share")
                say(
                    f"L={length:>7} {label:<40} TTFT {entry['ttft_ms']:10.1f} ms"
                    f"  attention {entry['attention_ms']:9.1f} ms"
                    + (f"  kept {share:6.1%} on sparse layers" if share is not None else "")
                )
            dense = row["modes"]["dense"]
            for entry in row["modes"].values():
                entry["speedup_vs_dense"] = dense["ttft_ms"] / entry["ttft_ms"]
                if entry.get("peak_memory_bytes") and dense.get("peak_memory_bytes"):
                    entry["memory_over_dense"] = entry["peak_memory_bytes"] / dense["peak_memory_bytes"]
            results.append(row)
            if checkpoint is not None:
                checkpoint({"meta": meta, "config": asdict(cfg), "results": results})
            del ids
    return {"meta": meta, "config": asdict(cfg), "results": results}


def _time_method(model, spec, gate: int, run, device: torch.device, cfg: PrefillBenchConfig) -> dict[str, Any]:
    """TTFT, peak memory and the kept shares of one method at one length gate (dense: the model as loaded)."""
    entry: dict[str, Any] = {"spec": spec.label, "min_length": gate}
    warmup = cfg.warmup
    if spec.method.prefill is not None:
        # A recorded run (it syncs to copy the kept counts) doubles as warm-up.
        enable(model, spec, profile=profile_for(spec, cfg.profile), record=True, min_length=gate)
        run()
        report = selection_report(model, clear=True)
        if report:
            last = report[-1]
            entry["kept_share_by_layer"] = {str(k): v.mean_kept_share for k, v in last.items()}
            entry["mean_kept_share"] = sum(v.mean_kept_share for v in last.values()) / max(len(last), 1)
            if cfg.chunk_size:
                # One record per chunk's forward: the share of the keys so far each chunk attended over.
                entry["kept_share_by_chunk"] = [
                    sum(v.mean_kept_share for v in chunk.values()) / max(len(chunk), 1) for chunk in report
                ]
        enable(model, spec, profile=profile_for(spec, cfg.profile), record=False, min_length=gate)
        warmup = max(cfg.warmup - 1, 0)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time_fn(run, device, warmup=warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms)
        entry.update(time=t.to_dict(), ttft_ms=t.median_ms)
        if device.type == "cuda":
            entry["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    finally:
        disable(model)
    return entry


def _merge_rounds(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's entry over rounds: TTFT the median of the rounds' medians; the other
    fields from the round nearest that median; peak memory the highest."""
    if len(entries) == 1:
        return entries[0]
    medians = [e["time"]["median_ms"] for e in entries]
    median = statistics.median(medians)
    merged = dict(min(entries, key=lambda e: abs(e["ttft_ms"] - median)))
    merged["time"] = {
        "median_ms": median,
        "min_ms": min(e["time"]["min_ms"] for e in entries),
        "max_ms": max(e["time"]["max_ms"] for e in entries),
        "reps": sum(e["time"]["reps"] for e in entries),
        "round_medians_ms": medians,
    }
    merged["ttft_ms"] = median
    if all("peak_memory_bytes" in e for e in entries):
        merged["peak_memory_bytes"] = max(e["peak_memory_bytes"] for e in entries)
    return merged


class _ChunkClock:
    """Marks the end of every chunk of a chunked prefill: CUDA events (no sync) or host time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def mark(self, start: int, end: int) -> None:
        self.marks.append(self._now())

    def chunk_ms(self) -> list[float]:
        """Milliseconds of each chunk of the last run (call after the run has finished)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention that reads nothing: (B, Lq, H, D), for timing the rest of the model."""
    return query.transpose(1, 2), None


def _outside_attention_ms(model, run, device: torch.device, cfg: PrefillBenchConfig) -> float:
    """TTFT of the same forward with every attention call doing nothing."""
    from transformers import AttentionInterface

    AttentionInterface.register("tokensparse_no_attention", _no_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("tokensparse_no_attention")
    try:
        return time_fn(run, device, warmup=cfg.warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms).median_ms
    finally:
        model.set_attn_implementation(previous)


def short_label(label: str) -> str:
    """A label with its layer lists as ranges ("sparse_layers=2;3;4;7" -> "sparse_layers=2-4;7"), for legends."""

    def ranges(match: re.Match) -> str:
        layers = [int(x) for x in match.group(2).split(";")]
        runs: list[list[int]] = []
        for layer in layers:
            if runs and layer == runs[-1][1] + 1:
                runs[-1][1] = layer
            else:
                runs.append([layer, layer])
        return match.group(1) + ";".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)

    return re.sub(r"(sparse_layers=)(\d+(?:;\d+)*)", ranges, label)


def plot_prefill(data: dict[str, Any], path: str) -> None:
    """TTFT against length per mode (log-log), from the JSON dict only; chunked runs add the
    time of each chunk against its prefix at the longest length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunked = bool(data.get("meta", {}).get("chunk_size")) and bool(data["results"])
    fig, axes = plt.subplots(1, 4 if chunked else 3, figsize=(20 if chunked else 15, 5.6))
    ax1, ax2, ax3 = axes[:3]
    ax4 = axes[3] if chunked else None
    labels = list(data["results"][0]["modes"]) if data["results"] else []
    lengths = [r["seq_len"] for r in data["results"]]
    for label in labels:
        name = short_label(label)
        ax1.plot(lengths, [r["modes"][label]["ttft_ms"] / 1e3 for r in data["results"]], "o-", label=name)
        ax2.plot(lengths, [r["modes"][label]["speedup_vs_dense"] for r in data["results"]], "o-", label=name)
        ax3.plot(lengths, [r["modes"][label]["attention_ms"] / 1e3 for r in data["results"]], "o-", label=name)
    ax3.plot(lengths, [r["outside_attention_ms"] / 1e3 for r in data["results"]], "k--", label="outside attention")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax3.set_yscale("log")
    ax3.set_ylabel("seconds (attention = TTFT - outside)")
    for ax in (ax1, ax2, ax3):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
    if chunked:
        longest = max(data["results"], key=lambda r: r["seq_len"])
        for label in labels:
            ax4.plot(longest["chunk_prefix_tokens"], longest["modes"][label]["chunk_ms"], ".-", label=short_label(label))
        ax4.set_xlabel(f"prefix tokens before the chunk ({longest['seq_len']}-token prompt)")
        ax4.set_ylabel(f"ms per {data['meta']['chunk_size']}-token chunk")
        ax4.set_yscale("log")
    ax1.set_yscale("log")
    ax1.set_ylabel("time to first token (s)")
    ax2.set_ylabel("speedup over dense")
    meta = data.get("meta", {})
    fig.suptitle(f"{meta.get('model')} on {meta.get('gpu', meta.get('device'))}", fontsize=9)
    # One legend for every panel (same colours), below them.
    fig.legend(*ax3.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) + 2) // 2), 1, 1))
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
        lines.append(f"L={r['seq_len']} (outside attention {r['outside_attention_ms'] / 1e3:.2f}s): " + " | ".join(parts))
    return lines
