"""Print the H200 table of the attention and prefill benchmarks beside the issue's targets.

Usage: python scripts/gpu_report.py ATTENTION_JSON [PREFILL_JSON]
"""

from __future__ import annotations

import json
import sys


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def attention_table(data: dict) -> None:
    meta = data["meta"]
    print(f"# attention: {meta.get('gpu')} torch {meta.get('torch')} triton {meta.get('triton')} cudnn {meta.get('cudnn')}")
    for r in data["results"]:
        dense = r["dense"]
        d_cudnn = dense.get("cudnn", {}).get("ms")
        d_flash = dense.get("flash", {}).get("ms")
        mem_dense = (dense.get("cudnn", {}).get("memory") or {}).get("peak_bytes")
        print(f"B={r['batch']} L={r['seq_len']}: dense cudnn {_fmt(d_cudnn)} ms ({dense.get('cudnn', {}).get('gqa', '-')}),"
              f" flash {_fmt(d_flash)} ms, peak {_fmt(mem_dense and mem_dense / 2**30)} GiB")
        print(f"  {'mode':<28}{'kept':>6}{'score':>7}{'budg':>6}{'topk':>6}{'gath':>6}{'attend':>9}{'scat':>6}"
              f"{'total':>9}{'ovh':>6}{'t/att':>6}{'xcuDNN':>7}{'xFA2':>6}{'ideal':>6}{'mem':>6}  sdpa")
        for e in r["sparse"]:
            st = e["stages_ms"]
            print(
                f"  {e['label']:<28}{e['kept_share']:6.1%}{_fmt(st.get('score')):>7}{_fmt(st.get('budget')):>6}"
                f"{_fmt(st.get('top_k')):>6}{_fmt(st.get('gather')):>6}{_fmt(st.get('attend')):>9}{_fmt(st.get('scatter')):>6}"
                f"{_fmt(e['total_ms']):>9}{_fmt(e.get('overhead_ms')):>6}{_fmt(e.get('total_over_attend')):>6}"
                f"{_fmt(e.get('speedup_vs_cudnn')):>7}{_fmt(e.get('speedup_vs_flash')):>6}{_fmt(e.get('ideal_speedup'), '.1f'):>6}"
                f"{_fmt(e.get('memory_over_cudnn')):>6}  {e.get('attend_backend', '-')}"
            )
            if "overhead_queued_ms" in e:
                print(f"  {'  queued (GPU time alone)':<28}{'':6}{'':31}{_fmt(e.get('attend_queued_ms')):>9}{'':6}"
                      f"{_fmt(e['total_queued']['median_ms']):>9}{_fmt(e['overhead_queued_ms']):>6}"
                      f"{_fmt(e['total_over_attend_queued']):>6}")
    rows = [r for r in data["results"] if r["batch"] == 1 and r["seq_len"] == 131072]
    if not rows:
        return
    r = rows[0]
    by = {e["label"]: e for e in r["sparse"]}
    print("# targets at 128K, batch 1 (one layer)")
    for label, speed_target in (("keep 0.5", 3.6), ("keep 0.25", 13.0)):
        e = by.get(label)
        if not e:
            continue
        print(f"  {label}: overhead {_fmt(e.get('overhead_ms'))} ms, queued {_fmt(e.get('overhead_queued_ms'))} ms"
              f" (target <= 1.5); total/attend-on-kept {_fmt(e.get('total_over_attend'))},"
              f" queued {_fmt(e.get('total_over_attend_queued'))} (target <= 1.1);"
              f" vs dense cuDNN x{_fmt(e.get('speedup_vs_cudnn'))} (target >= {speed_target});"
              f" peak memory x{_fmt(e.get('memory_over_cudnn'))} of dense (target <= 1.10)")


def prefill_table(data: dict) -> None:
    meta = data["meta"]
    print(f"# prefill: {meta.get('model')} sparse layers {meta.get('sparse_layers')}")
    for r in data["results"]:
        parts = []
        for label, e in r["modes"].items():
            share = f" kept {e['mean_kept_share']:.0%}" if "mean_kept_share" in e else ""
            mem = e.get("peak_memory_bytes")
            parts.append(f"{label} {e['ttft_ms'] / 1e3:.2f}s x{e['speedup_vs_dense']:.2f}{share}"
                         + (f" {mem / 2**30:.0f}GiB" if mem else ""))
        print(f"  L={r['seq_len']}: " + " | ".join(parts))


if __name__ == "__main__":
    for path in sys.argv[1:]:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            print(f"{path}: {err}")
            continue
        (prefill_table if "modes" in json.dumps(data["results"][:1]) else attention_table)(data)
