"""``evaluate``: folders of layer stacks scored with LayerD's metrics, on a small synthetic set whose scores are
reasoned out by hand; the three sample formats, the table, the JSON, and the errors that name the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layered_core.cli import main
from layered_core.compositing import composite, render_layer
from layered_core.evaluate import EvaluationError, evaluate, find_samples, read_sample
from layered_core.export import save_png_zip
from layered_core.layers import Layer, LayerStack
from layered_core.metrics import group_non_overlapping
from layered_core.psd import save_psd
from layered_core.synthetic import synthetic_design
from layered_core.tiny_models import write_tiny_set

WIDTH, HEIGHT = 64, 48


def canvases(stack: LayerStack) -> list[np.ndarray]:
    return [render_layer(layer, stack.width, stack.height) for layer in stack.layers]


def write_pngs(stack: LayerStack, folder: Path, name: str = "{index:02d}.png") -> Path:
    folder.mkdir(parents=True)
    for index, pixels in enumerate(canvases(stack)):
        Image.fromarray(pixels, "RGBA").save(folder / name.format(index=index, number=index + 1))
    return folder


def background_off_by_one(stack: LayerStack) -> LayerStack:
    """The stack with every colour value of its (opaque) background one 8-bit step away: c XOR 1."""
    background = stack.layers[0]
    pixels = background.pixels.copy()
    pixels[..., :3] ^= 1
    return LayerStack(stack.width, stack.height, (background.replace(pixels=pixels),) + stack.layers[1:])


@pytest.fixture(scope="module")
def designs():
    return [synthetic_design(WIDTH, HEIGHT, layer_count=5, seed=seed) for seed in range(3)]


@pytest.fixture(scope="module")
def folders(designs, tmp_path_factory):
    """Ground truth: the three designs as a LayerD folder of PNGs, a PSD and a PNG zip. Prediction: d0 the
    same layers under decompose's PNG names; d1 the background off by one step, in decompose's default layout
    (<name>/layers.psd, with the input as a hidden bottom layer); d2 a single layer, the composite."""
    base = tmp_path_factory.mktemp("evaluate")
    truth, prediction = base / "truth", base / "prediction"
    first, second, third = designs
    write_pngs(first, truth / "d0")
    save_psd(second, truth / "d1.psd")
    save_png_zip(third, truth / "d2.zip")
    write_pngs(first, prediction / "d0", "layer_{number:02d}.png")
    (prediction / "d1").mkdir(parents=True)
    save_psd(background_off_by_one(second), prediction / "d1" / "layers.psd", input_image=composite(second))
    flat = LayerStack(WIDTH, HEIGHT, (Layer(composite(third), "composite"),))
    save_png_zip(flat, prediction / "d2.zip")
    (prediction / ".d3.partial").mkdir()  # decompose's staging folder: not a sample
    (prediction / "notes.txt").write_text("not a sample\n")
    return prediction, truth


def off_by_one_l1(stack: LayerStack) -> float:
    """RGB L1 of the off-by-one prediction: 1/255 on the background's group (the background alone: every
    layer overlaps it), 0 on every other group, averaged over the diagonal alignment of the groups."""
    groups = group_non_overlapping([pixels[..., 3] for pixels in canvases(stack)])
    assert groups[0] == [0]
    return 1 / 255 / len(groups)


def test_the_synthetic_set_scores_as_reasoned(folders, designs):
    prediction, truth = folders
    assert list(find_samples(prediction)) == ["d0", "d1", "d2"]
    evaluation = evaluate(prediction, truth)
    by_name = {sample.name: sample for sample in evaluation.samples}
    for score in by_name["d0"].scores:  # the same layers: nothing to merge, nothing off
        assert (score.rgb_l1, score.alpha_iou, score.merges_used) == (0.0, 1.0, 0)
    expected = off_by_one_l1(designs[1])
    for score in by_name["d1"].scores:  # merging only spoils layers that match already
        assert score.rgb_l1 == pytest.approx(expected, rel=1e-7)
        assert (score.alpha_iou, score.merges_used) == (1.0, 0)
    assert by_name["d1"].scores[0].layer_counts == (5, 5)  # the hidden input layer is not one of them
    assert by_name["d2"].scores[0].layer_counts == (1, 5)
    # LayerD's filter: d2's prediction has a single layer, so the table averages d0 and d1.
    assert evaluation.left_out == ["d2"]
    assert [row.merges for row in evaluation.table] == [0, 1, 2, 3, 4, 5]
    for row in evaluation.table:
        assert row.samples == 2 and row.merges_used == 0.0
        assert row.rgb_l1 == pytest.approx(expected / 2, rel=1e-7) and row.alpha_iou == 1.0
    everything = evaluate(prediction, truth, max_merges=2, layerd_filter=False)
    assert everything.left_out == [] and [row.samples for row in everything.table] == [3, 3, 3]
    d2 = everything.samples[2].scores
    assert everything.table[0].rgb_l1 == pytest.approx((expected + d2[0].rgb_l1) / 3, rel=1e-7)


def test_the_command_prints_table_1_and_writes_every_sample(folders, designs, tmp_path, capsys):
    prediction, truth = folders
    scores = tmp_path / "scores.json"
    assert main(["evaluate", str(prediction), str(truth), "--json", str(scores)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = off_by_one_l1(designs[1]) / 2
    assert lines[0].split() == "RGB L1 (lower is better) Alpha soft IoU (higher is better)".split()
    assert lines[1].split() == ["Max", "#merges"] + [str(merges) for merges in range(6)] * 2
    assert lines[2].split() == ["prediction"] + [f"{expected:.4f}"] * 6 + ["1.0000"] * 6
    assert lines[3] == "2 samples (1 left out by LayerD's filter: fewer than 2 layers on a side)"
    assert lines[4] == "mean merges used: " + " ".join(["0.00"] * 6)
    assert lines[5] == f"every sample's scores: {scores}"
    document = json.loads(scores.read_text())
    assert document["left_out"] == ["d2"] and document["layerd_filter"] is True
    assert [sample["name"] for sample in document["samples"]] == ["d0", "d1", "d2"]
    assert [sample["in_table"] for sample in document["samples"]] == [True, True, False]
    d1 = document["samples"][1]
    assert d1["layers"] == [5, 5] and d1["prediction"] == str((prediction / "d1").resolve())
    assert [score["merges"] for score in d1["scores"]] == [0, 1, 2, 3, 4, 5]
    assert d1["scores"][5]["rgb_l1"] == pytest.approx(2 * expected, rel=1e-7)
    assert document["table"][0]["rgb_l1"] == pytest.approx(expected, rel=1e-7) and document["table"][0]["samples"] == 2
    # By default the JSON goes into the prediction folder, and is no sample there.
    copied = tmp_path / "copy"
    shutil.copytree(prediction, copied)
    assert main(["evaluate", str(copied), str(truth), "--all-samples", "--max-merges", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 samples\n" in out and f"every sample's scores: {copied / 'layerd_scores.json'}" in out
    assert main(["evaluate", str(copied), str(truth)]) == 0


def test_psd_and_zip_samples_read_back_their_layers(tree, tmp_path):
    save_psd(tree, tmp_path / "tree.psd", input_image=composite(tree))
    save_png_zip(tree, tmp_path / "tree.zip")
    for path in (tmp_path / "tree.psd", tmp_path / "tree.zip"):
        stack = read_sample(path)
        assert stack.size == tree.size and [layer.name for layer in stack.layers] == [layer.name for layer in tree]
        for read, original in zip(canvases(stack), canvases(tree), strict=True):
            assert np.array_equal(read, original), path


def test_unpaired_and_unreadable_samples_are_named(folders, tmp_path, capsys):
    prediction, truth = folders
    lonely = tmp_path / "lonely"
    shutil.copytree(prediction, lonely)
    shutil.copytree(lonely / "d0", lonely / "extra")
    assert main(["evaluate", str(lonely), str(truth), "--json", str(tmp_path / "x.json")]) == 1
    assert f"error: {lonely} has 1 sample with no namesake in {truth}: extra" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

    broken = tmp_path / "broken"
    shutil.copytree(prediction, broken)
    (broken / "d1" / "layers.psd").write_bytes(b"8BPS but nothing a PSD needs")
    with pytest.raises(EvaluationError, match=re.escape(f"{broken / 'd1' / 'layers.psd'}: not a readable PSD")):
        evaluate(broken, truth)
    (broken / "d1" / "layers.psd").unlink()
    with pytest.raises(EvaluationError, match="d1: holds no PNG layers, and no layers.zip or layers.psd"):
        evaluate(broken, truth)
    (broken / "d1.zip").write_bytes(b"PK not a zip")
    with pytest.raises(EvaluationError, match="two samples are named 'd1' \\(d1 and d1.zip\\)"):
        evaluate(broken, truth)
    with pytest.raises(EvaluationError, match="no samples"):
        evaluate(tmp_path / "broken" / "d0", truth)


def test_canvas_sizes_and_layer_order_are_checked(designs, tmp_path):
    truth = tmp_path / "truth"
    write_pngs(designs[0], truth / "a")
    small = synthetic_design(32, 32, layer_count=3, seed=0)
    write_pngs(small, tmp_path / "small" / "a")
    with pytest.raises(EvaluationError, match="is 32x32 but .* is 64x48; the layers must be at the ground truth"):
        evaluate(tmp_path / "small", truth)

    mixed = write_pngs(designs[0], tmp_path / "mixed" / "a")
    Image.new("RGBA", (8, 8)).save(mixed / "99.png")
    with pytest.raises(EvaluationError, match="99.png: is 8x8 but 00.png is 64x48"):
        read_sample(mixed)
    eleven = synthetic_design(WIDTH, HEIGHT, layer_count=11, seed=0)
    unpadded = write_pngs(eleven, tmp_path / "unpadded", "{index}.png")
    with pytest.raises(EvaluationError, match=re.escape("without leading zeros, so name order (10.png before 2.png)")):
        read_sample(unpadded)


def test_decompose_writes_a_folder_that_evaluate_reads(designs, tmp_path, capsys):
    """``decompose --format png --input-size`` gives the prediction folder straight away: a folder of PNG
    layers per input image, named after it, at the input's size."""
    models = write_tiny_set(tmp_path / "models")
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    Image.fromarray(composite(designs[0]), "RGBA").save(images / "d0.png")
    write_pngs(designs[0], truth / "d0")
    out = tmp_path / "prediction"
    args = ["decompose", str(images), "--out", str(out), "--model", str(models), "--layers", "2", "--steps", "1"]
    args += ["--device", "cpu", "--dtype", "fp32", "--prompt", "a design", "--format", "png", "--input-size"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), str(truth)]) == 0
    assert "\n1 sample\n" in capsys.readouterr().out
    document = json.loads((out / "layerd_scores.json").read_text())
    assert [(sample["name"], sample["layers"]) for sample in document["samples"]] == [("d0", [2, 5])]
