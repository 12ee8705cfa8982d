"""Synthetic layered designs with a known decomposition, for tests, benchmarks and evaluation.

A design is an opaque gradient background under foreground layers of four kinds, the things a graphic
design (and the Crello set the paper evaluates on) is made of: flat shapes with anti-aliased edges, soft
blobs whose alpha fades out, text-like lines of glyph strokes, and semi-transparent panels. Foreground
layers are placed to overlap earlier ones half of the time, so there is occlusion to see through.
Everything is drawn with PIL from a seeded numpy generator: the same arguments give the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .layers import Layer, LayerStack, crop_to_alpha

KINDS = ("shape", "soft", "text", "panel")
# Shapes are drawn this many times larger and scaled down with a box filter: an anti-aliased edge.
_SUPERSAMPLE = 4


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    start = np.array(_colour(rng), np.float32)
    end = np.array(_colour(rng), np.float32)
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    position = xs * np.cos(angle) / width + ys * np.sin(angle) / height
    position = (position - position.min()) / max(float(np.ptp(position)), 1e-6)
    pixels = np.empty((height, width, 4), np.uint8)
    pixels[..., :3] = np.floor(start + (end - start) * position[..., None] + 0.5).astype(np.uint8)
    pixels[..., 3] = 255
    return pixels


def _mask_to_layer(
    mask: Image.Image, colour: tuple[int, int, int], opacity: float, name: str, left: int, top: int
) -> Layer:
    alpha = np.asarray(mask, np.float32) * opacity
    pixels = np.empty(alpha.shape + (4,), np.uint8)
    # Colour fills the whole box, under transparent pixels too, as a design tool's layer would.
    pixels[..., :3] = colour
    pixels[..., 3] = np.floor(alpha + 0.5).astype(np.uint8)
    return crop_to_alpha(Layer(pixels, name, (left, top)))


def _shape_mask(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    big = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    box = (0, 0, big.width - 1, big.height - 1)
    form = rng.integers(0, 3)
    if form == 0:
        draw.ellipse(box, fill=255)
    elif form == 1:
        draw.rounded_rectangle(box, radius=int(min(big.size) * rng.uniform(0.05, 0.3)), fill=255)
    else:
        corners = [(0, big.height - 1), (big.width // 2, 0), (big.width - 1, big.height - 1)]
        draw.polygon(corners, fill=255)
    return big.resize((width, height), Image.Resampling.BOX)


def _soft_mask(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # An ellipse inset by the blur radius, blurred: alpha falls off smoothly to 0 inside the box.
    radius = max(1.0, min(width, height) * rng.uniform(0.06, 0.15))
    inset = int(radius * 2)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((inset, inset, width - 1 - inset, height - 1 - inset), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(radius))


def _text_mask(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Lines of 'words' whose glyphs are a few strokes between points of a 3x5 grid, like letters."""
    big = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    lines = int(rng.integers(1, 4))
    line_height = big.height / lines
    glyph_height = line_height * 0.7
    glyph_width = glyph_height * 0.55
    stroke = max(1, int(glyph_height * 0.12))
    for line in range(lines):
        top = line * line_height + (line_height - glyph_height) / 2
        x = 0.0
        while x + glyph_width <= big.width:
            if rng.random() < 0.18:
                x += glyph_width * 0.8  # a space between words
                continue
            points = [
                (x + glyph_width * col / 2, top + glyph_height * row / 4)
                for col, row in rng.integers(0, [3, 5], size=(int(rng.integers(3, 6)), 2))
            ]
            draw.line(points, fill=255, width=stroke, joint="curve")
            x += glyph_width * 1.25
    return big.resize((width, height), Image.Resampling.BOX)


def synthetic_design(width: int = 512, height: int = 512, layer_count: int = 6, seed: int = 0) -> LayerStack:
    """A random layered design: an opaque background and ``layer_count - 1`` foreground layers.

    The foreground cycles through the kinds shape, soft, text and panel (shuffled per design), so five or
    more layers hold one of each. Layers are cut to their alpha boxes. ``composite(stack)`` is the "input
    image" a decomposition of this design should give back.
    """
    if layer_count < 1:
        raise ValueError(f"synthetic design: layer_count must be >= 1, got {layer_count}")
    if width < 16 or height < 16:
        raise ValueError(f"synthetic design: the canvas must be at least 16x16, got {width}x{height}")
    rng = np.random.default_rng(seed)
    layers = [Layer(_background(rng, width, height), "background")]
    kinds = list(rng.permutation(KINDS))
    boxes: list[tuple[int, int, int, int]] = []
    for index in range(1, layer_count):
        kind = kinds[(index - 1) % len(kinds)]
        if kind == "text":
            box_width = int(width * rng.uniform(0.35, 0.7))
            box_height = int(height * rng.uniform(0.08, 0.2))
        else:
            box_width = int(width * rng.uniform(0.2, 0.5))
            box_height = int(height * rng.uniform(0.2, 0.5))
        box_width, box_height = max(box_width, 8), max(box_height, 8)
        if boxes and rng.random() < 0.5:
            # Centre the new layer inside an earlier one's box: occlusion, the hard part of decomposing.
            earlier = boxes[int(rng.integers(0, len(boxes)))]
            centre_x = rng.uniform(earlier[0], earlier[2])
            centre_y = rng.uniform(earlier[1], earlier[3])
            left = int(np.clip(centre_x - box_width / 2, 0, width - box_width))
            top = int(np.clip(centre_y - box_height / 2, 0, height - box_height))
        else:
            left = int(rng.integers(0, width - box_width + 1))
            top = int(rng.integers(0, height - box_height + 1))
        boxes.append((left, top, left + box_width, top + box_height))
        opacity = 1.0
        if kind == "shape":
            mask = _shape_mask(rng, box_width, box_height)
        elif kind == "soft":
            mask = _soft_mask(rng, box_width, box_height)
        elif kind == "text":
            mask = _text_mask(rng, box_width, box_height)
        else:
            mask = Image.new("L", (box_width, box_height), 255)
            opacity = float(rng.uniform(0.35, 0.75))
        name = f"{kind} {index}"
        layers.append(_mask_to_layer(mask, _colour(rng), opacity, name, left, top))
    return LayerStack(width, height, tuple(layers))
