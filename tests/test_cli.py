"""The command line: inspect, selftest, tiny-models and decompose, in process and as a user runs it (a child
process with its output piped, interrupted with SIGINT)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layered_core import cli
from layered_core.checkpoints import save_mmdit
from layered_core.cli import main
from layered_core.pipeline import LayeredPipeline

REPO = Path(__file__).resolve().parents[1]
TEXT_ENCODER = "text_encoders/Qwen2.5-VL-7B-Instruct-tiny"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "layered_core", *args]


def run_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as a user runs it, output piped, with the common umask 022 (what files should honour)."""
    return subprocess.run(
        command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.umask(0o022)
    )


def noise_image(width: int, height: int, seed: int = 0, alpha: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        pixels[..., 3] = 0
        pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4, 3] = 255
    return Image.fromarray(pixels, "RGBA" if alpha else "RGB")


def test_inspect_reports_an_fp8_file(tmp_path, tiny_reference, tiny_config, capsys):
    path = save_mmdit(
        tiny_reference.state_dict(), tmp_path / "m.safetensors", layout="fp8-comfy-quant", config=tiny_config
    )
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["holds"] == "a Qwen-Image-Layered transformer"
    assert info["prefix"] == "model.diffusion_model."
    assert info["precision"] == "fp8"
    assert info["fp8_layers"] == 14 * tiny_config.num_layers  # 8 attention, 2 modulation, 4 MLP linears a block
    assert info["config"]["num_layers"] == tiny_config.num_layers
    assert "float8_e4m3fn" in info["dtypes"]


def test_inspect_names_a_bad_file_and_fails(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04N.")
    assert main(["inspect", str(bad)]) == 1
    assert "model.ckpt" in capsys.readouterr().err


def test_selftest_passes_from_the_command_line():
    result = subprocess.run(command("selftest"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 passed, 0 failed" in result.stdout


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from layered_core.tiny_models import write_tiny_set

    return write_tiny_set(tmp_path_factory.mktemp("models") / "Qwen-Image-Layered-tiny")


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    """``tiny-models`` run as a user runs it: a ComfyUI models folder."""
    models = tmp_path_factory.mktemp("comfy") / "models"
    result = run_command("tiny-models", str(models))
    assert result.returncode == 0, result.stderr
    return models


@pytest.fixture(scope="module")
def piped_run(comfy_models, tmp_path_factory):
    """``decompose --model <ComfyUI models folder>`` over two images, its output piped as in a job scheduler."""
    base = tmp_path_factory.mktemp("piped")
    images = base / "images"
    images.mkdir()
    noise_image(90, 60).save(images / "photo.png")
    noise_image(48, 48, seed=1, alpha=True).save(images / "logo.png")
    out = base / "out"
    result = run_command(
        "decompose", str(images), "--out", str(out), "--model", str(comfy_models), "--layers", "2", "--steps", "2",
        "--device", "cpu", "--prompt", "a test", "--format", "zip,png",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result, out, images


def test_decompose_command_reports_failures_and_resumes(tiny_folder, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(images / name)
    (images / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    out = tmp_path / "out"
    args = ["decompose", str(images), "--out", str(out), "--model", str(tiny_folder), "--layers", "2"]
    args += ["--steps", "1", "--device", "cpu", "--dtype", "fp32", "--prompt", "a test", "--format", "psd,png"]

    assert main(args) == 1  # one image failed
    printed = capsys.readouterr()
    assert "2 done, 0 skipped (already done), 1 failed" in printed.out
    assert "c.png: failed: not a readable image" in printed.err
    assert sorted(p.name for p in (out / "a").iterdir()) == ["done.json", "layer_01.png", "layer_02.png", "layers.psd"]
    assert not (out / "c").exists()

    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(images / "c.png")
    assert main(args) == 0
    assert "1 done, 2 skipped (already done), 0 failed" in capsys.readouterr().out
    assert (out / "c" / "done.json").exists()


def test_decompose_command_refuses_bad_arguments(tiny_folder, tmp_path, capsys):
    base = ["decompose", str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    assert main([*base, "--layers", "0"]) == 2
    assert "--layers must be an integer from 1 to 20, got 0" in capsys.readouterr().err
    assert main([*base, "--split-layers", "21"]) == 2
    assert "--split-layers must be an integer from 1 to 20, got 21" in capsys.readouterr().err
    assert main([*base, "--format", "tiff"]) == 2
    assert "--format takes one or more of psd, zip, png; got tiff" in capsys.readouterr().err
    assert main([*base]) == 2  # an empty folder
    assert "no images found" in capsys.readouterr().err
    missing = ["decompose", str(tmp_path / "nope.png"), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    assert main(missing) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_decompose_needs_a_text_encoder_and_a_real_device(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    base = ["decompose", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    assert main([*base, "--transformer", "t.safetensors", "--vae", "v.safetensors", "--device", "cpu"]) == 2
    assert "no text encoder" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main([*base, "--model", str(tmp_path), "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err


class Loaded(Exception):
    """Raised instead of loading the models: the command got past every check."""


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(LayeredPipeline, "from_files", refuse)


def test_help_shows_defaults_and_the_name_typed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/layered-core", "decompose", "--help"])
    assert main(["decompose", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage: layered-core decompose ")
    for flag, default in (("--steps", "50"), ("--cfg", "4.0"), ("--resolution", "640"), ("--layers", "4")):
        assert re.search(rf"{flag} \S+ [^()]*\(default {re.escape(default)}\)", text), flag
    monkeypatch.setattr(sys, "argv", [str(REPO / "layered_core" / "__main__.py")])
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: {Path(sys.executable).name} -m layered_core ")


def test_what_cannot_work_is_refused_before_any_model_loads(tiny_folder, tmp_path, capsys, no_loading):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "taken.png").write_bytes(b"a file, not a folder")
    no_processor = tmp_path / "te"
    shutil.copytree(tiny_folder, no_processor, ignore=shutil.ignore_patterns("processor", "transformer", "vae"))
    models = ["--transformer", str(tiny_folder), "--vae", str(tiny_folder)]
    base = ["decompose", str(tmp_path / "a.png"), "--device", "cpu", "--model", str(tiny_folder)]
    out = ["--out", str(tmp_path / "out")]

    def refused(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err

    taken = tmp_path / "taken.png"
    assert f"--out {taken}: is a file; --out takes a folder" in refused(*base, "--out", str(taken))
    assert "--split-depth must be an integer of 0 or more" in refused(*base, *out, "--split-depth", "-1")
    assert "--device tpu: expected auto, cpu, cuda, cuda:N or mps" in refused(*base, *out, "--device", "tpu")
    no_caption = ["decompose", str(tmp_path / "a.png"), *out, *models, "--text-encoder", str(no_processor)]
    message = refused(*no_caption)
    assert f"--text-encoder {no_processor}: no processor/" in message and "--prompt is empty" in message
    assert "--split-depth captions every layer" in refused(*no_caption, "--prompt", "x", "--split-depth", "1")
    with pytest.raises(Loaded):  # with a prompt no caption is needed: on to loading
        main([*no_caption, "--prompt", "x"])


def test_an_interruption_while_loading_is_one_line_and_130(tiny_folder, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LayeredPipeline, "from_files", interrupted)
    args = ["decompose", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    assert main([*args, "--device", "cpu", "--prompt", "x"]) == 130
    err = capsys.readouterr().err
    assert err.endswith(
        "loading models on cpu\ninterrupted: finished images are kept; run the same command again to go on\n"
    )
    monkeypatch.setattr(cli, "write_comfy_models", interrupted)
    assert main(["tiny-models", str(tmp_path / "models")]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_an_interruption_while_starting_is_one_line_and_130():
    # half a second in, torch and the package are still importing (or, on a fast machine, selftest has begun)
    child = subprocess.Popen(command("selftest"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert (child.returncode, err) == (130, "interrupted\n")


def test_a_failed_image_is_reported_once(tiny_folder, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    args = ["decompose", str(tmp_path / "broken.png"), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    args += ["--device", "cpu", "--prompt", "x"]
    assert main(args) == 1
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("not a readable image") == 1
    assert "Traceback" not in printed.out + printed.err
    assert printed.out == "0 done, 0 skipped (already done), 1 failed\n"
    assert main([*args, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ImageError" in err


def test_tiny_models_and_decompose_write_files_anyone_may_read(comfy_models, piped_run):
    _, out, _ = piped_run
    for folder in (comfy_models, out):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files
        modes = {str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert {name: mode for name, mode in modes.items() if mode != "0o644"} == {}


def test_without_a_terminal_progress_comes_as_plain_lines(piped_run):
    result, out, images = piped_run
    assert "\r" not in result.stderr and "\033" not in result.stderr  # no bar drawn into a log
    lines = result.stderr.splitlines()
    assert "loading models on cpu" in lines
    label = f"[1/2] {images / 'logo.png'}"
    for stage in ("encoding the image and the prompt", "sampling, step 1/2", "decoding"):
        assert f"{label}: {stage}" in lines
    assert any(re.fullmatch(rf"{re.escape(label)}: sampling, step 2/2, \d+\.\d\d s/step", line) for line in lines)
    assert f"{label}: writing zip, png" in lines
    assert any(
        re.fullmatch(rf"{re.escape(label)}: done in .+ s -> {re.escape(str(out / 'logo'))}; 1 left, about .+ s", s)
        for s in lines
    )
    assert result.stdout == "2 done, 0 skipped (already done), 0 failed\n"


def test_a_comfyui_models_folder_is_searched_by_content_and_the_choice_said(comfy_models, piped_run):
    result, out, _ = piped_run
    assert f"models from {comfy_models} (a ComfyUI models folder):" in result.stderr
    assert "  transformer: diffusion_models/qwen_image_layered_bf16.safetensors (bf16); also there: " in result.stderr
    assert "qwen_image_layered_fp8mixed.safetensors (fp8) (pass --transformer FILE to use another)" in result.stderr
    assert f"  text encoder: {TEXT_ENCODER} (with processor/)" in result.stderr
    settings = json.loads((out / "photo" / "done.json").read_text())["settings"]
    assert settings["transformer"] == str(comfy_models / "diffusion_models/qwen_image_layered_bf16.safetensors")
    assert settings["vae"] == str(comfy_models / "vae/qwen_image_layered_vae.safetensors")


def test_inspect_describes_a_text_encoder_folder_and_the_vae(comfy_models, capsys):
    assert main(["inspect", str(comfy_models / TEXT_ENCODER)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["holds"] == "a text encoder (Qwen2.5-VL)"
    assert (info["layers"], info["width"], info["attention_heads"]) == (2, 48, 4)
    assert info["vision_tower"]["blocks"] == 2 and info["vision_tower"]["width"] == 32
    assert info["processor"] == str(comfy_models / TEXT_ENCODER / "processor") and info["captions"] is True
    assert main(["inspect", str(comfy_models / "vae/qwen_image_layered_vae.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["holds"] == "the RGBA-VAE of Qwen-Image-Layered"
    assert info["layout"] == "Wan names (ComfyUI's single file)"
    assert (info["image_channels"], info["latent_channels"], info["downsampling"]) == (4, 16, 8)
    assert info["latent_size"] == "a 640x640 image -> 16x80x80"


def test_a_folder_of_subfolders_offers_recursive(tiny_folder, tmp_path, capsys, no_loading):
    for sub in ("day1", "day2"):
        (tmp_path / "photos" / sub).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "photos" / sub / "a.png")
    args = ["decompose", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    args += ["--device", "cpu", "--prompt", "x"]
    assert main(args) == 2
    assert "no images found in " in (err := capsys.readouterr().err) and "subfolders hold 2: pass --recursive" in err
    with pytest.raises(Loaded):
        main([*args, "--recursive"])


def test_ctrl_c_during_a_split_leaves_nothing_that_looks_finished(comfy_models, tmp_path):
    noise_image(64, 64).save(tmp_path / "poster.png")
    out = tmp_path / "out"
    args = ["decompose", str(tmp_path / "poster.png"), "--out", str(out), "--model", str(comfy_models)]
    args += ["--layers", "2", "--steps", "1", "--device", "cpu", "--prompt", "x", "--split-depth", "1"]
    child = subprocess.Popen(command(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(child.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    # in the split: announced, or (without the announcement) the unsplit layers already written
    while not any("splitting layer" in line for line in err_lines) and not list(out.rglob("layers.psd")):
        assert child.poll() is None and time.monotonic() < deadline, "".join(err_lines)
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=60) == 130
    reader.join(timeout=10)
    err = "".join(err_lines)
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "interrupted: finished images are kept; run the same command again to go on"
    assert [str(p.relative_to(out)) for p in out.rglob("*")] == []
    assert child.stdout.read() == ""


def test_the_license_is_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


# --------------------------------------------------------------------------- ComfyUI's single-file text encoder

TEXT_ENCODER_FILE = "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"


@pytest.fixture(scope="module")
def comfy_single_file(comfy_models, tmp_path_factory):
    """A ComfyUI folder whose only text encoder is the single file, with ComfyUI's own tokenizer (the tiny one)."""
    root = tmp_path_factory.mktemp("single") / "ComfyUI"
    shutil.copytree(comfy_models, root / "models", ignore=shutil.ignore_patterns(Path(TEXT_ENCODER).name))
    shutil.copytree(comfy_models / TEXT_ENCODER / "tokenizer", root / "comfy/text_encoders/qwen25_tokenizer")
    return root


def test_a_comfyui_folder_with_the_single_file_is_all_decompose_needs(comfy_single_file, tmp_path, capsys):
    noise_image(48, 40).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["decompose", str(tmp_path / "a.png"), "--out", str(out), "--model", str(comfy_single_file / "models")]
    # no --prompt: the auto-caption runs on the file's head
    assert main([*args, "--layers", "2", "--steps", "1", "--device", "cpu", "--format", "png"]) == 0
    err = capsys.readouterr().err
    assert f"  text encoder: {TEXT_ENCODER_FILE} (fp8 single file)" in err
    settings = json.loads((out / "a" / "done.json").read_text())["settings"]
    assert settings["text_encoder"] == str(comfy_single_file / "models" / TEXT_ENCODER_FILE)
    assert settings["tokenizer"] == str(comfy_single_file / "comfy/text_encoders/qwen25_tokenizer")
    assert settings["fp8"] == "keep" and settings["prompt"] is None


def test_single_file_mistakes_are_refused_before_loading(comfy_models, tmp_path, capsys, no_loading):
    from layered_core.checkpoints.text_encoder import save_text_encoder_file
    from layered_core.tiny_models import tiny_text_encoder_set

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    model = tiny_text_encoder_set()[0]
    headless = save_text_encoder_file(model, tmp_path / "headless.safetensors", fp8=True, lm_head=False)
    base = ["decompose", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    base += ["--transformer", str(comfy_models / "diffusion_models/qwen_image_layered_bf16.safetensors")]
    base += ["--vae", str(comfy_models / "vae/qwen_image_layered_vae.safetensors")]
    tokenizer = ["--tokenizer", str(comfy_models / TEXT_ENCODER)]

    def refused(*args: str) -> str:
        assert main([*base, *args]) == 2
        return capsys.readouterr().err

    message = refused("--text-encoder", str(headless), *tokenizer)
    assert f"--text-encoder {headless}: holds no language-model head (lm_head.weight)" in message
    assert "needs it (--prompt is empty): use a text encoder that holds it, or pass --prompt" in message
    assert "holds no tokenizer (ComfyUI keeps it in its own comfy/text_encoders/qwen25_tokenizer)" in refused(
        "--text-encoder", str(headless), "--prompt", "x"
    )
    folder = comfy_models / TEXT_ENCODER
    assert "is a folder with its own tokenizer" in refused("--text-encoder", str(folder), *tokenizer, "--prompt", "x")
    with pytest.raises(Loaded):  # a prompt needs no head
        main([*base, "--text-encoder", str(headless), *tokenizer, "--prompt", "x"])


def test_inspect_describes_the_single_file(comfy_single_file, capsys):
    assert main(["inspect", str(comfy_single_file / "models" / TEXT_ENCODER_FILE)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["holds"] == "a text encoder (Qwen2.5-VL), ComfyUI's single file"
    assert (info["precision"], info["fp8_layers"], info["lm_head"], info["captions"]) == ("fp8", 26, True, True)
    assert (info["layers"], info["width"], info["attention_heads"], info["key_value_heads"]) == (2, 48, 4, 2)
    assert info["vision_tower"] == {"blocks": 2, "width": 32} and info["vocabulary"] == 908
    assert info["tokenizer"] == str(comfy_single_file / "comfy/text_encoders/qwen25_tokenizer")
    assert main(["inspect", str(comfy_single_file / "models")]) == 0
    assert json.loads(capsys.readouterr().out)["text_encoder"]["holds"].endswith("ComfyUI's single file")
