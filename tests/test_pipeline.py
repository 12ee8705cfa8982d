"""The decomposition pipeline on tiny random models: shapes, options, recursion and the batch runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.compositing import composite, render_layer
from layered_core.layers import LayerStack
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.pipeline import DecomposeOptions, Decomposition, LayeredPipeline
from layered_core.vae import RGBAVAE, VAEConfig

from .conftest import picture

FAST = DecomposeOptions(layer_count=3, steps=2, resolution=640)


def test_decomposition_shapes_and_caption(pipeline):
    encoder = pipeline.text_encoder
    result = pipeline(picture(), prompt="", options=FAST)
    # 100x60 -> 640 bucket: 826.3 x 495.8 rounded to multiples of 32 = 832x480
    assert result.layer_images.shape == (3, 4, 480, 832) and result.composite.shape == (4, 480, 832)
    assert result.layer_images.min() >= 0 and result.layer_images.max() <= 1
    assert result.prompt == "caption en 832x480" and encoder.captions == 1
    assert encoder.prompts[-2:] == ["caption en 832x480", " "]  # then the negative prompt
    # the auto-caption is timed apart from the prompt encoding
    assert set(result.seconds) == {"encode image", "caption", "text", "sampling", "decode"}
    stack = result.stack()
    assert len(stack.layers) == 3 and stack.size == (832, 480)


def test_same_seed_same_layers_other_seed_other_layers(pipeline):
    a = pipeline(picture(), "a poster", DecomposeOptions(layer_count=1, steps=2, seed=5))
    b = pipeline(picture(), "a poster", DecomposeOptions(layer_count=1, steps=2, seed=5))
    c = pipeline(picture(), "a poster", DecomposeOptions(layer_count=1, steps=2, seed=6))
    assert torch.equal(a.layer_images, b.layer_images)
    assert not torch.equal(a.layer_images, c.layer_images)


def test_decoding_reports_the_frames_decoded(pipeline):
    """decode_progress sees the composite and the layers decode, a few frames at a time, and all of them."""
    reports = []
    pipeline(
        picture(), "a poster", DecomposeOptions(layer_count=5, steps=1), decode_progress=lambda *r: reports.append(r)
    )
    assert reports == [(4, 6), (6, 6)]


def test_layers_at_input_size(pipeline):
    result = pipeline(picture(123, 77), "x", DecomposeOptions(layer_count=2, steps=1, keep_input_size=True))
    assert result.layer_images.shape == (2, 4, 77, 123) and result.composite.shape == (4, 77, 123)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(layer_count=21), "layer count must be an integer from 1 to 20"),
        (dict(layer_count=0), "layer count must be an integer from 1 to 20"),
        (dict(cfg_scale=-1.0), "cfg_scale must be positive"),
        (dict(resolution=512), "resolution must be one of"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(caption_language="fr"), "caption_language must be one of"),
    ],
)
def test_impossible_settings_are_refused_before_any_model_runs(settings, message):
    with pytest.raises(ValueError, match=message):
        DecomposeOptions(**settings)


def test_stack_order_is_bottom_to_top(pipeline):
    result = pipeline(picture(), "x", DecomposeOptions(layer_count=3, steps=1, seed=2))
    stack = result.stack()
    for index, layer in enumerate(stack.layers):
        full = render_layer(layer, stack.width, stack.height).astype(np.float32) / 255
        expected = result.layer_images[index].permute(1, 2, 0).numpy()
        assert np.abs(full - expected).max() <= 0.5 / 255 + 1e-6, index
    assert [layer.name for layer in stack.layers] == ["Layer 1", "Layer 2", "Layer 3"]


def test_background_flattens_transparent_input(pipeline):
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    flat = pipeline.prepare_image(image, DecomposeOptions(background=(0, 0, 255)))
    assert flat.getpixel((0, 0)) == (0, 0, 255, 255)
    kept = pipeline.prepare_image(image, DecomposeOptions())
    assert kept.getpixel((0, 0))[3] == 0  # alpha kept by default (needed for recursion)


def test_no_text_encoder_with_empty_prompt_is_named():
    bare = LayeredPipeline(VLDMMDiT(MMDiTConfig.tiny()), RGBAVAE(VAEConfig.tiny()), None)
    with pytest.raises(ValueError, match="no text encoder is loaded to caption"):
        bare(picture(), "", FAST)


class HalvesPipeline(LayeredPipeline):
    """Splits any RGBA image into its left and right halves: an exact decomposition."""

    def __init__(self):
        super().__init__(None, None, None)
        self.seen = []

    def __call__(self, image, prompt=None, options=None, callback=None, prompt_embeddings=None, decode_progress=None):
        self.seen.append((image.size, options.layer_count, options.keep_input_size))
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
    result = pipeline(picture(), "x", DecomposeOptions(layer_count=2, steps=1))
    stack = result.stack()
    layer = stack.get(0)
    seen = []
    original = pipeline.__class__.__call__

    def spy(self, image, *args, **kwargs):
        seen.append(image.size)
        return original(self, image, *args, **kwargs)

    pipeline.__class__.__call__ = spy
    try:
        split = pipeline.split(stack, 0, 2, prompt="part", options=DecomposeOptions(steps=1))
    finally:
        pipeline.__class__.__call__ = original
    assert seen == [(layer.width, layer.height)]  # the layer's own pixels went in
    assert [child.name for child in split.get(0).children] == ["Layer 1 / 1", "Layer 1 / 2"]
    assert np.shares_memory(split.get(0).pixels, layer.pixels)  # the parent keeps its pixels; others untouched
    assert all(split.get(i) is stack.get(i) for i in range(1, len(stack.layers)))


def test_from_files_compiles_the_blocks_with_and_without_a_budget(tmp_path):
    from layered_core.tiny_models import write_tiny_set

    write_tiny_set(tmp_path, components=["transformer", "vae"])
    files = dict(transformer=str(tmp_path / "transformer"), vae=str(tmp_path / "vae"), dtype=torch.float32)
    plain = LayeredPipeline.from_files(**files)
    assert not plain.transformer.blocks_compiled
    compiled = LayeredPipeline.from_files(**files, compile=True)
    blocks = compiled.transformer.transformer_blocks
    assert len(blocks) == MMDiTConfig.tiny().num_layers
    # each block's own forward is the shared compiled function, bound to that block
    assert compiled.transformer.blocks_compiled
    assert all(vars(block)["forward"].__self__ is block for block in blocks)
    assert len({vars(block)["forward"].__func__ for block in blocks}) == 1
    compiled.transformer.uncompile_blocks()
    assert not compiled.transformer.blocks_compiled
    assert not any("forward" in vars(block) for block in blocks)
    budgeted = LayeredPipeline.from_files(**files, compile=True, vram_budget_gb=8)
    assert budgeted.transformer.blocks_compiled and budgeted.vram_budget is not None
