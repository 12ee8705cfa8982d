"""The decomposition pipeline on tiny random models: shapes, options, recursion and the batch runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.batch import BatchSettings, find_images, run_batch
from layered_core.layers import LayerStack, composite, render_layer
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.pipeline import DecomposeOptions, Decomposition, LayeredPipeline
from layered_core.vae import RGBAVAE, VAEConfig


class FakeTextEncoder:
    """Stands in for Qwen2.5-VL: deterministic embeddings per prompt, a fixed caption."""

    def __init__(self, dim: int):
        self.dim = dim
        self.prompts: list[str] = []
        self.captions = 0

    def encode(self, prompts, max_sequence_length=512, truncate=False):
        self.prompts.extend(prompts)
        out = []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(sum(map(ord, prompt)) + len(prompt))
            out.append(torch.randn(1, max(1, len(prompt)), self.dim, generator=gen))
        return torch.cat(out), None

    def caption(self, image, language="en"):
        self.captions += 1
        assert image.mode == "RGBA"
        return f"caption {language} {image.size[0]}x{image.size[1]}"


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    transformer = VLDMMDiT(MMDiTConfig.tiny()).eval().requires_grad_(False)
    vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
    return LayeredPipeline(transformer, vae, FakeTextEncoder(MMDiTConfig.tiny().text_dim))


def picture(width=100, height=60, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


FAST = DecomposeOptions(layers=3, steps=2, resolution=640)


def test_decomposition_shapes_and_caption(pipeline):
    encoder = pipeline.text_encoder
    result = pipeline(picture(), prompt="", options=FAST)
    # 100x60 -> 640 bucket: 826.3 x 495.8 rounded to multiples of 32 = 832x480
    assert result.layers.shape == (3, 4, 480, 832) and result.composite.shape == (4, 480, 832)
    assert result.layers.min() >= 0 and result.layers.max() <= 1
    assert result.prompt == "caption en 832x480" and encoder.captions == 1
    assert encoder.prompts[-2:] == ["caption en 832x480", " "]  # then the negative prompt
    assert set(result.seconds) == {"encode image", "text", "sampling", "decode"}
    stack = result.stack()
    assert len(stack.layers) == 3 and stack.size == (832, 480)


def test_same_seed_same_layers_other_seed_other_layers(pipeline):
    a = pipeline(picture(), "a poster", DecomposeOptions(layers=1, steps=2, seed=5))
    b = pipeline(picture(), "a poster", DecomposeOptions(layers=1, steps=2, seed=5))
    c = pipeline(picture(), "a poster", DecomposeOptions(layers=1, steps=2, seed=6))
    assert torch.equal(a.layers, b.layers)
    assert not torch.equal(a.layers, c.layers)


def test_layers_at_input_size(pipeline):
    result = pipeline(picture(123, 77), "x", DecomposeOptions(layers=2, steps=1, keep_input_size=True))
    assert result.layers.shape == (2, 4, 77, 123) and result.composite.shape == (4, 77, 123)


def test_impossible_layer_count_is_refused(pipeline):
    with pytest.raises(ValueError, match="layer count must be an integer from 1 to 20"):
        pipeline(picture(), "x", DecomposeOptions(layers=21, steps=1))


def test_no_text_encoder_with_empty_prompt_is_named():
    bare = LayeredPipeline(VLDMMDiT(MMDiTConfig.tiny()), RGBAVAE(VAEConfig.tiny()), None)
    with pytest.raises(ValueError, match="no text encoder is loaded to caption"):
        bare(picture(), "", FAST)


class HalvesPipeline(LayeredPipeline):
    """Splits any RGBA image into its left and right halves: an exact decomposition."""

    def __init__(self):
        super().__init__(None, None, None)
        self.seen = []

    def __call__(self, image, prompt=None, options=None, callback=None, prompt_embeddings=None):
        self.seen.append((image.size, options.layers, options.keep_input_size))
        rgba = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        left, right = rgba.clone(), rgba.clone()
        half = rgba.shape[2] // 2
        left[:, :, half:] = 0
        right[:, :, :half] = 0
        return Decomposition(torch.stack([left, right]), rgba, prompt or "")


def test_split_builds_a_tree_that_flattens_to_the_parent():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    pixels[..., 3] = rng.integers(1, 256, (40, 50), dtype=np.uint8)
    from layered_core.layers import Layer

    background = Layer(np.full((60, 80, 4), 255, np.uint8), "Background")
    stack = LayerStack(80, 60, (background, Layer(pixels, "Logo", offset=(12, 9))))
    pipe = HalvesPipeline()
    split = pipe.split(stack, 1, 2)
    assert pipe.seen == [((50, 40), 2, True)]  # the layer's own pixels, at their own size
    logo = split.get(1)
    assert [c.name for c in logo.children] == ["Logo / 1", "Logo / 2"]
    assert logo.children[0].offset == (12, 9) and logo.children[1].offset == (37, 9)
    # flattening the tree redraws the parent layer, and the whole composite is unchanged
    assert np.abs(composite(split).astype(int) - composite(stack).astype(int)).max() <= 1
    # depth 2: split a sub-layer; a depth limit stops a third level
    deeper = pipe.split(split, (1, 0), 2, max_depth=2)
    assert len(deeper.get((1, 0)).children) == 2
    with pytest.raises(ValueError, match="limited to depth 2"):
        pipe.split(deeper, (1, 0, 0), 2, max_depth=2)
    with pytest.raises(ValueError, match="already split"):
        pipe.split(split, 1, 2)


def test_split_refuses_an_empty_layer():
    from layered_core.layers import Layer

    stack = LayerStack(20, 20, (Layer(np.zeros((20, 20, 4), np.uint8), "Empty"),))
    with pytest.raises(ValueError, match="empty or smaller"):
        HalvesPipeline().split(stack, 0, 2)


def test_split_with_the_real_models_keeps_position(pipeline):
    result = pipeline(picture(), "x", DecomposeOptions(layers=2, steps=1))
    stack = result.stack()
    layer = stack.get(0)
    split = pipeline.split(stack, 0, 2, prompt="part", options=DecomposeOptions(steps=1))
    children = split.get(0).children
    assert len(children) == 2
    for child in children:
        x0, y0, x1, y1 = child.box
        assert layer.box[0] <= x0 and layer.box[1] <= y0 and x1 <= layer.box[2] and y1 <= layer.box[3]
    assert render_layer(split.get(0), stack.width, stack.height).shape == (stack.height, stack.width, 4)


def test_batch_runs_skips_and_reports_failures(pipeline, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(2):
        picture(64, 48, seed=index).save(inputs / f"good{index}.png")
    (inputs / "broken.png").write_bytes(b"not an image at all")
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    images = find_images([inputs])
    assert [p.name for p in images] == ["broken.png", "good0.png", "good1.png"]
    settings = BatchSettings(DecomposeOptions(layers=2, steps=1), prompt="a test", formats=("psd", "zip", "png"))
    out = tmp_path / "out"
    first = run_batch(pipeline, images, out, settings)
    assert [p.name for p in first.done] == ["good0.png", "good1.png"]
    assert list(first.failed) == [images[0]] and "not a readable image" in first.failed[images[0]]
    for name in ("good0", "good1"):
        folder = out / name
        assert {p.name for p in folder.iterdir()} == {
            "layers.psd",
            "layers.zip",
            "layer_01.png",
            "layer_02.png",
            "done.json",
        }
        assert json.loads((folder / "done.json").read_text())["layers"] == 2
    assert not (out / "broken").exists() or not (out / "broken" / "done.json").exists()

    # rerun: only the failed image is tried again
    picture(64, 48, seed=9).save(images[0])  # now readable
    second = run_batch(pipeline, images, out, settings)
    assert [p.name for p in second.skipped] == ["good0.png", "good1.png"]
    assert [p.name for p in second.done] == ["broken.png"] and not second.failed

    # other settings: nothing is skipped
    third = run_batch(pipeline, images[:1], out, BatchSettings(DecomposeOptions(layers=1, steps=1), prompt="a test"))
    assert [p.name for p in third.done] == ["broken.png"]
