"""One attention layer: dense cuDNN / flash against every attention method, by spec.

For every batch size and length: dense causal SDPA on all tokens with each
backend that accepts the inputs, then every method spec asked for
(:mod:`tokensparse.methods`: ``token_sparse:keep_ratio=0.5``, ``flexprefill``,
``xattention``, ``token_sparse+xattention:coverage=0.02``, ...) on every input kind:

* ``token_sparse`` specs: every stage timed on its own (score, budget where it
  runs on the device, top-k, gather, dense attention on the kept tokens,
  scatter) and the whole op end to end: as a lone call, and on CUDA also with
  its launches queued ahead (GPU time alone, as inside a model's forward);
* block-sparse methods (``flexprefill``, ``xattention``): end to end, their
  pattern estimation and the block-sparse kernel alone on that pattern, the
  share of causal blocks visited, and the kernel's time over dense cuDNN's time
  scaled by that share;
* any other method (the compositions): end to end, with the kept share.

Input kinds: ``random`` (standard normal), ``structured`` (sinks, heavy tokens
and a local band added to random vectors, so coverage really drops tokens) and
``realistic`` (:func:`tokensparse.bench.structure.synthetic_qkv`, whose
statistics match the embedded model's measured attention). Speedups are ratios
of times measured in the same run. Results are a JSON-ready dict;
:func:`plot_attention` draws from that dict only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..attention import token_sparse_attention
from ..config import TokenSparseConfig
from ..kernels import ops_for, sdpa
from ..methods import MethodSpec, spec_for
from ..methods.registry import parse_op_methods
from ..selection import fixed_budget, select_tokens, smooth_scores, token_budget
from .timing import machine_info, peak_memory, time_fn

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_METHODS = (
    "token_sparse:keep_ratio=0.75",
    "token_sparse:keep_ratio=0.5",
    "token_sparse:keep_ratio=0.25",
    "token_sparse:keep_ratio=0.1",
    "token_sparse",
)
INPUT_KINDS = ("random", "structured", "realistic")


@dataclass(frozen=True)
class AttentionBenchConfig:
    """What to run. Defaults: Llama-3.1-8B attention shapes, 8K-128K, batch 1 and 4,
    token sparse at four fixed kept shares and at the paper's coverage.

    ``methods`` are spec strings of :mod:`tokensparse.methods` (``dense`` is always
    timed, with every backend in ``dense_backends``); ``inputs`` the input kinds
    every method runs on."""

    lengths: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
    batches: tuple[int, ...] = (1, 4)
    max_tokens: int = 262144  # skip (batch, length) pairs with batch * length above this
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    methods: tuple[str, ...] = DEFAULT_METHODS
    inputs: tuple[str, ...] = ("random",)
    dense_backends: tuple[str, ...] = ("cudnn", "flash")
    warmup: int = 1
    min_reps: int = 3
    budget_ms: float = 1000.0
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        self.specs()  # raises ValueError naming a bad spec
        bad = [k for k in self.inputs if k not in INPUT_KINDS]
        if bad or not self.inputs:
            raise ValueError(f"inputs: unknown {bad}; expected some of {', '.join(INPUT_KINDS)}")

    def specs(self) -> list[MethodSpec]:
        """The parsed method specs, ``dense`` left out (it is always timed)."""
        return parse_op_methods(list(self.methods)) if self.methods else []


def flops_causal(batch_heads: int, length: int, head_dim: int) -> float:
    """Matmul FLOPs of causal attention: QK^T and PV over the lower triangle."""
    return 4.0 * batch_heads * head_dim * length * (length + 1) / 2


def make_inputs(
    kind: str,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    length: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero random q (B, H, L, D), k and v (B, Hkv, L, D).

    ``random``: standard normal entries. ``realistic``:
    :func:`tokensparse.bench.structure.synthetic_qkv` (RoPE, sinks, heavy tokens,
    a local band, fitted to the embedded model). ``structured``: logits with a long tail,
    and every query shares a direction with 4 attention-sink keys at the start,
    32 heavy keys spread over the prefix and a local band of 1024 keys at the
    end, as long-context attention looks, so the coverage budget drops tokens
    (more of them at shorter lengths, where the tail holds less mass; on the
    H200 bench coverage 0.005 kept 14% at 8K, 59% at 32K, 61% at 128K).
    """
    if kind == "realistic":
        from .structure import synthetic_qkv

        return synthetic_qkv(
            batch, num_heads, num_kv_heads, length, head_dim, dtype=dtype, device=device, seed=seed
        )
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, num_heads, length, head_dim, generator=g, device=device, dtype=torch.float32)
    k = torch.randn(batch, num_kv_heads, length, head_dim, generator=g, device=device, dtype=torch.float32)
    v = torch.randn(batch, num_kv_heads, length, head_dim, generator=g, device=device, dtype=torch.float32)
    if kind == "structured":
        u = torch.randn(num_kv_heads, head_dim, generator=g, device=device)
        u = u / u.norm(dim=-1, keepdim=True)
        group = num_heads // num_kv_heads
        root_d = math.sqrt(head_dim)
        # A key's extra logit along the shared direction u is q_gain * gain / sqrt(D):
        # a per-key random bias (spread 2: a long tail of weak tokens, the same
        # for every query, as real keys have), attention sinks, heavy tokens and
        # a local band.
        q_gain = 4.0
        u_q = u.repeat_interleave(group, dim=0)[None, :, None, :]
        q = q - (q * u_q).sum(-1, keepdim=True) * u_q + q_gain * u_q  # q . u == q_gain

        def boost(positions: torch.Tensor, logit: torch.Tensor | float) -> None:
            gain = torch.as_tensor(logit, device=device, dtype=torch.float32).reshape(1, 1, -1, 1)
            k[:, :, positions] += gain * (root_d / q_gain) * u[None, :, None, :]

        boost(torch.arange(length, device=device), 2.0 * torch.randn(length, generator=g, device=device))
        boost(torch.arange(min(4, length), device=device), 12.0)  # attention sinks
        boost(torch.randint(0, max(length - 1, 1), (32,), generator=g, device=device), 9.5)  # heavy tokens
        boost(torch.arange(max(length - 1024, 0), length, device=device), 5.0)  # local band
    elif kind != "random":
        raise ValueError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {kind!r}")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def dense_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """A callable running dense causal SDPA with ``backend``, and how GQA is handled.

    Tries SDPA's ``enable_gqa``; if the backend refuses it, K/V are repeated to H
    heads once, outside the timed call (so the dense time is the kernel alone).
    """
    gqa = q.shape[1] != k.shape[1]
    try:
        sdpa.sdpa_with(backend, q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True, enable_gqa=gqa)
        return (lambda: sdpa.sdpa_with(backend, q, k, v, is_causal=True, enable_gqa=gqa)), ("enable_gqa" if gqa else "mha")
    except RuntimeError:
        if not gqa:
            raise
    group = q.shape[1] // k.shape[1]
    k_rep = k.repeat_interleave(group, dim=1)
    v_rep = v.repeat_interleave(group, dim=1)
    sdpa.sdpa_with(backend, q[:, :, :256], k_rep[:, :, :256], v_rep[:, :, :256], is_causal=True)
    return (lambda: sdpa.sdpa_with(backend, q, k_rep, v_rep, is_causal=True)), "repeated_kv"


def _bench_dense(cfg: AttentionBenchConfig, q, k, v, device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    batch, heads, length, dim = q.shape
    for name in cfg.dense_backends if device.type == "cuda" else ("default",):
        try:
            fn, gqa_mode = dense_attention(name, q, k, v)
        except RuntimeError as err:
            results[name] = {"available": False, "error": str(err).splitlines()[0][:200]}
            continue
        t = time_fn(fn, device, warmup=cfg.warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms)
        mem = peak_memory(fn, device)
        results[name] = {
            "available": True,
            "gqa": gqa_mode,
            "time": t.to_dict(),
            "ms": t.median_ms,
            "tflops": flops_causal(batch * heads, length, dim) / (t.median_ms * 1e-3) / 1e12,
            "memory": mem,
        }
    return results


def _bench_sparse(
    cfg: AttentionBenchConfig, config: TokenSparseConfig, q, k, v, device, dense: dict[str, Any]
) -> dict[str, Any]:
    batch, heads, length, dim = q.shape
    timing = dict(warmup=cfg.warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms)
    ops = ops_for(q, config.backend)
    window = config.window

    def run_all():
        return token_sparse_attention(q, k, v, config=config)

    selection = select_tokens(q, k, config)
    entry: dict[str, Any] = {"stages_ms": {}}
    if selection.kept_idx is None:
        entry["dense_fallback"] = True
        entry["kept_share"] = 1.0
    else:
        entry["dense_fallback"] = False
        entry["kept_share"] = float(selection.kept_share.mean())
        entry["kept_width"] = int(selection.kept_idx.shape[-1])
        entry["max_dropped_mass"] = float(selection.dropped_mass.max())

    stages = entry["stages_ms"]
    stages["score"] = time_fn(lambda: ops.window_mass(q, k, window, None, None), device, **timing).median_ms
    stages["select"] = time_fn(lambda: select_tokens(q, k, config), device, **timing).median_ms
    if selection.kept_idx is not None:
        mass = ops.window_mass(q, k, window, None, None)
        scores = smooth_scores(mass[..., : length - window], config.kernel_size).contiguous()
        prefix_lens = torch.full((batch,), length - window, device=q.device, dtype=torch.long)
        keep = token_budget(scores, prefix_lens, config)
        if fixed_budget(config, length, None) is None:  # fixed budgets run no device op for it
            stages["budget"] = time_fn(lambda: token_budget(scores, prefix_lens, config), device, **timing).median_ms
        seq_lens = torch.full((batch,), length, device=q.device, dtype=torch.long)
        max_keep = entry["kept_width"] - window
        if ops.top_k is not None:
            stages["top_k"] = time_fn(
                lambda: ops.top_k(scores, keep, seq_lens, window, max_keep=max_keep), device, **timing
            ).median_ms
        idx = selection.kept_idx
        stages["gather"] = time_fn(lambda: ops.gather_kept(q, k, v, idx), device, **timing).median_ms
        q_c, k_c, v_c = ops.gather_kept(q, k, v, idx)
        kept_attention = {}
        for name in cfg.dense_backends if device.type == "cuda" else ("default",):
            try:
                sdpa.causal_attention(q_c[:, :1, :256], k_c[:, :1, :256], v_c[:, :1, :256], backend=name)
            except RuntimeError:
                continue
            kept_attention[name] = time_fn(
                lambda: sdpa.causal_attention(q_c, k_c, v_c, backend=name), device, **timing
            ).median_ms
        sdpa.causal_attention(q_c, k_c, v_c)  # the automatic choice, as the op uses it
        entry["attend_backend"] = sdpa.last_backend()
        entry["attend_ms_by_backend"] = kept_attention
        stages["attend"] = kept_attention.get(entry["attend_backend"], min(kept_attention.values()))
        if device.type == "cuda":
            entry["attend_queued_ms"] = time_fn(
                lambda: sdpa.causal_attention(q_c, k_c, v_c), device, queued=True, **timing
            ).median_ms
        out_c = sdpa.causal_attention(q_c, k_c, v_c)
        del q_c, k_c, v_c
        stages["scatter"] = time_fn(lambda: ops.scatter_kept(out_c, idx, length, "bhld"), device, **timing).median_ms
        del out_c
        kept_flops = sum(
            flops_causal(1, int(n), dim) for n in selection.num_kept.flatten().tolist()
        )
        width_flops = flops_causal(batch * heads, entry["kept_width"], dim)
        entry["attend_tflops"] = width_flops / (stages["attend"] * 1e-3) / 1e12
        entry["kept_flops"] = kept_flops

    total = time_fn(run_all, device, **timing)
    entry["total"] = total.to_dict()
    entry["total_ms"] = total.median_ms
    entry["memory"] = peak_memory(run_all, device)
    if "attend" in stages:
        entry["overhead_ms"] = total.median_ms - stages["attend"]
        entry["total_over_attend"] = total.median_ms / stages["attend"]
        entry["effective_tflops"] = entry["kept_flops"] / (total.median_ms * 1e-3) / 1e12
    if "attend_queued_ms" in entry:
        # GPU time alone (launches issued ahead), as inside a model's forward.
        queued = time_fn(run_all, device, queued=True, **timing)
        entry["total_queued"] = queued.to_dict()
        entry["overhead_queued_ms"] = queued.median_ms - entry["attend_queued_ms"]
        entry["total_over_attend_queued"] = queued.median_ms / entry["attend_queued_ms"]
    entry["ideal_speedup"] = 1.0 / entry["kept_share"] ** 2
    entry["method"] = "token_sparse"
    entry["spec"] = spec_for("token_sparse", config).label
    _compare_with_dense(entry, dense)
    return entry


def _compare_with_dense(entry: dict[str, Any], dense: dict[str, Any]) -> None:
    """Speedup and peak-memory ratio of ``entry`` against every dense kernel timed in the run."""
    for name, d in dense.items():
        if d.get("available"):
            entry[f"speedup_vs_{name}"] = d["ms"] / entry["total_ms"]
            if entry.get("memory") and d.get("memory"):
                entry[f"memory_over_{name}"] = entry["memory"]["peak_bytes"] / d["memory"]["peak_bytes"]


def _bench_method(cfg: AttentionBenchConfig, spec: MethodSpec, q, k, v, device, dense: dict[str, Any]) -> dict[str, Any]:
    """Any method end to end; block-sparse methods also their estimation and kernel alone."""
    timing = dict(warmup=cfg.warmup, min_reps=cfg.min_reps, budget_ms=cfg.budget_ms)
    method = spec.method

    def run_all():
        out, _ = method.prefill(q, k, v, spec.config)
        return out

    _, stats = method.prefill(q, k, v, spec.config)
    total = time_fn(run_all, device, **timing)
    entry: dict[str, Any] = {
        "method": spec.name,
        "spec": spec.label,
        "total": total.to_dict(),
        "total_ms": total.median_ms,
        "memory": peak_memory(run_all, device),
        "stages_ms": {},
    }
    if hasattr(stats, "kept_share"):  # a token selection (compositions)
        entry["budget"] = spec.config.token_sparse.budget
        entry["dense_fallback"] = stats.kept_idx is None
        entry["kept_share"] = 1.0 if stats.kept_idx is None else float(stats.kept_share.mean())
    if hasattr(stats, "block_idx"):  # a block pattern
        entry["visited_share"] = float(stats.visited_share.mean())
        if hasattr(stats, "query_aware"):
            entry["query_aware_share"] = float(stats.query_aware.float().mean())
        entry["kernel_backend"] = ops_for(q, getattr(spec.config, "backend", "auto")).name

        def kernel():
            return ops_for(q, getattr(spec.config, "backend", "auto")).block_sparse_attention(
                q, k, v, stats.block_idx, stats.block_cnt, stats.block_size, seq_lens=stats.seq_lens
            )

        entry["stages_ms"]["kernel"] = time_fn(kernel, device, **timing).median_ms
        if method.estimate is not None:
            estimate = method.estimate
            entry["stages_ms"]["estimate"] = time_fn(lambda: estimate(q, k, spec.config), device, **timing).median_ms
    _compare_with_dense(entry, dense)
    share = entry.get("visited_share")
    for name, d in dense.items():
        if share and d.get("available") and "kernel" in entry["stages_ms"]:
            # The kernel target: kernel time over dense time scaled by the blocks visited.
            entry[f"kernel_over_{name}_x_share"] = entry["stages_ms"]["kernel"] / (d["ms"] * share)
    return entry


def run_attention_bench(
    cfg: AttentionBenchConfig,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"meta": ..., "config": ..., "results": [...]}``.

    ``checkpoint`` receives the partial result after every (batch, length).
    """
    say = progress or (lambda msg: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg.dtype]
    specs = cfg.specs()
    meta = machine_info(device)
    meta["stage_backend"] = ops_for(torch.empty(0, device=device), "auto").name
    results = []
    for batch in cfg.batches:
        for length in cfg.lengths:
            if batch * length > cfg.max_tokens:
                continue
            say(f"batch {batch}, length {length}")
            row: dict[str, Any] = {"batch": batch, "seq_len": length, "sparse": []}
            for n, kind in enumerate(cfg.inputs):
                q, k, v = make_inputs(
                    kind, batch, cfg.num_heads, cfg.num_kv_heads, length, cfg.head_dim, dtype, device, cfg.seed
                )
                if n == 0:
                    # Dense cost does not depend on the values: timed once, on the first input kind.
                    row["dense"] = _bench_dense(cfg, q, k, v, device)
                    for name, d in row["dense"].items():
                        if d.get("available"):
                            say(f"  dense {name:<8} {d['ms']:9.3f} ms  {d['tflops']:6.1f} TFLOP/s  gqa={d['gqa']}")
                for spec in specs:
                    if spec.name == "token_sparse":
                        entry = _bench_sparse(cfg, spec.config, q, k, v, device, row["dense"])
                        entry.update(budget=spec.config.budget, keep_ratio=spec.config.keep_ratio)
                    else:
                        entry = _bench_method(cfg, spec, q, k, v, device, row["dense"])
                    entry.update(label=f"{spec.label} ({kind})", inputs=kind)
                    row["sparse"].append(entry)
                    say(_progress_line(entry, row["dense"]))
                del q, k, v
            results.append(row)
            if checkpoint is not None:
                checkpoint({"meta": meta, "config": asdict(cfg), "results": results})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if meta["stage_backend"] == "triton":
        from ..kernels.window_mass import picked_configs

        meta["window_mass_launch"] = picked_configs()
    from ..kernels import pipeline

    meta["chunking"] = (
        f"kernels.pipeline.attend_kept: default budget, {pipeline.NUM_STREAMS} CUDA streams, "
        "compact q/k/v staged in the output rows where they fit"
    )
    return {"meta": meta, "config": asdict(cfg), "results": results}


def _progress_line(entry: dict[str, Any], dense: dict[str, Any]) -> str:
    share = f"kept {entry['kept_share']:6.1%}" if "kept_share" in entry else f"blocks {entry['visited_share']:6.1%}"
    speed = "  ".join(f"x{entry[f'speedup_vs_{n}']:.2f} vs {n}" for n in dense if f"speedup_vs_{n}" in entry)
    return f"  {entry['label']:<36} {share}  total {entry['total_ms']:9.3f} ms  {speed}"


# ---------------------------------------------------------------- plot
def plot_attention(data: dict[str, Any], path: str) -> None:
    """Stage times at the longest batch-1 length, and speedup against kept share vs 1/share^2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["batch"] == min(x["batch"] for x in data["results"])]
    if not rows:
        return
    longest = max(rows, key=lambda r: r["seq_len"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))

    # -- time per stage, outside the dense kernel on the kept tokens --
    stage_names = ["score", "budget", "top_k", "gather", "scatter"]
    entries = [e for e in longest["sparse"] if "attend" in e.get("stages_ms", {})]
    labels = [f"{e['label']}\n({e['kept_share']:.0%} kept)" for e in entries]
    bottoms = [0.0] * len(entries)
    for stage in stage_names + ["rest"]:
        if stage == "rest":  # head chunking, launches, dropped-mass bookkeeping
            values = [
                max(e["total_ms"] - e["stages_ms"]["attend"] - sum(e["stages_ms"].get(x, 0.0) for x in stage_names), 0.0)
                for e in entries
            ]
        else:
            values = [e["stages_ms"].get(stage, 0.0) for e in entries]
        ax1.bar(range(len(entries)), values, bottom=bottoms, label=stage)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, e in enumerate(entries):
        ax1.text(i, bottoms[i], f"total {e['total_ms']:.1f}\nattend {e['stages_ms']['attend']:.1f}",
                 ha="center", va="bottom", fontsize=6)
    ax1.set_xticks(range(len(entries)), labels, rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel("ms (median) besides the dense kernel on kept tokens")
    dense_txt = ", ".join(f"{n} {d['ms']:.1f} ms" for n, d in longest["dense"].items() if d.get("available"))
    ax1.set_title(f"batch {longest['batch']}, L={longest['seq_len']}; dense: {dense_txt}", fontsize=9)
    ax1.legend(fontsize=7)

    # -- speedup vs kept share --
    shares = [i / 100 for i in range(5, 101)]
    ax2.plot(shares, [1 / s**2 for s in shares], "k--", label="ideal 1/share^2")
    for r in rows:
        for dense_name in ("cudnn", "flash", "default"):
            methods = sorted({e.get("method", "token_sparse") for e in r["sparse"]})
            for method, style in zip(methods, ("o-", "s:", "^--", "v-.")):
                pts = [
                    (e["kept_share"], e[f"speedup_vs_{dense_name}"])
                    for e in r["sparse"]
                    if e.get(f"speedup_vs_{dense_name}") and e.get("budget") == "keep_ratio"
                    and e.get("method", "token_sparse") == method
                ]
                if pts:
                    pts.sort()
                    suffix = "" if method == "token_sparse" else f" {method.removeprefix('token_sparse')}"
                    ax2.plot(*zip(*pts), style, label=f"L={r['seq_len']} vs {dense_name}{suffix}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("kept share")
    ax2.set_ylabel("speedup over dense (same run)")
    ax2.set_title("speedup vs kept share")
    ax2.legend(fontsize=6, ncol=2)
    meta = data.get("meta", {})
    fig.suptitle(f"{meta.get('gpu', meta.get('device'))}, torch {meta.get('torch')}, triton {meta.get('triton')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A short text table of the results."""
    lines = []
    for r in data["results"]:
        dense = "  ".join(f"{n} {d['ms']:.2f} ms" for n, d in r["dense"].items() if d.get("available"))
        lines.append(f"B={r['batch']} L={r['seq_len']}: dense {dense}")
        for e in r["sparse"]:
            if "visited_share" in e:
                st = e["stages_ms"]
                lines.append(
                    f"  {e['label']:<36} blocks {e['visited_share']:6.1%} total {e['total_ms']:8.2f} ms"
                    f" estimate {st.get('estimate', float('nan')):7.2f} kernel {st['kernel']:8.2f} ms"
                    f" kernel/(dense x share) "
                    f"{e.get('kernel_over_cudnn_x_share', e.get('kernel_over_default_x_share', float('nan'))):.2f}"
                    f" x{e.get('speedup_vs_cudnn', e.get('speedup_vs_default', float('nan'))):.2f}"
                )
                continue
            st = e.get("stages_ms", {})
            over = e.get("overhead_ms")
            lines.append(
                f"  {e['label']:<36} kept {e['kept_share']:6.1%} total {e['total_ms']:8.2f} ms"
                f" attend {st.get('attend', float('nan')):8.2f} ({e.get('attend_backend', '-')})"
                f" overhead {over if over is not None else float('nan'):6.2f} ms"
                f" x{e.get('speedup_vs_cudnn', e.get('speedup_vs_default', float('nan'))):.2f}"
                f" mem x{e.get('memory_over_cudnn', float('nan')):.2f}"
                + (f" queued: overhead {e['overhead_queued_ms']:5.2f} ms, total/attend {e['total_over_attend_queued']:.3f}"
                   if "overhead_queued_ms" in e else "")
            )
    return lines
