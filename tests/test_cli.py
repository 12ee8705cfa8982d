"""The command line: inspect and selftest."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert "6 passed, 0 failed" in result.stdout
