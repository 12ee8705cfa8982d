"""The kernels one VLD-MMDiT step is made of, timed alone on the GPU: every matrix product of a block (bf16, and
fp8 with rowwise scales, with and without fast accumulation; the MLP's GELU epilogue from cuBLASLt and, where
installed, quack) and the joint attention under each available kernel (cuDNN and FlashAttention-2 through SDPA,
FlashAttention-4 with our tile and its own, where installed). Prints TFLOP/s per kernel and
what 60 blocks of them add up to per step, beside the whole step's measured time.

    python -m benchmarks.bench_kernels                         # 640 px, 4 layers, 256 text tokens, batch 2
    python -m benchmarks.bench_kernels --resolution 1024 --layers 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.measure import sync
from benchmarks.workloads import Shape, add_shape_arguments
from layered_core import attention as attn
from layered_core import kernels
from layered_core.mmdit import MMDiTConfig
from layered_core.ops import quantize_rows_fp8


def bench(fn, ms: int = 200) -> float:
    """Median milliseconds per call (CUDA events, after warm-up)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=ms, return_mode="median")


def time_gemm(m: int, k: int, n: int, epilogue: str | None, gen) -> tuple[float, float, float, float]:
    """Milliseconds of (m, k) x (k, n) with bias: bf16 (with GELU in the epilogue if asked), fp8 rowwise-scaled,
    fp8 with fast accumulation, and the rowwise quantisation of the activations alone."""
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen, device="cuda").bfloat16() * 0.02
    if epilogue == "gelu":
        bf16 = bench(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    elif epilogue == "quack":
        # the op itself: kernels.linear_gelu would hand short inputs to cuBLASLt
        bf16 = bench(lambda: torch.ops.qwen_layered.quack_linear_gelu(x, w, b))
        return bf16, float("nan"), float("nan"), float("nan")  # the fp8 products are the plain row's
    else:
        bf16 = bench(lambda: F.linear(x, w, b))
    w8 = w.float().div(w.float().abs().max() / 448).to(torch.float8_e4m3fn)
    x8, sx = quantize_rows_fp8(x)
    sw = torch.full((1, n), 1.0, device="cuda")

    def fp8(fast):
        return torch._scaled_mm(
            x8, w8.t(), scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16, use_fast_accum=fast
        )

    return bf16, bench(lambda: fp8(False)), bench(lambda: fp8(True)), bench(lambda: quantize_rows_fp8(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--batch", type=int, default=2, help="2: cond and uncond in one forward")
    parser.add_argument("--only", choices=("matmul", "attention"), help="time one kind of kernel only")
    args = parser.parse_args()

    config, shape = MMDiTConfig.full(), Shape.of(args)
    dim, heads, head_dim, blocks = config.hidden_size, config.num_heads, config.head_dim, config.num_layers
    image_rows = args.batch * shape.image_tokens
    text_rows = args.batch * shape.text_tokens
    seq = shape.tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch}, {seq} tokens per sample")

    if args.only != "attention":
        time_matmuls(args, image_rows, text_rows, dim, blocks, gen)
    if args.only != "matmul":
        time_attention(args, seq, heads, head_dim, blocks, gen)


def time_matmuls(args, image_rows: int, text_rows: int, dim: int, blocks: int, gen) -> None:
    # (name, rows, in, out, per block, epilogue); the model runs quack's GELU GEMM where it can, else cuBLASLt's
    quack = kernels.quack_gelu_problem(
        torch.empty(image_rows, dim, device="cuda", dtype=torch.bfloat16), torch.empty(8, 8)
    )
    if quack is not None:
        print(f"quack GEMM not timed: {quack}")
    gemms = []
    for stream, rows in (("image", image_rows), ("text", text_rows)):
        # the model hands short inputs (the text stream) to cuBLASLt (kernels.QUACK_MIN_ROWS)
        by_quack = quack is None and rows >= kernels.QUACK_MIN_ROWS
        gemms += [
            (f"{stream} q/k/v/out", rows, dim, dim, 4, None),
            (f"{stream} q+k+v fused", rows, dim, 3 * dim, 0, None),
            (f"{stream} mlp up + gelu", rows, dim, 4 * dim, int(not by_quack), "gelu"),
        ]
        if quack is None:
            gemms.append((f"{stream} mlp up + gelu, quack", rows, dim, 4 * dim, int(by_quack), "quack"))
        gemms += [
            (f"{stream} mlp up, no gelu", rows, dim, 4 * dim, 0, None),
            (f"{stream} mlp down", rows, 4 * dim, dim, 1, None),
        ]
    gemms.append(("modulation (both streams)", args.batch, dim, 6 * dim, 2, None))

    print(
        f"\n{'matrix product':<26} {'M':>6} {'K':>6} {'N':>6} {'bf16 ms':>8} {'TF/s':>5} {'fp8 ms':>7} {'TF/s':>5}"
        f" {'fp8 fast':>8} {'TF/s':>5} {'quant ms':>8}"
    )
    totals = {"bf16": 0.0, "fp8": 0.0, "fp8 fast": 0.0, "quant": 0.0}
    for name, m, k, n, per_block, epilogue in gemms:
        times = time_gemm(m, k, n, epilogue, gen)
        for key, ms in zip(totals, times, strict=True):
            if key == "bf16":
                totals[key] += per_block * ms
            elif epilogue == "gelu":  # the fp8 path has no quack variant: its MLP up is always this row's
                totals[key] += ms
            elif epilogue != "quack":
                totals[key] += per_block * ms
        bf16, slow, fast, quant = times
        flop = 2 * m * k * n
        print(
            f"{name:<26} {m:>6} {k:>6} {n:>6} {bf16:>8.3f} {flop / bf16 / 1e9:>5.0f} {slow:>7.3f}"
            f" {flop / slow / 1e9:>5.0f} {fast:>8.3f} {flop / fast / 1e9:>5.0f} {quant:>8.3f}"
        )
    print(
        f"per step ({blocks} blocks; the fused q+k+v, the mlp up without GELU and the GELU GEMM the model does not run "
        "not counted): "
        + ", ".join(f"{key} {blocks * ms:.0f} ms" for key, ms in totals.items())
        + " (quant: eager rowwise quantisation, which compiled blocks fuse into the producer)"
    )


def time_attention(args, seq: int, heads: int, head_dim: int, blocks: int, gen) -> None:
    print(f"\n{'attention kernel':<34} {'ms':>8} {'TFLOP/s':>8} {'per step ms':>12}")
    q, k, v = (torch.randn(args.batch, seq, heads, head_dim, generator=gen, device="cuda").bfloat16() for _ in range(3))
    flop = 4 * args.batch * heads * seq * seq * head_dim
    expected = None
    kernels = [
        ("SDPA default", None),
        ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("SDPA FlashAttention-2", SDPBackend.FLASH_ATTENTION),
    ]
    for name, backend in kernels:

        def run(backend=backend):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            if backend is None:
                return F.scaled_dot_product_attention(qt, kt, vt)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt)

        out = run().transpose(1, 2).flatten(2).float()
        expected = out if expected is None else expected
        ms = bench(run)
        print(
            f"{name:<34} {ms:>8.3f} {flop / ms / 1e9:>8.0f} {blocks * ms:>12.0f}"
            f"   rel diff to default {(out - expected).norm() / expected.norm():.1e}"
        )
    if attn.flash4_installed():
        previous, ours = attn.set_attention_backend("flash4"), attn.flash4_tile
        for name, tile in (("FlashAttention-4, tile as chosen", ours), ("FlashAttention-4, its own tile", None)):
            if tile is None:
                attn.flash4_tile = lambda q: None
            start = time.perf_counter()
            out = attn.attention(q, k, v).float()
            sync()
            first = time.perf_counter() - start
            ms = bench(lambda: attn.attention(q, k, v))
            print(
                f"{name:<34} {ms:>8.3f} {flop / ms / 1e9:>8.0f} {blocks * ms:>12.0f}"
                f"   rel diff to default {(out - expected).norm() / expected.norm():.1e}; first call {first:.1f} s"
                f" (tile {ours(q) if tile is not None else 'FA4 default'})"
            )
        attn.set_attention_backend(previous)
        attn.flash4_tile = ours
    else:
        print("FlashAttention-4: not installed (pip install flash-attn-4)")


if __name__ == "__main__":
    main()
