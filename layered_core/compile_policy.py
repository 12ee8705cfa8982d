"""Whether to ``torch.compile`` the transformer's blocks, and the caption decoder's step, for a run: on where it
pays back within the run, off by itself where it cannot (no CUDA GPU, a GPU Triton does not support, too few steps
or captions). Streamed blocks (a VRAM budget) compile like resident ones.

The figures behind the choice (a compiled step against an eager one, the first call from a cold and from a warm
cache) are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util

import torch

COMPILE_SETTINGS = ("auto", "on", "off")

MIN_COMPILED_STEPS = 8
"""Below this many sampling steps a run cannot win back even a warm cache's compilation."""

MIN_COMPILED_CAPTIONS = 20
"""Below this many auto-captions a run cannot win back the caption step's compilation: even from a warm cache its
first call takes longer than the uncompiled step's by about as much as twenty captions save (the figures are in
benchmarks/RESULTS.md)."""

MIN_CAPABILITY = (7, 0)
"""The oldest CUDA compute capability Triton generates code for."""


def compile_choice(setting: str, device: str | torch.device, steps: int | None) -> tuple[bool, str]:
    """(compile or not, why) for ``--compile`` ``setting`` (auto, on or off) on ``device``, for decompositions
    of ``steps`` sampling steps (None: a long-lived process such as ComfyUI's, where the compiled code serves
    every later run)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if setting == "off":
        return False, "off, as asked"
    if setting == "on":
        return True, "on, as asked"
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"off: compiling pays on a CUDA GPU, and this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return False, f"off: compute capability {capability[0]}.{capability[1]} is older than Triton supports"
    if importlib.util.find_spec("triton") is None:
        return False, "off: Triton is not installed"
    if steps is not None and steps < MIN_COMPILED_STEPS:
        return False, f"off: {steps} steps are too few to win back the compilation"
    return True, "on: a CUDA GPU with Triton and enough steps to win the compilation back"


def caption_compile_choice(setting: str, device: str | torch.device, captions: int | None) -> tuple[bool, str]:
    """(compile the caption decoder's step or not, why) for ``setting`` (auto, on or off) on ``device``, for a run
    of ``captions`` auto-captions (None: a long-lived process such as ComfyUI's)."""
    if setting in ("auto", "on") and captions == 0:
        return False, "off: no auto-caption in this run"
    # the device's checks first, so that a CPU run says why it never compiles
    compiled, why = compile_choice(setting, device, None)
    if not compiled or setting != "auto":
        return compiled, why
    if captions is not None and captions < MIN_COMPILED_CAPTIONS:
        return False, f"off: {captions} auto-caption{'s' * (captions != 1)} cannot win back the compilation"
    return True, "on: a CUDA GPU with Triton and enough captions to win the compilation back"
