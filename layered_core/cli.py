"""Command line: ``python -m layered_core {decompose,inspect,selftest,tiny-models}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .batch import FORMATS, BatchSettings, find_images, run_batch, terminal_progress
from .checkpoints import CheckpointError, describe_keys, infer_mmdit_config, open_checkpoint, quantized_layers
from .checkpoints.transformer import layered_prefix
from .pipeline import DecomposeOptions, LayeredPipeline
from .sampling import MAX_LAYERS, check_layer_count
from .selftest import main as selftest_main
from .tiny_models import write_comfy_models


def inspect_checkpoint(path: str) -> dict:
    """What a checkpoint holds, without loading its tensors."""
    source = open_checkpoint(path)
    keys = source.keys()
    info = {
        "path": str(source.location),
        "holds": describe_keys(keys),
        "tensors": len(keys),
        "bytes": sum(source.dtypes[k].itemsize * _numel(source.shapes[k]) for k in keys),
        "dtypes": sorted({str(source.dtypes[k]).removeprefix("torch.") for k in keys}),
    }
    prefix = layered_prefix(source)
    if prefix is not None:
        info["prefix"] = prefix
        info["fp8_layers"] = len(quantized_layers(source, prefix))
        info["config"] = infer_mmdit_config(source, prefix).to_dict()
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _colour(text: str) -> tuple[int, int, int]:
    text = text.lstrip("#")
    if len(text) != 6:
        raise argparse.ArgumentTypeError(f"colour must be RRGGBB hex, got {text!r}")
    return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))


def add_decompose_parser(sub) -> None:
    d = DecomposeOptions()
    p = sub.add_parser("decompose", help="decompose images into RGBA layers (PSD / PNG zip per image)")
    p.add_argument("inputs", nargs="+", help="image files and folders of images")
    p.add_argument("--out", required=True, help="output folder; one subfolder per image")
    p.add_argument("--model", help="diffusers folder of Qwen/Qwen-Image-Layered (all three models)")
    p.add_argument("--transformer", help="transformer file or folder (overrides --model)")
    p.add_argument("--vae", help="VAE file or folder (overrides --model)")
    p.add_argument("--text-encoder", help="folder with text_encoder/, tokenizer/, processor/ (overrides --model)")
    p.add_argument(
        "--layers", type=int, default=d.layer_count, help=f"layer count, 1..{MAX_LAYERS} (default {d.layer_count})"
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--cfg", type=float, default=d.cfg_scale, help="true-CFG scale; 1 turns guidance off")
    p.add_argument("--no-cfg-normalize", action="store_true")
    p.add_argument("--prompt", default=None, help="describe the whole image; empty = auto-caption")
    p.add_argument("--negative-prompt", default=d.negative_prompt)
    p.add_argument("--caption-language", choices=("en", "zh"), default=d.caption_language)
    p.add_argument("--resolution", type=int, choices=(640, 1024), default=d.resolution)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--input-size", action="store_true", help="layers at the input's own size, not the bucket's")
    p.add_argument("--background", type=_colour, help="flatten transparent input onto this RRGGBB colour")
    p.add_argument("--split-depth", type=int, default=0, help="split every layer recursively this deep")
    p.add_argument("--split-layers", type=int, default=2, help="sub-layers per split")
    p.add_argument("--format", default="psd,zip", help="comma-separated: psd, zip, png")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--fp8", choices=("keep", "dequantize"), default="keep", help="for fp8 transformer files")
    p.add_argument(
        "--vram-budget",
        type=float,
        metavar="GiB",
        help="use at most this much GPU memory (GiB): transformer blocks streamed from pinned host memory, "
        "text encoder and VAE on the GPU only while they run",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks: faster steps after some seconds of compilation on the first "
        "(benchmarks/RESULTS.md has the figures)",
    )


def decompose_command(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        print(f"error: --format takes {', '.join(FORMATS)}; got {args.format!r}", file=sys.stderr)
        return 2
    try:
        options = DecomposeOptions(
            layer_count=args.layers,
            steps=args.steps,
            cfg_scale=args.cfg,
            cfg_normalize=not args.no_cfg_normalize,
            negative_prompt=args.negative_prompt,
            resolution=args.resolution,
            seed=args.seed,
            caption_language=args.caption_language,
            keep_input_size=args.input_size,
            background=args.background,
        )
        check_layer_count(args.split_layers, "--split-layers")
        images = find_images(args.inputs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not images:
        print("error: no images found in the given inputs", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device}, but this torch build sees no CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    if not (args.text_encoder or args.model):
        # every image needs it (prompt embeddings, and the caption when --prompt is empty): say so before
        # spending minutes loading the other models
        print(
            "error: no text encoder: pass --model (the diffusers folder) or --text-encoder (a folder with "
            "text_encoder/ and tokenizer/); ComfyUI's single-file text encoders are not read by this command",
            file=sys.stderr,
        )
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        pipeline = LayeredPipeline.from_files(
            args.model,
            args.transformer,
            args.vae,
            args.text_encoder,
            device=device,
            dtype=dtype,
            fp8=args.fp8,
            vram_budget_gb=args.vram_budget,
            compile=args.compile,
        )
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(
            f"error: out of memory loading the models on {device}: use the fp8 transformer file (kept in fp8), "
            "--vram-budget GiB, or --device cpu",
            file=sys.stderr,
        )
        return 2
    settings = BatchSettings(options, args.prompt, formats, args.split_depth, args.split_layers)
    try:
        result = run_batch(pipeline, images, Path(args.out), settings, progress=terminal_progress)
    except KeyboardInterrupt:
        print("\ninterrupted: finished images are kept; run the same command again to go on", file=sys.stderr)
        return 130
    print(f"{len(result.done)} done, {len(result.skipped)} skipped (already done), {len(result.failed)} failed")
    for path, reason in result.failed.items():
        print(f"  failed: {path}: {reason}")
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layered_core", description="Qwen-Image-Layered in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="say what checkpoint files hold, without loading them")
    p_inspect.add_argument("paths", nargs="+", help="safetensors files, shard indexes or diffusers folders")
    sub.add_parser("selftest", help="tiny random models through every checkpoint layout and the models")
    add_decompose_parser(sub)
    p_tiny = sub.add_parser("tiny-models", help="write tiny random models under ComfyUI's real file names")
    p_tiny.add_argument("models_dir", help="a ComfyUI models/ folder (or any folder)")
    p_tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "tiny-models":
        for kind, path in write_comfy_models(args.models_dir, seed=args.seed).items():
            print(f"{kind}: {path}")
        return 0

    if args.command == "selftest":
        return selftest_main()
    if args.command == "decompose":
        return decompose_command(args)
    failed = 0
    for path in args.paths:
        try:
            print(json.dumps(inspect_checkpoint(path), indent=2))
        except CheckpointError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
