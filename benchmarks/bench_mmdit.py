"""Full-size VLD-MMDiT on a GPU: parity with diffusers on the same random bf16 weights, seconds per
forward and peak memory. Prints a table.

    python benchmarks/bench_mmdit.py                 # 640 px, 4 layers, 256 text tokens
    python benchmarks/bench_mmdit.py --no-reference  # ours only (no diffusers needed)

The reference model shares our weight tensors (assigned, not copied), so both fit in 80 GB.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layered_core.mmdit import MMDiTConfig, VLDMMDiT, pack_latents, unpack_latents


def random_weights_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights at PyTorch's default Linear scale, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the embedding
    N(0, 1) as nn.Embedding draws it; norm weights near 1 so they are exercised; small biases."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embedding" in name:
                value = torch.randn(p.shape, generator=gen, device=device)
            elif p.ndim == 2:
                value = (torch.rand(p.shape, generator=gen, device=device) * 2 - 1) / p.shape[1] ** 0.5
            elif name.endswith(".weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device)
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen, device=device)
            p.copy_(value.to(p.dtype))


def random_model(config: MMDiTConfig, dtype: torch.dtype, device) -> VLDMMDiT:
    """The transformer built on the meta device, then materialised on ``device`` with random weights, computing
    in ``dtype``."""
    with torch.device("meta"):
        model = VLDMMDiT(config, dtype=dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    random_weights_(model)
    model.compute_dtype = dtype
    return model


def flops_per_forward(config: MMDiTConfig, image_tokens: int, text_tokens: int, noisy_tokens: int) -> float:
    d = config.hidden_size
    s = image_tokens + text_tokens
    linear = 2 * s * (4 * d * d + 2 * config.mlp_ratio * d * d)
    attn = 4 * s * s * d
    head = 2 * noisy_tokens * d * 64
    return config.num_layers * (linear + attn) + head


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def timed(fn, warmup: int, iters: int) -> list[float]:
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


def reference_model(state: dict, config: MMDiTConfig):
    """diffusers' model around the given tensors (assigned, not copied)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope

    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(
            num_layers=config.num_layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.num_heads,
            joint_attention_dim=config.text_dim,
            axes_dims_rope=config.axes_dims,
            use_additional_t_cond=True,
            use_layer3d_rope=True,
        )
    # Its RoPE tables are plain attributes computed at construction: rebuild them off the meta device.
    ref.pos_embed = QwenEmbedLayer3DRope(theta=10000, axes_dim=list(config.axes_dims), scale_rope=True)
    ref.load_state_dict(state, strict=True, assign=True)
    return ref.eval()


def reference_forward(ref, latents, condition, text, sigma, dtype) -> torch.Tensor:
    """diffusers' model on our inputs (noisy frames then the condition frame), computing in ``dtype``;
    returns the noisy frames' velocity as (B, 16, F, h, w)."""
    batch, _, frames, h, w = latents.shape
    grid = (h // 2) * (w // 2)
    tokens = torch.cat([pack_latents(latents), pack_latents(condition[:, :, None])], 1)
    out = ref(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=text.to(dtype),
        timestep=sigma.to(dtype),
        img_shapes=[[(1, h // 2, w // 2)] * (frames + 1)] * batch,
        additional_t_cond=torch.zeros(batch, dtype=torch.long, device=latents.device),
        return_dict=False,
    )[0]
    return unpack_latents(out[:, : frames * grid], frames, h, w)


def float32_reference(state: dict, config: MMDiTConfig):
    """diffusers' model on our tensors, computing in float32 with one block widened at a time."""
    ref = reference_model(state, config)
    for name, child in ref.named_children():
        if name != "transformer_blocks":
            child.float()  # small modules: a float32 copy of their own

    def widen(block, args):
        block._narrow = {n: p.data for n, p in block.named_parameters()}
        for p in block.parameters():
            p.data = p.data.float()

    def narrow(block, args, output):
        for n, p in block.named_parameters():
            p.data = block._narrow[n]
        del block._narrow

    for block in ref.transformer_blocks:
        block.register_forward_pre_hook(widen)
        block.register_forward_hook(narrow)
    return ref


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The problem size every full-size benchmark takes: the issue's setting by default."""
    parser.add_argument("--resolution", type=int, default=640, help="square image side in pixels")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=256)


def step_inputs(config: MMDiTConfig, args, dtype: torch.dtype, device):
    """Random inputs of one step at the shape of ``add_shape_arguments``' args, cond and uncond as a batch of 2
    (seed 1): (latents, condition, text, sigma, FLOP of one batch-1 forward, tokens per sample)."""
    h = w = args.resolution // 8
    frames = args.layers + 1
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(2, 16, frames, h, w, generator=gen, device=device)
    condition = torch.randn(2, 16, h, w, generator=gen, device=device)
    text = torch.randn(2, args.text_tokens, config.text_dim, generator=gen, device=device).to(dtype)
    # 0.75 is exact in bf16: diffusers casts the timestep to the model dtype, and a sigma like 0.7 would
    # become 0.6992 there (a 0.1 relative L2 change of the output on its own).
    sigma = torch.tensor([0.75, 0.75], device=device)
    grid = (h // 2) * (w // 2)
    flops = flops_per_forward(config, (frames + 1) * grid, args.text_tokens, frames * grid)
    return latents, condition, text, sigma, flops, (frames + 1) * grid + args.text_tokens


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
    t0 = time.perf_counter()
    model = random_model(config, dtype, device)
    sync()
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s", flush=True)

    latents, condition, text, sigma, flops, _ = step_inputs(config, args, dtype, device)

    rows, outputs = [], {}
    with torch.inference_mode():
        for residual in (torch.float32, torch.bfloat16):
            model.residual_dtype = residual
            name = f"ours ({'fp32' if residual == torch.float32 else 'bf16'} residual)"
            for batch in (1, 2):
                reset_peak()
                times = timed(
                    lambda b=batch: model(latents[:b], condition[:b], text[:b], sigma[:b]), args.warmup, args.iters
                )
                rows.append((name, batch, statistics.median(times), peak_gib()))
            outputs[name] = model(latents[:1], condition[:1], text[:1], sigma[:1]).float()
            print(rows[-2:], flush=True)
        model.residual_dtype = torch.float32

        if args.compile:
            # regional compilation: the 60 blocks share one compiled graph (same code, same shapes)
            start = time.perf_counter()
            for block in model.transformer_blocks:
                block.compile()
            model(latents[:1], condition[:1], text[:1], sigma[:1])
            sync()
            print(f"compile + first forward: {time.perf_counter() - start:.1f} s", flush=True)
            for batch in (1, 2):
                reset_peak()
                times = timed(
                    lambda b=batch: model(latents[:b], condition[:b], text[:b], sigma[:b]), args.warmup, args.iters
                )
                rows.append(("ours compiled (fp32 res.)", batch, statistics.median(times), peak_gib()))
            outputs["ours compiled"] = model(latents[:1], condition[:1], text[:1], sigma[:1]).float()
            print(rows[-2:], flush=True)
            for block in model.transformer_blocks:
                block._compiled_call_impl = None  # back to eager for the reference comparisons

        def ref_forward(ref, b, ref_dtype):
            return reference_forward(ref, latents[:b], condition[:b], text[:b], sigma[:b], ref_dtype)

        if not args.no_reference:
            ref = reference_model(model.state_dict(), config)
            for batch in (1, 2):
                reset_peak()
                times = timed(lambda b=batch: ref_forward(ref, b, dtype), args.warmup, args.iters)
                rows.append(("diffusers", batch, statistics.median(times), peak_gib()))
            outputs["diffusers"] = ref_forward(ref, 1, dtype).float()
            print(rows[-2:], flush=True)
            del ref

        if not args.no_reference and not args.no_float32:
            # The truth: diffusers computing in float32 on the same weights. A float32 copy of all of them
            # (82 GB) fits neither beside ours on the GPU nor in host memory, so each block is widened to
            # float32 just before it runs and narrowed back after (exact: bf16 -> fp32 is lossless).
            t0 = time.perf_counter()
            torch.backends.cuda.matmul.allow_tf32 = False
            ref32 = float32_reference(model.state_dict(), config)
            outputs["diffusers float32"] = ref_forward(ref32, 1, torch.float32).float()
            print(f"float32 reference forward: {time.perf_counter() - t0:.1f} s", flush=True)
            del ref32

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
        cells = "".join(f"{((outputs[a] - outputs[b]).norm() / outputs[b].norm()).item():>24.2e}" for b in names)
        print(f"{a:<26}{cells}")
    finite = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    print(f"all outputs finite: {finite}; target: ours vs diffusers float32 <= 1e-2")


if __name__ == "__main__":
    main()
