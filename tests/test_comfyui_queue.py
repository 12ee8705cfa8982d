"""A queue soak on a real ComfyUI, driven as a program drives one: many prompts queued at once, with varied
images, seeds and layer counts; some deleted from the queue, one interrupted, a missing and a corrupt image
among them; a websocket client listening. Then every outcome is checked in /history and on disk, the models
must have loaded once, and the server's memory must have levelled off. Its own server (the tests' tiny models,
a fresh output folder, glibc's mmap threshold fixed: see MEASURED_SERVER), so nothing another test ran is
counted. Skipped where tests/test_comfyui.py is."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layered_core.image import bucket_size

from .comfy_server import (
    PROMPT_ENDS,
    REPO,
    Listener,
    Server,
    missing_comfyui,
    reported_files,
    serving,
    transparent_pixels,
)

if missing_comfyui():
    pytest.skip(missing_comfyui(), allow_module_level=True)

PROMPTS = 16  # submitted one after another, as fast as the server takes them
MISSING = 3  # names an image that is not there: refused by POST /prompt
CORRUPT = 7  # names a file that is no image: fails in LoadImage when it runs
INTERRUPTED = 5  # POST /interrupt on its first progress message
DELETED = (9, 12, 15)  # POST /queue delete, right after queuing, while the first prompts run
INTERRUPTED_STEPS = 200  # the most Decompose takes: far more than the interrupt needs to arrive
# the server's resident memory after the last prompt may exceed its value after the third by this fraction: more
# than it moves from one prompt to the next once levelled off, less than holding on to one decomposition's layers
# per prompt would add over the prompts between
MEMORY_MARGIN = 0.10
# layer counts from this down to 1; the first prompt, of the most layers on the largest image bucket, is the
# heaviest, so the allocator's high-water mark is reached before the third and what grows after it is memory held
MAX_LAYERS = 4
MAX_SECONDS = 600  # for the whole queue
# glibc raises its mmap threshold to the size of each large block freed, up to 32 MiB, so after the first prompts
# a layer-sized tensor comes from the heap and stays resident when freed, and the resident memory climbs over the
# prompts as each new tensor size raises the threshold, then stays. A fixed threshold (as the environment variable
# sets it) returns every large tensor when freed: what is resident is what the process holds, and a leak shows.
MEASURED_SERVER = {"env": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
# input images for the prompts, by file name: (PIL mode, width, height), taken in turn
IMAGES = {
    "soak_rgb.png": ("RGB", 128, 72),  # first: the largest bucket (864x480)
    "soak_rgba.png": ("RGBA", 96, 64),
    "soak_tall.jpg": ("RGB", 64, 112),
    "soak_grey.png": ("L", 100, 100),
}
LOADERS = ("1", "2", "3")  # in workflows/api/image_to_layers.json
LOAD_IMAGE, SAMPLER, DECODER, SAVE_PSD, SAVE_LAYERS = "4", "9", "10", "11", "12"


def _write_images(input_dir: Path) -> None:
    rng = np.random.default_rng(7)
    for seed, (name, (mode, width, height)) in enumerate(IMAGES.items()):
        if mode == "RGBA":
            pixels = transparent_pixels(width, height, seed)
        else:
            pixels = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8).squeeze()
        Image.fromarray(pixels, mode).save(input_dir / name)
    (input_dir / "soak_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def _prompt(index: int) -> tuple[dict, str, int]:
    """The shipped image_to_layers workflow for prompt ``index`` (a fixed prompt instead of the caption, 2
    steps), with its image's name and its layer count. Every prompt saves under the same prefixes, so the
    save nodes' numbering is what keeps them apart."""
    workflow = json.loads((REPO / "workflows" / "api" / "image_to_layers.json").read_text())
    del workflow["6"]  # the auto-caption
    workflow["7"]["inputs"]["prompt"] = f"soak test prompt {index}"
    names = list(IMAGES)
    image = {MISSING: "soak_missing.png", CORRUPT: "soak_corrupt.png"}.get(index, names[index % len(names)])
    layers = MAX_LAYERS - (index + index // len(names)) % MAX_LAYERS  # each image with several counts
    workflow[LOAD_IMAGE]["inputs"]["image"] = image
    steps = INTERRUPTED_STEPS if index == INTERRUPTED else 2
    workflow[SAMPLER]["inputs"].update(layers=layers, steps=steps, seed=1000 + index)
    workflow[SAVE_PSD]["inputs"]["filename_prefix"] = "soak/layers"
    workflow[SAVE_LAYERS]["inputs"]["filename_prefix"] = "soak/layer"
    return workflow, image, layers


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_queue")
    with serving(base, lambda base: _write_images(base / "input"), **MEASURED_SERVER) as running:
        yield running, base


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_queue_soak(soak_server):
    running, base = soak_server
    output = base / "output"
    listener = Listener(running)
    try:
        started = time.monotonic()
        ids, refusal = {}, None
        for index in range(PROMPTS):
            workflow, _, _ = _prompt(index)
            try:
                ids[index] = listener.queue(workflow)
            except urllib.error.HTTPError as error:
                assert index == MISSING and error.code == 400, (index, error.read())
                refusal = json.loads(error.read())
        deleted = {ids[index] for index in DELETED}
        assert deleted <= _pending(running), "the prompts to delete should still wait in the queue"
        running.post("/queue", {"delete": sorted(deleted)})
        assert not deleted & _pending(running)

        # every message about a prompt, in order; files hashed when their prompt ends
        messages: dict[str, list[tuple[str, dict]]] = {prompt_id: [] for prompt_id in ids.values()}
        ends: dict[str, str] = {}
        hashes: dict[Path, str] = {}
        resident: list[tuple[str, int]] = []  # (how a prompt ended, the server's resident bytes then)
        interrupt_sent = False
        while len(ends) < len(ids) - len(DELETED):
            assert time.monotonic() - started < MAX_SECONDS, f"the queue took over {MAX_SECONDS} s: {ends}"
            kind, data = listener.receive()
            prompt_id = (data or {}).get("prompt_id")
            if prompt_id not in messages:
                continue
            messages[prompt_id].append((kind, data))
            if kind == "progress" and prompt_id == ids[INTERRUPTED] and not interrupt_sent:
                running.post("/interrupt", {"prompt_id": prompt_id})
                interrupt_sent = True
            if kind in PROMPT_ENDS:
                ends[prompt_id] = kind
                for path in _files_in_executed(messages[prompt_id], output):
                    hashes[path] = _sha256(path)
                resident.append((kind, running.resident_bytes()))
        _wait_for_empty_queue(running)
        resident_after_last = running.resident_bytes()
        seconds = time.monotonic() - started
    finally:
        listener.close()

    histories = {index: running.get(f"/history/{prompt_id}").get(prompt_id) for index, prompt_id in ids.items()}
    succeeded = [index for index in ids if index not in (*DELETED, INTERRUPTED, CORRUPT)]
    kinds = {index: Counter(kind for kind, _ in messages[ids[index]]) for index in ids}
    after_success = [size for kind, size in resident if kind == "execution_success"]
    assert len(after_success) >= 3, f"fewer than 3 prompts succeeded: {ends}"
    resident_after_third = after_success[2]
    print(
        f"\nqueue soak: {len(succeeded)} of {PROMPTS} prompts succeeded in {seconds:.0f} s; resident memory "
        f"{resident_after_third / 2**20:.0f} MiB after the third, {resident_after_last / 2**20:.0f} MiB after the "
        f"last (after each prompt: {', '.join(f'{size / 2**20:.0f}' for _, size in resident)} MiB); messages per "
        f"prompt: {dict(kinds[succeeded[-1]])} (a success), {dict(kinds[INTERRUPTED])} (interrupted), "
        f"{dict(kinds[CORRUPT])} (corrupt image)"
    )

    # the missing image: refused before it was queued, naming the node and the file
    assert refusal is not None and MISSING not in ids
    details = json.dumps(refusal["node_errors"][LOAD_IMAGE])
    assert "soak_missing.png" in details, refusal

    # deleted: never run, never in /history, nothing sent about them
    for index in DELETED:
        assert histories[index] is None and messages[ids[index]] == [], index

    # interrupted after its first progress message, in the sampler: no files
    interrupted = histories[INTERRUPTED]
    assert interrupted["status"]["status_str"] == "error" and interrupt_sent
    assert [m[0] for m in interrupted["status"]["messages"]][-1] == "execution_interrupted", interrupted["status"]
    assert ends[ids[INTERRUPTED]] == "execution_interrupted"
    first_progress = next(data for kind, data in messages[ids[INTERRUPTED]] if kind == "progress")
    assert first_progress["node"] == SAMPLER and first_progress["max"] == INTERRUPTED_STEPS, first_progress
    assert not {SAVE_PSD, SAVE_LAYERS} & set(interrupted["outputs"]), interrupted["outputs"]

    # the corrupt image fails its own prompt only, in LoadImage
    corrupt = histories[CORRUPT]
    (error,) = [m[1] for m in corrupt["status"]["messages"] if m[0] == "execution_error"]
    assert corrupt["status"]["status_str"] == "error" and error["node_id"] == LOAD_IMAGE, error
    assert ends[ids[CORRUPT]] == "execution_error" and not corrupt["outputs"], corrupt["outputs"]

    # every other prompt: one PSD, named in /history as in its executed message, with its layers and size
    psds, layer_pngs = [], []
    for index in succeeded:
        history, sent = histories[index], messages[ids[index]]
        workflow, image, layers = _prompt(index)
        assert history["status"]["status_str"] == "success" and ends[ids[index]] == "execution_success", index
        (psd,) = reported_files({SAVE_PSD: workflow[SAVE_PSD]}, history, output)
        assert _files_in_executed(sent, output) == [psd], (index, sent)
        psds.append(psd)
        layer_pngs += [output / i["subfolder"] / i["filename"] for i in history["outputs"][SAVE_LAYERS]["images"]]
        _check_psd(psd, layers, bucket_size(*IMAGES[image][1:]))
        assert {SAMPLER, DECODER, SAVE_PSD} <= {data["node"] for kind, data in sent if kind == "progress"}, index
        assert {"execution_start", "execution_cached", "executing", "executed"} <= set(kinds[index]), index

    # nothing overwritten, nothing partial: each file as it was when its prompt ended, and no other file
    assert len(set(psds)) == len(psds) == len(succeeded)
    assert {path: _sha256(path) for path in psds} == hashes
    on_disk = {path for path in output.rglob("*") if path.is_file()}
    assert on_disk == set(psds) | set(layer_pngs), sorted(on_disk - set(psds) - set(layer_pngs))

    # the models loaded once: the loaders ran in the first prompt only, ComfyUI loaded each model once
    ran = Counter(data["node"] for sent in messages.values() for kind, data in sent if kind == "executing")
    assert all(ran[loader] == 1 for loader in LOADERS), ran
    log = running.log.read_text()
    for model in ("LayeredQwenImage", "RGBAVAE"):
        assert log.count(f"Requested to load {model}\n") == 1, (model, log[-3000:])

    assert resident_after_last <= resident_after_third * (1 + MEMORY_MARGIN), (
        resident_after_third,
        resident_after_last,
    )


def _files_in_executed(sent: list[tuple[str, dict]], output: Path) -> list[Path]:
    """The files the Save PSD node listed in its executed message."""
    return [
        output / entry["subfolder"] / entry["filename"]
        for kind, data in sent
        if kind == "executed" and data["node"] == SAVE_PSD
        for entry in data["output"]["files"]
    ]


def _check_psd(path: Path, layers: int, size: tuple[int, int]) -> None:
    from psd_tools import PSDImage

    psd = PSDImage.open(path)
    assert psd.size == size and len(list(psd)) == layers, (path, psd.size, len(list(psd)))


def _pending(running: Server) -> set[str]:
    """The ids of the prompts waiting in the queue (not the one running)."""
    return {item[1] for item in running.get("/queue")["queue_pending"]}


def _wait_for_empty_queue(running: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = running.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the queue is not empty after {timeout} s: {running.get('/queue')}")
