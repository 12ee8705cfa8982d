"""Shared fixtures: tiny random reference models from diffusers, the test oracle."""

from __future__ import annotations

import pytest
import torch

from layered_core.mmdit import MMDiTConfig
from layered_core.tiny_models import randomize_

torch.set_num_threads(max(1, torch.get_num_threads()))


def reference_transformer(config: MMDiTConfig, seed: int = 0):
    """diffusers' QwenImageTransformer2DModel configured as Qwen-Image-Layered, random weights."""
    from diffusers import QwenImageTransformer2DModel

    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    model = QwenImageTransformer2DModel(**kwargs)
    return randomize_(model, seed).eval()


class FakeTextEncoder:
    """Stands in for Qwen2.5-VL: deterministic embeddings per prompt, a caption naming the language and
    image size, and a ``model`` (a linear) that a VRAM budget can move. Records the prompts it encoded, the
    number of captions, and the device type its ``model`` was on at each ``encode``."""

    def __init__(self, dim: int):
        self.dim = dim
        self.model = torch.nn.Linear(dim, dim)
        self.prompts: list[str] = []
        self.captions = 0
        self.devices: list[str] = []

    def encode(self, prompts, max_sequence_length=512, truncate=False):
        self.prompts.extend(prompts)
        self.devices.append(self.model.weight.device.type)
        out = []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(sum(map(ord, prompt)) + len(prompt))
            out.append(torch.randn(1, max(1, len(prompt)), self.dim, generator=gen))
        return torch.cat(out), None

    def caption(self, image, language="en"):
        self.captions += 1
        assert image.mode == "RGBA"
        return f"caption {language} {image.size[0]}x{image.size[1]}"


@pytest.fixture(scope="session")
def tiny_config() -> MMDiTConfig:
    return MMDiTConfig.tiny()


@pytest.fixture(scope="session")
def tiny_reference(tiny_config):
    return reference_transformer(tiny_config)
