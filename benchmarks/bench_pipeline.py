"""One whole decomposition as a user runs it, with full-size random models on a GPU: the auto-caption, the prompt
encoding, the image encoding, the sampling, the decoding and the saving (PSD and PNG zip) timed apart, the first
call and a later one, beside diffusers' QwenImageLayeredPipeline on the same weights in the same process. Prints a
table.

    python -m benchmarks.bench_pipeline                       # 640 px, 4 layers, 50 steps, CFG 4, auto-caption
    python -m benchmarks.bench_pipeline --fp8                 # the transformer in fp8 (modulation kept in bf16)
    python -m benchmarks.bench_pipeline --tiny --steps 2      # CPU smoke test of this script

The first call is the one a user waits for: it compiles (``--compile auto`` decides as the command line does)
unless inductor's and FlashAttention-4's caches on disk already hold the code. Run the command twice with the same
cache folders (``--cache-dir``) to see the first call from a cold and then from a warm cache; ``--clear-cache``
empties them first.

The text encoder is Qwen2.5-VL-7B's shape with random weights and the release's image-processor and generation
settings; the real tokenizer cannot be had offline, so text goes through the tiny offline tokenizer, and because
random weights may emit an end token at any step, the caption is held to exactly ``--caption-tokens`` new tokens
(``min_new_tokens``). diffusers' auto-caption needs transformers' Qwen2VLProcessor, which needs torchvision: where
that is missing, diffusers is given our caption as its prompt and its caption time is not counted (say so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import peak_gib, reset_peak, sync
from benchmarks.workloads import full_caption_encoder, noise_image, prompt_of_length, random_model, reference_model
from layered_core.batch import write_outputs
from layered_core.caches import cache_folder
from layered_core.compile_policy import COMPILE_SETTINGS, compile_choice
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.ops import is_quantizable, quantize_linears_fp8, set_fp8_compute
from layered_core.pipeline import DecomposeOptions, LayeredPipeline
from layered_core.text import PromptEncoder
from layered_core.tiny_models import tiny_text_encoder_set
from layered_core.vae import VAEConfig

STAGES = ("caption", "text", "encode image", "sampling", "decode", "save")


def diffusers_vae(config: VAEConfig, dtype, device):
    """diffusers' 3D AutoencoderKLQwenImage (4 image channels) in ``config``'s shape, random, and our 2D VAE
    converted from its weights: the two VAEs hold the same numbers."""
    from diffusers import AutoencoderKLQwenImage

    from layered_core.checkpoints.vae import vae_from_state_dict

    torch.manual_seed(0)
    reference = AutoencoderKLQwenImage(
        base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult), input_channels=4
    )
    reference = reference.to(device, dtype).eval().requires_grad_(False)
    ours = vae_from_state_dict(reference.state_dict()).to(device, dtype).eval().requires_grad_(False)
    return reference, ours


def diffusers_pipeline(transformer_state, config, vae, text_encoder: PromptEncoder):
    """diffusers' QwenImageLayeredPipeline on the same weights; its processor where torchvision allows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline

    processor, why = None, ""
    try:
        from transformers import Qwen2VLProcessor

        processor = Qwen2VLProcessor(image_processor=text_encoder.image_processor, tokenizer=text_encoder.tokenizer)
    except (ImportError, ValueError, TypeError, AttributeError) as error:  # transformers' ways of saying so
        why = f"diffusers' auto-caption not run ({type(error).__name__}: {error})"
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    pipeline = QwenImageLayeredPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.model,
        tokenizer=text_encoder.tokenizer,
        processor=processor,
        transformer=reference_model(transformer_state, config),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, why


def timed_call(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--caption-tokens", type=int, default=256, help="new caption tokens, forced")
    parser.add_argument("--fp8", action="store_true", help="our transformer in fp8 (modulation in bf16)")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, default="auto")
    parser.add_argument("--cache-dir", help="inductor's and FlashAttention-4's caches here (default: the pack's)")
    parser.add_argument("--clear-cache", action="store_true", help="empty those caches first: a cold first call")
    parser.add_argument("--no-diffusers", action="store_true", help="leave the peer out")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    args = parser.parse_args()

    if args.cache_dir:
        os.environ["XDG_CACHE_HOME"] = args.cache_dir
    caches = [cache_folder("inductor"), cache_folder("flash-attention-cute")]
    if args.clear_cache:
        for folder in caches:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        caches = [cache_folder("inductor"), cache_folder("flash-attention-cute")]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = caches[0]

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = MMDiTConfig.tiny() if args.tiny else MMDiTConfig.full()
    vae_config = VAEConfig.tiny() if args.tiny else VAEConfig.full()
    t0 = time.perf_counter()
    if args.tiny:
        torch.manual_seed(0)
        transformer = VLDMMDiT(config).eval().requires_grad_(False)
        model, tokenizer, image_processor = tiny_text_encoder_set(config.text_dim)
        text_encoder = PromptEncoder(model, tokenizer, image_processor)
    else:
        transformer = random_model(config, dtype, device)
        text_encoder = full_caption_encoder(device, dtype)
    text_encoder.model.generation_config.min_new_tokens = args.caption_tokens
    reference_vae, vae = diffusers_vae(vae_config, dtype, device)
    # diffusers' model takes the same tensors (assigned, not copied) before ours may quantise its own
    peer = None
    if not args.no_diffusers:
        peer, peer_note = diffusers_pipeline(transformer.state_dict(), config, reference_vae, text_encoder)
        print(f"diffusers: {peer_note or 'its own auto-caption'}", flush=True)
    if args.fp8:
        quantize_linears_fp8(transformer, lambda name, w: is_quantizable(name, w) and "_mod." not in name)
        set_fp8_compute(transformer, "auto", fast_accum=True)
        torch.cuda.empty_cache()
    compile_blocks, why = compile_choice(args.compile, device, args.steps)
    if compile_blocks:
        transformer.compile_blocks()
    sync()
    print(f"models built in {time.perf_counter() - t0:.1f} s; compile {why}", flush=True)

    image = noise_image(1280, 720)
    pipeline = LayeredPipeline(transformer, vae, text_encoder)
    # the caption is capped at the forced length (the default cap is longer)
    original_caption = pipeline.caption
    pipeline.caption = lambda picture, language: text_encoder.caption(picture, language, args.caption_tokens)
    options = DecomposeOptions(layer_count=args.layers, steps=args.steps, resolution=args.resolution)
    out = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    rows = []
    with torch.inference_mode():
        for label in ("first call", "second call"):
            reset_peak()
            start = time.perf_counter()
            result = pipeline(image, None, options)
            saving = time.perf_counter()
            stack = result.stack()
            # as decompose saves: the input (at the bucket size) as a hidden bottom layer of the PSD
            write_outputs(stack, out / label.replace(" ", "_"), ("psd", "zip"), pipeline.prepare_image(image, options))
            seconds = dict(result.seconds, save=time.perf_counter() - saving)
            total = time.perf_counter() - start
            rows.append((f"ours, {label}", seconds, total, peak_gib() if device == "cuda" else float("nan")))
            print(f"ours, {label}: {total:.2f} s", flush=True)
        # random weights through the tiny tokenizer often decode to nothing, which diffusers would caption again
        caption = result.prompt or prompt_of_length(text_encoder.tokenizer, args.caption_tokens)
        if peer is not None:
            reset_peak()
            peer_image = pipeline.prepare_image(image, options)
            kwargs = dict(
                image=peer_image,
                layers=args.layers,
                resolution=args.resolution,
                num_inference_steps=args.steps,
                true_cfg_scale=options.cfg_scale,
                negative_prompt=options.negative_prompt,
                cfg_normalize=options.cfg_normalize,
                generator=torch.Generator(device).manual_seed(0),
                output_type="pt",
            )
            if peer_note:
                kwargs["prompt"] = caption
            warm_kwargs = dict(kwargs, num_inference_steps=1, prompt=caption)
            timed_call(lambda: peer(**warm_kwargs))
            total = timed_call(lambda: peer(**kwargs))
            peak = peak_gib() if device == "cuda" else float("nan")
            rows.append(("diffusers (after a 1-step warm-up)", {}, total, peak))
            print(f"diffusers: {total:.2f} s", flush=True)
    pipeline.caption = original_caption
    shutil.rmtree(out, ignore_errors=True)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    height, width = result.layer_images.shape[-2:]
    print()
    print(
        f"decomposition, {'tiny' if args.tiny else 'full-size'} random models, {dtype}"
        f"{', transformer fp8 (modulation bf16)' if args.fp8 else ''}, {name}, torch {torch.__version__}: input "
        f"1280x720 -> {width}x{height}, {args.layers} layers, {args.steps} steps, true CFG {options.cfg_scale} with "
        f"cfg_normalize, auto-caption of {args.caption_tokens} tokens, PSD + PNG zip saved; compile {why}"
    )
    header = f"{'run':<36}" + "".join(f" {stage:>12}" for stage in STAGES) + f" {'total':>8} {'peak GiB':>9}"
    print(header)
    for label, seconds, total, peak in rows:
        cells = "".join(f" {seconds[stage]:>12.2f}" if stage in seconds else f" {'-':>12}" for stage in STAGES)
        print(f"{label:<36}{cells} {total:>8.2f} {peak:>9.1f}")
    steady = rows[1][1]["sampling"] / args.steps
    print(f"sampling per step (second call): {steady:.3f} s")
    if peer is not None and peer_note:
        print(f"note: {peer_note}; diffusers was given our caption as its prompt")
    print(f"layers finite: {bool(torch.isfinite(result.layer_images).all())}; caches: {', '.join(map(str, caches))}")


if __name__ == "__main__":
    main()
