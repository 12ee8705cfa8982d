"""Reading layered PSDs: the pack's own back bit for bit, other writers' with groups, hidden layers, offsets,
opacity and Unicode names kept, and what a stack cannot hold refused or rasterised, never dropped silently."""

import warnings

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import Group, PixelLayer
from psd_tools.constants import BlendMode, Tag
from psd_tools.psd.tagged_blocks import TaggedBlock

from layered_core.compositing import composite
from layered_core.export import ExportError
from layered_core.layer_files import load_layer_file, save_layer_file
from layered_core.layers import Layer, LayerStack, crop_to_alpha
from layered_core.psd import save_psd
from layered_core.psd_read import PSDReadWarning, load_psd


def load_quietly(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stack = load_psd(path)
    return stack, [str(item.message) for item in caught if issubclass(item.category, PSDReadWarning)]


def test_the_packs_own_psd_reads_back_bit_for_bit(tree, tmp_path):
    # `tree` is a split stack: groups, nested groups, an empty layer, layers past the canvas edge.
    hidden = tree.with_layer(1, tree[1].replace(visible=False, opacity=77))
    stack, messages = load_quietly(save_psd(hidden, tmp_path / "own.psd"))
    assert messages == []
    assert stack.size == hidden.size
    original = {path: layer for path, layer in hidden.walk()}
    loaded = {path: layer for path, layer in stack.walk()}
    assert original.keys() == loaded.keys()
    for path, layer in original.items():
        mine = loaded[path]
        assert (mine.name, mine.visible, mine.opacity) == (layer.name, layer.visible, layer.opacity), path
        if not layer.children:  # a group's own pixels are not in a PSD; its contents are
            written = crop_to_alpha(layer)  # what the writer stores
            assert np.array_equal(mine.pixels, written.pixels), path
            assert written.width == 0 or mine.offset == written.offset, path
    assert np.array_equal(composite(stack), composite(hidden))


def other_writers_psd(path):
    """A PSD made with psd-tools' own layer API, as another application would write it."""
    document = PSDImage.new("RGBA", (48, 40))
    PixelLayer.frompil(Image.new("RGBA", (20, 12), (250, 10, 10, 160)), document, "Hintergrund ä", top=3, left=4)
    group = Group.new(document, "Gruppe größe")
    PixelLayer.frompil(Image.new("RGBA", (6, 6), (10, 240, 10, 255)), group, "im Ordner", top=30, left=36)
    wide = PixelLayer.frompil(Image.new("RGBA", (60, 5), (10, 10, 250, 255)), group, "zu breit", top=-2, left=-5)
    wide.visible = False
    group.opacity = 128
    group[0].opacity = 200
    document.save(path)
    return path


def test_a_psd_from_another_writer_keeps_groups_hidden_layers_offsets_opacity_and_names(tmp_path):
    stack, messages = load_quietly(other_writers_psd(tmp_path / "other.psd"))
    assert messages == []
    assert stack.size == (48, 40)
    assert [layer.name for layer in stack] == ["Hintergrund ä", "Gruppe größe"]
    bottom, group = stack.layers
    assert (bottom.offset, bottom.pixels.shape, bottom.opacity, bottom.visible) == ((4, 3), (12, 20, 4), 255, True)
    assert np.all(bottom.pixels == (250, 10, 10, 160))
    assert group.opacity == 128 and group.visible
    inside, wide = group.children
    assert (inside.name, inside.offset, inside.opacity, inside.visible) == ("im Ordner", (36, 30), 200, True)
    assert (wide.name, wide.offset, wide.visible) == ("zu breit", (-5, -2), False)
    assert wide.pixels.shape == (5, 60, 4)  # pixels outside the canvas are kept
    # Drawn: the hidden layer not at all; the green square at 200/255, then its group at 128/255.
    flat = composite(stack).astype(int)
    assert flat[0, 0, 3] == 0  # only the hidden layer reaches there
    green = 200 * 128 / 255**2
    assert flat[32, 38, 3] == round(255 * green)
    assert np.array_equal(flat[32, 38, :3], [10, 240, 10])
    assert np.array_equal(flat[5, 6], [250, 10, 10, 160])
    # A second reader agrees: psd-tools' own compositor gives the same picture within a step or two.
    theirs = np.asarray(PSDImage.open(tmp_path / "other.psd").composite(force=True).convert("RGBA")).astype(int)
    visible = theirs[..., 3] > 0
    assert np.array_equal(visible, flat[..., 3] > 0)
    assert np.abs(theirs - flat)[visible].max() <= 2


def one_odd_layer(path, change, pixels=True, mode="RGBA", depth=8):
    """A two-layer document whose top layer ``change`` turns into something other than plain pixels."""
    document = PSDImage.new(mode, (20, 20), depth=depth)
    PixelLayer.frompil(Image.new("RGBA", (4, 4), (9, 9, 9, 255)), document, "base", top=1, left=1)
    image = Image.new("RGBA", (5, 5), (200, 0, 0, 255)) if pixels else Image.new("RGBA", (0, 0))
    layer = PixelLayer.frompil(image, document, "odd one", top=3, left=3)
    change(layer._record.tagged_blocks, layer)
    document.save(path)
    return path


def mark_as_text(blocks, layer):
    # The old type-tool block is stored as raw bytes by psd-tools; its presence makes a type layer.
    blocks[Tag.TYPE_TOOL_INFO] = TaggedBlock(key=Tag.TYPE_TOOL_INFO, data=b"\0\0\0\0")


def test_an_adjustment_layer_is_refused_naming_it(tmp_path):
    path = one_odd_layer(tmp_path / "adjust.psd", lambda blocks, layer: blocks.set_data(Tag.INVERT))
    assert PSDImage.open(path)[1].kind == "invert"
    with pytest.raises(ExportError, match=r"adjust\.psd: layer 2 'odd one' is an adjustment layer \(invert\)"):
        load_psd(path)


def test_a_text_layer_without_pixels_is_refused_and_one_with_pixels_is_kept_with_a_warning(tmp_path):
    empty = one_odd_layer(tmp_path / "text0.psd", mark_as_text, pixels=False)
    with pytest.raises(ExportError, match=r"layer 2 'odd one' is a text layer saved without pixels"):
        load_psd(empty)
    stack, messages = load_quietly(one_odd_layer(tmp_path / "text.psd", mark_as_text))
    assert len(messages) == 1 and "'odd one': a text layer, loaded as its stored pixels" in messages[0]
    assert np.all(stack[1].pixels == (200, 0, 0, 255)) and stack[1].offset == (3, 3)


def test_a_smart_object_is_loaded_as_its_pixels_with_a_warning(tmp_path):
    def mark(blocks, layer):
        blocks[Tag.PLACED_LAYER1] = TaggedBlock(key=Tag.PLACED_LAYER1, data=b"")

    path = one_odd_layer(tmp_path / "smart.psd", mark)
    assert PSDImage.open(path)[1].kind == "smartobject"
    stack, messages = load_quietly(path)
    assert len(messages) == 1 and "a smart object, loaded as its stored pixels" in messages[0]
    assert np.all(stack[1].pixels == (200, 0, 0, 255))


def test_what_is_drawn_differently_is_warned_about(tmp_path):
    def blend(blocks, layer):
        layer.blend_mode = BlendMode.MULTIPLY
        layer.clipping = True

    stack, messages = load_quietly(one_odd_layer(tmp_path / "multiply.psd", blend))
    assert len(stack) == 2
    assert any("blend mode multiply is not kept" in message for message in messages)
    assert any("the clipping is not kept" in message for message in messages)


def test_a_layer_mask_is_applied_to_alpha_with_a_warning(tmp_path):
    def masked(blocks, layer):
        mask = Image.new("L", (5, 5), 0)
        mask.paste(255, (0, 0, 5, 2))  # the top two rows shown, the rest hidden
        layer.create_mask(mask)

    path = one_odd_layer(tmp_path / "mask.psd", masked)
    if not PSDImage.open(path)[1].has_mask():
        pytest.skip("this psd-tools cannot write a layer mask")
    stack, messages = load_quietly(path)
    assert any("layer mask is applied" in message for message in messages)
    alpha = stack[1].pixels[..., 3]
    assert np.all(alpha[:2] == 255) and np.all(alpha[2:] == 0)


@pytest.mark.parametrize(
    "mode, depth, expected", [("RGBA", 16, r"16-bit per channel"), ("CMYK", 8, r"colour mode is CMYK")]
)
def test_documents_that_are_not_8_bit_rgb_are_refused(tmp_path, mode, depth, expected):
    path = tmp_path / "odd.psd"
    PSDImage.new(mode, (8, 8), depth=depth).save(path)
    with pytest.raises(ExportError, match=expected):
        load_psd(path)


def test_a_corrupt_or_missing_file_is_a_named_error(tmp_path):
    with pytest.raises(ExportError, match="no such file"):
        load_psd(tmp_path / "missing.psd")
    good = save_psd(LayerStack(8, 8, (Layer(np.full((8, 8, 4), 200, np.uint8)),)), tmp_path / "good.psd")
    broken = tmp_path / "broken.psd"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ExportError, match=r"broken\.psd: "):
        load_psd(broken)
    (tmp_path / "text.psd").write_text("not a psd")
    with pytest.raises(ExportError, match="not a readable PSD"):
        load_psd(tmp_path / "text.psd")


def test_layer_files_pick_the_format_by_suffix(tree, tmp_path):
    flagged = tree.with_layer(2, tree[2].replace(visible=False, opacity=90))
    for name in ("t.psd", "t.zip"):
        loaded = load_layer_file(save_layer_file(flagged, tmp_path / name))
        assert np.array_equal(composite(loaded), composite(flagged))
        assert (loaded[2].visible, loaded[2].opacity) == (False, 90)
    with pytest.raises(ExportError, match=r"t\.tiff.*expected one of \.psd, \.zip"):
        save_layer_file(flagged, tmp_path / "t.tiff")
