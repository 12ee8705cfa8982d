"""The whole decomposition against diffusers' QwenImageLayeredPipeline on the same tiny random models:
same image, prompt, noise and settings, same layers (max abs difference <= 1e-4 on 0..1 pixels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.checkpoints.vae import vae_from_state_dict
from layered_core.mmdit import VLDMMDiT
from layered_core.pipeline import DecomposeOptions, LayeredPipeline
from layered_core.text import PromptEncoder
from layered_core.tiny_models import tiny_text_encoder_set

from .conftest import reference_transformer
from .test_text import reference_processor
from .test_vae import make_reference

STEPS = 3


@pytest.fixture(scope="module")
def models(tiny_config):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline

    text_model, tokenizer, image_processor = tiny_text_encoder_set(tiny_config.text_dim, seed=3)
    ref_transformer = reference_transformer(tiny_config, seed=4)
    ref_vae = make_reference(seed=5)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    reference = QwenImageLayeredPipeline(
        scheduler=scheduler,
        vae=ref_vae,
        text_encoder=text_model,
        tokenizer=tokenizer,
        processor=reference_processor(image_processor, tokenizer),
        transformer=ref_transformer,
    )
    reference.set_progress_bar_config(disable=True)

    with torch.device("meta"):
        transformer = VLDMMDiT(tiny_config)
    transformer.load_state_dict(ref_transformer.state_dict(), assign=True)
    ours = LayeredPipeline(
        transformer.eval(),
        vae_from_state_dict(ref_vae.state_dict()),
        PromptEncoder(text_model, tokenizer, image_processor),
    )
    return ours, reference


def input_image(width=1280, height=720) -> Image.Image:
    """A soft-edged shape with transparency over noise: exercises alpha and the RGBA path."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels[..., 3] = np.clip(255 - np.hypot(xx - width / 2, yy - height / 2) / 2, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGBA")


def run_reference(reference, image, prompt, layers, cfg_normalize, seed):
    with torch.no_grad():
        images = reference(
            image=image,
            prompt=prompt,
            negative_prompt=" ",
            true_cfg_scale=4.0,
            layers=layers,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            resolution=640,
            cfg_normalize=cfg_normalize,
            use_en_prompt=True,
        ).images
    return images[0].float()


@pytest.mark.parametrize(
    "layers,cfg_normalize,size",
    [(1, True, (1280, 720)), (4, True, (1280, 720)), (4, False, (720, 1280)), (1, False, (900, 900))],
)
def test_layers_match_diffusers(models, layers, cfg_normalize, size):
    ours, reference = models
    image = input_image(*size)
    prompt = "a red circle over a noisy background with a soft edge"
    want = run_reference(reference, image, prompt, layers, cfg_normalize, seed=21)
    got = ours(image, prompt, DecomposeOptions(layer_count=layers, steps=STEPS, cfg_normalize=cfg_normalize, seed=21))
    assert got.layer_images.shape == want.shape
    assert want.std() > 0.01  # decoded layers, not a constant
    assert (got.layer_images - want).abs().max().item() <= 1e-4


def test_auto_caption_path_matches_diffusers(models):
    ours, reference = models
    image = input_image()
    want = run_reference(reference, image, "", 2, True, seed=8)
    got = ours(image, "", DecomposeOptions(layer_count=2, steps=STEPS, seed=8))
    caption = reference.get_image_caption(
        ours.prepare_image(image, DecomposeOptions()), use_en_prompt=True, device="cpu"
    )
    assert got.prompt == caption and caption  # the same caption the tiny model wrote
    assert (got.layer_images - want).abs().max().item() <= 1e-4


def test_composite_is_the_models_frame_zero(models):
    """Frame 0 (the model's own composite), which diffusers drops, decoded from the reference's latents."""
    from diffusers import QwenImageLayeredPipeline

    from .test_vae import reference_decode

    ours, reference = models
    image = input_image(900, 900)
    final = {}

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"]  # after the last step: the packed N+1 frames
        return tensors

    # (output_type="latent" fails inside diffusers 0.42.1's layered pipeline, so the step callback is used)
    with torch.no_grad():
        reference(
            image=image,
            prompt="a poster",
            negative_prompt=" ",
            true_cfg_scale=4.0,
            layers=2,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(4),
            output_type="pt",
            resolution=640,
            cfg_normalize=True,
            callback_on_step_end=keep_latents,
        )
    packed = final["latents"]
    got = ours(image, "a poster", DecomposeOptions(layer_count=2, steps=STEPS, seed=4))
    height, width = got.composite.shape[-2:]
    latents = QwenImageLayeredPipeline._unpack_latents(packed, height, width, 2, 8)  # (1, 16, 3, h, w)
    want = reference_decode(reference.vae, latents[:, :, 0])[0]
    assert (got.composite - want).abs().max().item() <= 1e-4
    assert (got.layer_images[0] - reference_decode(reference.vae, latents[:, :, 1])[0]).abs().max().item() <= 1e-4
