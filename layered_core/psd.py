"""Layered PSD export: an 8-bit RGBA document that Photoshop, GIMP, Krita, psd-tools and Pillow open.

Each layer is written cut to its alpha box at its offset, RLE-compressed, with its Unicode name; a split
layer becomes a group of its sub-layers (nested for deeper trees); the input image can ride along as a
hidden bottom layer. The document is assembled from psd-tools' low-level records rather than through
``PSDImage``: saving a ``PSDImage`` re-renders the flattened preview with psd-tools' compositor, which takes
seconds on large canvases, while here the preview is our own :func:`~layered_core.compositing.composite` and the
channel data goes straight to psd-tools' compiled RLE codec.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from psd_tools.constants import BlendMode, ColorMode, Compression, SectionDivider, Tag
from psd_tools.psd import PSD
from psd_tools.psd.color_mode_data import ColorModeData
from psd_tools.psd.header import FileHeader
from psd_tools.psd.image_data import ImageData
from psd_tools.psd.image_resources import ImageResources
from psd_tools.psd.layer_and_mask import (
    ChannelData,
    ChannelDataList,
    ChannelImageData,
    ChannelInfo,
    LayerAndMaskInformation,
    LayerFlags,
    LayerInfo,
    LayerRecord,
    LayerRecords,
    TaggedBlocks,
)

from .atomic import atomic_write
from .compositing import composite_planes_over_white
from .export import ExportError, check_input_image
from .layers import Layer, LayerStack, crop_to_alpha

logger = logging.getLogger(__name__)

PSD_MAX_SIDE = 30000
"""The PSD format's limit on width and height (larger documents need PSB, which is not written here)."""

PSD_MAX_LAYERS = 8000
"""Photoshop's limit on layers plus groups in one document."""

MAX_NAME_LENGTH = 255
"""Photoshop's limit on a layer name, in characters."""

GROUP_END_NAME = "</Layer group>"

# Channel data goes in R, G, B, A order. Readers that honour the channel ids (Photoshop, psd-tools) do not
# mind the order; Pillow assigns a layer's channel blocks to R, G, B, A by position, so alpha-first (the
# order psd-tools itself writes) would give it a layer with alpha in the red channel.
_CHANNELS = ((0, 0), (1, 1), (2, 2), (3, -1))  # (index in our pixels, PSD channel id)


def _legacy_name(name: str) -> str:
    # The record's Pascal-string name is for old readers (Pillow decodes it as Latin-1, psd-tools writes it
    # as MacRoman): ASCII reads the same in both. The real name goes in the Unicode name block.
    return name.encode("ascii", "replace").decode("ascii")[:MAX_NAME_LENGTH]


def _fit_name(name: str, path: Path) -> str:
    if len(name) <= MAX_NAME_LENGTH:
        return name
    logger.warning("%s: layer name cut to %d characters: %r", path, MAX_NAME_LENGTH, name)
    return name[:MAX_NAME_LENGTH]


def _tagged_name(name: str, extra: dict | None = None) -> TaggedBlocks:
    blocks = TaggedBlocks()
    blocks.set_data(Tag.UNICODE_LAYER_NAME, name)
    for tag, value in (extra or {}).items():
        blocks.set_data(tag, **value)
    return blocks


def _empty_channels() -> tuple[list[ChannelInfo], ChannelDataList]:
    channels = ChannelDataList([ChannelData(compression=Compression.RAW, data=b"") for _ in _CHANNELS])
    return [ChannelInfo(id=channel_id, length=2) for _, channel_id in _CHANNELS], channels


def _even_length(encoded: bytes, height: int) -> bytes:
    """The same RLE channel (row byte counts, then rows) re-encoded to an even length if it was odd.

    Pillow rounds each layer channel up to an even file offset when reading, which the format does not
    do, so after an odd-length channel it reads every later layer one byte off. Splitting one literal run
    (n + 1 bytes, n even) into two ([0, b] and [n - 2, ...]) adds one byte and decodes the same. An odd
    total always has such a run: only literal runs with an even count have an odd byte length.
    """
    counts = np.frombuffer(encoded[: 2 * height], ">u2").astype(np.int64)
    if (int(counts.sum()) & 1) == 0:
        return encoded
    start = 2 * height
    for row, count in enumerate(counts):
        if count & 1:
            row_bytes = encoded[start : start + count]
            index = 0
            while index < count:
                header = row_bytes[index]
                if header < 128 and (header + 1) % 2 == 0:
                    split = bytes([0, row_bytes[index + 1], header - 1])
                    new_row = row_bytes[:index] + split + row_bytes[index + 2 :]
                    counts[row] += 1
                    rows = encoded[2 * height : start] + new_row + encoded[start + count :]
                    return counts.astype(">u2").tobytes() + rows
                index += header + 2 if header < 128 else 2 if header > 128 else 1
        start += int(count)
    raise AssertionError("an odd-length RLE channel without an even literal run")  # cannot happen


def _pixel_record(
    name: str, pixels: np.ndarray, left: int, top: int, visible: bool = True, opacity: int = 255
) -> tuple[LayerRecord, ChannelDataList]:
    height, width = pixels.shape[:2]
    if width == 0 or height == 0:
        info, channels = _empty_channels()
    else:
        # One transposing copy makes every channel plane contiguous for the encoder.
        planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        info, channels = [], ChannelDataList()
        for index, channel_id in _CHANNELS:
            data = ChannelData(compression=Compression.RLE)
            data.set_data(planes[index].tobytes(), width, height, 8, 1)
            data.data = _even_length(data.data, height)
            info.append(ChannelInfo(id=channel_id, length=len(data.data) + 2))
            channels.append(data)
    record = LayerRecord(
        top=top,
        left=left,
        bottom=top + height,
        right=left + width,
        name=_legacy_name(name),
        channel_info=info,
        opacity=opacity,
        flags=LayerFlags(visible=visible),
        tagged_blocks=_tagged_name(name),
    )
    return record, channels


def _group_record(
    kind: str, name: str, visible: bool = True, opacity: int = 255
) -> tuple[LayerRecord, ChannelDataList]:
    """A group's marker record: ``"group_end"`` goes below its contents, ``"group"`` (named, with the
    group's visibility and opacity) above them."""
    info, channels = _empty_channels()
    if kind == "group_end":
        divider = {"kind": SectionDivider.BOUNDING_SECTION_DIVIDER}
        name = GROUP_END_NAME
    else:
        divider = {"kind": SectionDivider.OPEN_FOLDER, "blend_mode": BlendMode.PASS_THROUGH}
    record = LayerRecord(
        name=_legacy_name(name),
        channel_info=info,
        opacity=opacity,
        flags=LayerFlags(visible=visible),
        tagged_blocks=_tagged_name(name, {Tag.SECTION_DIVIDER_SETTING: divider}),
    )
    return record, channels


def _plan(stack: LayerStack, path: Path, has_input: bool) -> list[tuple]:
    """The records to write, bottom to top: ("pixels", name, cropped layer), ("group_end", name) below a
    group's contents and ("group", name, visible, opacity) above them. Checks what PSD cannot hold before
    anything is encoded.
    """
    if stack.width > PSD_MAX_SIDE or stack.height > PSD_MAX_SIDE:
        raise ExportError(
            f"{path}: the canvas is {stack.width}x{stack.height} pixels; a PSD holds at most {PSD_MAX_SIDE} "
            f"per side (the larger PSB format is not written); export a ZIP of PNGs instead"
        )
    plan: list[tuple] = []

    def add(layers: tuple[Layer, ...]) -> None:
        for layer in layers:
            name = _fit_name(layer.name, path)
            if layer.children:
                plan.append(("group_end", name))
                add(layer.children)
                plan.append(("group", name, layer.visible, layer.opacity))
                continue
            cropped = crop_to_alpha(layer)
            if cropped.width > PSD_MAX_SIDE or cropped.height > PSD_MAX_SIDE:
                raise ExportError(
                    f"{path}: layer {layer.name!r} is {cropped.width}x{cropped.height} pixels after cutting "
                    f"to its alpha box; a PSD layer holds at most {PSD_MAX_SIDE} per side"
                )
            plan.append(("pixels", name, cropped))

    add(stack.layers)
    layer_count = sum(1 for item in plan if item[0] != "group_end") + int(has_input)
    if layer_count > PSD_MAX_LAYERS:
        raise ExportError(
            f"{path}: the stack has {layer_count} layers and groups; Photoshop opens at most {PSD_MAX_LAYERS}"
        )
    return plan


def save_psd(
    stack: LayerStack,
    path: str | os.PathLike,
    *,
    input_image: np.ndarray | Image.Image | None = None,
    input_name: str = "Input image",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``stack`` as a layered RGBA PSD at ``path`` (written to a temporary file, then renamed).

    ``input_image`` (uint8 RGB(A) array or PIL image, canvas-sized), if given, becomes a hidden bottom layer
    named ``input_name``. ``progress(done, total)`` is called after each layer is encoded and once more when
    the file is written (``done == total``). Raises :class:`~layered_core.export.ExportError` (a ValueError) for
    what PSD cannot hold, before writing anything. Returns the path.
    """
    started = time.perf_counter()
    path = Path(path)
    inputs = None if input_image is None else check_input_image(stack, input_image, path)
    plan = _plan(stack, path, inputs is not None)
    report = progress or (lambda done, total: None)
    encoded_layers, total = 0, sum(1 for item in plan if item[0] == "pixels") + (inputs is not None) + 1

    records, channel_data = LayerRecords(), ChannelImageData()
    if inputs is not None:
        record, channels = _pixel_record(_fit_name(input_name, path), inputs, 0, 0, visible=False)
        records.append(record)
        channel_data.append(channels)
        encoded_layers += 1
        report(encoded_layers, total)
    for item in plan:
        if item[0] == "pixels":
            _, name, layer = item
            record, channels = _pixel_record(name, layer.pixels, *layer.offset, layer.visible, layer.opacity)
            records.append(record)
            channel_data.append(channels)
            encoded_layers += 1
            report(encoded_layers, total)
        else:
            record, channels = _group_record(*item)
            records.append(record)
            channel_data.append(channels)
    encoded = time.perf_counter()

    header = FileHeader(
        version=1, channels=4, height=stack.height, width=stack.width, depth=8, color_mode=ColorMode.RGB
    )
    preview = composite_planes_over_white(stack)
    image_data = ImageData(compression=Compression.RLE)
    image_data.set_data([plane.tobytes() for plane in preview], header)
    flattened = time.perf_counter()

    document = PSD(
        header=header,
        color_mode_data=ColorModeData(),
        image_resources=ImageResources.new(),
        layer_and_mask_information=LayerAndMaskInformation(
            # A negative count tells readers that the preview's fourth channel is its transparency.
            layer_info=LayerInfo(layer_count=-len(records), layer_records=records, channel_image_data=channel_data),
        ),
        image_data=image_data,
    )
    atomic_write(path, document.write)
    report(total, total)
    logger.debug(
        "%s: %d records; layers encoded in %.3f s, preview in %.3f s, written in %.3f s",
        path,
        len(records),
        encoded - started,
        flattened - encoded,
        time.perf_counter() - flattened,
    )
    return path
