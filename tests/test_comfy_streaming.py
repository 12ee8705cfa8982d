"""nodes/comfy_streaming.py under ComfyUI's own model management, in-process in ComfyUI's Python on the CPU
(tests/comfy_streaming_checks.py runs there once; these tests read what it recorded): ComfyUI's partial load
decides what stays where, the pack's streamer brings the rest a block at a time, and the Decompose node's latent
is what the fully loaded model gives."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .comfy_server import COMFYUI, PYTHON, REPO, missing_comfyui

if missing_comfyui():
    pytest.skip(missing_comfyui(), allow_module_level=True)


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("comfy_streaming")
    (work / "qwen_image_layered").symlink_to(REPO, target_is_directory=True)
    results = work / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{work}:{COMFYUI}"}
    env.pop("QWEN_LAYERED_COMFY_STREAMING", None)
    done = subprocess.run(
        [str(PYTHON), str(REPO / "tests" / "comfy_streaming_checks.py"), str(work), str(results)],
        cwd=COMFYUI,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(results.read_text())


def _check(checks: dict, name: str) -> dict:
    result = checks[name]
    assert "error" not in result, result["error"]
    return result


def test_decompose_under_a_partial_load_equals_the_full_load(checks):
    result = _check(checks, "placement")
    assert result["full_load_streamer"] == "ComfyUI's placement, nothing streamed by the pack"
    assert result["full_latent_finite"]
    # the same arithmetic on the same values: not only close, equal
    assert result["bit_equal"], result["max_difference"]


def test_the_modules_comfyui_loaded_stay_and_only_the_offloaded_ones_stream(checks):
    result = _check(checks, "placement")
    streamed, loaded = set(result["streamed"]), set(result["loaded_by_comfy"])
    # a real split: some of each, in every block
    assert streamed and loaded
    assert {name.split(".")[1] for name in streamed} == {"0", "1", "2", "3"}
    assert streamed == set(result["cast_by_comfy"]) and not streamed & loaded
    assert streamed | loaded == set(result["block_modules"])
    # while they ran: the streamed weights in the slots, the loaded ones at ComfyUI's own tensors
    assert set(result["seen_in_slot"]) == streamed
    assert set(result["seen_at_own_tensor"]) == loaded
    # afterwards every module holds ComfyUI's tensor again
    assert set(result["after_at_own_tensor"]) == set(result["block_modules"])
    sizes = result["bytes"]
    # ComfyUI's count of what it loaded, the streamed blocks and its own offloaded modules outside the blocks
    assert (
        sizes["loaded_by_comfy"] + sizes["streamed"] + sizes["offloaded_outside_blocks"]
        == sizes["diffusion_parameters"]
    )
    # 2 steps of one batched forward each; the last block brings the first ones back for the next forward
    assert sizes["streamed"] * sizes["forwards"] <= sizes["copied"] <= sizes["streamed"] * (sizes["forwards"] + 1)
    assert "4 of 4 blocks have offloaded weights" in result["describe"]


def test_a_partial_unload_places_again_and_the_output_stays(checks):
    result = _check(checks, "placement")["partial_unload"]
    assert result["fully_unloaded"] is False
    assert result["streamed"] and set(result["streamed"]) == set(result["cast_by_comfy"])
    assert result["max_difference"] == 0.0


@pytest.mark.parametrize("how", ["unload_all_models", "free_memory"])
def test_unloading_the_model_frees_what_the_streamer_held(checks, how):
    result = _check(checks, "unload")[how]
    assert result["slots_before"] == 2
    assert not result["active_after"]
    assert result["slots_alive_after"] == 0
    assert result["parameters_at_host_tensor"] == result["parameters"] > 0
    assert result["loaded_models_after"] == 0


def test_a_lora_on_a_streamed_module_takes_effect(checks):
    result = _check(checks, "lora")
    targets = result["targets"]
    assert targets["transformer_blocks.1.attn.to_q"] == {"streamed": True, "ran_from_slot": True, "lowvram_patch": True}
    assert not targets["transformer_blocks.2.img_mod.1"]["streamed"]  # loaded by ComfyUI, patch merged there
    assert result["relative_to_merged"] < 1e-5
    # what the comparison would have seen had the streamed module's patch been lost, and had there been no LoRA
    assert result["relative_without_streamed_target"] > 1e-2
    assert result["relative_to_plain"] > 1e-1


def test_the_dynamic_patcher_gets_comfyuis_block_prefetch_in_block_order(checks):
    result = _check(checks, "prefetch")
    # a queue per forward; one pop before each block (the queue one shorter each time), one after the last
    expected = [["block", 5], ["block", 4], ["block", 3], ["block", 2], ["none", 1]]
    assert result["one_forward"] == {"queues": 1, "pops": expected, "same": True}
    # a block a patch skips still gets its pop, before the next block's
    assert result["skipped_block"] == {"queues": 2, "pops": expected}
    assert result["active_after_stop"] is False
    # ComfyUI's own prefetch has no offload streams on the CPU: no queue, the same forward
    assert result["cpu_queue"] == {"same": True, "forwards": 0}
    assert result["dynamic_gets"] == "BlockPrefetch"


def test_quantized_weights_are_left_to_comfyui(checks):
    result = _check(checks, "quantized")
    offloaded = result["offloaded_quantized"]
    assert offloaded and not set(offloaded) & set(result["streamed"])
    (warning,) = result["warned"]
    assert warning.startswith(f"{len(offloaded)} offloaded modules left to ComfyUI's per-layer casting, with weights ")
    assert "QuantizedTensor" in warning and "transformer_blocks.0.attn" in warning
    assert result["max_difference"] == 0.0


def test_the_switch_turns_it_off_and_the_memory_estimate_makes_room_for_the_slots(checks):
    result = _check(checks, "switch")
    assert result["off_injections"] == [] and result["off_reserve"] == 0
    assert result["on_injections"] == ["qwen_layered_streaming"]
    assert "QWEN_LAYERED_COMFY_STREAMING must be one of ('auto', 'off'), got 'sometimes'" == result["bad_value"]
    # room for two slots of the largest block
    assert result["memory_required_over_activations"] == 2 * result["largest_block_slot_bytes"]
