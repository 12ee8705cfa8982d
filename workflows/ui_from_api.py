"""Write the editor-format (litegraph) twin of an API-format workflow, laid out left to right.

    python workflows/ui_from_api.py object_info.json workflows/api/*.json

``object_info.json`` is a running ComfyUI's ``GET /object_info`` (with this pack loaded); it gives each
node's input order, which decides the order of ``widgets_values``, its title and its outputs. Each
``workflows/api/X.json`` gets its editor twin ``workflows/X.json``: the folder ComfyUI lists as this pack's
templates holds only editor files. tests/test_comfyui.py checks that the committed editor files are what this
script writes, that comfy-cli turns each one back into its API file, and that nothing overlaps.

Layout: one column per depth in the graph (a node sits one column right of its deepest input), each column as
wide as its widest node. A node is as large as the editor makes it on load (LGraphNode.computeSize in ComfyUI's
frontend: 20 px per slot row, 20 + 4 px per widget, a textarea taller than its 50 px minimum, the picked image
of a Load Image; its title in 14 px Inter with 30 px either side), from conservative estimates of the text
widths. Below each node the column keeps free the room the editor grows it by after a run (an image preview of
at least 220 px on output nodes and samplers, the text some of this pack's nodes show), so a node never grows
over the one below. The title bar (30 px) and the pack's badge above it (22 px) are drawn above a node's
``pos``. Seeds are pinned to ``fixed``: without a value the editor sets a seed widget's control to
``randomize``, and every run would then change the seed and miss the cache.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The frontend's sizes (litegraph's LiteGraphGlobal and LGraphNode.computeSize, ComfyUI frontend 1.48).
TITLE_HEIGHT = 30  # drawn above the node's pos; the title text starts 30 px in and must end 30 px before the edge
TITLE_FONT_PX = 14  # NODE_TEXT_SIZE, font Inter
TEXT_FONT_PX = 12  # NODE_SUBTEXT_SIZE: slot names, widget labels and values
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
WIDGET_GAP = 4  # below each widget
WIDGET_TEXT_PADDING = 90  # a number or combo widget: 2 x 15 margin, 5 + 20 padding, 2 x 15 inside: label, value
TEXTAREA_HEIGHT = 80  # a multiline STRING (a DOM textarea, at least 50 px); more room to read a prompt
PREVIEW_HEIGHT = 220  # the image preview widget's minimum height
RUN_TEXT_HEIGHT = 80  # the read-only text (a textarea) some of this pack's nodes show after a run
# Nodes that show text on the node after a run: this pack's (the caption, the prompt used, the file names, the
# file saved, the layer tree, the recompose PSNR) and core's Get Image Size (the size it measured, sent as progress
# text).
SHOWS_TEXT_AFTER_RUN = {
    "QwenLayeredCaption",
    "QwenLayeredImageToLayers",
    "QwenLayeredLoadImageFolder",
    "QwenLayeredSavePSD",
    "QwenLayeredSaveLayerPNGs",
    "QwenLayeredSelectLayer",
    "QwenLayeredLoadLayeredPSD",
    "QwenLayeredRecomposePSNR",
    "GetImageSize",
}
MIN_WIDTH = 240
COLUMN_GAP = 60
ROW_GAP = 40  # between a node's bottom (after a run) and the next node's title bar: room for its badge
MARGIN = 40


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):  # a combo given as its option list
        return True
    return kind in WIDGET_TYPES and not _options(spec).get("forceInput", False)


def has_seed_control(name: str, spec) -> bool:
    """Whether the editor adds a 'control after generate' widget after this input: as the frontend's
    useIntWidget does, from the input's ``control_after_generate`` option, or else for an INT named ``seed``
    or ``noise_seed``."""
    flag = _options(spec).get("control_after_generate")
    if flag is not None:
        return bool(flag)
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def text_width(text: str, px: float) -> float:
    """An upper bound of ``text``'s width in Inter at ``px`` pixels: per character class, the widest ASCII
    glyph of the class in Inter (i, l: 0.24 em ... W: 0.99 em). tests/test_comfyui.py measures the titles with
    the real font."""
    width = 0.0
    for char in text:
        if char in "ijlI !,.:;'|`t/\\()[]fr":
            width += 0.40
        elif char in '_-"^*?1{}':
            width += 0.52
        elif char in "mwMW@%":
            width += 1.0
        elif char.isupper():
            width += 0.78
        elif char.islower():
            width += 0.62
        else:
            width += 0.66
    return width * px


def _depths(api: dict) -> dict[str, int]:
    """Column of each node: one more than its deepest input, so links run left to right."""
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def shows_image(schema: dict) -> bool:
    """Whether the editor draws an image on the node, now or after a run: an output node (its saved images), a
    node with an image upload (the picked image) or a sampler (a seed input: latent previews while it runs)."""
    inputs = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
    return (
        bool(schema.get("output_node"))
        or any(_options(spec).get("image_upload") for spec in inputs.values())
        or any(has_seed_control(name, spec) for name, spec in inputs.items())
    )


def _widget_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def node_size(class_type: str, inputs: dict, schema: dict) -> tuple[int, int, int]:
    """Width, height on load and height after a run (below the title bar) of a node with these API inputs: at
    least what the editor's computeSize gives; rounded up to 10 px."""
    ordered = list(schema["input"].get("required", {}).items()) + list(schema["input"].get("optional", {}).items())
    slot_names, widgets = [], []  # widgets: (label, value, height)
    for name, spec in ordered:
        value = inputs.get(name)
        linked = isinstance(value, list)
        if not _is_widget(spec):
            slot_names.append(name)
            continue
        multiline = spec[0] == "STRING" and _options(spec).get("multiline")
        widgets.append((name, "" if linked else _widget_text(value), TEXTAREA_HEIGHT if multiline else WIDGET_HEIGHT))
        if _options(spec).get("image_upload"):
            widgets.append(("choose file to upload", "", WIDGET_HEIGHT))
            widgets.append(("", "", PREVIEW_HEIGHT))  # the picked image, shown as soon as the workflow loads
        if has_seed_control(name, spec):
            widgets.append(("control after generate", "fixed", WIDGET_HEIGHT))
    after_run = []
    if shows_image(schema) and not any(_options(spec).get("image_upload") for _, spec in ordered):
        after_run.append(PREVIEW_HEIGHT)
    if class_type in SHOWS_TEXT_AFTER_RUN:
        after_run.append(RUN_TEXT_HEIGHT)
    outputs = schema["output_name"]

    title = schema.get("display_name") or class_type
    title_width = text_width(title, TITLE_FONT_PX) + 2 * TITLE_HEIGHT
    widget_width = max(
        (text_width(f"{label}  {value}", TEXT_FONT_PX) + WIDGET_TEXT_PADDING for label, value, _ in widgets), default=0
    )
    slot_width = sum(max((text_width(n, TEXT_FONT_PX) for n in names), default=0) for names in (slot_names, outputs))
    width = max(MIN_WIDTH, title_width, widget_width, slot_width + 2 * SLOT_HEIGHT + 20)
    rows = max(len(slot_names), len(outputs), 1)
    heights = [h for _, _, h in widgets]
    on_load = rows * SLOT_HEIGHT + 6 + (sum(h + WIDGET_GAP for h in heights) + 8 if heights else 0)
    after = on_load + sum(h + WIDGET_GAP for h in after_run) + (8 if after_run and not heights else 0)
    return 10 * math.ceil(width / 10), 10 * math.ceil(on_load / 10), 10 * math.ceil(after / 10)


def ui_from_api(api: dict, object_info: dict) -> dict:
    depth = _depths(api)
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    sizes = {n: node_size(api[n]["class_type"], api[n]["inputs"], object_info[api[n]["class_type"]]) for n in order}
    column_width: dict[int, int] = {}
    for node_id in order:
        column_width[depth[node_id]] = max(column_width.get(depth[node_id], 0), sizes[node_id][0])
    column_x = {0: MARGIN}
    for column in range(1, max(column_width) + 1):
        column_x[column] = column_x[column - 1] + column_width[column - 1] + COLUMN_GAP
    next_y: dict[int, int] = {}

    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id in order:
        node = api[node_id]
        schema = object_info[node["class_type"]]
        ordered = list(schema["input"].get("required", {}).items()) + list(schema["input"].get("optional", {}).items())
        inputs, widgets = [], []
        for name, spec in ordered:
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            if _is_widget(spec):
                widgets.append(None if linked else value)
                if name == "image" and _options(spec).get("image_upload"):
                    widgets.append("image")  # the upload button the frontend adds after LoadImage's combo
                if has_seed_control(name, spec):
                    widgets.append("fixed")
            if linked:
                link_id = len(links) + 1
                source, slot = value
                kind = object_info[api[source]["class_type"]]["output"][slot]
                links.append([link_id, int(source), slot, int(node_id), len(inputs), kind])
                outgoing.setdefault((source, slot), []).append(link_id)
                entry = {"name": name, "type": kind if not _is_widget(spec) else spec[0], "link": link_id}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(spec):
                inputs.append({"name": name, "type": spec[0], "link": None})
        column = depth[node_id]
        top = next_y.get(column, MARGIN + TITLE_HEIGHT)
        next_y[column] = top + sizes[node_id][2] + ROW_GAP + TITLE_HEIGHT
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [column_x[column], top],
                "size": [column_width[column], sizes[node_id][1]],
                "flags": {},
                "order": len(nodes),
                "mode": 0,
                "inputs": inputs,
                "outputs": [],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    for ui_node in nodes:
        schema = object_info[ui_node["type"]]
        for slot, (kind, name) in enumerate(zip(schema["output"], schema["output_name"], strict=True)):
            ui_node["outputs"].append(
                {"name": name, "type": kind, "links": outgoing.get((str(ui_node["id"]), slot), []), "slot_index": slot}
            )
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def editor_path(api_path: Path) -> Path:
    """workflows/api/X.json -> workflows/X.json"""
    return api_path.parent.parent / api_path.name


def main() -> None:
    object_info = json.loads(Path(sys.argv[1]).read_text())
    for name in sys.argv[2:]:
        source = Path(name)
        target = editor_path(source)
        target.write_text(json.dumps(ui_from_api(json.loads(source.read_text()), object_info), indent=1) + "\n")
        print(target)


if __name__ == "__main__":
    main()
