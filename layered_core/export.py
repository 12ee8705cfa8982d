"""The ZIP-of-PNGs export (with a JSON manifest) beside the PSD one, written atomically (:mod:`.atomic`).

The ZIP holds ``manifest.json``, ``composite.png``, optionally ``input.png``, and one PNG per layer under
``layers/`` cut to its alpha box. The manifest lists the layers bottom to top with their names, files,
offsets, sizes, visibility, opacity (0..255) and sub-layers (``children``, same format, recursively); file
names are made of indices so any layer name, Unicode or not, is safe.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .atomic import atomic_write
from .compositing import composite
from .layers import Layer, LayerStack, as_rgba, crop_to_alpha, rgba_from_pil, rgba_to_pil

MANIFEST_FORMAT = "layered-core/png-zip"
MANIFEST_VERSION = 1


class ExportError(ValueError):
    """A stack that the chosen file format cannot hold, or a file that cannot be read back."""


def _png_bytes(pixels: np.ndarray, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    rgba_to_pil(pixels).save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


def check_input_image(stack: LayerStack, image: np.ndarray | Image.Image, path: Path) -> np.ndarray:
    """The input image as uint8 RGBA, checked to be canvas-sized (the error names ``path``)."""
    pixels = rgba_from_pil(image) if isinstance(image, Image.Image) else as_rgba(image, f"{path}: input image")
    if pixels.shape[:2] != (stack.height, stack.width):
        raise ExportError(
            f"{path}: the input image is {pixels.shape[1]}x{pixels.shape[0]}, expected the canvas size "
            f"{stack.width}x{stack.height}"
        )
    return pixels


def save_png_zip(
    stack: LayerStack,
    path: str | os.PathLike,
    *,
    input_image: np.ndarray | Image.Image | None = None,
    compress_level: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``stack`` as a ZIP of PNGs with ``manifest.json`` (see the module docstring); returns the path.

    ``compress_level`` is PNG's zlib level (0-9); 1 is several times faster than PIL's default 6 for files
    a few percent larger. ``progress(done, total)`` is called after each PNG is written into the archive and
    once more when the file is in place (``done == total``).
    """
    path = Path(path)
    inputs = None if input_image is None else check_input_image(stack, input_image, path)
    entries: list[tuple[str, np.ndarray]] = []

    def describe(layers: tuple[Layer, ...], prefix: str) -> list[dict]:
        described = []
        for index, layer in enumerate(layers):
            cropped = crop_to_alpha(layer)
            key = f"{prefix}{index:03d}"
            # PNG has no 0x0 image: a fully transparent layer is listed with no file.
            empty = cropped.width == 0 or cropped.height == 0
            entry = {
                "name": layer.name,
                "index": index,
                "offset": list(cropped.offset),
                "size": [cropped.width, cropped.height],
                "file": None if empty else f"layers/{key}.png",
                "visible": layer.visible,
                "opacity": layer.opacity,
            }
            if not empty:
                entries.append((entry["file"], cropped.pixels))
            if layer.children:
                entry["children"] = describe(layer.children, f"{key}_")
            described.append(entry)
        return described

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "canvas": {"width": stack.width, "height": stack.height},
        "order": "bottom-to-top",
        "alpha": "straight",
        "composite": "composite.png",
        "input": None if inputs is None else "input.png",
        "layers": describe(stack.layers, ""),
    }
    files = [("composite.png", composite(stack))] + ([("input.png", inputs)] if inputs is not None else [])

    pngs = files + entries
    report = progress or (lambda done, total: None)

    def write(file: BinaryIO) -> None:
        # PNG is compressed already: storing the entries saves time and loses nothing.
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2))
            for written, (name, pixels) in enumerate(pngs, 1):
                archive.writestr(name, _png_bytes(pixels, compress_level))
                report(written, len(pngs) + 1)

    atomic_write(path, write)
    report(len(pngs) + 1, len(pngs) + 1)
    return path


def load_png_zip(path: str | os.PathLike) -> LayerStack:
    """Read a ZIP written by :func:`save_png_zip` back into a stack (names, offsets, order and sub-layers)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ExportError(
                    f"{path}: manifest format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
                )

            def build(entries: list[dict]) -> tuple[Layer, ...]:
                layers = []
                for entry in entries:
                    if entry["file"] is None:
                        pixels = np.zeros((0, 0, 4), np.uint8)
                    else:
                        with Image.open(io.BytesIO(archive.read(entry["file"]))) as image:
                            pixels = rgba_from_pil(image)
                    if [pixels.shape[1], pixels.shape[0]] != entry["size"]:
                        raise ExportError(
                            f"{path}: {entry['file']} is {pixels.shape[1]}x{pixels.shape[0]}, the manifest "
                            f"says {entry['size'][0]}x{entry['size'][1]}"
                        )
                    children = build(entry.get("children", []))
                    # Manifests written before visibility and opacity were kept have neither: shown, opaque.
                    shown, opacity = entry.get("visible", True), entry.get("opacity", 255)
                    layers.append(Layer(pixels, entry["name"], tuple(entry["offset"]), children, shown, opacity))
                return tuple(layers)

            canvas = manifest["canvas"]
            return LayerStack(canvas["width"], canvas["height"], build(manifest["layers"]))
    except ExportError:
        raise
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:  # ValueError: JSON and field values
        raise ExportError(f"{path}: not a layer ZIP written by save_png_zip ({error})") from error
