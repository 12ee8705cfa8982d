"""PSD and PNG-ZIP export, read back with psd-tools and with Pillow; limits; no half-written files."""

import os

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.compression import compress, decompress
from psd_tools.constants import Compression
from psd_tools.psd import PSD

from layered_core import edits
from layered_core.compositing import composite
from layered_core.export import ExportError
from layered_core.layers import Layer, LayerStack, crop_to_alpha
from layered_core.psd import PSD_MAX_LAYERS, _even_length, save_psd
from layered_core.synthetic import synthetic_design

from .conftest import UNICODE_NAME


def expected_records(stack):
    """(kind, name, depth) of every entry psd-tools should show, bottom to top, depth first."""
    out = []

    def visit(layers, depth):
        for layer in layers:
            if layer.children:
                out.append(("group", layer.name, depth))
                visit(layer.children, depth + 1)
            else:
                out.append(("pixel", layer.name, depth))

    visit(stack.layers, 0)
    return out


def read_psd_tools(group, depth=0):
    out = []
    for layer in group:
        out.append((layer, depth))
        if layer.is_group():
            out.extend(read_psd_tools(layer, depth + 1))
    return out


def test_psd_round_trip_through_psd_tools(tree, tmp_path):
    path = save_psd(tree, tmp_path / "tree.psd", input_image=composite(tree)[..., :3])
    document = PSDImage.open(path)
    assert document.size == (160, 120) and document.channels == 4 and document.depth == 8
    entries = read_psd_tools(document)
    # The input image first, hidden; then the stack's layers and groups in order, nested as the tree.
    hidden, _ = entries[0]
    assert (hidden.name, hidden.visible, hidden.offset, hidden.size) == (
        "Input image",
        False,
        (0, 0),
        (160, 120),
    )
    assert np.array_equal(np.asarray(hidden.topil()), composite(tree))
    read_back = [("group" if layer.is_group() else "pixel", layer.name, depth) for layer, depth in entries[1:]]
    assert read_back == expected_records(tree)
    assert any(name == UNICODE_NAME for _, name, _ in read_back)
    # Every pixel layer: cut to its alpha box, at its offset, bit-exact.
    ours = [layer for layer in tree.leaves()]
    theirs = [layer for layer, _ in entries[1:] if not layer.is_group()]
    assert len(ours) == len(theirs)
    for mine, read in zip(ours, theirs, strict=True):
        cropped = crop_to_alpha(mine)
        assert read.visible
        if cropped.width == 0:
            assert read.size == (0, 0)
            continue
        assert read.offset == cropped.offset and read.size == (cropped.width, cropped.height)
        assert np.array_equal(np.asarray(read.topil()), cropped.pixels), mine.name


def test_psd_tools_composite_of_the_file_matches_ours(tree, tmp_path):
    path = save_psd(tree, tmp_path / "tree.psd", input_image=composite(tree))
    document = PSDImage.open(path)
    ours = composite(tree).astype(int)
    # The stored preview is our composite, bit for bit ...
    assert np.array_equal(np.asarray(document.composite().convert("RGBA")), ours)
    # ... and psd-tools' own compositing of the layers (the hidden input layer left out) agrees.
    rendered = np.asarray(document.composite(ignore_preview=True).convert("RGBA")).astype(int)
    assert np.abs(rendered - ours).max() <= 2


def file_order(layers):
    """The records a PSD holds for ``layers``, bottom to top: a group is its end marker, its contents,
    then the group record itself."""
    out = []
    for layer in layers:
        if layer.children:
            out += [("group end", "</Layer group>")] + file_order(layer.children) + [("group", layer.name)]
        else:
            out.append(("pixels", layer))
    return out


def pillow_frame(image, frame):
    # Pillow opens a PSD "at frame 1" while showing the flattened image, so seek(1) straight after opening
    # does nothing; going through another frame first loads the first layer for real.
    if frame == 1 and len(image.layers) > 1:
        image.seek(2)
    image.seek(frame)
    return image.convert("RGBA")


def test_psd_round_trip_through_pillow(tree, tmp_path):
    path = save_psd(tree, tmp_path / "tree.psd")
    ours = composite(tree)
    with Image.open(path) as image:
        assert image.mode == "RGBA" and image.size == (160, 120)
        assert np.array_equal(np.asarray(image), ours)  # the flattened preview
        records = file_order(tree.layers)
        assert len(image.layers) == len(records)
        rebuilt = Image.new("RGBA", image.size, (0, 0, 0, 0))
        checked = 0
        for frame, ((name, _, bbox, _), expected) in enumerate(zip(image.layers, records, strict=True), start=1):
            if expected[0] != "pixels":
                assert name == expected[1] and bbox == (0, 0, 0, 0)
                continue
            mine = crop_to_alpha(expected[1])
            # Pillow reads the legacy names: ASCII, with "?" for what ASCII cannot spell.
            assert name == mine.name.encode("ascii", "replace").decode()
            assert bbox == (*mine.offset, mine.offset[0] + mine.width, mine.offset[1] + mine.height)
            if mine.width == 0:
                continue
            pixels = np.asarray(pillow_frame(image, frame).crop(bbox))
            assert np.array_equal(pixels, mine.pixels), name
            placed = Image.new("RGBA", image.size, (0, 0, 0, 0))
            placed.paste(Image.fromarray(pixels), bbox[:2])
            rebuilt = Image.alpha_composite(rebuilt, placed)
            checked += 1
        assert checked == len(tree.leaves()) - 1  # all but the empty layer
        assert "?berschrift ?? ?" in [name for name, *_ in image.layers]
    assert np.abs(np.asarray(rebuilt).astype(int) - ours.astype(int)).max() <= 2


def test_rle_channels_are_made_even_without_changing_their_pixels():
    rng = np.random.default_rng(5)
    fixed = 0
    for trial in range(40):
        height, width = int(rng.integers(1, 6)), int(rng.integers(1, 300))
        plane = rng.integers(0, 3, (height, width), dtype=np.uint8)  # short runs and literals
        plane[:, : width // 2] = trial  # and long runs
        encoded = compress(plane.tobytes(), Compression.RLE, width, height, 8, 1)
        even = _even_length(encoded, height)
        assert (len(even) - 2 * height) % 2 == 0
        assert decompress(even, Compression.RLE, width, height, 8, 1) == plane.tobytes()
        fixed += even != encoded
    assert fixed > 5


def test_layers_off_the_canvas_keep_their_pixels(tmp_path):
    stack = synthetic_design(64, 64, layer_count=3, seed=2)
    moved = edits.move(stack, 2, -40, 50)
    path = save_psd(moved, tmp_path / "moved.psd")
    read = list(PSDImage.open(path))[2]
    cropped = crop_to_alpha(moved[2])
    assert read.offset == cropped.offset and np.array_equal(np.asarray(read.topil()), cropped.pixels)


def test_psd_refuses_what_it_cannot_hold(tmp_path):
    wide = LayerStack(30001, 2, (Layer(np.zeros((1, 1, 4), np.uint8)),))
    with pytest.raises(ExportError, match=r"wide.psd: the canvas is 30001x2 pixels; a PSD holds at most 30000"):
        save_psd(wide, tmp_path / "wide.psd")
    long_layer = np.full((1, 30001, 4), 255, np.uint8)
    with pytest.raises(ExportError, match="layer 'long' is 30001x1 pixels"):
        save_psd(LayerStack(100, 100, (Layer(long_layer, "long", (-15000, 0)),)), tmp_path / "long.psd")
    dot = Layer(np.full((1, 1, 4), 255, np.uint8), "dot")
    crowded = LayerStack(4, 4, (dot,) * PSD_MAX_LAYERS)
    save_psd(crowded, tmp_path / "full.psd")  # exactly the limit is fine
    with pytest.raises(ExportError, match=f"{PSD_MAX_LAYERS + 1} layers and groups; Photoshop opens at most"):
        save_psd(crowded, tmp_path / "crowded.psd", input_image=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ExportError, match="the input image is 3x3, expected the canvas size 4x4"):
        save_psd(LayerStack(4, 4, (dot,)), tmp_path / "input.psd", input_image=np.zeros((3, 3, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["full.psd"]


def test_names_longer_than_photoshop_allows_are_cut(tmp_path):
    long_name = "Ä" * 300
    stack = LayerStack(4, 4, (Layer(np.full((2, 2, 4), 255, np.uint8), long_name),))
    path = save_psd(stack, tmp_path / "long.psd", input_image=np.zeros((4, 4, 3), np.uint8), input_name="ü" * 256)
    names = [layer.name for layer in PSDImage.open(path)]
    assert names == ["ü" * 255, "Ä" * 255]


def test_save_reports_each_layer_encoded_then_the_file_written(tree, tmp_path):
    """progress(done, total): one report per pixel layer (the input's too, not the groups), counting up while
    the file is not there yet, and the last, done == total, once it is."""
    path = tmp_path / "tree.psd"
    reports = []
    save_psd(tree, path, input_image=composite(tree), progress=lambda *report: reports.append((*report, path.exists())))
    pixel_layers = sum(1 for layer in PSDImage.open(path).descendants() if not layer.is_group())
    assert pixel_layers == len(tree.leaves()) + 1
    total = pixel_layers + 1
    assert reports == [(done, total, False) for done in range(1, total)] + [(total, total, True)]


def test_a_failed_save_leaves_nothing_half_written(tree, tmp_path, monkeypatch):
    target = tmp_path / "out.psd"
    target.write_bytes(b"the previous version")

    def broken_write(self, file, **kwargs):
        file.write(b"8BPS partial data")
        raise OSError("disk full")

    monkeypatch.setattr(PSD, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_psd(tree, target)
    assert target.read_bytes() == b"the previous version"
    assert os.listdir(tmp_path) == ["out.psd"]
    with pytest.raises(OSError, match="disk full"):
        save_psd(tree, tmp_path / "new.psd")
    assert os.listdir(tmp_path) == ["out.psd"]


def test_the_merged_image_readers_show_is_the_composite_where_it_is_semi_transparent(tmp_path):
    """Readers remove a white matte from a transparent merged image (psd-tools' topil does, as Photoshop and
    thumbnailers do): what they show must be our composite. Compared premultiplied, as it is seen: the colour
    of a nearly transparent pixel holds few levels of information either way."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (40, 60, 4), dtype=np.uint8)
    pixels[..., 3] = rng.integers(1, 255, (40, 60))  # semi-transparent everywhere
    pixels[:10, :10, 3] = 255
    soft = np.zeros((30, 30, 4), np.uint8)
    soft[..., :3] = (250, 20, 90)
    soft[..., 3] = np.linspace(0, 200, 30, dtype=np.uint8)[None, :]
    stack = LayerStack(80, 60, (Layer(pixels, "noise"), Layer(soft, "soft edge", (45, 25))))
    want = composite(stack).astype(np.float64)
    shown = np.asarray(PSDImage.open(save_psd(stack, tmp_path / "soft.psd")).topil().convert("RGBA")).astype(float)
    assert np.array_equal(shown[..., 3], want[..., 3])
    alpha = want[..., 3:] / 255
    assert want[..., 3].min() == 0 and 0 < want[..., 3].mean() < 255  # transparent and semi-transparent pixels
    assert np.abs(shown[..., :3] * alpha - want[..., :3] * alpha).max() <= 1.0
