"""The full-size models under ComfyUI's model management, on a GPU whose free memory is held down to
--vram-gb: this pack's nodes decompose a 640 px image into 4 layers through ComfyUI's own executor, and
the script prints seconds per step, peak GPU memory and peak host RAM.

    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --vram-gb 24
    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --vram-gb 24 -- --lowvram
    python -m benchmarks.comfy_gpu_run --comfyui ~/ComfyUI --base /tmp/cbase --tiny -- --cpu   # CPU smoke test

Run from this repository's root with the python of ComfyUI's environment (e.g. ~/ComfyUI/.venv/bin/python):
ComfyUI's own modules are imported from the --comfyui checkout. torch must not be imported before ComfyUI
has parsed its flags, so the benchmarks library is imported only in the child process that writes the
model files.

Arguments after ``--`` go to ComfyUI (its command-line flags). On first use, random full-size weights
are written under <base>/models with the real file names (41 GB transformer, bf16). Two harness-only
nodes stand in for what needs no measuring: random prompt embeddings (256 tokens; no 16 GB text
encoder) and a noise input image (core's LoadImage reads through PyAV). Everything else is the pack's
nodes. The VRAM limit is real: a second process holds the rest of the GPU's memory, so ComfyUI sees
(and can use) only --vram-gb. peak_gpu_in_use is the device-wide high point of memory in use during the
run (from free memory sampled every 50 ms); peak_host_rss counts the checkpoint pages the process
touched through its memory map.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRANSFORMER_FILE = "diffusion_models/qwen_image_layered_bf16.safetensors"
VAE_FILE = "vae/qwen_image_layered_vae.safetensors"

HOLDER = """
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
keep = int(float(sys.argv[1]) * 2**30)
block = torch.empty(max(free - keep, 0), dtype=torch.uint8, device="cuda")
print("holding", block.numel(), flush=True)
time.sleep(100000)
"""


def write_models(models: Path) -> None:
    """Random full-size weights under the real ComfyUI file names (skipped where the file exists)."""
    import torch

    from benchmarks.workloads import random_model
    from layered_core.checkpoints import save_mmdit, save_vae
    from layered_core.mmdit import MMDiTConfig
    from layered_core.vae import RGBAVAE, VAEConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = models / TRANSFORMER_FILE
    if not transformer.exists():
        start = time.perf_counter()
        model = random_model(MMDiTConfig.full(), torch.bfloat16, device)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        del model
        save_mmdit(state, transformer, layout="comfy", dtype=torch.bfloat16)
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
    """What ComfyUI's executor needs of its server, with no client to send to."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class SeededNode:
    """A harness-only ComfyUI node: one seed input, its output made from the seed by ``make``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    FUNCTION = "make"
    CATEGORY = "bench"


def graph(steps: int, layers: int, resolution: int, weight_dtype: str = "default") -> dict:
    """API-format prompt: load, encode, decompose, decode, save PNGs."""
    transformer, vae = Path(TRANSFORMER_FILE).name, Path(VAE_FILE).name
    sampler = {"layers": layers, "steps": steps, "cfg": 4.0, "cfg_normalize": True, "seed": 0}
    return {
        "1": {
            "class_type": "QwenLayeredLoadMMDiT",
            "inputs": {"model_name": transformer, "weight_dtype": weight_dtype},
        },
        "2": {"class_type": "QwenLayeredLoadRGBAVAE", "inputs": {"vae_name": vae}},
        "3": {"class_type": "BenchNoiseImage", "inputs": {"seed": 3}},
        "4": {"class_type": "BenchRandomConditioning", "inputs": {"seed": 1}},
        "5": {"class_type": "BenchRandomConditioning", "inputs": {"seed": 2}},
        "6": {
            "class_type": "QwenLayeredEncodeImage",
            "inputs": {"vae": ["2", 0], "image": ["3", 0], "resolution": str(resolution)},
        },
        "7": {
            "class_type": "QwenLayeredDecompose",
            "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "condition": ["6", 0]} | sampler,
        },
        "8": {"class_type": "QwenLayeredDecodeLayers", "inputs": {"vae": ["2", 0], "samples": ["7", 0]}},
        "9": {
            "class_type": "QwenLayeredSaveLayerPNGs",
            "inputs": {"stack": ["8", 4], "filename_prefix": "bench/layers"},
        },
    }


# the bounds on a step held to N GiB, as a multiple of the resident step
STEP_RATIO_TARGETS = {24: 1.15, 16: 1.25, 8: 1.4}


def ratio_line(step_seconds: float, resident_step: float | None, vram_gb: float) -> str:
    """The limited step against the resident one (``--resident-step``, from a run of this script with the whole
    GPU and the same weight dtype), and the issue's bound for this limit where it has one."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    parser.add_argument(
        "--base", required=True, help="ComfyUI base directory (models/, input/, output/, custom_nodes/)"
    )
    parser.add_argument("--vram-gb", type=float, default=0.0, help="GPU memory left free for ComfyUI (0: all)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--tiny", action="store_true", help="use the tiny model set (a CPU smoke test)")
    parser.add_argument("--write-only", action="store_true", help="only write the model files")
    parser.add_argument("--resident-step", type=float, help="s/step of a whole-GPU run, for the RATIO line")
    parser.add_argument(
        "--weight-dtype", default="default", help="Load VLD-MMDiT's weight_dtype (default, bf16, fp8_e4m3fn)"
    )
    parser.add_argument(
        "--pack-streaming",
        choices=("auto", "off"),
        default="auto",
        help="the pack's block streaming under ComfyUI (QWEN_LAYERED_COMFY_STREAMING); off: ComfyUI's casting only",
    )
    parser.add_argument("comfy_args", nargs="*", help="ComfyUI flags, after --")
    args = parser.parse_args()

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
            write_models(models)
        return
    # in a child process: torch must not be imported here before ComfyUI's dynamic-VRAM allocator starts
    write = [sys.executable, "-m", "benchmarks.comfy_gpu_run", "--base", str(base), "--write-only"]
    subprocess.run(write + ["--tiny"] * args.tiny, cwd=REPO, check=True)

    os.environ["QWEN_LAYERED_COMFY_STREAMING"] = args.pack_streaming
    holder = hold_gpu_memory(args.vram_gb) if args.vram_gb > 0 else None
    try:
        run(args, base)
    finally:
        if holder is not None:
            holder.kill()


def run(args, base: Path) -> None:
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
    import comfy.utils
    import torch

    dynamic = False
    if enables_dynamic_vram() and mm.is_nvidia():
        # then, as main.py does on NVIDIA, the dynamic-VRAM model patcher
        import comfy_aimdo.control

        devices = ((d.index, int(comfy_args.vram_headroom * 1024**3)) for d in mm.get_all_torch_devices())
        if comfy_aimdo.control.init_devices(devices):
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            dynamic = True
    import execution  # noqa: I001 (ComfyUI's modules, importable only now)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    missing = [n for n in ("QwenLayeredDecompose", "QwenLayeredLoadMMDiT") if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise SystemExit(f"nodes not registered: {missing} (see the import log above)")

    text_dim = 48 if args.tiny else 3584

    class BenchRandomConditioning(SeededNode):
        """Random prompt embeddings (256 tokens): stands in for the text encoder in this harness only."""

        RETURN_TYPES = ("CONDITIONING",)

        def make(self, seed):
            generator = torch.Generator().manual_seed(seed)
            return ([[torch.randn(1, 256, text_dim, generator=generator), {}]],)

    class BenchNoiseImage(SeededNode):
        """A 1280x720 noise IMAGE (core's LoadImage needs PyAV, which this harness may lack)."""

        RETURN_TYPES = ("IMAGE",)

        def make(self, seed):
            return (torch.rand(1, 720, 1280, 3, generator=torch.Generator().manual_seed(seed)),)

    nodes.NODE_CLASS_MAPPINGS["BenchRandomConditioning"] = BenchRandomConditioning
    nodes.NODE_CLASS_MAPPINGS["BenchNoiseImage"] = BenchNoiseImage

    stamps: list[float] = []
    streaming_seen: list[str] = []

    def on_progress(value, total, preview, node_id=None):
        stamps.append(time.perf_counter())
        if len(stamps) == 2:  # during sampling, the transformer loaded
            streaming_seen.append(pack_streaming())

    comfy.utils.set_progress_bar_global_hook(on_progress)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        print(f"GPU free at start {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; vram state {mm.vram_state.name}")
    # device-wide use, not only torch's allocator: with dynamic VRAM the weights live outside it
    lowest_free = [float("inf")]
    done = threading.Event()

    def sample_free_memory():
        while not done.wait(0.05):
            lowest_free[0] = min(lowest_free[0], torch.cuda.mem_get_info()[0])

    sampler = threading.Thread(target=sample_free_memory, daemon=True)
    if torch.cuda.is_available():
        sampler.start()
    executor = execution.PromptExecutor(
        QuietServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
    )
    start = time.perf_counter()
    executor.execute(graph(args.steps, args.layers, args.resolution, args.weight_dtype), "bench", {}, ["9"])
    seconds = time.perf_counter() - start
    done.set()
    device_peak = (free - lowest_free[0]) / 2**30 if torch.cuda.is_available() else float("nan")
    if not executor.success:
        for message in executor.status_messages:
            print(message)
        raise SystemExit("the workflow failed")
    outputs = sorted((base / "output" / "bench").glob("layers_*"))
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # the first interval holds the first step's warm-up; the decoder's own progress is not a sampler step
    step_seconds = statistics.median(steps[1 : args.steps - 1]) if len(steps) > 2 else float("nan")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"RESULT vram_limit={args.vram_gb or 'none'} GiB flags={' '.join(args.comfy_args) or '(default)'} "
        f"dynamic_vram={dynamic} patcher={comfy.model_patcher.CoreModelPatcher.__name__} "
        f"steps={args.steps} s/step={step_seconds:.3f} total={seconds:.1f}s peak_gpu_allocated={peak_gpu:.1f}GiB "
        f"peak_gpu_in_use={device_peak:.1f}GiB "
        f"peak_host_rss={host_peak:.1f}GiB saved={[o.name for o in outputs]}"
    )
    print(f"STREAMING weight_dtype={args.weight_dtype} pack={args.pack_streaming}: {' | '.join(streaming_seen)}")
    print(ratio_line(step_seconds, args.resident_step, args.vram_gb))


if __name__ == "__main__":
    main()
