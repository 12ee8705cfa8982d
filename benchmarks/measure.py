"""How the benchmarks measure: wall seconds synchronised with the GPU (of a call, or of a whole decomposition),
peak GPU memory, a GPU held to a budget, host memory, CUDA kernel time by group from torch.profiler, and the
relative L2 error between two outputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from layered_core.memory import GiB


def sync() -> None:
    """Wait for the GPU's queued work, where there is a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """The most GPU memory torch's allocator held since the last ``reset_peak``, in GiB; NaN without a GPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def host_memory() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / GiB
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def hold_back(budget: int, held: int = 0) -> torch.Tensor | None:
    """Allocate all free GPU memory but ``budget`` bytes less the ``held`` bytes that torch's allocator holds for
    this process already, so that what the process can use is ``budget``, as on a smaller GPU. Returns the filler
    (None when there was no more free)."""
    free, total = torch.cuda.mem_get_info()
    print(
        f"GPU before hold-back: {free / GiB:.2f} GiB free of {total / GiB:.2f} GiB, {held / GiB:.2f} held", flush=True
    )
    if free <= budget - held:
        print(f"only {free / GiB:.2f} GiB free: nothing held back", flush=True)
        return None
    filler = torch.empty(free - (budget - held), dtype=torch.uint8, device="cuda")
    free, _ = torch.cuda.mem_get_info()
    print(f"held back {filler.numel() / GiB:.2f} GiB: {free / GiB:.2f} GiB free now (budget {budget / GiB:.2f})")
    return filler


def timed(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Wall seconds per call after warm-up, synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def timed_decomposition(
    pipeline, image, prompt: str, options, callback=None, warmup_prompt: str | None = None
) -> tuple[object, object, float]:
    """A LayeredPipeline's decomposition under ``options``, after a warm-up of one step (cuDNN and cuBLAS
    heuristics, the allocator, compilation) with ``warmup_prompt`` (default ``prompt``; a given prompt skips a
    slow auto-caption), the peak memory counted from its start: (warm-up's result, result, wall seconds)."""
    warm = pipeline(image, prompt if warmup_prompt is None else warmup_prompt, replace(options, steps=1))
    reset_peak()
    start = time.perf_counter()
    result = pipeline(image, prompt, options, callback=callback)
    return warm, result, time.perf_counter() - start


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cuda_profile(fn: Callable[[], object]) -> torch.profiler.profile:
    """torch.profiler's record of the CUDA kernels of one call of ``fn``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        fn()
        sync()
    return profiler


def kernel_groups(profiler) -> tuple[dict[str, float], list[tuple[float, str, str, int]]]:
    """CUDA microseconds of a torch.profiler run by group (matrix products, attention, the rest), and the
    kernels as (us, group, name, calls). Triton kernels are grouped by what they fuse: one that fuses the
    RoPE into the attention's inputs counts as attention, although it is elementwise work."""
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for event in profiler.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if cuda_us <= 0 or event.key.startswith(("aten::", "cuda")):
            continue
        key = event.key.lower()
        # attention first: FlashAttention-4's CuTe kernels carry "cutlass" in their names too
        if any(tag in key for tag in ("flash", "fmha", "attention", "sdpa", "cudnn")):
            group = "attention"
        elif any(tag in key for tag in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "_mm_")):
            group = "matmul"
        else:
            group = "other"
        groups[group] += cuda_us
        kernels.append((cuda_us, group, event.key[:100], event.count))
    return groups, kernels
