"""The VLD-MMDiT's checkpoints: reading every layout users hold, and writing them.

- a diffusers ``transformer/`` folder (config.json + shards + index), or the whole pipeline folder;
- ComfyUI's single files, ``diffusion_models/qwen_image_layered_bf16.safetensors`` with or without the
  ``model.diffusion_model.`` prefix, and the fp8 files in both quantised layouts ComfyUI reads (per-layer
  ``comfy_quant`` + ``weight_scale``/``input_scale``, and the older ``scaled_fp8`` marker +
  ``scale_weight``/``scale_input``).

Models are built on the meta device and the memory-mapped tensors assigned. The fp8 layouts themselves are read by
:mod:`.quantized`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..mmdit import MMDiTConfig, VLDMMDiT
from ..ops import FP8_DTYPES, FP8Linear, dequantize_fp8, is_quantizable, quantize_fp8
from .files import (
    CONFIG_METADATA_KEY,
    LAYERED_MARKER,
    CheckpointError,
    TensorSource,
    describe_keys,
    find_prefix,
    key_set_problems,
    open_checkpoint,
    save_safetensors,
)
from .quantized import auxiliary_keys, quantized_layers, read_fp8_weight, weights_precision

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
FULL_TRANSFORMER_FILES = (
    "diffusion_models/qwen_image_layered_bf16.safetensors, diffusion_models/qwen_image_layered_fp8mixed.safetensors "
    "or the transformer/ folder of Qwen/Qwen-Image-Layered"
)


def transformer_prefix(source: TensorSource) -> str:
    """The prefix in front of the transformer's tensor names: "" or one of :data:`TRANSFORMER_PREFIXES`."""
    return find_prefix(source.keys(), TRANSFORMER_PREFIXES, "transformer_blocks.0.")


def layered_prefix(source: TensorSource) -> str | None:
    """The tensor-name prefix if ``source`` holds a Qwen-Image-Layered transformer, else None."""
    prefix = transformer_prefix(source)
    return prefix if f"{prefix}{LAYERED_MARKER}" in source else None


def open_transformer(path: str | os.PathLike) -> tuple[TensorSource, str]:
    """Open a Qwen-Image-Layered transformer checkpoint in any layout: its tensors and their name prefix.

    Anything else (a VAE, a text encoder, a plain Qwen-Image transformer) is a :class:`CheckpointError`
    saying what the file holds and which file is needed.
    """
    source = open_checkpoint(path, component="transformer")
    keys = source.keys()
    prefix = layered_prefix(source)
    if prefix is None:
        if not any(k.startswith(f"{transformer_prefix(source)}transformer_blocks.") for k in keys):
            problem = f"this file holds {describe_keys(keys)}, not a transformer; it needs {FULL_TRANSFORMER_FILES}"
        else:
            problem = (
                f"this is {describe_keys(keys)}: it has no '{LAYERED_MARKER}', so it is not Qwen-Image-Layered. "
                f"Load {FULL_TRANSFORMER_FILES}"
            )
        raise CheckpointError(source.location, problem)
    return source, prefix


def transformer_precision(source: TensorSource, prefix: str = "") -> str:
    """The precision of the transformer's block weights (see :func:`.quantized.weights_precision`)."""
    return weights_precision(source, f"{prefix}transformer_blocks.")


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
    source, prefix = open_transformer(path)
    keys = source.keys()
    config = config or infer_mmdit_config(source, prefix)
    quantized = quantized_layers(source, prefix)
    aux = auxiliary_keys(source, prefix, quantized)

    with torch.device("meta"):
        model = VLDMMDiT(config, dtype=dtype, operations=operations)
    expected = set(model.state_dict().keys())
    present = {k[len(prefix) :] for k in keys if k.startswith(prefix) and k not in aux}
    if problems := key_set_problems(expected, present):
        raise CheckpointError(source.location, f"the tensors do not match the model: {problems}")
    if fp8 == "keep":
        for name in quantized:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, FP8Linear.like(getattr(parent, child)))

    # Tensors go to the target device before any dtype change, so dequantising a 20 GB fp8 file for a
    # GPU never builds the 41 GB bf16 model in host memory.
    state = {}
    for name in expected:
        layer = quantized.get(name.rpartition(".")[0]) if name.endswith(".weight") else None
        if layer is not None:
            tensor, scale = read_fp8_weight(source, prefix + name, layer, device)
            if fp8 == "keep":
                state[name] = tensor
                state[name.rpartition(".")[0] + ".weight_scale"] = scale
            else:
                state[name] = dequantize_fp8(tensor, scale, dtype)
            continue
        tensor = source.get(prefix + name).to(device)
        if tensor.dtype.is_floating_point:
            state[name] = tensor.to(dtype)
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    source.close()
    model.compute_dtype = dtype
    return model.to(device).eval().requires_grad_(False)


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
            save_safetensors(shard, path / shard_name)
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
    save_safetensors(out, path, metadata)
    return path
