"""Edits: exact results on known inputs, and every layer an edit does not target left bit-identical."""

import numpy as np
import pytest

from layered_core import edits
from layered_core.compositing import composite
from layered_core.layers import Layer, LayerStack, attach_split, union_boxes
from layered_core.psd import save_psd
from layered_core.psd_read import load_psd
from layered_core.synthetic import synthetic_design


def solid(height, width, colour, alpha=255):
    pixels = np.empty((height, width, 4), np.uint8)
    pixels[..., :3] = colour
    pixels[..., 3] = alpha
    return pixels


@pytest.fixture
def design():
    stack = synthetic_design(120, 100, layer_count=6, seed=7)
    # Layer 3 was split again; its sub-layers are the left and right halves of its pixels.
    target = stack[3]
    middle = target.width // 2
    sub = LayerStack(
        target.width,
        target.height,
        (Layer(target.pixels[:, :middle], "left"), Layer(target.pixels[:, middle:], "right", (middle, 0))),
    )
    return attach_split(stack, 3, sub)


def snapshot(stack):
    return {
        path: ((layer.name, layer.offset, layer.box, layer.visible, layer.opacity), layer.pixels.copy())
        for path, layer in stack.walk()
    }


def assert_untouched(before, after, edited_paths, ancestors_pixels=True):
    """Every layer not in ``edited_paths`` has the same name, offset, box, visibility, opacity and pixels.
    ``ancestors_pixels=False`` skips the pixels of the edited layers' groups, which a PSD does not store
    (a group read back draws its children, so its pixels follow an edit inside it)."""
    ancestors = {path[:depth] for path in edited_paths for depth in range(1, len(path))}
    for path, (fields, pixels) in before.items():
        if path in edited_paths:
            continue
        layer = after.get(path)
        assert (layer.name, layer.offset, layer.box, layer.visible, layer.opacity) == fields, path
        if ancestors_pixels or path not in ancestors:
            assert np.array_equal(layer.pixels, pixels), path


ALL_EDITS = [
    (
        "recolor",
        lambda s: edits.recolor(s, 2, hue_shift=90, saturation=0.5, tint=(0, 0, 0), tint_strength=0.3),
        {2},
    ),
    ("move", lambda s: edits.move(s, 2, 5, -3), {2}),
    ("resize", lambda s: edits.resize(s, 2, 1.5), {2}),
    ("replace", lambda s: edits.replace_pixels(s, 2, solid(3, 3, (1, 2, 3))), {2}),
    ("recolor sub-layer", lambda s: edits.recolor(s, (3, 1), hue_shift=180), {(3, 1)}),
    ("move split layer", lambda s: edits.move(s, 3, 1, 1), {3, (3, 0), (3, 1)}),
    ("flip", lambda s: edits.flip(s, 5, horizontal=True, vertical=True), {5}),
    ("lighten", lambda s: edits.recolor(s, 2, lightness=0.3), {2}),
    ("hide", lambda s: edits.set_visible(s, 2, False), {2}),
    ("opacity", lambda s: edits.set_opacity(s, 4, 100), {4}),
]


def as_paths(edited):
    return {(p,) if isinstance(p, int) else p for p in edited}


def changed(before, after, paths):
    return [path for path in paths if after.get(path).box != before[path][0][2]] + [
        path
        for path in paths
        if after.get(path).visible != before[path][0][3]
        or after.get(path).opacity != before[path][0][4]
        or not np.array_equal(after.get(path).pixels, before[path][1])
    ]


@pytest.mark.parametrize("name, edit, edited", ALL_EDITS, ids=[item[0] for item in ALL_EDITS])
def test_an_edit_leaves_every_other_layer_bit_identical(design, name, edit, edited):
    before = snapshot(design)
    after = edit(design)
    edited_paths = as_paths(edited)
    assert_untouched(before, after, edited_paths)
    assert changed(before, after, edited_paths)  # the target did change, so the check above is not vacuous
    assert_untouched(before, design, set())  # and the input stack itself is untouched


@pytest.mark.parametrize("name, edit, edited", ALL_EDITS, ids=[item[0] for item in ALL_EDITS])
def test_untouched_layers_stay_bit_identical_through_a_psd_save_and_load(design, tmp_path, name, edit, edited):
    original = load_psd(save_psd(design, tmp_path / "original.psd"))
    edited_file = load_psd(save_psd(edit(original), tmp_path / "edited.psd"))
    edited_paths = as_paths(edited)
    before = snapshot(original)
    assert_untouched(before, edited_file, edited_paths, ancestors_pixels=False)
    assert changed(before, edited_file, edited_paths)


@pytest.mark.parametrize("name, edit, edited", ALL_EDITS, ids=[item[0] for item in ALL_EDITS])
def test_the_picture_changes_only_inside_the_edited_layers_old_and_new_boxes(design, name, edit, edited):
    after = edit(design)
    target = min(as_paths(edited), key=len)
    box = union_boxes([design.get(target).drawn_box(), after.get(target).drawn_box()])
    difference = np.any(composite(design) != composite(after), axis=-1)
    assert difference.any()
    inside = np.zeros_like(difference)
    inside[max(box[1], 0) : box[3], max(box[0], 0) : box[2]] = True
    assert not (difference & ~inside).any()


def test_scaling_soft_edges_leaves_no_halo_against_a_reference_made_by_hand():
    # One row: a flat orange whose alpha ramps 0, 85, 170, 255, 255, 170, 85, 0, with green under the
    # transparent ends (hidden colour, as decoded layers carry). Premultiplied resampling must give orange
    # wherever anything is drawn, alpha the plain bilinear interpolation of the ramp, and no green.
    ramp = np.array([0, 85, 170, 255, 255, 170, 85, 0], np.float64)
    pixels = np.zeros((1, 8, 4), np.uint8)
    pixels[0, :, :3] = (255, 128, 0)
    pixels[0, [0, 7], :3] = (0, 255, 0)
    pixels[0, :, 3] = ramp
    stack = LayerStack(32, 4, (Layer(pixels, "soft", (4, 1)),))
    doubled = edits.resize(stack, 0, (2, 1), center=(4, 1), resample="bilinear")[0]
    # By hand: output pixel i (of 16) samples the source at (i + 0.5) / 2 - 0.5, linearly between neighbours,
    # with transparent pixels beyond the ends.
    padded = np.concatenate([[0.0], ramp, [0.0]])
    expected = []
    for i in range(16):
        source = (i + 0.5) / 2 - 0.5 + 1  # +1 for the padding
        left = int(np.floor(source))
        weight = source - left
        expected.append(padded[left] * (1 - weight) + padded[left + 1] * weight)
    expected = np.floor(np.array(expected) + 0.5).astype(int)
    drawn = expected > 0
    first = int(np.argmax(drawn))
    assert doubled.offset == (4 + first, 1)
    alpha = doubled.pixels[0, :, 3].astype(int)
    assert np.abs(alpha - expected[first : first + alpha.size]).max() <= 1
    assert (doubled.pixels[0][alpha > 0][:, :3] == (255, 128, 0)).all()


def test_flip_mirrors_exactly_and_keeps_the_box():
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    pixels[..., 3] = 255
    stack = LayerStack(20, 20, (Layer(pixels, "tile", (5, 7)),))
    flipped = edits.flip(stack, 0, horizontal=True, vertical=True)[0]
    assert flipped.offset == (5, 7) and np.array_equal(flipped.pixels, pixels[::-1, ::-1])
    assert edits.flip(edits.flip(stack, 0), 0)[0].pixels.tolist() == pixels.tolist()
    # A split layer flips as one picture: its halves trade places and each is mirrored.
    left, right = Layer(pixels, "left", (0, 0)), Layer(pixels[:, :2], "right", (3, 0))
    group = Layer(np.zeros((2, 5, 4), np.uint8), "pair", (0, 0), (left, right))
    mirrored = edits.flip(LayerStack(20, 20, (group,)), 0)[0]
    assert [child.offset for child in mirrored.children] == [(2, 0), (0, 0)]
    assert np.array_equal(mirrored.children[1].pixels, pixels[:, 1::-1])


def test_fit_pixels_resamples_to_exactly_the_size_asked():
    pixels = solid(10, 20, (30, 60, 90))
    fitted = edits.fit_pixels(pixels, (7, 5))
    assert fitted.shape == (5, 7, 4) and (fitted[..., :3] == (30, 60, 90)).all() and (fitted[..., 3] == 255).all()
    assert edits.fit_pixels(pixels, (20, 10)) is pixels


def test_move_to_reorders_one_layer(design):
    top = edits.move_to(design, 1, -1)
    assert [layer.name for layer in top] == [design[i].name for i in (0, 2, 3, 4, 5, 1)]
    assert edits.move_to(design, 5, 0)[0] is design[5]
    with pytest.raises(ValueError, match=r"there are 6 layers at that level, so the new place is 1 \(bottom\) to 6"):
        edits.move_to(design, 1, 6)


def test_hidden_and_translucent_layers_are_drawn_as_psd_draws_them():
    below = Layer(solid(2, 2, (0, 0, 255)), "blue")
    above = Layer(solid(2, 2, (255, 0, 0)), "red")
    stack = LayerStack(2, 2, (below, above))
    assert composite(edits.set_visible(stack, 1, False))[0, 0].tolist() == [0, 0, 255, 255]
    half = composite(edits.set_opacity(stack, 1, 128))[0, 0].tolist()
    assert half == [128, 0, 127, 255]  # 128/255 red over blue
    with pytest.raises(ValueError, match="opacity must be an integer 0..255"):
        edits.set_opacity(stack, 1, 0.5)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: edits.resize(s, 2, 0), "scale must be positive and finite"),
        (lambda s: edits.resize(s, 2, float("inf")), "scale must be positive and finite"),
        (lambda s: edits.move(s, 2, float("nan"), 0), "dx must be a finite number"),
        (lambda s: edits.recolor(s, 2, hue_shift=float("nan")), "hue_shift must be a finite number"),
        (lambda s: edits.recolor(s, 2, lightness=2), "lightness must be in -1..1"),
        (lambda s: edits.move(s, 9, 1, 1), "index 9 is out of range, the stack has 6 layers"),
        (lambda s: edits.flip(s, (3, 5)), r"index 5 is out of range, layer \(3,\) has 2 layers"),
    ],
)
def test_bad_edits_are_named_errors(design, edit, message):
    with pytest.raises(ValueError, match=message):
        edit(design)


def test_structural_edits_keep_other_layers_identical(design):
    before = snapshot(design)
    removed = edits.remove(design, 1)
    assert [layer.name for layer in removed] == [design[i].name for i in (0, 2, 3, 4, 5)]
    for new_index, old_index in enumerate((0, 2, 3, 4, 5)):
        assert removed[new_index] is design[old_index]
    swapped = edits.reorder(design, [0, 2, 1, 3, 4, 5])
    assert swapped[1] is design[2] and swapped[2] is design[1]
    merged = edits.merge(design, 4)
    assert [layer.name for layer in merged][4] == f"{design[4].name} + {design[5].name}"
    assert all(merged[i] is design[i] for i in range(4))
    assert_untouched(before, design, set())


def test_move_shifts_offset_and_keeps_pixels(design):
    moved = edits.move(design, 3, -7, 4)
    for path in [(3,), (3, 0), (3, 1)]:
        old, new = design.get(path), moved.get(path)
        assert new.offset == (old.offset[0] - 7, old.offset[1] + 4)
        assert new.pixels is old.pixels or np.array_equal(new.pixels, old.pixels)
    single = LayerStack(10, 10, (Layer(solid(2, 2, (9, 9, 9)), "dot", (1, 1)),))
    out = composite(edits.move(single, 0, 3, 5))
    assert out[6:8, 4:6, 3].all() and out[..., 3].sum() == 4 * 255
    with pytest.raises(ValueError, match="whole pixels"):
        edits.move(single, 0, 0.5, 0)


def test_resize_box_filter_halves_a_square_exactly():
    stack = LayerStack(32, 32, (Layer(solid(4, 4, (255, 255, 255)), "square", (10, 10)),))
    half = edits.resize(stack, 0, 0.5, center=(12, 12), resample="box")[0]
    assert half.offset == (11, 11)
    assert np.array_equal(half.pixels, solid(2, 2, (255, 255, 255)))
    # About its own centre by default: the middle of a 10x10 square at (20, 20) is (25, 25).
    big = LayerStack(64, 64, (Layer(solid(10, 10, (5, 6, 7)), "square", (20, 20)),))
    doubled = edits.resize(big, 0, 2, resample="box")[0]
    assert doubled.offset == (15, 15) and np.array_equal(doubled.pixels, solid(20, 20, (5, 6, 7)))


def test_resize_nearest_about_the_origin_repeats_pixels():
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    pixels[..., 3] = 255
    stack = LayerStack(64, 64, (Layer(pixels, "tile", (10, 20)),))
    doubled = edits.resize(stack, 0, 2, center=(0, 0), resample="nearest")[0]
    assert doubled.offset == (20, 40)
    assert np.array_equal(doubled.pixels, pixels.repeat(2, axis=0).repeat(2, axis=1))
    stretched = edits.resize(stack, 0, (3, 1), center=(10, 20), resample="nearest")[0]
    assert stretched.offset == (10, 20) and np.array_equal(stretched.pixels, pixels.repeat(3, axis=1))
    assert edits.resize(stack, 0, 1.0)[0] is stack[0]


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("scale", [0.37, 0.5, 1.7])
def test_resize_is_premultiplied_so_edges_keep_their_colour(resample, scale):
    # A red square inside transparent black: straight-alpha resampling would mix black into the edge
    # pixels (a dark halo); premultiplied resampling keeps every visible pixel pure red.
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[4:12, 4:12] = (255, 0, 0, 255)
    stack = LayerStack(64, 64, (Layer(pixels, "red", (20, 20)),))
    resized = edits.resize(stack, 0, scale, resample=resample)[0]
    visible = resized.pixels[..., 3] > 0
    edge = visible & (resized.pixels[..., 3] < 255)
    assert edge.any()
    assert (resized.pixels[visible][:, :3] == (255, 0, 0)).all()
    coverage = resized.pixels[..., 3].sum(dtype=np.int64) / 255
    assert coverage == pytest.approx(64 * scale * scale, rel=0.04)


def test_recolor_exact_on_pure_colours():
    red = solid(1, 3, (255, 0, 0), alpha=100)
    assert edits.recolor_pixels(red, hue_shift=120)[0, 0].tolist() == [0, 255, 0, 100]
    assert edits.recolor_pixels(red, hue_shift=240)[0, 0].tolist() == [0, 0, 255, 100]
    assert edits.recolor_pixels(red, hue_shift=-120)[0, 0].tolist() == [0, 0, 255, 100]
    # Saturation 0 keeps HSL lightness: pure red (lightness 0.5) becomes mid grey.
    assert edits.recolor_pixels(red, saturation=0)[0, 0].tolist() == [128, 128, 128, 100]
    grey = solid(1, 1, (90, 90, 90))
    assert edits.recolor_pixels(grey, hue_shift=77, saturation=3)[0, 0].tolist() == [90, 90, 90, 255]
    black = solid(1, 1, (0, 0, 0), alpha=7)
    assert edits.recolor_pixels(black, tint=(200, 100, 0), tint_strength=0.5)[0, 0].tolist() == [
        100,
        50,
        0,
        7,
    ]


def test_recolor_tint_paints_the_layer_and_keeps_alpha(design):
    tinted = edits.recolor(design, 1, tint=(12, 34, 56))
    layer, original = tinted[1], design[1]
    assert (layer.pixels[..., :3] == (12, 34, 56)).all()
    assert np.array_equal(layer.pixels[..., 3], original.pixels[..., 3])
    assert layer.offset == original.offset
    assert edits.recolor(design, 1) is design
    with pytest.raises(ValueError, match="tint_strength must be in 0..1"):
        edits.recolor(design, 1, tint=(0, 0, 0), tint_strength=2)


def test_recolor_of_a_split_layer_reaches_its_sub_layers(design):
    recoloured = edits.recolor(design, 3, tint=(1, 1, 1))
    for path in [(3,), (3, 0), (3, 1)]:
        assert (recoloured.get(path).pixels[..., :3] == 1).all()


def test_merge_keeps_the_composite(design):
    merged = edits.merge(design, 1, count=3, name="middle")
    assert len(merged) == 4 and merged[1].name == "middle" and not merged[1].is_split
    difference = np.abs(composite(merged).astype(int) - composite(design).astype(int))
    assert difference.max() <= 1
    with pytest.raises(ValueError, match="needs 2 or more layers from 'soft 4' upwards"):
        edits.merge(design, 4, count=3)


def test_replace_pixels_drops_the_split(design):
    replaced = edits.replace_pixels(design, 3, solid(2, 2, (4, 4, 4)), offset=(1, 2))
    assert not replaced[3].is_split and replaced[3].offset == (1, 2)
    assert replaced[3].pixels.shape == (2, 2, 4)
    with pytest.raises(ValueError, match="new pixels for layer"):
        edits.replace_pixels(design, 3, np.zeros((2, 2, 4), np.float32))


def test_reorder_puts_layers_in_the_new_order_and_validates(design):
    top_two_swapped = edits.reorder(design, [0, 1, 2, 3, 5, 4])
    assert [layer.name for layer in top_two_swapped][4:] == [design[5].name, design[4].name]
    nested = edits.reorder(design, [1, 0], parent=3)
    assert [layer.name for layer in nested[3].children] == ["right", "left"]
    with pytest.raises(ValueError, match="exactly once"):
        edits.reorder(design, [0, 0, 1, 2, 3, 4])
