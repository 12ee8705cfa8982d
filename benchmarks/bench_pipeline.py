"""One whole decomposition with full-size random models on a GPU: wall time split into image encoding,
text encoding, sampling and decoding. Prints a table.

    python -m benchmarks.bench_pipeline                     # 640 px, 4 layers, 50 steps
    python -m benchmarks.bench_pipeline --tiny --steps 2    # CPU smoke test of this script

The text encoder is Qwen2.5-VL-7B's shape with random weights; the real tokenizer cannot be had
offline, so prompts are tokenised by the tiny offline tokenizer (a longer token sequence than Qwen's
for the same words: the prompt is cut to --prompt-tokens tokens to stay representative).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.measure import peak_gib, sync, timed_decomposition
from benchmarks.workloads import full_text_encoder, noise_image, prompt_of_length, random_model
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.pipeline import DecomposeOptions, LayeredPipeline
from layered_core.text import PromptEncoder
from layered_core.tiny_models import tiny_text_encoder_set
from layered_core.vae import RGBAVAE, VAEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    t0 = time.perf_counter()
    if args.tiny:
        torch.manual_seed(0)
        transformer = VLDMMDiT(MMDiTConfig.tiny()).eval().requires_grad_(False)
        vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
        model, tokenizer, image_processor = tiny_text_encoder_set(MMDiTConfig.tiny().text_dim)
        text_encoder = PromptEncoder(model, tokenizer, image_processor)
    else:
        transformer = random_model(MMDiTConfig.full(), dtype, device)
        vae = RGBAVAE(VAEConfig.full(), dtype=dtype, device=device).eval().requires_grad_(False)
        text_encoder = full_text_encoder(device, dtype)
    sync()
    print(f"models built in {time.perf_counter() - t0:.1f} s", flush=True)

    prompt = prompt_of_length(text_encoder.tokenizer, args.prompt_tokens)
    image = noise_image(1280, 720)
    pipeline = LayeredPipeline(transformer, vae, text_encoder)
    options = DecomposeOptions(layer_count=args.layers, steps=args.steps, resolution=args.resolution)
    warm, result, total = timed_decomposition(pipeline, image, prompt, options)
    peak = peak_gib() if device == "cuda" else float("nan")

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    height, width = result.layer_images.shape[-2:]
    print()
    print(
        f"decomposition, {'tiny' if args.tiny else 'full-size'} random models, {dtype}, {name}: input 1280x720 -> "
        f"{width}x{height}, {args.layers} layers, {args.steps} steps, CFG 4.0 (prompt and ' ' as two forwards), "
        f"prompt {args.prompt_tokens} tokens"
    )
    print(f"{'stage':<16} {'seconds':>9}")
    for stage, seconds in result.seconds.items():
        print(f"{stage:<16} {seconds:>9.2f}")
    print(f"{'total':<16} {total:>9.2f}")
    print(f"per step: {result.seconds['sampling'] / args.steps:.3f} s; peak GPU memory {peak:.1f} GiB")
    print(f"first call (1 step, warm-up): {sum(warm.seconds.values()):.2f} s")
    print(f"layers finite: {bool(torch.isfinite(result.layer_images).all())}")


if __name__ == "__main__":
    main()
