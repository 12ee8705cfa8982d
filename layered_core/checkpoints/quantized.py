"""ComfyUI's quantised fp8 layouts: which layers a checkpoint stores in float8, where their scales are, and
reading such a weight back.

ComfyUI reads two layouts (``comfy.utils.convert_old_quants`` turns the second into the first before
``comfy/ops.py`` loads the layers):

- per layer: ``X.comfy_quant`` (JSON as uint8 bytes, ``{"format": "float8_e4m3fn"}``), or the same table in the
  file's ``_quantization_metadata``, with ``X.weight_scale`` and optionally ``X.input_scale``;
- the older one: a ``scaled_fp8`` marker tensor (its dtype names the format) and, for every quantised layer,
  ``X.scale_weight`` and optionally ``X.scale_input``.

In both, ``X.weight`` holds the fp8 values (older files store their bytes as uint8) and one float32 scale per
tensor, with ``real weight = weight.float() * scale``. The input scales are not used here: :class:`~..ops.FP8Linear`
scales activations per row on the fly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..ops import FP8_DTYPES
from .files import CheckpointError, TensorSource

PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SUPPORTED_QUANT_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
SCALED_FP8_MARKER = "scaled_fp8"


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
    marker = f"{prefix}{SCALED_FP8_MARKER}"
    if marker in keys or SCALED_FP8_MARKER in keys:
        marker = marker if marker in keys else SCALED_FP8_MARKER
        fmt = "float8_e5m2" if source.dtypes[marker] == torch.float8_e5m2 else "float8_e4m3fn"
        for key in keys:
            if key.endswith(".scale_weight"):
                name = key[: -len(".scale_weight")]
                input_scale = f"{name}.scale_input" if f"{name}.scale_input" in keys else None
                layers[name[len(prefix) :] if name.startswith(prefix) else name] = QuantizedLayer(fmt, key, input_scale)
    return layers


def auxiliary_keys(source: TensorSource, prefix: str, quantized: dict[str, QuantizedLayer]) -> set[str]:
    """The tensors that describe the quantisation (configs, markers, scales) rather than hold weights."""
    aux = {k for k in source.keys() if k.endswith(".comfy_quant")}
    aux |= {k for k in (f"{prefix}{SCALED_FP8_MARKER}", SCALED_FP8_MARKER) if k in source}
    for layer in quantized.values():
        aux.add(layer.weight_scale)
        if layer.input_scale:
            aux.add(layer.input_scale)
    return aux


def read_fp8_weight(
    source: TensorSource, key: str, layer: QuantizedLayer, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 weight ``key`` of ``layer`` and its float32 scalar scale, both on ``device``.

    The tensor goes to ``device`` before any dtype change, so dequantising a large file for a GPU never builds
    the widened weights in host memory."""
    tensor = source.get(key).to(device)
    if tensor.dtype == torch.uint8:  # older files store the fp8 bytes as uint8
        tensor = tensor.view(SUPPORTED_QUANT_FORMATS[layer.fmt])
    scale = source.get(layer.weight_scale)
    if scale.numel() != 1:
        raise CheckpointError(
            source.files.get(layer.weight_scale, source.location),
            f"'{layer.weight_scale}' holds {scale.numel()} scales; only one scale per tensor (ComfyUI's fp8 "
            "layouts) is read",
        )
    return tensor, scale.to(device=device, dtype=torch.float32).reshape(())


def weights_precision(source: TensorSource, prefix: str) -> str:
    """ "fp8" when weights under ``prefix`` are stored in float8 (ComfyUI's fp8 files), else the dtype most of
    them have ("bf16", "fp16", "fp32"), from the tensor table alone."""
    names = [k for k in source.keys() if k.startswith(prefix) and k.endswith(".weight")]
    if any(source.dtypes[k] in FP8_DTYPES or source.dtypes[k] == torch.uint8 for k in names):
        return "fp8"
    counts: dict[torch.dtype, int] = {}
    for name in names:
        counts[source.dtypes[name]] = counts.get(source.dtypes[name], 0) + 1
    dtype = max(counts, key=counts.get) if counts else None
    return PRECISION_NAMES.get(dtype, str(dtype).removeprefix("torch."))
