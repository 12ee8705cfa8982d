"""Layered PSDs from any writer read back as a layer stack: the pack's own, and ones saved by Photoshop,
GIMP, Krita or psd-tools, so the designer's round trip (decompose, touch up elsewhere, come back) works.

Kept: pixel layers with their offsets (also outside the canvas), names (Unicode), visibility and opacity;
groups, nested, as split layers. Read with psd-tools' layer API. What a layer stack cannot hold is never
dropped without a word: a layer whose look psd-tools can reproduce in pixels (text and smart objects with
stored pixels, shape and fill layers, layer masks) is rasterised and a :class:`PSDReadWarning` says so; a
look that is lost (blend modes, effects, clipping) is also warned about; and what has no pixels to keep
(an adjustment layer, a text layer saved without pixels) or a document that is not 8-bit RGB or greyscale
stops the load with an :class:`~layered_core.export.ExportError` naming the layer or the document.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from psd_tools import PSDImage
from psd_tools.api.layers import AdjustmentLayer, FillLayer, ShapeLayer, SmartObjectLayer, TypeLayer
from psd_tools.constants import BlendMode, ColorMode

from .compositing import render
from .export import ExportError
from .layers import Layer, LayerStack, format_layer_path, rgba_from_pil, union_boxes

logger = logging.getLogger(__name__)

_COLOUR_MODES = {ColorMode.RGB, ColorMode.GRAYSCALE}
# Group blend modes that draw their contents as this package does: a pass-through group, or a normal
# (isolated) one, which gives the same result when its contents are drawn in Normal mode.
_GROUP_MODES = {BlendMode.PASS_THROUGH, BlendMode.NORMAL}


class PSDReadWarning(UserWarning):
    """Part of a PSD layer's look was rasterised or lost while reading it into a layer stack."""


def _warn(path: Path, where: str, message: str) -> None:
    text = f"{path}: layer {where}: {message}"
    logger.warning(text)
    warnings.warn(text, PSDReadWarning, stacklevel=3)


def _empty() -> np.ndarray:
    return np.zeros((0, 0, 4), np.uint8)


def _own_pixels(layer) -> np.ndarray:
    """The layer's stored channel data as uint8 straight RGBA (opaque where it has no transparency)."""
    image = layer.topil()
    return _empty() if image is None else rgba_from_pil(image)


def _apply_mask(layer, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` with the layer's raster mask multiplied into their alpha, as Photoshop draws them."""
    mask = layer.mask
    x0, y0 = layer.left, layer.top
    height, width = pixels.shape[:2]
    coverage = np.full((height, width), mask.background_color, np.uint16)
    image = mask.topil()
    if image is not None:
        values = np.asarray(image.convert("L"), np.uint16)
        mx0, my0 = mask.left - x0, mask.top - y0
        cx0, cy0 = max(mx0, 0), max(my0, 0)
        cx1, cy1 = min(mx0 + values.shape[1], width), min(my0 + values.shape[0], height)
        if cx0 < cx1 and cy0 < cy1:
            coverage[cy0:cy1, cx0:cx1] = values[cy0 - my0 : cy1 - my0, cx0 - mx0 : cx1 - mx0]
    out = pixels.copy()
    out[..., 3] = (pixels[..., 3].astype(np.uint16) * coverage + 127) // 255
    return out


def _rasterised(layer, path: Path, where: str, what: str) -> tuple[np.ndarray, tuple[int, int]]:
    """psd-tools' rendering of a layer that is not plain pixels, with a warning; an error if it has none."""
    try:
        image = layer.composite()
    except Exception as error:  # psd-tools raises many kinds for what it cannot render
        raise ExportError(f"{path}: layer {where}: {what} that psd-tools cannot rasterise ({error})") from error
    if image is None:
        raise ExportError(f"{path}: layer {where}: {what} with nothing to rasterise; rasterise it in your editor")
    _warn(path, where, f"{what}, rasterised to pixels by psd-tools")
    return rgba_from_pil(image), (layer.left, layer.top)


def _layer_pixels(layer, path: Path, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """One non-group layer's pixels and offset, rasterising or refusing what is not plain pixels."""
    if isinstance(layer, AdjustmentLayer):
        raise ExportError(
            f"{path}: layer {where} is an adjustment layer ({layer.kind}); it changes the layers below it and "
            "has no pixels of its own, which a layer stack cannot hold. Merge it down or delete it in your "
            "editor, then save again"
        )
    if isinstance(layer, (TypeLayer, SmartObjectLayer)):
        what = "a text layer" if isinstance(layer, TypeLayer) else "a smart object"
        if not layer.has_pixels():
            raise ExportError(
                f"{path}: layer {where} is {what} saved without pixels; rasterise it in your editor, then save again"
            )
        _warn(path, where, f"{what}, loaded as its stored pixels (no longer editable as such)")
        pixels = _own_pixels(layer)
    elif isinstance(layer, (ShapeLayer, FillLayer)) or layer.has_vector_mask():
        what = "a shape layer" if isinstance(layer, ShapeLayer) else "a fill layer"
        return _rasterised(layer, path, where, what if layer.kind != "pixel" else "a layer with a vector mask")
    else:
        pixels = _own_pixels(layer)
    if layer.has_mask() and not layer.mask.disabled:
        _warn(path, where, "its layer mask is applied to its alpha")
        pixels = _apply_mask(layer, pixels)
    return pixels, (layer.left, layer.top)


def _look_warnings(layer, path: Path, where: str) -> None:
    """Warn about what draws a layer differently from plain "over" and is not kept."""
    modes = _GROUP_MODES if layer.is_group() else {BlendMode.NORMAL}
    if layer.blend_mode not in modes:
        _warn(path, where, f"blend mode {layer.blend_mode.name.lower()} is not kept; it is drawn as normal")
    if layer.has_effects():
        _warn(path, where, "its layer effects (shadows, strokes, glows) are not loaded")
    if _is_clipped(layer):
        _warn(path, where, "it is clipped to the layer below; the clipping is not kept, it is drawn unclipped")
    if layer.is_group() and layer.has_mask() and not layer.mask.disabled:
        _warn(path, where, "its group mask is not applied")


def _is_clipped(layer) -> bool:
    # psd-tools renamed clipping_layer to clipping; the old name warns where the new one exists.
    return bool(layer.clipping if hasattr(type(layer), "clipping") else getattr(layer, "clipping_layer", False))


def _opacity(layer) -> int:
    # Without effects, fill opacity scales the pixels just as opacity does, so the two fold into one.
    fill = getattr(layer, "fill_opacity", 255)
    return (int(layer.opacity) * int(fill) + 127) // 255


def _read_layers(group, path: Path, prefix: tuple[int, ...]) -> tuple[Layer, ...]:
    layers = []
    for index, item in enumerate(group):
        name = str(item.name)
        where = f"{format_layer_path(prefix + (index,))} {name!r}"
        _look_warnings(item, path, where)
        if item.is_group():
            if item.kind == "artboard":
                _warn(path, where, "an artboard, loaded as a group (its bounds are not kept)")
            children = _read_layers(item, path, prefix + (index,))
            box = union_boxes(child.drawn_box() for child in children)
            if not children:
                _warn(path, where, "an empty group, loaded as an empty layer")
            pixels = _empty() if box is None else render(children, box)
            offset = (0, 0) if box is None else (box[0], box[1])
        else:
            children = ()
            pixels, offset = _layer_pixels(item, path, where)
        layers.append(Layer(pixels, name, offset, children, visible=bool(item.visible), opacity=_opacity(item)))
    return tuple(layers)


def load_psd(path: str | os.PathLike) -> LayerStack:
    """Read a layered PSD (or PSB) into a stack: layers bottom to top, groups as split layers.

    Raises :class:`~layered_core.export.ExportError` for a file that is not a readable PSD, a document that
    is not 8-bit RGB or greyscale, and layers a stack cannot hold; warns (:class:`PSDReadWarning`, and the
    log) for what was rasterised or lost. A split layer's own pixels are the composite of its children.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        document = PSDImage.open(path)
    except Exception as error:  # psd-tools raises struct, value, assertion and OS errors on a bad file
        raise ExportError(f"{path}: not a readable PSD file ({type(error).__name__}: {error})") from error
    if document.depth != 8:
        raise ExportError(
            f"{path}: the document is {document.depth}-bit per channel; only 8-bit PSDs are read. "
            "Convert it to 8 bits per channel in your editor (Image > Mode > 8 Bits/Channel)"
        )
    if document.color_mode not in _COLOUR_MODES:
        raise ExportError(
            f"{path}: the document's colour mode is {ColorMode(document.color_mode).name}; only RGB and "
            "greyscale are read. Convert it to RGB in your editor"
        )
    try:
        layers = _read_layers(document, path, ())
    except ExportError:
        raise
    except Exception as error:  # damaged channel data shows only when a layer is decoded
        raise ExportError(f"{path}: a layer could not be decoded ({type(error).__name__}: {error})") from error
    return LayerStack(document.width, document.height, layers)
