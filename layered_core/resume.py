"""What a rerun may skip: the ``done.json`` record written beside an image's finished layers.

An image is finished for the settings it was made with, the input as it was (its content hash) and while the
files its record lists are there. :func:`unfinished_reason` says why an image must be done (again), in words
for the user, or None when it is finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import atomic_write_text

DONE_FILE = "done.json"
RECORD_FORMAT = "layered-core/done"
RECORD_VERSION = 2
# the record's settings that name model files: their changes are shown by file name, not whole path
MODEL_FILE_SETTINGS = ("transformer", "vae", "text_encoder")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(folder: Path) -> dict | None:
    """The record in ``folder/done.json``; None when there is none; ``{}`` when it is unreadable."""
    path = folder / DONE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def new_record(image: Path, sha256: str, settings: dict, outputs: list[str], **details) -> dict:
    """The record of a finished image: the input (path and content hash), the settings, the files written,
    and ``details`` (prompt, layer count, seconds) for the reader."""
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "input": {"path": str(image), "sha256": sha256, "bytes": image.stat().st_size},
        "settings": settings,
        "outputs": outputs,
        **details,
    }


def write_record(folder: Path, record: dict) -> Path:
    return atomic_write_text(folder / DONE_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def is_record(record: dict | None) -> bool:
    """Whether ``record`` is one this version wrote and can compare."""
    return bool(record) and record.get("format") == RECORD_FORMAT and record.get("version") == RECORD_VERSION


def recorded_input(record: dict | None) -> tuple[str | None, str | None]:
    """(path, sha256) of the input a record was made from; Nones when unknown."""
    source = record.get("input") if is_record(record) else None
    if not isinstance(source, dict):
        return None, None
    return source.get("path"), source.get("sha256")


def changes(old: dict, new: dict) -> str:
    """The settings that differ, as ``"layers 4 -> 3, seed 0 -> 1"``."""
    parts = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if name in MODEL_FILE_SETTINGS:
            before, after = (Path(v).name if isinstance(v, str) else v for v in (before, after))
        parts.append(f"{name} {_shown(before)} -> {_shown(after)}")
    return ", ".join(parts)


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def unfinished_reason(
    record: dict | None, settings: dict, sha256: str, folder: Path, wanted_outputs: list[str]
) -> str | None:
    """Why the image must be decomposed (again), or None when ``record`` shows it finished.

    ``wanted_outputs`` are the files this run writes whose names are fixed ("layers.psd"); a record without
    them (another ``--format`` before), or a listed file that is gone, means the image is not finished.
    """
    if record is None:
        return "not finished before"
    if not record:
        return f"{DONE_FILE} is unreadable"
    if not is_record(record):
        return f"{DONE_FILE} was written by an older version"
    if record.get("settings") != settings:
        return f"the settings changed ({changes(record.get('settings') or {}, settings)})"
    if recorded_input(record)[1] != sha256:
        return "the input image changed since it was done"
    outputs = record.get("outputs")
    if not isinstance(outputs, list):
        return f"{DONE_FILE} lists no outputs"
    not_written = [name for name in wanted_outputs if name not in outputs]
    if not_written:
        return f"{', '.join(not_written)} not written before"
    missing = [name for name in outputs if not (folder / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        return f"{shown} {'is' if len(missing) == 1 else 'are'} missing"
    return None
