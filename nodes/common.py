"""What the pack's nodes share: the node id prefix and category, the pack's custom types, the inputs and
outputs several nodes declare alike, and the small conversions between ComfyUI's values and layered_core's."""

from __future__ import annotations

import comfy.model_management as mm
import latent_preview
import numpy as np
import torch
from comfy_api.latest import io

from ..layered_core.layers import rgba_from_bhwc, rgba_to_pil
from ..layered_core.sampling import MAX_LAYERS
from .comfy_model import VAEPatcher

PREFIX = "QwenLayered"
CATEGORY = "Qwen-Image-Layered"
LayerStackType = io.Custom("QWEN_LAYER_STACK")
TextEncoderType = io.Custom("QWEN_LAYERED_TEXT_ENCODER")
STACK_TOOLTIP = "the layers as a tree (split layers hold their sub-layers): for Save PSD, Save PNG zip, Split Layer"


# -- inputs several nodes declare alike ---------------------------------------------------------------------


def steps_input():
    return io.Int.Input("steps", default=50, min=1, max=200, tooltip="Euler steps (the official app uses 50)")


def cfg_input():
    return io.Float.Input("cfg", default=4.0, min=1.0, max=20.0, step=0.1, tooltip="true-CFG scale; 1 turns it off")


def cfg_normalize_input():
    return io.Boolean.Input("cfg_normalize", default=True, tooltip="rescale guided velocity to the cond norm")


def seed_input():
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="noise seed")


def layers_input(default: int = 4, tooltip: str = "layer count N"):
    return io.Int.Input("layers", default=default, min=1, max=MAX_LAYERS, tooltip=tooltip)


def resolution_input():
    return io.Combo.Input("resolution", options=["640", "1024"], default="640", tooltip="bucket area side")


def text_encoder_input(tooltip: str = "from Load Qwen2.5-VL (transformers folder)"):
    return TextEncoderType.Input("text_encoder", tooltip=tooltip)


def layer_outputs() -> list:
    """The outputs every node that returns layers starts with."""
    return [
        io.Image.Output(display_name="layers", tooltip="[N, H, W, 4], bottom to top"),
        io.Mask.Output(display_name="masks", tooltip="[N, H, W], 1 = transparent"),
        io.Image.Output(display_name="composite", tooltip="frame 0, the model's own composite"),
    ]


# -- values --------------------------------------------------------------------------------------------------


def single_image(image: torch.Tensor, node: str):
    """One IMAGE as a straight-RGBA PIL image; a batch is refused rather than cut to its first image."""
    if image.shape[0] != 1:
        raise ValueError(f"{node} takes one image at a time, got a batch of {image.shape[0]}")
    return rgba_to_pil(rgba_from_bhwc(image))


def rgba_from_image_and_mask(image: torch.Tensor, mask: torch.Tensor | None, node: str) -> tuple[np.ndarray, bool]:
    """One IMAGE (+ an optional MASK in core's convention, 1 = transparent) as uint8 straight RGBA, and whether
    it carries transparency (a MASK, or an IMAGE with 4 channels).

    A mask of another size than the image is refused, except one that is all 0 (nothing transparent): LoadImage
    gives that 64x64 placeholder for an image without alpha, and it changes nothing.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"{node} takes one image at a time, got an IMAGE of shape {tuple(image.shape)}")
    pixels = rgba_from_bhwc(image)
    has_alpha = image.shape[-1] == 4
    if mask is None:
        return pixels, has_alpha
    if mask.ndim == 3 and mask.shape[0] != 1:
        raise ValueError(f"{node} takes one mask at a time, got a batch of {mask.shape[0]}")
    if mask.ndim not in (2, 3):
        raise ValueError(f"{node}: expected one MASK [1, H, W], got shape {tuple(mask.shape)}")
    values = mask.detach().float().cpu().reshape(mask.shape[-2:])
    if tuple(values.shape) != pixels.shape[:2]:
        if not values.any():
            return pixels, has_alpha
        raise ValueError(
            f"{node}: the mask is {values.shape[1]}x{values.shape[0]} but the image is "
            f"{pixels.shape[1]}x{pixels.shape[0]}; connect the mask that came with the image"
        )
    pixels = pixels.copy()
    pixels[..., 3] = np.clip(np.floor((1 - values.numpy()) * 255 + 0.5), 0, 255).astype(np.uint8)
    return pixels, True


def image_with_mask(image: torch.Tensor, mask: torch.Tensor | None, node: str):
    """One IMAGE as a straight-RGBA PIL image, its alpha from ``mask`` (1 = transparent) when one is given;
    see :func:`rgba_from_image_and_mask`."""
    return rgba_to_pil(rgba_from_image_and_mask(image, mask, node)[0])


def is_ours(vae) -> bool:
    """Whether a VAE input is this pack's RGBA-VAE (Load RGBA-VAE) rather than core's VAE."""
    return isinstance(vae, VAEPatcher)


def step_callback(model, steps: int):
    """After each step: stop if the user cancelled, then progress with a latent preview (frame 0)."""
    progress = latent_preview.prepare_callback(model, steps)

    def callback(info) -> None:
        mm.throw_exception_if_processing_interrupted()
        progress(info.step, info.denoised, info.latents, info.total)

    return callback
