"""Auto-caption speed at full size: the pack's greedy decoder (layered_core/caption.py) beside transformers' generate
on the same model and request, and how many of their tokens agree. Prints a table.

    python -m benchmarks.bench_caption                     # Qwen2.5-VL-7B shape, random bf16 weights, one GPU
    python -m benchmarks.bench_caption --variants whole,whole-compiled   # some of the step modes only
    python -m benchmarks.bench_caption --dtype float32     # the same in float32 (agreement without bf16 rounding)
    python -m benchmarks.bench_caption --variants whole-compiled --inductor-cdt   # inductor's coordinate descent
    python -m benchmarks.bench_caption --fp8 --variants whole,whole-compiled   # linears kept in fp8
    python -m benchmarks.bench_caption --tiny              # CPU smoke test of this script (tiny float32 model)

The decoder's variants are its step modes (``GreedyDecoder(step_graph=...)``): "pieces", CUDA graphs around
transformers' own attention calls; "whole", the whole step as one CUDA graph (the default on CUDA); each also
"-compiled" (``compile_step``, captured after torch.compile) and "-eager" (no CUDA graph). On the CPU every variant
runs eagerly, and "-compiled" compiles for the CPU. ``--inductor-cdt`` compiles the "-compiled" variants with
inductor's coordinate-descent tuning of its kernels' launch settings (``GreedyDecoder(compile_options=...)``), which
makes the compilation slower; compare against a run without it.

``--fp8`` keeps the linears that ComfyUI's ``qwen_2.5_vl_7b_fp8_scaled`` file stores in float8 as ``FP8Linear``
(float8 e4m3 weights with per-tensor scales; embeddings, norms, biases and the head in ``--dtype``), as the pipeline
loads that file by default (``fp8="keep"``): the decoder and generate then both multiply in fp8 where FP8Linear does
(bf16 on CUDA capability 8.9+), and the decoder's whole step runs those layers unfused. With ``--tiny`` the tiny
model's linears are quantised in place to the same layout.

The request is the pack's own: ``PromptEncoder.caption_inputs`` of a 1280x720 noise image resized to its 640-px
bucket (864x480), with the release's image-processor pixel budget and generation settings (repetition penalty
1.05), under ``PromptEncoder.greedy_config``. The real tokenizer cannot be had offline: the prompt is tokenised by the
tiny offline tokenizer, whose end tokens stand in for <|im_end|> and <|endoftext|>. Random weights can pick an end
token at any step, so both paths get ``min_new_tokens`` equal to ``--tokens``: generate and the decoder both hold
the end tokens at -inf until then, so every run makes exactly ``--tokens`` tokens and stays comparable token for
token.

Each decoder variant runs twice: the first call builds its cache and captures its CUDA graphs (and compiles, for
"-compiled"), the second reuses them. The vision tower is timed by hooks on it (with a GPU sync on each side), and
is part of the prefill it is reported apart from.
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import contextmanager

import torch
import transformers

from benchmarks.measure import sync
from benchmarks.workloads import full_caption_encoder, noise_image
from layered_core.caption import GreedyDecoder
from layered_core.caption_settings import greedy_settings
from layered_core.caption_step import FP8Weight
from layered_core.checkpoints.text_encoder import is_quantized_in_comfy_file
from layered_core.image import bucket_size, resize_rgba, to_rgba
from layered_core.ops import FP8Linear, quantize_linears_fp8
from layered_core.text import PromptEncoder
from layered_core.tiny_models import tiny_text_encoder_set

VARIANTS = {
    "pieces": {"step_graph": "pieces"},
    "pieces-compiled": {"step_graph": "pieces", "compile_step": True},
    "whole": {"step_graph": "whole"},
    "whole-compiled": {"step_graph": "whole", "compile_step": True},
    "pieces-eager": {"step_graph": "pieces", "cuda_graph": False},
    "whole-eager": {"step_graph": "whole", "cuda_graph": False},
}
DEFAULT_VARIANTS = ["pieces", "pieces-compiled", "whole", "whole-compiled"]
TINY_VARIANTS = ["pieces", "whole"]
COORDINATE_DESCENT = {"coordinate_descent_tuning": True}


@contextmanager
def timing_module(module: torch.nn.Module, seconds: dict[str, float], name: str):
    """Adds the wall seconds of each ``module`` forward (synchronised) to ``seconds[name]``."""
    start = []

    def before(*_):
        sync()
        start.append(time.perf_counter())

    def after(*_):
        sync()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start.pop()

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_generate(model, inputs, config) -> tuple[list[int], dict[str, float]]:
    """generate's tokens and seconds: "prefill" up to the end of its first forward (the prompt, with the vision
    tower), "decode" the rest, "vision" the vision tower alone."""
    seconds: dict[str, float] = {}
    first_forward_end: list[float] = []

    def after_forward(*_):
        if not first_forward_end:
            sync()
            first_forward_end.append(time.perf_counter())

    handle = model.register_forward_hook(after_forward)
    try:
        with timing_module(model.model.visual, seconds, "vision"), torch.inference_mode():
            sync()
            start = time.perf_counter()
            tokens = model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
            sync()
    finally:
        handle.remove()
    end = time.perf_counter()
    seconds["total"] = end - start
    seconds["prefill"] = first_forward_end[0] - start
    seconds["decode"] = end - first_forward_end[0]
    return tokens.tolist(), seconds


def run_decoder(decoder: GreedyDecoder, inputs, config) -> tuple[list[int], dict[str, float]]:
    seconds: dict[str, float] = {}
    settings = greedy_settings(decoder.model, config, inputs)
    with timing_module(decoder.model.model.visual, seconds, "vision"):
        start = time.perf_counter()
        tokens = decoder.generate(inputs, settings, seconds=seconds)
    seconds["total"] = time.perf_counter() - start
    return tokens.tolist(), seconds


def agreement(tokens: list[int], reference: list[int]) -> str:
    """'same/total (first N identical)': position-wise equal tokens, and the length of the common start (after the
    first difference the two captions continue from different text, so position-wise matches are chance)."""
    same = sum(a == b for a, b in zip(tokens, reference, strict=False))
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), len(tokens))
    return f"{same}/{len(reference)} (first {prefix} identical)"


def decode_floor_ms(model, prompt_length: int, new_tokens: int, bandwidth: float) -> tuple[float, float]:
    """(GB one decode step must read, its floor in ms at ``bandwidth`` bytes/s): the language model's weights but
    the embedding table, the head, and the key/value cache at its mean length."""
    language_model = model.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in language_model.named_parameters() if "embed" not in n)
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    config = language_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.lm_head.weight.element_size()
    )
    total = weights + per_token * (prompt_length + new_tokens / 2)
    return total / 1e9, total / bandwidth * 1e3


def copy_bandwidth(device) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read plus written), median of 10 after a warm-up."""
    source = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(10):
        sync()
        start = time.perf_counter()
        target.copy_(source)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="new tokens, forced (min_new_tokens) in both paths")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, of {list(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)}; with --tiny "
        f"{','.join(TINY_VARIANTS)})",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU: a smoke test")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="the linears ComfyUI's fp8 text encoder file stores in float8 kept as FP8Linear (its fp8='keep' load)",
    )
    parser.add_argument(
        "--static-reference", action="store_true", help="also time generate with its static cache and compare"
    )
    parser.add_argument(
        "--inductor-cdt",
        action="store_true",
        help="compile the -compiled variants with inductor's coordinate_descent_tuning (a slower compilation)",
    )
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    variants = args.variants.split(",") if args.variants else (TINY_VARIANTS if args.tiny else DEFAULT_VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")

    t0 = time.perf_counter()
    if args.tiny:
        model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=48, seed=0)
        if args.fp8:
            quantize_linears_fp8(model, is_quantized_in_comfy_file)
        encoder = PromptEncoder(model, tokenizer, image_processor)
    else:
        encoder = full_caption_encoder(device, dtype, fp8=args.fp8)
    sync()
    model = encoder.model
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"model built in {time.perf_counter() - t0:.1f} s ({params:.2f} B parameters)", flush=True)
    precision = str(dtype)
    if args.fp8:
        kept = [m for m in model.model.language_model.layers.modules() if isinstance(m, FP8Linear)]
        # the choice FP8Linear makes for a decoding step's input, which the decoder's step takes over
        in_fp8 = FP8Weight.of(kept[0], dtype).fp8_matmul
        precision += (
            f", {len(kept)} language-model linears kept in fp8 "
            f"({'fp8 matmul' if in_fp8 else 'dequantised to ' + str(dtype)} in a decoding step)"
        )

    image = to_rgba(noise_image(1280, 720))
    image = resize_rgba(image, bucket_size(*image.size, 640))
    inputs = {name: value.to(device) for name, value in encoder.caption_inputs(image, "en").items()}
    prompt_length = inputs["input_ids"].shape[1]
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    config = encoder.greedy_config(args.tokens)
    config.min_new_tokens = args.tokens

    warm = copy.deepcopy(config)
    warm.max_new_tokens = warm.min_new_tokens = 4
    run_generate(model, inputs, warm)  # cuBLAS handles and kernel choices out of the timed run
    reference, reference_seconds = run_generate(model, inputs, config)
    print(f"generate: {reference_seconds['total']:.2f} s", flush=True)
    rows = [("transformers generate", reference_seconds, None, "-")]

    if args.static_reference:
        static, static_warm = copy.deepcopy(config), copy.deepcopy(warm)
        static.cache_implementation = static_warm.cache_implementation = "static"
        try:
            run_generate(model, inputs, static_warm)
            tokens, seconds = run_generate(model, inputs, static)
            rows.append(("generate, static cache", seconds, None, agreement(tokens, reference)))
        except Exception as e:  # a diagnostic only: report and go on
            print(f"generate with the static cache failed: {type(e).__name__}: {e}", flush=True)

    for name in variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        options = dict(VARIANTS[name])
        if args.inductor_cdt and options.get("compile_step"):
            options["compile_options"] = COORDINATE_DESCENT
        shown_name = f"{name} cdt" if "compile_options" in options else name
        try:
            decoder = GreedyDecoder(model, **options)
            for call in ("first call", "second call"):
                tokens, seconds = run_decoder(decoder, inputs, config)
                # the decoder's cache, buffers and graph memory, which it keeps for the next caption
                held = (torch.cuda.memory_allocated() - before) / 2**20 if device.type == "cuda" else None
                # a failed capture runs the step eagerly (the decoder logs why): said in the row, not hidden
                uncaptured = device.type == "cuda" and decoder.cuda_graph and decoder._buffers.graphs is None
                label = f"decoder {shown_name}, {call}{' (NOT captured)' if uncaptured else ''}"
                rows.append((label, seconds, held, agreement(tokens, reference)))
                print(
                    f"{label}: prefill {seconds['prefill']:.3f} s, decode {seconds['decode']:.3f} s, total "
                    f"{seconds['total']:.2f} s",
                    flush=True,
                )
        except Exception as e:  # one variant failing (a compiler error, say) leaves the others to report
            print(f"decoder {shown_name} failed: {type(e).__name__}: {e}", flush=True)
        decoder = None  # its cache and graph go before the next variant's

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print()
    print(
        f"caption, {'tiny' if args.tiny else 'Qwen2.5-VL-7B-shaped'} random model, {precision}, {name}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}: image {image.size[0]}x{image.size[1]} -> "
        f"{image_tokens} image tokens, prompt {prompt_length} tokens, {args.tokens} new tokens forced "
        "(min_new_tokens), repetition penalty "
        f"{config.repetition_penalty}"
    )
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        gigabytes, floor = decode_floor_ms(model, prompt_length, args.tokens, bandwidth)
        print(
            f"decode floor: {gigabytes:.1f} GB read per token at the measured copy bandwidth "
            f"{bandwidth / 1e12:.2f} TB/s = {floor:.2f} ms/token"
        )
    header = (
        f"{'path':<42} {'vision s':>8} {'prefill s':>9} {'setup s':>8} {'decode s':>8} {'ms/token':>8} "
        f"{'total s':>8} {'held MiB':>8}  tokens agreeing with generate"
    )
    print(header)
    steps = args.tokens - 1
    for label, seconds, held, agree in rows:
        vision = seconds.get("vision")
        # both prefills hold the vision tower, shown apart
        prefill = seconds["prefill"] - (vision or 0.0)
        per_token = seconds["decode"] / steps * 1e3 if steps else None
        print(
            f"{label:<42} {shown(vision, 3):>8} {shown(prefill, 3):>9} {shown(seconds.get('capture'), 3):>8} "
            f"{shown(seconds['decode'], 3):>8} {shown(per_token, 2):>8} {shown(seconds['total'], 3):>8} "
            f"{shown(held, 0):>8}  {agree}"
        )
    print(
        "prefill: the prompt through the model without the vision tower (generate's: to the end of its first "
        "forward); setup: the decoder's cache and CUDA graphs (and the compilation) when built, 0 when reused; "
        "decode and ms/token: the tokens after the first; total: the whole call."
    )


def shown(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
