"""Decomposing many images: one output folder per image, a failure reported and the rest going on,
finished images skipped on a rerun, and a summary."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .export import save_png_zip
from .image import ImageError, find_image_files, open_image, resize_rgba
from .layers import LayerStack, render_layer, rgba_to_pil
from .pipeline import DecomposeOptions, LayeredPipeline
from .psd import save_psd
from .sampling import Cancelled, StepInfo

logger = logging.getLogger(__name__)

FORMATS = ("psd", "zip", "png")
DONE_FILE = "done.json"


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named directly, and those in named folders (not recursive), sorted, each once."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(find_image_files(path))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def _safe_name(text: str) -> str:
    """A folder name made only of safe characters, never '.', '..' or hidden."""
    name = re.sub(r"[^A-Za-z0-9._ -]+", "_", text).strip(" .")
    return name or "image"


def output_folder(out: Path, image: Path, images: list[Path]) -> Path:
    """``out/<stem>``; inputs whose stems collide get a short hash of their full path appended, so no two
    inputs share a folder. The name is sanitised, so the folder is always directly inside ``out``."""
    stems = [_safe_name(p.stem) for p in images]
    name = _safe_name(image.stem)
    if stems.count(name) > 1:
        name = f"{name}-{hashlib.sha256(str(image.resolve()).encode()).hexdigest()[:8]}"
    folder = out / name
    if folder.resolve().parent != out.resolve():
        raise ValueError(f"{image}: output folder {folder} would not be inside {out}")
    return folder


@dataclass
class BatchSettings:
    options: DecomposeOptions
    prompt: str | None = None
    formats: tuple[str, ...] = ("psd", "zip")
    split_depth: int = 0  # split every layer this many levels deep
    split_layers: int = 2

    def fingerprint(self) -> str:
        """What decides the output: a rerun with other settings does not skip."""
        data = json.dumps({**asdict(self), "options": asdict(self.options)}, sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclass
class BatchResult:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


def _source_id(image: Path) -> dict:
    """Which input file, as it is now: a changed file is decomposed again."""
    stat = image.stat()
    return {"image": str(image.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_finished(folder: Path, fingerprint: str, image: Path) -> bool:
    try:
        record = json.loads((folder / DONE_FILE).read_text())
        return record.get("settings") == fingerprint and record.get("source") == _source_id(image)
    except (OSError, ValueError, AttributeError):
        return False


def split_recursively(pipeline: LayeredPipeline, stack: LayerStack, settings: BatchSettings, callback) -> LayerStack:
    """Split every layer, then every sub-layer, down to ``split_depth`` levels."""
    for depth in range(settings.split_depth):
        paths = [path for path, layer in stack.walk() if len(path) == depth + 1 and not layer.is_split]
        for path in paths:
            try:
                stack = pipeline.split(
                    stack, path, settings.split_layers, options=settings.options, callback=callback, max_depth=depth + 1
                )
            except ValueError as e:  # an empty or tiny layer has nothing to split
                logger.info("not splitting layer %s: %s", path, e)
    return stack


def write_outputs(
    stack: LayerStack, folder: Path, formats: tuple[str, ...], image_path: Path, input_image
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    # a rerun with fewer layers must not leave the old run's extra PNGs beside the new ones
    for stale in folder.glob("layer_*.png"):
        stale.unlink()
    written = []
    if "psd" in formats:
        written.append(save_psd(stack, folder / "layers.psd", input_image=input_image))
    if "zip" in formats:
        written.append(save_png_zip(stack, folder / "layers.zip", input_image=input_image))
    if "png" in formats:
        for index, layer in enumerate(stack.layers):
            target = folder / f"layer_{index + 1:02d}.png"
            picture = rgba_to_pil(render_layer(layer, stack.width, stack.height))
            written.append(atomic_write(target, lambda file, picture=picture: picture.save(file, "PNG")))
    return written


def run_batch(
    pipeline: LayeredPipeline,
    images: list[Path],
    out: Path,
    settings: BatchSettings,
    progress: Callable[[str], None] | None = None,
) -> BatchResult:
    """Decompose every image into ``out/<stem>/``; returns what was done, skipped and failed."""
    result = BatchResult()
    fingerprint = settings.fingerprint()
    total = len(images)
    for number, image_path in enumerate(images, start=1):
        label = f"[{number}/{total}] {image_path.name}"
        start = time.perf_counter()
        try:
            folder = output_folder(out, image_path, images)
            if is_finished(folder, fingerprint, image_path):
                result.skipped.append(image_path)
                _say(progress, f"{label}: already done, skipped")
                continue
            (folder / DONE_FILE).unlink(missing_ok=True)
            image = open_image(image_path)

            def step(info: StepInfo, label=label) -> None:
                _say(progress, f"{label}: step {info.step + 1}/{info.total}", transient=True)

            decomposition = pipeline(image, settings.prompt, settings.options, callback=step)
            stack = decomposition.stack()
            # the input itself rides along as a hidden bottom layer, at the canvas size
            input_pixels = np.asarray(resize_rgba(image, stack.size))
            # the decomposition is written before any split, so a failed split loses no finished work
            write_outputs(stack, folder, settings.formats, image_path, input_pixels)
            if settings.split_depth:
                stack = split_recursively(pipeline, stack, settings, step)
                write_outputs(stack, folder, settings.formats, image_path, input_pixels)
            record = {
                "settings": fingerprint,
                "source": _source_id(image_path),
                "image": str(image_path),
                "prompt": decomposition.prompt,
                "layers": len(stack.layers),
                "seconds": {k: round(v, 3) for k, v in decomposition.seconds.items()},
            }
            atomic_write_text(folder / DONE_FILE, json.dumps(record, indent=2))
            result.done.append(image_path)
            _say(progress, f"{label}: done in {time.perf_counter() - start:.1f} s -> {folder}")
        except (Cancelled, KeyboardInterrupt):
            raise
        except (ImageError, ValueError, OSError, RuntimeError) as e:
            result.failed[image_path] = f"{type(e).__name__}: {e}"
            logger.exception("failed: %s", image_path)
            _say(progress, f"{label}: FAILED: {e}")
    return result


def _say(progress, message: str, transient: bool = False) -> None:
    if progress is not None:
        progress(("\r" if transient else "") + message)


def terminal_progress(message: str) -> None:
    """Progress on stderr: step lines overwrite each other on a terminal, every line is kept otherwise."""
    stream = sys.stderr
    if message.startswith("\r"):
        if stream.isatty():
            stream.write("\r\033[K" + message[1:])
            stream.flush()
        return
    if stream.isatty():
        stream.write("\r\033[K")
    stream.write(message + "\n")
    stream.flush()
