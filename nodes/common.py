"""What the pack's nodes share: the node id prefix and category, the pack's custom types, the inputs and
outputs several nodes declare alike, and the small conversions between ComfyUI's values and layered_core's."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
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
# core's LoadImage gives a file without alpha a mask of zeros of this size (height, width), whatever the image's
OPAQUE_PLACEHOLDER_SIZE = (64, 64)
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


def mask_input():
    """The optional MASK that carries an image's alpha, as core's LoadImage splits a transparent file."""
    return io.Mask.Input(
        "mask",
        optional=True,
        tooltip="the image's transparency, 1 = transparent (connect LoadImage's MASK); replaces the image's alpha",
    )


def single_image(image: torch.Tensor, node: str, mask: torch.Tensor | None = None):
    """One IMAGE as a straight-RGBA PIL image, its alpha ``1 - mask`` where a MASK comes with it (see
    :func:`with_mask_alpha`); a batch is refused rather than cut to its first image."""
    return rgba_to_pil(rgba_from_image_and_mask(image, mask, node)[0])


def with_mask_alpha(image: torch.Tensor, mask: torch.Tensor, node: str) -> torch.Tensor:
    """IMAGE [1, H, W, C] and MASK [1, H, W] or [H, W] (1 = transparent) as RGBA [1, H, W, 4] with alpha
    ``1 - mask``: the RGBA file that core's LoadImage split in two. LoadImage gives a file without alpha a
    placeholder mask, :data:`OPAQUE_PLACEHOLDER_SIZE` zeros whatever the image's size; that one leaves the
    image as it is. Any other mask must have the image's size."""
    masks = mask[None] if mask.ndim == 2 else mask
    height, width = image.shape[1], image.shape[2]
    if masks.ndim != 3 or masks.shape[0] != 1:
        raise ValueError(f"{node}: expected one mask [H, W] or [1, H, W] for the image, got shape {tuple(mask.shape)}")
    mask_size = (masks.shape[1], masks.shape[2])
    if mask_size != (height, width):
        if mask_size == OPAQUE_PLACEHOLDER_SIZE and not bool(masks.any()):
            return image
        raise ValueError(
            f"{node}: the mask is {mask_size[1]}x{mask_size[0]} but the image is {width}x{height}; connect the MASK "
            "that came with this image (core's LoadImage gives both)"
        )
    alpha = (1.0 - masks.to(image.device, image.dtype)).clamp(0, 1)
    return torch.cat([image[..., :3], alpha[..., None]], dim=-1)


def rgba_from_image_and_mask(image: torch.Tensor, mask: torch.Tensor | None, node: str) -> tuple[np.ndarray, bool]:
    """One IMAGE (+ an optional MASK in core's convention, 1 = transparent, as :func:`with_mask_alpha` takes it)
    as uint8 straight RGBA, and whether it carries transparency (a MASK, or an IMAGE with 4 channels)."""
    if image.shape[0] != 1:
        raise ValueError(f"{node} takes one image at a time, got a batch of {image.shape[0]}")
    if mask is not None:
        image = with_mask_alpha(image, mask, node)
    return rgba_from_bhwc(image), image.shape[-1] == 4


def is_ours(vae) -> bool:
    """Whether a VAE input is this pack's RGBA-VAE (Load RGBA-VAE) rather than core's VAE."""
    return isinstance(vae, VAEPatcher)


def progress_reporter():
    """A ComfyUI progress bar as layered_core's ``progress(done, total)`` callback, for the work between
    sampling steps (decoding, writing files): a client sees it move, and a cancel stops the work at the next
    report."""
    bar = comfy.utils.ProgressBar(1)

    def report(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return report


def step_callback(model, steps: int):
    """After each step: stop if the user cancelled, then progress with a latent preview (frame 0)."""
    progress = latent_preview.prepare_callback(model, steps)

    def callback(info) -> None:
        mm.throw_exception_if_processing_interrupted()
        progress(info.step, info.denoised, info.latents, info.total)

    return callback
