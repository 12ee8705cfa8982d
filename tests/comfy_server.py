"""A real ComfyUI server for the integration tests (tests/test_comfyui.py, tests/test_comfyui_queue.py,
tests/test_browser.py): started from ${COMFYUI_PATH:-$HOME/ComfyUI} with its own .venv, on a temporary base
directory that holds this pack (symlinked into custom_nodes), tiny random models under the real file names, and
the input files the shared workflows read; a websocket client of it; and what the save nodes report."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import posixpath
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import websocket
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
COMFYUI = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
PYTHON = COMFYUI / ".venv" / "bin" / "python"
BATCH = "batch"  # the input folder of the batch workflow (workflows/batch_folder)
# the images write_inputs puts there, by name, and their size (width, height) once EXIF orientation is applied
BATCH_SIZES = {"cutout": (128, 72), "photo": (80, 112)}
SAVE_NODES = {"QwenLayeredSavePSD", "QwenLayeredSaveLayerPNGs"}
TRANSPARENT = "transparent.png"  # in input/: an RGBA PNG for core's LoadImage (its alpha in LoadImage's MASK)


def ui_from_api_module():
    """workflows/ui_from_api.py (a script beside the workflows, in no package) as a module."""
    spec = importlib.util.spec_from_file_location("ui_from_api", REPO / "workflows" / "ui_from_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_comfyui() -> str | None:
    """Why no server can be started here, or None."""
    if not (COMFYUI / "main.py").is_file() or not PYTHON.is_file():
        return f"no ComfyUI checkout with a .venv at {COMFYUI} (set COMFYUI_PATH to run the integration tests)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(base: Path, prepare: Callable[[Path], None] | None = None, **options) -> Iterator[Server]:
    """A Server (with ``options``) on a new base directory (:func:`prepare_base`, then ``prepare(base)``), stopped
    afterwards; the link to this pack goes with it, so nothing that cleans up the base later reaches the
    repository through it."""
    prepare_base(base)
    if prepare is not None:
        prepare(base)
    running = Server(base, **options)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(base / "custom_nodes", ignore_errors=True)


def prepare_base(base: Path) -> None:
    """A ComfyUI base directory: this pack in custom_nodes, the tiny models in models, the inputs in input."""
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
    write_inputs(base / "input")


def write_inputs(input_dir: Path) -> None:
    """input/example.png (the single-image workflows' input), input/transparent.png (an RGBA picture with a
    transparent strip and soft alpha) and the batch folder."""
    input_dir.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (72, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(input_dir / "example.png")
    Image.fromarray(transparent_pixels(96, 64, seed=3), "RGBA").save(input_dir / TRANSPARENT)
    batch_folder(input_dir / BATCH)


def transparent_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """Seeded uint8 RGBA noise whose left quarter is fully transparent and the rest of soft alpha."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[:, : width // 4, 3] = 0
    return pixels


def batch_folder(folder: Path) -> None:
    """Two images of different sizes and modes (an RGBA PNG, an RGB JPEG stored on its side with an EXIF
    orientation) and a file that is no image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    cutout = rng.integers(0, 256, (72, 128, 4), dtype=np.uint8)
    cutout[:, :32, 3] = 0  # a transparent strip, and soft alpha elsewhere
    Image.fromarray(cutout, "RGBA").save(folder / "cutout.png")
    photo = Image.fromarray(rng.integers(0, 256, (80, 112, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display, so 112x80 shows as 80x112
    photo.save(folder / "photo.jpg", quality=95, exif=exif)
    (folder / "notes.txt").write_text("not an image\n")


class Server:
    """ComfyUI on the CPU (or with --lowvram) on a free port of 127.0.0.1, its log in base/comfyui.log."""

    def __init__(self, base: Path, extra_args=(), env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "comfyui.log"
        # --cpu and --lowvram exclude each other; without a GPU ComfyUI runs on the CPU either way
        device = [] if "--lowvram" in extra_args else ["--cpu"]
        command = [str(PYTHON), "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port)]
        command += ["--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        self.process = subprocess.Popen(
            [*command, *extra_args],
            cwd=COMFYUI,
            env={**os.environ, **(env or {})},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
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
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.load(response)

    def post(self, path: str, data: dict):
        request = urllib.request.Request(
            f"{self.url}{path}", json.dumps(data).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_for(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a queued prompt, once it has finished (with success or an error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, workflow: dict, timeout: float = 300) -> dict:
        return self.wait_for(self.post("/prompt", {"prompt": workflow})["prompt_id"], timeout)

    def resident_bytes(self) -> int:
        """The server process's resident memory (VmRSS), in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.process.pid}/status")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Listener:
    """A websocket client of a Server, as a program driving it would be: prompts queued under its client id,
    so the server sends it their progress; :meth:`receive` gives each JSON message as (type, data). Binary
    messages (latent previews) are given as ("binary", None)."""

    def __init__(self, server: Server, timeout: float = 120):
        self.server = server
        self.client_id = uuid.uuid4().hex
        self.socket = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=timeout
        )

    def queue(self, workflow: dict) -> str:
        """POST /prompt under this client's id; the prompt's id."""
        return self.server.post("/prompt", {"prompt": workflow, "client_id": self.client_id})["prompt_id"]

    def receive(self) -> tuple[str, dict | None]:
        message = self.socket.recv()
        if isinstance(message, bytes):
            return "binary", None
        parsed = json.loads(message)
        return parsed["type"], parsed.get("data")

    def close(self) -> None:
        self.socket.close()


# the messages after which ComfyUI runs nothing more of a prompt
PROMPT_ENDS = {"execution_success", "execution_error", "execution_interrupted"}


def messages_until_done(listener: Listener, prompt_id: str, timeout: float = 300) -> list[tuple[str, dict | None]]:
    """Every JSON message about ``prompt_id`` (its data naming it) until it ends."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        kind, data = listener.receive()
        if data and data.get("prompt_id") == prompt_id:
            seen.append((kind, data))
            if kind in PROMPT_ENDS:
                return seen
    raise TimeoutError(f"prompt {prompt_id} did not end in {timeout} s; seen {[kind for kind, _ in seen]}")


def layer_files(base: Path) -> set[Path]:
    """The PSDs and PNG zips in a base directory's output folder."""
    output = base / "output"
    return {path for suffix in ("*.psd", "*.zip") for path in output.rglob(suffix)} if output.exists() else set()


def reported_files(workflow: dict, history: dict, output_dir: Path) -> list[Path]:
    """The files the save nodes of ``workflow`` listed under "files" in their /history output, as paths in
    ``output_dir``. Each save node lists its files (type "output", as core's SaveImage lists its images), shows
    each as the text "saved <subfolder>/<filename>" and previews each as one image in the temp folder."""
    reported = []
    for node_id, node in workflow.items():
        if node["class_type"] not in SAVE_NODES:
            continue
        output = history["outputs"][node_id]
        files = output["files"]
        assert files and all(entry["type"] == "output" for entry in files), output
        assert output["text"] == [f"saved {posixpath.join(f['subfolder'], f['filename'])}" for f in files], output
        assert len(output["images"]) == len(files) and {i["type"] for i in output["images"]} == {"temp"}, output
        reported += [output_dir / entry["subfolder"] / entry["filename"] for entry in files]
    return reported
