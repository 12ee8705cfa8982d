"""What a checkpoint file or folder holds, for ``python -m layered_core inspect``, read from headers and
config files only: no tensor is loaded.

A transformer gets its config and fp8 layers, a VAE its channels, latent size and layout, a text encoder
(a folder, or ComfyUI's single file) its layers, width, vision tower and whether it can caption; a diffusers
pipeline folder and a ComfyUI models folder get each of their models described.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..mmdit import LATENT_CHANNELS
from ..text import find_text_encoder
from .files import CheckpointError, TensorSource, describe_keys, open_checkpoint
from .models_folder import find_models, models_folder
from .quantized import quantized_layers
from .text_encoder import comfyui_tokenizer, infer_shape, is_qwen_vl_file
from .transformer import infer_mmdit_config, layered_prefix, transformer_precision
from .vae import vae_prefix, vae_shape

# the size the VAE's latent is shown for: the model's 640 bucket at 1:1
EXAMPLE_SIDE = 640


def _numel(shape) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


def _tensor_table(source: TensorSource) -> dict:
    keys = source.keys()
    return {
        "tensors": len(keys),
        "bytes": sum(source.dtypes[k].itemsize * _numel(source.shapes[k]) for k in keys),
        "dtypes": sorted({str(source.dtypes[k]).removeprefix("torch.") for k in keys}),
    }


def describe_vae(source: TensorSource, prefix: str) -> dict:
    """Channels, latent size and layout of a VAE checkpoint."""
    try:
        shape = vae_shape(source, prefix)
    except ValueError as e:
        return {"holds": "a VAE, but not the RGBA-VAE of Qwen-Image-Layered", "problem": str(e)}
    ratio = 2 ** (len(shape["dim_mult"]) - 1)
    layout = {"wan": "Wan names (ComfyUI's single file)", "diffusers": "diffusers names (the vae/ folder)"}
    side = EXAMPLE_SIDE // ratio
    rgba = shape["image_channels"] == 4 and shape["z_dim"] == LATENT_CHANNELS
    return {
        "holds": "the RGBA-VAE of Qwen-Image-Layered" if rgba else "a Wan-style VAE",
        "layout": layout[shape["layout"]],
        "image_channels": shape["image_channels"],
        "latent_channels": shape["z_dim"],
        "downsampling": ratio,
        "latent_size": f"a {EXAMPLE_SIDE}x{EXAMPLE_SIDE} image -> {shape['z_dim']}x{side}x{side}",
        "base_dim": shape["base_dim"],
        "dim_mult": list(shape["dim_mult"]),
        "num_res_blocks": shape["num_res_blocks"],
    }


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What one checkpoint (a safetensors file, a shard index or a model folder) holds."""
    source = open_checkpoint(path)
    info = {"path": str(source.location), "holds": describe_keys(source.keys()), **_tensor_table(source)}
    prefix = layered_prefix(source)
    if prefix is not None:
        info["prefix"] = prefix
        info["precision"] = transformer_precision(source, prefix)
        info["fp8_layers"] = len(quantized_layers(source, prefix))
        info["config"] = infer_mmdit_config(source, prefix).to_dict()
        return info
    prefix = vae_prefix(source)
    if prefix is not None:
        info.update(describe_vae(source, prefix))
        if prefix:
            info["prefix"] = prefix
    elif source.location.is_file() and is_qwen_vl_file(source):
        info.update(describe_text_encoder_file(source))
    return info


def describe_text_encoder_file(source: TensorSource) -> dict:
    """Layers, width, heads, vision tower, precision and head of ComfyUI's single-file Qwen2.5-VL, and the
    tokenizer it would be read with."""
    try:
        shape = infer_shape(source)
    except CheckpointError as e:
        return {"problem": e.problem}
    tokenizer = comfyui_tokenizer(source.location)
    return {
        "holds": "a text encoder (Qwen2.5-VL), ComfyUI's single file",
        "precision": shape.precision,
        "fp8_layers": len(quantized_layers(source, "")),
        "layers": shape.num_layers,
        "width": shape.hidden_size,
        "attention_heads": shape.num_heads,
        "key_value_heads": shape.num_kv_heads,
        "vocabulary": shape.vocab_size,
        "vision_tower": {"blocks": shape.vision_depth, "width": shape.vision_hidden_size},
        "lm_head": shape.has_lm_head,
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "captions": shape.has_lm_head,
    }


def describe_text_encoder(path: str | os.PathLike) -> dict:
    """Layers, width, vision tower, tokenizer and processor of a Qwen2.5-VL folder."""
    parts = find_text_encoder(path)
    config_path = parts.model / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 nests the language model's settings in text_config; older configs hold them at the top
    text = {**config, **(config.get("text_config") or {})}
    vision = config.get("vision_config") or {}
    source = open_checkpoint(parts.model)
    vision_tensors = [k for k in source.keys() if k.startswith(("visual.", "model.visual."))]
    info = {
        "path": str(Path(path)),
        "holds": "a text encoder (Qwen2.5-VL)",
        "layers": text.get("num_hidden_layers"),
        "width": text.get("hidden_size"),
        "attention_heads": text.get("num_attention_heads"),
        "vocabulary": text.get("vocab_size"),
        "vision_tower": (
            {"blocks": vision.get("depth"), "width": vision.get("hidden_size"), "tensors": len(vision_tensors)}
            if vision_tensors
            else None
        ),
        "tokenizer": str(parts.tokenizer),
        "processor": None if parts.processor is None else str(parts.processor),
        "captions": parts.processor is not None and bool(vision_tensors),
        **_tensor_table(source),
    }
    return info


def _is_text_encoder_folder(path: Path) -> bool:
    if (path / "text_encoder").is_dir() and not (path / "model_index.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "qwen2_5_vl"


def describe_models_folder(folder: Path) -> dict:
    """Each model a ComfyUI models folder holds, as ``decompose --model`` would choose them."""
    info: dict = {"path": str(folder), "holds": "a ComfyUI models folder"}
    for kind, key in (("transformer", "transformer"), ("vae", "vae"), ("text_encoder", "text_encoder")):
        try:
            found = find_models(folder, kinds=(kind,))
        except CheckpointError as e:
            info[key] = {"problem": e.problem}
            continue
        chosen = getattr(found, kind)
        folder_encoder = kind == "text_encoder" and chosen.is_dir()
        info[key] = describe_text_encoder(chosen) if folder_encoder else describe_checkpoint(chosen)
        info[key]["chosen_from"] = [str(c.path) for c in next(iter(found.looked_at.values())) if c.usable]
    return info


def describe(path: str | os.PathLike) -> dict:
    """What ``path`` holds: a checkpoint file, a model folder, a text encoder folder, a diffusers pipeline
    folder or a ComfyUI models folder. Raises :class:`CheckpointError` naming the file for what is unreadable."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            info: dict = {"path": str(path), "holds": "a diffusers pipeline folder"}
            for part in ("transformer", "vae"):
                info[part] = describe_checkpoint(path / part) if (path / part).is_dir() else None
            info["text_encoder"] = describe_text_encoder(path) if (path / "text_encoder").is_dir() else None
            return info
        folder = models_folder(path)
        if folder is not None:
            return describe_models_folder(folder)
        if _is_text_encoder_folder(path):
            return describe_text_encoder(path)
    return describe_checkpoint(path)
