"""The fast path inside ComfyUI (nodes/fast_path.py), on the CPU with ComfyUI's own modules in one process: core's
LoRA loader still takes effect on it, through the pack's Decompose and through core's KSampler; blocks ComfyUI
patches on each call step aside and the result stays ComfyUI's; the compiled block is one graph for all blocks
and steps; ComfyUI's fp8mixed weights run the command line's fp8 math. tests/comfy_fast_path_check.py does the work
in ComfyUI's Python and reports what it measured. Skipped (with the reason) where no ComfyUI checkout with a
virtual environment is found at ${COMFYUI_PATH:-$HOME/ComfyUI}."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .comfy_server import COMFYUI, PYTHON, REPO, missing_comfyui

if missing_comfyui():
    pytest.skip(missing_comfyui(), allow_module_level=True)

# the check's tiny transformer: three blocks, three steps of true CFG with prompts of two lengths (two forwards a step)
BLOCKS, STEPS = 3, 3
BLOCK_RUNS = BLOCKS * STEPS * 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fast_path")
    # compiled code goes to a cache folder of the test's own
    environment = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
    result = subprocess.run(
        [str(PYTHON), str(REPO / "tests" / "comfy_fast_path_check.py"), str(COMFYUI), str(work)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["blocks"], report["steps"]) == (BLOCKS, STEPS)
    return report


def test_core_lora_loader_takes_effect_on_the_fast_path(measured):
    """Decompose on a MODEL through LoraLoaderModelOnly: every block ran the fast path, and gave what ComfyUI's layers
    give on the same MODEL, which is the transformer with the LoRA merged into its weights by hand."""
    decompose = measured["decompose"]
    assert decompose["fast_runs"] == {"fast": BLOCK_RUNS, "comfy": 0}
    assert decompose["comfy_runs"] == {"fast": 0, "comfy": BLOCK_RUNS}
    assert decompose["fast_vs_comfy"] == 0.0
    assert decompose["fast_vs_merged"] <= 1e-6
    assert decompose["lora_change"] > 1e-2


def test_core_ksampler_runs_the_fast_path_with_the_lora(measured):
    """Core's KSampler on the MODEL with the LoRA, the mode set by the Transformer Fast Path node (on a clone: the
    loaded MODEL keeps its own), which refuses a MODEL that is not this pack's."""
    ksampler = measured["ksampler"]
    assert ksampler["modes"] == ["auto", "eager"]
    assert "Transformer Fast Path sets the mode of this pack's VLD-MMDiT" in ksampler["refusal"]
    assert ksampler["fast_runs"] == {"fast": BLOCK_RUNS, "comfy": 0}
    assert ksampler["fast_vs_comfy"] == 0.0
    assert ksampler["fast_vs_merged"] <= 1e-6


def test_compiled_blocks_share_one_graph_across_blocks_and_steps(measured):
    """One static graph for the first prompt length and one with the length dynamic for the second: none per block,
    none per step, none for a second run."""
    compiled = measured["compiled"]
    assert compiled["runs"] == {"fast": BLOCK_RUNS, "comfy": 0}
    assert compiled["graphs"] == 2
    assert compiled["graphs_again"] == 0
    assert compiled["again_vs_first"] == 0.0
    assert compiled["vs_merged"] <= 1e-5  # inductor orders float32 sums its own way


def test_a_layer_patched_on_each_call_makes_its_block_step_aside(measured):
    """A weight wrapper on block 1's attention: that block runs through ComfyUI's layers (which apply it), the other
    two the fast path, and the result is ComfyUI's own."""
    wrapper = measured["wrapper"]
    assert wrapper["runs"] == {"fast": BLOCKS - 1, "comfy": 1}
    assert wrapper["vs_comfy"] == 0.0
    assert wrapper["wrapper_change"] > 1e-4


def test_a_lora_on_a_partly_loaded_model_steps_its_blocks_aside(measured):
    """Under the classic lowvram load ComfyUI patches the LoRA's layers on each call: blocks 0 and 2 (which the LoRA
    changes) run through ComfyUI's layers, block 1 the fast path, and the result is the merged transformer's."""
    lowvram = measured["lowvram"]
    assert lowvram["runs"] == {"fast": 1, "comfy": 2}
    assert lowvram["vs_merged"] <= 1e-6


@pytest.mark.parametrize("layout", ["fp8", "fp8_scaled"])
def test_comfyuis_fp8_files_run_the_command_lines_fp8_math(measured, layout):
    """ComfyUI holds the block linears of an fp8 file (the fp8mixed file's per-layer layout, or the older scaled_fp8
    one) as QuantizedTensor: fp8 e4m3 values and a per-tensor scale. The fast path hands those to FP8Linear and gives
    what the command line's model of the same file gives, bit for bit (on the CPU both dequantize)."""
    fp8 = measured[layout]
    assert fp8["weight"] == "QuantizedTensor torch.float8_e4m3fn"
    assert fp8["runs"] == {"fast": BLOCKS, "comfy": 0}
    assert fp8["vs_cli"] == 0.0


def test_raw_fp8_weights_run_the_fast_path(measured):
    """Weights stored as plain float8 (Load VLD-MMDiT's weight_dtype fp8_e4m3fn; ComfyUI casts them on each call)
    run FP8Linear with a unit scale, as ComfyUI computes them (on the CPU both widen the weight)."""
    raw = measured["raw_fp8"]
    assert raw["weight"] == "torch.float8_e4m3fn"
    assert raw["runs"] == {"fast": BLOCKS, "comfy": 0}
    assert raw["vs_comfy"] == 0.0
