"""Safetensors files as checkpoints come: one file, shards with an index, or a diffusers folder.

Reading (headers checked against the file size, tensors memory-mapped), telling what a file holds, checking
a file's tensor names against a model's, and writing safetensors files atomically. Pickle files are refused
unopened: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".ptl"}
# The tensor only a Qwen-Image-Layered transformer has (a plain Qwen-Image one lacks it).
LAYERED_MARKER = "time_text_embed.addition_t_embedding.weight"
CONFIG_METADATA_KEY = "layered_core.config"

# safetensors dtype names -> torch dtypes (the ones these checkpoints can hold).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            path,
            f"'{path.suffix}' is a pickle checkpoint; only .safetensors files are loaded, because unpickling a "
            "file can run arbitrary code. Use the .safetensors release of this model.",
        )


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """The tensor table and the metadata of a safetensors file, checked against the file size.

    Catches truncated downloads and files that are not safetensors at all before any tensor is
    touched, so the error says what is wrong instead of failing deep inside a load.
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "not a file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"not a safetensors file: only {size} bytes")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, 512 * 1024 * 1024):
            raise CheckpointError(
                path,
                f"not a valid safetensors file: the header claims {header_len} bytes but the file has {size} "
                "(corrupt, truncated, or not a safetensors file)",
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"not a valid safetensors file: unreadable header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt safetensors header entry for tensor '{name}': {info!r}") from None
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(path, f"corrupt safetensors header: tensor '{name}' has inconsistent offsets")
        if end > data_size:
            raise CheckpointError(
                path,
                f"truncated file: tensor '{name}' ends at byte {8 + header_len + end} but the file has {size} bytes "
                "(incomplete download? fetch the file again)",
            )
    return header, metadata


@dataclass
class TensorSource:
    """Lazily readable tensors of one checkpoint (a file, or shards), by name."""

    location: Path
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    _handles: dict = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped (copy-on-write) from its file."""
        path = self.files[name]
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(path, f"cannot open as safetensors: {e}") from None
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(path, f"cannot read tensor '{name}': {e}") from None

    def close(self) -> None:
        self._handles.clear()


def _add_file(source: TensorSource, path: Path, expected: Iterable[str] | None = None) -> None:
    header, metadata = read_safetensors_header(path)
    if expected is not None:
        absent = sorted(set(expected) - set(header))
        if absent:
            raise CheckpointError(
                path,
                f"shard lacks {len(absent)} tensors its index lists, e.g. {absent[:3]} (corrupt or wrong shard)",
            )
    for name, info in header.items():
        source.files[name] = path
        source.shapes[name] = tuple(info["shape"])
        source.dtypes[name] = SAFETENSORS_DTYPES[info["dtype"]]
    source.metadata.update(metadata)


def _open_index(index_path: Path) -> TensorSource:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(index_path, f"unreadable shard index: {e}") from None
    source = TensorSource(index_path.parent)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = [s for s in by_shard if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            index_path,
            f"missing {len(missing)} of {len(by_shard)} shards: {', '.join(sorted(missing)[:4])} "
            "(incomplete download? fetch the whole folder)",
        )
    for shard, names in sorted(by_shard.items()):
        _add_file(source, index_path.parent / shard, names)
    return source


def open_checkpoint(path: str | os.PathLike, component: str | None = None) -> TensorSource:
    """Open a safetensors file, a shard index, or a diffusers folder.

    ``component`` ("transformer" or "vae") picks the subfolder of a whole diffusers pipeline folder.
    """
    path = Path(path).expanduser()
    _refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(path, "not found")
    if path.is_dir():
        if component and (path / "model_index.json").is_file():
            sub = path / component
            if not sub.is_dir():
                raise CheckpointError(path, f"diffusers pipeline folder without a '{component}/' subfolder")
            path = sub
        config = None
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError as e:
                raise CheckpointError(path / "config.json", f"unreadable JSON: {e}") from None
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        pickles = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if indexes:
            source = _open_index(indexes[0])
        elif len(files) == 1:
            source = TensorSource(path)
            _add_file(source, files[0])
        elif pickles and not files:
            _refuse_pickle(pickles[0])
        else:
            raise CheckpointError(
                path,
                f"expected one .safetensors file or a .safetensors.index.json here, found {len(files)} safetensors "
                "files and no index",
            )
        source.location = path
        source.config = config
        return source
    if path.name.endswith(".safetensors.index.json"):
        return _open_index(path)
    source = TensorSource(path)
    _add_file(source, path)
    return source


def find_prefix(keys: Iterable[str], prefixes: tuple[str, ...], anchor: str) -> str:
    """The prefix (possibly empty) in front of ``anchor`` keys, if it is one of ``prefixes``."""
    for key in keys:
        if key.endswith(anchor) or anchor in key:
            at = key.find(anchor)
            prefix = key[:at]
            if prefix == "" or prefix in prefixes:
                return prefix
    return ""


def describe_keys(keys: Iterable[str]) -> str:
    """A short human description of what a set of tensor names holds."""
    keys = list(keys)
    text = " ".join(keys[:2000])
    if "transformer_blocks." in text and "img_mod" in text:
        if any(k.endswith(LAYERED_MARKER) for k in keys):
            return "a Qwen-Image-Layered transformer"
        return "a plain Qwen-Image (or Qwen-Image-Edit) transformer"
    if re.search(r"(^| )(\S+\.)?(encoder\.(conv1|conv_in)\.weight)", text) and "decoder." in text:
        return "a VAE"
    if "model.layers." in text or "visual.blocks." in text or "embed_tokens" in text:
        return "a text encoder (Qwen2.5-VL)"
    return f"an unknown model ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"


def name_some(names: Iterable[str], limit: int = 4) -> str:
    """Up to ``limit`` of ``names``, sorted, and how many more there are."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def key_set_problems(expected: Iterable[str], present: Iterable[str]) -> str | None:
    """What is wrong with a checkpoint's tensor names against a model's: the missing and the unexpected
    ones, counted and named; None when the two sets are equal."""
    expected, present = set(expected), set(present)
    missing, unexpected = expected - present, present - expected
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {name_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {name_some(unexpected)}")
    return "; ".join(problems) or None


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as one safetensors file, whole or not at all (the folder is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    return path
