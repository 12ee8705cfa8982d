"""``python -m layered_core edit``: the operations in the order given, the layers they do not name bit-identical,
``--list`` as a layer panel, and every mistake one line with exit code 2 and nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from layered_core import edits
from layered_core.cli import main
from layered_core.compositing import composite
from layered_core.export import load_png_zip
from layered_core.layers import attach_split
from layered_core.psd import save_psd
from layered_core.psd_read import load_psd
from layered_core.synthetic import synthetic_design

from .conftest import halves


@pytest.fixture
def poster(tmp_path):
    """A pack PSD as decompose writes it: the input as a hidden bottom layer, then 5 layers, layer 4 split."""
    stack = synthetic_design(160, 120, layer_count=5, seed=3)
    stack = attach_split(stack, 3, halves(stack[3], ("top half", "bottom half")))
    return save_psd(stack, tmp_path / "poster.psd", input_image=composite(stack))


def test_list_prints_the_layers_top_first_with_numbers_and_boxes(poster, capsys):
    assert main(["edit", str(poster), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stack = load_psd(poster)
    assert lines[0] == "canvas 160x120, 6 layers (path: name, box)"
    top = stack[5]
    box = top.drawn_box()
    assert lines[1] == f"6: {top.name!r}  (box {box[0]},{box[1]},{box[2]},{box[3]})"
    assert lines[-1] == "1: 'Input image'  (box 0,0,160,120, hidden)"
    assert any(line.startswith("  5/2: 'bottom half'") for line in lines)
    assert "split into 2" in next(line for line in lines if line.startswith("5: "))


def test_the_issue_example_edits_in_order_and_leaves_the_rest_bit_identical(poster, tmp_path, capsys):
    out = tmp_path / "out.psd"
    code = main(
        ["edit", str(poster), "--recolor", "2:hue=40", "--move", "3:+20,-10", "--scale", "4:1.5", "--remove", "6"]
        + ["--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    original, result = load_psd(poster), load_psd(out)
    expected = edits.recolor(original, 1, hue_shift=40)
    expected = edits.move(expected, 2, 20, -10)
    expected = edits.resize(expected, 3, 1.5)
    expected = edits.remove(expected, 5)
    assert len(result) == 5
    for (path, want), (_, got) in zip(expected.walk(), result.walk(), strict=True):
        assert (want.name, want.offset, want.visible, want.opacity) == (got.name, got.offset, got.visible, got.opacity)
        if not want.children:
            assert np.array_equal(want.pixels, got.pixels), path
    # the hidden input layer and layer 5 (its sub-layers too) were not named: bit for bit as they were
    for path in [(0,), (4,), (4, 0), (4, 1)]:
        assert np.array_equal(original.get(path).pixels, result.get(path).pixels) or original.get(path).children
        assert original.get(path).offset == result.get(path).offset
    # a second reader sees the same picture
    theirs = np.asarray(PSDImage.open(out).composite(force=True).convert("RGBA")).astype(int)
    ours = composite(result).astype(int)
    drawn = ours[..., 3] > 0
    assert np.abs(theirs - ours)[drawn].max() <= 2


def test_every_other_operation_and_a_zip_out(poster, tmp_path, capsys):
    patch = tmp_path / "patch.png"
    Image.new("RGB", (30, 20), (255, 0, 255)).save(patch)
    out = tmp_path / "out.zip"
    args = ["edit", str(poster), "--replace", f"3:{patch}@fit", "--flip", "4:hv", "--opacity", "2:50"]
    args += ["--hide", "6", "--show", "1", "--reorder", "5:top", "--merge", "1:2", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    original, result = load_psd(poster), load_png_zip(out)
    # 3 takes the patch's colour inside the old layer's shape (an RGB image keeps the layer's alpha)
    replaced = result[1]
    assert replaced.offset == original[2].drawn_box()[:2]
    assert (replaced.pixels[replaced.pixels[..., 3] > 0][:, :3] == (255, 0, 255)).all()
    assert np.array_equal(replaced.pixels[..., 3] > 0, original[2].pixels[..., 3] > 0)
    flipped = result[2]
    assert np.array_equal(flipped.pixels, original[3].pixels[::-1, ::-1])
    assert (result[3].name, result[3].visible) == (original[5].name, False)  # hidden, then moved down by the reorder
    assert result[4].name == original[4].name  # the split layer, now on top
    assert result[0].name == "Input image + background" and result[0].visible
    assert len(result) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--move", "9:1,1"], "--move 9:1,1: layer '9' does not exist: the stack has 6 layers"),
        (["--move", "5/3:1,1"], "layer '5/3' does not exist: layer 5 has 2 layers"),
        (["--scale", "2:0"], "--scale 2:0: scale must be positive"),
        (["--scale", "2:nan"], "scale must be a finite number"),
        (["--recolor", "2:hue=inf"], "hue must be a finite number"),
        (["--recolor", "2:sat=-1"], "saturation must be >= 0"),
        (["--recolor", "2:colour=3"], "expected KEY=VALUE items from hue, sat, light, tint, strength"),
        (["--move", "2:1.5,0"], "dx must be a whole number"),
        (["--move", "x:1,1"], "expected layer numbers separated by '/'"),
        (["--move", "2"], "expected LAYER:VALUE, such as 3:+20,-10"),
        (["--flip", "2:d"], "expected LAYER:h, LAYER:v or LAYER:hv"),
        (["--replace", "2:missing.png"], "no such image file 'missing.png'"),
        (["--merge", "6:2"], "needs 2 or more layers from 'text 4' upwards"),
        (["--reorder", "2:0"], "positions count from 1"),
        ([], "no edit given"),
    ],
)
def test_mistakes_are_one_line_exit_2_and_nothing_written(poster, tmp_path, capsys, args, message):
    out = tmp_path / "out.psd"
    assert main(["edit", str(poster), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_output_is_never_overwritten_without_asking_and_bad_files_are_named(poster, tmp_path, capsys):
    out = tmp_path / "out.psd"
    out.write_bytes(b"earlier work")
    assert main(["edit", str(poster), "--move", "2:1,1", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"earlier work"
    assert main(["edit", str(poster), "--move", "2:1,1", "--out", str(out), "--overwrite"]) == 0
    before = load_psd(poster)[1].offset
    assert load_psd(out)[1].offset == (before[0] + 1, before[1] + 1)
    assert main(["edit", str(poster), "--move", "2:1,1", "--out", str(tmp_path / "out.tiff")]) == 2
    assert "expected a file ending in .psd, .zip" in capsys.readouterr().err
    broken = tmp_path / "broken.psd"
    broken.write_bytes(poster.read_bytes()[:100])
    assert main(["edit", str(broken), "--list"]) == 1
    assert "broken.psd" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "none.psd"), "--list"]) == 2
    assert "none.psd: no such file" in capsys.readouterr().err


def test_list_with_an_edit_still_guards_the_output_and_names_with_at_signs_are_files(poster, tmp_path, capsys):
    out = tmp_path / "out.psd"
    out.write_bytes(b"earlier work")
    assert main(["edit", str(poster), "--list", "--remove", "2", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"earlier work"
    icon = tmp_path / "icon@2x.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(icon)
    assert main(["edit", str(poster), f"--replace=2:{icon}@fit", "--flip=-1:h", "--out", str(tmp_path / "b.psd")]) == 0


def test_removing_the_last_sub_layer_leaves_a_layer_that_draws_nothing(poster):
    stack = load_psd(poster)
    once = edits.remove(stack, (4, 1))
    twice = edits.remove(once, (4, 0))
    assert not twice[4].children and twice[4].pixels.shape == (0, 0, 4)
    assert np.array_equal(composite(twice), composite(edits.remove(stack, 4)))
