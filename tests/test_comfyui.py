"""Integration with a real ComfyUI: the server starts with the pack, every node is registered with
tooltips and a description, and the shared workflows run on tiny random models under the real file
names. Skipped (with the reason) where no ComfyUI checkout with a virtual environment is found at
${COMFYUI_PATH:-$HOME/ComfyUI}."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
COMFYUI = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
PYTHON = COMFYUI / ".venv" / "bin" / "python"
NODE_IDS = {
    "QwenLayeredLoadMMDiT",
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
}

if not (COMFYUI / "main.py").is_file() or not PYTHON.is_file():
    pytest.skip(
        f"no ComfyUI checkout with a .venv at {COMFYUI} (set COMFYUI_PATH to run the integration tests)",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, extra_args=()):
        self.port = _free_port()
        self.log = base / "comfyui.log"
        # --cpu and --lowvram exclude each other; without a GPU ComfyUI runs on the CPU either way
        device = [] if "--lowvram" in extra_args else ["--cpu"]
        command = [str(PYTHON), "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port)]
        command += ["--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        self.process = subprocess.Popen(
            [*command, *extra_args], cwd=COMFYUI, stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log.read_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer in 120 s: {self.log.read_text()[-3000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            return json.load(response)

    def post(self, path: str, data: dict):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", json.dumps(data).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def run(self, workflow: dict, timeout: float = 300) -> dict:
        prompt_id = self.post("/prompt", {"prompt": workflow})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"workflow did not finish in {timeout} s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "qwen_image_layered").symlink_to(REPO, target_is_directory=True)
    result = subprocess.run(
        [str(PYTHON), "-m", "layered_core", "tiny-models", str(base / "models")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (base / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (72, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(base / "input" / "example.png")
    running = Server(base)
    yield running, base
    running.stop()
    shutil.rmtree(base / "custom_nodes", ignore_errors=True)


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


@pytest.mark.parametrize("name", ["image_to_layers.api.json", "core_ksampler_interop.api.json", "split_layer.api.json"])
def test_workflow_runs(server, name):
    running, base = server
    workflow = _fast(json.loads((REPO / "workflows" / name).read_text()))
    before = set((base / "output").rglob("*.psd")) if (base / "output").exists() else set()
    history = running.run(workflow)
    status = history["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success", errors
    written = set((base / "output").rglob("*.psd")) - before
    assert len(written) == 1
    from psd_tools import PSDImage

    psd = PSDImage.open(next(iter(written)))
    counts = [n["inputs"]["layers"] for n in workflow.values() if "layers" in n["inputs"]]
    leaves = [layer for layer in psd.descendants() if not layer.is_group()]
    # one decomposition, and with a split: one layer replaced by a group of its sub-layers
    assert len(leaves) == counts[0] + (counts[1] - 1 if len(counts) > 1 else 0)
    assert sum(1 for layer in psd.descendants() if layer.is_group()) == len(counts) - 1


def test_rerun_with_another_seed_writes_a_new_file_and_keeps_the_old(server):
    running, base = server
    workflow = _fast(json.loads((REPO / "workflows" / "image_to_layers.api.json").read_text()))
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


def _slow(workflow: dict, steps: int) -> dict:
    for node in workflow.values():
        if node["class_type"] == "QwenLayeredDecompose":
            node["inputs"]["steps"] = steps
            node["inputs"]["seed"] = 1000 + steps  # never cached
    return workflow


def _seconds_for(running, steps: int) -> float:
    workflow = _slow(json.loads((REPO / "workflows" / "image_to_layers.api.json").read_text()), steps)
    start = time.monotonic()
    assert running.run(workflow)["status"]["status_str"] == "success"
    return time.monotonic() - start


def test_cancel_stops_within_one_step(server):
    running, base = server
    # the loaders, encoding and caption are cached between these runs: the difference is 6 sampling steps
    step = (_seconds_for(running, 8) - _seconds_for(running, 2)) / 6
    workflow = _slow(json.loads((REPO / "workflows" / "image_to_layers.api.json").read_text()), 200)
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


@pytest.mark.parametrize("name", ["image_to_layers", "core_ksampler_interop", "split_layer"])
def test_ui_workflow_is_its_api_twin(server, tmp_path, name):
    """comfy-cli's UI -> API converter (what `comfy run` uses) turns each UI file into its API file."""
    running, base = server
    _comfy_cli()
    info = tmp_path / "object_info.json"
    info.write_text(json.dumps(running.get("/object_info")))
    script = (
        "import json, sys; from comfy_cli.workflow_to_api import convert_ui_to_api; "
        "print(json.dumps(convert_ui_to_api(json.load(open(sys.argv[1])), json.load(open(sys.argv[2])))))"
    )
    ui = REPO / "workflows" / f"{name}.ui.json"
    result = subprocess.run(
        [str(PYTHON), "-c", script, str(ui), str(info)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    converted = json.loads(result.stdout)
    expected = json.loads((REPO / "workflows" / f"{name}.api.json").read_text())
    assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in expected.items()
    }


def test_comfy_cli_runs_a_workflow(server, tmp_path):
    """`comfy run --workflow` on a UI-format file (made by workflows/ui_from_api.py, with 2 steps)."""
    import importlib.util

    running, base = server
    comfy = _comfy_cli()
    spec = importlib.util.spec_from_file_location("ui_from_api", REPO / "workflows" / "ui_from_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    workflow = _fast(json.loads((REPO / "workflows" / "image_to_layers.api.json").read_text()))
    workflow["9"]["inputs"]["seed"] = 77
    path = tmp_path / "workflow.ui.json"
    path.write_text(json.dumps(module.ui_from_api(workflow, running.get("/object_info"))))
    command = [str(comfy), "--skip-prompt", "--no-json", "run", "--workflow", str(path)]
    command += ["--host", "127.0.0.1", "--port", str(running.port), "--wait", "--timeout", "120"]
    env = {**os.environ, "DO_NOT_TRACK": "1", "COMFY_NO_WATCH": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


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
        history = lowvram.run(_fast(json.loads((REPO / "workflows" / "image_to_layers.api.json").read_text())))
        assert history["status"]["status_str"] == "success"
    finally:
        lowvram.stop()
