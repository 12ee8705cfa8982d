"""Where the time of one full-size VLD-MMDiT forward goes on a GPU, and what each SDPA backend costs.

    python -m benchmarks.profile_mmdit   # 640 px, 4 layers, 256 text tokens, batch 1, bf16

Prints the forward time per attention backend and the top CUDA kernels by time, grouped into matrix
products, attention and the rest (normalisation, modulation, RoPE, casts).
"""

from __future__ import annotations

import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.measure import cuda_profile, kernel_groups, relative_l2, timed
from benchmarks.workloads import Shape, random_model, step_inputs
from layered_core.mmdit import MMDiTConfig


def main() -> None:
    config = MMDiTConfig.full()
    shape = Shape()
    model = random_model(config, torch.bfloat16, "cuda")
    latents, condition, text, sigma, flops, _ = step_inputs(config, shape, torch.bfloat16, "cuda", batch=1)

    def forward():
        return model(latents, condition, text, sigma)

    rows = []
    reference = None
    with torch.inference_mode():
        for name, backend in [
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ]:
            try:
                with sdpa_kernel(backend):
                    seconds = statistics.median(timed(forward, 2, 5))
                    out = forward().float()
            except RuntimeError as e:
                rows.append((name, float("nan"), f"unavailable: {str(e)[:80]}"))
                continue
            reference = out if reference is None else reference
            error = relative_l2(out, reference)
            rows.append((name, seconds, f"{flops / seconds / 1e12:.0f} TFLOP/s, rel. L2 vs flash {error:.1e}"))
        model.residual_dtype = torch.bfloat16
        seconds = statistics.median(timed(forward, 2, 5))
        rows.append(("default, bf16 residual", seconds, f"{flops / seconds / 1e12:.0f} TFLOP/s"))
        model.residual_dtype = torch.float32

        profiler = cuda_profile(forward)

    print(
        f"VLD-MMDiT full size, bf16, {shape.resolution}x{shape.resolution} px, {shape.layers} layers, "
        f"{shape.text_tokens} text tokens, batch 1, {torch.cuda.get_device_name()}"
    )
    print(f"{flops / 1e12:.1f} TFLOP per forward")
    print(f"{'attention backend':<24} {'s/forward':>9}  note")
    for name, seconds, note in rows:
        print(f"{name:<24} {seconds:>9.3f}  {note}")

    groups, kernels = kernel_groups(profiler)
    total = sum(groups.values())
    print()
    print(f"{'group':<10} {'ms':>8} {'share':>6}")
    for group, us in groups.items():
        print(f"{group:<10} {us / 1000:>8.1f} {us / total:>6.1%}")
    print()
    print("top kernels (ms, group, calls):")
    for us, group, key, count in sorted(kernels, reverse=True)[:15]:
        print(f"{us / 1000:>8.2f}  {group:<9} {count:>5}  {key}")


if __name__ == "__main__":
    main()
