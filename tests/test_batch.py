"""Many images: one folder each, failures reported, finished images skipped on a rerun and redone when they
no longer match, nothing that looks finished before an image is."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.batch import (
    BatchSettings,
    find_images,
    images_in_subfolders,
    output_folder,
    run_batch,
    upscale_warning,
)
from layered_core.image import bucket_size, resize_rgba, to_rgba
from layered_core.pipeline import DecomposeOptions, Decomposition, LayeredPipeline
from layered_core.progress import Progress
from layered_core.sampling import StepInfo

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


class QuickPipeline(LayeredPipeline):
    """No model: each layer is one horizontal band of the input, so what the batch does around the model runs
    in milliseconds. Records every call; ``split_error`` is raised by :meth:`split`."""

    def __init__(self, split_error: BaseException | None = None):
        super().__init__(None, None, None)
        self.calls: list[tuple[tuple[int, int], int]] = []
        self.split_error = split_error

    def __call__(self, image, prompt=None, options=None, callback=None, prompt_embeddings=None, decode_progress=None):
        options = options or DecomposeOptions()
        self.calls.append((image.size, options.layer_count))
        size = image.size if options.keep_input_size else bucket_size(*image.size, options.resolution)
        pixels = np.asarray(resize_rgba(to_rgba(image), size), np.float32) / 255
        composite = torch.from_numpy(pixels).permute(2, 0, 1)
        bands = torch.zeros(options.layer_count, *composite.shape)
        edges = np.linspace(0, size[1], options.layer_count + 1).astype(int)
        for index in range(options.layer_count):
            bands[index, :, edges[index] : edges[index + 1]] = composite[:, edges[index] : edges[index + 1]]
        for step in range(options.steps):
            if callback is not None:
                callback(StepInfo(step, options.steps, 0.0, composite, composite))
        return Decomposition(bands, composite, prompt or "a caption", {"sampling": 0.0})

    def split(self, *args, **kwargs):
        if self.split_error is not None:
            raise self.split_error
        return super().split(*args, **kwargs)


class Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def keep(self, text: str, warning: bool = False) -> None:
        self.lines.append(text)


def small(layer_count=2, **changes) -> DecomposeOptions:
    """Layers at the input's size: the files stay small."""
    return DecomposeOptions(layer_count=layer_count, steps=2, keep_input_size=True, **changes)


def test_a_rerun_redoes_what_no_longer_matches_and_says_why(tmp_path):
    image = tmp_path / "photo.png"
    picture(40, 30).save(image)
    out, quick = tmp_path / "out", QuickPipeline()

    def run(options, formats=("psd", "zip")):
        progress = Recorder()
        result = run_batch(quick, [image], out, BatchSettings(options, "x", formats), progress=progress)
        return result, progress.lines

    first, _ = run(small())
    assert first.done == [image] and not first.redone
    record = json.loads((out / "photo" / "done.json").read_text())
    assert record["settings"]["layers"] == 2 and record["settings"]["seed"] == 0
    assert record["outputs"] == ["layers.psd", "layers.zip"]
    assert record["input"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()

    same, lines = run(small())
    assert same.skipped == [image] and lines == ["[1/1] " + str(image) + ": already done, skipped"]

    changed, lines = run(small(layer_count=3, seed=5))
    assert changed.done == [image]
    assert changed.redone[image] == "the settings changed (layers 2 -> 3, seed 0 -> 5)"
    assert any(line.endswith("redoing: the settings changed (layers 2 -> 3, seed 0 -> 5)") for line in lines)
    assert json.loads((out / "photo" / "done.json").read_text())["settings"]["layers"] == 3

    (out / "photo" / "layers.zip").unlink()
    missing, _ = run(small(layer_count=3, seed=5))
    assert missing.redone[image] == "layers.zip is missing" and (out / "photo" / "layers.zip").is_file()

    more, _ = run(small(layer_count=3, seed=5), formats=("psd", "zip", "png"))
    assert more.redone[image] == "layer_01.png, layer_02.png, layer_03.png not written before"
    fewer, _ = run(small(layer_count=1, seed=5), formats=("png",))
    assert sorted(p.name for p in (out / "photo").iterdir()) == ["done.json", "layer_01.png"]  # nothing stale

    image.touch()  # a new mtime, the same content: still finished
    assert run(small(layer_count=1, seed=5), formats=("png",))[0].skipped == [image]
    picture(40, 30, seed=3).save(image)
    edited, _ = run(small(layer_count=1, seed=5), formats=("png",))
    assert edited.redone[image] == "the input image changed since it was done"
    assert len(quick.calls) == 6


def test_settings_that_change_nothing_do_not_redo(tmp_path):
    no_split = BatchSettings(small(), "x", split_layers=2).record()
    assert BatchSettings(small(), "x", split_layers=5).record() == no_split
    unguided = BatchSettings(small(cfg_scale=1.0), "x").record()
    assert BatchSettings(small(cfg_scale=1.0, negative_prompt="blurry"), "x").record() == unguided
    assert BatchSettings(small(), "x", formats=("png",)).record() == no_split  # formats: by the files written
    assert BatchSettings(small(), "").record()["prompt"] is None  # a blank prompt is the auto-caption
    assert BatchSettings(small(caption_language="zh"), "").record() != BatchSettings(small(), "").record()


def test_an_interrupted_split_leaves_nothing_that_looks_finished(tmp_path):
    image = tmp_path / "poster.png"
    picture(40, 30).save(image)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_batch(QuickPipeline(KeyboardInterrupt()), [image], out, BatchSettings(small(), "x", split_depth=1))
    assert [p.name for p in out.iterdir()] == []  # no folder, no staging left behind

    # an earlier run's results stay whole, and stay marked as what they are, until new ones replace them
    run_batch(QuickPipeline(), [image], out, BatchSettings(small(), "x"))
    before = {p.name: p.read_bytes() for p in (out / "poster").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        run_batch(QuickPipeline(KeyboardInterrupt()), [image], out, BatchSettings(small(), "x", split_depth=1))
    assert {p.name: p.read_bytes() for p in (out / "poster").iterdir()} == before
    assert [p.name for p in out.iterdir()] == ["poster"]


def test_a_failed_split_keeps_the_decomposition_apart_and_unmarked(tmp_path):
    failing = QuickPipeline(torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    picture(40, 30).save(tmp_path / "img.png")
    settings = BatchSettings(small(), prompt="x", formats=("png",), split_depth=1)
    result = run_batch(failing, [tmp_path / "img.png"], tmp_path / "out", settings)
    reason = result.failed[tmp_path / "img.png"]
    assert "out of memory" in reason and "unsplit layers are in" in reason
    folder = tmp_path / "out" / "img"
    assert sorted(p.name for p in folder.iterdir()) == ["unsplit"]  # nothing that looks finished
    assert sorted(p.name for p in (folder / "unsplit").iterdir()) == ["layer_01.png", "layer_02.png"]
    assert np.asarray(Image.open(folder / "unsplit" / "layer_01.png"))[:15, :, 3].min() == 255

    # the next success replaces it
    result = run_batch(QuickPipeline(), [tmp_path / "img.png"], tmp_path / "out", settings)
    assert not result.failed
    assert sorted(p.name for p in folder.iterdir()) == ["done.json", "layer_01.png", "layer_02.png"]


def test_an_image_far_below_its_bucket_is_warned_about(tmp_path):
    assert upscale_warning((640, 480), 640) is None
    assert upscale_warning((300, 300), 640) is None
    Image.new("RGB", (7, 5), "red").save(tmp_path / "dot.png")
    progress = Recorder()
    run_batch(QuickPipeline(), [tmp_path / "dot.png"], tmp_path / "out", BatchSettings(small(), "x"), progress)
    warning = next(line for line in progress.lines if "warning" in line)
    assert "the image is 7x5, far below the 768x544 it is decomposed at (110x larger)" in warning


def test_recursive_finds_images_in_subfolders_but_not_in_the_output(tmp_path):
    photos = tmp_path / "photos"
    for sub in ("2024", "2025", ".thumbs", "layers"):
        (photos / sub).mkdir(parents=True)
        picture(20, 20).save(photos / sub / "img.png")
    picture(20, 20).save(photos / "2025" / "b.jpg")
    assert find_images([photos]) == []
    assert images_in_subfolders([photos]) == 4  # what --recursive would add (hidden folders never)
    found = find_images([photos], recursive=True, exclude=photos / "layers")
    assert [p.relative_to(photos).as_posix() for p in found] == ["2024/img.png", "2025/b.jpg", "2025/img.png"]


def test_batch_output_folders_never_collide_or_escape(tmp_path):
    out = tmp_path / "out"
    a, b, dots = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "...png"
    images = [a, b, dots]
    folders = [output_folder(out, image, images) for image in images]
    assert len(set(folders)) == 3
    assert all(folder.parent == out for folder in folders)
    assert folders[2].name == "image"


def test_another_image_with_the_same_name_never_overwrites_the_first(tmp_path):
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for path, seed in ((first, 1), (second, 2)):
        path.parent.mkdir()
        picture(40, 30, seed=seed).save(path)
    out = tmp_path / "out"
    run_batch(QuickPipeline(), [first], out, BatchSettings(small(), "x"))
    kept = (out / "x" / "layers.psd").read_bytes()
    progress = Recorder()
    result = run_batch(QuickPipeline(), [second], out, BatchSettings(small(), "x"), progress)
    assert (out / "x" / "layers.psd").read_bytes() == kept
    (suffixed,) = [p for p in out.iterdir() if p.name != "x"]
    assert suffixed == output_folder(out, second, [second], suffixed=True) and result.done == [second]
    assert any("holds the layers of another image" in line for line in progress.lines)
    # and each is finished where it is
    assert run_batch(QuickPipeline(), [first, second], out, BatchSettings(small(), "x")).done == []


def test_batch_settings_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="split depth must be an integer of 0 or more"):
        BatchSettings(small(), split_depth=-1)
    with pytest.raises(ValueError, match="formats takes one or more of psd, zip, png; got tiff"):
        BatchSettings(small(), formats=("tiff",))
