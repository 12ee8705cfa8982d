"""Decomposing many images: one output folder per image, a failure reported and the rest going on, finished
images skipped on a rerun (see :mod:`.resume`), and progress as it goes (see :mod:`.progress`).

An image's files are written into a hidden staging folder beside its output folder and moved into place only
when the image is finished, its ``done.json`` last: an interruption or a failure never leaves files that look
finished, and the results of an earlier run stay as they were until new ones replace them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .compositing import render_layer
from .export import save_png_zip
from .image import ImageError, bucket_size, find_image_files, open_image, resize_rgba
from .layers import LayerStack, rgba_to_pil
from .pipeline import DecomposeOptions, LayeredPipeline, is_blank_prompt
from .progress import Progress, duration
from .psd import save_psd
from .resume import DONE_FILE, file_sha256, new_record, read_record, recorded_input, unfinished_reason, write_record
from .sampling import Cancelled, StepInfo, check_layer_count, is_guided

logger = logging.getLogger(__name__)

FORMATS = ("psd", "zip", "png")
# Beyond this many times the input's width (or height), the model sees mostly interpolated pixels: say so.
MAX_UPSCALE = 4
UNSPLIT_FOLDER = "unsplit"
# The files an image's folder holds, by format.
PSD_NAME, ZIP_NAME = "layers.psd", "layers.zip"
PNG_NAME = re.compile(r"layer_\d+\.png")


def png_name(index: int) -> str:
    """The file of the layer at 0-based ``index`` in the png format."""
    return f"layer_{index + 1:02d}.png"


def check_split_depth(depth, what: str = "split depth") -> int:
    """``depth`` if it is a split depth (an int, 0 for no splitting), else ValueError naming ``what``."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"{what} must be an integer of 0 or more (0: no splitting), got {depth!r}")
    return depth


def check_formats(formats: Iterable[str], what: str = "formats") -> tuple[str, ...]:
    """``formats`` as a tuple if it names at least one of :data:`FORMATS` and nothing else, else ValueError."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"{what} takes one or more of {', '.join(FORMATS)}; got {','.join(formats) or 'nothing'}")
    return formats


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def find_images(
    inputs: Iterable[str | os.PathLike], recursive: bool = False, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Image files named directly, and those in named folders (with ``recursive``, in their subfolders too,
    hidden ones and ``exclude`` left out), in order, each once, as absolute paths."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(_images_in(path, recursive, excluded))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def _images_in(folder: Path, recursive: bool, excluded: Path | None) -> list[Path]:
    images = find_image_files(folder)
    if recursive:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)):
            if excluded is None or sub.resolve() != excluded:
                images.extend(_images_in(sub, True, excluded))
    return images


def images_in_subfolders(inputs: Iterable[str | os.PathLike]) -> int:
    """How many images the subfolders of the folders in ``inputs`` hold (what ``recursive`` would add)."""
    count = 0
    for item in inputs:
        folder = Path(item)
        if folder.is_dir():
            for sub in (p for p in folder.iterdir() if p.is_dir() and _visible(p)):
                count += len(_images_in(sub, True, None))
    return count


def _safe_name(text: str) -> str:
    """A folder name made only of safe characters, never '.', '..' or hidden."""
    name = re.sub(r"[^A-Za-z0-9._ -]+", "_", text).strip(" .")
    return name or "image"


def output_folder(out: Path, image: Path, images: list[Path], suffixed: bool = False) -> Path:
    """``out/<stem>``; with ``suffixed``, or when inputs' stems collide, ``out/<stem>-<hash>`` where the hash is
    a short SHA-256 of the input's absolute path, so no two inputs share a folder. The name is sanitised, so the
    folder is always directly inside ``out``."""
    stems = [_safe_name(p.stem) for p in images]
    name = _safe_name(image.stem)
    if suffixed or stems.count(name) > 1:
        name = f"{name}-{hashlib.sha256(str(image.resolve()).encode()).hexdigest()[:8]}"
    folder = out / name
    if folder.resolve().parent != out.resolve():
        raise ValueError(f"{image}: output folder {folder} would not be inside {out}")
    return folder


def _owns(record: dict | None, image: Path, sha256: str) -> bool:
    """Whether ``record`` is of ``image``: its path, or its content when the recorded file is gone (moved)."""
    path, recorded_sha = recorded_input(record)
    if path is None:
        return False
    return Path(path) == image.resolve() or (recorded_sha == sha256 and not Path(path).exists())


def choose_folder(out: Path, image: Path, images: list[Path], sha256: str) -> tuple[Path, Path | None]:
    """The folder of ``image`` in ``out``, and the folder it would have had when another image's layers are there.

    The folder that already holds this image's record, plain or suffixed, whatever the batch (so a rerun finds
    it); else :func:`output_folder`'s, suffixed when that one holds another image's record."""
    plain, suffixed = output_folder(out, image, [image]), output_folder(out, image, images, suffixed=True)
    for folder in (plain, suffixed):
        if _owns(read_record(folder), image, sha256):
            return folder, None
    folder = output_folder(out, image, images)
    record = read_record(folder)
    if recorded_input(record)[0] is not None and not _owns(record, image, sha256):
        return suffixed, folder
    return folder, None


@dataclass
class BatchSettings:
    """What is decomposed how: the options, the prompt (None or blank: auto-caption), the formats written,
    recursive splitting, and ``models``, what names the weights (file paths, dtype) for the record."""

    options: DecomposeOptions
    prompt: str | None = None
    formats: tuple[str, ...] = ("psd", "zip")
    split_depth: int = 0  # split every layer this many levels deep
    split_layers: int = 2
    models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.formats = check_formats(self.formats)
        check_split_depth(self.split_depth)
        check_layer_count(self.split_layers, "split_layers")

    def needs_caption(self) -> bool:
        """Whether the text encoder must caption: for a blank prompt, and for every split (a layer gets its own)."""
        return is_blank_prompt(self.prompt) or self.split_depth > 0

    def record(self) -> dict:
        """The settings that decide the output, named as the command line's flags; those that change nothing
        (the negative prompt without guidance, the split size without splits) are left out."""
        options = self.options
        prompt = None if is_blank_prompt(self.prompt) else self.prompt
        settings = {
            "layers": options.layer_count,
            "steps": options.steps,
            "cfg": options.cfg_scale,
            "resolution": options.resolution,
            "seed": options.seed,
            "input_size": options.keep_input_size,
            "background": None if options.background is None else list(options.background),
            "max_sequence_length": options.max_sequence_length,
            "prompt": prompt,
            "split_depth": self.split_depth,
        }
        if is_guided(options.cfg_scale):
            settings |= {"cfg_normalize": options.cfg_normalize, "negative_prompt": options.negative_prompt}
        if self.needs_caption():
            settings["caption_language"] = options.caption_language
        if self.split_depth:
            settings["split_layers"] = self.split_layers
        return settings | dict(self.models)


def output_names(formats: tuple[str, ...], layer_count: int) -> list[str]:
    """The files an image's folder holds for ``formats``."""
    names = [name for fmt, name in (("psd", PSD_NAME), ("zip", ZIP_NAME)) if fmt in formats]
    if "png" in formats:
        names += [png_name(index) for index in range(layer_count)]
    return names


def _is_output(path: Path) -> bool:
    return path.name in (PSD_NAME, ZIP_NAME, UNSPLIT_FOLDER) or bool(PNG_NAME.fullmatch(path.name))


@dataclass
class BatchResult:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    redone: dict[Path, str] = field(default_factory=dict)  # images done again, and why


class SplitFailed(RuntimeError):
    """A split failed after the decomposition succeeded; the message says where the unsplit layers are."""


def _layer_name(path: tuple[int, ...]) -> str:
    return ".".join(str(index + 1) for index in path)


def split_recursively(
    pipeline: LayeredPipeline, stack: LayerStack, settings: BatchSettings, progress: Progress | None = None
) -> LayerStack:
    """Split every layer, then every sub-layer, down to ``split_depth`` levels."""
    progress = progress or Progress()
    for depth in range(settings.split_depth):
        paths = [path for path, layer in stack.walk() if len(path) == depth + 1 and not layer.is_split]
        for number, path in enumerate(paths, start=1):
            stage = f"splitting layer {_layer_name(path)} ({number}/{len(paths)} at depth {depth + 1})"
            progress.stage(stage)
            try:
                stack = pipeline.split(
                    stack,
                    path,
                    settings.split_layers,
                    options=settings.options,
                    callback=_step_callback(progress, stage),
                    max_depth=depth + 1,
                )
            except ValueError as e:  # an empty or tiny layer has nothing to split
                logger.info("not splitting layer %s: %s", _layer_name(path), e)
    return stack


def _step_callback(progress: Progress, stage: str):
    def step(info: StepInfo) -> None:
        progress.step(info.step + 1, info.total, stage)
        if info.step + 1 == info.total:
            progress.stage(f"{stage}: decoding" if stage != "sampling" else "decoding")

    return step


def write_outputs(stack: LayerStack, folder: Path, formats: tuple[str, ...], input_image) -> list[str]:
    """Write ``stack`` into ``folder`` in ``formats``; returns the names written (see :func:`output_names`)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "psd" in formats:
        written.append(save_psd(stack, folder / PSD_NAME, input_image=input_image).name)
    if "zip" in formats:
        written.append(save_png_zip(stack, folder / ZIP_NAME, input_image=input_image).name)
    if "png" in formats:
        for index, layer in enumerate(stack.layers):
            picture = rgba_to_pil(render_layer(layer, stack.width, stack.height))
            target = folder / png_name(index)
            written.append(atomic_write(target, lambda file, picture=picture: picture.save(file, "PNG")).name)
    return written


def _commit(staging: Path, folder: Path, names: list[str], record: dict) -> None:
    """Move the staged files into ``folder`` in place of the earlier run's, ``done.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE_FILE).unlink(missing_ok=True)
    _remove_outputs(folder)
    for name in names:
        os.replace(staging / name, folder / name)
    write_record(folder, record)


def _remove_outputs(folder: Path) -> None:
    """The files an earlier run wrote (only those: whatever else the user keeps there stays)."""
    for path in folder.iterdir():
        if _is_output(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _keep_unsplit(stack: LayerStack, staging: Path, folder: Path, formats, input_image) -> Path:
    """The decomposition before its failed split, as ``folder/unsplit/``: kept, but not looking finished."""
    write_outputs(stack, staging / UNSPLIT_FOLDER, formats, input_image)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / UNSPLIT_FOLDER
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging / UNSPLIT_FOLDER, target)
    return target


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _reason(error: Exception, image: Path) -> str:
    """The error for the image's line: without the image's path in front (the line names it), and with the
    exception's type where the message alone may not say what happened."""
    text = str(error)
    for prefix in (str(image), _shown(image)):
        text = text.removeprefix(f"{prefix}: ")
    return text if isinstance(error, ImageError | SplitFailed) else f"{type(error).__name__}: {text}"


def upscale_warning(size: tuple[int, int], resolution: int) -> str | None:
    """A warning when an image of ``size`` is far below the bucket it is decomposed at, else None."""
    bucket = bucket_size(*size, resolution)
    factor = max(bucket[0] / size[0], bucket[1] / size[1])
    if factor <= MAX_UPSCALE:
        return None
    return (
        f"the image is {size[0]}x{size[1]}, far below the {bucket[0]}x{bucket[1]} it is decomposed at "
        f"({factor:.0f}x larger): expect blurred layers; a larger original gives better ones"
    )


def run_batch(
    pipeline: LayeredPipeline,
    images: list[Path],
    out: Path,
    settings: BatchSettings,
    progress: Progress | None = None,
    share: list[Path] | None = None,
    writes: bool = True,
) -> BatchResult:
    """Decompose every image into ``out/<stem>/``; returns what was done, skipped and failed.

    A failed image is reported through ``progress`` (its traceback logged at DEBUG) and the rest go on; an
    interruption (KeyboardInterrupt, :class:`Cancelled`) leaves the current image's earlier results as they were
    and propagates. ``share`` (default: all of ``images``) is what this call decomposes, ``images`` still naming the
    folders: a data-parallel run gives each image group its share. With ``writes`` False the images are decomposed
    and nothing is written: the other processes of an image group sample with the one that writes."""
    progress = progress or Progress()
    result = BatchResult()
    out = Path(out)
    share = images if share is None else share
    for number, image_path in enumerate(share, start=1):
        progress.begin(number, len(share), _shown(image_path))
        started = time.perf_counter()
        try:
            outcome = _decompose_one(pipeline, image_path, images, out, settings, progress, result, writes)
        except (Cancelled, KeyboardInterrupt):
            raise
        except (ImageError, ValueError, OSError, RuntimeError) as e:
            result.failed[image_path] = _reason(e, image_path)
            logger.debug("%s failed", image_path, exc_info=True)
            progress.end("failed", f"failed: {result.failed[image_path]}")
            continue
        if outcome is None:
            result.skipped.append(image_path)
            progress.end("skipped", "already done, skipped")
        else:
            result.done.append(image_path)
            progress.end("done", f"done in {duration(time.perf_counter() - started)} -> {_shown(outcome)}")
    return result


def _decompose_one(pipeline, image_path, images, out, settings, progress, result, writes=True) -> Path | None:
    """Decompose one image (and write it, with ``writes``), or skip it when finished; returns its folder, or None
    when skipped."""
    sha256 = file_sha256(image_path)
    wanted = settings.record()
    folder, taken_by = choose_folder(out, image_path, images, sha256)
    if taken_by is not None:
        progress.say(f"{_shown(taken_by)} holds the layers of another image: writing to {_shown(folder)}")
    record = read_record(folder)
    names = output_names(settings.formats, settings.options.layer_count)
    reason = unfinished_reason(record, wanted, sha256, folder, names)
    if reason is None:
        return None
    if record is not None or folder.exists():
        result.redone[image_path] = reason
        progress.say(f"redoing: {reason}")

    image = open_image(image_path)
    if warning := upscale_warning(image.size, settings.options.resolution):
        progress.warn(warning)
    caption = is_blank_prompt(settings.prompt)
    progress.stage("encoding the image and captioning it" if caption else "encoding the image and the prompt")
    if not writes:
        decomposition = pipeline(
            image, settings.prompt, settings.options, callback=_step_callback(progress, "sampling")
        )
        if settings.split_depth:
            split_recursively(pipeline, decomposition.stack(), settings, progress)
        return folder
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    try:
        decomposition = pipeline(
            image, settings.prompt, settings.options, callback=_step_callback(progress, "sampling")
        )
        stack = decomposition.stack()
        # the input itself rides along as a hidden bottom layer, at the canvas size
        input_pixels = np.asarray(resize_rgba(image, stack.size))
        if settings.split_depth:
            try:
                stack = split_recursively(pipeline, stack, settings, progress)
            except (ValueError, OSError, RuntimeError) as e:
                kept = _keep_unsplit(stack, staging, folder, settings.formats, input_pixels)
                raise SplitFailed(
                    f"splitting failed ({type(e).__name__}: {e}); the unsplit layers are in {_shown(kept)}"
                ) from e
        progress.stage(f"writing {', '.join(settings.formats)}")
        written = write_outputs(stack, staging, settings.formats, input_pixels)
        details = {
            "prompt": decomposition.prompt,
            "layers": len(stack.layers),
            "seconds": {k: round(v, 3) for k, v in decomposition.seconds.items()},
            "devices": decomposition.devices,
        }
        _commit(staging, folder, written, new_record(image_path, sha256, wanted, written, **details))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
