"""Seconds per sampling step (cond + uncond) of the full-size VLD-MMDiT on one GPU: ours in several
settings against diffusers and ComfyUI core on the same random bf16 weights, against the FLOP floor,
with every output's relative L2 error against a float32 reference. Prints a table.

    python -m benchmarks.bench_step                          # 640 px, 4 layers, 256 text tokens
    python -m benchmarks.bench_step --resolution 1024 --layers 8 --variants compiled --no-peers
    COMFYUI_PATH=~/ComfyUI python -m benchmarks.bench_step   # core's model needs a ComfyUI checkout

How each runs a step, as its own sampler does: ours and ComfyUI core run cond and uncond as one batch-2
forward; diffusers' QwenImageLayeredPipeline runs them as two batch-1 forwards. The peers share our
weight tensors (assigned, not copied). The floor is the step's FLOP at --gemm-tflops (by default the bf16
matrix product rate measured on the H100, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import cuda_profile, kernel_groups, peak_gib, relative_l2, reset_peak, sync, timed
from benchmarks.workloads import (
    Shape,
    add_shape_arguments,
    announced_random_model,
    float32_reference_output,
    reference_forward,
    reference_model,
    step_inputs,
)
from layered_core import attention as attention_module
from layered_core import kernels
from layered_core.attention import attention_backend, flash4_installed, set_attention_backend
from layered_core.mmdit import GeluProjection, MMDiTConfig
from layered_core.ops import is_quantizable, quantize_linears_fp8, set_fp8_compute

VARIANTS = (
    "eager",
    "eager-unfused",
    "compiled",
    "compiled-sdpa",
    "compiled-cublaslt",
    "compiled-fa4-tile",
    "compiled-unfused",
    "max-autotune",
    "max-autotune-unfused",
    "fp8-keep-mod",
    "fp8-keep-mod-fast",
    "fp8",
    "fp8-eager",
)


def comfy_core_model(state: dict, config: MMDiTConfig, comfyui: Path):
    """ComfyUI core's QwenImageTransformer2DModel (as its model detection configures it for the layered
    file) around the given tensors."""
    sys.path.insert(0, str(comfyui))  # ComfyUI is a checkout, not an installed package
    import comfy.ldm.qwen_image.model as core
    import comfy.ops

    with torch.device("meta"):
        model = core.QwenImageTransformer2DModel(
            num_layers=config.num_layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.num_heads,
            joint_attention_dim=config.text_dim,
            axes_dims_rope=tuple(config.axes_dims),
            use_additional_t_cond=True,
            default_ref_method="negative_index",
            image_model="qwen_image",
            dtype=torch.bfloat16,
            operations=comfy.ops.disable_weight_init,
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="eager,compiled,fp8", help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers and ComfyUI core")
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 reference (no errors)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    parser.add_argument("--gemm-tflops", type=float, default=755.0)
    parser.add_argument("--profile", action="store_true", help="kernel-time groups of each compiled variant")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    config = MMDiTConfig.full()
    dtype, device = torch.bfloat16, "cuda"
    model = announced_random_model(config, dtype, device)

    latents, condition, text, sigma, flops, tokens = step_inputs(config, Shape.of(args), dtype, device)
    floor = 2 * flops / (args.gemm_tflops * 1e12)

    rows: list[tuple[str, float, float, str]] = []  # name, s/step, peak GiB, note
    outputs: dict[str, torch.Tensor] = {}  # first batch element of each, for the error column

    def measure(name: str, step, note: str = "") -> None:
        reset_peak()
        start = time.perf_counter()
        out = step()
        sync()
        first = time.perf_counter() - start
        seconds = statistics.median(timed(step, args.warmup, args.iters))
        rows.append((name, seconds, peak_gib(), f"{note}first call {first:.1f} s"))
        outputs[name] = out[:1].float()
        print(f"{name}: {seconds:.3f} s/step, first call {first:.1f} s", flush=True)

    def ours_step():
        return model(latents, condition, text, sigma)

    with torch.inference_mode():
        if not args.no_peers:
            run_peers(model, config, latents, condition, text, sigma, measure, Path(args.comfyui))
        if not args.no_float32:
            truth = float32_reference_output(model, config, latents, condition, text, sigma)
        # fp8 last: quantising frees the bf16 weights the others need
        for variant in sorted(variants, key=VARIANTS.index):
            if variant in ("eager", "eager-unfused"):
                GeluProjection.epilogue = "none" if variant.endswith("-unfused") else "auto"
                measure(f"ours {variant}", ours_step)
                GeluProjection.epilogue = "auto"
            elif variant.startswith(("compiled", "max-autotune")):
                # "-unfused": GELU left to inductor (which under max-autotune can put it in a Triton GEMM's epilogue);
                # "-cublaslt": GELU in cuBLASLt's epilogue; else quack's GEMM where it is installed
                suffix = variant.split("-")[-1]
                if variant == "compiled-cublaslt" and not kernels.QUACK_INSTALLED:
                    print("note: quack-kernels is not installed, so compiled-cublaslt runs as compiled does")
                if variant == "compiled-fa4-tile" and not flash4_installed():
                    print("note: FlashAttention-4 is not installed, so compiled-fa4-tile runs as compiled does")
                GeluProjection.epilogue = {"unfused": "none", "cublaslt": "cublaslt"}.get(suffix, "auto")
                # "compiled" takes FlashAttention-4 where it is installed; "compiled-sdpa" keeps SDPA (cuDNN);
                # "compiled-fa4-tile": FlashAttention-4 with its own tile choice instead of ours
                previous = set_attention_backend("sdpa" if variant == "compiled-sdpa" else "auto")
                chosen_tile = attention_module.flash4_tile
                if variant == "compiled-fa4-tile":
                    attention_module.flash4_tile = lambda q: None
                torch._dynamo.reset()
                autotune = variant.startswith("max-autotune")
                model.compile_blocks(mode="max-autotune-no-cudagraphs" if autotune else None)
                measure(f"ours {variant}", ours_step)
                if args.profile and not variant.startswith("max-autotune"):
                    profile(ours_step)
                model.uncompile_blocks()
                set_attention_backend(previous)
                attention_module.flash4_tile = chosen_tile
                GeluProjection.epilogue = "auto"
            elif variant.startswith("fp8"):
                if variant.startswith("fp8-keep-mod"):
                    # the AdaLN modulation linears (a third of the weights) stay bf16
                    quantize_linears_fp8(model, lambda name, w: is_quantizable(name, w) and "_mod." not in name)
                else:
                    quantize_linears_fp8(model)  # the layers still in bf16, if any
                set_fp8_compute(model, "auto", fast_accum=variant.endswith("-fast"))
                torch.cuda.empty_cache()
                torch._dynamo.reset()
                if variant != "fp8-eager":
                    model.compile_blocks()
                measure(f"ours {variant}", ours_step, "e4m3 weights, rowwise-scaled activations; ")
                model.uncompile_blocks()

    print()
    print(
        f"VLD-MMDiT full size, bf16 weights, {args.resolution}x{args.resolution} px, {args.layers} layers, "
        f"{args.text_tokens} text tokens, cond + uncond per step, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}; attention: {attention_backend()}, FlashAttention-4 "
        f"{'installed' if flash4_installed() else 'not installed'}"
    )
    print(
        f"FLOP per step {2 * flops / 1e12:.1f} T; floor {floor:.3f} s/step at {args.gemm_tflops:.0f} TFLOP/s "
        f"({tokens} tokens per sample)"
    )
    peers = {name: seconds for name, seconds, _, _ in rows if not name.startswith("ours")}
    header = f"{'impl':<24} {'s/step':>7} {'x floor':>8} {'TFLOP/s':>8} {'peak GiB':>9} {'rel L2':>9}"
    header += "".join(f" {'vs ' + p.split()[0]:>13}" for p in peers)
    print(header + "  note")
    for name, seconds, peak, note in rows:
        error = relative_l2(outputs[name], truth) if not args.no_float32 else float("nan")
        line = f"{name:<24} {seconds:>7.3f} {seconds / floor:>8.2f} {2 * flops / seconds / 1e12:>8.0f} {peak:>9.1f}"
        line += f" {error:>9.2e}" + "".join(f" {peers[p] / seconds:>12.2f}x" for p in peers)
        print(line + f"  {note}")
    print("rel L2: against the float32 reference forward (diffusers' model computing in float32) on sample 0")
    bf16 = next((outputs[n] for n in ("ours compiled", "ours eager") if n in outputs), None)
    for name in outputs:
        if name.startswith("ours fp8") and bf16 is not None:
            print(f"{name} against our bf16 output: rel L2 {relative_l2(outputs[name], bf16):.2e} (target <= 5e-2)")


def run_peers(model, config, latents, condition, text, sigma, measure, comfyui: Path) -> None:
    """diffusers and ComfyUI core on our weight tensors, each stepping as its own sampler does."""
    dtype = torch.bfloat16
    state = model.state_dict()
    ref = reference_model(state, config)

    def diffusers_step():
        return torch.cat(
            [
                reference_forward(ref, latents[b], condition[b], text[b], sigma[b], dtype)
                for b in (slice(0, 1), slice(1, 2))
            ]
        )

    measure("diffusers 0.42.1", diffusers_step, "two batch-1 forwards; ")
    if not (comfyui / "comfy").is_dir():
        print(f"ComfyUI core skipped: no checkout at {comfyui}")
        return
    try:
        core = comfy_core_model(state, config, comfyui)
    except Exception as error:  # a missing dependency of that checkout: say so, keep the rest
        print(f"ComfyUI core skipped: {type(error).__name__}: {error}")
        return

    def core_step():
        return core(latents.to(dtype), sigma, text, ref_latents=[condition[:, :, None].to(dtype)])

    measure("ComfyUI core v0.30", core_step, "one batch-2 forward; ")


def profile(step) -> None:
    """CUDA time of one step by kernel group (matrix products, attention, everything else), and the time the GPU
    sat idle between kernels, with the longest idle spans and the kernels around them."""
    profiler = cuda_profile(step)
    groups, kernels = kernel_groups(profiler)
    total = sum(groups.values())
    print(
        "kernel time of one step: "
        + ", ".join(f"{g} {us / 1000:.1f} ms ({us / total:.0%})" for g, us in groups.items())
    )
    for us, group, key, count in sorted(kernels, reverse=True)[:24]:
        print(f"  {us / 1000:>8.2f} ms  {group:<9} {count:>5}x  {key}")
    spans = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in profiler.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > event.time_range.start
    )
    if not spans:
        return
    gaps, reach, last = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > reach:
            gaps.append((start - reach, last, name))
        if end > reach:
            reach, last = end, name
    idle = sum(g for g, _, _ in gaps)
    print(
        f"GPU idle between kernels: {idle / 1000:.1f} ms of {(reach - spans[0][0]) / 1000:.1f} ms "
        f"({len(gaps)} gaps, {sum(1 for g, _, _ in gaps if g > 50)} over 50 us)"
    )
    for gap, before, after in sorted(gaps, reverse=True)[:6]:
        print(f"  {gap / 1000:>8.3f} ms idle after {before[:60]} before {after[:60]}")


if __name__ == "__main__":
    main()
