"""The pack's ComfyUI nodes (V3 API). Each declares its schema and calls one or two layered_core functions."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from layered_core.checkpoints import load_vae
from layered_core.image import bucket_size, find_image_files, image_to_tensor, open_image_with_alpha, resize_rgba
from layered_core.layers import rgba_from_tensor, rgba_to_pil, stack_from_tensor
from layered_core.mmdit import LATENT_CHANNELS
from layered_core.psd import save_psd
from layered_core.sampling import MAX_LAYERS, Conditioning, forward_batch, sample
from layered_core.vae import decode_frames

from .comfy_model import WEIGHT_DTYPES, ComfyTransformer, ManagedVAE, VAEPatcher, load_layered_model

PREFIX = "QwenLayered"
CATEGORY = "Qwen-Image-Layered"
LayerStackType = io.Custom("QWEN_LAYER_STACK")


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


def _steps_input():
    return io.Int.Input("steps", default=50, min=1, max=200, tooltip="Euler steps (the official app uses 50)")


def _cfg_input():
    return io.Float.Input("cfg", default=4.0, min=1.0, max=20.0, step=0.1, tooltip="true-CFG scale; 1 turns it off")


def _seed_input():
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="noise seed")


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
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(load_layered_model(_model_path(model_name), weight_dtype))


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
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        dtype = mm.vae_dtype(mm.vae_device(), [torch.bfloat16, torch.float32])
        vae = load_vae(folder_paths.get_full_path_or_raise("vae", vae_name), dtype=dtype)
        return io.NodeOutput(VAEPatcher(vae))


def _single_image(image: torch.Tensor, node: str):
    """One IMAGE as a straight-RGBA PIL image; a batch is refused rather than cut to its first image."""
    if image.shape[0] != 1:
        raise ValueError(f"{node} takes one image at a time, got a batch of {image.shape[0]}")
    return rgba_to_pil(rgba_from_tensor(image))


def _layer_outputs() -> list:
    """The outputs every node that returns layers starts with."""
    return [
        io.Image.Output(display_name="layers", tooltip="[N, H, W, 4], bottom to top"),
        io.Mask.Output(display_name="masks", tooltip="[N, H, W], 1 = transparent"),
        io.Image.Output(display_name="composite", tooltip="frame 0, the model's own composite"),
    ]


def _is_ours(vae) -> bool:
    return isinstance(vae, VAEPatcher)


class EncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}EncodeImage",
            display_name="Encode Image for Layers",
            category=CATEGORY,
            description="Resizes the image to the model's size bucket and encodes it: the condition latent.",
            inputs=[
                io.Vae.Input("vae", tooltip="the RGBA-VAE (this pack's loader or core's VAELoader)"),
                io.Image.Input("image", tooltip="RGB or RGBA; opaque input gets alpha 1"),
                io.Combo.Input("resolution", options=["640", "1024"], default="640", tooltip="bucket area side"),
            ],
            outputs=[
                io.Latent.Output(display_name="condition", tooltip="connect to Decompose or ReferenceLatent"),
                io.Image.Output(display_name="resized", tooltip="the RGBA image at the bucket size"),
            ],
        )

    @classmethod
    def execute(cls, vae, image, resolution) -> io.NodeOutput:
        pil = _single_image(image, "Encode Image for Layers")
        pil = resize_rgba(pil, bucket_size(*pil.size, int(resolution)))
        pixels = image_to_tensor(pil)  # (1, 4, H, W)
        if _is_ours(vae):
            samples = vae.denormalize_latent(vae.encode(pixels))[:, :, None]
        else:  # core's VAE takes [B, H, W, C]; one image per call (a batch would be read as time)
            samples = vae.encode(pixels.permute(0, 2, 3, 1))
        resized = pixels.permute(0, 2, 3, 1)
        return io.NodeOutput({"samples": samples.float().cpu()}, resized)


def _conditioning(conditioning) -> Conditioning:
    """CONDITIONING (from core's CLIPTextEncode or this pack) as prompt embeddings with their mask."""
    if not conditioning:
        raise ValueError("empty CONDITIONING")
    embeddings, extra = conditioning[0][0], conditioning[0][1]
    mask = extra.get("attention_mask")
    return Conditioning(embeddings, None if mask is None else mask.bool())


class Decompose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}Decompose",
            display_name="Decompose into Layers (sampler)",
            category=CATEGORY,
            description="Samples N RGBA layers plus the composite (frame 0) with the reference schedule and "
            "true CFG. Stops within one step when cancelled.",
            inputs=[
                io.Model.Input("model", tooltip="the VLD-MMDiT (this pack's loader or core's UNETLoader)"),
                io.Conditioning.Input("positive", tooltip="describes the whole image"),
                io.Conditioning.Input("negative", tooltip="the official app uses a single space"),
                io.Latent.Input("condition", tooltip="the input image's latent from Encode Image for Layers"),
                io.Int.Input("layers", default=4, min=1, max=MAX_LAYERS, tooltip="layer count N"),
                _steps_input(),
                _cfg_input(),
                io.Boolean.Input("cfg_normalize", default=True, tooltip="rescale guided velocity to the cond norm"),
                _seed_input(),
            ],
            outputs=[io.Latent.Output(tooltip="[B, 16, N+1, H/8, W/8]: frame 0 the composite, then the layers")],
        )

    @classmethod
    def execute(cls, model, positive, negative, condition, layers, steps, cfg, cfg_normalize, seed) -> io.NodeOutput:
        base = model.model
        reference = condition["samples"]
        reference = reference[:, :, 0] if reference.ndim == 5 else reference
        device = model.load_device
        batch = forward_batch(reference.shape[0], cfg)  # cond and uncond together when guided
        shape = (batch, LATENT_CHANNELS, layers + 1, reference.shape[-2], reference.shape[-1])
        mm.load_models_gpu([model], memory_required=base.memory_required(shape))
        velocity = ComfyTransformer(model)

        callback = _step_callback(model, steps)

        # the Wan 2.1 latent format normalises 5-D latents (B, C, T, h, w)
        normalised = base.process_latent_in(reference[:, :, None].to(device, torch.float32))[:, :, 0]
        latents = sample(
            velocity,
            normalised,
            _conditioning(positive).to(device),
            _conditioning(negative).to(device),
            layers=layers,
            steps=steps,
            cfg_scale=cfg,
            cfg_normalize=cfg_normalize,
            seed=seed,
            callback=callback,
        )
        return io.NodeOutput({"samples": base.process_latent_out(latents).cpu()})


def _step_callback(model, steps: int):
    """After each step: stop if the user cancelled, then progress with a latent preview (frame 0)."""
    progress = latent_preview.prepare_callback(model, steps)

    def callback(info) -> None:
        mm.throw_exception_if_processing_interrupted()
        progress(info.step, info.denoised, info.latents, info.total)

    return callback


class DecodeLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}DecodeLayers",
            display_name="Decode Layers",
            category=CATEGORY,
            description="Decodes each frame on its own: RGBA layers bottom to top, their masks (1 = transparent, "
            "as LoadImage), the model's composite, and a layer stack for export.",
            inputs=[
                io.Vae.Input("vae", tooltip="the RGBA-VAE (this pack's loader or core's VAELoader)"),
                io.Latent.Input("samples", tooltip="[B, 16, N+1, h, w] from Decompose or a core sampler"),
            ],
            outputs=[
                *_layer_outputs(),
                io.String.Output(display_name="boxes", tooltip="JSON: each layer's alpha box [x0, y0, x1, y1]"),
                LayerStackType.Output(display_name="stack"),
            ],
        )

    @classmethod
    def execute(cls, vae, samples) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 5 or latent.shape[2] < 2:
            raise ValueError(f"expected a layered latent [B, 16, N+1, h, w] with N >= 1, got {tuple(latent.shape)}")
        if latent.shape[0] != 1:
            raise ValueError(f"Decode Layers takes one decomposition at a time, got a batch of {latent.shape[0]}")
        frames = latent[0].transpose(0, 1)  # (N+1, 16, h, w), decoded independently
        if _is_ours(vae):
            # our VAE decodes normalised latents; ComfyUI's LATENT holds them raw
            images = decode_frames(lambda chunk: vae.decode(vae.normalize_latent(chunk)), frames)
            images = images.permute(0, 2, 3, 1)
        else:
            decoded = vae.decode(frames[:, :, None])  # core's VAE: [N+1, 1, H, W, C]
            images = decoded.reshape(-1, *decoded.shape[-3:])
        images = images.float().clamp(0, 1).cpu()
        layers, composite = images[1:], images[:1]
        if layers.shape[-1] == 3:
            layers = torch.cat([layers, torch.ones_like(layers[..., :1])], dim=-1)
        stack = stack_from_tensor(layers)
        boxes = [list(layer.alpha_box() or (0, 0, 0, 0)) for layer in stack.layers]
        return io.NodeOutput(layers, 1.0 - layers[..., 3], composite, json.dumps(boxes), stack)


class SavePSD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}SavePSD",
            display_name="Save Layered PSD",
            category=CATEGORY,
            description="Writes the layer stack as a layered PSD into the output folder; never overwrites.",
            inputs=[
                LayerStackType.Input("stack", tooltip="the layer stack from Decode Layers"),
                io.String.Input("filename_prefix", default="layers/QwenLayered", tooltip="may name a subfolder"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, stack, filename_prefix) -> io.NodeOutput:
        path = _unused_output_path(filename_prefix, ".psd", stack.width, stack.height)
        save_psd(stack, path)
        from layered_core.layers import composite, rgba_to_tensor

        preview = rgba_to_tensor(composite(stack))
        return io.NodeOutput(ui=ui.PreviewImage(preview, cls=cls))


def _unused_output_path(filename_prefix: str, suffix: str, width: int, height: int) -> Path:
    """A new file in ComfyUI's output folder: core's naming (prefix_00001_), a path outside it refused
    (core checks that), and an existing file never overwritten. The number follows the files of the same
    suffix only, so the PSD and the ZIP of one image share it."""
    output_dir = folder_paths.get_output_directory()
    folder, filename, _, _, _ = folder_paths.get_save_image_path(filename_prefix, output_dir, width, height)
    numbered = re.compile(rf"{re.escape(filename)}_(\d{{5,}})_{re.escape(suffix)}")
    used = [int(match[1]) for name in os.listdir(folder) if (match := numbered.fullmatch(name))]
    counter = max(used, default=0) + 1
    while (path := Path(folder) / f"{filename}_{counter:05}_{suffix}").exists():
        counter += 1
    return path


TextEncoderType = io.Custom("QWEN_LAYERED_TEXT_ENCODER")


def _text_encoder_choices() -> list[str]:
    """Folders in models/text_encoders holding a transformers Qwen2.5-VL (text_encoder/ + tokenizer/)."""
    return _folders("text_encoders", "text_encoder", "config.json")


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
            outputs=[TextEncoderType.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        from layered_core.text import load_text_encoder

        path = _find_folder("text_encoders", folder)
        if path is None:
            raise ValueError(f"{folder}: not found in models/text_encoders")
        device = mm.text_encoder_device()
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
        return io.NodeOutput(load_text_encoder(path, dtype=dtype, device=device))


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}TextEncode",
            display_name="Encode Prompt (Qwen-Image-Layered)",
            category=CATEGORY,
            description="The reference chat template, its 34 template tokens dropped: CONDITIONING for Decompose.",
            inputs=[
                TextEncoderType.Input("text_encoder", tooltip="from Load Qwen2.5-VL (transformers folder)"),
                io.String.Input("prompt", multiline=True, default="", tooltip="describe the whole image"),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, prompt) -> io.NodeOutput:
        embeddings, mask = text_encoder.encode([prompt], max_sequence_length=512, truncate=True)
        extra = {} if bool(mask.all()) else {"attention_mask": mask.cpu()}
        return io.NodeOutput([[embeddings.float().cpu(), extra]])


class Caption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}Caption",
            display_name="Auto-caption (Qwen2.5-VL)",
            category=CATEGORY,
            description="The reference auto-caption of an image (greedy), as a STRING prompt.",
            inputs=[
                TextEncoderType.Input("text_encoder", tooltip="from Load Qwen2.5-VL (transformers folder)"),
                io.Image.Input("image", tooltip="caption the bucket-resized image, as the reference does"),
                io.Combo.Input("language", options=["en", "zh"], default="en", tooltip="annotator instruction"),
                io.Int.Input("max_new_tokens", default=512, min=1, max=2048, tooltip="caption length limit"),
            ],
            outputs=[io.String.Output(display_name="caption")],
        )

    @classmethod
    def execute(cls, text_encoder, image, language, max_new_tokens) -> io.NodeOutput:
        pil = _single_image(image, "Auto-caption")
        return io.NodeOutput(text_encoder.caption(pil, language=language, max_new_tokens=max_new_tokens))


class SplitLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}SplitLayer",
            display_name="Split Layer (recursive)",
            category=CATEGORY,
            description="Decomposes one layer of a stack again into sub-layers, kept as a tree at the layer's "
            "place (a group in the PSD). Chain it to split deeper.",
            inputs=[
                LayerStackType.Input("stack", tooltip="the layer stack from Decode Layers or another split"),
                io.Model.Input("model", tooltip="the VLD-MMDiT"),
                io.Vae.Input("vae", tooltip="this pack's RGBA-VAE"),
                TextEncoderType.Input("text_encoder", tooltip="for the prompt (or the auto-caption)"),
                io.String.Input("path", default="1", tooltip="1-based layer number, bottom = 1; '2/1' for a sub-layer"),
                io.Int.Input("layers", default=2, min=1, max=MAX_LAYERS, tooltip="sub-layer count"),
                io.String.Input("prompt", default="", multiline=True, tooltip="empty: auto-caption of the layer"),
                _steps_input(),
                _cfg_input(),
                _seed_input(),
            ],
            outputs=[LayerStackType.Output(display_name="stack")],
        )

    @classmethod
    def execute(cls, stack, model, vae, text_encoder, path, layers, prompt, steps, cfg, seed) -> io.NodeOutput:
        from layered_core.pipeline import DecomposeOptions, LayeredPipeline

        if not _is_ours(vae):
            raise ValueError("Split Layer needs this pack's RGBA-VAE (Load RGBA-VAE)")
        try:
            index = tuple(int(part) - 1 for part in str(path).replace(" ", "").split("/"))
        except ValueError:
            raise ValueError(f"path must be layer numbers like '3' or '2/1', got {path!r}") from None
        mm.load_models_gpu([model])
        pipeline = LayeredPipeline(ComfyTransformer(model), ManagedVAE(vae), text_encoder)
        options = DecomposeOptions(steps=steps, cfg_scale=cfg, seed=seed)
        callback = _step_callback(model, steps)

        return io.NodeOutput(pipeline.split(stack, index, layers, prompt=prompt, options=options, callback=callback))


class ImageToLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}ImageToLayers",
            display_name="Image to Layers",
            category=CATEGORY,
            description="Encode, caption (if the prompt is empty), sample and decode in one node.",
            inputs=[
                io.Model.Input("model", tooltip="the VLD-MMDiT"),
                io.Vae.Input("vae", tooltip="this pack's RGBA-VAE"),
                TextEncoderType.Input("text_encoder", tooltip="from Load Qwen2.5-VL (transformers folder)"),
                io.Image.Input("image", tooltip="RGB or RGBA"),
                io.String.Input("prompt", default="", multiline=True, tooltip="empty: English auto-caption"),
                io.Int.Input("layers", default=4, min=1, max=MAX_LAYERS, tooltip="layer count N"),
                _steps_input(),
                _cfg_input(),
                io.Boolean.Input("cfg_normalize", default=True, tooltip="rescale guided velocity to the cond norm"),
                io.Combo.Input("resolution", options=["640", "1024"], default="640", tooltip="bucket area side"),
                _seed_input(),
            ],
            outputs=[
                *_layer_outputs(),
                LayerStackType.Output(display_name="stack"),
                io.String.Output(display_name="prompt", tooltip="the prompt used (the caption if it was empty)"),
            ],
        )

    @classmethod
    def execute(
        cls, model, vae, text_encoder, image, prompt, layers, steps, cfg, cfg_normalize, resolution, seed
    ) -> io.NodeOutput:
        from layered_core.pipeline import DecomposeOptions, LayeredPipeline

        if not _is_ours(vae):
            raise ValueError("Image to Layers needs this pack's RGBA-VAE (Load RGBA-VAE)")
        mm.load_models_gpu([model])
        pipeline = LayeredPipeline(ComfyTransformer(model), ManagedVAE(vae), text_encoder)
        options = DecomposeOptions(
            layers=layers,
            steps=steps,
            cfg_scale=cfg,
            cfg_normalize=cfg_normalize,
            resolution=int(resolution),
            seed=seed,
        )
        callback = _step_callback(model, steps)

        result = pipeline(_single_image(image, "Image to Layers"), prompt, options, callback=callback)
        images = result.layers.permute(0, 2, 3, 1)
        composite = result.composite.permute(1, 2, 0)[None]
        return io.NodeOutput(images, 1.0 - images[..., 3], composite, result.stack(), result.prompt)


class SaveLayerPNGs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}SaveLayerPNGs",
            display_name="Save Layers (PNG zip)",
            category=CATEGORY,
            description="Writes every layer as a PNG in a ZIP with a manifest (names, offsets, order, tree) into "
            "the output folder; never overwrites.",
            inputs=[
                LayerStackType.Input("stack", tooltip="the layer stack from Decode Layers or Split Layer"),
                io.String.Input("filename_prefix", default="layers/QwenLayered", tooltip="may name a subfolder"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, stack, filename_prefix) -> io.NodeOutput:
        from layered_core.export import save_png_zip
        from layered_core.layers import composite, rgba_to_tensor

        save_png_zip(stack, _unused_output_path(filename_prefix, ".zip", stack.width, stack.height))
        return io.NodeOutput(ui=ui.PreviewImage(rgba_to_tensor(composite(stack)), cls=cls))


def _input_folder(folder: str) -> tuple[Path, Path]:
    """(input directory, ``folder`` in it), both resolved; a folder that resolves outside the input
    directory (``..``, an absolute path, a symlink leading out) is refused."""
    root = Path(folder_paths.get_input_directory()).resolve()
    path = (root / folder).resolve()
    if Path(folder).is_absolute() or not path.is_relative_to(root):
        raise ValueError(
            f"folder {folder!r} is outside ComfyUI's input directory {root}; refused (give a folder inside it)"
        )
    return root, path


def _folder_images(folder: str, pattern: str, limit: int) -> list[Path]:
    """The image files of ``folder`` in the input directory matching ``pattern``, sorted by name, the
    first ``limit`` (0 = all); an escape, a missing folder or no match at all is an error naming both."""
    root, path = _input_folder(folder)
    if not path.is_dir():
        raise ValueError(f"folder {folder!r} (pattern {pattern!r}): no such folder in the input directory {root}")
    files = find_image_files(path, pattern)
    files = files[:limit] if limit > 0 else files
    if not files:
        raise ValueError(f"folder {folder!r} has no image files matching the pattern {pattern!r}")
    for file in files:
        if not file.resolve().is_relative_to(root):
            raise ValueError(f"{file.name} in folder {folder!r} links outside the input directory {root}; refused")
    return files


class LoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=f"{PREFIX}LoadImageFolder",
            display_name="Load Image Folder (batch)",
            category=CATEGORY,
            description="Loads every image of a folder in ComfyUI's input directory as a list, sorted by name, "
            "so the nodes after it run once per image; other files are skipped. Reruns when the folder changes.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="batch",
                    tooltip="a folder inside ComfyUI's input directory ('batch' = input/batch)",
                ),
                io.String.Input(
                    "pattern", default="*", optional=True, tooltip="glob on the file names in either case, e.g. '*.png'"
                ),
                io.Int.Input(
                    "limit",
                    default=0,
                    min=0,
                    max=1_000_000,
                    optional=True,
                    tooltip="the first N images by name; 0 = all",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images",
                    tooltip="one [1, H, W, C] per file, EXIF orientation applied; C = 4 when the file has alpha",
                    is_output_list=True,
                ),
                io.String.Output(
                    display_name="names",
                    tooltip="each file's name without its suffix, for filename prefixes",
                    is_output_list=True,
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder, pattern="*"):
        if folder is None or pattern is None:  # linked: checked when it runs
            return True
        try:
            _folder_images(folder, pattern, 0)
        except (ValueError, OSError) as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, pattern="*", limit=0):
        if folder is None or pattern is None or limit is None:  # linked: not known before it runs
            return float("nan")
        try:
            files = _folder_images(folder, pattern, limit)
        except (ValueError, OSError) as e:
            return str(e)  # the run fails and caches nothing
        listing = [(file.name, file.stat().st_mtime_ns, file.stat().st_size) for file in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, pattern="*", limit=0) -> io.NodeOutput:
        files = _folder_images(folder, pattern, limit)
        progress = comfy.utils.ProgressBar(len(files))
        images = []
        for file in files:
            rgba, transparent = open_image_with_alpha(file)
            pixels = image_to_tensor(rgba).permute(0, 2, 3, 1)  # [1, H, W, 4]
            images.append(pixels if transparent else pixels[..., :3].contiguous())
            progress.update(1)
        return io.NodeOutput(images, [file.stem for file in files])


NODES = [
    LoadImageFolder,
    ImageToLayers,
    SplitLayer,
    SaveLayerPNGs,
    LoadMMDiT,
    LoadRGBAVAE,
    LoadTextEncoder,
    TextEncode,
    Caption,
    EncodeImage,
    Decompose,
    DecodeLayers,
    SavePSD,
]
