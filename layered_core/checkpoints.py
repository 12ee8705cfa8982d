"""Reading the checkpoint files users hold, in every layout they come in.

- a diffusers folder (``Qwen/Qwen-Image-Layered``, or its ``transformer/`` / ``vae/`` subfolder):
  config.json plus one safetensors file or shards with an index json;
- ComfyUI single files: ``diffusion_models/qwen_image_layered_bf16.safetensors`` with or without
  the ``model.diffusion_model.`` prefix, the fp8 files in both quantised layouts ComfyUI reads
  (per-layer ``comfy_quant`` + ``weight_scale``/``input_scale``, and the older ``scaled_fp8``
  marker + ``scale_weight``/``scale_input``), and ``vae/qwen_image_layered_vae.safetensors``.

Only safetensors are read, through memory maps: tensors are views of the page cache until a dtype
change copies them, so a 41 GB file is never held twice in RAM. Models are built on the meta
device and the tensors assigned. Every problem raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .mmdit import MMDiTConfig, VLDMMDiT
from .ops import FP8_DTYPES, FP8Linear

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".ptl"}
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
LAYERED_MARKER = "time_text_embed.addition_t_embedding.weight"
SUPPORTED_QUANT_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
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

FULL_TRANSFORMER_FILES = (
    "diffusion_models/qwen_image_layered_bf16.safetensors, diffusion_models/qwen_image_layered_fp8mixed.safetensors "
    "or the transformer/ folder of Qwen/Qwen-Image-Layered"
)
FULL_VAE_FILES = "vae/qwen_image_layered_vae.safetensors or the vae/ folder of Qwen/Qwen-Image-Layered"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


# --------------------------------------------------------------------------- raw files


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


# --------------------------------------------------------------------------- what a file is


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


# --------------------------------------------------------------------------- transformer


@dataclass(frozen=True)
class QuantizedLayer:
    fmt: str
    weight_scale: str
    input_scale: str | None


def quantized_layers(source: TensorSource, prefix: str) -> dict[str, QuantizedLayer]:
    """Layers stored in fp8 with scales, in either of ComfyUI's layouts, by layer name (no prefix)."""
    layers: dict[str, QuantizedLayer] = {}
    keys = set(source.keys())
    quant_meta = source.metadata.get("_quantization_metadata")
    confs: dict[str, dict] = {}
    if quant_meta:
        try:
            confs = {name: conf for name, conf in json.loads(quant_meta)["layers"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(source.location, f"unreadable _quantization_metadata: {e}") from None
    for key in keys:
        if key.endswith(".comfy_quant"):
            raw = source.get(key)
            try:
                confs[key[: -len(".comfy_quant")]] = json.loads(bytes(raw.tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(source.location, f"unreadable quantisation config '{key}': {e}") from None
    for name, conf in confs.items():
        fmt = conf.get("format")
        if fmt not in SUPPORTED_QUANT_FORMATS:
            raise CheckpointError(
                source.location,
                f"layer '{name}' is quantised as '{fmt}', which this loader does not read "
                f"(supported: {', '.join(SUPPORTED_QUANT_FORMATS)}); use the bf16 or fp8 e4m3 file",
            )
        if f"{name}.weight_scale" not in keys:
            raise CheckpointError(source.location, f"quantised layer '{name}' has no weight_scale tensor")
        input_scale = f"{name}.input_scale" if f"{name}.input_scale" in keys else None
        layers[name[len(prefix) :] if name.startswith(prefix) else name] = QuantizedLayer(
            fmt, f"{name}.weight_scale", input_scale
        )
    marker = f"{prefix}scaled_fp8"
    if marker in keys or "scaled_fp8" in keys:
        marker = marker if marker in keys else "scaled_fp8"
        fmt = "float8_e5m2" if source.dtypes[marker] == torch.float8_e5m2 else "float8_e4m3fn"
        for key in keys:
            if key.endswith(".scale_weight"):
                name = key[: -len(".scale_weight")]
                input_scale = f"{name}.scale_input" if f"{name}.scale_input" in keys else None
                layers[name[len(prefix) :] if name.startswith(prefix) else name] = QuantizedLayer(fmt, key, input_scale)
    return layers


def _auxiliary_keys(source: TensorSource, prefix: str, quantized: dict[str, QuantizedLayer]) -> set[str]:
    aux = {k for k in source.keys() if k.endswith(".comfy_quant")}
    aux |= {k for k in (f"{prefix}scaled_fp8", "scaled_fp8") if k in source}
    for layer in quantized.values():
        aux.add(layer.weight_scale)
        if layer.input_scale:
            aux.add(layer.input_scale)
    return aux


def infer_mmdit_config(source: TensorSource, prefix: str = "") -> MMDiTConfig:
    """The transformer's shape from config.json, our own metadata, or the tensor shapes."""
    if source.config is not None:
        try:
            return MMDiTConfig.from_diffusers(source.config)
        except ValueError as e:
            raise CheckpointError(source.location / "config.json", str(e)) from None
    if CONFIG_METADATA_KEY in source.metadata:
        return MMDiTConfig.from_dict(json.loads(source.metadata[CONFIG_METADATA_KEY]))
    shapes = source.shapes
    try:
        hidden, in_channels = shapes[f"{prefix}img_in.weight"]
        _, text_dim = shapes[f"{prefix}txt_in.weight"]
        (head_dim,) = shapes[f"{prefix}transformer_blocks.0.attn.norm_q.weight"]
        out_features = shapes[f"{prefix}proj_out.weight"][0]
    except KeyError as e:
        raise CheckpointError(source.location, f"transformer tensor {e} is missing") from None
    blocks = {
        int(m.group(1)) for k in source.keys() if (m := re.match(rf"{re.escape(prefix)}transformer_blocks\.(\d+)\.", k))
    }
    if head_dim != 128:
        raise CheckpointError(
            source.location,
            f"head dim {head_dim} is not the released 128, so the RoPE axes cannot be inferred; "
            "pass an explicit MMDiTConfig",
        )
    try:
        return MMDiTConfig(
            num_layers=max(blocks) + 1,
            num_heads=hidden // head_dim,
            head_dim=head_dim,
            text_dim=text_dim,
            in_channels=in_channels,
            out_channels=out_features // 4,
        )
    except ValueError as e:
        raise CheckpointError(source.location, f"unexpected transformer shapes: {e}") from None


def _check_key_sets(location, expected: set[str], present: set[str]) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:4])})")
    if problems:
        raise CheckpointError(location, "the tensors do not match the model: " + "; ".join(problems))


def load_mmdit(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    fp8: str = "dequantize",
    config: MMDiTConfig | None = None,
    operations=None,
) -> VLDMMDiT:
    """Load the VLD-MMDiT from any supported layout.

    ``dtype`` is the weight dtype of unquantised tensors. For fp8 files, ``fp8="keep"`` keeps the
    quantised linears in float8 with their scales (about half the memory); ``"dequantize"``
    turns them into ``dtype``.
    """
    if fp8 not in ("keep", "dequantize"):
        raise ValueError(f"fp8 must be 'keep' or 'dequantize', got {fp8!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (fp8 is chosen with fp8='keep'), got {dtype}")
    source = open_checkpoint(path, component="transformer")
    keys = source.keys()
    prefix = find_prefix(keys, TRANSFORMER_PREFIXES, "transformer_blocks.0.")
    if not any(k.startswith(f"{prefix}transformer_blocks.") for k in keys):
        raise CheckpointError(
            source.location,
            f"this file holds {describe_keys(keys)}, not a transformer; it needs {FULL_TRANSFORMER_FILES}",
        )
    if f"{prefix}{LAYERED_MARKER}" not in source:
        raise CheckpointError(
            source.location,
            f"this is {describe_keys(keys)}: it has no '{LAYERED_MARKER}', so it is not Qwen-Image-Layered. "
            f"Load {FULL_TRANSFORMER_FILES}",
        )
    config = config or infer_mmdit_config(source, prefix)
    quantized = quantized_layers(source, prefix)
    aux = _auxiliary_keys(source, prefix, quantized)

    with torch.device("meta"):
        model = VLDMMDiT(config, dtype=dtype, operations=operations)
    expected = set(model.state_dict().keys())
    present = {k[len(prefix) :] for k in keys if k.startswith(prefix) and k not in aux}
    _check_key_sets(source.location, expected, present)
    if fp8 == "keep":
        for name in quantized:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, FP8Linear.like(getattr(parent, child)))

    # Tensors go to the target device before any dtype change, so dequantising a 20 GB fp8 file for a
    # GPU never builds the 41 GB bf16 model in host memory.
    state = {}
    for name in expected:
        tensor = source.get(prefix + name).to(device)
        layer = quantized.get(name.rpartition(".")[0]) if name.endswith(".weight") else None
        if layer is not None:
            if tensor.dtype == torch.uint8:  # older files store the fp8 bytes as uint8
                tensor = tensor.view(SUPPORTED_QUANT_FORMATS[layer.fmt])
            scale = source.get(layer.weight_scale).to(device=device, dtype=torch.float32).reshape(())
            if fp8 == "keep":
                state[name] = tensor
                state[name.rpartition(".")[0] + ".weight_scale"] = scale
            else:
                state[name] = (tensor.to(torch.float32) * scale).to(dtype)
        elif tensor.dtype.is_floating_point:
            state[name] = tensor.to(dtype)
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    source.close()
    model.compute_dtype = dtype
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- VAE


def load_vae(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", operations=None
):
    """Load the RGBA-VAE from the ComfyUI single file (Wan names) or a diffusers folder."""
    from .vae import RGBAVAE

    source = open_checkpoint(path, component="vae")
    keys = source.keys()
    prefix = find_prefix(keys, VAE_PREFIXES, "decoder.")
    if not any(k.startswith(f"{prefix}decoder.") for k in keys) or not any(
        k.startswith(f"{prefix}encoder.") for k in keys
    ):
        raise CheckpointError(
            source.location, f"this file holds {describe_keys(keys)}, not a VAE; it needs {FULL_VAE_FILES}"
        )
    stats = {}
    if source.config is not None:
        if source.config.get("input_channels", 4) != 4:
            raise CheckpointError(
                source.location / "config.json",
                f"input_channels is {source.config.get('input_channels')}: this is the 3-channel Qwen-Image VAE; "
                f"Qwen-Image-Layered needs the 4-channel RGBA-VAE ({FULL_VAE_FILES})",
            )
        stats = {k: source.config[k] for k in ("latents_mean", "latents_std") if k in source.config}
    raw = {k[len(prefix) :]: source.get(k) for k in keys if k.startswith(prefix)}
    try:
        model = RGBAVAE.from_state_dict(raw, **stats, dtype=dtype, device=device, operations=operations)
    except ValueError as e:
        raise CheckpointError(source.location, str(e)) from None
    finally:
        source.close()
    return model.requires_grad_(False)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, memory-mapped (for tools and tests)."""
    source = open_checkpoint(path)
    return {k: source.get(k) for k in source.keys()}


# --------------------------------------------------------------------------- writers


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled float8: returns (weight / scale in fp8, float32 scale), amax mapped to the fp8 max."""
    amax = weight.detach().abs().max().to(torch.float32).clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    return (weight.to(torch.float32) / scale).to(dtype), scale


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Block linears are what ComfyUI's fp8mixed files quantise; embeddings and norms stay bf16."""
    return name.startswith("transformer_blocks.") and name.endswith(".weight") and tensor.ndim == 2


def quantize_linears_fp8(
    model: nn.Module, predicate: Callable[[str, torch.Tensor], bool] | None = None, compute: str = "auto"
) -> list[str]:
    """Turn a loaded model's linears into :class:`FP8Linear` with per-tensor-scaled e4m3 weights, in place.

    ``predicate(weight_name, weight)`` picks the layers; it defaults to :func:`is_quantizable`, the rule
    ComfyUI's fp8mixed files and :func:`save_mmdit`'s fp8 layouts follow, so the result has the
    layout of ``load_mmdit(<fp8 file>, fp8="keep")``. Layers are converted one at a time on their own
    device and each full-precision weight is dropped as soon as its fp8 copy exists, so peak memory
    grows by one layer. Returns the names of the converted layers.
    """
    predicate = predicate or is_quantizable
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and predicate(f"{name}.weight", module.weight)
    ]
    with torch.no_grad():
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            quantized, scale = quantize_fp8(linear.weight)
            fp8 = FP8Linear.like(linear, compute=compute)
            fp8.weight = nn.Parameter(quantized, requires_grad=False)
            fp8.weight_scale = scale
            fp8.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
            setattr(parent, child, fp8)
            linear.weight = None  # freed now even if someone still holds the old module
            del linear, quantized
    return targets


def save_mmdit(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    layout: str = "comfy",
    config: MMDiTConfig | None = None,
    dtype: torch.dtype | None = None,
    shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write transformer weights in a real layout.

    layout: "diffusers" (folder: config.json + shards + index), "comfy" (single file, no prefix),
    "comfy-prefixed" (``model.diffusion_model.``), "fp8-comfy-quant" (per-layer comfy_quant +
    weight_scale, prefixed), "fp8-scaled" (older scaled_fp8 marker + scale_weight, prefixed).

    A state dict that is already fp8 (from :func:`quantize_linears_fp8` or ``load_mmdit(fp8="keep")``:
    float8 ``X.weight`` beside float32 ``X.weight_scale``) is written as it is by the fp8 layouts.
    """
    path = Path(path)
    # FP8Linear's scales, by the name of the weight they scale.
    scales = {k[: -len("_scale")]: v for k, v in state_dict.items() if k.endswith(".weight_scale")}
    unscaled = sorted(k for k, v in state_dict.items() if v.dtype in FP8_DTYPES and k not in scales)
    if unscaled:
        raise ValueError(f"float8 tensors without a '.weight_scale' beside them: {', '.join(unscaled[:4])}")
    stray = sorted(k for k in scales if k not in state_dict or state_dict[k].dtype not in FP8_DTYPES)
    if stray:
        raise ValueError(f"'.weight_scale' tensors whose weight is not float8: {', '.join(stray[:4])}")
    if scales and layout not in ("fp8-comfy-quant", "fp8-scaled"):
        raise ValueError(
            f"the state dict holds {len(scales)} fp8 layers (e.g. {next(iter(scales))}); the {layout!r} layout "
            "stores full-precision weights: write it as 'fp8-comfy-quant' or 'fp8-scaled', or load the model "
            "with fp8='dequantize'"
        )
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.dtype not in FP8_DTYPES else v)
        for k, v in state_dict.items()
        if not k.endswith(".weight_scale")
    }
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())} if config is not None else None
    if layout == "diffusers":
        if config is None:
            raise ValueError("the diffusers layout needs the config for config.json")
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config.to_diffusers(), indent=2))
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            shard_name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, path / shard_name)
            weight_map.update({name: shard_name for name in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
        index["weight_map"] = weight_map
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return path
    prefix = "" if layout == "comfy" else "model.diffusion_model."
    out: dict[str, torch.Tensor] = {}
    if layout in ("comfy", "comfy-prefixed"):
        out = {prefix + k: v for k, v in tensors.items()}
    elif layout in ("fp8-comfy-quant", "fp8-scaled"):
        formats = set()
        for name, tensor in tensors.items():
            if name in scales:
                q, scale = tensor, scales[name].to(torch.float32)
            elif is_quantizable(name, tensor):
                q, scale = quantize_fp8(tensor)
            else:
                out[prefix + name] = tensor
                continue
            layer = prefix + name[: -len(".weight")]
            fmt = str(q.dtype).removeprefix("torch.")
            formats.add(q.dtype)
            out[f"{layer}.weight"] = q
            if layout == "fp8-comfy-quant":
                conf = json.dumps({"format": fmt}).encode("utf-8")
                out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
                out[f"{layer}.weight_scale"] = scale
            else:
                out[f"{layer}.scale_weight"] = scale
        if layout == "fp8-scaled":
            # One marker gives the format of every layer in this layout.
            if len(formats) > 1:
                raise ValueError("the fp8-scaled layout holds one fp8 format; this state dict mixes e4m3 and e5m2")
            out[f"{prefix}scaled_fp8"] = torch.empty(0, dtype=formats.pop() if formats else torch.float8_e4m3fn)
    else:
        raise ValueError(f"unknown transformer layout {layout!r}")
    _atomic_save(out, path, metadata)
    return path
