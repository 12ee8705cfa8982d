"""Layer stacks: RGBA layers bottom to top, with names, canvas offsets and sub-stacks from recursive
splitting.

In memory a layer's pixels are a ``uint8`` array of shape ``(height, width, 4)``: sRGB colour with straight
(unpremultiplied) alpha, the layout of PNG, of PSD channel data and of PIL's ``"RGBA"`` mode. Eight bits is
what every export writes, so a layer that is not edited is carried through to the file bit for bit, and
"bit-identical" is something a test can check. Arithmetic (compositing, resampling) happens in float32 and
is rounded once at the end.

A layer sits on the canvas at ``offset = (x, y)``, the canvas position of its pixel ``[0, 0]``; it may be
smaller than the canvas or stick out of it. A layer that was split again (recursive splitting) keeps its own
pixels and carries the sub-layers in ``children``, bottom to top, in canvas coordinates; it is drawn as its
children, the way a PSD group shows its contents. Stacks and layers are immutable: every edit builds a new
stack that shares the untouched layers (and their read-only arrays) with the old one.

Conversions: :func:`rgba_from_pil` / :func:`rgba_to_pil` for PIL images, :func:`rgba_from_bhwc` /
:func:`rgba_to_bhwc` and :func:`stack_from_bhwc` / :func:`stack_to_bhwc` for ComfyUI's IMAGE
convention (``[B, H, W, C]`` float 0..1, C = 3 or 4, a batch of layers bottom to top).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

LayerPath = int | tuple[int, ...]
"""Where a layer is: an index into the top-level layers (bottom = 0), or a tuple of indices descending
into ``children`` (``(2, 0)`` is the bottom sub-layer of layer 2). Negative indices count from the top."""

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` on the canvas, half-open."""


def parse_layer_path(text: str, stack: LayerStack | None = None) -> tuple[int, ...]:
    """A layer path as people type it, numbered from 1 at the bottom as a user counts: ``"2"`` (the second
    layer from the bottom), ``"3/1"`` (the bottom sub-layer of layer 3), ``"-1"`` (the top layer). Returns
    the library's 0-based path. With ``stack``, a layer that does not exist there is an error in the same
    1-based terms."""
    steps = str(text).replace(" ", "").split("/")
    try:
        numbers = [int(step) for step in steps]
    except ValueError:
        numbers = []
    if not numbers or 0 in numbers:
        raise ValueError(
            f"layer {text!r}: expected layer numbers separated by '/', such as '2' or '3/1' "
            "(1 = the bottom layer, -1 = the top one)"
        )
    path = tuple(number - 1 if number > 0 else number for number in numbers)
    if stack is not None:
        siblings, where = stack.layers, "the stack has"
        for depth, index in enumerate(path):
            if depth and not siblings:
                parent = "/".join(str(n) for n in numbers[:depth])
                raise ValueError(f"layer {text!r} does not exist: layer {parent} is not split (it has no sub-layers)")
            if not -len(siblings) <= index < len(siblings):
                raise ValueError(
                    f"layer {text!r} does not exist: {where} {len(siblings)} layers "
                    f"(1 = bottom to {len(siblings)} = top, or -1 = top)"
                )
            where = f"layer {'/'.join(str(n) for n in numbers[: depth + 1])} has"
            siblings = siblings[index].children
    return path


def format_layer_path(path: tuple[int, ...]) -> str:
    """A 0-based library path as people read it (the inverse of :func:`parse_layer_path`): ``(2, 0)`` -> "3/1"."""
    return "/".join(str(index + 1) for index in path)


def as_rgba(pixels: np.ndarray, what: str = "pixels") -> np.ndarray:
    """Check that ``pixels`` is a ``uint8`` (H, W, 4) array (an (H, W, 3) one gets alpha 255); return it."""
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"{what}: expected a numpy uint8 array of shape (H, W, 4), got {type(pixels).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(
            f"{what}: expected a numpy uint8 array of shape (H, W, 4) (straight alpha), "
            f"got dtype {pixels.dtype} and shape {pixels.shape}"
        )
    if pixels.shape[2] == 3:
        opaque = np.full(pixels.shape[:2] + (1,), 255, np.uint8)
        pixels = np.concatenate([pixels, opaque], axis=2)
    return pixels


def _read_only(pixels: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(pixels).view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class Layer:
    """One RGBA layer. ``pixels`` is not copied: do not write to an array after handing it over."""

    pixels: np.ndarray
    name: str = "Layer"
    offset: tuple[int, int] = (0, 0)
    children: tuple[Layer, ...] = ()
    visible: bool = True
    opacity: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixels", _read_only(as_rgba(self.pixels, f"layer {self.name!r}")))
        if not isinstance(self.name, str):
            raise ValueError(f"layer name: expected a str, got {type(self.name).__name__}")
        try:
            x, y = (int(v) for v in self.offset)
        except (TypeError, ValueError):
            raise ValueError(f"layer {self.name!r}: offset must be two integers (x, y), got {self.offset!r}") from None
        object.__setattr__(self, "offset", (x, y))
        children = tuple(self.children)
        for child in children:
            if not isinstance(child, Layer):
                raise ValueError(f"layer {self.name!r}: children must be Layers, got {type(child).__name__}")
        object.__setattr__(self, "children", children)
        if not isinstance(self.visible, (bool, np.bool_)):
            raise ValueError(f"layer {self.name!r}: visible must be True or False, got {self.visible!r}")
        object.__setattr__(self, "visible", bool(self.visible))
        if (
            not isinstance(self.opacity, (int, np.integer))
            or isinstance(self.opacity, bool)
            or not (0 <= self.opacity <= 255)
        ):
            raise ValueError(
                f"layer {self.name!r}: opacity must be an integer 0..255 (PSD's byte), got {self.opacity!r}"
            )
        object.__setattr__(self, "opacity", int(self.opacity))

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def box(self) -> Box:
        """The pixel array's extent on the canvas."""
        x, y = self.offset
        return (x, y, x + self.width, y + self.height)

    @property
    def is_split(self) -> bool:
        return bool(self.children)

    def alpha_box(self) -> Box | None:
        """Canvas box of the pixels with alpha > 0 (own pixels only), or None when fully transparent."""
        local = alpha_box(self.pixels)
        if local is None:
            return None
        x, y = self.offset
        return (local[0] + x, local[1] + y, local[2] + x, local[3] + y)

    def drawn_box(self) -> Box | None:
        """Canvas box of what this layer draws: its own alpha box, or its children's for a split layer."""
        if not self.children:
            return self.alpha_box()
        return union_boxes(child.drawn_box() for child in self.children)

    def replace(self, **changes) -> Layer:
        """A copy with some fields changed; the fields not named are shared, not copied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class LayerStack:
    """A canvas of ``width`` x ``height`` pixels and its layers, bottom to top."""

    width: int
    height: int
    layers: tuple[Layer, ...] = field(default=())

    def __post_init__(self) -> None:
        for label, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"layer stack {label}: expected a positive integer, got {value!r}")
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        layers = tuple(self.layers)
        for layer in layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"layer stack: layers must be Layers, got {type(layer).__name__}")
        object.__setattr__(self, "layers", layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, path: LayerPath) -> Layer:
        return self.get(path)

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def get(self, path: LayerPath) -> Layer:
        """The layer at ``path``."""
        path = self.resolve(path)
        siblings = self.layers
        layer = None
        for index in path:
            layer = siblings[index]
            siblings = layer.children
        return layer

    def resolve(self, path: LayerPath) -> tuple[int, ...]:
        """``path`` as a tuple of non-negative indices; a ValueError names the step that does not exist."""
        steps = (path,) if isinstance(path, (int, np.integer)) else tuple(path)
        if not steps:
            raise ValueError("layer path: expected at least one index, got ()")
        resolved = []
        siblings = self.layers
        for depth, index in enumerate(steps):
            if not isinstance(index, (int, np.integer)):
                raise ValueError(f"layer path {path!r}: expected integers, got {index!r}")
            count = len(siblings)
            if not -count <= index < count:
                where = "the stack" if depth == 0 else f"layer {tuple(resolved)!r}"
                raise ValueError(f"layer path {path!r}: index {index} is out of range, {where} has {count} layers")
            index = int(index) % count
            resolved.append(index)
            siblings = siblings[index].children
        return tuple(resolved)

    def siblings(self, parent: LayerPath | tuple[()] = ()) -> tuple[Layer, ...]:
        """The layer list at ``parent``: the top-level layers for ``()``, else that layer's children."""
        if parent == ():
            return self.layers
        return self.get(parent).children

    def with_siblings(self, parent: LayerPath | tuple[()], layers: Sequence[Layer]) -> LayerStack:
        """A new stack with the layer list at ``parent`` replaced; everything else is shared, not copied."""
        if parent == ():
            return LayerStack(self.width, self.height, tuple(layers))
        path = self.resolve(parent)
        return self.with_layer(path, self.get(path).replace(children=tuple(layers)))

    def with_layer(self, path: LayerPath, layer: Layer) -> LayerStack:
        """A new stack with the layer at ``path`` replaced by ``layer``."""
        path = self.resolve(path)

        def rebuild(siblings: tuple[Layer, ...], rest: tuple[int, ...]) -> tuple[Layer, ...]:
            index = rest[0]
            new = (
                layer
                if len(rest) == 1
                else siblings[index].replace(children=rebuild(siblings[index].children, rest[1:]))
            )
            return siblings[:index] + (new,) + siblings[index + 1 :]

        return LayerStack(self.width, self.height, rebuild(self.layers, path))

    def walk(self) -> Iterator[tuple[tuple[int, ...], Layer]]:
        """Every layer with its path, depth first, bottom to top (a split layer before its children)."""

        def visit(layers: tuple[Layer, ...], prefix: tuple[int, ...]):
            for index, layer in enumerate(layers):
                yield prefix + (index,), layer
                yield from visit(layer.children, prefix + (index,))

        return visit(self.layers, ())

    def describe(self) -> str:
        """The tree as text, one line a layer, top to bottom as an editor's layer panel shows it: the path as
        :func:`parse_layer_path` reads it (1 = bottom), name, box (x0, y0, x1, y1 of what it draws), and
        hidden / opacity where they are not the default."""
        lines = [f"canvas {self.width}x{self.height}, {len(self.layers)} layers (path: name, box)"]

        def visit(layers: tuple[Layer, ...], prefix: tuple[int, ...], depth: int) -> None:
            for index in reversed(range(len(layers))):
                layer = layers[index]
                path = format_layer_path(prefix + (index,))
                box = layer.drawn_box()
                where = "empty" if box is None else f"box {box[0]},{box[1]},{box[2]},{box[3]}"
                notes = [where] + ([] if layer.visible else ["hidden"])
                notes += [] if layer.opacity == 255 else [f"opacity {layer.opacity}"]
                notes += [f"split into {len(layer.children)}"] if layer.children else []
                lines.append(f"{'  ' * depth}{path}: {layer.name!r}  ({', '.join(notes)})")
                visit(layer.children, prefix + (index,), depth + 1)

        visit(self.layers, (), 0)
        return "\n".join(lines)

    def leaves(self) -> list[Layer]:
        """The unsplit layers in drawing order (split layers replaced by their children), hidden ones included."""
        return list(drawn_layers(self.layers))


def drawn_layers(layers: Sequence[Layer]) -> Iterator[Layer]:
    """The unsplit layers under ``layers``, bottom to top, hidden ones included."""
    for layer in layers:
        if layer.children:
            yield from drawn_layers(layer.children)
        else:
            yield layer


def attach_split(
    stack: LayerStack, path: LayerPath, sub_stack: LayerStack, origin: tuple[int, int] | None = None
) -> LayerStack:
    """Record that the layer at ``path`` was split into ``sub_stack`` (recursive splitting).

    ``sub_stack``'s canvas is placed with its (0, 0) at ``origin`` on this canvas; by default the layer's
    offset, which is right when the layer's own pixels were what got split.
    """
    layer = stack.get(path)
    if origin is None:
        origin = layer.offset
        if sub_stack.size != (layer.width, layer.height):
            raise ValueError(
                f"split of layer {layer.name!r}: the sub-stack is {sub_stack.width}x{sub_stack.height} "
                f"but the layer is {layer.width}x{layer.height}; pass origin= to place one of another size"
            )
    children = tuple(shift_layer(child, origin[0], origin[1]) for child in sub_stack.layers)
    return stack.with_layer(path, layer.replace(children=children))


def shift_layer(layer: Layer, dx: int, dy: int) -> Layer:
    """``layer`` and its sub-layers moved by (dx, dy) canvas pixels; the pixels are shared."""
    return layer.replace(
        offset=(layer.offset[0] + dx, layer.offset[1] + dy),
        children=tuple(shift_layer(child, dx, dy) for child in layer.children),
    )


def alpha_box(pixels: np.ndarray) -> Box | None:
    """Local box ``(x0, y0, x1, y1)`` of the pixels whose alpha is not 0, or None if there are none."""
    alpha = pixels[..., 3]
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha[rows[0] : rows[-1] + 1].any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def union_boxes(boxes) -> Box | None:
    """The smallest box holding every box given; None entries are skipped, None if none is left."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def crop_to_alpha(layer: Layer) -> Layer:
    """``layer`` with its own pixels cut to their alpha box (a 0x0 layer if fully transparent)."""
    local = alpha_box(layer.pixels)
    if local == (0, 0, layer.width, layer.height):
        return layer
    if local is None:
        return layer.replace(pixels=np.zeros((0, 0, 4), np.uint8))
    x0, y0, x1, y1 = local
    return layer.replace(pixels=layer.pixels[y0:y1, x0:x1], offset=(layer.offset[0] + x0, layer.offset[1] + y0))


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    # Round half up, after clipping (float noise may push a value a hair past 255); works in place.
    values += 0.5
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


# Conversions ---------------------------------------------------------------------------------------------


def rgba_from_pil(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as uint8 (H, W, 4) straight RGBA."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    return np.asarray(image).copy()


def rgba_to_pil(pixels: np.ndarray) -> Image.Image:
    """uint8 (H, W, 4) straight RGBA as a PIL ``"RGBA"`` image."""
    return Image.fromarray(np.ascontiguousarray(as_rgba(pixels)), "RGBA")


def rgba_from_bhwc(image: torch.Tensor) -> np.ndarray:
    """A ComfyUI IMAGE (``[H, W, C]`` or ``[1, H, W, C]`` float 0..1, C = 3 or 4) as uint8 straight RGBA."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"image tensor: expected one image, got a batch of {image.shape[0]}; use stack_from_bhwc")
        image = image[0]
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or not image.is_floating_point():
        raise ValueError(
            f"image tensor: expected float [H, W, C] or [1, H, W, C] with C = 3 or 4, "
            f"got {image.dtype} {tuple(image.shape)}"
        )
    values = image.detach().float().cpu().numpy()
    return as_rgba(_round_to_uint8(values * 255))


def rgba_to_bhwc(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 4) straight RGBA as a ComfyUI IMAGE: float32 ``[1, H, W, 4]`` in 0..1."""
    # Imported here so that code which only exports files does not pay for importing torch.
    import torch

    values = as_rgba(pixels).astype(np.float32) * (1 / 255)
    return torch.from_numpy(values)[None]


def stack_from_bhwc(images: torch.Tensor, names: Sequence[str] | None = None, crop: bool = True) -> LayerStack:
    """A batch of canvas-sized layers (``[N, H, W, C]`` float 0..1, bottom to top) as a stack.

    With ``crop`` each layer keeps only its alpha box (offsets say where it was), which is what the exports
    write anyway and saves memory on large canvases.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"layer tensor: expected [N, H, W, C] with N >= 1, got {tuple(images.shape)}")
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    if names is None:
        names = [f"Layer {index + 1}" for index in range(count)]
    if len(names) != count:
        raise ValueError(f"layer names: expected {count} names (one per layer), got {len(names)}")
    layers = []
    for index in range(count):
        layer = Layer(rgba_from_bhwc(images[index]), str(names[index]))
        layers.append(crop_to_alpha(layer) if crop else layer)
    return LayerStack(width, height, tuple(layers))


def stack_to_bhwc(stack: LayerStack) -> torch.Tensor:
    """Each top-level layer on the full canvas, as a ComfyUI IMAGE batch ``[N, H, W, 4]`` (bottom to top)."""
    import torch

    if not stack.layers:
        raise ValueError("layer stack: has no layers to turn into an image batch")
    from .compositing import render_layer  # compositing builds on this module

    return torch.cat([rgba_to_bhwc(render_layer(layer, stack.width, stack.height)) for layer in stack.layers])
