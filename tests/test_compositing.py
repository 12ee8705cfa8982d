"""Compositing: PIL's alpha_composite and the paper's "over" formula as references, offsets and canvas edges,
split layers, hidden layers and translucent groups."""

import numpy as np
from PIL import Image

from layered_core.compositing import composite, composite_planes_over_white, composite_premultiplied, render_layer
from layered_core.layers import (
    Layer,
    LayerStack,
    rgba_to_pil,
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
