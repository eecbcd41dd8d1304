#!/usr/bin/env python3
"""FlexPrefill on the GPU (issue 6): check the block-sparse kernel at large shapes,
sweep its tiles, and time dense cuDNN / flash SDPA, FlexPrefill, Token Sparse and
Token Sparse + FlexPrefill side by side at Llama-3.1-8B attention shapes
(32 query heads, 8 KV heads, head_dim 128, bf16, batch 1) on structured inputs
(tokensparse.bench.structure.synthetic_qkv).

    PYTHONPATH=src python3 scripts/gpu_flexprefill.py --out $OUT/flexprefill
    PYTHONPATH=src python3 scripts/gpu_flexprefill.py --small --out /tmp/fp   # CPU logic check

Writes results.json (every number), plot.png (drawn from results.json only) and
log.txt under --out; prints a short table last. Timing: warm-up, then the median
of several runs timed with CUDA events (perf_counter on the CPU); cuDNN is timed
twice per length to show the run-to-run spread.

Targets (issue 6): kernel time on the FlexPrefill block mask <= 1.15 x (dense
cuDNN time x share of causal blocks visited); Token Sparse + FlexPrefill at 128K
>= 4x faster than dense cuDNN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.bench.structure import StructureParams, attention_stats, synthetic_qkv
from tokensparse.bench.timing import time_fn
from tokensparse.flexprefill import estimate_pattern, flexprefill_attention
from tokensparse.kernels import block_sparse as bs, ops_for, triton_runnable
from tokensparse.kernels.reference import gather_kept_ref

TILE_CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
    (128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
]
TARGET_RATIO = 1.15
TARGET_COMPOSITION_SPEEDUP = 4.0


class Run:
    def __init__(self, args: argparse.Namespace):
        self.small = args.small
        self.device = torch.device("cpu" if args.small else "cuda")
        if self.small:
            self.batch, self.heads, self.kv_heads, self.dim = 1, 4, 2, 32
            self.dtype = torch.float32
            self.lengths = [int(x) for x in (args.lengths or "384,768").split(",")]
            self.fp = dict(gamma=0.95, tau=0.1, min_budget=64, block_size=32)
            self.ts = TokenSparseConfig(coverage=0.05, window=32, min_tokens=64)
            self.check_lengths = [300]
            self.tiles = [(32, 32, 4, 1), (16, 32, 4, 1)]
        else:
            self.batch, self.heads, self.kv_heads, self.dim = 1, 32, 8, 128
            self.dtype = torch.bfloat16
            self.lengths = [int(x) for x in (args.lengths or "32768,65536,131072").split(",")]
            self.fp = dict(gamma=0.95, tau=0.1, min_budget=1024, block_size=128)
            self.ts = TokenSparseConfig()
            self.check_lengths = [32768, 131072]
            self.tiles = TILE_CONFIGS
        self.ts_fp = self.ts.replace(
            attention="flexprefill", fp_gamma=self.fp["gamma"], fp_tau=self.fp["tau"],
            fp_min_budget=self.fp["min_budget"], fp_block=self.fp["block_size"],
        )
        self.params = StructureParams()
        self.budget_ms = 300.0 if args.small else 1500.0
        self.deadline = time.time() + args.time_limit
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "log.txt", "w")
        self.best_tiles: tuple[int, int, int, int] | None = None
        self.data: dict = {
            "env": env_info(self.device),
            "shapes": dict(batch=self.batch, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.dim,
                           dtype=str(self.dtype).replace("torch.", ""), lengths=self.lengths),
            "flexprefill": self.fp,
            "token_sparse": self.ts.to_dict(),
            "structure": self.params.to_dict(),
            "targets": {"kernel_ratio_max": TARGET_RATIO, "composition_speedup_128k_min": TARGET_COMPOSITION_SPEEDUP},
            "checks": [], "tile_sweep": [], "bench": [], "skipped": [],
        }

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.log_file.write(msg + "\n")
        self.log_file.flush()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timeit(self, fn, *, warmup: int = 1) -> dict:
        """Median of several runs after ``warmup``; CUDA events on the GPU."""
        return time_fn(fn, self.device, warmup=warmup, min_reps=3, max_reps=20, budget_ms=self.budget_ms).to_dict()

    def inputs(self, length: int, seed: int = 0):
        return synthetic_qkv(
            self.batch, self.heads, self.kv_heads, length, self.dim,
            params=self.params, dtype=self.dtype, device=self.device, seed=seed,
        )


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    info["kernel"] = "triton" if ops_for(torch.empty(0, device=device), "auto").name == "triton" else "torch reference"
    return info


def block_sparse(q, *args, tiles=None, **kwargs):
    """The Triton kernel where it runs (as ``block_sparse.use_triton(q, "auto")`` chose
    before it was removed), the reference elsewhere (the --small CPU check)."""
    if triton_runnable(q):
        return bs.block_sparse_attention(q, *args, tiles=tiles, **kwargs)
    return bs.block_sparse_attention_ref(q, *args, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# ---------------------------------------------------------------- checks
def run_checks(run: Run) -> None:
    """Kernel vs reference on real FlexPrefill patterns, on fresh inputs, output poisoned."""
    tol = 1e-2 if run.dtype == torch.bfloat16 else 1e-4
    block = run.fp["block_size"]
    for i, length in enumerate(run.check_lengths):
        q, k, v = run.inputs(length, seed=100 + i)
        pattern = estimate_pattern(q, k, **run.fp)
        # Reference on a subset of KV heads at long lengths (its cost is dense).
        kv_sub = run.kv_heads if length <= 32768 else 1
        heads = kv_sub * (run.heads // run.kv_heads)
        out = torch.full_like(q, float("nan"))
        block_sparse(q, k, v, pattern.block_idx, pattern.block_cnt, block, out=out)
        run.sync()
        unwritten = int(out.isnan().sum())
        ref = bs.block_sparse_attention_ref(
            q[:, :heads], k[:, :kv_sub], v[:, :kv_sub], pattern.block_idx[:, :heads], pattern.block_cnt[:, :heads],
            block, chunk=1024,
        )
        err = rel_err(out[:, :heads], ref)
        # Low-precision floor: the reference's own rounding of the output.
        ref64 = None
        if run.small:
            ref64 = bs.block_sparse_attention_ref(
                q.double(), k.double(), v.double(), pattern.block_idx, pattern.block_cnt, block
            )
            err = rel_err(out, ref64)
        ok = unwritten == 0 and err <= tol
        run.data["checks"].append({
            "name": "flexprefill pattern", "length": length, "heads_checked": heads,
            "visited_share": float(pattern.visited_share.mean()), "rel_err": err, "tol": tol,
            "unwritten": unwritten, "ok": ok,
        })
        run.log(f"check L={length}: pattern share {float(pattern.visited_share.mean()):.3f}, "
                f"rel err {err:.2e} (tol {tol:.0e}), unwritten {unwritten} -> {'OK' if ok else 'FAIL'}")
        del q, k, v, out, ref, pattern
    # Per-head lengths (compressed sequences): K/V per query head, padding at the end holding junk.
    length = run.check_lengths[0]
    heads = min(8, run.heads)
    gen = torch.Generator(device=run.device).manual_seed(7)
    q, k, v = run.inputs(length, seed=200)
    q, k, v = q[:, :heads].contiguous(), k[:, :1].expand(-1, heads, -1, -1).contiguous(), v[:, :1].expand(-1, heads, -1, -1).contiguous()
    lens = torch.randint(length // 4, length + 1, (run.batch, heads), generator=gen, device=run.device)
    pos = torch.arange(length, device=run.device)
    junk = pos[None, None, :, None] >= lens[..., None, None]
    k = k.masked_fill(junk, 30.0)
    v = v.masked_fill(junk, 1e4)
    pattern = estimate_pattern(q, k, seq_lens=lens, **run.fp)
    out = torch.full_like(q, float("nan"))
    block_sparse(q, k, v, pattern.block_idx, pattern.block_cnt, block, seq_lens=lens, out=out)
    run.sync()
    unwritten = int(out.isnan().sum())
    ref = bs.block_sparse_attention_ref(q, k, v, pattern.block_idx, pattern.block_cnt, block, seq_lens=lens)
    err = rel_err(out, ref)
    past_zero = bool((out.masked_select(junk) == 0).all())
    ok = unwritten == 0 and err <= tol and past_zero
    run.data["checks"].append({
        "name": "per-head lengths", "length": length, "heads_checked": heads, "rel_err": err, "tol": tol,
        "unwritten": unwritten, "rows_past_length_zero": past_zero, "ok": ok,
    })
    run.log(f"check per-head lengths L={length}: rel err {err:.2e}, unwritten {unwritten}, "
            f"rows past length zero {past_zero} -> {'OK' if ok else 'FAIL'}")


# ---------------------------------------------------------------- tile sweep
def run_tile_sweep(run: Run) -> None:
    """Kernel time per tile config on one FlexPrefill pattern; the best is used afterwards."""
    if not triton_runnable(torch.empty(0, device=run.device)):
        run.data["skipped"].append("tile sweep: the Triton kernel is not runnable here")
        return
    length = run.lengths[0]
    q, k, v = run.inputs(length, seed=300)
    pattern = estimate_pattern(q, k, **run.fp)
    block = run.fp["block_size"]
    full_idx, full_cnt = bs.lists_from_block_mask(
        torch.ones(1, 1, pattern.block_cnt.shape[-1], pattern.block_cnt.shape[-1], dtype=torch.bool, device=run.device)
    )
    full_idx = full_idx.expand(run.batch, run.heads, -1, -1)
    full_cnt = full_cnt.expand(run.batch, run.heads, -1)
    best = None
    for tiles in run.tiles:
        if tiles[0] > block or tiles[1] > block:
            continue
        entry = {"tiles": list(tiles), "length": length, "share": float(pattern.visited_share.mean())}
        try:
            t = run.timeit(lambda: block_sparse(
                q, k, v, pattern.block_idx, pattern.block_cnt, block, tiles=tiles))
            entry["ms"] = t["median_ms"]
            if best is None or t["median_ms"] < best[1]:
                best = (tiles, t["median_ms"])
        except Exception as err:  # a config may not compile (shared memory, registers)
            entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        run.data["tile_sweep"].append(entry)
        run.log(f"tiles {tiles}: {entry.get('ms', float('nan')):.3f} ms {entry.get('error', '')}")
    if best is not None:
        run.best_tiles = best[0]
        # The rest of the run (FlexPrefill end to end, the composition) uses the best
        # tiles; record them so the default in kernels/block_sparse.py can follow.
        bs._CUDA_TILES = tuple(run.best_tiles)
        # Efficiency at density 1: the kernel on the full causal pattern.
        full = run.timeit(lambda: block_sparse(q, k, v, full_idx, full_cnt, block, tiles=run.best_tiles))
        run.data["best_tiles"] = list(run.best_tiles)
        run.data["kernel_full_pattern_ms"] = {"length": length, **full}
        run.log(f"best tiles {run.best_tiles}; full causal pattern {full['median_ms']:.2f} ms at L={length}")


# ---------------------------------------------------------------- benchmarks
def dense_fn(run: Run, backend: str | None, q, k, v):
    """Dense causal SDPA with one backend; K/V repeated outside the timed call if GQA is refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(backend)

    def call(kk, vv, gqa):
        if chosen is None:
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    try:
        call(k, v, True)
        return (lambda: call(k, v, True)), "enable_gqa"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        call(k_rep, v_rep, False)
        return (lambda: call(k_rep, v_rep, False)), "repeated_kv"


def run_bench(run: Run) -> None:
    block = run.fp["block_size"]
    for length in sorted(run.lengths, reverse=True):  # the longest first: it matters most
        if run.time_left() < 25:
            run.data["skipped"].append(f"bench L={length}: time limit")
            run.log(f"skipping L={length}: time limit")
            continue
        q, k, v = run.inputs(length, seed=length)
        entry: dict = {"length": length, "methods": {}}
        methods = entry["methods"]
        ref_out = None
        dense_backends = ["cudnn", "flash"] if run.device.type == "cuda" else ["default"]
        for name in dense_backends:
            try:
                fn, gqa_mode = dense_fn(run, None if name == "default" else name, q, k, v)
                methods[f"dense_{name}"] = {**run.timeit(fn), "gqa": gqa_mode}
                if ref_out is None:
                    ref_out = fn()
                del fn
            except RuntimeError as err:
                methods[f"dense_{name}"] = {"error": str(err).splitlines()[0][:200]}
        dense_key = "dense_cudnn" if "median_ms" in methods.get("dense_cudnn", {}) else next(
            (k_ for k_, m in methods.items() if "median_ms" in m), None)
        if ref_out is None:
            ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        win = slice(length - 128, length)  # rows every method keeps: accuracy proxy

        # FlexPrefill: pattern + kernel, and each part alone.
        tiles = run.best_tiles
        fp_out, pattern = flexprefill_attention(q, k, v, return_pattern=True, **run.fp)
        share = float(pattern.visited_share.mean())
        methods["flexprefill"] = {
            **run.timeit(lambda: flexprefill_attention(q, k, v, **run.fp)),
            "visited_share": share, "query_aware_share": float(pattern.query_aware.float().mean()),
            "window_rel_err": rel_err(fp_out[:, :, win], ref_out[:, :, win]),
        }
        methods["flexprefill_estimate"] = run.timeit(lambda: estimate_pattern(q, k, **run.fp))
        methods["flexprefill_kernel"] = run.timeit(lambda: block_sparse(
            q, k, v, pattern.block_idx, pattern.block_cnt, block, tiles=tiles))
        del fp_out

        # Token Sparse (coverage) alone and with FlexPrefill on the kept tokens; a
        # failure here is recorded and leaves the numbers above in place.
        sel = None
        try:
            ts_out, sel = token_sparse_attention(q, k, v, config=run.ts, return_stats=True)
            methods["token_sparse"] = {
                **run.timeit(lambda: token_sparse_attention(q, k, v, config=run.ts)),
                "kept_share": float(sel.kept_share.mean()),
                "window_rel_err": rel_err(ts_out[:, :, win], ref_out[:, :, win]),
            }
            del ts_out
        except Exception as err:
            methods["token_sparse"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            run.log(f"token_sparse failed at L={length}: {methods['token_sparse']['error']}")
        try:
            comp_out = token_sparse_attention(q, k, v, config=run.ts_fp)
            comp = {
                **run.timeit(lambda: token_sparse_attention(q, k, v, config=run.ts_fp)),
                "window_rel_err": rel_err(comp_out[:, :, win], ref_out[:, :, win]),
            }
            del comp_out
            if sel is not None and sel.kept_idx is not None:
                comp["kept_share"] = float(sel.kept_share.mean())
                q_c, k_c, _ = gather_kept_ref(q, k, v, sel.kept_idx)
                comp_pattern = estimate_pattern(q_c, k_c, seq_lens=sel.num_kept, **run.fp)
                comp["visited_share_of_kept"] = float(comp_pattern.visited_share.mean())
                # Blocks visited against the causal blocks of the full sequence.
                nqb = bs.num_blocks(length, block)
                visited = comp_pattern.block_cnt.sum(-1).float().mean()
                comp["visited_share_of_full"] = float(visited / (nqb * (nqb + 1) / 2))
                del q_c, k_c, comp_pattern
        except Exception as err:
            comp = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            run.log(f"token_sparse+flexprefill failed at L={length}: {comp['error']}")
        methods["token_sparse+flexprefill"] = comp

        # Derived numbers.
        if dense_key is not None:
            dense_ms = methods[dense_key]["median_ms"]
            for m in methods.values():
                if "median_ms" in m:
                    m["speedup_vs_dense"] = dense_ms / m["median_ms"]
            entry["dense_reference"] = dense_key
            entry["kernel_ratio"] = methods["flexprefill_kernel"]["median_ms"] / (dense_ms * share)
            if run.device.type == "cuda":  # second cuDNN timing: run-to-run spread
                fn, _ = dense_fn(run, "cudnn", q, k, v)
                entry["dense_cudnn_repeat"] = run.timeit(fn)
                del fn
        run.data["bench"].append(entry)
        run.log(f"L={length}: " + ", ".join(
            f"{n} {m['median_ms']:.2f} ms" for n, m in methods.items() if "median_ms" in m)
            + f"; share {share:.3f}, kernel ratio {entry.get('kernel_ratio', float('nan')):.3f}")
        # Attention structure of these inputs (same estimators as on the model).
        if run.time_left() > 40:
            stats = attention_stats(q[:, :8], k[:, :2], gamma=run.fp["gamma"], tau=run.fp["tau"], block_size=block)
            entry["structure_stats"] = {n: s for n, s in stats.items() if not n.endswith("_per_head")}
        q = k = v = ref_out = pattern = sel = None  # free before the next length
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- report
def table(data: dict) -> list[str]:
    lines = []
    for c in data["checks"]:
        lines.append(f"check {c['name']:<20} L={c['length']:>6}  rel err {c['rel_err']:.2e}  {'OK' if c['ok'] else 'FAIL'}")
    if data.get("best_tiles"):
        lines.append(f"best tiles (BLOCK_M, BLOCK_N, warps, stages): {tuple(data['best_tiles'])}")
    names = ["dense_cudnn", "dense_flash", "dense_default", "flexprefill", "flexprefill_kernel",
             "flexprefill_estimate", "token_sparse", "token_sparse+flexprefill"]
    lines.append(f"{'method':<26}" + "".join(f"{e['length']:>14}" for e in data["bench"]))
    for n in names:
        if not any(n in e["methods"] for e in data["bench"]):
            continue
        cells = []
        for e in data["bench"]:
            m = e["methods"].get(n, {})
            cells.append(f"{m['median_ms']:9.2f} ms" + (f" {m['speedup_vs_dense']:4.1f}x" if "speedup_vs_dense" in m else "")
                         if "median_ms" in m else "-")
        lines.append(f"{n:<26}" + "".join(f"{c:>14}" for c in cells))
    for label, fn in [
        ("blocks visited (FP)", lambda e: f"{e['methods']['flexprefill']['visited_share']:.3f}"),
        ("kept share (TS)", lambda e: f"{e['methods']['token_sparse'].get('kept_share', float('nan')):.3f}"),
        ("FP share of kept (comp)",
         lambda e: f"{e['methods']['token_sparse+flexprefill'].get('visited_share_of_kept', float('nan')):.3f}"),
        ("kernel/(dense*share)", lambda e: f"{e.get('kernel_ratio', float('nan')):.3f}"),
    ]:
        lines.append(f"{label:<26}" + "".join(f"{fn(e):>14}" for e in data["bench"]))
    if data["bench"]:
        ratios = [e["kernel_ratio"] for e in data["bench"] if "kernel_ratio" in e]
        lines.append(f"target kernel ratio <= {TARGET_RATIO}: " + ("met" if ratios and max(ratios) <= TARGET_RATIO else "NOT met"))
        last = data["bench"][-1]
        comp = last["methods"].get("token_sparse+flexprefill", {}).get("speedup_vs_dense")
        if comp is not None:
            lines.append(f"composition at L={last['length']}: {comp:.2f}x vs {last.get('dense_reference')} "
                         f"(target >= {TARGET_COMPOSITION_SPEEDUP}x at 131072)")
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lengths = [e["length"] for e in data["bench"]]
    for n in ["dense_cudnn", "dense_flash", "dense_default", "flexprefill", "flexprefill_kernel",
              "token_sparse", "token_sparse+flexprefill"]:
        ys = [e["methods"].get(n, {}).get("median_ms") for e in data["bench"]]
        if any(y is not None for y in ys):
            ax1.plot(lengths, [y if y is not None else float("nan") for y in ys], marker="o", label=n)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("sequence length")
    ax1.set_ylabel("time (ms, median)")
    ax1.set_title("one attention layer")
    ax1.legend(fontsize=7)
    ratios = [e.get("kernel_ratio", float("nan")) for e in data["bench"]]
    shares = [e["methods"]["flexprefill"]["visited_share"] for e in data["bench"]]
    ax2.bar([str(x) for x in lengths], ratios, color="tab:blue", label="kernel / (dense x share)")
    ax2.axhline(TARGET_RATIO, color="tab:red", linestyle="--", label=f"target {TARGET_RATIO}")
    for i, s in enumerate(shares):
        ax2.text(i, ratios[i] if ratios[i] == ratios[i] else 0, f"share {s:.2f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xlabel("sequence length")
    ax2.set_title("FlexPrefill kernel vs dense scaled by blocks visited")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{data['env'].get('gpu', data['env']['device'])}: {data['shapes']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (results.json, plot.png, log.txt)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: checks the script's logic")
    parser.add_argument("--lengths", default=None, help="comma-separated lengths (default 32768,65536,131072)")
    parser.add_argument("--time-limit", type=float, default=220.0, help="seconds before remaining lengths are skipped")
    parser.add_argument("--skip-sweep", action="store_true", help="use the default tiles")
    args = parser.parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        parser.error("no CUDA device: use --small for a CPU run")
    started = time.time()
    run = Run(args)
    run.log(f"env: {run.data['env']}")
    for stage, fn in [("checks", run_checks), ("tile sweep", None if args.skip_sweep else run_tile_sweep),
                      ("bench", run_bench)]:
        if fn is None:
            continue
        t0 = time.time()
        try:
            with torch.no_grad():
                fn(run)
        except Exception as err:  # keep what was measured; record the failure
            run.data.setdefault("errors", []).append(f"{stage}: {type(err).__name__}: {err}")
            run.log(f"ERROR in {stage}: {type(err).__name__}: {err}")
        run.data.setdefault("stage_seconds", {})[stage] = time.time() - t0
    run.data["bench"].sort(key=lambda e: e["length"])
    run.data["total_seconds"] = time.time() - started
    (run.out / "results.json").write_text(json.dumps(run.data, indent=1))
    if run.data["bench"]:
        plot(json.loads((run.out / "results.json").read_text()), run.out / "plot.png")
    lines = table(run.data)
    (run.out / "table.txt").write_text("\n".join(lines) + "\n")
    run.log(f"total {run.data['total_seconds']:.0f} s; wrote {run.out}/results.json, plot.png, table.txt")
    print("\n".join(lines))
    failed = [c for c in run.data["checks"] if not c["ok"]] or run.data.get("errors")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
