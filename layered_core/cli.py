"""Command line: ``python -m layered_core {decompose,edit,evaluate,inspect,selftest,tiny-models}``, also the
``layered-core`` script (``edit`` lives in :mod:`.edit_command`).

A mistake a user can fix is one line naming the flag (or file) and what was expected, exit code 2, found before
any model loads. An interruption (Ctrl-C), wherever it comes, ends with one line and exit code 130.
"""

from __future__ import annotations

import signal
import sys
import threading

# torch and the models' code take seconds to import, before main() runs, and an interrupt inside a C extension's
# import can come out as an ImportError instead of a KeyboardInterrupt: one that comes now is held until the
# imports are done, then ends the command like any other.
_held_interrupts: list[int] = []
_in_main_thread = threading.current_thread() is threading.main_thread()
try:
    if _in_main_thread:
        _handler = signal.signal(signal.SIGINT, lambda signum, frame: _held_interrupts.append(signum))
    import argparse
    import contextlib
    import json
    import logging
    import os
    import time
    from dataclasses import dataclass, field
    from pathlib import Path

    import torch

    from .batch import (
        FORMATS,
        BatchSettings,
        check_formats,
        check_split_depth,
        find_images,
        images_in_subfolders,
        run_batch,
    )
    from .caches import keep_compiled_code
    from .checkpoints import CheckpointError, open_checkpoint, open_transformer
    from .checkpoints.describe import describe
    from .checkpoints.models_folder import find_models, models_folder
    from .checkpoints.text_encoder import COMFY_FILE as COMFY_TEXT_ENCODER_FILE
    from .checkpoints.text_encoder import COMFY_TOKENIZER, check_text_encoder_file
    from .checkpoints.transformer import transformer_precision
    from .checkpoints.vae import vae_prefix, vae_shape
    from .compile_policy import COMPILE_SETTINGS, MIN_COMPILED_STEPS, caption_compile_choice, compile_choice
    from .distributed.command import ParallelDecompose, add_parallel_arguments
    from .distributed.group import ConfigMismatch, ParallelError
    from .edit_command import add_edit_parser, edit_command
    from .evaluate import EvaluationError, evaluate, format_table, write_json
    from .image import IMAGE_SUFFIXES
    from .pipeline import DecomposeOptions, LayeredPipeline, is_blank_prompt
    from .progress import ProgressLogHandler, TerminalProgress, duration
    from .sampling import MAX_LAYERS, check_layer_count
    from .selftest import main as selftest_main
    from .text import find_text_encoder
    from .tiny_models import write_comfy_models
finally:
    if _in_main_thread:
        signal.signal(signal.SIGINT, _handler or signal.default_int_handler)
if _held_interrupts:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _interrupted(text: str = "interrupted") -> None:
    # on a terminal the status line (and the ^C echoed into it) is cleared first
    clear = "\r\033[K" if sys.stderr.isatty() else ""
    sys.stderr.write(f"{clear}{text}\n")
    sys.stderr.flush()


class UsageError(ValueError):
    """A command line that cannot work; the message names the flag and what it takes."""


def program_name(argv0: str | None = None) -> str:
    """The command as the user typed it: ``python -m layered_core``, or the script's name (``layered-core``)."""
    name = Path(sys.argv[0] if argv0 is None else argv0).name
    if name in ("__main__.py", "") or name.startswith("-"):
        return f"{Path(sys.executable).name or 'python'} -m layered_core"
    return name


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
    p.add_argument("--recursive", action="store_true", help="take the images in the folders' subfolders too")
    p.add_argument(
        "--model",
        help="a diffusers folder of Qwen/Qwen-Image-Layered, or a ComfyUI models folder (diffusion_models/, vae/, "
        "text_encoders/): the models are found by what their files hold",
    )
    p.add_argument("--transformer", help="transformer file or folder (overrides --model)")
    p.add_argument("--vae", help="VAE file or folder (overrides --model)")
    p.add_argument(
        "--text-encoder",
        help="folder with text_encoder/ and tokenizer/ (processor/ for auto-captions), or ComfyUI's single file "
        f"{COMFY_TEXT_ENCODER_FILE} (overrides --model)",
    )
    p.add_argument(
        "--tokenizer",
        help="the tokenizer of a single-file text encoder: a folder with tokenizer.json or vocab.json + merges.txt "
        "(and preprocessor_config.json), or a diffusers folder with tokenizer/ (default: the --model diffusers "
        f"folder, else {COMFY_TOKENIZER.as_posix()} of the ComfyUI folder the file is in)",
    )
    p.add_argument(
        "--layers", type=int, default=d.layer_count, help=f"layer count, 1..{MAX_LAYERS} (default %(default)s)"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="sampling steps (default %(default)s)")
    p.add_argument(
        "--cfg", type=float, default=d.cfg_scale, help="true-CFG scale; 1 turns guidance off (default %(default)s)"
    )
    p.add_argument("--no-cfg-normalize", action="store_true", help="guide without rescaling to the cond's norm")
    p.add_argument("--prompt", default=None, help="describe the whole image; empty = auto-caption (the default)")
    p.add_argument("--negative-prompt", default=d.negative_prompt, help="(default %(default)r)")
    p.add_argument("--caption-language", choices=("en", "zh"), default=d.caption_language, help="(default %(default)s)")
    p.add_argument(
        "--resolution",
        type=int,
        choices=(640, 1024),
        default=d.resolution,
        help="the bucket: width x height about this squared (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    p.add_argument("--input-size", action="store_true", help="layers at the input's own size, not the bucket's")
    p.add_argument("--background", type=_colour, help="flatten transparent input onto this RRGGBB colour")
    p.add_argument(
        "--split-depth",
        type=int,
        default=0,
        help="split every layer recursively this deep, each split auto-captioned (default %(default)s: no split)",
    )
    p.add_argument("--split-layers", type=int, default=2, help="sub-layers per split (default %(default)s)")
    p.add_argument("--format", default="psd,zip", help=f"comma-separated: {', '.join(FORMATS)} (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (default %(default)s)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="(default %(default)s)")
    p.add_argument(
        "--fp8",
        choices=("keep", "dequantize"),
        default="keep",
        help="for fp8 transformer and text-encoder files (default %(default)s)",
    )
    p.add_argument(
        "--vram-budget",
        type=float,
        metavar="GiB",
        help="use at most this much GPU memory (GiB): transformer blocks streamed from pinned host memory, "
        "text encoder and VAE on the GPU only while they run (the text encoder on the CPU where it does not fit)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=COMPILE_SETTINGS,
        help="torch.compile the transformer blocks: auto (the default) compiles on a CUDA GPU with Triton for runs of "
        f"{MIN_COMPILED_STEPS} steps or more (under --vram-budget too), not on the CPU; the compiled code is kept in "
        "~/.cache/qwen-layered, so later runs start fast (benchmarks/RESULTS.md has the figures)",
    )
    add_parallel_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="more detail, and a failed image's traceback")


def resolve_device(text: str) -> str:
    """The device ``--device`` names ("auto": cuda when there is a GPU), checked to exist in this torch build."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {text}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}, but this torch build sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}, but this torch build has no MPS (Apple GPU) support; use --device cpu")
    return text


@dataclass
class ModelFiles:
    transformer: Path
    vae: Path
    text_encoder: Path
    lines: list[str] = field(default_factory=list)  # what was chosen, for the user
    precision: str = ""
    tokenizer: Path | None = None  # a single-file text encoder's
    text_encoder_precision: str = ""  # a single-file text encoder's


def _caption_reason(settings: BatchSettings) -> str:
    if is_blank_prompt(settings.prompt):
        return "--prompt is empty"
    return "--split-depth captions every layer it splits"


def find_model_files(args, settings: BatchSettings) -> ModelFiles:
    """The three models the flags name, checked from their headers and configs (nothing loaded): explicit
    flags first, then ``--model`` (a diffusers folder, or a ComfyUI models folder searched by content)."""
    transformer, vae, text_encoder = args.transformer, args.vae, args.text_encoder
    tokenizer = args.tokenizer
    lines: list[str] = []
    if args.model:
        folder = models_folder(args.model)
        if folder is not None:
            missing = tuple(
                k for k, v in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)) if v is None
            )
            need_processor = settings.needs_caption() and text_encoder is None
            found = find_models(folder, missing, need_processor=need_processor, tokenizer_folder=tokenizer)
            transformer = transformer or found.transformer
            vae = vae or found.vae
            text_encoder = text_encoder or found.text_encoder
            lines = found.summary()
        elif not (Path(args.model) / "model_index.json").is_file():
            raise UsageError(
                f"--model {args.model}: neither a diffusers folder of Qwen/Qwen-Image-Layered (model_index.json) nor "
                "a ComfyUI models folder (diffusion_models/, vae/, text_encoders/)"
            )
        else:
            transformer, vae, text_encoder = transformer or args.model, vae or args.model, text_encoder or args.model
            # a single file given with --text-encoder takes the diffusers folder's tokenizer/ and processor/
            tokenizer = tokenizer or args.model
    if transformer is None or vae is None:
        raise UsageError(
            "need a transformer and a VAE: pass --model (a diffusers or ComfyUI models folder), or "
            "--transformer and --vae"
        )
    if text_encoder is None:
        # every image needs it (prompt embeddings, and the caption when --prompt is empty)
        raise UsageError(
            "no text encoder: pass --model (the diffusers folder) or --text-encoder (a folder with text_encoder/ and "
            f"tokenizer/, or ComfyUI's {COMFY_TEXT_ENCODER_FILE})"
        )
    transformer_flag = "--transformer" if args.transformer else "--model"
    try:
        source, prefix = open_transformer(transformer)
        precision = transformer_precision(source, prefix)
    except CheckpointError as e:
        raise UsageError(f"{transformer_flag}: {e}") from None
    vae_flag = "--vae" if args.vae else "--model"
    try:
        vae_source = open_checkpoint(vae, component="vae")
        prefix = vae_prefix(vae_source)
        if prefix is None:
            raise CheckpointError(vae_source.location, "not a VAE: it has no encoder and decoder tensors")
        vae_shape(vae_source, prefix)
    except (CheckpointError, ValueError) as e:
        raise UsageError(f"{vae_flag}: {e}") from None
    text_flag = "--text-encoder" if args.text_encoder else "--model"
    single_file = Path(text_encoder).is_file()
    if args.tokenizer and not single_file:
        raise UsageError(
            f"--tokenizer {args.tokenizer}: the text encoder {text_encoder} is a folder with its own tokenizer; "
            f"--tokenizer goes with a single-file text encoder ({COMFY_TEXT_ENCODER_FILE})"
        )
    try:
        parts = find_text_encoder(text_encoder, tokenizer if single_file else None)
    except CheckpointError as e:
        raise UsageError(f"{text_flag}: {e}") from None
    if settings.needs_caption() and parts.caption_problem:
        reason = _caption_reason(settings)
        fix = "copy processor/ from Qwen/Qwen-Image-Layered beside it"
        if single_file:
            fix = "use a text encoder that holds it"
        if reason.startswith("--prompt"):
            fix += ", or pass --prompt"
        raise UsageError(
            f"{text_flag} {text_encoder}: {parts.caption_problem}, and the auto-caption needs it ({reason}): {fix}"
        )
    transformer, vae, text_encoder = (Path(p).expanduser().resolve() for p in (transformer, vae, text_encoder))
    models = ModelFiles(transformer, vae, text_encoder, lines=lines, precision=precision)
    if single_file:
        models.tokenizer = parts.tokenizer.resolve()
        models.text_encoder_precision = check_text_encoder_file(text_encoder).precision
    return models


def _no_images_message(args) -> str:
    if not args.recursive:
        below = images_in_subfolders(args.inputs)
        if below:
            return f"no images found in {', '.join(args.inputs)}; its subfolders hold {below}: pass --recursive"
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    return f"no images found in {', '.join(args.inputs)} (image files end in {suffixes})"


@dataclass
class Plan:
    settings: BatchSettings
    images: list[Path]
    out: Path
    device: str
    models: ModelFiles


def plan_decompose(args) -> Plan:
    """Everything ``decompose`` needs, checked before any model loads; UsageError (or a CheckpointError naming
    the file) for what cannot work."""
    formats = check_formats((f.strip() for f in args.format.split(",") if f.strip()), "--format")
    check_layer_count(args.layers, "--layers")
    check_layer_count(args.split_layers, "--split-layers")
    check_split_depth(args.split_depth, "--split-depth")
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
    settings = BatchSettings(options, args.prompt, formats, args.split_depth, args.split_layers)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; --out takes a folder (one subfolder per image is made in it)")
    images = find_images(args.inputs, recursive=args.recursive, exclude=out)
    if not images:
        raise UsageError(_no_images_message(args))
    models = find_model_files(args, settings)
    settings.models = {
        "transformer": str(models.transformer),
        "vae": str(models.vae),
        "text_encoder": str(models.text_encoder),
        "dtype": args.dtype,
    }
    if models.tokenizer is not None:
        settings.models["tokenizer"] = str(models.tokenizer)
    if "fp8" in (models.precision, models.text_encoder_precision):
        settings.models["fp8"] = args.fp8
    return Plan(settings, images, out, device, models)


@contextlib.contextmanager
def _log_through(progress, verbose: bool):
    """The package's log records shown as the progress's lines for the command's duration (DEBUG with
    ``verbose``, else warnings only)."""
    package = logging.getLogger("layered_core")
    handler = ProgressLogHandler(progress)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if verbose else logging.WARNING)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.level, package.propagate = saved


def decompose_command(args) -> int:
    progress = TerminalProgress(sys.stderr)
    with _log_through(progress, args.verbose):
        try:
            return _decompose(args, progress)
        except KeyboardInterrupt:
            progress.close()
            _interrupted("interrupted: finished images are kept; run the same command again to go on")
            return EXIT_INTERRUPTED
        finally:
            progress.close()


def _decompose(args, progress: TerminalProgress) -> int:
    try:
        plan = plan_decompose(args)
        parallel = ParallelDecompose.plan(args, plan)  # None unless torchrun started this process
    except (ValueError, FileNotFoundError) as e:  # UsageError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if parallel is None:
        return _decompose_planned(args, plan, progress)
    try:
        parallel.start(args, plan)
        plan.device = parallel.device
        progress = parallel.progress(progress)
        progress.note(parallel.describe())
        return _decompose_planned(args, plan, progress, parallel)
    except (ValueError, ParallelError) as e:
        progress.close()
        print(f"error: rank {parallel.rank}: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError | ConfigMismatch) else 1
    finally:
        parallel.stop()


def _decompose_planned(args, plan: Plan, progress, parallel: ParallelDecompose | None = None) -> int:
    for line in plan.models.lines:
        progress.note(line)
    # transformers draws a bar per file it loads: our own progress says what is loading
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        compile_blocks, why = compile_choice(args.compile, plan.device, args.steps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    progress.note(f"compile: {why}")
    count = len(plan.images)
    # a lower bound: split layers are captioned too
    captions = 0 if args.prompt else count
    compile_caption, why = caption_compile_choice(args.compile, plan.device, captions)
    progress.note(f"caption compile: {why}")
    if compile_blocks or compile_caption:
        keep_compiled_code()
    progress.stage(f"loading models on {plan.device}")
    started = time.monotonic()
    try:
        pipeline = LayeredPipeline.from_files(
            transformer=str(plan.models.transformer),
            vae=str(plan.models.vae),
            text_encoder=str(plan.models.text_encoder),
            tokenizer=None if plan.models.tokenizer is None else str(plan.models.tokenizer),
            device=plan.device,
            dtype=DTYPES[args.dtype],
            fp8=args.fp8,
            vram_budget_gb=args.vram_budget,
            compile=compile_blocks,
        )
    except (CheckpointError, ValueError, OSError) as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except torch.OutOfMemoryError:
        progress.close()
        print(
            f"error: out of memory loading the models on {plan.device}: use the fp8 transformer file (kept in fp8), "
            "--vram-budget GiB, or --device cpu",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if pipeline.text_encoder is not None and hasattr(pipeline.text_encoder, "compile_caption"):
        pipeline.text_encoder.compile_caption = compile_caption
    progress.note(f"models loaded in {duration(time.monotonic() - started)}; {count} image{'s' * (count != 1)}")
    if parallel is None:
        result = run_batch(pipeline, plan.images, plan.out, plan.settings, progress=progress)
    else:
        result = parallel.run_batch(pipeline, plan, progress)
    progress.close()
    if parallel is None or parallel.rank == 0:
        print(f"{len(result.done)} done, {len(result.skipped)} skipped (already done), {len(result.failed)} failed")
    return 1 if result.failed else 0


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score decompositions against ground-truth layers with LayerD's metrics (the paper's Table 1)",
        description="Pairs the samples of the two folders by name: <name>/ folders of PNGs (bottom to top in name "
        "order, as LayerD's Crello layers and decompose --format png), <name>.zip (PNG zip) or <name>.psd. Prints "
        "RGB L1 and alpha soft IoU for max merges 0..N and writes every sample's scores as JSON.",
    )
    p.add_argument("prediction", help="folder of predicted layer stacks (e.g. decompose --format png's --out)")
    p.add_argument("ground_truth", help="folder of ground-truth layer stacks, the same names")
    p.add_argument("--json", help="where the per-sample scores go (default: PREDICTION/layerd_scores.json)")
    p.add_argument("--max-merges", type=int, default=5, help="the table's last column (default %(default)s)")
    p.add_argument(
        "--all-samples",
        action="store_true",
        help="average every sample; by default those with fewer than 2 layers on either side are left out, as "
        "LayerD's evaluation (and so the paper) does",
    )


def evaluate_command(args) -> int:
    if args.max_merges < 0:
        print(f"error: --max-merges {args.max_merges}: expected 0 or more", file=sys.stderr)
        return EXIT_USAGE
    json_path = Path(args.json) if args.json else Path(args.prediction) / "layerd_scores.json"
    if not json_path.parent.is_dir() and Path(args.prediction).is_dir():
        print(f"error: --json {json_path}: the folder {json_path.parent} does not exist", file=sys.stderr)
        return EXIT_USAGE
    progress = TerminalProgress(sys.stderr)
    try:
        evaluation = evaluate(
            args.prediction, args.ground_truth, args.max_merges, layerd_filter=not args.all_samples, progress=progress
        )
        progress.close()
        write_json(evaluation, json_path)
    except (EvaluationError, OSError) as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(evaluation))
    print(f"every sample's scores: {json_path}")
    return 0


def inspect_command(args) -> int:
    failed = 0
    for path in args.paths:
        try:
            print(json.dumps(describe(path), indent=2))
        except (CheckpointError, OSError) as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


def tiny_models_command(args) -> int:
    for kind, path in write_comfy_models(args.models_dir, seed=args.seed).items():
        print(f"{kind}: {path}")
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or program_name(), description="Qwen-Image-Layered in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="say what checkpoint files and model folders hold, without loading")
    p_inspect.add_argument(
        "paths", nargs="+", help="safetensors files, shard indexes, diffusers, text encoder or ComfyUI models folders"
    )
    sub.add_parser("selftest", help="tiny random models through every checkpoint layout and the models")
    add_decompose_parser(sub)
    add_edit_parser(sub)
    add_evaluate_parser(sub)
    p_tiny = sub.add_parser("tiny-models", help="write tiny random models under ComfyUI's real file names")
    p_tiny.add_argument("models_dir", help="a ComfyUI models/ folder (or any folder)")
    p_tiny.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    return parser


COMMANDS = {
    "decompose": decompose_command,
    "edit": edit_command,
    "evaluate": evaluate_command,
    "inspect": inspect_command,
    "selftest": lambda args: selftest_main(),
    "tiny-models": tiny_models_command,
}


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help (0) and usage errors (2): returned, as every other outcome
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _interrupted()
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
