"""The loaders: Load VLD-MMDiT (and Transformer Fast Path, its blocks' mode), Load RGBA-VAE and Load Qwen2.5-VL,
with the models-folder look-ups they list and find their files by."""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io

from ..layered_core.checkpoints import load_vae
from ..layered_core.compile_policy import caption_compile_choice
from ..layered_core.text import load_text_encoder
from .comfy_model import WEIGHT_DTYPES, ComfyLayeredDiT, VAEPatcher, load_layered_model
from .common import CATEGORY, PREFIX, TextEncoderType
from .fast_path import MODE_TOOLTIP, MODES, OPTION


def _folders(kind: str, *markers: str) -> list[str]:
    """Subfolders of models/<kind> holding one of ``markers`` (diffusers-style model folders)."""
    names = []
    for root in folder_paths.get_folder_paths(kind):
        if os.path.isdir(root):
            names += sorted(
                entry
                for entry in os.listdir(root)
                if any(os.path.exists(os.path.join(root, entry, m)) for m in markers)
            )
    return names


def _find_folder(kind: str, name: str) -> Path | None:
    """The folder ``name`` directly inside one of models/<kind>'s roots (nothing outside them)."""
    for root in folder_paths.get_folder_paths(kind):
        path = Path(root) / name
        if path.is_dir() and path.resolve().parent == Path(root).resolve():
            return path
    return None


def _model_choices() -> list[str]:
    """Single files in models/diffusion_models, and diffusers folders (with config.json) there."""
    return list(folder_paths.get_filename_list("diffusion_models")) + _folders("diffusion_models", "config.json")


def _model_path(name: str) -> str:
    path = folder_paths.get_full_path("diffusion_models", name) or _find_folder("diffusion_models", name)
    if path is None:
        raise ValueError(f"{name}: not found in models/diffusion_models")
    return str(path)


def _text_encoder_choices() -> list[str]:
    """Folders in models/text_encoders holding a transformers Qwen2.5-VL (text_encoder/ + tokenizer/)."""
    return _folders("text_encoders", "text_encoder", "config.json")


class LoadMMDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}LoadMMDiT",
            display_name="Load VLD-MMDiT (Qwen-Image-Layered)",
            category=CATEGORY,
            description="Loads the Qwen-Image-Layered transformer into ComfyUI's model management "
            "(VRAM offloading, LoRA, core samplers).",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=_model_choices(),
                    tooltip="qwen_image_layered_bf16 / fp8mixed single file, or a diffusers transformer folder",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(WEIGHT_DTYPES),
                    default="default",
                    tooltip="default keeps the file's precision; fp8_e4m3fn halves memory",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="the VLD-MMDiT, for Decompose, Image to Layers, Split Layer or core's KSampler")
            ],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(load_layered_model(_model_path(model_name), weight_dtype))


class FastPath(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}FastPath",
            display_name="Transformer Fast Path (Qwen-Image-Layered)",
            category=CATEGORY,
            description="How the VLD-MMDiT's blocks run: each block whose weights ComfyUI holds ready runs the pack's "
            "own block (compiled, FlashAttention-4, fused kernels, fp8 matmul), any other through ComfyUI's layers. "
            "Without this node the mode is auto.",
            inputs=[
                io.Model.Input("model", tooltip="the VLD-MMDiT from Load VLD-MMDiT (after any LoRA loaders)"),
                io.Combo.Input("mode", options=list(MODES), default="auto", tooltip=MODE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="the same model, its weights shared, with the mode set")],
        )

    @classmethod
    def execute(cls, model, mode) -> io.NodeOutput:
        transformer = getattr(getattr(model, "model", None), "diffusion_model", None)
        if not isinstance(transformer, ComfyLayeredDiT):
            raise ValueError(
                f"Transformer Fast Path sets the mode of this pack's VLD-MMDiT (Load VLD-MMDiT); this MODEL holds "
                f"{type(transformer).__name__}"
            )
        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})[OPTION] = mode
        return io.NodeOutput(patched)


class LoadRGBAVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}LoadRGBAVAE",
            display_name="Load RGBA-VAE (Qwen-Image-Layered)",
            category=CATEGORY,
            description="Loads the 4-channel RGBA-VAE; it runs on the VAE device and is offloaded after.",
            inputs=[
                io.Combo.Input(
                    "vae_name",
                    options=folder_paths.get_filename_list("vae"),
                    tooltip="qwen_image_layered_vae.safetensors (the 3-channel Qwen-Image VAE is refused)",
                )
            ],
            outputs=[
                io.Vae.Output(tooltip="the RGBA-VAE, for Encode Image, Decode Layers, Image to Layers, Split Layer")
            ],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        dtype = mm.vae_dtype(mm.vae_device(), [torch.bfloat16, torch.float32])
        vae = load_vae(folder_paths.get_full_path_or_raise("vae", vae_name), dtype=dtype)
        return io.NodeOutput(VAEPatcher(vae))


class LoadTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}LoadTextEncoder",
            display_name="Load Qwen2.5-VL (transformers folder)",
            category=CATEGORY,
            description="Loads Qwen2.5-VL with transformers from a folder in models/text_encoders, for prompt "
            "encoding and auto-captions (core's CLIPLoader with type qwen_image also works for prompts).",
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=_text_encoder_choices(),
                    tooltip="a folder with text_encoder/, tokenizer/ and processor/ (as in Qwen/Qwen-Image-Layered)",
                )
            ],
            outputs=[
                TextEncoderType.Output(
                    display_name="text_encoder",
                    tooltip="Qwen2.5-VL, for Encode Prompt, Auto-caption and the pipeline nodes",
                )
            ],
        )

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        path = _find_folder("text_encoders", folder)
        if path is None:
            raise ValueError(f"{folder}: not found in models/text_encoders")
        device = mm.text_encoder_device()
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
        encoder = load_text_encoder(path, dtype=dtype, device=device)
        # ComfyUI's process lives on: the compiled caption step serves every later caption
        encoder.compile_caption = caption_compile_choice("auto", device, None)[0]
        return io.NodeOutput(encoder)
