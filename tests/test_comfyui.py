"""Integration with a real ComfyUI: the server starts with the pack, every node is registered with
tooltips and a description, and the shared workflows run on tiny random models under the real file
names. Skipped (with the reason) where no ComfyUI checkout with a virtual environment is found at
${COMFYUI_PATH:-$HOME/ComfyUI}."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from layered_core.evaluate import read_sample
from layered_core.image import bucket_size, open_image, resize_rgba
from layered_core.metrics import fidelity
from layered_core.tiny_models import COMFY_FILES

from .comfy_server import (
    BATCH,
    BATCH_SIZES,
    COMFYUI,
    PYTHON,
    REPO,
    SAVE_NODES,
    TRANSPARENT,
    Listener,
    Server,
    batch_folder,
    layer_files,
    messages_until_done,
    missing_comfyui,
    reported_files,
    serving,
    ui_from_api_module,
)

NODE_IDS = {
    "QwenLayeredLoadMMDiT",
    "QwenLayeredFastPath",
    "QwenLayeredLoadRGBAVAE",
    "QwenLayeredLoadTextEncoder",
    "QwenLayeredTextEncode",
    "QwenLayeredCaption",
    "QwenLayeredEncodeImage",
    "QwenLayeredDecompose",
    "QwenLayeredDecodeLayers",
    "QwenLayeredSavePSD",
    "QwenLayeredImageToLayers",
    "QwenLayeredSplitLayer",
    "QwenLayeredSaveLayerPNGs",
    "QwenLayeredLoadImageFolder",
    "QwenLayeredLoadLayeredPSD",
    "QwenLayeredSelectLayer",
    "QwenLayeredReplaceLayer",
    "QwenLayeredTransformLayer",
    "QwenLayeredRecolorLayer",
    "QwenLayeredRemoveLayer",
    "QwenLayeredLayerVisibility",
    "QwenLayeredReorderLayer",
    "QwenLayeredMergeLayers",
    "QwenLayeredCompositeLayers",
    "QwenLayeredRecomposePSNR",
}
# each workflow: its API file workflows/api/<name>.json (for POST /prompt) and its editor twin workflows/<name>.json
WORKFLOWS = sorted(path.stem for path in (REPO / "workflows" / "api").glob("*.json"))
LORA = "qwen_image_layered_test_lora.safetensors"  # in models/loras
MERGED = "qwen_image_layered_lora_merged.safetensors"  # in models/diffusion_models: the transformer + LORA
# the tiny transformer's linears the LoRA changes: its key names in the file, and its alpha (None: no alpha
# key, scale 1). Both namings core's key map accepts for a QwenImage model: diffusers' (PEFT) with the
# "transformer." prefix, and kohya's on the bare module name, scaled by alpha / rank.
LORA_RANK = 4
LORA_TARGETS = {
    "transformer_blocks.0.attn.to_q": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", None),
    "transformer_blocks.0.txt_mlp.net.0.proj": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight", None),
    "transformer_blocks.1.img_mlp.net.2": ("{}.lora_down.weight", "{}.lora_up.weight", 2.0),
}

if missing_comfyui():
    pytest.skip(missing_comfyui(), allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    with serving(base, lambda base: _write_lora(base / "models")) as running:
        yield running, base


def _write_lora(models: Path) -> None:
    """A seeded rank-4 LoRA on LORA_TARGETS in models/loras, and what it predicts: the tiny transformer with
    the LoRA merged into its weights at strength 1, in float32 (ComfyUI on the CPU runs in float32 and adds
    the patch in float32, as here), in models/diffusion_models."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from layered_core.tiny_models import random_lora

    generator = torch.Generator().manual_seed(2)
    with safe_open(models / COMFY_FILES["bf16"], "pt") as source:
        metadata = source.metadata()
        merged = {key: source.get_tensor(key) for key in source.keys()}
    merged = {key: value.float() if value.is_floating_point() else value for key, value in merged.items()}
    lora, merged = random_lora(
        merged,
        LORA_TARGETS,
        LORA_RANK,
        generator,
        weight_key="model.diffusion_model.{}.weight",
        alpha_key=lambda module, down_key: down_key.replace(".lora_down.weight", ".alpha"),
    )
    (models / "loras").mkdir(parents=True, exist_ok=True)
    save_file(lora, str(models / "loras" / LORA))
    save_file(merged, str(models / "diffusion_models" / MERGED), metadata=metadata)


def _displayed(path: Path) -> np.ndarray:
    """A file's pixels as a viewer shows them (EXIF orientation applied), in the file's own mode."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image))


def test_pack_loads_and_every_node_is_described(server):
    running, base = server
    info = running.get("/object_info")
    assert NODE_IDS <= set(info)
    log = running.log.read_text()
    assert "IMPORT FAILED" not in log
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["description"], node_id
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        tooltips = node.get("output_tooltips") or [None] * len(node["output"])
        for name, tooltip in zip(node["output_name"], tooltips, strict=True):
            assert tooltip, f"{node_id} output {name} has no tooltip"


def _fast(workflow: dict) -> dict:
    for node in workflow.values():
        if node["class_type"] in (
            "QwenLayeredDecompose",
            "KSampler",
            "QwenLayeredImageToLayers",
            "QwenLayeredSplitLayer",
        ):
            node["inputs"]["steps"] = 2
    return workflow


def _psds(base: Path) -> set[Path]:
    return set((base / "output").rglob("*.psd")) if (base / "output").exists() else set()


def _is_batch(workflow: dict) -> bool:
    return any(node["class_type"] == "QwenLayeredLoadImageFolder" for node in workflow.values())


def _saved_stem(path: Path) -> str:
    """The filename prefix of a saved file: 'photo' for photo_00002_.psd."""
    return path.name.rsplit("_", 2)[0]


def _check_psds(workflow: dict, base: Path, written: set[Path]) -> None:
    """One PSD per input image (for the folder workflow: one per image, named from its stem, at its own
    size bucket), each with the workflow's layers."""
    from psd_tools import PSDImage

    if _is_batch(workflow):
        by_stem = {_saved_stem(path): path for path in written}
        assert sorted(by_stem) == sorted(BATCH_SIZES) and len(written) == len(BATCH_SIZES), sorted(written)
        assert {path.parent for path in written} == {base / "output" / BATCH}
    else:
        assert len(written) == 1, sorted(written)
    counts = [n["inputs"]["layers"] for n in workflow.values() if "layers" in n["inputs"]]
    for path in written:
        psd = PSDImage.open(path)
        leaves = [layer for layer in psd.descendants() if not layer.is_group()]
        # one decomposition, and with a split: one layer replaced by a group of its sub-layers
        assert len(leaves) == counts[0] + (counts[1] - 1 if len(counts) > 1 else 0)
        assert sum(1 for layer in psd.descendants() if layer.is_group()) == len(counts) - 1
        if _is_batch(workflow):  # each image decomposed on its own, upright
            assert psd.size == bucket_size(*BATCH_SIZES[_saved_stem(path)]), path
        if any(node["class_type"] == "QwenLayeredSaveLayerPNGs" for node in workflow.values()):
            # the ZIP of the same stack carries the PSD's name and number
            with zipfile.ZipFile(path.with_suffix(".zip")) as archive:
                manifest = json.loads(archive.read("manifest.json"))
            assert (manifest["canvas"]["width"], manifest["canvas"]["height"]) == psd.size
            assert len(manifest["layers"]) == len(list(psd)) == counts[0]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs(server, name):
    """Each workflow writes its PSDs (and ZIPs), and its save nodes report exactly the files written."""
    running, base = server
    workflow = _fast(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    before = layer_files(base)
    history = running.run(workflow)
    status = history["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success", errors
    written = layer_files(base) - before
    reported = reported_files(workflow, history, base / "output")
    assert len(reported) == len(set(reported)) and set(reported) == written, (reported, written)
    _check_psds(workflow, base, {path for path in written if path.suffix == ".psd"})


def _encode_workflow(image: str, prefix: str, mask: list | None = None) -> dict:
    """Load RGBA-VAE and LoadImage -> Encode Image for Layers (its mask input given ``mask``, a link, or not
    connected) -> core's SaveLatent under ``prefix``, as node 31 for :func:`_saved_latent`."""
    encode = {"vae": ["1", 0], "image": ["2", 0], "resolution": "640"}
    return {
        "1": {"class_type": "QwenLayeredLoadRGBAVAE", "inputs": {"vae_name": Path(COMFY_FILES["vae"]).name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "QwenLayeredEncodeImage", "inputs": encode if mask is None else {**encode, "mask": mask}},
        "31": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": prefix}},
    }


def _library_condition(base: Path, image: Image.Image):
    """The condition latent the library (and the command line) makes of ``image``: the same bucket resize and
    the same VAE file, in float32 as ComfyUI runs it on the CPU; raw, as a LATENT holds it."""
    import torch

    from layered_core.checkpoints import load_vae
    from layered_core.pipeline import DecomposeOptions, LayeredPipeline

    vae = load_vae(base / "models" / COMFY_FILES["vae"], dtype=torch.float32)
    pipeline = LayeredPipeline(None, vae)
    condition = pipeline.encode_image(pipeline.prepare_image(image, DecomposeOptions()))
    return vae.denormalize_latent(condition)[:, :, None]


def test_a_transparent_png_reaches_the_model_with_its_alpha(server):
    """core's LoadImage splits a transparent PNG into IMAGE (RGB) and MASK (1 - alpha); Encode Image with that
    MASK gives the condition latent the library gives for the file itself (read as RGBA), and without it the
    latent of the same picture made opaque, as the workflows gave before they connected the MASK."""
    from layered_core.image import open_image_with_alpha

    running, base = server
    rgba, transparent = open_image_with_alpha(base / "input" / TRANSPARENT)
    assert transparent
    expected = _library_condition(base, rgba)
    with_mask = _saved_latent(running, base, _encode_workflow(TRANSPARENT, "alpha/with_mask", ["2", 1]))
    without_mask = _saved_latent(running, base, _encode_workflow(TRANSPARENT, "alpha/without_mask"))
    opaque = rgba.copy()
    opaque.putalpha(255)

    assert with_mask.shape == expected.shape
    assert _relative_difference(with_mask, expected) <= 1e-5
    assert _relative_difference(without_mask, _library_condition(base, opaque)) <= 1e-5
    assert _relative_difference(without_mask, expected) > 1e-2


def test_an_opaque_image_is_unchanged_by_load_images_placeholder_mask(server):
    """For a file without alpha core's LoadImage gives a 64x64 mask of zeros whatever the image's size: Encode
    Image keeps the image opaque with it connected, the same latent as without. Any other mask of another size
    than the image is refused, naming both sizes."""
    running, base = server
    with Image.open(base / "input" / "example.png") as image:
        assert image.mode == "RGB" and image.size != (64, 64)
        expected = _library_condition(base, image.convert("RGBA"))
    with_mask = _saved_latent(running, base, _encode_workflow("example.png", "opaque/with_mask", ["2", 1]))
    without_mask = _saved_latent(running, base, _encode_workflow("example.png", "opaque/without_mask"))
    assert bool((with_mask == without_mask).all())
    assert _relative_difference(with_mask, expected) <= 1e-5

    for value, width, height in ((0.0, 32, 32), (0.5, 64, 64), (0.0, 128, 71)):
        workflow = _encode_workflow("example.png", f"opaque/mismatch_{width}", ["4", 0])
        workflow["4"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": width, "height": height}}
        status = running.run(workflow)["status"]
        (error,) = [m[1] for m in status["messages"] if m[0] == "execution_error"]
        assert error["node_id"] == "3", error
        assert f"the mask is {width}x{height} but the image is 128x72" in error["exception_message"], error


def test_image_to_layers_takes_the_alpha_from_the_mask(server):
    """Image to Layers on LoadImage's IMAGE and MASK decomposes the same RGBA as on the file loaded whole by
    Load Image Folder (4 channels): the same layers; without the MASK, other layers."""
    running, base = server
    folder = base / "input" / "alpha_folder"
    folder.mkdir()
    shutil.copy(base / "input" / TRANSPARENT, folder / TRANSPARENT)
    full = _fast(json.loads((REPO / "workflows" / "api" / "split_layer.json").read_text()))
    to_layers = {key: value for key, value in full["5"]["inputs"].items() if key != "mask"}
    to_layers.update(prompt="a test card", layers=2)

    def layers_of(source: dict, mask: list | None, prefix: str) -> list[np.ndarray]:
        inputs = {**to_layers, "image": ["4", 0]} if mask is None else {**to_layers, "image": ["4", 0], "mask": mask}
        workflow = {key: full[key] for key in ("1", "2", "3")}
        workflow["4"] = source
        workflow["5"] = {"class_type": "QwenLayeredImageToLayers", "inputs": inputs}
        workflow["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}}
        saved = _saved_images(running.run(workflow), "6")
        return [np.asarray(Image.open(base / "output" / name)) for name in saved]

    load_image = {"class_type": "LoadImage", "inputs": {"image": TRANSPARENT}}
    with_mask = layers_of(load_image, ["4", 1], "alpha_layers/with_mask")
    whole = layers_of(
        {"class_type": "QwenLayeredLoadImageFolder", "inputs": {"folder": "alpha_folder"}}, None, "alpha_layers/whole"
    )
    without_mask = layers_of(load_image, None, "alpha_layers/without_mask")
    assert len(with_mask) == len(whole) == 2
    assert all(np.array_equal(a, b) for a, b in zip(with_mask, whole, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(with_mask, without_mask, strict=True))


def _progress_by_node(messages) -> dict[str, list[tuple[int, int]]]:
    progress: dict[str, list[tuple[int, int]]] = {}
    for kind, data in messages:
        if kind == "progress":
            progress.setdefault(data["node"], []).append((data["value"], data["max"]))
    return progress


@pytest.mark.parametrize("name", ["image_to_layers", "split_layer"])
def test_each_long_stage_sends_progress(server, name):
    """A websocket client sees each long stage move: the samplers' steps, then the frames decoded (N+1: the
    composite and N layers), and the save nodes' layers encoded and file written; each bar ends full."""
    running, base = server
    workflow = _fast(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    for node in workflow.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] = 4242  # not run before: nothing cached
        if node["inputs"].get("prompt") == "":
            node["inputs"]["prompt"] = "a test card"  # no auto-caption: faster
        if node["class_type"] == "QwenLayeredCaption":
            node["inputs"]["max_new_tokens"] = 8
    listener = Listener(running)
    try:
        messages = messages_until_done(listener, listener.queue(workflow))
    finally:
        listener.close()
    assert messages[-1][0] == "execution_success", messages[-1]
    progress = _progress_by_node(messages)
    for node_id, node in workflow.items():
        kind, inputs = node["class_type"], node["inputs"]
        bars = progress.get(node_id, [])
        maxima = {total for _, total in bars}
        if kind in SAVE_NODES:
            assert len(maxima) == 1 and bars[-1][0] == bars[-1][1] >= 2, (node_id, kind, bars)
        elif kind == "QwenLayeredDecodeLayers":
            frames = workflow[inputs["samples"][0]]["inputs"]["layers"] + 1
            assert maxima == {frames} and bars[-1] == (frames, frames), (node_id, kind, bars)
        elif kind in ("QwenLayeredDecompose", "QwenLayeredImageToLayers", "QwenLayeredSplitLayer"):
            frames = inputs["layers"] + 1
            expected = {inputs["steps"]} if kind == "QwenLayeredDecompose" else {inputs["steps"], frames}
            assert maxima == expected, (node_id, kind, bars)
            assert (inputs["steps"], inputs["steps"]) in bars, (node_id, kind, bars)
            if kind != "QwenLayeredDecompose":
                assert bars[-1] == (frames, frames), (node_id, kind, bars)


def test_rerun_with_another_seed_writes_a_new_file_and_keeps_the_old(server):
    running, base = server
    workflow = _fast(json.loads((REPO / "workflows" / "api" / "image_to_layers.json").read_text()))
    first = running.run(workflow)
    assert first["status"]["status_str"] == "success"
    count = len(list((base / "output").rglob("*.psd")))
    same = running.run(workflow)  # unchanged inputs: everything cached, no new file
    assert same["status"]["status_str"] == "success"
    assert len(list((base / "output").rglob("*.psd"))) == count
    workflow["9"]["inputs"]["seed"] = 1
    changed = running.run(workflow)
    assert changed["status"]["status_str"] == "success"
    assert len(list((base / "output").rglob("*.psd"))) == count + 1


def _folder_workflow(folder: str, prefix: str, **options) -> dict:
    """Load Image Folder -> core's SaveImage, each image saved under ``prefix``/<its name>."""
    return {
        "1": {"class_type": "QwenLayeredLoadImageFolder", "inputs": {"folder": folder, **options}},
        "2": {
            "class_type": "StringConcatenate",
            "inputs": {"string_a": prefix, "string_b": ["1", 1], "delimiter": "/"},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": ["2", 0]}},
    }


def _saved_images(history: dict, node_id: str = "3") -> list[str]:
    assert history["status"]["status_str"] == "success", history["status"]
    return [f"{entry['subfolder']}/{entry['filename']}" for entry in history["outputs"][node_id]["images"]]


def test_load_image_folder_gives_every_image_with_its_name(server):
    """Each image of the folder, sorted by name, the text file skipped: RGBA kept as 4 channels, RGB as 3,
    the JPEG turned upright; pattern and limit select."""
    running, base = server
    folder = base / "input" / BATCH
    saved = _saved_images(running.run(_folder_workflow(BATCH, "folder_check")))
    assert saved == ["folder_check/cutout_00001_.png", "folder_check/photo_00001_.png"]
    for name, source in (("cutout", folder / "cutout.png"), ("photo", folder / "photo.jpg")):
        with Image.open(base / "output" / "folder_check" / f"{name}_00001_.png") as image:
            assert image.mode == ("RGBA" if name == "cutout" else "RGB")
            got = np.asarray(image).astype(int)
        expected = _displayed(source).astype(int)
        assert got.shape == expected.shape == (BATCH_SIZES[name][1], BATCH_SIZES[name][0], len(image.mode))
        # float 0..1 and back through core's SaveImage, which truncates: at most one level off
        assert np.abs(got - expected).max() <= 1, name

    only_jpeg = _saved_images(running.run(_folder_workflow(BATCH, "pattern_check", pattern="*.JPG")))
    assert only_jpeg == ["pattern_check/photo_00001_.png"]
    first = _saved_images(running.run(_folder_workflow(BATCH, "limit_check", pattern="*", limit=1)))
    assert first == ["limit_check/cutout_00001_.png"]


def _post_error(running, workflow: dict) -> str:
    """The validation errors of node 1, as text, from the HTTP 400 that POST /prompt answers."""
    with pytest.raises(urllib.error.HTTPError) as raised:
        running.post("/prompt", {"prompt": workflow})
    assert raised.value.code == 400
    errors = json.loads(raised.value.read())["node_errors"]["1"]["errors"]
    return "\n".join(error["details"] for error in errors)


def test_load_image_folder_refuses_folders_outside_the_input_directory(server):
    running, base = server
    outside = base / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(base / "input" / BATCH / "cutout.png", outside / "secret.png")
    link = base / "input" / "escape"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    for folder in ("../outside", str(outside), "escape", f"{BATCH}/../../outside"):
        error = _post_error(running, _folder_workflow(folder, "escape_check"))
        assert f"folder {folder!r} is outside ComfyUI's input directory" in error, error
    error = _post_error(running, _folder_workflow("no_such_folder", "missing_check", pattern="*.png"))
    assert "'no_such_folder'" in error and "'*.png'" in error and "no such folder" in error, error
    error = _post_error(running, _folder_workflow(BATCH, "empty_check", pattern="*.gif"))
    assert f"'{BATCH}'" in error and "no image files matching the pattern '*.gif'" in error, error

    # a folder given through a link is checked when the node runs: the run fails, naming the folder
    workflow = _folder_workflow("", "escape_check")
    workflow["4"] = {"class_type": "PrimitiveString", "inputs": {"value": "../outside"}}
    workflow["1"]["inputs"]["folder"] = ["4", 0]
    status = running.run(workflow)["status"]
    assert status["status_str"] == "error"
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_id"] == "1", status
    assert "'../outside' is outside ComfyUI's input directory" in errors[0]["exception_message"], errors
    assert not (base / "output" / "escape_check").exists()


def _cached_nodes(history: dict) -> set[str]:
    assert history["status"]["status_str"] == "success", history["status"]
    return {
        node for kind, data in history["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]
    }


def test_batch_reruns_only_when_the_folder_changes(server):
    """A re-queue over an unchanged folder is all cached and writes nothing; a new file, or a file written
    again, reruns the batch, and every earlier result stays as it was."""
    running, base = server
    folder = base / "input" / "cache_check"
    folder.mkdir()
    shutil.copy(base / "input" / BATCH / "cutout.png", folder / "cutout.png")
    workflow = _fast(json.loads((REPO / "workflows" / "api" / "batch_folder.json").read_text()))
    workflow["4"]["inputs"]["folder"] = "cache_check"
    workflow["5"]["inputs"].update(layers=2, prompt="a test card")  # a prompt: no auto-caption, faster
    workflow["6"]["inputs"]["string_a"] = "cache_check"
    output = base / "output" / "cache_check"

    _cached_nodes(running.run(workflow))
    first = {path: path.read_bytes() for path in output.iterdir()}
    assert sorted(_saved_stem(path) for path in first if path.suffix == ".psd") == ["cutout"]
    assert _cached_nodes(running.run(workflow)) == set(workflow)
    assert {path: path.read_bytes() for path in output.iterdir()} == first

    shutil.copy(base / "input" / BATCH / "photo.jpg", folder / "photo.jpg")
    assert "4" not in _cached_nodes(running.run(workflow))
    assert sorted(path.name for path in output.iterdir() if path not in first) == [
        "cutout_00002_.psd",
        "cutout_00002_.zip",
        "photo_00001_.psd",
        "photo_00001_.zip",
    ]
    assert {path: path.read_bytes() for path in first} == first  # nothing overwritten

    stat = (folder / "cutout.png").stat()
    os.utime(folder / "cutout.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "4" not in _cached_nodes(running.run(workflow))
    assert len(list(output.glob("*.psd"))) == 5


# per sampler: its workflow, the nodes kept from it (up to the sampler), the sampler node and the node whose
# "model" input takes the loaded model
LORA_SAMPLERS = {
    "decompose": ("image_to_layers", ("1", "2", "3", "4", "5", "7", "8", "9"), "9", "9"),
    "ksampler": (
        "core_ksampler_interop",
        ("1", "2", "3", "4", "5", "7", "8", "13", "14", "15", "16", "17", "18"),
        "18",
        "17",
    ),
}


def _lora_workflow(sampler: str, prefix: str, strength: float | None = None, model_name: str | None = None) -> dict:
    """A shared workflow cut after its sampler, which core's SaveLatent writes under ``prefix``; with a
    ``strength``, core's LoraLoaderModelOnly applies LORA between the model loader and the sampler."""
    name, kept, sampler_node, model_input = LORA_SAMPLERS[sampler]
    full = _fast(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    workflow = {node: full[node] for node in kept}
    if "6" in full:  # a fixed prompt instead of the auto-caption
        workflow["7"]["inputs"]["prompt"] = "a poster with a title and a photo"
    if model_name is not None:
        workflow["1"]["inputs"]["model_name"] = model_name
    if strength is not None:
        workflow["30"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": LORA, "strength_model": strength},
        }
        workflow[model_input]["inputs"]["model"] = ["30", 0]
    workflow["31"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_node, 0], "filename_prefix": prefix}}
    return workflow


def _saved_latent(running, base: Path, workflow: dict):
    """Runs ``workflow`` and reads back the latent its SaveLatent wrote; the sampler ran, not the cache."""
    from safetensors.torch import load_file

    history = running.run(workflow)
    status = history["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success", errors
    assert workflow["31"]["inputs"]["samples"][0] not in _cached_nodes(history)
    (saved,) = history["outputs"]["31"]["latents"]
    return load_file(base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]


def _relative_difference(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("sampler", list(LORA_SAMPLERS))
def test_core_lora_loader_patches_our_model(server, sampler):
    """Core's LoraLoaderModelOnly on this pack's MODEL, sampled by Decompose and by core's KSampler: every
    LoRA key matches a weight of the model, strength 1 gives what the transformer with the LoRA merged into
    its weights gives, and strength 0 (run after it: the weights restored) gives the model without the LoRA."""
    running, base = server
    log_start = len(running.log.read_text())
    plain = _saved_latent(running, base, _lora_workflow(sampler, f"lora_{sampler}/none"))
    patched = _saved_latent(running, base, _lora_workflow(sampler, f"lora_{sampler}/strength_1", 1.0))
    unpatched = _saved_latent(running, base, _lora_workflow(sampler, f"lora_{sampler}/strength_0", 0.0))
    merged = _saved_latent(running, base, _lora_workflow(sampler, f"lora_{sampler}/merged", model_name=MERGED))

    assert patched.shape == plain.shape == merged.shape and bool(plain.isfinite().all())
    assert _relative_difference(unpatched, plain) <= 1e-6
    change = _relative_difference(patched, plain)
    assert change > 1e-3, change
    # the same float32 sum as ComfyUI's patch: equal up to the order of the matmul's additions
    assert _relative_difference(patched, merged) <= 1e-6
    log = running.log.read_text()[log_start:]
    for complaint in ("lora key not loaded", "NOT LOADED", "SHAPE MISMATCH", "Calculate Weight Failed", "ERROR lora"):
        assert complaint not in log, log


def _slow(workflow: dict, steps: int) -> dict:
    for node in workflow.values():
        if node["class_type"] == "QwenLayeredDecompose":
            node["inputs"]["steps"] = steps
            node["inputs"]["seed"] = 1000 + steps  # never cached
    return workflow


def _seconds_for(running, steps: int) -> float:
    workflow = _slow(json.loads((REPO / "workflows" / "api" / "image_to_layers.json").read_text()), steps)
    start = time.monotonic()
    assert running.run(workflow)["status"]["status_str"] == "success"
    return time.monotonic() - start


def test_cancel_stops_within_one_step(server):
    running, base = server
    # the loaders, encoding and caption are cached between these runs: the difference is 6 sampling steps
    step = (_seconds_for(running, 8) - _seconds_for(running, 2)) / 6
    workflow = _slow(json.loads((REPO / "workflows" / "api" / "image_to_layers.json").read_text()), 200)
    prompt_id = running.post("/prompt", {"prompt": workflow})["prompt_id"]
    time.sleep(max(3.0, 5 * step))  # well into the sampling
    cancelled_at = time.monotonic()
    running.post("/interrupt", {"prompt_id": prompt_id})
    while prompt_id not in running.get(f"/history/{prompt_id}"):
        time.sleep(0.02)
        assert time.monotonic() - cancelled_at < 60
    stopped_after = time.monotonic() - cancelled_at
    status = running.get(f"/history/{prompt_id}")[prompt_id]["status"]
    kinds = [m[0] for m in status["messages"]]
    assert "execution_interrupted" in kinds, kinds
    # comfy.ops checks the interrupt flag before every layer, so the run ends inside the step it is in;
    # 0.3 s covers the HTTP round trips and the history write
    assert stopped_after < step + 0.3, (stopped_after, step)


def _comfy_cli() -> Path:
    comfy = COMFYUI / ".venv" / "bin" / "comfy"
    if not comfy.is_file():
        pytest.skip(f"comfy-cli is not installed in {COMFYUI / '.venv'}")
    return comfy


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_its_api_twin(server, tmp_path, name):
    """comfy-cli's UI -> API converter (what `comfy run` uses) turns each editor file, workflows/<name>.json,
    into its API file, workflows/api/<name>.json."""
    running, base = server
    _comfy_cli()
    info = tmp_path / "object_info.json"
    info.write_text(json.dumps(running.get("/object_info")))
    script = (
        "import json, sys; from comfy_cli.workflow_to_api import convert_ui_to_api; "
        "print(json.dumps(convert_ui_to_api(json.load(open(sys.argv[1])), json.load(open(sys.argv[2])))))"
    )
    ui = REPO / "workflows" / f"{name}.json"
    result = subprocess.run(
        [str(PYTHON), "-c", script, str(ui), str(info)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    converted = json.loads(result.stdout)
    expected = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in expected.items()
    }


@pytest.mark.parametrize("name", WORKFLOWS)
def test_comfy_cli_runs_a_workflow(server, tmp_path, name):
    """`comfy run --workflow` on a UI-format file (made by workflows/ui_from_api.py, with 2 steps and a
    seed not run before, so nothing is cached) writes the workflow's PSDs."""
    running, base = server
    comfy = _comfy_cli()
    module = ui_from_api_module()
    workflow = _fast(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    for node in workflow.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] = 77
    path = tmp_path / "workflow.ui.json"
    path.write_text(json.dumps(module.ui_from_api(workflow, running.get("/object_info"))))
    command = [str(comfy), "--skip-prompt", "--no-json", "run", "--workflow", str(path)]
    command += ["--host", "127.0.0.1", "--port", str(running.port), "--wait", "--timeout", "120"]
    env = {**os.environ, "DO_NOT_TRACK": "1", "COMFY_NO_WATCH": "1"}
    before = _psds(base)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    _check_psds(workflow, base, _psds(base) - before)


def test_lowvram_server_runs_the_workflow(tmp_path_factory, server):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("--lowvram needs a GPU: ComfyUI refuses --lowvram together with --cpu")
    _, shared = server
    base = tmp_path_factory.mktemp("comfyui_lowvram")
    for name in ("custom_nodes", "models", "input"):
        (base / name).symlink_to(shared / name, target_is_directory=True)
    lowvram = Server(base, extra_args=("--lowvram",))
    try:
        history = lowvram.run(_fast(json.loads((REPO / "workflows" / "api" / "image_to_layers.json").read_text())))
        assert history["status"]["status_str"] == "success"
    finally:
        lowvram.stop()


def test_a_bad_file_in_the_folder_is_skipped_and_named_on_the_node(server):
    """One unreadable image costs only itself: the others load, the node says which file it skipped and
    why (its text on the node), the log warns; a folder of nothing readable is an error naming the files."""
    running, base = server
    folder = base / "input" / "with_a_bad_file"
    batch_folder(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    history = running.run(_folder_workflow("with_a_bad_file", "bad_file_check"))
    assert _saved_images(history) == ["bad_file_check/cutout_00001_.png", "bad_file_check/photo_00001_.png"]
    (shown,) = history["outputs"]["1"]["text"]
    lines = shown.splitlines()
    assert lines[0] == "2 of 3 images loaded" and len(lines) == 2
    assert lines[1].startswith("skipped broken.png: not a readable image")
    assert "Load Image Folder: skipped" in running.log.read_text() and "broken.png" in running.log.read_text()

    only_bad = base / "input" / "only_bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"not a png")
    (only_bad / "b.jpg").write_bytes(b"")
    failed = running.run(_folder_workflow("only_bad", "only_bad_check"))
    assert failed["status"]["status_str"] == "error"
    (error,) = [m[1] for m in failed["status"]["messages"] if m[0] == "execution_error"]
    assert "no readable image among 2 files" in error["exception_message"]
    assert "a.png" in error["exception_message"] and "b.jpg" in error["exception_message"]


def test_the_caption_is_shown_on_its_node_and_not_logged_at_info(server):
    running, base = server
    log_start = len(running.log.read_text())
    workflow = {
        "1": {"class_type": "QwenLayeredLoadTextEncoder", "inputs": {"folder": "Qwen2.5-VL-7B-Instruct-tiny"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {
            "class_type": "QwenLayeredCaption",
            "inputs": {"text_encoder": ["1", 0], "image": ["2", 0], "language": "en", "max_new_tokens": 12},
        },
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    history = running.run(workflow)
    assert history["status"]["status_str"] == "success", history["status"]
    (caption,) = history["outputs"]["3"]["text"]
    assert caption and history["outputs"]["4"]["text"] == [caption]  # the node shows what it outputs
    assert caption not in running.log.read_text()[log_start:]
    # the browser side that shows it: the pack's web directory is served with its extension
    extensions = running.get("/extensions")
    assert any(path.endswith("/show_text.js") for path in extensions), extensions


def test_recompose_psnr_is_shown_beside_the_layers(server):
    """The node's PSNR is metrics.fidelity's of the stack (read back from the PSD saved beside it) against the
    input resized to the canvas; LoadImage's 64x64 placeholder mask of an opaque image changes nothing."""
    running, base = server
    model = {"model_name": COMFY_FILES["bf16"].split("/")[-1], "weight_dtype": "default"}
    workflow = {
        "1": {"class_type": "QwenLayeredLoadMMDiT", "inputs": model},
        "2": {"class_type": "QwenLayeredLoadRGBAVAE", "inputs": {"vae_name": COMFY_FILES["vae"].split("/")[-1]}},
        "3": {"class_type": "QwenLayeredLoadTextEncoder", "inputs": {"folder": "Qwen2.5-VL-7B-Instruct-tiny"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "QwenLayeredImageToLayers",
            "inputs": {
                "model": ["1", 0],
                "vae": ["2", 0],
                "text_encoder": ["3", 0],
                "image": ["4", 0],
                "prompt": "a test",
                "layers": 2,
                "steps": 2,
                "cfg": 4.0,
                "cfg_normalize": True,
                "resolution": "640",
                "seed": 0,
            },
        },
        "6": {
            "class_type": "QwenLayeredRecomposePSNR",
            "inputs": {"image": ["4", 0], "stack": ["5", 3], "mask": ["4", 1]},
        },
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
        "8": {"class_type": "QwenLayeredSavePSD", "inputs": {"stack": ["5", 3], "filename_prefix": "psnr_check/stack"}},
    }
    history = running.run(workflow)
    assert history["status"]["status_str"] == "success", history["status"]
    stack = read_sample(base / "output" / "psnr_check" / "stack_00001_.psd")
    image = open_image(base / "input" / "example.png")
    expected = fidelity(stack, resize_rgba(image, stack.size))
    (shown,) = history["outputs"]["6"]["text"]
    assert shown == (
        f"recompose PSNR {expected.psnr:.2f} dB, largest error {expected.max_error * 255:.0f}/255, at "
        f"{stack.width}x{stack.height} (the image resized from {image.width}x{image.height})"
    )
    (value,) = history["outputs"]["7"]["text"]
    assert float(value) == pytest.approx(expected.psnr, rel=1e-9)


def test_the_pack_reaches_its_core_through_its_own_package(tmp_path):
    """The pack puts nothing on sys.path: a module of the same name elsewhere, and a second copy of the pack,
    load beside it without either taking the other's place."""
    decoy = tmp_path / "elsewhere" / "layered_core"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("DECOY = True\n")
    packs = tmp_path / "custom_nodes"
    packs.mkdir()
    for name in ("qwen_image_layered", "qwen_image_layered_copy"):
        (packs / name).symlink_to(REPO, target_is_directory=True)
    script = (
        "import asyncio, sys\n"
        "sys.argv = ['main.py', '--cpu']\n"
        "import comfy.options\n"
        "comfy.options.enable_args_parsing()\n"  # as main.py does: ComfyUI reads its flags when first imported
        "import layered_core\n"  # the other module of that name, imported first
        "import nodes\n"
        f"for name in ('qwen_image_layered', 'qwen_image_layered_copy'):\n"
        f"    assert asyncio.run(nodes.load_custom_node({str(packs)!r} + '/' + name)), name\n"
        "assert 'QwenLayeredDecompose' in nodes.NODE_CLASS_MAPPINGS\n"
        "assert sys.modules['layered_core'].DECOY\n"
        "assert not any(p.startswith(" + repr(str(packs)) + ") or p == " + repr(str(REPO)) + " for p in sys.path)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{decoy.parent}:{COMFYUI}"}
    result = subprocess.run(
        [str(PYTHON), "-c", script], cwd=COMFYUI, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


PACK = "qwen_image_layered"  # the pack's folder name in custom_nodes, as the server fixture links it


def _fetch(running, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.port}{path}", timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def test_templates_are_the_editor_workflows_with_thumbnails(server):
    """ComfyUI lists custom_nodes/<pack>/workflows/*.json as the pack's templates (app/custom_node_manager.py,
    one folder level) and serves that folder under /api/workflow_templates/<pack>/. The Templates dialog opens
    <name>.json in the editor and shows <name>.jpg as its card (the frontend's template store gives every
    custom-node template mediaSubtype 'jpg'). So: exactly the editor files are listed (not the API twins in
    workflows/api/), each opens as an editor graph, and each has a JPEG thumbnail, small and square."""
    running, base = server
    assert sorted(running.get("/workflow_templates")[PACK]) == WORKFLOWS
    for name in WORKFLOWS:
        status, kind, body = _fetch(running, f"/api/workflow_templates/{PACK}/{name}.json")
        assert status == 200
        graph = json.loads(body)
        assert graph["nodes"] and isinstance(graph["links"], list), f"{name}.json is not an editor workflow"
        status, kind, body = _fetch(running, f"/api/workflow_templates/{PACK}/{name}.jpg")
        assert status == 200 and kind == "image/jpeg", (name, status, kind)
        assert len(body) < 100_000, (name, len(body))
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == "JPEG" and image.width == image.height >= 256, (name, image.format, image.size)


def _editor_widgets(schema: dict) -> list[tuple[str, object]]:
    """The widgets the editor gives a node, in order, as (name, input spec), the way ComfyUI's frontend builds
    them from /object_info: one per widget input (required, then optional); after an image_upload combo, the
    upload button; after an input whose spec sets control_after_generate, or else an INT named seed or
    noise_seed (useIntWidget's rule), the 'control_after_generate' combo, whose value an editor file stores
    right after the seed's (fixed, increment, decrement or randomize; randomize when there is none)."""
    widgets = []
    inputs = list(schema["input"].get("required", {}).items()) + list(schema["input"].get("optional", {}).items())
    for name, spec in inputs:
        kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
            continue
        if options.get("forceInput"):
            continue
        widgets.append((name, spec))
        if options.get("image_upload"):
            widgets.append(("upload", None))
        control = options.get("control_after_generate")
        if control if control is not None else (kind == "INT" and name in ("seed", "noise_seed")):
            widgets.append(("control_after_generate", None))
    return widgets


def _editor_workflows() -> dict[str, dict]:
    return {name: json.loads((REPO / "workflows" / f"{name}.json").read_text()) for name in WORKFLOWS}


def test_editor_workflows_pin_every_seed(server):
    """Every seed widget in the editor files is followed by its control value "fixed": without one the editor
    sets the control to randomize, so each run changes the seed and a rerun is never cached."""
    running, base = server
    info = running.get("/object_info")
    seeds = 0
    for name, graph in _editor_workflows().items():
        for node in graph["nodes"]:
            widgets = [widget for widget, _ in _editor_widgets(info[node["type"]])]
            values = node["widgets_values"]
            where = f"{name}.json node {node['id']} ({node['type']})"
            assert len(values) == len(widgets), f"{where}: widgets_values {values} for the widgets {widgets}"
            for index, widget in enumerate(widgets):
                if widget == "control_after_generate":
                    seeds += 1
                    assert values[index] == "fixed", f"{where}: {widgets[index - 1]} control is {values[index]!r}"
    assert seeds >= len(WORKFLOWS)  # every workflow samples, with at least one seed


# The editor's geometry (litegraph in ComfyUI's frontend 1.48: LiteGraphGlobal, LGraphNode.computeSize and
# _arrangeWidgets, LGraphBadge, the image preview widget). A node's title bar is drawn above its pos; its badge
# (the pack's name, shown by default for custom nodes) above that, right-aligned.
TITLE_HEIGHT = 30
BADGE_HEIGHT = 20 + 2
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
TEXTAREA_MIN_HEIGHT = 50  # a multiline STRING: a DOM textarea, at least 50 px
PREVIEW_MIN_HEIGHT = 220  # the image preview widget the editor adds when a node has images to show
# Nodes that show a read-only text (a textarea) on the node after a run, as ui_from_api.py lays them out (checked
# against the pack's JS by test_the_nodes_laid_out_with_text_are_those_that_show_it)
TEXT_AFTER_RUN = ui_from_api_module().SHOWS_TEXT_AFTER_RUN


def test_the_nodes_laid_out_with_text_are_those_that_show_it():
    """ui_from_api.py keeps room for text below the nodes that show it: this pack's, by nodes/web/show_text.js,
    and core's Get Image Size."""
    script = (REPO / "nodes" / "web" / "show_text.js").read_text()
    (listed,) = re.findall(r"const NODES_WITH_TEXT = new Set\(\[(.*?)\]\)", script, re.DOTALL)
    assert TEXT_AFTER_RUN == {*re.findall(r'"(\w+)"', listed), "GetImageSize"}


def _title_font(px: int = 14):
    """Inter, the editor's node font (LiteGraph.NODE_FONT), from the frontend package that this ComfyUI
    serves."""
    from PIL import ImageFont

    script = "import comfyui_frontend_package as p, os; print(os.path.dirname(p.__file__))"
    found = subprocess.run([str(PYTHON), "-c", script], capture_output=True, text=True, timeout=60)
    fonts = sorted(Path(found.stdout.strip()).glob("static/fonts/inter-latin-normal.*")) if found.stdout else []
    if found.returncode != 0 or not fonts:
        pytest.skip(f"no Inter font in {COMFYUI}'s comfyui_frontend_package: cannot measure the titles")
    return ImageFont.truetype(str(fonts[0]), px)


def _shows_image(schema: dict) -> bool:
    """The editor draws images on an output node (what it saved), on a node with an image upload (the picked
    image) and on a sampler (a seed widget: its latent previews while it runs, when previews are on)."""
    widgets = [name for name, _ in _editor_widgets(schema)]
    return bool(schema.get("output_node")) or "upload" in widgets or "control_after_generate" in widgets


def _height_after_run(node: dict, schema: dict) -> float:
    """The least height (below the title bar) the editor gives the node once a run has added its preview or
    text: computeSize's 20 px per slot row, 20 + 4 per widget (a textarea: 50 + 4), 8 + 6 of margins; the
    node grows to that when its stored size is smaller. An estimate of the frontend's own arithmetic: the
    browser test measures the real nodes."""
    slots = [
        name
        for section in ("required", "optional")
        for name, spec in schema["input"].get(section, {}).items()
        if name not in {widget for widget, _ in _editor_widgets(schema)}
    ]
    heights = []
    for _, spec in _editor_widgets(schema):
        multiline = spec is not None and spec[0] == "STRING" and len(spec) > 1 and spec[1].get("multiline")
        heights.append(TEXTAREA_MIN_HEIGHT if multiline else WIDGET_HEIGHT)
    if _shows_image(schema):
        heights.append(PREVIEW_MIN_HEIGHT)
    if node["type"] in TEXT_AFTER_RUN:
        heights.append(TEXTAREA_MIN_HEIGHT)
    rows = max(len(slots), len(schema["output"]), 1)
    return rows * SLOT_HEIGHT + sum(h + 4 for h in heights) + (8 if heights else 0) + 6


@pytest.mark.parametrize("name", WORKFLOWS)
def test_editor_layout_has_no_overlaps_and_whole_titles(server, name):
    """In each editor file no two nodes overlap, before or after a run: each node's rectangle runs from its
    badge and title bar above pos down to the larger of its stored height and the height the editor grows it
    to once its preview or text is shown. And every title fits its node's width: the editor cuts a title that
    is wider than the node less 30 px each side; the width is measured with PIL in the editor's font, Inter
    14 px, which is close to but not exactly the browser's text layout."""
    running, base = server
    info = running.get("/object_info")
    font = _title_font()
    graph = _editor_workflows()[name]
    boxes = {}
    for node in graph["nodes"]:
        schema = info[node["type"]]
        (x, y), (width, height) = node["pos"], node["size"]
        title = node.get("title") or schema["display_name"]
        assert font.getlength(title) + 2 * TITLE_HEIGHT <= width, f"{name}: {title!r} is cut at width {width}"
        bottom = y + max(height, _height_after_run(node, schema))
        boxes[f"{node['id']} {title}"] = (x, y - TITLE_HEIGHT - BADGE_HEIGHT, x + width, bottom)
    for first, (ax0, ay0, ax1, ay1) in boxes.items():
        for second, (bx0, by0, bx1, by1) in boxes.items():
            if first < second:
                overlap = min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0)
                assert not overlap, f"{name}: {first} {boxes[first]} overlaps {second} {boxes[second]}"


def test_editor_workflows_are_what_ui_from_api_writes(server):
    """Each editor file is what workflows/ui_from_api.py makes of its API file with this server's /object_info
    (its layout, sizes and pinned seeds included): after changing an API file or a node's inputs, regenerate
    them as workflows/README.md says."""
    running, base = server
    module = ui_from_api_module()
    info = running.get("/object_info")
    for name, graph in _editor_workflows().items():
        api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
        assert module.ui_from_api(api, info) == graph, f"workflows/{name}.json is stale: run workflows/ui_from_api.py"
