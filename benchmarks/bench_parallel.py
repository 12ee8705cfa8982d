"""Seconds per sampling step (both CFG branches and the guidance) of the full-size VLD-MMDiT laid out over the GPUs
torchrun gives: every cfg x sequence layout that fits, its speed-up and efficiency against one GPU, and its error
against the single-GPU output; the parallel code path at one process against the plain path, in the same run.

    torchrun --nproc-per-node 8 -m benchmarks.bench_parallel                  # every layout that fits 8 GPUs
    torchrun --nproc-per-node 8 -m benchmarks.bench_parallel --layouts "cfg=2,seq=4;seq=8" --compile
    torchrun --nproc-per-node 1 -m benchmarks.bench_parallel                  # one GPU: the path's overhead
    torchrun --nproc-per-node 4 -m benchmarks.bench_parallel --tiny --device cpu   # a smoke test on gloo

A layout of fewer processes than were started runs on all of them at once, as several image groups (data
parallel), each timed on its own: the figures are one image's. Every process builds the same random weights from one
seed. The error is the relative L2 of rank 0's guided velocity against the plain single-GPU step's on rank 0; the
plain step is two batch-1 forwards or one batch-2 forward as the sampler chooses for the prompts' lengths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.measure import relative_l2, sync
from benchmarks.workloads import Shape, add_shape_arguments, random_model
from layered_core.attention import attention_backend
from layered_core.checkpoints import load_mmdit
from layered_core.distributed.cfg import ParallelSampling
from layered_core.distributed.group import Launch, all_gather_json, make_groups, start, stop
from layered_core.distributed.layout import Layout, parse_layout, sequence_degrees
from layered_core.mmdit import MMDiTConfig
from layered_core.ops import quantize_linears_fp8, set_fp8_compute
from layered_core.sampling import PromptEmbeddings, default_branches, guided_velocity

CFG_SCALE = 4.0
# 12 heads, so that the sequence splits over 2, 3, 4 or 6 processes
TINY = MMDiTConfig(num_layers=2, num_heads=12, head_dim=16, text_dim=48, axes_dims=(4, 6, 6))


def memory_line() -> str:
    """This process's host memory: peak and current resident, and how much of it is private (anonymous) or file
    pages (a memory-mapped checkpoint, shared with the other processes on the host)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    gib = {key: int(status[key].split()[0]) / 2**20 for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    return ", ".join(f"{key} {value:.2f} GiB" for key, value in gib.items())


def inputs(config: MMDiTConfig, shape: Shape, negative_tokens: int, dtype, device):
    """One image's step inputs (seed 1): latents, condition, prompt and negative prompt embeddings."""
    side = shape.resolution // 8
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, 16, shape.layers + 1, side, side, generator=gen, device=device)
    condition = torch.randn(1, 16, side, side, generator=gen, device=device)
    prompt, negative = (
        PromptEmbeddings(torch.randn(1, n, config.text_dim, generator=gen, device=device).to(dtype))
        for n in (shape.text_tokens, negative_tokens)
    )
    return latents, condition, prompt, negative


def layouts_to_run(text: str, world_size: int, heads: int) -> list[Layout]:
    """The layouts of ``--layouts`` ("all": every cfg x sequence that divides the processes and the heads), each
    spread over all processes as image groups; one GPU's first."""
    if text == "all":
        pairs = [(c, s) for c in (1, 2) for s in sequence_degrees(heads) if world_size % (c * s) == 0]
    else:
        pairs = [
            (layout.cfg, layout.sequence) for layout in map(lambda p: parse_layout(p, world_size), text.split(";"))
        ]
    pairs = [(1, 1)] + [p for p in dict.fromkeys(pairs) if p != (1, 1)]
    return [Layout(world_size // (c * s), c, s) for c, s in pairs]


def timed_steps(step, warmup: int, iters: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``step()`` after ``warmup`` calls, and its last output."""
    for _ in range(warmup):
        out = step()
    sync()
    seconds = []
    for _ in range(iters):
        start_time = time.perf_counter()
        out = step()
        sync()
        seconds.append(time.perf_counter() - start_time)
    return statistics.median(seconds), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--negative-tokens", type=int, help="the negative prompt's length (default: --text-tokens)")
    parser.add_argument("--layouts", default="all", help='"all", or layouts such as "cfg=2,seq=4;seq=8"')
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--overhead-rounds", type=int, default=5, help="plain and parallel steps alternated, each")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    parser.add_argument("--fp8", action="store_true", help="e4m3 weights with rowwise-scaled fp8 products")
    parser.add_argument("--tiny", action="store_true", help="a 2-block model of 12 heads, float32 (smoke test)")
    parser.add_argument(
        "--transformer",
        help="a transformer file every process loads through its memory map (else random weights): the host memory "
        "lines then show what loading it cost each process",
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(name, value)  # a plain ``python -m`` is one process
    run = start(Launch.from_environment(), args.device, args.timeout)
    rank, world = run.rank, run.world_size
    config = TINY if args.tiny else MMDiTConfig.full()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = Shape.of(args)
    if args.tiny and args.resolution == Shape.resolution:
        shape = Shape(96, 2, 12)
    negative_tokens = args.negative_tokens or shape.text_tokens

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    started = time.perf_counter()
    if args.transformer:
        model = load_mmdit(args.transformer, dtype=dtype, device=run.device, fp8="keep")
        config = model.config
    else:
        model = random_model(config, dtype, run.device)
    if args.fp8:  # the linears still in bf16
        quantize_linears_fp8(model)
        set_fp8_compute(model, "auto")
        torch.cuda.empty_cache()
    if args.compile:
        # every layout is another shape and another attention function: compiled once each, none left eager
        torch._dynamo.config.cache_size_limit = 64
        model.compile_blocks()
    sync()
    say(f"model ready in {time.perf_counter() - started:.1f} s on each of {world} processes ({run.backend})")
    for index, line in enumerate(all_gather_json(memory_line(), run.control)):
        say(f"  rank {index} host memory: {line}")
    latents, condition, prompt, negative = inputs(config, shape, negative_tokens, dtype, run.device)
    sigma = torch.full((1,), 0.75, device=run.device)

    def stepper(model_call, branches):
        steps = branches(model_call, condition, prompt, negative, shape.layers)

        def step():
            cond, uncond = steps(latents, sigma)
            return guided_velocity(cond, uncond, CFG_SCALE, True)

        return step

    rows = []
    with torch.inference_mode():
        plain = stepper(model, default_branches(prompt, negative))
        one = make_groups(run, Layout(world, 1, 1))
        one_process = ParallelSampling(model, one)
        parallel_one = stepper(one_process.model, one_process.branches)
        timed_steps(plain, args.warmup, 1)
        timed_steps(parallel_one, args.warmup, 1)
        plain_seconds, parallel_seconds = [], []
        for _ in range(args.overhead_rounds):  # alternated, so that clocks and heat drift over both alike
            plain_seconds.append(timed_steps(plain, 0, 1)[0])
            parallel_seconds.append(timed_steps(parallel_one, 0, 1)[0])
        truth = timed_steps(plain, 0, 1)[1].float()
        one_process_error = relative_l2(timed_steps(parallel_one, 0, 1)[1], truth)
        one_gpu = statistics.median(plain_seconds)
        overhead = statistics.median(parallel_seconds) / one_gpu - 1
        say(
            f"one process: plain path {one_gpu:.4f} s/step, parallel path {statistics.median(parallel_seconds):.4f} "
            f"s/step: {overhead:+.2%} (medians of {args.overhead_rounds} alternated steps)"
        )
        for layout in layouts_to_run(args.layouts, world, config.num_heads):
            if layout.group_size == 1:
                peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
                rows.append((layout, one_gpu, one_process_error, peak))
                continue
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sampling = ParallelSampling(model, make_groups(run, layout))
            seconds, out = timed_steps(stepper(sampling.model, sampling.branches), args.warmup, args.iters)
            seconds = max(all_gather_json(seconds, run.control))  # the slowest image group's
            peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
            rows.append((layout, seconds, relative_l2(out, truth), peak))
            say(f"{layout}: {seconds:.4f} s/step")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    say(
        f"\nVLD-MMDiT of {config.num_layers} blocks x {config.num_heads} heads "
        f"({args.transformer or 'random weights'}), {'fp8' if args.fp8 else str(dtype).split('.')[-1]}"
        f"{', compiled' if args.compile else ''}, {shape.resolution}x{shape.resolution} px, {shape.layers} layers, "
        f"prompts of {shape.text_tokens} and {negative_tokens} tokens, {world} x {device_name}, torch "
        f"{torch.__version__}, attention {attention_backend()}"
    )
    header = f"{'layout':<22} {'GPUs/image':>10} {'s/step':>8} {'speed-up':>9} {'efficiency':>10}"
    say(f"{header} {'rel L2':>9} {'peak GiB':>9}")
    for layout, seconds, error, peak in rows:
        speed_up = one_gpu / seconds
        say(
            f"{str(layout):<22} {layout.group_size:>10} {seconds:>8.4f} {speed_up:>8.2f}x "
            f"{speed_up / layout.group_size:>9.0%} {error:>9.2e} {peak / 2**30:>9.1f}"
        )
    say("rel L2: rank 0's guided velocity against the plain one-GPU step's")
    dist.barrier(group=run.control)
    stop()


if __name__ == "__main__":
    main()
