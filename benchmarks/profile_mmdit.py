"""Where the time of one full-size VLD-MMDiT forward goes on a GPU, and what each SDPA backend costs.

    python benchmarks/profile_mmdit.py   # 640 px, 4 layers, 256 text tokens, batch 1, bf16

Prints the forward time per attention backend and the top CUDA kernels by time, grouped into matrix
products, attention and the rest (normalisation, modulation, RoPE, casts).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))

from bench_mmdit import flops_per_forward, kernel_groups, random_model, timed  # noqa: E402

from layered_core.mmdit import MMDiTConfig  # noqa: E402


def main() -> None:
    config = MMDiTConfig.full()
    model = random_model(config, torch.bfloat16, "cuda")
    h = w = 80
    frames = 5
    gen = torch.Generator(device="cuda").manual_seed(1)
    latents = torch.randn(1, 16, frames, h, w, generator=gen, device="cuda")
    condition = torch.randn(1, 16, h, w, generator=gen, device="cuda")
    text = torch.randn(1, 256, config.text_dim, generator=gen, device="cuda").to(torch.bfloat16)
    sigma = torch.tensor([0.75], device="cuda")
    grid = (h // 2) * (w // 2)
    flops = flops_per_forward(config, (frames + 1) * grid, 256, frames * grid)

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
            error = ((out - reference).norm() / reference.norm()).item()
            rows.append((name, seconds, f"{flops / seconds / 1e12:.0f} TFLOP/s, rel. L2 vs flash {error:.1e}"))
        for residual in (torch.bfloat16,):
            model.residual_dtype = residual
            seconds = statistics.median(timed(forward, 2, 5))
            rows.append(("default, bf16 residual", seconds, f"{flops / seconds / 1e12:.0f} TFLOP/s"))
        model.residual_dtype = torch.float32

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            forward()
            torch.cuda.synchronize()

    print(f"VLD-MMDiT full size, bf16, 640x640 px, 4 layers, 256 text tokens, batch 1, {torch.cuda.get_device_name()}")
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
