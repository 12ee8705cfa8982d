"""Layer stacks in files, the format picked by the suffix: ``.psd`` (layered PSD, :mod:`.psd` and
:mod:`.psd_read`) or ``.zip`` (PNGs with a manifest, :mod:`.export`). What the ``edit`` command and the
Load Layered PSD node read and write."""

from __future__ import annotations

import os
from pathlib import Path

from .export import ExportError, load_png_zip, save_png_zip
from .layers import LayerStack
from .psd import save_psd
from .psd_read import load_psd

LAYER_FILE_SUFFIXES = (".psd", ".zip")


def _suffix(path: Path, doing: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in LAYER_FILE_SUFFIXES:
        raise ExportError(
            f"{path}: cannot {doing} a layer file ending in {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(LAYER_FILE_SUFFIXES)}"
        )
    return suffix


def load_layer_file(path: str | os.PathLike) -> LayerStack:
    """A layered PSD or a PNG zip written by :func:`~layered_core.export.save_png_zip`, as a stack."""
    path = Path(path)
    if _suffix(path, "read") == ".psd":
        return load_psd(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    return load_png_zip(path)


def save_layer_file(stack: LayerStack, path: str | os.PathLike) -> Path:
    """Write ``stack`` as a layered PSD or a PNG zip, whole or not at all; returns the path."""
    path = Path(path)
    if _suffix(path, "write") == ".psd":
        return save_psd(stack, path)
    return save_png_zip(stack, path)
