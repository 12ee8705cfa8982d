"""The layer stack: compositing against PIL and the paper's formula, offsets, split trees, conversions."""

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.layers import (
    Layer,
    LayerStack,
    alpha_box,
    attach_split,
    composite,
    composite_planes_over_white,
    composite_premultiplied,
    crop_to_alpha,
    render_layer,
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


def pil_chain(stack):
    """The stack composited the PIL way: every layer placed on a canvas, then alpha_composite in turn."""
    result = Image.new("RGBA", stack.size, (0, 0, 0, 0))
    for layer in stack.leaves():
        result = Image.alpha_composite(result, rgba_to_pil(render_layer(layer, stack.width, stack.height)))
    return np.asarray(result)


def test_one_layer_over_another_matches_pil_for_every_alpha_pair():
    rng = np.random.default_rng(0)
    below, above = random_rgba(rng, 256, 256), random_rgba(rng, 256, 256)
    below[..., 3] = np.arange(256)[:, None]  # every (alpha below, alpha above) pair once
    above[..., 3] = np.arange(256)[None, :]
    ours = composite(LayerStack(256, 256, (Layer(below), Layer(above)))).astype(int)
    theirs = np.asarray(Image.alpha_composite(rgba_to_pil(below), rgba_to_pil(above))).astype(int)
    assert np.array_equal(ours[..., 3], theirs[..., 3])
    visible = theirs[..., 3] > 0
    assert np.abs(ours - theirs)[visible].max() <= 1
    # Colour under a fully transparent result is undefined; ours is 0, where PIL keeps whatever it had.
    assert not ours[~visible].any()


def test_synthetic_design_matches_pil_chain_within_one_step():
    stack = synthetic_design(192, 160, layer_count=8, seed=4)
    difference = np.abs(composite(stack).astype(int) - pil_chain(stack).astype(int))
    assert difference.max() <= 1


def test_composite_is_the_papers_sequential_over_formula():
    # C_0 = 0, C_i = a_i * RGB_i + (1 - a_i) * C_{i-1}: with an opaque bottom layer the result is opaque
    # and the colour is C_N, rounded once.
    rng = np.random.default_rng(1)
    layers = [random_rgba(rng, 24, 32) for _ in range(5)]
    layers[0][..., 3] = 255
    expected = np.zeros((24, 32, 3))
    for pixels in layers:
        alpha = pixels[..., 3:4] / 255
        expected = alpha * pixels[..., :3] / 255 + (1 - alpha) * expected
    ours = composite(LayerStack(32, 24, tuple(Layer(p) for p in layers)))
    assert (ours[..., 3] == 255).all()
    assert np.abs(ours[..., :3] - expected * 255).max() <= 0.5 + 1e-6
    premultiplied = composite_premultiplied(LayerStack(32, 24, tuple(Layer(p) for p in layers)))
    assert np.abs(premultiplied[..., :3] - expected).max() < 1e-5


def test_offsets_and_layers_sticking_out_of_the_canvas():
    pixels = np.zeros((3, 4, 4), np.uint8)
    pixels[...] = (10, 20, 30, 255)
    pixels[0, 0] = (200, 100, 50, 255)
    stack = LayerStack(6, 5, (Layer(pixels, "a", (-1, 3)),))
    out = composite(stack)
    assert out[3:5, 0:3, 3].all() and out[3, 0].tolist() == [10, 20, 30, 255]  # column -1 is cut off
    assert out[:3].sum() == 0 and out[:, 3:].sum() == 0
    assert np.array_equal(render_layer(stack[0], 6, 5), out)
    planes = composite_planes_over_white(stack).transpose(1, 2, 0)
    assert np.array_equal(planes[..., 3], out[..., 3])
    assert (planes[out[..., 3] == 0, :3] == 255).all()  # nothing drawn: white under alpha 0
    assert np.array_equal(planes[out[..., 3] == 255], out[out[..., 3] == 255])  # opaque: the colour itself


def test_colour_under_transparent_pixels_is_kept_by_render_layer():
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[..., :3] = 77  # invisible colour
    pixels[1, 1, 3] = 255
    canvas = render_layer(Layer(pixels, offset=(1, 1)), 4, 4)
    assert canvas[1, 1].tolist() == [77, 77, 77, 0]
    assert canvas[2, 2].tolist() == [77, 77, 77, 255]


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


def test_a_hidden_group_draws_nothing_and_a_translucent_one_mixes_with_what_is_below():
    below = Layer(np.full((2, 2, 4), (0, 0, 200, 255), np.uint8), "blue")
    red = Layer(np.full((2, 2, 4), (200, 0, 0, 255), np.uint8), "red")
    green = Layer(np.full((1, 2, 4), (0, 200, 0, 255), np.uint8), "green")
    group = Layer(np.zeros((2, 2, 4), np.uint8), "group", children=(red, green), opacity=51)
    stack = LayerStack(2, 2, (below, group))
    flat = composite(stack).astype(int)
    # the group's own result (green over red in row 0, red in row 1) mixed 20 % over the blue
    assert flat[0, 0].tolist() == [0, 40, 160, 255] and flat[1, 0].tolist() == [40, 0, 160, 255]
    hidden = LayerStack(2, 2, (below, group.replace(visible=False)))
    assert composite(hidden)[0, 0].tolist() == [0, 0, 200, 255]
    assert stack.describe().splitlines()[1] == "2: 'group'  (box 0,0,2,2, opacity 51, split into 2)"
