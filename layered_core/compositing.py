"""Compositing layer stacks: the layers laid "over" one another, bottom to top, into a canvas region.

Work is done in float32, premultiplied, one strip of rows at a time (threads share the strips), and rounded to
uint8 once at the end. Hidden layers are left out; a layer's opacity scales its alpha; a split layer at an opacity
below 255 is a pass-through group: its contents are laid over the backdrop, then the result is mixed with the
backdrop by the opacity. :func:`composite` is the display compositing of a stack, :func:`render_layer` one layer
on the canvas, :func:`composite_planes_over_white` what a PSD stores as its merged image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .layers import Box, Layer, LayerStack, _round_to_uint8

# Rows per compositing strip: about 64 K pixels, so a strip's float32 working set (1 MiB) stays in cache, which is
# faster than whole-image numpy operations (benchmarks/bench_psd.py).
_STRIP_PIXELS = 1 << 16
# Threads that composite strips side by side: the CPUs this process may run on.
_WORKERS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@dataclass(frozen=True)
class _Placed:
    """One unsplit layer's pixels inside the region being composited, in region coordinates."""

    columns: np.ndarray  # the layer's rows, cut to the region's columns
    layer_top: int
    left: int
    right: int
    first: int  # rows of the region the layer covers: [first, last)
    last: int
    opacity: int


@dataclass(frozen=True)
class _Group:
    """A split layer drawn at an opacity below 255: its contents are laid over the backdrop, then the
    result is mixed with the backdrop by ``opacity``."""

    items: list
    opacity: int


def _placements(layers: Sequence[Layer], box: Box) -> list:
    """What compositing ``layers`` into ``box`` draws, bottom to top: hidden layers (and groups) left out,
    fully opaque groups opened in place, translucent ones kept as :class:`_Group`."""
    x0, y0, x1, y1 = box
    items: list = []
    for layer in layers:
        if not layer.visible or layer.opacity == 0:
            continue
        if layer.children:
            inner = _placements(layer.children, box)
            if layer.opacity == 255:
                items.extend(inner)
            elif inner:
                items.append(_Group(inner, layer.opacity))
            continue
        lx0, ly0, lx1, ly1 = layer.box
        cx0, cy0, cx1, cy1 = max(lx0, x0), max(ly0, y0), min(lx1, x1), min(ly1, y1)
        if cx0 < cx1 and cy0 < cy1:
            columns = layer.pixels[:, cx0 - lx0 : cx1 - lx0]
            items.append(_Placed(columns, ly0 - y0, cx0 - x0, cx1 - x0, cy0 - y0, cy1 - y0, layer.opacity))
    return items


def _draw_items(items: list, strip: np.ndarray, top: int) -> None:
    """Lay ``items`` over the premultiplied ``strip`` (region rows ``top`` onwards), in place."""
    bottom = top + strip.shape[0]
    for item in items:
        if isinstance(item, _Group):
            backdrop = strip.copy()
            _draw_items(item.items, strip, top)
            strip -= backdrop
            strip *= item.opacity / 255
            strip += backdrop
            continue
        start, stop = max(top, item.first), min(bottom, item.last)
        if start < stop:
            below = strip[start - top : stop - top, item.left : item.right]
            _draw_over(below, item.columns[start - item.layer_top : stop - item.layer_top], item.opacity)


def _composite_rows(layers: Sequence[Layer], box: Box, finish: Callable[[int, np.ndarray], None]) -> None:
    """Composite ``layers`` into ``box`` one strip of rows at a time, calling ``finish(first_row, strip)``.

    ``strip`` is float32 premultiplied RGBA in 0..255 units (colour c * a / 255, alpha a), which saves a
    scaling pass per layer; its buffer is reused once ``finish`` returns. Working strip by strip keeps the
    accumulator in cache while every layer is laid over it, and no canvas-sized float array is needed.
    Strips are shared among threads (numpy releases the GIL in its loops), so ``finish`` may run
    concurrently, always on different rows.
    """
    x0, y0, x1, y1 = box
    width, height = max(x1 - x0, 0), max(y1 - y0, 0)
    items = _placements(layers, box)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    tops = list(range(0, height, rows))

    def work(strip_tops: list[int]) -> None:
        buffer = np.empty((min(rows, height), width, 4), np.float32)
        for top in strip_tops:
            bottom = min(top + rows, height)
            strip = buffer[: bottom - top]
            strip.fill(0)
            _draw_items(items, strip, top)
            finish(top, strip)

    workers = min(_WORKERS, len(tops))
    if workers <= 1:
        work(tops)
        return
    # Interleaved strips even out the load: layers tend to gather in some rows.
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, [tops[index::workers] for index in range(workers)]))


def _draw_over(below: np.ndarray, pixels: np.ndarray, opacity: int = 255) -> None:
    """Lay uint8 straight-alpha ``pixels`` at ``opacity`` (0..255) over the premultiplied 0..255 ``below``,
    in place."""
    alpha = pixels[..., 3]
    if not alpha.any():
        return  # nothing to draw: the common case around design elements
    if opacity == 255:
        if alpha.min() == 255:
            below[...] = pixels  # opaque: premultiplied in 0..255 units is the pixel itself
            return
        if ((alpha == 0) | (alpha == 255)).all():
            np.copyto(below, pixels, where=(alpha == 255)[..., None])  # hard edges (text, flat shapes)
            return
    colour = pixels.astype(np.float32)
    if opacity != 255:
        colour[..., 3:4] *= opacity / 255
    coverage = colour[..., 3:4] * (1 / 255)
    colour[..., :3] *= coverage
    below *= 1 - coverage
    below += colour


def _unpremultiply_into(out: np.ndarray, strip: np.ndarray) -> None:
    """Premultiplied 0..255 ``strip`` -> uint8 straight RGBA ``out`` (colour 0 where alpha is 0).

    ``out`` is (rows, width, 4), or (4, rows, width) for channel planes.
    """
    alpha = strip[..., 3:4]
    if alpha.min() >= 255 - 1e-3:
        colour = strip.copy()  # opaque: no division (float drift below 255 is far below 1/255)
    else:
        colour = np.zeros(strip.shape, np.float32)
        np.divide(strip, alpha, out=colour, where=alpha > 0)
        colour *= 255
        colour[..., 3:] = alpha
    values = _round_to_uint8(colour)
    if out.shape == values.shape:
        out[...] = values
    else:
        out[...] = values.transpose(2, 0, 1)


def render_premultiplied(layers: Sequence[Layer], box: Box) -> np.ndarray:
    """Composite ``layers`` ("over", bottom to top) into the canvas region ``box``.

    Returns float32 ``(h, w, 4)`` premultiplied RGBA in 0..1 over a transparent start, which is the paper's
    C_0 = 0, C_i = a_i * RGB_i + (1 - a_i) * C_{i-1} with the alpha carried alongside.
    """
    out = np.empty((max(box[3] - box[1], 0), max(box[2] - box[0], 0), 4), np.float32)

    def finish(top: int, strip: np.ndarray) -> None:
        np.multiply(strip, 1 / 255, out=out[top : top + strip.shape[0]])

    _composite_rows(layers, box, finish)
    return out


def render(layers: Sequence[Layer], box: Box) -> np.ndarray:
    """Composite ``layers`` into the canvas region ``box`` as uint8 straight RGBA."""
    out = np.empty((max(box[3] - box[1], 0), max(box[2] - box[0], 0), 4), np.uint8)
    _composite_rows(layers, box, lambda top, strip: _unpremultiply_into(out[top : top + strip.shape[0]], strip))
    return out


def composite(stack: LayerStack) -> np.ndarray:
    """The stack flattened onto its canvas: uint8 (H, W, 4) straight RGBA, transparent where nothing is drawn.

    One layer over another matches PIL's ``Image.alpha_composite`` within 1/255 wherever the result is
    not fully transparent. PIL rounds to 8 bits after every layer and this rounds once, so a long chain of
    semi-transparent layers can drift one step further from PIL (by being closer to the exact value). This is
    the display compositing; the LayerD metrics composite as PIL does, bit for bit
    (:func:`~layered_core.metrics.layerd_composite`).
    """
    return render(stack.layers, (0, 0, stack.width, stack.height))


def composite_planes_over_white(stack: LayerStack) -> np.ndarray:
    """The stack flattened as a PSD's merged image stores it: uint8 channel planes (4, H, W) R, G, B, A with
    the colour matted over white, ``c * a + 255 * (1 - a)``.

    Readers (Photoshop, psd-tools' ``topil``, thumbnailers) take a transparent merged image's colour as matted
    over white and remove the matte, ``c = (x + a - 255) * 255 / a`` cut to an integer. The matted value is
    rounded up from ``c * a``, so that what they recover is :func:`composite`'s colour or at most one
    premultiplied level above it; opaque pixels store :func:`composite` itself, and nothing drawn is white.
    """
    planes = np.empty((4, stack.height, stack.width), np.uint8)

    def finish(top: int, strip: np.ndarray) -> None:
        _unpremultiply_into(planes[:, top : top + strip.shape[0]], strip)

    _composite_rows(stack.layers, (0, 0, stack.width, stack.height), finish)
    colour, alpha = planes[:3].astype(np.int32), planes[3:].astype(np.int32)
    planes[:3] = (colour * alpha + 254) // 255 + 255 - alpha
    return planes


def composite_premultiplied(stack: LayerStack) -> np.ndarray:
    """The stack flattened onto its canvas, float32 premultiplied RGBA before rounding (for metrics)."""
    return render_premultiplied(stack.layers, (0, 0, stack.width, stack.height))


def render_layer(layer: Layer, width: int, height: int) -> np.ndarray:
    """One layer on a ``width`` x ``height`` canvas, uint8 straight RGBA.

    An unsplit layer is placed as stored (bit-exact, colour under alpha 0 included); a split layer is the
    composite of its children.
    """
    if layer.children:
        return render(layer.children, (0, 0, width, height))
    canvas = np.zeros((height, width, 4), np.uint8)
    lx0, ly0, lx1, ly1 = layer.box
    cx0, cy0, cx1, cy1 = max(lx0, 0), max(ly0, 0), min(lx1, width), min(ly1, height)
    if cx0 < cx1 and cy0 < cy1:
        canvas[cy0:cy1, cx0:cx1] = layer.pixels[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0]
    return canvas
