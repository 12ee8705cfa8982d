"""Shared fixtures: tiny random reference models from diffusers, the test oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.layers import Layer, LayerStack, attach_split
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.pipeline import LayeredPipeline
from layered_core.synthetic import synthetic_design
from layered_core.tiny_models import randomize_
from layered_core.vae import RGBAVAE, VAEConfig

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


UNICODE_NAME = "Überschrift 标题 🎨"


def halves(layer, names):
    """A two-layer sub-stack of ``layer``'s pixels (top and bottom half), as a second split would give."""
    middle = layer.height // 2
    return LayerStack(
        layer.width,
        layer.height,
        (Layer(layer.pixels[:middle], names[0]), Layer(layer.pixels[middle:], names[1], (0, middle))),
    )


@pytest.fixture(scope="module")
def tree():
    """A design with a Unicode name, a split layer, a split inside the split, and an empty layer."""
    stack = synthetic_design(160, 120, layer_count=6, seed=11)
    stack = stack.with_layer(1, stack[1].replace(name=UNICODE_NAME))
    stack = attach_split(stack, 3, halves(stack[3], ("upper", "lower")))
    stack = attach_split(stack, (3, 1), halves(stack[(3, 1)], ("lower top", "lower bottom")))
    empty = Layer(np.zeros((5, 5, 4), np.uint8), "nothing", (3, 3))
    return LayerStack(stack.width, stack.height, stack.layers + (empty,))


@pytest.fixture(scope="module")
def pipeline():
    """The tiny transformer and VAE with seeded weights and the fake text encoder."""
    torch.manual_seed(0)
    transformer = VLDMMDiT(MMDiTConfig.tiny()).eval().requires_grad_(False)
    vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
    return LayeredPipeline(transformer, vae, FakeTextEncoder(MMDiTConfig.tiny().text_dim))


def picture(width=100, height=60, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
