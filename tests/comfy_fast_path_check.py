"""Runs inside ComfyUI's own Python (tests/test_comfy_fast_path.py starts it): ComfyUI's modules and this pack
in one process on the CPU, tiny models under a temporary folder, and the fast path of nodes/fast_path.py against
ComfyUI's layers. Prints one JSON line of what it measured; the test asserts on it.

    python tests/comfy_fast_path_check.py <ComfyUI checkout> <work folder>
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK = "qwen_image_layered"
LORA = "fast_path_lora.safetensors"
LORA_RANK = 4
# the LoRA's layers, its key names (down, up) and alpha (None: scale 1): diffusers' (PEFT) naming and kohya's, both
# of which core's key map takes for a QwenImage model. Blocks 0 and 2 are patched, block 1 is not.
LORA_TARGETS = {
    "transformer_blocks.0.attn.to_q": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", None),
    "transformer_blocks.0.img_mlp.net.0.proj": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", None),
    "transformer_blocks.2.txt_mlp.net.2": ("{}.lora_down.weight", "{}.lora_up.weight", 2.0),
}
LAYERS, STEPS = 2, 3


def start_comfyui(comfyui: Path):
    """ComfyUI's modules on the CPU, as its main.py starts them, and this pack imported as ComfyUI imports a
    custom node folder (a package of the folder's name)."""
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, str(comfyui))
    import comfy.options

    comfy.options.enable_args_parsing()
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)


def write_files(work: Path) -> dict:
    """A three-block tiny transformer (bf16 file and fp8mixed file), a LoRA on it, and the transformer with the
    LoRA merged into its weights by hand at strength 1 in float32 (W + scale * up @ down): ComfyUI on the CPU
    runs in float32 and adds a patch in float32."""
    import torch
    from qwen_image_layered.layered_core.checkpoints import save_mmdit
    from qwen_image_layered.layered_core.mmdit import MMDiTConfig, VLDMMDiT
    from qwen_image_layered.layered_core.tiny_models import random_lora
    from safetensors.torch import load_file, save_file

    config = MMDiTConfig(num_layers=3, num_heads=2, head_dim=32, text_dim=48, axes_dims=(8, 12, 12))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = VLDMMDiT(config).eval().requires_grad_(False)
    files = {
        "bf16": work / "layered_bf16.safetensors",
        "fp8": work / "layered_fp8mixed.safetensors",
        "fp8_scaled": work / "layered_fp8_scaled.safetensors",
        "merged": work / "layered_lora_merged.safetensors",
    }
    save_mmdit(model.state_dict(), files["bf16"], layout="comfy-prefixed", config=config, dtype=torch.bfloat16)
    save_mmdit(model.state_dict(), files["fp8"], layout="fp8-comfy-quant", config=config, dtype=torch.bfloat16)
    save_mmdit(model.state_dict(), files["fp8_scaled"], layout="fp8-scaled", config=config, dtype=torch.bfloat16)
    merged = {k: v.float() for k, v in load_file(files["bf16"]).items()}
    generator = torch.Generator().manual_seed(2)
    lora, merged = random_lora(merged, LORA_TARGETS, LORA_RANK, generator, weight_key="model.diffusion_model.{}.weight")
    (work / "loras").mkdir(exist_ok=True)
    save_file(lora, work / "loras" / LORA)
    save_file(merged, files["merged"], metadata=load_metadata(files["bf16"]))
    return files


def load_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as source:
        return source.metadata()


def inputs():
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "condition": torch.randn(1, 16, 1, 8, 8, generator=generator),
        "positive": torch.randn(1, 6, 48, generator=generator),
        "negative": torch.randn(1, 3, 48, generator=generator),
        "latents": torch.randn(1, 16, LAYERS + 1, 8, 8, generator=generator),
    }


def main() -> None:
    comfyui, work = Path(sys.argv[1]), Path(sys.argv[2])
    start_comfyui(comfyui)
    import comfy.model_management as mm
    import folder_paths
    import torch
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from comfy_extras.nodes_qwen import EmptyQwenImageLayeredLatentImage
    from qwen_image_layered.layered_core.checkpoints import load_mmdit
    from qwen_image_layered.nodes.comfy_model import ComfyTransformer, load_layered_model
    from qwen_image_layered.nodes.decompose import Decompose
    from qwen_image_layered.nodes.fast_path import fast_path_mode
    from qwen_image_layered.nodes.loaders import FastPath
    from torch._dynamo.utils import counters

    import nodes

    files = write_files(work)
    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    given = inputs()

    def model(kind: str, fast_path: str, lora: float | None = None, weight_dtype: str = "default"):
        patcher = load_layered_model(str(files[kind]), weight_dtype, fast_path=fast_path)
        if lora is not None:
            (patcher,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, LORA, lora)
        return patcher

    def decompose(patcher):
        """The Decompose node's latent, and how the blocks of its steps ran."""
        before = dict(patcher.model.diffusion_model.block_runs)
        (out,) = Decompose.execute(
            patcher,
            [[given["positive"], {}]],
            [[given["negative"], {}]],
            {"samples": given["condition"]},
            LAYERS,
            STEPS,
            4.0,
            True,
            0,
        ).result
        return out["samples"], runs_since(patcher, before)

    def runs_since(patcher, before: dict) -> dict:
        now = patcher.model.diffusion_model.block_runs
        return {key: now[key] - before.get(key, 0) for key in ("fast", "comfy")}

    def velocity(patcher):
        """One forward of the transformer as Decompose calls it."""
        before = dict(patcher.model.diffusion_model.block_runs)
        with torch.inference_mode():
            out = ComfyTransformer(patcher)(
                given["latents"], given["condition"][:, :, 0], given["positive"], torch.tensor([0.7]), None
            )
        return out, runs_since(patcher, before)

    def ksampler(patcher):
        before = dict(patcher.model.diffusion_model.block_runs)
        reference = {"samples": given["condition"]}
        positive = ReferenceLatent.execute([[given["positive"], {}]], reference).result[0]
        negative = ReferenceLatent.execute([[given["negative"], {}]], reference).result[0]
        latent = EmptyQwenImageLayeredLatentImage.execute(64, 64, LAYERS, 1).result[0]
        (out,) = nodes.common_ksampler(patcher, 0, STEPS, 2.5, "euler", "simple", positive, negative, latent)
        return out["samples"], runs_since(patcher, before)

    def relative(a, b) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def largest(a, b) -> float:
        return float((a.float() - b.float()).abs().max())

    report = {"blocks": 3, "steps": STEPS}

    # the LoRA through Decompose: the fast path (eager) against ComfyUI's layers and against the merged weights
    plain, _ = decompose(model("bf16", "eager"))
    fast, fast_runs = decompose(model("bf16", "eager", lora=1.0))
    comfy, comfy_runs = decompose(model("bf16", "off", lora=1.0))
    merged, _ = decompose(model("merged", "off"))
    report["decompose"] = {
        "fast_runs": fast_runs,
        "comfy_runs": comfy_runs,
        "fast_vs_comfy": largest(fast, comfy),
        "fast_vs_merged": relative(fast, merged),
        "lora_change": relative(fast, plain),
    }

    # compiled: one graph for every block of every step (the two prompt lengths give a static graph and the one
    # with the text length dynamic), and none more for a second run
    counters.clear()
    compiled_model = model("bf16", "compiled", lora=1.0)
    compiled, compiled_runs = decompose(compiled_model)
    first_graphs = counters["stats"]["unique_graphs"]
    again, _ = decompose(compiled_model)
    report["compiled"] = {
        "runs": compiled_runs,
        "graphs": first_graphs,
        "graphs_again": counters["stats"]["unique_graphs"] - first_graphs,
        "again_vs_first": largest(again, compiled),
        "vs_merged": relative(compiled, merged),
    }

    # core's KSampler on the MODEL takes the same path; the mode set by the Transformer Fast Path node, on a clone
    loaded = model("bf16", "auto", lora=1.0)
    (switched,) = FastPath.execute(loaded, "eager").result
    fast_k, fast_k_runs = ksampler(switched)
    try:
        FastPath.execute(nodes.LoraLoaderModelOnly(), "eager")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    comfy_k, _ = ksampler(model("bf16", "off", lora=1.0))
    merged_k, _ = ksampler(model("merged", "off"))
    report["ksampler"] = {
        "modes": [fast_path_mode(m.model_options.get("transformer_options")) for m in (loaded, switched)],
        "refusal": refusal,
        "fast_runs": fast_k_runs,
        "fast_vs_comfy": largest(fast_k, comfy_k),
        "fast_vs_merged": relative(fast_k, merged_k),
    }

    # a weight wrapper on block 1: that block steps aside, the others do not, the result is ComfyUI's
    wrapped = {}
    for mode in ("eager", "off"):
        patcher = model("bf16", mode)
        patcher.add_weight_wrapper("diffusion_model.transformer_blocks.1.attn.to_q.weight", lambda w: 1.5 * w)
        mm.load_models_gpu([patcher])
        wrapped[mode] = velocity(patcher)
    unwrapped, _ = velocity(model("bf16", "eager"))
    report["wrapper"] = {
        "runs": wrapped["eager"][1],
        "vs_comfy": largest(wrapped["eager"][0], wrapped["off"][0]),
        "wrapper_change": relative(wrapped["eager"][0], unwrapped),
    }

    # the LoRA on a partly loaded model: ComfyUI patches blocks 0 and 2 on each call, so they step aside
    patcher = model("bf16", "eager", lora=1.0)
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    lowvram, lowvram_runs = velocity(patcher)
    merged_velocity, _ = velocity(model("merged", "off"))
    report["lowvram"] = {"runs": lowvram_runs, "vs_merged": relative(lowvram, merged_velocity)}

    # ComfyUI's fp8 layouts (the fp8mixed file's per-layer one and the older scaled_fp8 one): the weights ComfyUI
    # holds through FP8Linear, against the command line's fp8 model of the same file
    for kind in ("fp8", "fp8_scaled"):
        fp8_patcher = model(kind, "eager")
        mm.load_models_gpu([fp8_patcher])
        fp8_fast, fp8_runs = velocity(fp8_patcher)
        fp8_comfy_patcher = model(kind, "off")
        mm.load_models_gpu([fp8_comfy_patcher])
        fp8_comfy, _ = velocity(fp8_comfy_patcher)
        cli = load_mmdit(files[kind], dtype=torch.float32, fp8="keep")
        with torch.inference_mode():
            fp8_cli = cli(given["latents"], given["condition"][:, :, 0], given["positive"], torch.tensor([0.7]))
        weight = fp8_patcher.model.diffusion_model.transformer_blocks[0].attn.to_q.weight
        report[kind] = {
            "weight": f"{type(weight).__name__} {weight.storage_dtype if hasattr(weight, 'storage_dtype') else ''}",
            "runs": fp8_runs,
            "vs_cli": largest(fp8_fast, fp8_cli),
            "vs_comfy": largest(fp8_fast, fp8_comfy),
        }
    # weights stored as raw float8 (Load VLD-MMDiT's weight_dtype fp8_e4m3fn): FP8Linear with a unit scale
    raw = {}
    for mode in ("eager", "off"):
        patcher = model("bf16", mode, weight_dtype="fp8_e4m3fn")
        mm.load_models_gpu([patcher])
        raw[mode] = velocity(patcher)
    weight = patcher.model.diffusion_model.transformer_blocks[0].attn.to_q.weight
    report["raw_fp8"] = {
        "weight": str(weight.dtype),
        "runs": raw["eager"][1],
        "vs_comfy": largest(raw["eager"][0], raw["off"][0]),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
