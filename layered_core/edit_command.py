"""``python -m layered_core edit``: the edits of :mod:`.edits` on a layered PSD or PNG zip from the command line.

    python -m layered_core edit IN.psd --list
    python -m layered_core edit IN.psd --recolor 2:hue=40 --move 3:+20,-10 --scale 1:1.5 --remove 4 --out OUT.psd

Layers are numbered as ``--list`` prints them: 1 is the bottom layer, -1 the top one, ``3/1`` the bottom
sub-layer of split layer 3. The operations run in the order given, each on the result of the ones before (after
``--remove 2`` the layer that was 3 is 2). Every operation is parsed before the file is read, and every layer
number is checked before anything is written; the output is written whole or not at all, and an existing file
is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import edits
from .export import ExportError
from .image import ImageError, open_image_with_alpha
from .layer_files import LAYER_FILE_SUFFIXES, load_layer_file, save_layer_file
from .layers import LayerStack, parse_layer_path

EXIT_USAGE = 2


class EditUsageError(ValueError):
    """An operation that cannot work; the message names the flag, its value and what it takes."""


@dataclass(frozen=True)
class Operation:
    """One edit as the command line gave it: the flag and its text, the layer it targets and the change."""

    flag: str
    text: str
    layer: str
    apply: Callable[[LayerStack, tuple[int, ...]], LayerStack]

    def run(self, stack: LayerStack) -> LayerStack:
        try:
            path = parse_layer_path(self.layer, stack)
            return self.apply(stack, path)
        except ValueError as error:
            raise EditUsageError(f"{self.flag} {self.text}: {error}") from None


def _number(flag: str, text: str, value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise EditUsageError(f"{flag} {text}: {what} must be a finite number, got {value!r}")
    return number


def _integer(flag: str, text: str, value: str, what: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", value.strip()):
        raise EditUsageError(f"{flag} {text}: {what} must be a whole number, got {value!r}")
    return int(value)


def _split(flag: str, text: str, needs_value: bool = True) -> tuple[str, str]:
    layer, colon, value = text.partition(":")
    if needs_value and (not colon or not value):
        raise EditUsageError(f"{flag} {text}: expected LAYER:VALUE, such as {EXAMPLES[flag]}")
    try:
        parse_layer_path(layer)  # the syntax now; whether the layer exists once the file is read
    except ValueError as error:
        raise EditUsageError(f"{flag} {text}: {error}") from None
    return layer, value


def _colour(flag: str, text: str, value: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"#?([0-9a-fA-F]{6})", value)
    if match is None:
        raise EditUsageError(f"{flag} {text}: tint must be RRGGBB hex, such as ff8800, got {value!r}")
    code = int(match[1], 16)
    return (code >> 16, (code >> 8) & 255, code & 255)


RECOLOR_KEYS = {
    "hue": "hue_shift",
    "sat": "saturation",
    "light": "lightness",
    "tint": "tint",
    "strength": "tint_strength",
}


def _recolor(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    settings: dict = {}
    for item in value.split(","):
        key, equals, number = item.partition("=")
        if key not in RECOLOR_KEYS or not equals:
            raise EditUsageError(
                f"{flag} {text}: expected KEY=VALUE items from {', '.join(RECOLOR_KEYS)}, got {item!r}"
            )
        if key == "tint":
            settings["tint"] = _colour(flag, text, number)
        else:
            settings[RECOLOR_KEYS[key]] = _number(flag, text, number, key)
    return Operation(flag, text, layer, lambda stack, path: edits.recolor(stack, path, **settings))


def _move(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    parts = value.split(",")
    if len(parts) != 2:
        raise EditUsageError(f"{flag} {text}: expected LAYER:DX,DY in pixels, such as {EXAMPLES[flag]}")
    dx, dy = (_integer(flag, text, part, name) for part, name in zip(parts, ("dx", "dy"), strict=True))
    return Operation(flag, text, layer, lambda stack, path: edits.move(stack, path, dx, dy))


def _scale(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    parts = value.lower().split("x")
    if len(parts) not in (1, 2):
        raise EditUsageError(f"{flag} {text}: expected LAYER:S or LAYER:SXxSY, such as {EXAMPLES[flag]}")
    factors = [_number(flag, text, part, "scale") for part in parts]
    if any(factor <= 0 for factor in factors):
        raise EditUsageError(f"{flag} {text}: scale must be positive, got {value!r}")
    scale = (factors[0], factors[-1])
    return Operation(flag, text, layer, lambda stack, path: edits.resize(stack, path, scale))


def _flip(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    if value not in ("h", "v", "hv", "vh"):
        raise EditUsageError(f"{flag} {text}: expected LAYER:h, LAYER:v or LAYER:hv, got {value!r}")
    return Operation(
        flag, text, layer, lambda stack, path: edits.flip(stack, path, horizontal="h" in value, vertical="v" in value)
    )


def _layer_only(change: Callable[[LayerStack, tuple[int, ...]], LayerStack]):
    def parse(flag: str, text: str) -> Operation:
        layer, _ = _split(flag, text, needs_value=False)
        return Operation(flag, text, layer, change)

    return parse


def _opacity(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    percent = _number(flag, text, value.rstrip("%"), "opacity")
    if not 0 <= percent <= 100:
        raise EditUsageError(f"{flag} {text}: opacity is a percentage, 0..100, got {value!r}")
    return Operation(flag, text, layer, lambda stack, path: edits.set_opacity(stack, path, round(percent * 255 / 100)))


def _reorder(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    named = {"top": -1, "bottom": 1}
    position = named[value] if value in named else _integer(flag, text, value, "the new position")
    if position == 0:
        raise EditUsageError(f"{flag} {text}: positions count from 1 (bottom) or -1 (top); 0 is neither")
    index = position - 1 if position > 0 else position
    return Operation(flag, text, layer, lambda stack, path: edits.move_to(stack, path, index))


def _merge(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    count = _integer(flag, text, value, "the number of layers to merge")
    return Operation(flag, text, layer, lambda stack, path: edits.merge(stack, path, count))


def _replace(flag: str, text: str) -> Operation:
    layer, value = _split(flag, text)
    file, at, where = value.rpartition("@")
    placement, position = "layer box", (0, 0)
    if at and where == "fit":
        placement = "fit layer box"
    elif at and re.fullmatch(r"[+-]?\d+,[+-]?\d+", where):
        position = tuple(int(part) for part in where.split(","))
        placement = "x, y"
    else:  # no placement: an '@' is part of the file's name (icon@2x.png)
        file = value
    path_of_image = Path(file)
    if not path_of_image.is_file():
        raise EditUsageError(f"{flag} {text}: no such image file {file!r}")

    def apply(stack: LayerStack, path: tuple[int, ...]) -> LayerStack:
        try:
            image, transparent = open_image_with_alpha(path_of_image)
        except ImageError as error:
            raise ValueError(str(error)) from None
        pixels = np.asarray(image).copy()
        chosen = placement
        if chosen == "layer box" and image.size == stack.size:
            box = stack.get(path).drawn_box()
            if box is None or (box[2] - box[0], box[3] - box[1]) != image.size:
                chosen = "canvas"  # a canvas-sized image goes on the canvas unless the layer fills it anyway
        return edits.replace_image(stack, path, pixels, has_alpha=transparent, placement=chosen, position=position)

    return Operation(flag, text, layer, apply)


OPERATIONS: dict[str, tuple[Callable[[str, str], Operation], str, str]] = {
    "--recolor": (
        _recolor,
        "2:hue=40,sat=0.8,light=0.1,tint=ff8800,strength=0.5",
        "shift hue (degrees), scale saturation, add lightness (-1..1), mix in a tint",
    ),
    "--move": (_move, "3:+20,-10", "move by DX,DY pixels (nothing is cut at the canvas edge)"),
    "--scale": (_scale, "1:1.5 or 1:2x0.5", "scale about the middle of what the layer draws; premultiplied, no halo"),
    "--flip": (_flip, "2:h", "mirror: h (left-right), v (top-bottom) or hv"),
    "--replace": (
        _replace,
        "2:new.png, 2:new.png@fit or 2:new.png@40,10",
        "the layer's pixels from an image file: at the layer's box (the same size), resampled to it (@fit), "
        "or at X,Y; an image without alpha keeps the layer's shape",
    ),
    "--remove": (_layer_only(edits.remove), "4", "delete the layer (and its sub-layers)"),
    "--hide": (
        _layer_only(lambda stack, path: edits.set_visible(stack, path, False)),
        "3",
        "hide the layer (kept in the file, not drawn)",
    ),
    "--show": (_layer_only(lambda stack, path: edits.set_visible(stack, path, True)), "3", "show a hidden layer"),
    "--opacity": (_opacity, "3:50", "set the opacity, percent"),
    "--reorder": (
        _reorder,
        "3:top",
        "move the layer among its siblings: top, bottom, or a position (1 = bottom, -1 = top)",
    ),
    "--merge": (_merge, "2:3", "flatten this many layers, from this one upwards, into one"),
}
EXAMPLES = {flag: example for flag, (_, example, _) in OPERATIONS.items()}


class _AddOperation(argparse.Action):
    """Keeps every operation flag in one list, in the order given on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        operations = list(getattr(namespace, "operations", None) or [])
        operations.append((option_string, values))
        namespace.operations = operations


def add_edit_parser(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="edit the layers of a PSD or PNG zip: recolor, move, scale, flip, replace, remove, hide, reorder, merge",
        description=__doc__.split("\n\n", 2)[2].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help=f"a layered file: {', '.join(LAYER_FILE_SUFFIXES)} (any writer's PSD)")
    p.add_argument(
        "--list",
        action="store_true",
        help="print the layers (top first) with their numbers and boxes; after the edits, if any are given",
    )
    p.add_argument("--out", help=f"where to write the result: {', '.join(LAYER_FILE_SUFFIXES)}")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    for flag, (_, example, text) in OPERATIONS.items():
        metavar = "LAYER" if flag in ("--remove", "--hide", "--show") else "LAYER:VALUE"
        p.add_argument(flag, action=_AddOperation, metavar=metavar, help=f"{text} (e.g. {flag} {example})")
    p.set_defaults(operations=[])


def plan_edit(args) -> list[Operation]:
    """Every operation parsed and the input and output checked, before the file is read. A layer counted from
    the top takes the FLAG=VALUE form (``--flip=-1:h``): argparse reads a value that starts with '-' as a flag."""
    source = Path(args.input)
    if source.suffix.lower() not in LAYER_FILE_SUFFIXES:
        raise EditUsageError(f"{source}: expected a layered file ending in {', '.join(LAYER_FILE_SUFFIXES)}")
    if not source.is_file():
        raise EditUsageError(f"{source}: no such file")
    operations = [OPERATIONS[flag][0](flag, text) for flag, text in args.operations]
    if not args.list:
        if not operations:
            raise EditUsageError("no edit given: add an operation such as --move 2:+10,0, or --list to see the layers")
        if not args.out:
            raise EditUsageError("--out is required: where to write the edited layers (.psd or .zip)")
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() not in LAYER_FILE_SUFFIXES:
            raise EditUsageError(f"--out {out}: expected a file ending in {', '.join(LAYER_FILE_SUFFIXES)}")
        if out.exists() and not out.is_file():
            raise EditUsageError(f"--out {out} is not a file")
        if out.exists() and not args.overwrite:
            raise EditUsageError(f"--out {out} exists; pass --overwrite to replace it")
    return operations


def edit_command(args) -> int:
    try:
        operations = plan_edit(args)
        stack = load_layer_file(args.input)
    except EditUsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        for operation in operations:
            stack = operation.run(stack)
    except EditUsageError as error:
        print(f"error: {error}; nothing was written", file=sys.stderr)
        return EXIT_USAGE
    if args.list:  # after the edits, if any: a dry run shows what --out would hold
        print(stack.describe())
    if not args.out:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_layer_file(stack, out)
    except (ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{out}: {len(operations)} edits, {sum(1 for _ in stack.walk())} layers")
    return 0
