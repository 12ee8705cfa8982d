"""Editing in a real ComfyUI: Load Layered PSD, the edit nodes and Save Layered PSD, with a core node changing
a selected layer in between; every layer an edit does not target comes out bit-identical, and bad input is a
named error on its node that writes nothing. Skipped where no ComfyUI is found (see tests/comfy_server.py)."""

from __future__ import annotations

import json
import math
import re
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import Group, PixelLayer
from psd_tools.constants import Tag

from layered_core import edits
from layered_core.compositing import composite
from layered_core.export import load_png_zip
from layered_core.layers import attach_split
from layered_core.psd import save_psd
from layered_core.psd_read import load_psd
from layered_core.synthetic import synthetic_design

from .comfy_server import REPO, Server, missing_comfyui, prepare_base
from .conftest import halves

if missing_comfyui():
    pytest.skip(missing_comfyui(), allow_module_level=True)

DESIGN = "designs/poster.psd"  # in input/: the pack's own PSD of a synthetic design, layer 4 split in two


def _design():
    stack = synthetic_design(96, 80, layer_count=6, seed=5)
    return attach_split(stack, 3, halves(stack[3], ("upper", "lower")))


def _other_writers_psd(path):
    document = PSDImage.new("RGBA", (40, 32))
    PixelLayer.frompil(Image.new("RGBA", (40, 32), (20, 30, 40, 255)), document, "Hintergrund")
    group = Group.new(document, "Gruppe größe")
    PixelLayer.frompil(Image.new("RGBA", (8, 8), (250, 200, 0, 200)), group, "Stern", top=4, left=28)
    hidden = PixelLayer.frompil(Image.new("RGBA", (50, 4), (0, 0, 255, 255)), group, "verborgen", top=-2, left=-5)
    hidden.visible = False
    group.opacity = 150
    document.save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_edit")
    prepare_base(base)
    designs = base / "input" / "designs"
    designs.mkdir()
    save_psd(_design(), designs / "poster.psd")
    _other_writers_psd(designs / "other.psd")
    adjusted = PSDImage.open(designs / "other.psd")
    adjusted[1][0]._record.tagged_blocks.set_data(Tag.INVERT)
    adjusted.save(designs / "adjusted.psd")
    PSDImage.new("CMYK", (8, 8)).save(designs / "cmyk.psd")
    running = Server(base)
    yield running, base
    running.stop()
    shutil.rmtree(base / "custom_nodes", ignore_errors=True)


def _outputs(base, prefix):
    return sorted((base / "output").glob(f"{prefix}_*"))


def _errors(history):
    return [m[1] for m in history["status"].get("messages", []) if m[0] == "execution_error"]


def _load(name="designs/poster.psd"):
    return {"1": {"class_type": "QwenLayeredLoadLayeredPSD", "inputs": {"file": name}}}


def test_a_loaded_psd_saves_back_with_every_layer_bit_identical(server):
    running, base = server
    workflow = _load() | {
        "2": {"class_type": "QwenLayeredSavePSD", "inputs": {"stack": ["1", 0], "filename_prefix": "same"}}
    }
    history = running.run(workflow)
    assert history["status"]["status_str"] == "success", _errors(history)
    (saved,) = _outputs(base, "same")
    before, after = load_psd(base / "input" / DESIGN), load_psd(saved)
    assert [path for path, _ in before.walk()] == [path for path, _ in after.walk()]
    for (path, old), (_, new) in zip(before.walk(), after.walk(), strict=True):
        assert (old.name, old.offset, old.visible, old.opacity) == (new.name, new.offset, new.visible, new.opacity)
        assert np.array_equal(old.pixels, new.pixels), path
    # the node shows the tree, top layer first, with 1-based paths
    text = history["outputs"]["1"]["text"][0]
    assert text.splitlines()[1].startswith("6: 'shape 5'") and "4/2: 'lower'" in text


def test_the_edit_chain_changes_only_its_targets(server):
    running, base = server
    workflow = _load() | {
        "2": {"class_type": "QwenLayeredSelectLayer", "inputs": {"stack": ["1", 0], "layer": "3"}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 2]}},
        "4": {
            "class_type": "QwenLayeredReplaceLayer",
            "inputs": {"stack": ["1", 0], "layer": "3", "image": ["3", 0], "placement": "layer box", "x": 0, "y": 0},
        },
        "5": {
            "class_type": "QwenLayeredRecolorLayer",
            "inputs": {
                "stack": ["4", 0],
                "layer": "4/2",
                "hue": 90.0,
                "saturation": 1.0,
                "lightness": 0.1,
                "tint": "#102030",
                "tint_strength": 0.25,
            },
        },
        "6": {
            "class_type": "QwenLayeredTransformLayer",
            "inputs": {
                "stack": ["5", 0],
                "layer": "5",
                "dx": -30,
                "dy": 12,
                "scale_x": 1.5,
                "scale_y": 1.0,
                "keep_aspect": True,
                "flip_horizontal": True,
                "flip_vertical": False,
                "resample": "bicubic",
            },
        },
        "7": {
            "class_type": "QwenLayeredLayerVisibility",
            "inputs": {"stack": ["6", 0], "layer": "-1", "visible": False, "opacity": 40.0},
        },
        "8": {"class_type": "QwenLayeredSavePSD", "inputs": {"stack": ["7", 0], "filename_prefix": "chain"}},
        "9": {"class_type": "QwenLayeredCompositeLayers", "inputs": {"stack": ["7", 0]}},
    }
    history = running.run(workflow)
    assert history["status"]["status_str"] == "success", _errors(history)
    (saved,) = _outputs(base, "chain")
    original, result = load_psd(base / "input" / DESIGN), load_psd(saved)
    # untouched: the background, layer 2 and split layer 4's left half, bit for bit
    for path in [(0,), (1,), (3, 0)]:
        old, new = original.get(path), result.get(path)
        assert (old.name, old.offset, old.visible, old.opacity) == (new.name, new.offset, new.visible, new.opacity)
        assert np.array_equal(old.pixels, new.pixels), path
    # layer 3 through core's ImageInvert and back: colour inverted, shape (alpha) and place kept, no mask needed
    old, new = original[2], result[2]
    assert new.offset == old.offset and np.array_equal(new.pixels[..., 3], old.pixels[..., 3])
    drawn = old.pixels[..., 3] > 0
    assert np.array_equal(new.pixels[..., :3][drawn], 255 - old.pixels[..., :3][drawn])
    # the others as the library's edits make them, so the nodes pass their settings through unchanged
    expected = edits.recolor(original, (3, 1), hue_shift=90, lightness=0.1, tint=(16, 32, 48), tint_strength=0.25)
    assert np.array_equal(result.get((3, 1)).pixels, expected.get((3, 1)).pixels)
    moved = edits.move(edits.resize(edits.flip(original, 4), 4, (1.5, 1.5)), 4, -30, 12)
    assert result[4].offset == moved[4].offset and np.array_equal(result[4].pixels, moved[4].pixels)
    assert (result[5].visible, result[5].opacity) == (False, 102)
    assert history["outputs"]["9"]["images"], "Composite Layers shows its picture"


def test_a_psd_from_another_writer_comes_in_with_groups_hidden_layers_and_opacity(server):
    running, base = server
    workflow = _load("designs/other.psd") | {
        "2": {"class_type": "QwenLayeredSaveLayerPNGs", "inputs": {"stack": ["1", 0], "filename_prefix": "other"}}
    }
    history = running.run(workflow)
    assert history["status"]["status_str"] == "success", _errors(history)
    (saved,) = _outputs(base, "other")
    stack = load_png_zip(saved)
    group = stack[1]
    assert (group.name, group.opacity, [child.name for child in group.children]) == (
        "Gruppe größe",
        150,
        ["Stern", "verborgen"],
    )
    assert not group.children[1].visible and group.children[1].offset == (-5, -2)
    with zipfile.ZipFile(saved) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["layers"][1]["children"][1]["visible"] is False


@pytest.mark.parametrize(
    "name, message",
    [
        ("designs/adjusted.psd", r"layer 2/1 'Stern' is an adjustment layer"),
        ("designs/cmyk.psd", r"colour mode is CMYK"),
    ],
)
def test_what_a_stack_cannot_hold_is_refused_naming_it(server, name, message):
    running, _ = server
    save = {"class_type": "QwenLayeredSavePSD", "inputs": {"stack": ["1", 0], "filename_prefix": "refused"}}
    history = running.run(_load(name) | {"2": save})
    (error,) = _errors(history)
    assert error["node_type"] == "QwenLayeredLoadLayeredPSD"
    assert re.search(message, error["exception_message"]), error["exception_message"]


def _one_edit(node_type, inputs, extra=None):
    save = {"class_type": "QwenLayeredSavePSD", "inputs": {"stack": ["2", 0], "filename_prefix": "refused"}}
    if node_type == "QwenLayeredSelectLayer":  # gives images, not a stack
        save = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "refused"}}
    return (
        _load() | (extra or {}) | {"2": {"class_type": node_type, "inputs": {"stack": ["1", 0], **inputs}}, "3": save}
    )


BAD_EDITS = [
    ("QwenLayeredSelectLayer", {"layer": "9"}, None, "Select Layer: layer '9' does not exist: the stack has 6 layers"),
    ("QwenLayeredRemoveLayer", {"layer": "4/3"}, None, "layer '4/3' does not exist: layer 4 has 2 layers"),
    (
        "QwenLayeredRecolorLayer",
        {"layer": "x", "hue": 0.0, "saturation": 1.0, "lightness": 0.0, "tint": "", "tint_strength": 0.5},
        None,
        "expected layer numbers",
    ),
    (
        "QwenLayeredReplaceLayer",
        {"layer": "2", "image": ["9", 0], "placement": "layer box", "x": 0, "y": 0},
        {"9": {"class_type": "EmptyImage", "inputs": {"width": 7, "height": 5, "batch_size": 1, "color": 0}}},
        r"the image is 7x5 but the box of layer '.*' is",
    ),
    (
        "QwenLayeredReplaceLayer",
        {"layer": "2", "image": ["9", 0], "placement": "x, y", "x": 0, "y": 0, "mask": ["10", 0]},
        {
            "9": {"class_type": "EmptyImage", "inputs": {"width": 7, "height": 5, "batch_size": 1, "color": 0}},
            "10": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 7, "height": 5}},
        },
        "would be fully transparent",
    ),
    (
        "QwenLayeredTransformLayer",
        {
            "layer": "2",
            "dx": 0,
            "dy": 0,
            "scale_x": math.nan,
            "scale_y": 1.0,
            "keep_aspect": True,
            "flip_horizontal": False,
            "flip_vertical": False,
            "resample": "bicubic",
        },
        None,
        "scale must be positive and finite",
    ),
]


@pytest.mark.parametrize(
    "node_type, inputs, extra, message", BAD_EDITS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_EDITS)]
)
def test_bad_input_is_a_named_error_on_its_node_and_writes_nothing(server, node_type, inputs, extra, message):
    running, base = server
    before = _outputs(base, "refused")
    try:
        history = running.run(_one_edit(node_type, inputs, extra))
    except Exception as error:  # refused at validation, before anything runs
        pytest.fail(f"the prompt was refused before running: {error}")
    (error,) = _errors(history)
    assert error["node_type"] == node_type
    assert re.search(message, error["exception_message"]), error["exception_message"]
    assert _outputs(base, "refused") == before


def test_the_shipped_edit_workflow_leaves_the_untouched_layer_bit_identical(server):
    running, base = server
    workflow = json.loads((REPO / "workflows" / "api" / "edit_layers.json").read_text())
    workflow["5"]["inputs"]["steps"] = 2
    workflow["99"] = {
        "class_type": "QwenLayeredSaveLayerPNGs",
        "inputs": {"stack": ["5", 3], "filename_prefix": "unedited"},
    }
    history = running.run(workflow)
    assert history["status"]["status_str"] == "success", _errors(history)
    (edited_file,) = _outputs(base, "layers/edited")
    (unedited_file,) = _outputs(base, "unedited")
    original, edited = load_png_zip(unedited_file), load_psd(edited_file)
    assert len(original) == len(edited) == 4
    first_old, first_new = original[0], edited[0]
    assert first_old.offset == first_new.offset and np.array_equal(first_old.pixels, first_new.pixels)
    assert edited[3].offset == (original[3].offset[0] + 40, original[3].offset[1] - 20)
    assert np.array_equal(edited[3].pixels, original[3].pixels)
    assert not np.array_equal(edited[1].pixels, original[1].pixels)
    assert not np.array_equal(composite(edited), composite(original))
