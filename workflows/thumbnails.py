"""Draw the template thumbnails: workflows/<name>.jpg for each editor workflow workflows/<name>.json.

    python workflows/thumbnails.py

ComfyUI's Templates dialog shows ``<name>.jpg`` beside a custom node pack's ``<name>.json`` as its card
(the frontend asks for that file for every custom-node template). Each picture shows what its workflow does,
on a synthetic design with a known decomposition (``layered_core.synthetic``): the input picture and the RGBA
layers it comes apart into, each on a checkerboard where it is transparent. No model runs; the layers are the
design's own, as a good decomposition would give them back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # layered_core, beside this folder

from layered_core import edits  # noqa: E402
from layered_core.compositing import composite, render, render_layer  # noqa: E402
from layered_core.synthetic import synthetic_design  # noqa: E402

SIZE = 320  # the dialog shows a square card, at most 256 px high, with a "Node graph" badge over its top left
BACKGROUND = (32, 34, 38)
INK = (225, 228, 232)
FAINT = (150, 155, 165)
ACCENT = (110, 170, 255)
QUALITY = 85


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def _checker(width: int, height: int, cell: int = 6) -> Image.Image:
    ys, xs = np.mgrid[0:height, 0:width]
    light = ((xs // cell + ys // cell) % 2 == 0)[..., None]
    pixels = np.where(light, np.uint8(236), np.uint8(196)).repeat(3, axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _tile(rgba: np.ndarray, size: int) -> Image.Image:
    """An RGBA canvas scaled to ``size`` x ``size`` over a checkerboard, with a thin frame."""
    image = Image.fromarray(rgba, "RGBA").resize((size, size), Image.Resampling.LANCZOS)
    tile = _checker(size, size)
    tile.paste(image, (0, 0), image)
    ImageDraw.Draw(tile).rectangle((0, 0, size - 1, size - 1), outline=(90, 95, 105))
    return tile


def _arrow(draw: ImageDraw.ImageDraw, start: tuple[int, int], end: tuple[int, int], colour=ACCENT) -> None:
    draw.line([start, end], fill=colour, width=3)
    (x0, y0), (x1, y1) = start, end
    direction = np.array([x1 - x0, y1 - y0], np.float32)
    direction /= max(float(np.linalg.norm(direction)), 1e-6)
    normal = np.array([-direction[1], direction[0]])
    tip = np.array([x1, y1], np.float32)
    back = tip - 9 * direction
    draw.polygon([tuple(tip), tuple(back + 6 * normal), tuple(back - 6 * normal)], fill=colour)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int = 13, fill=INK, anchor="mm") -> None:
    draw.text(xy, text, font=_font(size), fill=fill, anchor=anchor)


def _chip(draw: ImageDraw.ImageDraw, centre: tuple[int, int], text: str) -> None:
    """A node-like label: the text in a rounded box."""
    font = _font(12)
    left, top, right, bottom = draw.textbbox(centre, text, font=font, anchor="mm")
    draw.rounded_rectangle((left - 8, top - 5, right + 8, bottom + 5), radius=6, fill=(58, 62, 70), outline=ACCENT)
    draw.text(centre, text, font=font, fill=INK, anchor="mm")


def _layer_row(canvas: Image.Image, layers: list[np.ndarray], top: int, size: int, gap: int) -> list[int]:
    """Tiles of ``layers`` in a centred row; returns each tile's centre x."""
    width = len(layers) * size + (len(layers) - 1) * gap
    left = (SIZE - width) // 2
    centres = []
    for index, rgba in enumerate(layers):
        x = left + index * (size + gap)
        canvas.paste(_tile(rgba, size), (x, top))
        centres.append(x + size // 2)
    return centres


def _design(width: int, height: int, layer_count: int, start: int):
    """The first synthetic design from seed ``start`` on whose every foreground layer is large enough to see
    in a thumbnail (mean alpha at least 4 % of the canvas)."""
    for seed in range(start, start + 1000):
        stack = synthetic_design(width, height, layer_count, seed=seed)
        coverage = [render_layer(layer, width, height)[..., 3].mean() / 255 for layer in stack.layers[1:]]
        if min(coverage, default=1.0) >= 0.04:
            return stack
    raise ValueError(f"no clear design among 1000 seeds from {start}")


def _layers_of(stack) -> list[np.ndarray]:
    return [render_layer(layer, stack.width, stack.height) for layer in stack.layers]


def image_to_layers(caption: str = "Decompose", layer_count: int = 4, seed: int = 7) -> Image.Image:
    """The input picture above its layers, bottom to top, and the PSD they are saved as."""
    stack = _design(256, 256, layer_count, seed)
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_tile(composite(stack), 112), (104, 48))
    _label(draw, (56, 104), "input", fill=FAINT)
    _arrow(draw, (160, 164), (160, 200))
    _chip(draw, (160, 178), caption)
    size = 70
    centres = _layer_row(canvas, _layers_of(stack), 208, size, 8)
    for index, x in enumerate(centres):
        _label(draw, (x, 208 + size + 11), f"layer {index + 1}", size=11, fill=FAINT)
    _label(draw, (266, 96), f"{layer_count} layers", fill=FAINT)
    _label(draw, (266, 114), "-> PSD", fill=FAINT)
    return canvas


def split_layer(seed: int = 50) -> Image.Image:
    """The input, its 3 layers, and layer 2 split again into 2 sub-layers: a tree."""
    design = _design(256, 256, 4, seed)
    background, first, second, third = design.layers
    box = (0, 0, design.width, design.height)
    top_level = [
        render_layer(background, design.width, design.height),
        render((first, second), box),  # layer 2: the two of them together, until it is split
        render_layer(third, design.width, design.height),
    ]
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_tile(composite(design), 76), (122, 46))
    _label(draw, (84, 84), "input", fill=FAINT)
    _arrow(draw, (160, 125), (160, 143))
    size, top = 66, 147
    centres = _layer_row(canvas, top_level, top, size, 14)
    for index, x in enumerate(centres):
        _label(draw, (x, top + size + 9), f"layer {index + 1}", size=11, fill=FAINT)
    # layer 2 -> its two sub-layers
    sub_size, sub_top = 52, 246
    parent_x, parent_bottom = centres[1], top + size + 18
    subs = [render_layer(first, design.width, design.height), render_layer(second, design.width, design.height)]
    for index, rgba in enumerate(subs):
        centre = parent_x + (index * 2 - 1) * 36
        _arrow(draw, (parent_x, parent_bottom), (centre, sub_top - 3))
        canvas.paste(_tile(rgba, sub_size), (centre - sub_size // 2, sub_top))
        _label(draw, (centre, sub_top + sub_size + 9), f"2.{index + 1}", size=11)
    _chip(draw, (56, 268), "Split Layer")
    _label(draw, (266, 262), "saved as", size=11, fill=FAINT)
    _label(draw, (266, 276), "a PSD group", size=11, fill=FAINT)
    return canvas


def batch_folder(seed: int = 70) -> Image.Image:
    """A folder of images, each decomposed into its layers and saved under its own file name."""
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _label(draw, (12, 306), "input/batch/", fill=FAINT, anchor="lm")
    _label(draw, (308, 306), "each -> batch/<name>.psd", size=11, fill=FAINT, anchor="rm")
    row_height, source_size, size = 86, 60, 46
    for row in range(3):
        stack = _design(256, 192 if row == 1 else 256, 4, seed + 100 * row)
        top = 44 + row * row_height
        source = Image.fromarray(composite(stack), "RGBA")
        source.thumbnail((source_size, source_size), Image.Resampling.LANCZOS)
        framed = _checker(*source.size)
        framed.paste(source, (0, 0), source)
        canvas.paste(framed, (12, top + (source_size - source.height) // 2))
        _label(draw, (12 + source_size // 2, top + source_size + 9), f"image_{row + 1}.png", size=10, fill=FAINT)
        _arrow(draw, (82, top + source_size // 2), (104, top + source_size // 2))
        side = max(stack.size)
        for index, rgba in enumerate(_layers_of(stack)):
            square = np.zeros((side, side, 4), np.uint8)
            square[: stack.height, : stack.width] = rgba  # keep the aspect: layers on a square tile
            canvas.paste(_tile(square, size), (112 + index * (size + 4), top + (source_size - size) // 2))
    return canvas


def edit_layers(seed: int = 90) -> Image.Image:
    """The input, its layers with one edit each (inverted, recoloured, moved; the background untouched), and the
    edited picture they make: what editing a decomposition is for."""
    design = _design(256, 256, 4, seed)
    edited = edits.replace_pixels(design, 1, edits.recolor_pixels(design[1].pixels, saturation=0, lightness=-0.2))
    edited = edits.recolor(edited, 2, hue_shift=150)
    edited = edits.move(edited, 3, -40, 30)
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_tile(composite(design), 100), (24, 40))
    canvas.paste(_tile(composite(edited), 100), (196, 40))
    _label(draw, (74, 152), "input", fill=FAINT)
    _label(draw, (246, 152), "edited", fill=FAINT)
    _arrow(draw, (134, 90), (186, 90))
    _chip(draw, (160, 118), "edit")
    size = 64
    centres = _layer_row(canvas, _layers_of(edited), 184, size, 10)
    for x, text in zip(centres, ("kept", "greyed", "recolor", "moved"), strict=True):
        _label(draw, (x, 184 + size + 11), text, size=11, fill=INK if text != "kept" else FAINT)
    _label(draw, (160, 290), "each layer alone, the rest bit-identical", size=11, fill=FAINT)
    return canvas


THUMBNAILS = {
    "image_to_layers": lambda: image_to_layers("Decompose"),
    "core_ksampler_interop": lambda: image_to_layers("KSampler", layer_count=3, seed=30),
    "split_layer": split_layer,
    "batch_folder": batch_folder,
    "edit_layers": edit_layers,
}


def main() -> None:
    for name, draw in THUMBNAILS.items():
        target = HERE / f"{name}.jpg"
        draw().save(target, quality=QUALITY, optimize=True)
        print(target, target.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
