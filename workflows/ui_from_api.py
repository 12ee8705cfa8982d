"""Write the editor-format (litegraph) twin of an API-format workflow, laid out left to right.

    python workflows/ui_from_api.py object_info.json workflows/api/*.json

``object_info.json`` is a running ComfyUI's ``GET /object_info`` (with this pack loaded); it gives
each node's input order, which decides the order of ``widgets_values``. Each ``workflows/api/X.json``
gets its editor twin ``workflows/X.json``: the folder ComfyUI lists as this pack's templates holds only
editor files. tests/test_comfyui.py checks that comfy-cli turns every editor file back into its API
file and runs it.

Seeds are pinned to ``fixed``: without a value the editor sets a seed widget's control to ``randomize``, and
every run would then change the seed and miss the cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):  # a combo given as its option list
        return True
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind in WIDGET_TYPES and not options.get("forceInput", False)


def has_seed_control(name: str, spec) -> bool:
    """Whether the editor adds a 'control after generate' widget after this input: as the frontend's
    useIntWidget does, from the input's ``control_after_generate`` option, or else for an INT named ``seed``
    or ``noise_seed``."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = options.get("control_after_generate")
    if flag is not None:
        return bool(flag)
    return spec[0] == "INT" and name in ("seed", "noise_seed")


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


def ui_from_api(api: dict, object_info: dict) -> dict:
    depth = _depths(api)
    rows: dict[int, int] = {}
    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(api, key=lambda n: (depth[n], int(n))):
        node = api[node_id]
        schema = object_info[node["class_type"]]
        ordered = list(schema["input"].get("required", {}).items()) + list(schema["input"].get("optional", {}).items())
        inputs, widgets = [], []
        for name, spec in ordered:
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            if _is_widget(spec):
                widgets.append(None if linked else value)
                if name == "image" and isinstance(spec[1], dict) and spec[1].get("image_upload"):
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
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [40 + 360 * column, 40 + 260 * row],
                "size": [320, 220],
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
