"""Where one sparse layer's fixed cost goes: GPU time, host time, launches and host syncs.

For each method spec and length, on one attention layer's inputs (default: the
embedded SmolLM2's shapes, 9 query / 3 KV heads, head_dim 64):

* ``lone_ms``: CUDA events around one call on an idle GPU (what a user waits);
* ``gpu_ms``: the same with the launches queued ahead (GPU work alone);
* ``host_ms``: wall-clock time for the host to return from the call without a
  final synchronisation (issue time, plus any wait inside the call);
* ``launches``: CUDA kernels the call starts, and ``syncs``: host reads of device
  values (device-to-host copies and stream synchronisations), from the profiler.

Dense SDPA on all tokens is measured the same way. When ``host_ms`` exceeds
``gpu_ms``, the layer is host bound: inside a model the GPU then waits for the
host, and the layer costs ``host_ms`` however little work it does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..methods.registry import parse_op_methods
from ..ops import dense_causal_attention
from .attention import DTYPES, make_inputs
from .timing import machine_info, time_fn


@dataclass(frozen=True)
class OverheadBenchConfig:
    """Shapes, lengths and method specs of the probe (``dense`` is always measured)."""

    methods: tuple[str, ...] = ("token_sparse:keep_ratio=0.5", "token_sparse:coverage=0.02,dropped_rows=local")
    lengths: tuple[int, ...] = (16384, 65536)
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: str = "bfloat16"
    inputs: str = "realistic"
    warmup: int = 2
    min_reps: int = 10
    budget_ms: float = 200.0
    device: str | None = None

    def __post_init__(self) -> None:
        parse_op_methods(list(self.methods))  # raises ValueError naming a bad spec


def _host_ms(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Median wall-clock time until ``fn`` returns, the GPU idle before each call."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sorted(times)[len(times) // 2]


def _count_events(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Kernel launches and host syncs of one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names = [e.name for e in prof.events()]
    launches = sum(1 for n in names if n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    syncs = sum(1 for n in names if n in ("cudaStreamSynchronize", "cudaDeviceSynchronize") or "DtoH" in n)
    return {"launches": launches, "syncs": syncs}


def measure(fn: Callable[[], Any], device: torch.device, cfg: OverheadBenchConfig) -> dict[str, Any]:
    timing = dict(warmup=cfg.warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms)
    entry: dict[str, Any] = {"lone_ms": time_fn(fn, device, **timing).median_ms, "host_ms": _host_ms(fn, device)}
    if device.type == "cuda":
        entry["gpu_ms"] = time_fn(fn, device, queued=True, **timing).median_ms
        entry.update(_count_events(fn, device))
    return entry


def run_overhead_bench(
    cfg: OverheadBenchConfig,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """``{"meta", "config", "results": [{"seq_len", "dense", "methods": {label: entry}}]}``."""
    say = progress or (lambda msg: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = parse_op_methods(list(cfg.methods))
    results = []
    for length in cfg.lengths:
        q, k, v = make_inputs(
            cfg.inputs, 1, cfg.num_heads, cfg.num_kv_heads, length, cfg.head_dim, DTYPES[cfg.dtype], device
        )
        row: dict[str, Any] = {"seq_len": length, "methods": {}}
        row["dense"] = measure(lambda: dense_causal_attention(q, k, v), device, cfg)
        say(f"L={length:>7} dense {_line(row['dense'])}")
        for spec in specs:
            def call(spec=spec):
                out, _ = spec.method.prefill(q, k, v, spec.config, layout="blhd")
                return out

            entry = measure(call, device, cfg)
            entry["over_dense_ms"] = entry["lone_ms"] - row["dense"]["lone_ms"]
            row["methods"][spec.label] = entry
            say(f"L={length:>7} {spec.label:<48} {_line(entry)}")
        results.append(row)
        if checkpoint is not None:
            checkpoint({"meta": machine_info(device), "config": asdict(cfg), "results": results})
        del q, k, v
    return {"meta": machine_info(device), "config": asdict(cfg), "results": results}


def _line(entry: dict[str, Any]) -> str:
    parts = [f"lone {entry['lone_ms']:8.3f} ms", f"host {entry['host_ms']:8.3f} ms"]
    if "gpu_ms" in entry:
        parts += [f"gpu {entry['gpu_ms']:8.3f} ms", f"launches {entry['launches']:4d}", f"syncs {entry['syncs']:3d}"]
    return "  ".join(parts)


def summary_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for row in data["results"]:
        lines.append(f"L={row['seq_len']}: dense {_line(row['dense'])}")
        lines += [f"  {label:<48} {_line(e)}" for label, e in row["methods"].items()]
    return lines


def plot_overhead(data: dict[str, Any], path: str) -> None:
    """Lone, GPU and host time per method and length (bars), from the JSON dict only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    fig, axes = plt.subplots(1, max(len(rows), 1), figsize=(6 * max(len(rows), 1), 4.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        entries = {"dense": row["dense"], **row["methods"]}
        keys = [k for k in ("lone_ms", "gpu_ms", "host_ms") if all(k in e for e in entries.values())]
        for i, key in enumerate(keys):
            ax.bar([x + 0.27 * i for x in range(len(entries))], [e[key] for e in entries.values()], 0.27, label=key)
        ax.set_xticks([x + 0.27 for x in range(len(entries))], list(entries), rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("ms")
        ax.set_title(f"L={row['seq_len']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["OverheadBenchConfig", "run_overhead_bench", "measure", "summary_lines", "plot_overhead"]
