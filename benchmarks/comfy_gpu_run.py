"""The full-size models under ComfyUI's model management, on a GPU whose free memory is held down to
--vram-gb: a 640 px image decomposed into 4 layers through ComfyUI's own executor, by the pack's nodes (Decompose on
the pack's loader, its fast path on and off) and by core's native model (UNETLoader on the same file, core's KSampler
with EmptyQwenImageLayeredLatentImage and ReferenceLatent), one after the other in one process; the script prints
each one's seconds per step, first call (the sampler node's start to its first step: loading, and compiling where it
compiles), peak GPU memory and peak host RAM, side by side.

    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --steps 8
    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --steps 8 --file fp8mixed
    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --vram-gb 24 --variants pack-fast
    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --tiny -- --cpu   # CPU smoke test

Run from this repository's root with the python of ComfyUI's environment (e.g. ~/ComfyUI/.venv/bin/python):
ComfyUI's own modules are imported from the --comfyui checkout. torch must not be imported before ComfyUI
has parsed its flags, so the benchmarks library is imported only in the child process that writes the
model files.

Arguments after ``--`` go to ComfyUI (its command-line flags). On first use, random full-size weights
are written under <base>/models with the real file names (the 41 GB bf16 transformer, or with --file fp8mixed the
20 GB fp8mixed one in ComfyUI's per-layer quantised layout). Three harness-only nodes stand in for what needs no
measuring: random prompt embeddings (256 tokens; no 16 GB text encoder) and a noise input image (core's LoadImage
reads through PyAV). Everything else is the pack's nodes and core's. All variants share the condition latent (the
pack's Encode Image), steps, CFG scale and seed; Decode Layers and Save Layer PNGs follow each sampler. The VRAM limit
is real: a second process holds the rest of the GPU's memory, so ComfyUI sees (and can use) only --vram-gb.
peak_gpu_in_use is the device-wide high point of memory in use during a variant (from free memory sampled every
50 ms); peak_host_rss is the process's high point so far, so it only grows from one variant to the next (it
counts the checkpoint pages the process touched through its memory map).

With --tiny, core's model detection (which reads a Qwen-Image file's block count and input width and takes the
released model's other widths) is told the tiny model's widths, so that core's native model runs on the tiny file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRANSFORMER_FILES = {
    "bf16": "diffusion_models/qwen_image_layered_bf16.safetensors",
    "fp8mixed": "diffusion_models/qwen_image_layered_fp8mixed.safetensors",
}
VAE_FILE = "vae/qwen_image_layered_vae.safetensors"
VARIANTS = ("pack-fast", "pack-eager", "core")
SAMPLER = "7"  # the sampler's node id in every variant's graph
IMAGE_SIZE = (1280, 720)  # the noise image (width, height)
TEXT_TOKENS = 256
CFG = 4.0

HOLDER = """
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
keep = int(float(sys.argv[1]) * 2**30)
block = torch.empty(max(free - keep, 0), dtype=torch.uint8, device="cuda")
print("holding", block.numel(), flush=True)
time.sleep(100000)
"""


def write_models(models: Path, file: str) -> None:
    """Random full-size weights under the real ComfyUI file names (skipped where the file exists): the transformer
    as ``file`` (bf16, or fp8mixed: float8 block linears with per-tensor scales, ComfyUI's per-layer layout) and the
    RGBA-VAE."""
    import torch

    from benchmarks.workloads import random_model
    from layered_core.checkpoints import save_mmdit, save_vae
    from layered_core.mmdit import MMDiTConfig
    from layered_core.vae import RGBAVAE, VAEConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = models / TRANSFORMER_FILES[file]
    if not transformer.exists():
        start = time.perf_counter()
        fp8 = file == "fp8mixed"
        model = random_model(MMDiTConfig.full(), torch.bfloat16, device, fp8_blocks=fp8)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        del model
        layout = "fp8-comfy-quant" if fp8 else "comfy"
        save_mmdit(state, transformer, layout=layout, dtype=torch.bfloat16)
        del state
        print(f"wrote {transformer} in {time.perf_counter() - start:.0f} s", flush=True)
    vae_path = models / VAE_FILE
    if not vae_path.exists():
        save_vae(RGBAVAE(VAEConfig.full()), vae_path, layout="wan")
        print(f"wrote {vae_path}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hold_gpu_memory(vram_gb: float) -> subprocess.Popen:
    """A second process that takes all free GPU memory but ``vram_gb`` GiB."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(vram_gb)], stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    if not line.startswith("holding"):
        holder.kill()
        raise RuntimeError(f"the memory holder failed: {line!r}")
    return holder


class QuietServer:
    """What ComfyUI's executor needs of its server, with no client to send to; notes when each node starts."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.started: dict[str, float] = {}
        self.current: str | None = None  # the node executing now

    def send_sync(self, event, data, sid=None):
        if event == "executing" and isinstance(data, dict):
            self.current = None if data.get("node") is None else str(data["node"])
            if self.current is not None:
                self.started.setdefault(self.current, time.perf_counter())

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class SeededNode:
    """A harness-only ComfyUI node: one seed input, its output made from the seed by ``make``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    FUNCTION = "make"
    CATEGORY = "bench"


def graph(variant: str, file: str, steps: int, layers: int, resolution: int, size: tuple[int, int], fast: str) -> dict:
    """API-format prompt of one variant: load, encode, sample (node SAMPLER), decode, save PNGs. ``size`` is the
    model's (width, height) for the input image (core's empty latent must match the condition latent); ``fast`` the
    fast-path mode of the pack-fast variant."""
    transformer, vae = Path(TRANSFORMER_FILES[file]).name, Path(VAE_FILE).name
    nodes = {
        "2": {"class_type": "QwenLayeredLoadRGBAVAE", "inputs": {"vae_name": vae}},
        "3": {"class_type": "BenchNoiseImage", "inputs": {"seed": 3}},
        "4": {"class_type": "BenchRandomConditioning", "inputs": {"seed": 1}},
        "5": {"class_type": "BenchRandomConditioning", "inputs": {"seed": 2}},
        "6": {
            "class_type": "QwenLayeredEncodeImage",
            "inputs": {"vae": ["2", 0], "image": ["3", 0], "resolution": str(resolution)},
        },
        "8": {"class_type": "QwenLayeredDecodeLayers", "inputs": {"vae": ["2", 0], "samples": [SAMPLER, 0]}},
        "9": {
            "class_type": "QwenLayeredSaveLayerPNGs",
            "inputs": {"stack": ["8", 4], "filename_prefix": f"bench/{variant}"},
        },
    }
    if variant == "core":
        nodes["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": transformer, "weight_dtype": "default"}}
        for node, prompt in (("10", "4"), ("11", "5")):
            nodes[node] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [prompt, 0], "latent": ["6", 0]}}
        width, height = size
        nodes["12"] = {
            "class_type": "EmptyQwenImageLayeredLatentImage",
            "inputs": {"width": width, "height": height, "layers": layers, "batch_size": 1},
        }
        sampler = {"seed": 0, "steps": steps, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple"}
        links = {"model": ["1", 0], "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["12", 0]}
        nodes[SAMPLER] = {"class_type": "KSampler", "inputs": links | sampler | {"denoise": 1.0}}
        return nodes
    nodes["1"] = {
        "class_type": "QwenLayeredLoadMMDiT",
        "inputs": {"model_name": transformer, "weight_dtype": "default"},
    }
    mode = fast if variant == "pack-fast" else "off"
    nodes["13"] = {"class_type": "QwenLayeredFastPath", "inputs": {"model": ["1", 0], "mode": mode}}
    sampler = {"layers": layers, "steps": steps, "cfg": CFG, "cfg_normalize": True, "seed": 0}
    links = {"model": ["13", 0], "positive": ["4", 0], "negative": ["5", 0], "condition": ["6", 0]}
    nodes[SAMPLER] = {"class_type": "QwenLayeredDecompose", "inputs": links | sampler}
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    parser.add_argument(
        "--base", required=True, help="ComfyUI base directory (models/, input/, output/, custom_nodes/)"
    )
    parser.add_argument("--vram-gb", type=float, default=0.0, help="GPU memory left free for ComfyUI (0: all)")
    parser.add_argument("--file", choices=list(TRANSFORMER_FILES), default="bf16", help="the transformer file")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, run in this order: {', '.join(VARIANTS)} (pack-eager: the pack's nodes with the "
        "fast path off; core: core's native model)",
    )
    parser.add_argument("--fast-path", default="auto", help="the pack-fast variant's mode: auto, compiled or eager")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--tiny", action="store_true", help="use the tiny model set (a CPU smoke test)")
    parser.add_argument("--write-only", action="store_true", help="only write the model files")
    parser.add_argument("--resident-step", type=float, help="s/step of a whole-GPU run, for the RATIO line")
    parser.add_argument(
        "--pack-streaming",
        choices=("auto", "off"),
        default="auto",
        help="the pack's block streaming under ComfyUI (QWEN_LAYERED_COMFY_STREAMING); off: ComfyUI's casting only",
    )
    parser.add_argument("comfy_args", nargs="*", help="ComfyUI flags, after --")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: {', '.join(unknown) or 'none given'}; choose from {', '.join(VARIANTS)}")
    if args.fast_path not in ("auto", "compiled", "eager"):
        parser.error(f"--fast-path must be auto, compiled or eager, got {args.fast_path!r}")

    base = Path(args.base).resolve()
    models = base / "models"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "qwen_image_layered"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    if args.write_only:
        if args.tiny:
            from layered_core.tiny_models import write_comfy_models

            write_comfy_models(models)
        else:
            write_models(models, args.file)
        return
    # in a child process: torch must not be imported here before ComfyUI's dynamic-VRAM allocator starts
    write = [sys.executable, "-m", "benchmarks.comfy_gpu_run", "--base", str(base), "--write-only"]
    subprocess.run(write + ["--file", args.file] + ["--tiny"] * args.tiny, cwd=REPO, check=True)

    os.environ["QWEN_LAYERED_COMFY_STREAMING"] = args.pack_streaming
    holder = hold_gpu_memory(args.vram_gb) if args.vram_gb > 0 else None
    try:
        run(args, base, variants)
    finally:
        if holder is not None:
            holder.kill()


def start_comfyui(args, base: Path) -> bool:
    """ComfyUI's modules as its main.py starts them, with this pack and core's extra nodes loaded; returns whether
    dynamic VRAM is on."""
    comfyui = Path(args.comfyui).resolve()
    sys.path.insert(0, str(comfyui))  # ComfyUI's modules, from its checkout, as its main.py finds them
    os.chdir(comfyui)
    sys.argv = ["main.py", "--base-directory", str(base), "--disable-api-nodes", *args.comfy_args]
    from benchmarks import av_placeholder

    av_placeholder.install()  # ComfyUI's node API imports PyAV, which the GPU machine may lack
    import comfy.options

    comfy.options.enable_args_parsing()
    from comfy.cli_args import args as comfy_args
    from comfy.cli_args import enables_dynamic_vram

    if enables_dynamic_vram():
        # as ComfyUI's main.py does, before torch is imported: comfy-aimdo's allocator for dynamic VRAM
        import comfy_aimdo.control

        headroom = None if comfy_args.reserve_vram is None else int(comfy_args.reserve_vram * 1024**3)
        comfy_aimdo.control.init(simple_vram_headroom=headroom)
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    dynamic = False
    if enables_dynamic_vram() and mm.is_nvidia():
        # then, as main.py does on NVIDIA, the dynamic-VRAM model patcher
        import comfy_aimdo.control

        devices = ((d.index, int(comfy_args.vram_headroom * 1024**3)) for d in mm.get_all_torch_devices())
        if comfy_aimdo.control.init_devices(devices):
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            dynamic = True
    import nodes  # noqa: I001 (ComfyUI's modules, importable only now)

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    needed = ("QwenLayeredDecompose", "QwenLayeredFastPath", "EmptyQwenImageLayeredLatentImage", "ReferenceLatent")
    missing = [n for n in needed if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise SystemExit(f"nodes not registered: {missing} (see the import log above)")
    if args.tiny:
        tell_core_the_tiny_widths()
    return dynamic


def tell_core_the_tiny_widths() -> None:
    """Core's model detection takes a Qwen-Image file's block count and input width and the released model's other
    widths; for the tiny file it is given the tiny widths too."""
    import comfy.model_detection

    from layered_core.mmdit import MMDiTConfig

    tiny = MMDiTConfig.tiny()
    detect = comfy.model_detection.detect_unet_config

    def detect_tiny(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        if config and config.get("image_model") == "qwen_image":
            config |= {
                "num_attention_heads": tiny.num_heads,
                "attention_head_dim": tiny.head_dim,
                "joint_attention_dim": tiny.text_dim,
                "axes_dims_rope": tiny.axes_dims,
            }
        return config

    comfy.model_detection.detect_unet_config = detect_tiny


def register_harness_nodes(text_dim: int) -> None:
    import nodes  # noqa: I001 (ComfyUI's, ahead of this repository's on sys.path)
    import torch

    class BenchRandomConditioning(SeededNode):
        """Random prompt embeddings: stand in for the text encoder in this harness only."""

        RETURN_TYPES = ("CONDITIONING",)

        def make(self, seed):
            generator = torch.Generator().manual_seed(seed)
            return ([[torch.randn(1, TEXT_TOKENS, text_dim, generator=generator), {}]],)

    class BenchNoiseImage(SeededNode):
        """A noise IMAGE (core's LoadImage needs PyAV, which this harness may lack)."""

        RETURN_TYPES = ("IMAGE",)

        def make(self, seed):
            width, height = IMAGE_SIZE
            return (torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed)),)

    nodes.NODE_CLASS_MAPPINGS["BenchRandomConditioning"] = BenchRandomConditioning
    nodes.NODE_CLASS_MAPPINGS["BenchNoiseImage"] = BenchNoiseImage


def run(args, base: Path, variants: list[str]) -> None:
    dynamic = start_comfyui(args, base)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import torch

    from layered_core.image import bucket_size
    from layered_core.mmdit import MMDiTConfig

    # ComfyUI logs at INFO what it loads and how; the fast path why a block steps aside
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    register_harness_nodes(MMDiTConfig.tiny().text_dim if args.tiny else MMDiTConfig.full().text_dim)
    size = bucket_size(*IMAGE_SIZE, args.resolution)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"GPU free at start {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; vram state {mm.vram_state.name}")
    results = []
    for variant in variants:
        prompt = graph(variant, args.file, args.steps, args.layers, args.resolution, size, args.fast_path)
        earlier = set((base / "output" / "bench").glob(f"{variant}_*"))
        result = run_variant(variant, prompt, args.steps)
        result |= {"dynamic_vram": dynamic, "patcher": comfy.model_patcher.CoreModelPatcher.__name__}
        saved = sorted(set((base / "output" / "bench").glob(f"{variant}_*")) - earlier)
        result["saved"] = [path.name for path in saved]
        print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        if variant != "core":
            print(ratio_line(float(result["s/step"]), args.resident_step, args.vram_gb), flush=True)
        results.append(result)
    print(
        f"\nfile={args.file} vram_limit={args.vram_gb or 'none'} GiB flags={' '.join(args.comfy_args) or '(default)'} "
        f"steps={args.steps} layers={args.layers} resolution={args.resolution}"
    )
    columns = ("variant", "s/step", "first_call_s", "total_s", "peak_gpu_allocated_gib", "peak_gpu_in_use_gib")
    print(" | ".join(columns))
    for result in results:
        print(" | ".join(str(result[c]) for c in columns))


def run_variant(variant: str, prompt: dict, steps: int) -> dict:
    """One variant's prompt through a fresh executor, its timings and memory, and every model unloaded after."""
    import comfy.model_management as mm
    import comfy.utils
    import execution
    import torch

    stamps: list[float] = []
    server = QuietServer()

    streaming_seen: list[str] = []

    def progress(value, total, preview, node_id=None):
        if server.current == SAMPLER and total == steps:
            stamps.append(time.perf_counter())
            if len(stamps) == 2:  # during sampling, the transformer loaded
                streaming_seen.append(pack_streaming())

    comfy.utils.set_progress_bar_global_hook(progress)
    cuda = torch.cuda.is_available()
    # device-wide use, not only torch's allocator: with dynamic VRAM the weights live outside it
    lowest_free, done = [float("inf")], threading.Event()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        free_before = torch.cuda.mem_get_info()[0]

        def sample_free_memory():
            while not done.wait(0.05):
                lowest_free[0] = min(lowest_free[0], torch.cuda.mem_get_info()[0])

        threading.Thread(target=sample_free_memory, daemon=True).start()
    executor = execution.PromptExecutor(
        server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
    )
    start = time.perf_counter()
    executor.execute(prompt, variant, {"client_id": "bench"}, ["9"])
    seconds = time.perf_counter() - start
    done.set()
    if not executor.success:
        for message in executor.status_messages:
            print(message)
        raise SystemExit(f"the {variant} workflow failed")
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # the first step holds the warm-up (weights faulted in, compilation); later steps are the steady state
    step_seconds = statistics.median(intervals) if intervals else float("nan")
    first_call = stamps[0] - server.started.get(SAMPLER, start) if stamps else float("nan")
    result = {
        "variant": variant,
        "s/step": f"{step_seconds:.3f}",
        "first_call_s": f"{first_call:.1f}",
        "total_s": f"{seconds:.1f}",
        "peak_gpu_allocated_gib": f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "nan",
        "peak_gpu_in_use_gib": f"{(free_before - lowest_free[0]) / 2**30:.1f}" if cuda else "nan",
        "peak_host_rss_gib": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}",
    }
    result |= block_runs()
    result["pack_streaming"] = repr(" | ".join(streaming_seen))
    del executor
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    return result


# the bounds on a step held to N GiB, as a multiple of the resident step
STEP_RATIO_TARGETS = {24: 1.15, 16: 1.25, 8: 1.4}


def ratio_line(step_seconds: float, resident_step: float | None, vram_gb: float) -> str:
    """The limited step against the resident one (``--resident-step``, from a run of this script with the whole
    GPU and the same file), and the issue's bound for this limit where it has one."""
    if resident_step is None:
        return "RATIO not computed (pass --resident-step SECONDS from a run with the whole GPU)"
    ratio = step_seconds / resident_step
    target = STEP_RATIO_TARGETS.get(round(vram_gb)) if vram_gb else None
    verdict = "" if target is None else f" target <= {target}: {'met' if ratio <= target else 'NOT met'}"
    return f"RATIO step/resident={ratio:.3f} ({step_seconds:.3f} / {resident_step:.3f} s){verdict}"


def pack_streaming() -> str:
    """How the pack brings the loaded transformer's blocks over now (nodes/comfy_streaming.describe)."""
    import comfy.model_management as mm

    # ComfyUI imports the pack under its folder's path as the package name
    module = next((m for name, m in sys.modules.items() if name.endswith(".nodes.comfy_streaming")), None)
    if module is None:
        return "the pack's comfy_streaming module is not loaded"
    for loaded in mm.current_loaded_models:
        diffusion_model = getattr(getattr(loaded.model, "model", None), "diffusion_model", None)
        if hasattr(diffusion_model, "transformer_blocks"):
            return module.describe(diffusion_model)
    return "no layered transformer loaded"


def block_runs() -> dict:
    """How the loaded pack model's blocks ran (fast path / ComfyUI's layers), where one is loaded."""
    import comfy.model_management as mm

    for loaded in mm.current_loaded_models:
        patcher = loaded.model
        runs = getattr(getattr(getattr(patcher, "model", None), "diffusion_model", None), "block_runs", None)
        if runs is not None:
            return {"fast_blocks": runs["fast"], "comfy_blocks": runs["comfy"]}
    return {}


if __name__ == "__main__":
    main()
