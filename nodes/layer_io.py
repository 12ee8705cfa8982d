"""Layer stacks in and out of ComfyUI's folders: Save Layered PSD and Save Layers (PNG zip) into the output
folder, Load Layered PSD and Load Image Folder (batch) from the input folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import warnings
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..layered_core.compositing import composite
from ..layered_core.export import save_png_zip
from ..layered_core.image import ImageError, find_image_files, image_to_bchw, open_image_with_alpha
from ..layered_core.layer_files import LAYER_FILE_SUFFIXES, load_layer_file
from ..layered_core.layers import LayerStack, rgba_to_bhwc
from ..layered_core.psd import save_psd
from ..layered_core.psd_read import PSDReadWarning
from .common import CATEGORY, PREFIX, STACK_TOOLTIP, LayerStackType, progress_reporter

logger = logging.getLogger(__name__)


# The key of a save node's output (in "executed" and /history) that lists the files it wrote, each as core's save
# nodes list theirs ({filename, subfolder, type: "output"}). Not "images": the editor would draw a PSD as a
# broken picture and its queue panel would offer it as one; under another key they are listed and not drawn.
SAVED_FILES = "files"


class _SaveStack(io.ComfyNode):
    """Save Layered PSD and Save Layers (PNG zip): the same inputs, a new numbered file in the output folder
    written by :meth:`write`, reported under :data:`SAVED_FILES` and as the node's text, and the stack's
    composite as the preview; only the file format differs."""

    SUFFIX = ""

    @staticmethod
    def write(stack: LayerStack, path: Path, *, progress) -> None:
        raise NotImplementedError

    @classmethod
    def save_schema(cls, name: str, display_name: str, description: str, stack_tooltip: str) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}{name}",
            display_name=display_name,
            category=CATEGORY,
            description=description,
            inputs=[
                LayerStackType.Input("stack", tooltip=stack_tooltip),
                io.String.Input("filename_prefix", default="layers/QwenLayered", tooltip="may name a subfolder"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, stack, filename_prefix) -> io.NodeOutput:
        path, subfolder = _unused_output_path(filename_prefix, cls.SUFFIX, stack.width, stack.height)
        cls.write(stack, path, progress=progress_reporter())
        saved = ui.SavedResult(path.name, subfolder, io.FolderType.output)
        preview = ui.PreviewImage(rgba_to_bhwc(composite(stack)), cls=cls).as_dict()
        shown = f"saved {posixpath.join(subfolder, path.name)}"
        return io.NodeOutput(ui={**preview, SAVED_FILES: [saved], "text": [shown]})


class SavePSD(_SaveStack):
    SUFFIX = ".psd"
    write = staticmethod(save_psd)

    @classmethod
    def define_schema(cls):
        return cls.save_schema(
            "SavePSD",
            "Save Layered PSD",
            "Writes the layer stack as a layered PSD into the output folder; never overwrites.",
            "the layer stack from Decode Layers",
        )


class SaveLayerPNGs(_SaveStack):
    SUFFIX = ".zip"
    write = staticmethod(save_png_zip)

    @classmethod
    def define_schema(cls):
        return cls.save_schema(
            "SaveLayerPNGs",
            "Save Layers (PNG zip)",
            "Writes every layer as a PNG in a ZIP with a manifest (names, offsets, order, tree) into the output "
            "folder; never overwrites.",
            "the layer stack from Decode Layers or Split Layer",
        )


def _unused_output_path(filename_prefix: str, suffix: str, width: int, height: int) -> tuple[Path, str]:
    """A new file in ComfyUI's output folder, and its subfolder there as core reports it: core's naming
    (prefix_00001_), a path outside it refused (core checks that), and an existing file never overwritten. The
    number follows the files of the same suffix only, so the PSD and the ZIP of one image share it."""
    output_dir = folder_paths.get_output_directory()
    folder, filename, _, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir, width, height)
    numbered = re.compile(rf"{re.escape(filename)}_(\d{{5,}})_{re.escape(suffix)}")
    used = [int(match[1]) for name in os.listdir(folder) if (match := numbered.fullmatch(name))]
    counter = max(used, default=0) + 1
    while (path := Path(folder) / f"{filename}_{counter:05}_{suffix}").exists():
        counter += 1
    return path, subfolder


def _input_folder(folder: str) -> tuple[Path, Path]:
    """(input directory, ``folder`` in it), both resolved; a folder that resolves outside the input
    directory (``..``, an absolute path, a symlink leading out) is refused."""
    root = Path(folder_paths.get_input_directory()).resolve()
    path = (root / folder).resolve()
    if Path(folder).is_absolute() or not path.is_relative_to(root):
        raise ValueError(
            f"folder {folder!r} is outside ComfyUI's input directory {root}; refused (give a folder inside it)"
        )
    return root, path


def _folder_images(folder: str, pattern: str, limit: int) -> list[Path]:
    """The image files of ``folder`` in the input directory matching ``pattern``, sorted by name, the
    first ``limit`` (0 = all); an escape, a missing folder or no match at all is an error naming both."""
    root, path = _input_folder(folder)
    if not path.is_dir():
        raise ValueError(f"folder {folder!r} (pattern {pattern!r}): no such folder in the input directory {root}")
    files = find_image_files(path, pattern)
    files = files[:limit] if limit > 0 else files
    if not files:
        raise ValueError(f"folder {folder!r} has no image files matching the pattern {pattern!r}")
    for file in files:
        if not file.resolve().is_relative_to(root):
            raise ValueError(f"{file.name} in folder {folder!r} links outside the input directory {root}; refused")
    return files


def _layer_files() -> list[str]:
    """The layered files (PSD, the pack's PNG zips) anywhere in the input directory, as paths relative to it."""
    root = Path(folder_paths.get_input_directory())
    if not root.is_dir():
        return []
    found = [path for path in root.rglob("*") if path.suffix.lower() in LAYER_FILE_SUFFIXES and path.is_file()]
    return sorted(path.relative_to(root).as_posix() for path in found)


def _layer_file(name: str | None) -> Path:
    if not name:
        raise ValueError("no layered file chosen: put a .psd (or this pack's .zip) in ComfyUI's input folder")
    root, path = _input_folder(name)
    if not path.is_file():
        raise ValueError(f"{name!r}: no such file in the input directory {root}")
    return path


class LoadLayeredPSD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = _layer_files()
        return io.Schema(
            node_id=f"{PREFIX}LoadLayeredPSD",
            display_name="Load Layered PSD",
            category=CATEGORY,
            description="Loads a layered PSD from ComfyUI's input folder as a layer stack: this pack's own, or one "
            "saved by Photoshop, GIMP or Krita with pixel layers and groups (groups become split layers; names, "
            "offsets, hidden layers and opacity are kept). Text layers and smart objects come in as their pixels, "
            "with a note on the node; adjustment layers, 16-bit and CMYK files are refused, naming the layer. "
            "Also reads this pack's PNG zips. Shows the layers on the node.",
            inputs=[
                io.Combo.Input(
                    "file",
                    options=files,
                    default=files[0] if files else None,
                    tooltip="a .psd (or this pack's .zip) in ComfyUI's input folder or a folder inside it",
                )
            ],
            outputs=[
                # no batch of every layer on the canvas: a designer's PSD of many large layers would not fit in
                # memory as float32 images; Select Layer takes out the ones wanted
                LayerStackType.Output(display_name="stack", tooltip=STACK_TOOLTIP),
                io.Image.Output(display_name="composite", tooltip="the picture the layers make, [1, H, W, 4]"),
            ],
        )

    @classmethod
    def validate_inputs(cls, file):
        try:
            _layer_file(file)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, file):
        try:
            stat = _layer_file(file).stat()
        except (ValueError, OSError) as e:
            return str(e)
        return f"{file}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stack = load_layer_file(_layer_file(file))
        notes = [str(item.message).split(": ", 1)[-1] for item in caught if issubclass(item.category, PSDReadWarning)]
        text = "\n".join([stack.describe(), *notes])
        return io.NodeOutput(stack, rgba_to_bhwc(composite(stack)), ui=ui.PreviewText(text))


class LoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}LoadImageFolder",
            display_name="Load Image Folder (batch)",
            category=CATEGORY,
            description="Loads every image of a folder in ComfyUI's input directory as a list, sorted by name, "
            "so the nodes after it run once per image; other files are skipped. Reruns when the folder changes.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="batch",
                    tooltip="a folder inside ComfyUI's input directory ('batch' = input/batch)",
                ),
                io.String.Input(
                    "pattern", default="*", optional=True, tooltip="glob on the file names in either case, e.g. '*.png'"
                ),
                io.Int.Input(
                    "limit",
                    default=0,
                    min=0,
                    max=1_000_000,
                    optional=True,
                    tooltip="the first N images by name; 0 = all",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images",
                    tooltip="one [1, H, W, C] per file, EXIF orientation applied; C = 4 when the file has alpha",
                    is_output_list=True,
                ),
                io.String.Output(
                    display_name="names",
                    tooltip="each file's name without its suffix, for filename prefixes",
                    is_output_list=True,
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder, pattern="*"):
        if folder is None or pattern is None:  # linked: checked when it runs
            return True
        try:
            _folder_images(folder, pattern, 0)
        except (ValueError, OSError) as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, pattern="*", limit=0):
        if folder is None or pattern is None or limit is None:  # linked: not known before it runs
            return float("nan")
        try:
            files = _folder_images(folder, pattern, limit)
        except (ValueError, OSError) as e:
            return str(e)  # the run fails and caches nothing
        listing = [(file.name, file.stat().st_mtime_ns, file.stat().st_size) for file in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, pattern="*", limit=0) -> io.NodeOutput:
        files = _folder_images(folder, pattern, limit)
        progress = comfy.utils.ProgressBar(len(files))
        images, names, skipped = [], [], []
        for file in files:
            try:
                rgba, transparent = open_image_with_alpha(file)
            except ImageError as e:
                # one unreadable file must not cost the whole batch: the others go on, and the user is told
                logger.warning("Load Image Folder: skipped %s", e)
                skipped.append(f"skipped {file.name}: {str(e).removeprefix(f'{file}: ')}")
            else:
                pixels = image_to_bchw(rgba).permute(0, 2, 3, 1)  # [1, H, W, 4]
                images.append(pixels if transparent else pixels[..., :3].contiguous())
                names.append(file.stem)
            progress.update(1)
        if not images:
            raise ValueError(f"folder {folder!r}: no readable image among {len(files)} files: " + "; ".join(skipped))
        summary = [f"{len(images)} of {len(files)} images loaded", *skipped]
        return io.NodeOutput(images, names, ui=ui.PreviewText("\n".join(summary)))
