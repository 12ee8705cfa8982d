"""Many images: one folder each, failures reported, finished images skipped on a rerun."""

from __future__ import annotations

import json

import torch

from layered_core.batch import BatchSettings, find_images, output_folder, run_batch
from layered_core.pipeline import DecomposeOptions, LayeredPipeline

from .conftest import picture


def test_batch_runs_skips_and_reports_failures(pipeline, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(2):
        picture(64, 48, seed=index).save(inputs / f"good{index}.png")
    (inputs / "broken.png").write_bytes(b"not an image at all")
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    images = find_images([inputs])
    assert [p.name for p in images] == ["broken.png", "good0.png", "good1.png"]
    settings = BatchSettings(DecomposeOptions(layer_count=2, steps=1), prompt="a test", formats=("psd", "zip", "png"))
    out = tmp_path / "out"
    first = run_batch(pipeline, images, out, settings)
    assert [p.name for p in first.done] == ["good0.png", "good1.png"]
    assert list(first.failed) == [images[0]] and "not a readable image" in first.failed[images[0]]
    for name in ("good0", "good1"):
        folder = out / name
        assert {p.name for p in folder.iterdir()} == {
            "layers.psd",
            "layers.zip",
            "layer_01.png",
            "layer_02.png",
            "done.json",
        }
        assert json.loads((folder / "done.json").read_text())["layers"] == 2
    assert not (out / "broken").exists() or not (out / "broken" / "done.json").exists()

    # rerun: only the failed image is tried again
    picture(64, 48, seed=9).save(images[0])  # now readable
    second = run_batch(pipeline, images, out, settings)
    assert [p.name for p in second.skipped] == ["good0.png", "good1.png"]
    assert [p.name for p in second.done] == ["broken.png"] and not second.failed

    # other settings: nothing is skipped
    third = run_batch(
        pipeline, images[:1], out, BatchSettings(DecomposeOptions(layer_count=1, steps=1), prompt="a test")
    )
    assert [p.name for p in third.done] == ["broken.png"]


def test_batch_output_folders_never_collide_or_escape(tmp_path):
    out = tmp_path / "out"
    a, b, dots = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "...png"
    images = [a, b, dots]
    folders = [output_folder(out, image, images) for image in images]
    assert len(set(folders)) == 3
    assert all(folder.parent == out for folder in folders)
    assert folders[2].name == "image"


class FailingSplitPipeline(LayeredPipeline):
    def split(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_batch_keeps_the_decomposition_when_a_split_fails(pipeline, tmp_path):
    failing = FailingSplitPipeline(pipeline.transformer, pipeline.vae, pipeline.text_encoder)
    picture(64, 48).save(tmp_path / "img.png")
    settings = BatchSettings(DecomposeOptions(layer_count=2, steps=1), prompt="x", formats=("png",), split_depth=1)
    result = run_batch(failing, [tmp_path / "img.png"], tmp_path / "out", settings)
    assert "out of memory" in result.failed[tmp_path / "img.png"]
    folder = tmp_path / "out" / "img"
    assert sorted(p.name for p in folder.iterdir()) == ["layer_01.png", "layer_02.png"]  # kept, not marked done


def test_batch_rerun_with_fewer_layers_leaves_no_stale_files(pipeline, tmp_path):
    picture(64, 48).save(tmp_path / "img.png")
    out = tmp_path / "out"
    run_batch(
        pipeline, [tmp_path / "img.png"], out, BatchSettings(DecomposeOptions(layer_count=3, steps=1), "x", ("png",))
    )
    run_batch(
        pipeline, [tmp_path / "img.png"], out, BatchSettings(DecomposeOptions(layer_count=1, steps=1), "x", ("png",))
    )
    assert sorted(p.name for p in (out / "img").iterdir()) == ["done.json", "layer_01.png"]
    assert json.loads((out / "img" / "done.json").read_text())["layers"] == 1
