"""Runs inside ComfyUI's own Python (tests/test_comfy_streaming.py starts it): nodes/comfy_streaming.py under
ComfyUI's model management, in-process on the CPU, with a four-block tiny transformer in float32.

    python tests/comfy_streaming_checks.py WORK_DIR RESULTS_JSON

WORK_DIR holds a link ``qwen_image_layered`` to this repository (the pack, imported as ComfyUI imports it: a
package named after its folder) and gets the model files. Each check records what the test asserts, or the
traceback that stopped it, under its name in RESULTS_JSON.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import traceback
import weakref
from pathlib import Path

WORK = Path(sys.argv[1]).resolve()
RESULTS = Path(sys.argv[2])
sys.argv = ["main.py", "--cpu"]
import comfy.options  # noqa: E402 (ComfyUI reads its flags when first imported, as its main.py sets them up)

comfy.options.enable_args_parsing()

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from qwen_image_layered.layered_core.checkpoints import save_mmdit  # noqa: E402
from qwen_image_layered.layered_core.memory import activation_bytes  # noqa: E402
from qwen_image_layered.layered_core.mmdit import MMDiTConfig, VLDMMDiT, image_token_count  # noqa: E402
from qwen_image_layered.layered_core.tiny_models import random_lora  # noqa: E402
from qwen_image_layered.nodes import comfy_streaming  # noqa: E402
from qwen_image_layered.nodes.comfy_model import ComfyTransformer, load_layered_model  # noqa: E402
from qwen_image_layered.nodes.decompose import Decompose  # noqa: E402

CONFIG = MMDiTConfig(num_layers=4, num_heads=2, head_dim=32, text_dim=48, axes_dims=(8, 12, 12))
LAYERS, HEIGHT, WIDTH = 2, 8, 8  # latent size
LORA_RANK = 4
# the linears a LoRA changes (both namings core's key map accepts: diffusers' PEFT and kohya's with an alpha)
LORA_TARGETS = {
    "transformer_blocks.1.attn.to_q": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", None),
    "transformer_blocks.2.img_mod.1": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", None),
    "transformer_blocks.3.img_mlp.net.2": ("{}.lora_down.weight", "{}.lora_up.weight", 2.0),
}


def write_model() -> tuple[Path, dict]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VLDMMDiT(CONFIG).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return save_mmdit(state, WORK / "tiny.safetensors", layout="comfy-prefixed", config=CONFIG), state


def write_lora(state: dict) -> tuple[dict, Path]:
    """The LoRA's state dict, and the transformer with it merged by hand at strength 1 (float32)."""
    lora, merged = random_lora(
        state,
        LORA_TARGETS,
        LORA_RANK,
        torch.Generator().manual_seed(2),
        alpha_key=lambda module, down_key: down_key.replace(".lora_down.weight", ".alpha"),
    )
    path = save_mmdit(merged, WORK / "merged.safetensors", layout="comfy-prefixed", config=CONFIG)
    return lora, path


def conditioning(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, CONFIG.text_dim, generator=generator), {}]]


POSITIVE, NEGATIVE = conditioning(1), conditioning(2)
CONDITION = {"samples": torch.randn(1, 16, 1, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))}


def decompose(patcher) -> torch.Tensor:
    """The Decompose node's latent (2 steps, CFG 4: cond and uncond in one batch)."""
    out = Decompose.execute(patcher, POSITIVE, NEGATIVE, CONDITION, LAYERS, 2, 4.0, True, 5)
    return out.args[0]["samples"]


def transformer_call(patcher) -> torch.Tensor:
    """One forward through the pack's sampler interface, on the model as ComfyUI placed it now."""
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 16, LAYERS + 1, HEIGHT, WIDTH, generator=generator)
    condition = torch.randn(1, 16, HEIGHT, WIDTH, generator=generator)
    return ComfyTransformer(patcher)(latents, condition, POSITIVE[0][0], torch.tensor([0.7]), None)


@contextlib.contextmanager
def forced_lowvram(budget: int):
    """``load_models_gpu`` hands ``budget`` bytes to ``LoadedModel.model_load`` as its lowvram_model_memory,
    where on the CPU it hands 0 (load everything): what it computes on a GPU with little free memory."""
    original = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return original(self, budget, force_patch_weights)

    mm.LoadedModel.model_load = model_load
    try:
        yield
    finally:
        mm.LoadedModel.model_load = original


def block_modules(patcher):
    """(name, module) of the ComfyUI-cast modules with parameters inside the transformer's blocks."""
    return [
        (name, module)
        for name, module in patcher.model.diffusion_model.named_modules()
        if name.startswith("transformer_blocks.")
        and hasattr(module, "comfy_cast_weights")
        and any(True for _ in module.parameters(recurse=False))
    ]


def streamed_names(patcher) -> list[str]:
    streamer = comfy_streaming.active(patcher.model.diffusion_model)
    owners = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = name
    return sorted({owners[id(e.parameter)] for entries in streamer.entries for e in entries})


def watch(patcher) -> dict:
    """Forward pre-hooks on every block module that record where its weight is when it runs: 'slot' (in the
    streamer's slots), or the data pointer it has."""
    seen: dict[str, set] = {}

    def record(name, module, args):
        streamer = comfy_streaming.active(patcher.model.diffusion_model)
        pointer = module.weight.data_ptr()
        slots = streamer.slot_tensors() if isinstance(streamer, comfy_streaming.PlacedStreamer) else []
        inside = any(s.data_ptr() <= pointer < s.data_ptr() + s.numel() for s in slots)
        seen.setdefault(name, set()).add("slot" if inside else pointer)

    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: record(name, m, a))
        for name, module in block_modules(patcher)
    ]
    return {"seen": seen, "handles": handles}


def placement_check(results: dict, patcher) -> None:
    mm.unload_all_models()
    full = decompose(patcher)
    results["full_load_streamer"] = comfy_streaming.describe(patcher.model.diffusion_model)
    mm.unload_all_models()
    before = {name: module.weight.data_ptr() for name, module in block_modules(patcher)}
    watched = watch(patcher)
    with forced_lowvram(patcher.model_size() // 2):
        partial = decompose(patcher)
    for handle in watched["handles"]:
        handle.remove()
    streamer = comfy_streaming.active(patcher.model.diffusion_model)
    streamed = streamed_names(patcher)
    results["streamed"] = streamed
    results["cast_by_comfy"] = sorted(n for n, m in block_modules(patcher) if m.comfy_cast_weights)
    results["loaded_by_comfy"] = sorted(n for n, m in block_modules(patcher) if getattr(m, "comfy_patched_weights", 0))
    results["block_modules"] = sorted(n for n, _ in block_modules(patcher))
    results["seen_in_slot"] = sorted(n for n, s in watched["seen"].items() if s == {"slot"})
    results["seen_at_own_tensor"] = sorted(n for n, s in watched["seen"].items() if s == {before[n]})
    results["after_at_own_tensor"] = sorted(n for n, m in block_modules(patcher) if m.weight.data_ptr() == before[n])
    nonblock_offloaded = sum(
        p.numel() * p.element_size()
        for name, m in patcher.model.diffusion_model.named_modules()
        if not name.startswith("transformer_blocks.") and getattr(m, "comfy_cast_weights", False)
        for p in m.parameters(recurse=False)
    )
    results["bytes"] = {
        "diffusion_parameters": sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters()),
        "loaded_by_comfy": patcher.model.model_loaded_weight_memory,
        "streamed": sum(e.nbytes for entries in streamer.entries for e in entries),
        "offloaded_outside_blocks": nonblock_offloaded,
        "copied": streamer.copied_bytes,
        "forwards": 2,
    }
    results["describe"] = streamer.describe()
    results["max_difference"] = float((full - partial).abs().max())
    results["bit_equal"] = bool(torch.equal(full, partial))
    results["full_latent_finite"] = bool(full.isfinite().all())

    # ComfyUI frees more of the loaded model (as when another model needs the memory): re-placed, same output
    mm.unload_all_models()
    mm.load_models_gpu([patcher])
    reference = transformer_call(patcher)
    loaded = next(m for m in mm.current_loaded_models if m.model is patcher)
    fully_unloaded = loaded.model_unload(memory_to_free=patcher.loaded_size() // 2)
    results["partial_unload"] = {
        "fully_unloaded": fully_unloaded,
        "streamed": streamed_names(patcher),
        "cast_by_comfy": sorted(n for n, m in block_modules(patcher) if m.comfy_cast_weights),
        "max_difference": float((transformer_call(patcher) - reference).abs().max()),
    }


def unload_check(results: dict, patcher) -> None:
    def partial_then(free, label):
        mm.unload_all_models()
        with forced_lowvram(patcher.model_size() // 2):
            decompose(patcher)
        streamer = comfy_streaming.active(patcher.model.diffusion_model)
        slots = [weakref.ref(s) for s in streamer.slot_tensors()]
        hosts = {id(e.parameter): e.host.data_ptr() for entries in streamer.entries for e in entries}
        parameters = [e.parameter for entries in streamer.entries for e in entries]
        del streamer
        free()
        gc.collect()
        results[label] = {
            "slots_before": len(slots),
            "active_after": comfy_streaming.active(patcher.model.diffusion_model) is not None,
            "slots_alive_after": sum(ref() is not None for ref in slots),
            "parameters_at_host_tensor": sum(hosts[id(p)] == p.data_ptr() for p in parameters),
            "parameters": len(parameters),
            "loaded_models_after": len(mm.current_loaded_models),
        }

    partial_then(mm.unload_all_models, "unload_all_models")
    partial_then(lambda: mm.free_memory(1e30, mm.get_torch_device()), "free_memory")


def lora_check(results: dict, patcher, lora: dict, merged_path: Path) -> None:
    mm.unload_all_models()
    plain = decompose(patcher)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    mm.unload_all_models()
    # ComfyUI loads patched modules first (a patch per forward costs the most): a third of the model loads the
    # two larger targets and leaves the attention projection offloaded
    budget = patcher.model_size() // 3
    watched = watch(patched)
    with forced_lowvram(budget):
        with_lora = decompose(patched)
    for handle in watched["handles"]:
        handle.remove()
    streamed = streamed_names(patched)
    modules = dict(patched.model.diffusion_model.named_modules())
    results["targets"] = {
        target: {
            "streamed": target in streamed,
            "ran_from_slot": watched["seen"].get(target) == {"slot"},
            "lowvram_patch": any(
                isinstance(f, comfy.model_patcher.LowVramPatch) for f in getattr(modules[target], "weight_function", [])
            ),
        }
        for target in LORA_TARGETS
    }
    # the same LoRA without its streamed target: what losing that patch would give
    streamed_target = next(t for t in LORA_TARGETS if t in streamed)
    partial_lora = {
        k: v for k, v in lora.items() if not k.startswith(("transformer." + streamed_target, streamed_target))
    }
    without, _ = comfy.sd.load_lora_for_models(patcher, None, partial_lora, 1.0, 0)
    mm.unload_all_models()
    with forced_lowvram(budget):
        without_streamed_target = decompose(without)
    mm.unload_all_models()
    merged = load_layered_model(str(merged_path))
    by_hand = decompose(merged)
    mm.unload_all_models()
    scale = float(by_hand.abs().max())
    results["relative_to_merged"] = float((with_lora - by_hand).abs().max()) / scale
    results["relative_to_plain"] = float((with_lora - plain).abs().max()) / scale
    results["relative_without_streamed_target"] = float((without_streamed_target - by_hand).abs().max()) / scale


class FakePrefetch:
    """comfy.model_prefetch's three names, recording the pops (the module each got, the queue's length after)."""

    def __init__(self):
        self.PREFETCH_QUEUES = []
        self.pops: list[tuple[str, int]] = []
        self.queues = 0

    def make_prefetch_queue(self, queue, device, transformer_options):
        assert transformer_options.get("prefetch_dynamic_vbars")
        queue = [None, *queue, None]
        self.PREFETCH_QUEUES.append(queue)
        self.queues += 1
        return queue

    def prefetch_queue_pop(self, queue, device, module):
        queue.pop(0)
        self.pops.append(("none" if module is None else "block", len(queue)))


def prefetch_check(results: dict, patcher) -> None:
    mm.unload_all_models()
    mm.load_models_gpu([patcher])
    model = patcher.model.diffusion_model
    reference = transformer_call(patcher)
    real = comfy_streaming.model_prefetch
    fake = FakePrefetch()
    comfy_streaming.model_prefetch = fake
    try:
        # as _inject sets it up for a dynamic patcher: the model's run_block drives it, block by block
        prefetch = comfy_streaming.BlockPrefetch(model.transformer_blocks)
        comfy_streaming._ACTIVE[model] = prefetch
        out = transformer_call(patcher)
        results["one_forward"] = {
            "queues": fake.queues,
            "pops": list(fake.pops),
            "same": bool(torch.equal(out, reference)),
        }
        fake.pops.clear()
        # a block patch that skips block 1 (never calls the original): block 1's pop comes before block 2
        options = patcher.model_options.setdefault("transformer_options", {})
        options.setdefault("patches_replace", {}).setdefault("dit", {})[("double_block", 1)] = lambda args, extra: {
            "img": args["img"],
            "txt": args["txt"],
        }
        transformer_call(patcher)
        del options["patches_replace"]["dit"][("double_block", 1)]
        results["skipped_block"] = {"queues": fake.queues, "pops": list(fake.pops)}
        comfy_streaming._stop(model)
        results["active_after_stop"] = comfy_streaming.active(model) is not None
    finally:
        comfy_streaming._stop(model)
        comfy_streaming.model_prefetch = real
    # ComfyUI's own prefetch on the CPU: no queue (no offload streams there), the forward unchanged
    prefetch = comfy_streaming.BlockPrefetch(model.transformer_blocks)
    comfy_streaming._ACTIVE[model] = prefetch
    results["cpu_queue"] = {
        "same": bool(torch.equal(transformer_call(patcher), reference)),
        "forwards": prefetch.forwards,
    }
    comfy_streaming._stop(model)
    # a dynamic patcher gets the prefetch, a classic one the placed streamer
    patcher.is_dynamic = lambda: True
    try:
        comfy_streaming._inject(patcher)
        results["dynamic_gets"] = type(comfy_streaming.active(model)).__name__
    finally:
        comfy_streaming._eject(patcher)
        del patcher.is_dynamic
    mm.unload_all_models()


def quantized_check(results: dict, state: dict) -> None:
    """The fp8mixed layout: its linears are QuantizedTensors, which ComfyUI casts itself; the streamer leaves
    them to it (with a warning) and the output stays the full load's."""
    path = save_mmdit(state, WORK / "tiny_fp8mixed.safetensors", layout="fp8-comfy-quant", config=CONFIG)
    patcher = load_layered_model(str(path))
    mm.unload_all_models()
    full = decompose(patcher)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    comfy_streaming.logger.addHandler(handler)
    try:
        mm.unload_all_models()
        with forced_lowvram(patcher.model_size() // 2):
            partial = decompose(patcher)
    finally:
        comfy_streaming.logger.removeHandler(handler)
    model = patcher.model.diffusion_model
    streamer = comfy_streaming.active(model)
    quantized = sorted(
        name
        for name, m in block_modules(patcher)
        if type(m.weight).__name__ == "QuantizedTensor" and m.comfy_cast_weights
    )
    results["offloaded_quantized"] = quantized
    results["streamed"] = [] if streamer is None else streamed_names(patcher)
    results["warned"] = [w for w in warnings if "left to ComfyUI's per-layer casting" in w]
    results["max_difference"] = float((full - partial).abs().max())
    mm.unload_all_models()


def switch_check(results: dict, path: Path) -> None:
    os.environ[comfy_streaming.SWITCH] = "off"
    try:
        patcher = load_layered_model(str(path))
        results["off_injections"] = sorted(patcher.injections)
        results["off_reserve"] = comfy_streaming.slot_reserve_bytes(patcher.model.diffusion_model)
        os.environ[comfy_streaming.SWITCH] = "sometimes"
        try:
            comfy_streaming.streaming_switch()
            results["bad_value"] = None
        except ValueError as error:
            results["bad_value"] = str(error)
    finally:
        del os.environ[comfy_streaming.SWITCH]
    patcher = load_layered_model(str(path))
    results["on_injections"] = sorted(patcher.injections)
    model = patcher.model
    shape = (2, 16, LAYERS + 1, HEIGHT, WIDTH)
    tokens = image_token_count(LAYERS, HEIGHT, WIDTH, CONFIG.patch_size)
    activations = activation_bytes(model.diffusion_model, tokens, 1024, 2)
    # a slot holds a block's parameters one after another, each on a 256-byte boundary
    block_bytes = max(
        sum(-(-p.numel() * p.element_size() // 256) * 256 for p in b.parameters())
        for b in model.diffusion_model.transformer_blocks
    )
    results["memory_required_over_activations"] = model.memory_required(shape) - activations
    results["largest_block_slot_bytes"] = block_bytes


def main() -> None:
    torch.manual_seed(0)
    path, state = write_model()
    lora, merged_path = write_lora(state)
    patcher = load_layered_model(str(path))
    checks = {
        "placement": lambda r: placement_check(r, patcher),
        "unload": lambda r: unload_check(r, patcher),
        "lora": lambda r: lora_check(r, patcher, lora, merged_path),
        "prefetch": lambda r: prefetch_check(r, patcher),
        "quantized": lambda r: quantized_check(r, state),
        "switch": lambda r: switch_check(r, path),
    }
    results = {}
    for name, check in checks.items():
        results[name] = {}
        try:
            check(results[name])
        except Exception:
            results[name]["error"] = traceback.format_exc()
    RESULTS.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
