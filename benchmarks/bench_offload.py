"""Block weight streaming of the full-size VLD-MMDiT on a GPU: seconds per sampling step with the blocks
streamed under a VRAM budget, against all of them resident. Prints a table.

    python -m benchmarks.bench_offload                          # all resident, then the 24 and 16 GiB plans
    python -m benchmarks.bench_offload --vram-gb 24 --hold-back --full-step-seconds batch2=0.99 ...
    python -m benchmarks.bench_offload --vram-gb 16 --hold-back --pipeline   # a whole decomposition
    python -m benchmarks.bench_offload --tiny                   # CPU smoke test of this script

Random bf16 weights (generated on the GPU, kept on the host), 640 px, 4 layers, 256 text tokens. A step
is cond + uncond, timed three ways: ``batch2`` (equal prompt lengths: one forward of batch 2),
``2x batch1`` (prompts of different lengths, what the full-memory pipeline runs: two forwards) and
``batch2 masked`` (the shorter prompt padded under a mask: one forward, what the pipeline runs when
blocks are streamed). ``--hold-back`` first fills the GPU so that only the budget is free, as a smaller
GPU would be; without it the budgets are only planned for, and the peak columns say whether they held.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from benchmarks.measure import timed
from benchmarks.workloads import QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION, add_shape_arguments
from layered_core.checkpoints import quantize_fp8
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.offload import (
    WORKSPACE_RESERVE,
    GiB,
    VRAMBudget,
    activation_bytes,
    stream_blocks,
)
from layered_core.ops import FP8Linear

MODES = ("batch2", "2x batch1", "batch2 masked")
UNCOND_TOKENS = 8  # the negative prompt " " with the template's closing tokens is a few tokens long


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_memory() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / GiB
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def hold_back(budget: int) -> torch.Tensor | None:
    """Allocate all free GPU memory but ``budget`` bytes, before anything else is on the GPU."""
    free, total = torch.cuda.mem_get_info()
    print(f"GPU before hold-back: {free / GiB:.2f} GiB free of {total / GiB:.2f} GiB", flush=True)
    if free <= budget:
        print(f"only {free / GiB:.2f} GiB free: nothing held back", flush=True)
        return None
    filler = torch.empty(free - budget, dtype=torch.uint8, device="cuda")
    free, _ = torch.cuda.mem_get_info()
    print(f"held back {filler.numel() / GiB:.2f} GiB: {free / GiB:.2f} GiB free now (budget {budget / GiB:.2f})")
    return filler


def fill_random_(module: torch.nn.Module, generate_on: str, seed: int = 0) -> None:
    """Random weights at PyTorch's default Linear scale, U(+-1/sqrt(fan_in)), drawn on ``generate_on`` and
    copied into the module's (host) tensors; N(0, 1) embedding rows (N(0, 0.02) token embeddings), norm
    weights near 1, small biases; float8 weights get a per-tensor scale."""
    modules = dict(module.named_modules())
    with torch.no_grad():
        for index, (name, p) in enumerate(module.named_parameters()):
            gen = torch.Generator(device=generate_on).manual_seed(seed + index)
            shape = p.shape
            if p.ndim >= 2 and "embed_tokens" in name:
                value = 0.02 * torch.randn(shape, generator=gen, device=generate_on)
            elif p.ndim == 2 and "embedding" in name:
                value = torch.randn(shape, generator=gen, device=generate_on)
            elif p.ndim >= 2:
                fan_in = p.numel() // shape[0]
                value = (torch.rand(shape, generator=gen, device=generate_on) * 2 - 1) / fan_in**0.5
            elif name.endswith(".weight"):
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=generate_on)
            else:
                value = 0.02 * torch.randn(shape, generator=gen, device=generate_on)
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, FP8Linear) and name.endswith(".weight"):
                value, scale = quantize_fp8(value)
                owner.weight_scale.copy_(scale)
            p.copy_(value.to(p.dtype))


def build_transformer(config: MMDiTConfig, fp8: bool, generate_on: str) -> VLDMMDiT:
    """The model on the host with random weights (bf16, or its block linears in float8 with scales)."""
    with torch.device("meta"):
        model = VLDMMDiT(config, dtype=torch.bfloat16)
        if fp8:
            for block in model.transformer_blocks:
                for name, linear in list(block.named_modules()):
                    if isinstance(linear, torch.nn.Linear):
                        parent, _, child = name.rpartition(".")
                        fp8_linear = FP8Linear(
                            linear.in_features, linear.out_features, dtype=torch.bfloat16, device="meta"
                        )
                        setattr(block.get_submodule(parent), child, fp8_linear)
    model = model.to_empty(device="cpu").eval().requires_grad_(False)
    for name, buffer in model.named_buffers():
        if name.endswith("weight_scale"):
            buffer.fill_(1.0)
    fill_random_(model, generate_on)
    model.compute_dtype = torch.bfloat16
    return model


def step_inputs(config, args, device):
    """Inputs of one step for each mode: a list of forwards, each (latents, condition, text, sigma, mask)."""
    side = args.resolution // 8
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, 16, args.layers + 1, side, side, generator=gen, device=device)
    condition = torch.randn(1, 16, side, side, generator=gen, device=device)
    text = torch.randn(1, args.text_tokens, config.text_dim, generator=gen, device=device, dtype=torch.bfloat16)
    uncond = torch.randn(1, UNCOND_TOKENS, config.text_dim, generator=gen, device=device, dtype=torch.bfloat16)
    sigma = torch.tensor([0.75], device=device)
    two = (torch.cat([latents, latents]), torch.cat([condition, condition]), sigma.repeat(2))
    padded = torch.nn.functional.pad(uncond, (0, 0, 0, args.text_tokens - UNCOND_TOKENS))
    mask = torch.ones(2, args.text_tokens, dtype=torch.bool, device=device)
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
    config = replace(MMDiTConfig.tiny(), num_layers=4) if args.tiny else MMDiTConfig.full()
    t0 = time.perf_counter()
    model = build_transformer(config, args.fp8, generate_on=device)
    print(f"model built on the host in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    streamer = stream_blocks(model, device, resident_blocks=0, slots=args.slots, load=False)
    print(f"blocks packed and pinned in {time.perf_counter() - t0:.1f} s: {streamer.describe()}", flush=True)
    nbytes, copy_seconds, pinned = h2d_seconds(streamer, device)
    gbps = nbytes / copy_seconds / 1e9
    print(f"H2D of one block: {nbytes / 1e9:.3f} GB in {copy_seconds * 1e3:.1f} ms = {gbps:.1f} GB/s")
    print(f"(host buffers page-locked: {pinned}; with cudaHostRegister, which is_pinned() does not see)", flush=True)

    inputs = step_inputs(config, args, device)
    image_tokens = (args.layers + 2) * (args.resolution // 16) ** 2
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


def run_pipeline(args, device, reserved_base: int) -> None:
    """One whole decomposition with full-size random models under the budget."""
    from layered_core.pipeline import DecomposeOptions, LayeredPipeline
    from layered_core.text import PromptEncoder
    from layered_core.tiny_models import tiny_text_encoder_set, tiny_tokenizer
    from layered_core.vae import RGBAVAE, VAEConfig

    t0 = time.perf_counter()
    if args.tiny:
        transformer = build_transformer(replace(MMDiTConfig.tiny(), num_layers=4), args.fp8, generate_on=device)
        vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
        model, tokenizer, _ = tiny_text_encoder_set(MMDiTConfig.tiny().text_dim)
        text_encoder = PromptEncoder(model, tokenizer)
        budget = 4 * GiB
    else:
        transformer = build_transformer(MMDiTConfig.full(), args.fp8, generate_on=device)
        vae = RGBAVAE(VAEConfig.full(), dtype=torch.bfloat16).eval().requires_grad_(False)
        text_encoder = PromptEncoder(full_text_encoder(device), tiny_tokenizer())
        budget = int(args.vram_gb[0] * GiB)
    print(f"models built on the host in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    placement = VRAMBudget(transformer, vae, text_encoder, device, budget, slots=args.slots)
    print(f"placed in {time.perf_counter() - t0:.1f} s: {placement.describe()}", flush=True)
    pipeline = LayeredPipeline(transformer, vae, text_encoder, vram_budget=placement)

    words = "a poster with a red title, a photo of a cat on a sofa, soft shadows and a white frame"
    prompt = words
    while len(text_encoder.tokenizer(prompt).input_ids) < args.text_tokens:
        prompt += " " + words
    prompt = text_encoder.tokenizer.decode(text_encoder.tokenizer(prompt).input_ids[: args.text_tokens])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8), "RGB")

    step_ends = []

    def on_step(info):
        sync()
        step_ends.append(time.perf_counter())

    warm = pipeline(image, prompt, DecomposeOptions(layers=args.layers, steps=1, resolution=args.resolution))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    options = DecomposeOptions(layers=args.layers, steps=args.steps, resolution=args.resolution)
    result = pipeline(image, prompt, options, callback=on_step)
    total = time.perf_counter() - start
    steps = np.diff(step_ends)
    peak = (torch.cuda.max_memory_reserved() - reserved_base) / GiB if device == "cuda" else float("nan")
    rss, hwm = host_memory()
    print()
    print(
        f"decomposition under a {budget / GiB:g} GiB budget, {'tiny' if args.tiny else 'full-size'} random models: "
        f"{args.resolution} px, {args.layers} layers, {args.steps} steps, CFG 4.0, prompt {args.text_tokens} tokens"
    )
    for stage, seconds in result.seconds.items():
        print(f"{stage:<16} {seconds:>9.2f}")
    print(f"{'total':<16} {total:>9.2f}")
    step = float(np.median(steps)) if len(steps) else float("nan")
    print(f"median step {step:.3f} s (steps 2..{args.steps}: the first also loads the resident blocks)")
    print(f"step times: {', '.join(f'{t:.3f}' for t in steps)}")
    if device == "cuda":
        stats = torch.cuda.memory_stats()
        print(f"allocator: {stats.get('num_alloc_retries', 0)} alloc retries, {stats.get('num_ooms', 0)} OOMs")
    print(f"peak GPU reserved {peak:.2f} GiB (the held-back filler excluded); host RSS {rss:.1f} GiB (peak {hwm:.1f})")
    print(f"first call (1 step): {sum(warm.seconds.values()):.2f} s")
    streamer = placement.streamer
    print(f"sampling ran with {streamer.resident_blocks} blocks resident, {streamer.streamed_blocks} streamed")
    print(f"layers finite: {bool(torch.isfinite(result.layers).all())}")


def full_text_encoder(generate_on: str):
    """A Qwen2.5-VL-7B-shaped model on the host with random weights (built without transformers' init)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pay for transformers' init
            import contextlib

            no_init_weights = contextlib.nullcontext
    config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    fill_random_(model, generate_on)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vram-gb", type=float, nargs="+", default=[24.0, 16.0], help="budgets in GiB")
    parser.add_argument("--hold-back", action="store_true", help="fill the GPU so only the (single) budget is free")
    parser.add_argument("--full-step-seconds", nargs="*", default=[], metavar="MODE=SECONDS")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    add_shape_arguments(parser)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--fp8", action="store_true", help="block linears in float8 with scales (fp8 kept)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pipeline", action="store_true", help="one whole decomposition under the budget")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of --pipeline")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    if args.tiny and not args.pipeline:
        args.resolution, args.text_tokens = 128, 16  # a CPU-sized step
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --tiny for the CPU smoke test")
    if args.hold_back and (args.tiny or len(args.vram_gb) != 1):
        raise SystemExit("--hold-back needs a GPU and exactly one --vram-gb budget")
    if args.pipeline and not args.tiny and len(args.vram_gb) != 1:
        raise SystemExit("--pipeline runs under one --vram-gb budget")
    filler_bytes = reserved_base = 0
    filler = None
    if args.hold_back:
        filler = hold_back(int(args.vram_gb[0] * GiB))  # before anything else touches the GPU
        filler_bytes = 0 if filler is None else filler.numel()
        reserved_base = torch.cuda.memory_reserved()
    if args.pipeline:
        run_pipeline(args, device, reserved_base)
    else:
        run_forwards(args, device, filler_bytes, reserved_base)
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        print(f"torch.cuda.mem_get_info at the end: {free / GiB:.2f} GiB free of {total / GiB:.2f} GiB")
    del filler


if __name__ == "__main__":
    main()
