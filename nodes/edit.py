"""Editing a layer stack in the graph, what the decomposition is for: take one layer out as IMAGE + MASK for any
image node (Select Layer), put the result back (Replace Layer), move, scale and flip it (Transform Layer),
recolour it, remove, hide, reorder or merge layers, and see the result (Composite Layers).

Every node takes and gives the QWEN_LAYER_STACK of Decode Layers, Split Layer or Load Layered PSD and calls one
edit of layered_core.edits, which leaves every layer it does not target bit-identical. Layers are named as the
user counts them: 1 is the bottom layer, -1 the top one, "3/1" the bottom sub-layer of split layer 3.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..layered_core import edits
from ..layered_core.compositing import composite, render, render_layer
from ..layered_core.edits import RESAMPLE_FILTERS
from ..layered_core.layers import LayerStack, parse_layer_path
from .common import CATEGORY, PREFIX, STACK_TOOLTIP, LayerStackType, rgba_from_image_and_mask

LAYER_TOOLTIP = "which layer: 1 = the bottom one, -1 = the top one; '3/1' = the bottom sub-layer of split layer 3"


def _stack_input():
    return LayerStackType.Input(
        "stack", tooltip="the layer stack from Decode Layers, Split Layer, Load Layered PSD or another edit node"
    )


def _layer_input(default: str = "1"):
    return io.String.Input("layer", default=default, tooltip=LAYER_TOOLTIP)


def _stack_output():
    return LayerStackType.Output(display_name="stack", tooltip=STACK_TOOLTIP)


def _schema(
    name: str, display_name: str, description: str, inputs: list, outputs: list | None = None, output_node=False
):
    return io.Schema(
        node_id=f"{PREFIX}{name}",
        display_name=display_name,
        category=f"{CATEGORY}/edit",
        description=description,
        inputs=[_stack_input(), *inputs],
        outputs=[_stack_output()] if outputs is None else outputs,
        is_output_node=output_node,
    )


def _checked(node: str, edit, *args, **kwargs):
    """Run one edit (or the layer lookup); its ValueError (a layer that does not exist, a bad value) is re-raised
    naming the node."""
    try:
        return edit(*args, **kwargs)
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from None


def _path(node: str, stack: LayerStack, layer: str) -> tuple[int, ...]:
    return _checked(node, parse_layer_path, layer, stack)


def _rgb_and_mask(pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 straight RGBA as core's IMAGE [1, H, W, 3] and MASK [1, H, W] (1 = transparent)."""
    values = torch.from_numpy(pixels.astype(np.float32) * (1 / 255))[None]
    return values[..., :3].contiguous(), 1.0 - values[..., 3]


class SelectLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "SelectLayer",
            "Select Layer",
            "One layer as core's IMAGE + MASK (1 = transparent), on the whole canvas and cut to the layer's box, "
            "for any image node: Qwen-Image-Edit, inpainting, upscalers, colour tools. Put the result back with "
            "Replace Layer. A split layer gives what its sub-layers draw. Shows the stack's layers on the node.",
            [_layer_input()],
            outputs=[
                io.Image.Output(display_name="image", tooltip="the layer on the canvas, RGB [1, H, W, 3]"),
                io.Mask.Output(display_name="mask", tooltip="its transparency on the canvas, 1 = transparent"),
                io.Image.Output(display_name="cropped", tooltip="the layer cut to its box (may reach past the canvas)"),
                io.Mask.Output(display_name="cropped_mask", tooltip="the cropped layer's transparency"),
                io.Int.Output(display_name="x", tooltip="canvas x of the cropped image's left edge"),
                io.Int.Output(display_name="y", tooltip="canvas y of the cropped image's top edge"),
            ],
        )

    @classmethod
    def execute(cls, stack, layer) -> io.NodeOutput:
        path = _path("Select Layer", stack, layer)
        chosen = stack.get(path)
        box = chosen.drawn_box()
        if box is None:
            raise ValueError(f"Select Layer: layer {layer} ({chosen.name!r}) is empty (fully transparent)")
        on_canvas = _rgb_and_mask(render_layer(chosen, stack.width, stack.height))
        if chosen.children:
            cropped = render(chosen.children, box)
        else:  # the stored pixels themselves, so that putting them back unchanged changes nothing
            x, y = chosen.offset
            cropped = chosen.pixels[box[1] - y : box[3] - y, box[0] - x : box[2] - x]
        return io.NodeOutput(*on_canvas, *_rgb_and_mask(cropped), box[0], box[1], ui=ui.PreviewText(stack.describe()))


class ReplaceLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "ReplaceLayer",
            "Replace Layer",
            "Puts an IMAGE (with an optional MASK) in place of one layer; every other layer stays bit-identical. "
            "A split layer's sub-layers are dropped with its old pixels.",
            [
                _layer_input(),
                io.Image.Input("image", tooltip="the new layer: RGB or RGBA, one image"),
                io.Combo.Input(
                    "placement",
                    options=list(edits.PLACEMENTS),
                    default="layer box",
                    tooltip="layer box: the image is the size of the layer's box (Select Layer's cropped output) "
                    "and goes there; fit layer box: resampled to that box (for edit models and upscalers that "
                    "change the size); canvas: a canvas-sized image; x, y: at the position below",
                ),
                io.Int.Input("x", default=0, min=-16384, max=16384, tooltip="left edge, for placement 'x, y'"),
                io.Int.Input("y", default=0, min=-16384, max=16384, tooltip="top edge, for placement 'x, y'"),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="1 = transparent, as LoadImage and Select Layer give. Without one an RGBA image's own "
                    "alpha is used, and an RGB image keeps the layer's shape (its alpha at those pixels)",
                ),
            ],
        )

    @classmethod
    def execute(cls, stack, layer, image, placement, x, y, mask=None) -> io.NodeOutput:
        node = "Replace Layer"
        path = _path(node, stack, layer)
        pixels, has_alpha = rgba_from_image_and_mask(image, mask, node)
        replaced = _checked(
            node,
            edits.replace_image,
            stack,
            path,
            pixels,
            has_alpha=has_alpha,
            placement=placement,
            position=(x, y),
        )
        return io.NodeOutput(replaced)


class TransformLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "TransformLayer",
            "Transform Layer",
            "Moves, scales (about the middle of what the layer draws) and flips one layer. Resampling is "
            "premultiplied, so soft edges get no dark or light halo; pixels moved off the canvas are kept in the "
            "layer, not cut. Flip, then scale, then move.",
            [
                _layer_input(),
                io.Int.Input("dx", default=0, min=-16384, max=16384, tooltip="move right by this many pixels"),
                io.Int.Input("dy", default=0, min=-16384, max=16384, tooltip="move down by this many pixels"),
                io.Float.Input("scale_x", default=1.0, min=0.01, max=16.0, step=0.01, tooltip="horizontal scale"),
                io.Float.Input(
                    "scale_y", default=1.0, min=0.01, max=16.0, step=0.01, tooltip="vertical scale (unless kept)"
                ),
                io.Boolean.Input("keep_aspect", default=True, tooltip="scale both ways by scale_x"),
                io.Boolean.Input("flip_horizontal", default=False, tooltip="mirror left to right"),
                io.Boolean.Input("flip_vertical", default=False, tooltip="mirror top to bottom"),
                io.Combo.Input(
                    "resample", options=list(RESAMPLE_FILTERS), default="bicubic", tooltip="the filter for scaling"
                ),
            ],
        )

    @classmethod
    def execute(
        cls, stack, layer, dx, dy, scale_x, scale_y, keep_aspect, flip_horizontal, flip_vertical, resample
    ) -> io.NodeOutput:
        node = "Transform Layer"
        path = _path(node, stack, layer)
        scale = (scale_x, scale_x) if keep_aspect else (scale_x, scale_y)
        stack = _checked(node, edits.flip, stack, path, horizontal=flip_horizontal, vertical=flip_vertical)
        if scale != (1.0, 1.0):
            stack = _checked(node, edits.resize, stack, path, scale, resample=resample)
        if dx or dy:
            stack = _checked(node, edits.move, stack, path, dx, dy)
        return io.NodeOutput(stack)


def _parse_colour(text: str, node: str) -> tuple[int, int, int] | None:
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"#?([0-9a-fA-F]{6})", text)
    if match is None:
        raise ValueError(f"{node}: tint must be a colour like '#ff8800' (or empty for none), got {text!r}")
    value = int(match[1], 16)
    return (value >> 16, (value >> 8) & 255, value & 255)


class RecolorLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "RecolorLayer",
            "Recolor Layer",
            "Shifts one layer's hue, saturation and lightness and mixes in a tint; its alpha (shape, soft "
            "edges) is untouched, and so is every other layer. A split layer's sub-layers change with it.",
            [
                _layer_input(),
                io.Float.Input("hue", default=0.0, min=-180.0, max=180.0, step=1.0, tooltip="hue shift, degrees"),
                io.Float.Input(
                    "saturation", default=1.0, min=0.0, max=4.0, step=0.05, tooltip="saturation scale; 0 = grey"
                ),
                io.Float.Input(
                    "lightness", default=0.0, min=-1.0, max=1.0, step=0.05, tooltip="added to HSL lightness"
                ),
                io.String.Input("tint", default="", tooltip="a colour to mix in, like '#ff8800'; empty = none"),
                io.Float.Input(
                    "tint_strength", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="1 paints the layer the tint"
                ),
            ],
        )

    @classmethod
    def execute(cls, stack, layer, hue, saturation, lightness, tint, tint_strength) -> io.NodeOutput:
        node = "Recolor Layer"
        path = _path(node, stack, layer)
        colour = _parse_colour(tint, node)
        return io.NodeOutput(
            _checked(
                node,
                edits.recolor,
                stack,
                path,
                hue_shift=hue,
                saturation=saturation,
                lightness=lightness,
                tint=colour,
                tint_strength=tint_strength,
            )
        )


class RemoveLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("RemoveLayer", "Remove Layer", "Deletes one layer (with its sub-layers).", [_layer_input()])

    @classmethod
    def execute(cls, stack, layer) -> io.NodeOutput:
        path = _path("Remove Layer", stack, layer)
        return io.NodeOutput(_checked("Remove Layer", edits.remove, stack, path))


class LayerVisibility(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "LayerVisibility",
            "Hide/Show Layer",
            "Hides or shows one layer and sets its opacity. A hidden layer stays in the stack and is saved in the "
            "PSD, hidden; it is not drawn.",
            [
                _layer_input(),
                io.Boolean.Input("visible", default=False, tooltip="off hides the layer, on shows it"),
                io.Float.Input(
                    "opacity",
                    default=-1.0,
                    min=-1.0,
                    max=100.0,
                    step=1.0,
                    tooltip="percent, as Photoshop shows it; -1 keeps the layer's opacity",
                ),
            ],
        )

    @classmethod
    def execute(cls, stack, layer, visible, opacity) -> io.NodeOutput:
        node = "Hide/Show Layer"
        path = _path(node, stack, layer)
        stack = _checked(node, edits.set_visible, stack, path, visible)
        if opacity >= 0:
            stack = _checked(node, edits.set_opacity, stack, path, round(opacity * 255 / 100))
        return io.NodeOutput(stack)


class ReorderLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "ReorderLayer",
            "Reorder Layer",
            "Moves one layer up or down among its siblings; the others keep their order.",
            [
                _layer_input(),
                io.Int.Input(
                    "position", default=-1, min=-1000, max=1000, tooltip="its new place: 1 = bottom, -1 = top"
                ),
            ],
        )

    @classmethod
    def execute(cls, stack, layer, position) -> io.NodeOutput:
        node = "Reorder Layer"
        path = _path(node, stack, layer)
        if position == 0:
            raise ValueError(f"{node}: position 0 does not exist; 1 is the bottom, -1 the top")
        return io.NodeOutput(_checked(node, edits.move_to, stack, path, position - 1 if position > 0 else position))


class MergeLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "MergeLayers",
            "Merge Layers",
            "Flattens adjacent layers, from the one given upwards, into one layer in the lowest one's place.",
            [
                _layer_input(),
                io.Int.Input("count", default=2, min=2, max=1000, tooltip="how many layers, counting upwards"),
                io.String.Input("name", default="", tooltip="the merged layer's name; empty joins the names"),
            ],
        )

    @classmethod
    def execute(cls, stack, layer, count, name) -> io.NodeOutput:
        path = _path("Merge Layers", stack, layer)
        return io.NodeOutput(_checked("Merge Layers", edits.merge, stack, path, count, name=name.strip() or None))


class CompositeLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "CompositeLayers",
            "Composite Layers",
            "The stack flattened as the PSD shows it (hidden layers left out), as IMAGE + MASK, to see or use the "
            "edited picture.",
            [],
            outputs=[
                io.Image.Output(display_name="image", tooltip="RGB [1, H, W, 3]"),
                io.Mask.Output(display_name="mask", tooltip="1 = transparent"),
            ],
            output_node=True,
        )

    @classmethod
    def execute(cls, stack) -> io.NodeOutput:
        flat = composite(stack)
        image, mask = _rgb_and_mask(flat)
        preview = torch.from_numpy(flat.astype(np.float32) * (1 / 255))[None]
        return io.NodeOutput(image, mask, ui=ui.PreviewImage(preview, cls=cls))


NODES = [
    SelectLayer,
    ReplaceLayer,
    TransformLayer,
    RecolorLayer,
    RemoveLayer,
    LayerVisibility,
    ReorderLayer,
    MergeLayers,
    CompositeLayers,
]
