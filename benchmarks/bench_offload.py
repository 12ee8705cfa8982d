"""Block weight streaming of the full-size VLD-MMDiT on a GPU: seconds per sampling step with the blocks
streamed under a VRAM budget, against all of them resident. Prints a table.

    python -m benchmarks.bench_offload                          # all resident, then the 24 and 16 GiB plans
    python -m benchmarks.bench_offload --vram-gb 24 --hold-back --full-step-seconds batch2=0.99 ...
    python -m benchmarks.bench_offload --vram-gb 16 --hold-back --pipeline   # a whole decomposition
    python -m benchmarks.bench_offload --vram-gb 12 --pipeline --resident-step --hold-back --caption --text-fp8
    python -m benchmarks.bench_offload --tiny [--pipeline --caption --resident-step]   # CPU smoke test

Random bf16 weights (generated on the GPU, kept on the host), 640 px, 4 layers, 256 text tokens. A step
is cond + uncond, timed three ways: ``batch2`` (equal prompt lengths: one forward of batch 2),
``2x batch1`` (prompts of different lengths, what the full-memory pipeline runs: two forwards) and
``batch2 masked`` (the shorter prompt padded under a mask: one forward, what the pipeline runs when
blocks are streamed). ``--hold-back`` first fills the GPU so that only the budget is free, as a smaller
GPU would be; without it the budgets are only planned for, and the peak columns say whether they held.
The blocks are compiled on a GPU (``--compile off``: eager).

``--pipeline`` runs a whole decomposition under the budget and prints each stage's seconds, where it ran and its
peak GPU memory, the median step, and with ``--resident-step`` its ratio to a step with every block resident
(timed first, before the hold-back, with the same masked batch); ``--caption`` leaves the prompt empty, so the
auto-caption (of ``--caption-tokens`` tokens) runs where the budget puts the text encoder (fp8 kept with
``--text-fp8``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.measure import hold_back, host_memory, timed
from benchmarks.offload_pipeline import run_pipeline
from benchmarks.workloads import (
    Shape,
    add_shape_arguments,
    random_model,
    step_inputs,
)
from layered_core.compile_policy import COMPILE_SETTINGS, compile_choice
from layered_core.memory import WORKSPACE_RESERVE, GiB, activation_bytes
from layered_core.mmdit import MMDiTConfig
from layered_core.offload import stream_blocks

MODES = ("batch2", "2x batch1", "batch2 masked")
DEFAULT_BUDGETS = [24.0, 16.0]
UNCOND_TOKENS = 8  # the negative prompt " " with the template's closing tokens is a few tokens long


def transformer_config(args) -> MMDiTConfig:
    """The full-size transformer, or with --tiny the tiny one with 4 blocks."""
    return replace(MMDiTConfig.tiny(), num_layers=4) if args.tiny else MMDiTConfig.full()


def host_transformer(config: MMDiTConfig, fp8: bool, generate_on: str):
    """The model on the host with random bf16 weights drawn on ``generate_on`` (with ``fp8``, its blocks' linears
    in float8 with scales), to be streamed."""
    return random_model(config, torch.bfloat16, "cpu", generate_on=generate_on, fp8_blocks=fp8)


def mode_inputs(config: MMDiTConfig, shape: Shape, device) -> dict[str, list[tuple]]:
    """Inputs of one step for each mode: a list of forwards, each (latents, condition, text, sigma, mask)."""
    latents, condition, text, sigma, _, _ = step_inputs(config, shape, torch.bfloat16, device, batch=1)
    gen = torch.Generator(device=device).manual_seed(2)
    uncond = torch.randn(1, UNCOND_TOKENS, config.text_dim, generator=gen, device=device).to(torch.bfloat16)
    two = (torch.cat([latents, latents]), torch.cat([condition, condition]), sigma.repeat(2))
    padded = torch.nn.functional.pad(uncond, (0, 0, 0, shape.text_tokens - UNCOND_TOKENS))
    mask = torch.ones(2, shape.text_tokens, dtype=torch.bool, device=device)
    mask[1, UNCOND_TOKENS:] = False
    return {
        "batch2": [(two[0], two[1], torch.cat([text, text]), two[2], None)],
        "2x batch1": [(latents, condition, text, sigma, None), (latents, condition, uncond, sigma, None)],
        "batch2 masked": [(two[0], two[1], torch.cat([text, padded]), two[2], mask)],
    }


def time_step(model, forwards, warmup: int, iters: int) -> float:
    """Median wall seconds of one step (its forwards), synchronised around each."""

    def step():
        for latents, condition, text, sigma, mask in forwards:
            model(latents, condition, text, sigma, mask)

    return statistics.median(timed(step, warmup, iters))


def h2d_seconds(streamer, device: str, repeats: int = 5) -> tuple[int, float, bool]:
    """(bytes, median seconds, pinned) of copying the last block's packed host buffer to the device."""
    index = len(streamer.block_bytes) - 1
    nbytes = streamer.block_bytes[index]
    source = streamer.host_buffers[index][:nbytes]
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device == "cpu":
        start = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        return nbytes, (time.perf_counter() - start) / repeats, False
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            target.copy_(source, non_blocking=True)
            end.record(stream)
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
    del target
    return nbytes, statistics.median(times), streamer.pinned_bytes == streamer.host_bytes


def parse_full_seconds(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values:
        mode, _, seconds = value.rpartition("=")
        mode = mode or "batch2"
        if mode.replace("_", " ") not in MODES:
            raise SystemExit(f"--full-step-seconds: unknown mode {mode!r}; modes: {', '.join(MODES)}")
        out[mode.replace("_", " ")] = float(seconds)
    return out


def run_forwards(args, device, filler_bytes: int, reserved_base: int) -> None:
    config = transformer_config(args)
    t0 = time.perf_counter()
    model = host_transformer(config, args.fp8, device)
    print(f"model built on the host in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    streamer = stream_blocks(model, device, resident_blocks=0, slots=args.slots, load=False)
    if args.compile:
        model.compile_blocks()
    print(f"blocks packed and pinned in {time.perf_counter() - t0:.1f} s: {streamer.describe()}", flush=True)
    nbytes, copy_seconds, pinned = h2d_seconds(streamer, device)
    gbps = nbytes / copy_seconds / 1e9
    print(f"H2D of one block: {nbytes / 1e9:.3f} GB in {copy_seconds * 1e3:.1f} ms = {gbps:.1f} GB/s")
    print(f"(host buffers page-locked: {pinned}; with cudaHostRegister, which is_pinned() does not see)", flush=True)

    shape = Shape.of(args)
    inputs = mode_inputs(config, shape, device)
    image_tokens = shape.image_tokens
    blocks = len(streamer.block_bytes)
    configurations = []  # (label, budget or None, resident blocks)
    full_fits = True
    if device == "cuda":
        # the all-resident forward runs where the whole model fits (the other weights are on the GPU already)
        free, _ = torch.cuda.mem_get_info()
        activations = activation_bytes(model, image_tokens, args.text_tokens, 2)
        full_fits = free >= sum(streamer.block_bytes) + activations + WORKSPACE_RESERVE
    if full_fits:
        configurations.append(("all resident", None, blocks))
    if args.tiny:
        configurations += [("tiny: K=1", None, 1), ("tiny: K=0", None, 0)]
    else:
        for gb in args.vram_gb:
            plan = streamer.plan(int(gb * GiB), image_tokens, args.text_tokens, 2)
            configurations.append((f"{gb:g} GiB", int(gb * GiB), plan.resident_blocks))

    full = parse_full_seconds(args.full_step_seconds)
    rows = []
    for label, budget, resident in configurations:
        streamer.load(resident)
        for mode in args.modes:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                seconds = time_step(model, inputs[mode], args.warmup, args.iters)
            peak_allocated = peak_reserved = float("nan")
            if device == "cuda":
                peak_allocated = (torch.cuda.max_memory_allocated() - filler_bytes) / GiB
                peak_reserved = (torch.cuda.max_memory_reserved() - reserved_base) / GiB
            if resident == blocks and mode not in full:
                full[mode] = seconds
            rows.append((label, budget, resident, mode, seconds, peak_allocated, peak_reserved))
            if device == "cuda" and torch.cuda.memory_stats().get("num_alloc_retries", 0):
                print(f"allocator retries so far: {torch.cuda.memory_stats()['num_alloc_retries']}")
            print(rows[-1], flush=True)
        streamer.offload()

    rss, hwm = host_memory()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print()
    print(
        f"VLD-MMDiT {'tiny' if args.tiny else 'full size'}, {'fp8 blocks' if args.fp8 else 'bf16'}, "
        f"{args.resolution} px, {args.layers} layers, {args.text_tokens} text tokens (uncond {UNCOND_TOKENS}), "
        f"{args.slots} slots, {name}, torch {torch.__version__}, "
        f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}"
    )
    print(
        f"host: RSS {rss:.1f} GiB (peak {hwm:.1f}), packed blocks {streamer.host_bytes / GiB:.2f} GiB, pinned "
        f"{streamer.pinned_bytes / GiB:.2f} GiB; H2D {gbps:.1f} GB/s for one "
        f"{nbytes / 1e9:.2f} GB block"
    )
    header = f"{'budget':<13} {'K':>3} {'streamed':>8} {'mode':<14} {'s/step':>7} {'ratio':>6} {'alloc GiB':>9}"
    print(header + f" {'resv GiB':>8} {'fits':>5}")
    for label, budget, resident, mode, seconds, allocated, reserved in rows:
        ratio = seconds / full[mode] if mode in full else float("nan")
        fits = "-" if budget is None or reserved != reserved else ("yes" if reserved * GiB <= budget else "NO")
        print(
            f"{label:<13} {resident:>3} {blocks - resident:>8} {mode:<14} {seconds:>7.3f} {ratio:>6.2f} "
            f"{allocated:>9.2f} {reserved:>8.2f} {fits:>5}"
        )
    measured = {mode: s for label, _, k, mode, s, *_ in rows if k == blocks}
    if measured:
        pairs = " ".join(f"{mode.replace(' ', '_')}={s:.3f}" for mode, s in measured.items())
        print(f"for the --hold-back runs: --full-step-seconds {pairs}")
    if "2x batch1" in full:
        streamed = [(label, s) for label, _, k, mode, s, *_ in rows if mode == "batch2 masked" and k < blocks]
        for label, s in streamed:
            print(
                f"pipeline step at {label} (streamed, masked batch) vs full memory (2x batch1): "
                f"{s / full['2x batch1']:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vram-gb", type=float, nargs="+", default=DEFAULT_BUDGETS, help="budgets in GiB")
    parser.add_argument("--hold-back", action="store_true", help="fill the GPU so only the (single) budget is free")
    parser.add_argument("--full-step-seconds", nargs="*", default=[], metavar="MODE=SECONDS")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    add_shape_arguments(parser)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--fp8", action="store_true", help="block linears in float8 with scales (fp8 kept)")
    parser.add_argument(
        "--compile", choices=COMPILE_SETTINGS, default="auto", help="compile the blocks (auto: on a CUDA GPU)"
    )
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pipeline", action="store_true", help="one whole decomposition under the budget")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of --pipeline")
    parser.add_argument("--caption", action="store_true", help="--pipeline: no prompt, the auto-caption writes it")
    parser.add_argument("--caption-tokens", type=int, default=64, help="--caption: tokens the caption writes")
    parser.add_argument("--text-fp8", action="store_true", help="--pipeline: the text encoder's linears in fp8 (kept)")
    parser.add_argument(
        "--resident-step",
        action="store_true",
        help="--pipeline: first time a step with every block resident (before the hold-back), the ratio's yardstick",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    if args.tiny and not args.pipeline:
        args.resolution, args.text_tokens = 128, 16  # a CPU-sized step
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --tiny for the CPU smoke test")
    # the pipeline's --compile policy, for any number of steps: the steady step is what is measured here
    args.compile = compile_choice(args.compile, device, None)[0]
    if args.hold_back and (args.tiny or len(args.vram_gb) != 1):
        raise SystemExit("--hold-back needs a GPU and exactly one --vram-gb budget")
    if args.pipeline and not args.tiny and len(args.vram_gb) != 1:
        raise SystemExit("--pipeline runs under one --vram-gb budget")
    if not args.pipeline and (args.caption or args.text_fp8 or args.resident_step):
        raise SystemExit("--caption, --text-fp8 and --resident-step go with --pipeline")
    if args.pipeline:
        run_pipeline(args, device)  # holds back the GPU itself, after the resident step
    else:
        filler_bytes = reserved_base = 0
        filler = None
        if args.hold_back:
            filler = hold_back(int(args.vram_gb[0] * GiB))  # before anything else touches the GPU
            filler_bytes = 0 if filler is None else filler.numel()
            reserved_base = torch.cuda.memory_reserved()
        run_forwards(args, device, filler_bytes, reserved_base)
        del filler
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        print(f"torch.cuda.mem_get_info at the end: {free / GiB:.2f} GiB free of {total / GiB:.2f} GiB")


if __name__ == "__main__":
    main()
