"""The ZIP of PNGs with its manifest: written, read back, refused when it is not one."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from layered_core.compositing import composite
from layered_core.export import ExportError, load_png_zip, save_png_zip
from layered_core.layers import crop_to_alpha


def test_png_zip_round_trip(tree, tmp_path):
    path = save_png_zip(tree, tmp_path / "tree.zip", input_image=composite(tree))
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json").decode("utf-8"))
        assert manifest["canvas"] == {"width": 160, "height": 120}
        assert manifest["order"] == "bottom-to-top"
        assert [entry["name"] for entry in manifest["layers"]] == [layer.name for layer in tree]
        split = manifest["layers"][3]
        assert [child["name"] for child in split["children"]] == ["upper", "lower"]
        assert [child["name"] for child in split["children"][1]["children"]] == ["lower top", "lower bottom"]
        assert manifest["layers"][-1]["file"] is None and manifest["layers"][-1]["size"] == [0, 0]
        with archive.open("composite.png") as file:
            assert np.array_equal(np.asarray(Image.open(file)), composite(tree))
        first = manifest["layers"][1]
        with archive.open(first["file"]) as file:
            pixels = np.asarray(Image.open(file))
        cropped = crop_to_alpha(tree[1])
        assert first["offset"] == list(cropped.offset) and np.array_equal(pixels, cropped.pixels)
    back = load_png_zip(path)
    assert back.size == tree.size
    for (path_a, mine), (path_b, read) in zip(tree.walk(), back.walk(), strict=True):
        cropped = crop_to_alpha(mine)  # colour under transparent pixels outside the alpha box is not kept
        assert path_a == path_b and read.name == mine.name and read.offset == cropped.offset
        assert np.array_equal(read.pixels, cropped.pixels)
    assert np.array_equal(composite(back), composite(tree))
    with pytest.raises(ExportError, match="not a layer ZIP"):
        empty = tmp_path / "empty.zip"
        with zipfile.ZipFile(empty, "w"):
            pass
        load_png_zip(empty)


def test_png_zip_reports_each_png_then_the_file_written(tree, tmp_path):
    """progress(done, total): one report per PNG in the archive (composite, input, each non-empty layer of the
    tree, split ones too) while the file is not there yet, and the last, done == total, once it is."""
    path = tmp_path / "tree.zip"
    reports = []
    save_png_zip(
        tree, path, input_image=composite(tree), progress=lambda *report: reports.append((*report, path.exists()))
    )
    with zipfile.ZipFile(path) as archive:
        pngs = [name for name in archive.namelist() if name.endswith(".png")]
    assert len(pngs) == 2 + sum(1 for _, layer in tree.walk() if crop_to_alpha(layer).width)
    total = len(pngs) + 1
    assert reports == [(done, total, False) for done in range(1, total)] + [(total, total, True)]
