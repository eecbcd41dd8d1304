"""Timing and memory helpers shared by the benchmarks.

On CUDA: warm-up, then the median of repeated runs timed with CUDA events; the
repeat count adapts to the run time (at least ``min_reps``). On the CPU: the
same with ``time.perf_counter``. Peak memory is PyTorch's allocator peak
during one run (CUDA only).
"""

from __future__ import annotations

import datetime
import functools
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms, "reps": self.reps}


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    budget_ms: float = 1000.0,
    queued: bool = False,
) -> Timing:
    """Median time of ``fn()`` after ``warmup`` runs; about ``budget_ms`` of timed runs.

    ``queued`` (CUDA): the GPU is held busy until the host has issued all of
    ``fn``'s launches, so the events time the GPU work alone, as inside a model's
    forward where the host runs ahead of the GPU. Without it a lone call's time
    also counts the GPU waiting for the host's launches.
    """
    for _ in range(warmup):
        fn()
    hold_ms = 0.0
    if queued and device.type == "cuda":
        # Twice the host's time to issue one call, measured on an idle GPU.
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        hold_ms = 2e3 * (time.perf_counter() - t0) + 0.5
        torch.cuda.synchronize(device)
    first = _time_once(fn, device, hold_ms)
    reps = int(min(max_reps, max(min_reps, budget_ms // max(first, 1e-3))))
    times = [first] + [_time_once(fn, device, hold_ms) for _ in range(reps - 1)]
    return Timing(statistics.median(times), min(times), max(times), len(times))


@functools.cache
def _sleep_cycles_per_ms(device_index: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # first launch loads the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def _time_once(fn: Callable[[], Any], device: torch.device, hold_ms: float = 0.0) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if hold_ms:
            # A busy-wait kernel ahead of the start event: the launches below queue behind it.
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda._sleep(int(hold_ms * _sleep_cycles_per_ms(index)))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, int] | None:
    """Allocator peak during one ``fn()``: total (inputs included) and above the start."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {"peak_bytes": int(peak), "extra_bytes": int(peak - base), "start_bytes": int(base)}


def machine_info(device: torch.device) -> dict[str, Any]:
    """Machine and library versions, recorded in every benchmark JSON."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info
