"""Full-size VLD-MMDiT on a GPU: parity with diffusers on the same random bf16 weights, seconds per
forward and peak memory. Prints a table.

    python -m benchmarks.bench_mmdit                 # 640 px, 4 layers, 256 text tokens
    python -m benchmarks.bench_mmdit --no-reference  # ours only (no diffusers needed)

The reference model shares our weight tensors (assigned, not copied), so both fit in 80 GB.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.measure import peak_gib, relative_l2, reset_peak, sync, timed
from benchmarks.workloads import (
    Shape,
    add_shape_arguments,
    announced_random_model,
    float32_reference_output,
    reference_forward,
    reference_model,
    step_inputs,
)
from layered_core.mmdit import MMDiTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip diffusers (timing of ours only)")
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 reference forward")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of this script")
    parser.add_argument("--compile", action="store_true", help="also time ours with each block torch.compile'd")
    args = parser.parse_args()

    config = MMDiTConfig.tiny() if args.tiny else MMDiTConfig.full()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = announced_random_model(config, dtype, device)

    latents, condition, text, sigma, flops, _ = step_inputs(config, Shape.of(args), dtype, device)

    rows, outputs = [], {}

    def measure(name: str, forward, output: str | None = None) -> None:
        """Rows of ``forward(batch)`` at batch 1 and 2; its batch-1 output kept under ``output`` (or ``name``)."""
        for batch in (1, 2):
            reset_peak()
            times = timed(lambda b=batch: forward(b), args.warmup, args.iters)
            rows.append((name, batch, statistics.median(times), peak_gib()))
        outputs[output or name] = forward(1).float()
        print(rows[-2:], flush=True)

    def ours(b):
        return model(latents[:b], condition[:b], text[:b], sigma[:b])

    with torch.inference_mode():
        for residual in (torch.float32, torch.bfloat16):
            model.residual_dtype = residual
            measure(f"ours ({'fp32' if residual == torch.float32 else 'bf16'} residual)", ours)
        model.residual_dtype = torch.float32

        if args.compile:
            # regional compilation: the blocks share one compiled graph (same code, same shapes)
            start = time.perf_counter()
            model.compile_blocks()
            ours(1)
            sync()
            print(f"compile + first forward: {time.perf_counter() - start:.1f} s", flush=True)
            measure("ours compiled (fp32 res.)", ours, "ours compiled")
            model.uncompile_blocks()  # back to eager for the reference comparisons

        if not args.no_reference:
            ref = reference_model(model.state_dict(), config)
            measure(
                "diffusers", lambda b: reference_forward(ref, latents[:b], condition[:b], text[:b], sigma[:b], dtype)
            )
            del ref

        if not args.no_reference and not args.no_float32:
            outputs["diffusers float32"] = float32_reference_output(model, config, latents, condition, text, sigma)

    print()
    print(
        f"VLD-MMDiT {'tiny' if args.tiny else 'full size'}, {dtype} weights, {args.resolution}x{args.resolution} px, "
        f"{args.layers} layers, {args.text_tokens} text tokens, sigma 0.75, "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}"
    )
    print(f"FLOP per forward (batch 1): {flops / 1e12:.1f} T")
    print(f"{'impl':<26} {'batch':>5} {'s/forward':>10} {'TFLOP/s':>8} {'peak GiB':>9}")
    for impl, batch, seconds, peak in rows:
        print(f"{impl:<26} {batch:>5} {seconds:>10.3f} {batch * flops / seconds / 1e12:>8.0f} {peak:>9.1f}")
    print()
    names = list(outputs)
    print("relative L2 between outputs (batch 1): row vs column")
    print(" " * 26 + "".join(f"{n[:22]:>24}" for n in names))
    for a in names:
        cells = "".join(f"{relative_l2(outputs[a], outputs[b]):>24.2e}" for b in names)
        print(f"{a:<26}{cells}")
    finite = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    print(f"all outputs finite: {finite}; target: ours vs diffusers float32 <= 1e-2")


if __name__ == "__main__":
    main()
