"""Edits of a layer stack, the ones of the paper's figure 1: recolour, move, resize, flip, remove, replace,
hide and show, reorder and merge.

Each edit returns a new :class:`~layered_core.layers.LayerStack`. The layers it does not touch are the same
objects (with the same read-only arrays) as in the input, so they stay bit-identical by construction. An edit
of a split layer applies to its sub-layers too (moving a group moves its contents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .compositing import render
from .layers import Layer, LayerPath, LayerStack, as_rgba, crop_to_alpha, shift_layer, union_boxes

RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# How far each filter reaches, in source pixels at scale 1 (PIL's filter supports).
_FILTER_RADIUS = {"nearest": 0.5, "box": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}


def _map_subtree(layer: Layer, change: Callable[[Layer], Layer]) -> Layer:
    """Apply ``change`` to ``layer`` and to every layer under it."""
    changed = change(layer)
    if not layer.children:
        return changed
    return changed.replace(children=tuple(_map_subtree(child, change) for child in layer.children))


# Recolour ------------------------------------------------------------------------------------------------


def _rgb_to_hsl(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    spread = high - low
    lightness = (high + low) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(spread > 0, spread / (1 - np.abs(2 * lightness - 1)), 0.0)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        safe = np.where(spread > 0, spread, 1.0)
        hue = np.where(
            high == r,
            ((g - b) / safe) % 6,
            np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4),
        )
    return np.where(spread > 0, hue * 60, 0.0), np.clip(saturation, 0, 1), lightness


def _hsl_to_rgb(hue: np.ndarray, saturation: np.ndarray, lightness: np.ndarray) -> np.ndarray:
    chroma_half = saturation * np.minimum(lightness, 1 - lightness)
    channels = []
    for n in (0, 8, 4):
        k = (n + hue / 30) % 12
        channels.append(lightness - chroma_half * np.clip(np.minimum(k - 3, 9 - k), -1, 1))
    return np.stack(channels, axis=-1)


def _check_finite(what: str, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{what}: {name} must be a finite number, got {value!r}")


def _check_recolor(hue_shift, saturation, tint, tint_strength, lightness) -> None:
    _check_finite("recolour", hue_shift=hue_shift, saturation=saturation, lightness=lightness)
    if saturation < 0:
        raise ValueError(f"recolour: saturation must be >= 0 (a scale factor), got {saturation}")
    if not -1 <= lightness <= 1:
        raise ValueError(f"recolour: lightness must be in -1..1 (added to HSL lightness), got {lightness}")
    if not 0 <= tint_strength <= 1:
        raise ValueError(f"recolour: tint_strength must be in 0..1, got {tint_strength}")
    if tint is not None and (len(tint) != 3 or not all(0 <= int(c) <= 255 for c in tint)):
        raise ValueError(f"recolour: tint must be three 0..255 sRGB values, got {tint!r}")


def recolor_pixels(
    pixels: np.ndarray,
    hue_shift: float = 0.0,
    saturation: float = 1.0,
    tint: tuple[int, int, int] | None = None,
    tint_strength: float = 1.0,
    lightness: float = 0.0,
) -> np.ndarray:
    """New colours for RGBA ``pixels``; alpha is kept exactly.

    ``hue_shift`` rotates the HSL hue by that many degrees; ``saturation`` scales HSL saturation (0 gives
    grey at the same lightness); ``lightness`` (-1..1) is added to HSL lightness (1 gives white, -1
    black); then ``tint`` (an sRGB 0..255 colour) is mixed in with ``tint_strength`` (1 paints the layer
    that flat colour, its shape and soft edges kept by the untouched alpha).
    """
    pixels = as_rgba(pixels)
    _check_recolor(hue_shift, saturation, tint, tint_strength, lightness)
    rgb = pixels[..., :3].astype(np.float64) / 255
    if hue_shift % 360 != 0 or saturation != 1 or lightness != 0:
        hue, sat, light = _rgb_to_hsl(rgb)
        rgb = _hsl_to_rgb((hue + hue_shift) % 360, np.clip(sat * saturation, 0, 1), np.clip(light + lightness, 0, 1))
    if tint is not None and tint_strength > 0:
        target = np.asarray(tint, np.float64) / 255
        rgb = rgb * (1 - tint_strength) + target * tint_strength
    out = pixels.copy()
    out[..., :3] = np.clip(np.floor(rgb * 255 + 0.5), 0, 255).astype(np.uint8)
    return out


def recolor(
    stack: LayerStack,
    path: LayerPath,
    *,
    hue_shift: float = 0.0,
    saturation: float = 1.0,
    tint: tuple[int, int, int] | None = None,
    tint_strength: float = 1.0,
    lightness: float = 0.0,
) -> LayerStack:
    """Recolour the layer at ``path`` (and its sub-layers); see :func:`recolor_pixels` for the parameters."""
    layer = stack.get(path)
    _check_recolor(hue_shift, saturation, tint, tint_strength, lightness)  # a do-nothing edit is checked too
    if hue_shift % 360 == 0 and saturation == 1 and lightness == 0 and (tint is None or tint_strength == 0):
        return stack  # nothing to do; skipping keeps the pixels exact rather than round-tripped through HSL

    def change(layer: Layer) -> Layer:
        pixels = recolor_pixels(layer.pixels, hue_shift, saturation, tint, tint_strength, lightness)
        return layer.replace(pixels=pixels)

    return stack.with_layer(path, _map_subtree(layer, change))


# Move, resize and flip -----------------------------------------------------------------------------------------


def move(stack: LayerStack, path: LayerPath, dx: int, dy: int) -> LayerStack:
    """Move the layer at ``path`` (and its sub-layers) by whole pixels; its pixels are unchanged."""
    _check_finite("move", dx=dx, dy=dy)
    if int(dx) != dx or int(dy) != dy:
        raise ValueError(f"move: dx and dy must be whole pixels, got ({dx}, {dy})")
    return stack.with_layer(path, shift_layer(stack.get(path), int(dx), int(dy)))


def _snap(value: float) -> float:
    # Box edges computed in floating point land a hair off whole pixels (0.1 * 30 = 3.0000000000000004);
    # snapping keeps an exact scale from growing a one-pixel transparent border.
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < 1e-6 else value


def resize_layer(
    layer: Layer, scale: float | tuple[float, float], center: tuple[float, float], resample: str = "bicubic"
) -> Layer:
    """One layer's own pixels scaled by ``scale`` about the canvas point ``center``.

    Canvas point p goes to ``center + scale * (p - center)`` (pixel edges, so a pixel spans [x, x + 1)).
    Colour is resampled premultiplied by alpha, so transparent pixels contribute nothing and soft edges get
    no dark or light halo; the result is cut to its alpha box. Children are not touched (see :func:`resize`).
    """
    scale_x, scale_y = (scale, scale) if isinstance(scale, (int, float)) else scale
    if not (scale_x > 0 and scale_y > 0 and math.isfinite(scale_x) and math.isfinite(scale_y)):
        raise ValueError(f"resize of layer {layer.name!r}: scale must be positive and finite, got {scale!r}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resize: resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    if scale_x == 1 and scale_y == 1:
        return layer
    if layer.width == 0 or layer.height == 0:
        return layer
    cx, cy = center
    ox, oy = layer.offset
    left, right = (_snap(cx + scale_x * (edge - cx)) for edge in (ox, ox + layer.width))
    top, bottom = (_snap(cy + scale_y * (edge - cy)) for edge in (oy, oy + layer.height))
    x0, x1, y0, y1 = math.floor(left), math.ceil(right), math.floor(top), math.ceil(bottom)
    # The source region, in the layer's own pixel coordinates, that lands on the whole-pixel box above.
    source = [
        (x0 - cx) / scale_x + cx - ox,
        (y0 - cy) / scale_y + cy - oy,
        (x1 - cx) / scale_x + cx - ox,
        (y1 - cy) / scale_y + cy - oy,
    ]
    # PIL wants that region inside the image, and renormalises a filter cut off by the image border, which
    # would stretch edge pixels outwards. Transparent padding (zeros, premultiplied) as wide as the filter's
    # reach avoids both.
    outside = max(0.0, -source[0], -source[1], source[2] - layer.width, source[3] - layer.height)
    reach = _FILTER_RADIUS[resample] * max(1.0, 1 / scale_x, 1 / scale_y)
    pad = math.ceil(outside + reach) + 1
    source = (source[0] + pad, source[1] + pad, source[2] + pad, source[3] + pad)

    out = _resample_premultiplied(layer.pixels, (x1 - x0, y1 - y0), resample, pad, source)
    return crop_to_alpha(layer.replace(pixels=out, offset=(x0, y0)))


def _resample_premultiplied(
    pixels: np.ndarray, size: tuple[int, int], resample: str, pad: int = 0, source: tuple | None = None
) -> np.ndarray:
    """uint8 straight RGBA resampled to ``size`` with colour premultiplied by alpha (so transparent pixels
    give no colour and soft edges no halo); ``pad`` transparent pixels are added around first, ``source``
    is the region of the padded pixels to resample (all of them by default)."""
    values = pixels.astype(np.float32) * (1 / 255)
    values[..., :3] *= values[..., 3:4]
    if pad:
        values = np.pad(values, ((pad, pad), (pad, pad), (0, 0)))
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(values[..., c]), "F").resize(
                size, RESAMPLE_FILTERS[resample], box=source
            )
        )
        for c in range(4)
    ]
    premultiplied = np.stack(planes, axis=-1)
    alpha = np.clip(premultiplied[..., 3:4], 0, 1)
    colour = np.zeros(premultiplied.shape[:2] + (3,), np.float32)
    np.divide(premultiplied[..., :3], alpha, out=colour, where=alpha > 0)
    out = np.empty(premultiplied.shape, np.uint8)
    out[..., :3] = np.clip(colour * 255 + 0.5, 0, 255).astype(np.uint8)
    out[..., 3:] = np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)
    out[out[..., 3] == 0] = 0
    return out


def resize(
    stack: LayerStack,
    path: LayerPath,
    scale: float | tuple[float, float],
    *,
    center: tuple[float, float] | None = None,
    resample: str = "bicubic",
) -> LayerStack:
    """Scale the layer at ``path`` (and its sub-layers) about ``center`` (canvas coordinates).

    ``center`` defaults to the middle of what the layer draws. ``resample`` is one of nearest, box,
    bilinear, bicubic or lanczos; resampling is premultiplied (see :func:`resize_layer`).
    """
    layer = stack.get(path)
    if center is None:
        box = layer.drawn_box() or layer.box
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return stack.with_layer(path, _map_subtree(layer, lambda item: resize_layer(item, scale, center, resample)))


def fit_pixels(pixels: np.ndarray, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """uint8 straight RGBA ``pixels`` resampled (premultiplied, no halo) to exactly ``size`` = (width, height);
    for putting an edited image (an upscaler's, an edit model's) back into a layer's box."""
    pixels = as_rgba(pixels, "pixels to fit")
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels
    if width == 0 or height == 0 or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"fit: cannot resample {width}x{height} pixels to {size[0]}x{size[1]}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"fit: resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    # No transparent padding here: the image fills the box edge to edge, as it filled its own frame.
    return _resample_premultiplied(pixels, (int(size[0]), int(size[1])), resample)


def flip(stack: LayerStack, path: LayerPath, *, horizontal: bool = True, vertical: bool = False) -> LayerStack:
    """Mirror the layer at ``path`` (and its sub-layers, as one picture) about the middle of what it draws.

    Exact: pixels are reordered, never resampled, and the drawn box stays where it was.
    """
    if not (horizontal or vertical):
        return stack
    layer = stack.get(path)
    box = layer.drawn_box() or layer.box
    # Mirroring about the box's middle maps a pixel edge x to (x0 + x1) - x.
    twice_x, twice_y = box[0] + box[2], box[1] + box[3]

    def change(item: Layer) -> Layer:
        pixels = item.pixels[:, ::-1] if horizontal else item.pixels
        pixels = pixels[::-1] if vertical else pixels
        x0, y0, x1, y1 = item.box
        offset = (twice_x - x1 if horizontal else x0, twice_y - y1 if vertical else y0)
        return item.replace(pixels=np.ascontiguousarray(pixels), offset=offset)

    return stack.with_layer(path, _map_subtree(layer, change))


# Structure -----------------------------------------------------------------------------------------------


def remove(stack: LayerStack, path: LayerPath) -> LayerStack:
    """The stack without the layer at ``path`` (and its sub-layers)."""
    resolved = stack.resolve(path)
    parent, index = resolved[:-1], resolved[-1]
    siblings = stack.siblings(parent)
    kept = siblings[:index] + siblings[index + 1 :]
    if parent and not kept:
        # a split layer draws its sub-layers; with the last one gone it draws nothing, not its old pixels
        emptied = stack.get(parent).replace(pixels=np.zeros((0, 0, 4), np.uint8), children=())
        return stack.with_layer(parent, emptied)
    return stack.with_siblings(parent, kept)


def replace_pixels(
    stack: LayerStack, path: LayerPath, pixels: np.ndarray, *, offset: tuple[int, int] | None = None
) -> LayerStack:
    """Give the layer at ``path`` new pixels (uint8 (H, W, 4) straight RGBA) and, optionally, a new offset.

    A split layer loses its sub-layers: they decomposed the old pixels, not the new ones.
    """
    layer = stack.get(path)
    pixels = as_rgba(pixels, f"new pixels for layer {layer.name!r}")
    new = layer.replace(pixels=pixels, offset=layer.offset if offset is None else offset, children=())
    return stack.with_layer(path, new)


def set_visible(stack: LayerStack, path: LayerPath, visible: bool) -> LayerStack:
    """Hide or show the layer at ``path``; a hidden layer is kept (and saved, hidden) but not drawn."""
    layer = stack.get(path)
    return stack if layer.visible == bool(visible) else stack.with_layer(path, layer.replace(visible=bool(visible)))


def set_opacity(stack: LayerStack, path: LayerPath, opacity: int) -> LayerStack:
    """Set the opacity (0..255, as PSD stores it) of the layer at ``path``; its pixels are unchanged."""
    return stack.with_layer(path, stack.get(path).replace(opacity=opacity))


def move_to(stack: LayerStack, path: LayerPath, position: int) -> LayerStack:
    """Move the layer at ``path`` to index ``position`` among its siblings (negative counts from the top:
    -1 puts it on top); the others keep their order."""
    resolved = stack.resolve(path)
    parent, index = resolved[:-1], resolved[-1]
    count = len(stack.siblings(parent))
    if not -count <= position < count:
        raise ValueError(
            f"reorder: there are {count} layers at that level, so the new place is 1 (bottom) to {count} (top) "
            f"or -1 (top) to -{count}"
        )
    order = [item for item in range(count) if item != index]
    order.insert(position % count, index)
    return reorder(stack, order, parent=parent)


PLACEMENTS = ("layer box", "fit layer box", "canvas", "x, y")
"""Where :func:`replace_image` puts a new image: the layer's box (the image must be its size), the layer's
box after resampling the image to it, the whole canvas (a canvas-sized image), or a given position."""


def replace_image(
    stack: LayerStack,
    path: LayerPath,
    pixels: np.ndarray,
    *,
    has_alpha: bool = True,
    placement: str = "layer box",
    position: tuple[int, int] = (0, 0),
    resample: str = "bicubic",
) -> LayerStack:
    """Put an edited image (uint8 RGBA) in place of the layer at ``path``, at a ``placement`` of
    :data:`PLACEMENTS`. With ``has_alpha=False`` (an RGB image from an edit model, a colour tool) the layer
    keeps its shape: the new pixels take the old layer's alpha at the canvas pixels they cover. A result with
    nothing drawn is refused, as is an image whose size does not fit the placement."""
    layer = stack.get(path)
    pixels = as_rgba(pixels, f"new image for layer {layer.name!r}")
    height, width = pixels.shape[:2]
    box = layer.drawn_box()
    if placement in ("layer box", "fit layer box"):
        if box is None:
            raise ValueError(f"replace: layer {layer.name!r} is empty, so it has no box; place the image at x, y")
        size = (box[2] - box[0], box[3] - box[1])
        if placement == "fit layer box":
            pixels = fit_pixels(pixels, size, resample)
        elif (width, height) != size:
            raise ValueError(
                f"replace: the image is {width}x{height} but the box of layer {layer.name!r} is {size[0]}x{size[1]}; "
                "fit it to the box (resampled) or place it at x, y as it is"
            )
        offset = (box[0], box[1])
    elif placement == "canvas":
        if (width, height) != stack.size:
            raise ValueError(
                f"replace: placing on the canvas needs a {stack.width}x{stack.height} image, got {width}x{height}"
            )
        offset = (0, 0)
    elif placement == "x, y":
        offset = (int(position[0]), int(position[1]))
    else:
        raise ValueError(f"replace: placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if not has_alpha:
        region = (offset[0], offset[1], offset[0] + pixels.shape[1], offset[1] + pixels.shape[0])
        shape = layer.children or (layer.replace(visible=True, opacity=255),)
        pixels = pixels.copy()
        pixels[..., 3] = render(shape, region)[..., 3]
    if not pixels[..., 3].any():
        raise ValueError(
            f"replace: the new layer {layer.name!r} would be fully transparent (an empty mask, or an RGB image "
            "placed where the layer has no pixels); nothing to put in its place"
        )
    new = crop_to_alpha(Layer(pixels, layer.name, offset))
    return replace_pixels(stack, path, new.pixels, offset=new.offset)


def reorder(stack: LayerStack, order: Sequence[int], *, parent: LayerPath | tuple[()] = ()) -> LayerStack:
    """Put the layers at ``parent`` (top level by default) in a new order, bottom to top.

    ``order`` lists the current indices in their new order: ``[1, 0, 2]`` swaps the two bottom layers.
    """
    siblings = stack.siblings(parent)
    if sorted(order) != list(range(len(siblings))):
        raise ValueError(
            f"reorder: order must list each index 0..{len(siblings) - 1} exactly once, got {list(order)!r}"
        )
    return stack.with_siblings(parent, [siblings[index] for index in order])


def merge(stack: LayerStack, path: LayerPath, count: int = 2, *, name: str | None = None) -> LayerStack:
    """Flatten ``count`` adjacent layers, from the one at ``path`` upwards, into one layer.

    The merged layer is their composite, cut to its alpha box, and takes the place of the lowest; its name
    defaults to the names joined with " + ".
    """
    resolved = stack.resolve(path)
    parent, first = resolved[:-1], resolved[-1]
    siblings = stack.siblings(parent)
    if count < 2 or first + count > len(siblings):
        raise ValueError(
            f"merge: needs 2 or more layers from {siblings[first].name!r} upwards, got count={count} "
            f"with {len(siblings) - first} layers from there to the top"
        )
    group = siblings[first : first + count]
    box = union_boxes(layer.drawn_box() for layer in group)
    if box is None:
        merged_pixels, offset = np.zeros((0, 0, 4), np.uint8), group[0].offset
    else:
        merged_pixels, offset = render(group, box), (box[0], box[1])
    merged = crop_to_alpha(
        Layer(merged_pixels, name if name is not None else " + ".join(layer.name for layer in group), offset)
    )
    return stack.with_siblings(parent, siblings[:first] + (merged,) + siblings[first + count :])
