"""The command line: inspect and selftest."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from layered_core.checkpoints import save_mmdit
from layered_core.cli import main


def test_inspect_reports_an_fp8_file(tmp_path, tiny_reference, tiny_config, capsys):
    path = save_mmdit(
        tiny_reference.state_dict(), tmp_path / "m.safetensors", layout="fp8-comfy-quant", config=tiny_config
    )
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["holds"] == "a Qwen-Image-Layered transformer"
    assert info["prefix"] == "model.diffusion_model."
    assert info["fp8_layers"] == 14 * tiny_config.num_layers  # 8 attention, 2 modulation, 4 MLP linears a block
    assert info["config"]["num_layers"] == tiny_config.num_layers
    assert "float8_e4m3fn" in info["dtypes"]


def test_inspect_names_a_bad_file_and_fails(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04N.")
    assert main(["inspect", str(bad)]) == 1
    assert "model.ckpt" in capsys.readouterr().err


def test_selftest_passes_from_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "layered_core", "selftest"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 passed, 0 failed" in result.stdout


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from layered_core.tiny_models import write_tiny_set

    return write_tiny_set(tmp_path_factory.mktemp("models") / "Qwen-Image-Layered-tiny")


def test_decompose_command_reports_failures_and_resumes(tiny_folder, tmp_path, capsys):
    from PIL import Image

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
    assert "c.png" in printed.out and "not a readable image" in printed.out
    assert sorted(p.name for p in (out / "a").iterdir()) == ["done.json", "layer_01.png", "layer_02.png", "layers.psd"]
    assert not (out / "c").exists()

    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(images / "c.png")
    assert main(args) == 0
    assert "1 done, 2 skipped (already done), 0 failed" in capsys.readouterr().out
    assert (out / "c" / "done.json").exists()


def test_decompose_command_refuses_bad_arguments(tiny_folder, tmp_path, capsys):
    base = ["decompose", str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    assert main([*base, "--layers", "0"]) == 2
    assert "layer count must be an integer from 1 to 20" in capsys.readouterr().err
    assert main([*base, "--split-layers", "21"]) == 2
    assert "--split-layers must be an integer from 1 to 20, got 21" in capsys.readouterr().err
    assert main([*base, "--format", "tiff"]) == 2
    assert "--format takes psd, zip, png" in capsys.readouterr().err
    assert main([*base]) == 2  # an empty folder
    assert "no images found" in capsys.readouterr().err
    missing = ["decompose", str(tmp_path / "nope.png"), "--out", str(tmp_path / "out"), "--model", str(tiny_folder)]
    assert main(missing) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_decompose_needs_a_text_encoder_and_a_real_device(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    base = ["decompose", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    assert main([*base, "--transformer", "t.safetensors", "--vae", "v.safetensors", "--device", "cpu"]) == 2
    assert "no text encoder" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main([*base, "--model", str(tmp_path), "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
