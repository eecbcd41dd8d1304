#!/usr/bin/env python3
"""TMA probe (H200): the block-sparse kernel loading K/V through TMA tensor
descriptors, against the pointer-load kernel and dense cuDNN SDPA.

Llama-3.1-8B attention shapes (B=1, 32 query heads, 8 KV heads, D=128, bf16,
torch.randn inputs) at L=32768 and 131072, random causal block masks of block
128 at ~37% of the causal blocks per head (diagonal and block 0 always kept).
Per length: every TMA variant against the pointer kernel (max abs diff, rel err),
then every variant and cuDNN timed with triton.testing.do_bench(warmup=25,
rep=100), interleaved over ROUNDS rounds (the median is reported), and
ratio = kernel_ms / (cudnn_ms * visited share). Also records each compiled
variant's shared memory, registers, spills and TTGIR load ops (TMA copies vs
cp.async), which tells whether the loads were pipelined. About 30 s on the GPU plus compiles.

    PYTHONPATH=src python3 scripts/gpu_tma_probe.py OUTDIR            # -> OUTDIR/tma_probe.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 scripts/gpu_tma_probe.py OUTDIR --small   # CPU logic check
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokensparse.kernels import block_sparse as bs

BLOCK = 128
DENSITY = 0.37
ROUNDS = 3
TIMING_LIMIT_S = 30.0  # per length: later rounds are skipped past it
VARIANTS = [  # name, tma, tiles (BLOCK_M, BLOCK_N, num_warps, num_stages); None: the launcher's default
    ("pointer", False, None),
    ("tma", True, None),
    ("tma_128x128_w8_s2", True, (128, 128, 8, 2)),
    ("tma_128x64_w8_s3", True, (128, 64, 8, 3)),
    ("tma_128x64_w8_s4", True, (128, 64, 8, 4)),
    ("tma_128x128_w8_s4", True, (128, 128, 8, 4)),  # likely over the 227 KiB of shared memory
]


def random_pattern(batch, heads, length, gen, device):
    nb = bs.num_blocks(length, BLOCK)
    mask = torch.rand(batch, heads, nb, nb, generator=gen, device=device) < DENSITY
    mask |= torch.eye(nb, dtype=torch.bool, device=device)
    mask[..., 0] = True
    return bs.lists_from_block_mask(mask)


def dense_fn(q, k, v):
    """Dense causal cuDNN SDPA (PyTorch's pick off CUDA); K/V repeated outside the call if GQA is refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]

    def call(kk, vv, gqa):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    try:
        call(k, v, True)
        return (lambda: call(k, v, True)), "enable_gqa"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        call(kr, vr, False)
        return (lambda: call(kr, vr, False)), "repeated_kv"


def cpu_bench(fn, warmup=25, rep=100):
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def compiled_kernels() -> dict:
    """id -> CompiledKernel of the block-sparse kernel's JIT caches (empty under the interpreter)."""
    found = {}
    try:
        for entry in getattr(bs._kernel(), "device_caches", {}).values():
            for ck in entry[0].values():  # entry = (kernel_cache, ...) in triton 3.x
                found[id(ck)] = ck
    except (TypeError, AttributeError, IndexError):  # another cache layout: no compile info
        pass
    return found


def describe(ck) -> dict:
    ttgir = ck.asm.get("ttgir", "")
    return {
        "shared_bytes": ck.metadata.shared,
        "num_warps": ck.metadata.num_warps,
        "num_stages": ck.metadata.num_stages,
        "n_regs": getattr(ck, "n_regs", None),
        "n_spills": getattr(ck, "n_spills", None),
        "ttgir_tma_copies": len(re.findall(r"async_tma_copy_global_to_local", ttgir)),
        "ttgir_cp_async": len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
        "ttgir_plain_loads": len(re.findall(r"tt\.load ", ttgir)),
    }


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def probe_length(length, shapes, device, bench, log) -> dict:
    batch, heads, kv_heads, dim = shapes
    gen = torch.Generator(device=device).manual_seed(length)
    q, k, v = (
        torch.randn(batch, h, length, dim, generator=gen, device=device).to(torch.bfloat16)
        for h in (heads, kv_heads, kv_heads)
    )
    idx, cnt = random_pattern(batch, heads, length, gen, device)
    lens = torch.full((batch, heads), length, device=device)
    share = float(bs.visited_share(cnt, lens, BLOCK).mean())
    res = {"length": length, "visited_share": share, "tma_unsupported": bs.tma_unsupported(q, k, v), "variants": {}}
    log(f"L={length}: share {share:.3f}, tma_unsupported: {res['tma_unsupported']}")

    # -- one run each: compile info, then TMA against the pointer kernel --
    fns, outs = {}, {}
    for name, tma, tiles in VARIANTS:
        entry = res["variants"][name] = {"tma": tma, "tiles": tiles}
        buf = torch.empty_like(q)
        fn = lambda buf=buf, tma=tma, tiles=tiles: bs.block_sparse_attention(
            q, k, v, idx, cnt, BLOCK, out=buf, backend="triton", tiles=tiles, tma=tma
        )
        before = compiled_kernels()
        try:
            outs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # OutOfResources, compile errors, tma=True refused
            entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"  {name}: {entry['error']}")
            continue
        entry["compiled"] = [describe(ck) for i, ck in compiled_kernels().items() if i not in before]
        fns[name] = fn
        if name != "pointer" and "pointer" in outs:
            diff = float((outs[name].float() - outs["pointer"].float()).abs().max())
            err = rel_err(outs[name], outs["pointer"])
            entry.update(max_abs_diff_vs_pointer=diff, rel_err_vs_pointer=err, nan=bool(outs[name].isnan().any()))
            log(f"  {name}: max abs diff {diff:.3g}, rel err {err:.3g}")
        log(f"  {name}: compiled {entry['compiled']}")
    del outs
    dense, how = dense_fn(q, k, v)
    fns["cudnn"] = dense
    res["cudnn_call"] = how

    # -- timing, interleaved so drift hits every variant alike --
    times = {name: [] for name in fns}
    deadline = time.time() + TIMING_LIMIT_S
    for r in range(ROUNDS):
        if r and time.time() > deadline:
            log(f"  time limit: stopped after {r} rounds")
            break
        for name, fn in fns.items():
            times[name].append(bench(fn, warmup=25, rep=100))
    cudnn_ms = statistics.median(times["cudnn"])
    res["cudnn_ms"], res["cudnn_ms_rounds"] = cudnn_ms, times["cudnn"]
    for name in fns:
        if name == "cudnn":
            continue
        ms = statistics.median(times[name])
        entry = res["variants"][name]
        entry.update(ms=ms, ms_rounds=times[name], ratio=ms / (cudnn_ms * share))
    return res


def main(out_dir: str, small: bool = False) -> None:
    device = torch.device("cpu" if small else "cuda")
    shapes = (1, 4, 2, 64) if small else (1, 32, 8, 128)
    lengths = [300, 520] if small else [32768, 131072]
    if small:
        bench = cpu_bench
    else:
        import triton.testing

        bench = triton.testing.do_bench
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   capability=list(torch.cuda.get_device_capability()))
    data = {"env": env, "shapes": dict(zip(("batch", "heads", "kv_heads", "head_dim"), shapes)), "dtype": "bfloat16",
            "block": BLOCK, "density": DENSITY, "timing": "median over rounds of do_bench(warmup=25, rep=100)",
            "lengths": []}
    for length in lengths:
        data["lengths"].append(probe_length(length, shapes, device, bench, print))
        (out / "tma_probe.json").write_text(json.dumps(data, indent=1))
    print(f"\n{'L':>7} {'variant':<20} {'ms':>9} {'ratio':>6} {'vs pointer':>10}")
    for res in data["lengths"]:
        base = res["variants"]["pointer"].get("ms")
        print(f"{res['length']:>7} {'cudnn (dense)':<20} {res['cudnn_ms']:>9.3f}   share {res['visited_share']:.3f}")
        for name, e in res["variants"].items():
            if "ms" in e:
                speed = f"{base / e['ms']:.3f}x" if base else ""
                print(f"{res['length']:>7} {name:<20} {e['ms']:>9.3f} {e['ratio']:>6.3f} {speed:>10}")
            else:
                print(f"{res['length']:>7} {name:<20} {e.get('error', 'not run')}")
    print(f"wrote {out / 'tma_probe.json'}")


if __name__ == "__main__":
    main(sys.argv[1], small="--small" in sys.argv[2:])
