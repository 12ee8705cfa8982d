"""Decomposition step by step, each step a node that also takes core's models and LATENTs: Encode Image
(the condition latent), Decompose (the sampler) and Decode Layers (the layers, their masks and the stack)."""

from __future__ import annotations

import json
import types

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..layered_core.distributed.two_devices import TwoDeviceCFG, replicate
from ..layered_core.image import bucket_size, image_to_bchw, resize_rgba
from ..layered_core.layers import stack_from_bhwc
from ..layered_core.mmdit import LATENT_CHANNELS
from ..layered_core.sampling import PromptEmbeddings, forward_batch, sample
from ..layered_core.vae import decode_frames
from .comfy_model import ComfyTransformer
from .common import (
    CATEGORY,
    PREFIX,
    STACK_TOOLTIP,
    LayerStackType,
    cfg_input,
    cfg_normalize_input,
    is_ours,
    layer_outputs,
    layers_input,
    mask_input,
    progress_reporter,
    resolution_input,
    seed_input,
    single_image,
    step_callback,
    steps_input,
)


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
                resolution_input(),
                mask_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="condition", tooltip="connect to Decompose or ReferenceLatent"),
                io.Image.Output(display_name="resized", tooltip="the RGBA image at the bucket size"),
            ],
        )

    @classmethod
    def execute(cls, vae, image, resolution, mask=None) -> io.NodeOutput:
        pil = single_image(image, "Encode Image for Layers", mask)
        pil = resize_rgba(pil, bucket_size(*pil.size, int(resolution)))
        pixels = image_to_bchw(pil)  # (1, 4, H, W)
        if is_ours(vae):
            samples = vae.denormalize_latent(vae.encode(pixels))[:, :, None]
        else:  # core's VAE takes [B, H, W, C]; one image per call (a batch would be read as time)
            samples = vae.encode(pixels.permute(0, 2, 3, 1))
        resized = pixels.permute(0, 2, 3, 1)
        return io.NodeOutput({"samples": samples.float().cpu()}, resized)


def _conditioning(conditioning) -> PromptEmbeddings:
    """CONDITIONING (from core's CLIPTextEncode or this pack) as prompt embeddings with their mask."""
    if not conditioning:
        raise ValueError("empty CONDITIONING")
    embeddings, extra = conditioning[0][0], conditioning[0][1]
    mask = extra.get("attention_mask")
    return PromptEmbeddings(embeddings, None if mask is None else mask.bool())


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
                layers_input(),
                steps_input(),
                cfg_input(),
                cfg_normalize_input(),
                seed_input(),
                io.Combo.Input(
                    "cfg_device",
                    options=["same", *_other_gpus()],
                    default="same",
                    optional=True,
                    tooltip="where the negative prompt's branch runs: 'same' (beside the prompt's), or another GPU, "
                    "which then holds a whole copy of the transformer for the run (about 41 GB in bf16, 20.5 GB in "
                    "fp8) and samples that branch at the same time",
                ),
            ],
            outputs=[
                io.Latent.Output(
                    tooltip=f"[B, {LATENT_CHANNELS}, N+1, H/8, W/8]: frame 0 the composite, then the layers"
                )
            ],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, condition, layers, steps, cfg, cfg_normalize, seed, cfg_device="same"
    ) -> io.NodeOutput:
        base = model.model
        reference = condition["samples"]
        reference = reference[:, :, 0] if reference.ndim == 5 else reference
        device = model.load_device
        batch = forward_batch(reference.shape[0], cfg)  # cond and uncond together when guided
        shape = (batch, LATENT_CHANNELS, layers + 1, reference.shape[-2], reference.shape[-1])
        mm.load_models_gpu([model], memory_required=base.memory_required(shape))
        velocity = ComfyTransformer(model)

        callback = step_callback(model, steps)

        # the Wan 2.1 latent format normalises 5-D latents (B, C, T, h, w)
        normalised = base.process_latent_in(reference[:, :, None].to(device, torch.float32))[:, :, 0]
        latents = sample(
            velocity,
            normalised,
            _conditioning(positive).to(device),
            _conditioning(negative).to(device),
            layer_count=layers,
            steps=steps,
            cfg_scale=cfg,
            cfg_normalize=cfg_normalize,
            seed=seed,
            callback=callback,
            branches=None if cfg_device == "same" else _second_gpu(model, cfg_device),
        )
        return io.NodeOutput({"samples": base.process_latent_out(latents).cpu()})


def _other_gpus() -> list[str]:
    """The GPUs a second CFG branch can take: every CUDA GPU, where there are two or more."""
    count = torch.cuda.device_count()
    return [f"cuda:{index}" for index in range(count)] if count > 1 else []


def _second_gpu(model, device: str) -> TwoDeviceCFG:
    """The negative prompt's branch on a copy of the MODEL's transformer on ``device``, for this run."""
    if torch.device(device) == torch.device(model.load_device):
        raise ValueError(f"cfg_device {device} is the model's own GPU: choose another GPU, or 'same'")
    dynamic = getattr(model, "is_dynamic", lambda: False)()
    if model.patches and (dynamic or getattr(model.model, "model_lowvram", False)):
        # ComfyUI applies these patches as it casts each weight: a copy of the module's tensors would lack them
        raise ValueError(
            "cfg_device: this MODEL carries weight patches (a LoRA) that ComfyUI applies while it casts the weights "
            "(dynamic VRAM or a partial load), so a copy on another GPU would run without them; use 'same'"
        )
    # ComfyTransformer's view of the MODEL with its transformer on the other GPU
    view = types.SimpleNamespace(
        model=types.SimpleNamespace(
            diffusion_model=replicate(model.model.diffusion_model, device),
            get_dtype_inference=model.model.get_dtype_inference,
        ),
        load_device=torch.device(device),
        model_options=model.model_options,
    )
    return TwoDeviceCFG(ComfyTransformer(view), device)


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
                io.Latent.Input(
                    "samples", tooltip=f"[B, {LATENT_CHANNELS}, N+1, h, w] from Decompose or a core sampler"
                ),
            ],
            outputs=[
                *layer_outputs(),
                io.String.Output(display_name="boxes", tooltip="JSON: each layer's alpha box [x0, y0, x1, y1]"),
                LayerStackType.Output(display_name="stack", tooltip=STACK_TOOLTIP),
            ],
        )

    @classmethod
    def execute(cls, vae, samples) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 5 or latent.shape[2] < 2:
            raise ValueError(
                f"expected a layered latent [B, {LATENT_CHANNELS}, N+1, h, w] with N >= 1, got {tuple(latent.shape)}"
            )
        if latent.shape[0] != 1:
            raise ValueError(f"Decode Layers takes one decomposition at a time, got a batch of {latent.shape[0]}")
        frames = latent[0].transpose(0, 1)  # (N+1, LATENT_CHANNELS, h, w), decoded independently
        progress = progress_reporter()
        if is_ours(vae):
            # our VAE decodes normalised latents; ComfyUI's LATENT holds them raw
            images = decode_frames(lambda chunk: vae.decode(vae.normalize_latent(chunk)), frames, progress=progress)
            images = images.permute(0, 2, 3, 1)
        else:
            progress(0, len(frames))
            decoded = vae.decode(frames[:, :, None])  # core's VAE: [N+1, 1, H, W, C], batched as it decides
            images = decoded.reshape(-1, *decoded.shape[-3:])
            progress(len(frames), len(frames))
        images = images.float().clamp(0, 1).cpu()
        layers, composite = images[1:], images[:1]
        if layers.shape[-1] == 3:
            layers = torch.cat([layers, torch.ones_like(layers[..., :1])], dim=-1)
        stack = stack_from_bhwc(layers)
        boxes = [list(layer.alpha_box() or (0, 0, 0, 0)) for layer in stack.layers]
        return io.NodeOutput(layers, 1.0 - layers[..., 3], composite, json.dumps(boxes), stack)
