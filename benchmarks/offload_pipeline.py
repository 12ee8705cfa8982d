"""``bench_offload --pipeline``: one whole decomposition with full-size random models under a VRAM budget, each
stage's seconds, device and peak GPU memory, the median step against a step with every block resident, and where
the auto-caption ran."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.measure import hold_back, host_memory, sync, timed_decomposition
from benchmarks.workloads import full_caption_encoder, noise_image, prompt_of_length, random_model
from layered_core.memory import WORKSPACE_RESERVE, GiB, activation_bytes, tensor_bytes
from layered_core.mmdit import MMDiTConfig, image_token_count
from layered_core.pipeline import DecomposeOptions, LayeredPipeline
from layered_core.placement import VRAMBudget
from layered_core.sampling import sample
from layered_core.text import PromptEncoder, text_encoder_tokens
from layered_core.tiny_models import tiny_text_encoder_set
from layered_core.vae import RGBAVAE, VAEConfig


class CappedCaptions(PromptEncoder):
    """Captions of exactly ``caption_tokens`` tokens: random weights pick an end token at any step, or never."""

    caption_length = 64

    def caption(self, image, language="en", max_new_tokens=None):
        self.model.generation_config.min_new_tokens = self.caption_length
        return super().caption(image, language, self.caption_length)


class StagePeaks(VRAMBudget):
    """A VRAM budget that notes each stage's peak GPU memory (the allocator's reserved bytes, the held-back filler
    excluded; NaN without a GPU): the VAE's visits (encoding, then decoding), the text encoder's place (caption and
    prompts), sampling."""

    def __init__(self, *args, filler_bytes: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.filler_bytes = filler_bytes
        self.peaks: dict[str, float] = {}
        self._vae_visits = 0

    @contextlib.contextmanager
    def _measured(self, stage: str):
        if self.device.type != "cuda":
            self.peaks[stage] = float("nan")
            yield
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_reserved() - self.filler_bytes) / GiB
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), peak)

    @contextlib.contextmanager
    def visiting(self, module):
        if module is None or module is not self.vae or id(module) in self._visiting:
            with super().visiting(module):
                yield
            return
        stage = "decode" if self._vae_visits % 2 else "encode image"
        self._vae_visits += 1
        with self._measured(stage), super().visiting(module):
            yield

    @contextlib.contextmanager
    def text_encoder_placed(self, text_tokens, image_size=None):
        if self._text_encoder_fits is not None:
            with super().text_encoder_placed(text_tokens, image_size) as device:
                yield device
            return
        with self._measured("text encoder"), super().text_encoder_placed(text_tokens, image_size) as device:
            yield device

    @contextlib.contextmanager
    def sampling(self, image_tokens, text_tokens, batch):
        with self._measured("sampling"), super().sampling(image_tokens, text_tokens, batch) as plan:
            yield plan


def step_seconds(pipeline, condition, positive, negative, options, device) -> list[float]:
    """Seconds of each sampling step of the pipeline's transformer as it is placed now, cond and uncond in one
    masked batch as the streamed pipeline runs them."""
    dtype = pipeline.transformer.compute_dtype
    ends = [time.perf_counter()]

    def on_step(info):
        sync()
        ends.append(time.perf_counter())

    with torch.inference_mode():
        sample(
            pipeline.transformer,
            condition.to(device),
            positive.to(device, dtype),
            negative.to(device, dtype),
            layer_count=options.layer_count,
            steps=options.steps,
            cfg_scale=options.cfg_scale,
            seed=options.seed,
            callback=on_step,
            batch_guidance=True,
        )
    return list(np.diff(ends))


def resident_step(pipeline, placement: VRAMBudget, image, prompt: str, options, device) -> float:
    """The yardstick: the median sampling step with every block resident (compiled where the blocks are), the same
    masked batch of cond and uncond as the streamed steps, after one step of warm-up (and compilation)."""
    prepared = pipeline.prepare_image(image, options)
    condition = pipeline.encode_image(prepared)
    positive = pipeline.encode_text([prompt], options.max_sequence_length)
    negative = pipeline.encode_text([options.negative_prompt], options.max_sequence_length)
    placement.streamer.load(len(placement.streamer.blocks))
    try:
        warmed = replace(options, steps=options.steps + 1)
        seconds = step_seconds(pipeline, condition, positive, negative, warmed, device)
    finally:
        placement.streamer.offload()
    print(f"resident step: first {seconds[0]:.2f} s (compiles), then {', '.join(f'{s:.3f}' for s in seconds[1:])}")
    return float(np.median(seconds[1:]))


def tiny_budget(pipeline, prompt: str, options) -> int:
    """A budget in which the tiny transformer streams for ``prompt``: the reserve, its other weights, the activations
    of the batch of cond and uncond padded to a multiple of 8 tokens, and three blocks (one resident, two slots)."""
    transformer = pipeline.transformer
    blocks = [tensor_bytes(block) for block in transformer.transformer_blocks]
    other = tensor_bytes(transformer) - sum(blocks)
    side = options.resolution // 8  # the square input's bucket, in latent pixels
    image_tokens = image_token_count(options.layer_count, side, side, transformer.config.patch_size)
    text_tokens = pipeline.encode_text([prompt], options.max_sequence_length).embeddings.shape[1]
    text_tokens = -(-(image_tokens + text_tokens) // 8) * 8 - image_tokens
    activations = activation_bytes(transformer, image_tokens, text_tokens, 2)
    return WORKSPACE_RESERVE + other + activations + 3 * max(blocks)


def run_pipeline(args, device) -> None:
    """One whole decomposition under the budget (see the module docstring): the models built on the host, the
    first caption and the resident step before the hold-back, a warm-up of one step, then the timed run."""
    t0 = time.perf_counter()
    config = MMDiTConfig.full() if not args.tiny else replace(MMDiTConfig.tiny(), num_layers=4)
    transformer = random_model(config, torch.bfloat16, "cpu", generate_on=device, fp8_blocks=args.fp8)
    if args.tiny:
        vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
        model, tokenizer, image_processor = tiny_text_encoder_set(config.text_dim)
        budget = 4 * GiB  # replaced by tiny_budget once the prompt is known
    else:
        vae = RGBAVAE(VAEConfig.full(), dtype=torch.bfloat16).eval().requires_grad_(False)
        encoder = full_caption_encoder("cpu", generate_on=device, fp8=args.text_fp8)
        model, tokenizer, image_processor = encoder.model, encoder.tokenizer, encoder.image_processor
        budget = int(args.vram_gb[0] * GiB)
    text_encoder = CappedCaptions(model, tokenizer, image_processor)
    text_encoder.caption_length = args.caption_tokens
    print(f"models built on the host in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    placement = StagePeaks(transformer, vae, text_encoder, device, budget, slots=args.slots)
    print(f"placed in {time.perf_counter() - t0:.1f} s: {placement.describe()}", flush=True)
    pipeline = LayeredPipeline(transformer, vae, text_encoder, vram_budget=placement)
    if args.compile:
        transformer.compile_blocks()

    image = noise_image(1024, 1024)
    options = DecomposeOptions(layer_count=args.layers, steps=args.steps, resolution=args.resolution)
    caption_size = pipeline.prepare_image(image, options).size
    prompt = prompt_of_length(text_encoder.tokenizer, args.text_tokens)
    if args.caption:
        # Greedy decoding writes the timed run's caption again: the warm-up and the resident step take it as their
        # prompt, so that the timed run has nothing new to compile (a new prompt length would).
        t0 = time.perf_counter()
        prompt = pipeline.caption(pipeline.prepare_image(image, options), options.caption_language)
        print(f"first caption: {time.perf_counter() - t0:.1f} s", flush=True)
    if args.tiny:
        budget = placement.budget = tiny_budget(pipeline, prompt, options)
    resident = float("nan")
    if args.resident_step:
        resident = resident_step(pipeline, placement, image, prompt, options, device)
    filler = None
    if args.hold_back:
        torch.cuda.empty_cache()
        filler = hold_back(budget, held=torch.cuda.memory_reserved())  # the other weights count in the budget
    placement.filler_bytes = 0 if filler is None else filler.numel()

    step_ends = []

    def on_step(info):
        sync()
        step_ends.append(time.perf_counter())

    timed = "" if args.caption else prompt
    warm, result, total = timed_decomposition(pipeline, image, timed, options, callback=on_step, warmup_prompt=prompt)
    steps = np.diff(step_ends)
    rss, hwm = host_memory()
    streamer = placement.streamer
    print()
    print(
        f"decomposition under a {budget / GiB:.2f} GiB budget{' (the rest of the GPU held back)' * args.hold_back}, "
        f"{'tiny' if args.tiny else 'full-size'} random models: transformer {'fp8' if args.fp8 else 'bf16'}"
        f"{' compiled' if args.compile else ' eager'}, text encoder {'fp8 kept' if args.text_fp8 else 'bf16'}; "
        f"{args.resolution} px, {args.layers} layers, {args.steps} steps, CFG 4.0, "
        + (f"auto-caption of {args.caption_tokens} tokens" if args.caption else f"prompt {args.text_tokens} tokens")
    )
    print(f"{'stage':<16} {'seconds':>9}  {'ran on':<8} {'peak GiB':>8}")
    peaks = {"caption": "text encoder", "text": "text encoder"}
    for stage, seconds in result.seconds.items():
        peak = placement.peaks.get(peaks.get(stage, stage), float("nan"))
        print(f"{stage:<16} {seconds:>9.2f}  {result.devices.get(stage, '-'):<8} {peak:>8.2f}")
    print(f"{'total':<16} {total:>9.2f}")
    step = float(np.median(steps)) if len(steps) else float("nan")
    print(f"median step {step:.3f} s (steps 2..{args.steps}: the first also loads the resident blocks)")
    print(f"step times: {', '.join(f'{t:.3f}' for t in steps)}")
    if resident == resident:
        print(f"resident step (every block on the GPU, same masked batch) {resident:.3f} s: {step / resident:.2f}x")
    print(
        f"sampling ran with {streamer.resident_blocks} blocks resident {list(streamer.resident_indices)}, "
        f"{streamer.streamed_blocks} streamed through {streamer.used_slots} slots of {streamer.slot_bytes / GiB:.2f} "
        "GiB"
    )
    needed = placement.text_encoder_bytes_needed(text_encoder_tokens(options.max_sequence_length, True), caption_size)
    where = result.devices.get("caption", "not run (a prompt was given)")
    if args.caption:
        where += "; the same caption as the first" if result.prompt == prompt else "; NOT the first caption's text"
    print(
        f"captioner ran on: {where}; the text encoder ({placement.text_encoder_bytes / GiB:.2f} GiB) needs "
        f"{needed / GiB:.2f} GiB for a {caption_size[0]}x{caption_size[1]} caption, the budget is {budget / GiB:.2f}"
    )
    if device == "cuda":
        stats = torch.cuda.memory_stats()
        print(f"allocator: {stats.get('num_alloc_retries', 0)} alloc retries, {stats.get('num_ooms', 0)} OOMs")
    peak = max(placement.peaks.values(), default=float("nan"))
    print(f"peak GPU reserved {peak:.2f} GiB (the held-back filler excluded); host RSS {rss:.1f} GiB (peak {hwm:.1f})")
    print(f"first call (1 step, given prompt): {sum(warm.seconds.values()):.2f} s")
    print(f"layers finite: {bool(torch.isfinite(result.layer_images).all())}")
    del filler
