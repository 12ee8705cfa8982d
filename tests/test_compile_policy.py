"""When a run compiles the transformer's blocks: on where it pays, off by itself where it cannot, as asked."""

import pytest
import torch

from layered_core.compile_policy import (
    MIN_COMPILED_CAPTIONS,
    MIN_COMPILED_STEPS,
    caption_compile_choice,
    compile_choice,
)


def test_auto_is_off_on_the_cpu():
    assert compile_choice("auto", "cpu", 50) == (False, "off: compiling pays on a CUDA GPU, and this run is on cpu")


def test_on_and_off_are_obeyed():
    assert compile_choice("on", "cpu", 1) == (True, "on, as asked")
    assert compile_choice("off", "cuda", 50) == (False, "off, as asked")
    with pytest.raises(ValueError, match="expected one of auto, on, off"):
        compile_choice("sometimes", "cpu", 50)


def test_auto_on_a_cuda_gpu_weighs_the_steps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert compile_choice("auto", "cuda", MIN_COMPILED_STEPS)[0]
    compiled, why = compile_choice("auto", "cuda", MIN_COMPILED_STEPS - 1)
    assert not compiled and f"{MIN_COMPILED_STEPS - 1} steps are too few" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert compile_choice("auto", "cuda", 50) == (False, "off: compute capability 6.1 is older than Triton supports")
    # a long-lived process (ComfyUI) passes no step count: its compiled code serves later runs too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert compile_choice("auto", "cuda", None)[0]
    assert compile_choice("auto", "cpu", None)[0] is False


def test_the_caption_step_compiles_for_enough_captions(monkeypatch):
    assert caption_compile_choice("auto", "cpu", 50) == (
        False,
        "off: compiling pays on a CUDA GPU, and this run is on cpu",
    )
    assert caption_compile_choice("on", "cpu", 1) == (True, "on, as asked")
    assert caption_compile_choice("on", "cuda", 0) == (False, "off: no auto-caption in this run")
    assert caption_compile_choice("off", "cuda", None) == (False, "off, as asked")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert caption_compile_choice("auto", "cuda", 1) == (False, "off: 1 auto-caption cannot win back the compilation")
    assert caption_compile_choice("auto", "cuda", MIN_COMPILED_CAPTIONS) == (
        True,
        "on: a CUDA GPU with Triton and enough captions to win the compilation back",
    )
    # ComfyUI's long-lived process: every later caption runs the compiled step
    assert caption_compile_choice("auto", "cuda", None)[0]
