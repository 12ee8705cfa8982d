"""The layer stack: alpha boxes and crops, split trees and paths, read-only layers, conversions (compositing is
tests/test_compositing.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.compositing import composite, render_layer
from layered_core.layers import (
    Layer,
    LayerStack,
    alpha_box,
    attach_split,
    crop_to_alpha,
    rgba_from_bhwc,
    rgba_from_pil,
    rgba_to_bhwc,
    rgba_to_pil,
    stack_from_bhwc,
    stack_to_bhwc,
)
from layered_core.synthetic import synthetic_design


def random_rgba(rng, height, width):
    return rng.integers(0, 256, (height, width, 4), dtype=np.uint8)


def test_alpha_box_and_crop():
    pixels = np.zeros((10, 12, 4), np.uint8)
    pixels[2:5, 3:9, 3] = 1
    pixels[2:5, 3:9, 0] = 9
    assert alpha_box(pixels) == (3, 2, 9, 5)
    cropped = crop_to_alpha(Layer(pixels, "x", (100, 200)))
    assert cropped.offset == (103, 202) and cropped.pixels.shape == (3, 6, 4)
    assert (cropped.pixels[..., 0] == 9).all()
    empty = crop_to_alpha(Layer(np.zeros((4, 4, 4), np.uint8)))
    assert empty.pixels.shape == (0, 0, 4) and alpha_box(empty.pixels) is None
    assert not composite(LayerStack(4, 4, (empty,))).any()


def test_split_layer_is_drawn_as_its_children_and_paths_reach_them():
    stack = synthetic_design(96, 80, layer_count=4, seed=2)
    target = stack[2]
    half = target.height // 2
    patch = np.zeros((2, 3, 4), np.uint8)
    patch[...] = (1, 2, 3, 128)
    # What a second decomposition of the layer might give: its two halves and a detail on top.
    sub = LayerStack(
        target.width,
        target.height,
        (
            Layer(target.pixels[:half], "top"),
            Layer(target.pixels[half:], "bottom", (0, half)),
            Layer(patch, "dot"),
        ),
    )
    split = attach_split(stack, 2, sub)
    assert split[2].is_split and np.array_equal(split[2].pixels, target.pixels)
    assert split[(2, 1)].offset == (target.offset[0] + sub[1].offset[0], target.offset[1] + sub[1].offset[1])
    assert split[(2, -1)] is split[(2, 2)]
    # Drawn as its children: the same as putting the children in the parent's place.
    flat = LayerStack(96, 80, stack.layers[:2] + split[2].children + stack.layers[3:])
    assert np.array_equal(composite(split), composite(flat))
    assert [path for path, _ in split.walk()] == [(0,), (1,), (2,), (2, 0), (2, 1), (2, 2), (3,)]
    assert len(split.leaves()) == 6
    with pytest.raises(ValueError, match=r"index 3 is out of range, layer \(2,\) has 3 layers"):
        split.get((2, 3))
    with pytest.raises(ValueError, match="sub-stack is 5x5"):
        attach_split(stack, 1, LayerStack(5, 5))


def test_layers_are_read_only_and_validated():
    layer = Layer(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError):
        layer.pixels[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"expected a numpy uint8 array of shape \(H, W, 4\).*float32"):
        Layer(np.zeros((2, 2, 4), np.float32), "bad")
    with pytest.raises(ValueError, match="positive integer"):
        LayerStack(0, 4)
    rgb = Layer(np.full((1, 1, 3), 5, np.uint8))
    assert rgb.pixels.tolist() == [[[5, 5, 5, 255]]]


def test_pil_round_trip_is_exact():
    rng = np.random.default_rng(3)
    pixels = random_rgba(rng, 7, 9)
    assert np.array_equal(rgba_from_pil(rgba_to_pil(pixels)), pixels)
    grey = rgba_from_pil(Image.new("L", (3, 2), 40))
    assert grey.shape == (2, 3, 4) and grey[0, 0].tolist() == [40, 40, 40, 255]


def test_tensor_conversions_follow_comfyui_image_convention():
    rng = np.random.default_rng(4)
    pixels = random_rgba(rng, 5, 6)
    tensor = rgba_to_bhwc(pixels)
    assert tensor.shape == (1, 5, 6, 4) and tensor.dtype == torch.float32
    assert float(tensor.max()) <= 1.0
    assert np.array_equal(rgba_from_bhwc(tensor), pixels)
    rgb = rgba_from_bhwc(torch.full((2, 2, 3), 0.5))
    assert rgb[0, 0].tolist() == [128, 128, 128, 255]
    with pytest.raises(ValueError, match="batch of 2"):
        rgba_from_bhwc(torch.zeros(2, 4, 4, 4))


def test_stack_tensor_round_trip_crops_and_restores():
    stack = synthetic_design(64, 48, layer_count=5, seed=5)
    batch = stack_to_bhwc(stack)
    assert batch.shape == (5, 48, 64, 4)
    back = stack_from_bhwc(batch, names=[layer.name for layer in stack])
    for original, restored in zip(stack, back, strict=True):
        assert restored.name == original.name
        cropped = crop_to_alpha(original)
        assert restored.offset == cropped.offset
        assert np.array_equal(restored.pixels, cropped.pixels)
    assert np.array_equal(composite(back), composite(stack))
    with pytest.raises(ValueError, match="expected 5 names"):
        stack_from_bhwc(batch, names=["one"])


def test_synthetic_designs_are_deterministic_and_have_what_they_promise():
    stack = synthetic_design(200, 150, layer_count=9, seed=6)
    again = synthetic_design(200, 150, layer_count=9, seed=6)
    assert all(np.array_equal(a.pixels, b.pixels) and a.offset == b.offset for a, b in zip(stack, again, strict=True))
    other = synthetic_design(200, 150, layer_count=9, seed=7)
    assert not np.array_equal(composite(stack), composite(other))
    background = stack[0]
    assert background.box == (0, 0, 200, 150) and (background.pixels[..., 3] == 255).all()
    kinds = {layer.name.split()[0] for layer in stack.layers[1:]}
    assert kinds == {"shape", "soft", "text", "panel"}
    for layer in stack.layers[1:]:
        alpha = layer.pixels[..., 3]
        assert crop_to_alpha(layer) is layer  # cut to the alpha box
        if layer.name.startswith("panel"):
            assert len(np.unique(alpha)) == 1 and 0 < alpha[0, 0] < 255  # semi-transparent
        else:
            assert ((alpha > 0) & (alpha < 255)).any()  # anti-aliased or soft edges
    canvases = [render_layer(layer, 200, 150)[..., 3] > 0 for layer in stack.layers[1:]]
    overlapping = sum(bool((first & second).any()) for i, first in enumerate(canvases) for second in canvases[i + 1 :])
    assert overlapping >= 2  # occlusion


def test_layer_paths_are_numbered_from_one_at_the_bottom_as_people_count():
    from layered_core.layers import format_layer_path, parse_layer_path

    assert parse_layer_path("1") == (0,)
    assert parse_layer_path(" 3 / 1 ") == (2, 0)
    assert parse_layer_path("-1") == (-1,)
    assert format_layer_path((2, 0)) == "3/1"
    for bad in ("0", "", "a", "2/", "1.5"):
        with pytest.raises(ValueError, match="expected layer numbers separated by '/'"):
            parse_layer_path(bad)
    stack = synthetic_design(40, 30, layer_count=3, seed=1)
    stack = attach_split(stack, 1, LayerStack(stack[1].width, stack[1].height, (Layer(stack[1].pixels, "only"),)))
    assert parse_layer_path("2/1", stack) == (1, 0)
    with pytest.raises(ValueError, match="layer '4' does not exist: the stack has 3 layers"):
        parse_layer_path("4", stack)
    with pytest.raises(ValueError, match="layer '2/2' does not exist: layer 2 has 1 layers"):
        parse_layer_path("2/2", stack)
    with pytest.raises(ValueError, match="layer '1/1' does not exist: layer 1 is not split"):
        parse_layer_path("1/1", stack)
