"""The VLD-MMDiT against diffusers' QwenImageTransformer2DModel (use_layer3d_rope, use_additional_t_cond)."""

from __future__ import annotations

import pytest
import torch

from layered_core.mmdit import MMDiTConfig, VLDMMDiT, pack_latents, timestep_features, unpack_latents
from layered_core.rope import layered_positions, text_start


def load_ours(reference, config) -> VLDMMDiT:
    with torch.device("meta"):
        model = VLDMMDiT(config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def reference_velocity(reference, latents, condition, text, sigma, mask):
    """What the diffusers pipeline computes for one forward, back in (B, C, F, h, w)."""
    batch, _, frames, height, width = latents.shape
    grid = (1, height // 2, width // 2)
    tokens = torch.cat([pack_latents(latents), pack_latents(condition[:, :, None])], dim=1)
    out = reference(
        hidden_states=tokens,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=sigma,
        img_shapes=[[grid] * (frames + 1)] * batch,
        additional_t_cond=torch.zeros(batch, dtype=torch.long),
        return_dict=False,
    )[0]
    return unpack_latents(out[:, : frames * grid[1] * grid[2]], frames, height, width)


def relative_max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# (layers, height px, width px): 1 layer non-square, the 480x864 bucket with 4 layers, 10 layers square.
CASES = [(1, 64, 96), (4, 480, 864), (10, 128, 128)]


@pytest.mark.parametrize("layers,height,width", CASES)
def test_forward_matches_diffusers(tiny_reference, tiny_config, layers, height, width):
    torch.manual_seed(layers)
    ours = load_ours(tiny_reference, tiny_config)
    batch, text_len = 2, 9
    h, w = height // 8, width // 8
    latents = torch.randn(batch, 16, layers + 1, h, w)
    condition = torch.randn(batch, 16, h, w)
    text = torch.randn(batch, text_len, tiny_config.text_dim)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[1, 6:] = False  # a shorter second prompt, padded
    sigma = torch.tensor([0.83, 0.21])
    with torch.no_grad():
        got = ours(latents, condition, text, sigma, mask)
        want = reference_velocity(tiny_reference, latents, condition, text, sigma, mask)
    assert got.shape == (batch, 16, layers + 1, h, w)
    assert want.abs().max() > 1.0  # a live output, not a collapsed one
    assert relative_max_error(got, want) <= 1e-5


def test_unmasked_text_equals_all_true_mask(tiny_reference, tiny_config):
    ours = load_ours(tiny_reference, tiny_config)
    torch.manual_seed(3)
    latents, condition = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 16, 8, 8)
    text, sigma = torch.randn(1, 5, tiny_config.text_dim), torch.tensor([0.5])
    with torch.no_grad():
        a = ours(latents, condition, text, sigma, None)
        b = ours(latents, condition, text, sigma, torch.ones(1, 5, dtype=torch.bool))
        c = reference_velocity(tiny_reference, latents, condition, text, sigma, None)
    assert torch.equal(a, b)
    assert relative_max_error(a, c) <= 1e-5


def test_pack_matches_reference_pipeline():
    from diffusers import QwenImageLayeredPipeline

    latents = torch.randn(2, 16, 3, 6, 10)
    ref = QwenImageLayeredPipeline._pack_latents(latents.permute(0, 2, 1, 3, 4), 2, 16, 6, 10, 3)
    assert torch.equal(pack_latents(latents), ref)
    assert torch.equal(unpack_latents(ref, 3, 6, 10), latents)
    unpacked = QwenImageLayeredPipeline._unpack_latents(ref, 48, 80, 2, 8)
    assert torch.equal(unpacked, latents)


def test_layer3d_positions():
    text, image = layered_positions(noisy_frames=3, height=2, width=3, text_length=4)
    # rows -1..0, cols -2..0 (centred), frames 0,1,2 then the condition at -1
    assert image.shape == (4 * 2 * 3, 3)
    assert image[:6].tolist() == [[0, r, c] for r in (-1, 0) for c in (-2, -1, 0)]
    assert image[-6:].tolist() == [[-1, r, c] for r in (-1, 0) for c in (-2, -1, 0)]
    # text starts after the largest position on any axis: max(h//2, w//2, frames) = 3
    assert text[:, 0].tolist() == [3, 4, 5, 6] and torch.equal(text[:, 0], text[:, 2])
    assert text_start(11, 40, 54) == 27 and text_start(21, 8, 8) == 21


def test_timestep_features_are_cos_then_sin():
    feats = timestep_features(torch.tensor([0.0, 0.5]))
    assert feats.shape == (2, 256)
    assert torch.equal(feats[0, :128], torch.ones(128)) and torch.equal(feats[0, 128:], torch.zeros(128))
    assert feats[1, 0].item() == pytest.approx(torch.cos(torch.tensor(500.0)).item(), abs=1e-5)


def test_block_replace_hook_is_called(tiny_reference, tiny_config):
    ours = load_ours(tiny_reference, tiny_config)
    seen = []

    def patch(args, extra):
        seen.append(args["transformer_options"]["block_index"])
        out = extra["original_block"](args)
        return {"img": out["img"] * 0 + args["img"], "txt": out["txt"]}  # skip the block's image update

    latents, condition = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 4, 4)
    text, sigma = torch.randn(1, 3, tiny_config.text_dim), torch.tensor([0.4])
    options = {"patches_replace": {"dit": {("double_block", 1): patch}}}
    with torch.no_grad():
        patched = ours(latents, condition, text, sigma, transformer_options=options)
        plain = ours(latents, condition, text, sigma)
    assert seen == [1]
    assert not torch.allclose(patched, plain)


def test_config_validation():
    with pytest.raises(ValueError, match="sum to head_dim"):
        MMDiTConfig(head_dim=128, axes_dims=(16, 56, 54))
    with pytest.raises(ValueError, match="not Qwen-Image-Layered"):
        MMDiTConfig.from_diffusers({"use_layer3d_rope": False})
    assert MMDiTConfig.full().hidden_size == 3072


def test_bad_inputs_are_named(tiny_config):
    model = VLDMMDiT(tiny_config)
    good = dict(
        latents=torch.randn(1, 16, 2, 4, 4),
        condition=torch.randn(1, 16, 4, 4),
        text=torch.randn(1, 3, tiny_config.text_dim),
        sigma=torch.tensor([0.5]),
    )
    for key, bad, message in [
        ("latents", torch.randn(1, 4, 2, 4, 4), "latents must be"),
        ("latents", torch.randn(1, 16, 2, 5, 4), "multiples of 2"),
        ("condition", torch.randn(1, 16, 6, 4), "condition latent must be"),
        ("text", torch.randn(1, 3, 7), "text embeddings must be"),
        ("sigma", torch.tensor([0.5, 0.5]), "sigma must have shape"),
    ]:
        with pytest.raises(ValueError, match=message):
            model(**{**good, key: bad})


def test_full_config_parameter_count():
    with torch.device("meta"):
        model = VLDMMDiT(MMDiTConfig.full(), dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - 20.43) < 0.01


def test_fp16_overflow_is_clipped_like_the_reference(tiny_reference, tiny_config):
    ours = load_ours(tiny_reference, tiny_config).half()
    ours.compute_dtype = torch.float16
    with torch.no_grad():
        # every term positive and large: the block's MLP output sums past fp16's range to +inf (not NaN)
        ours.transformer_blocks[0].img_mlp.net[2].weight.fill_(1000.0)
    latents, condition = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 4, 4)
    text, sigma = torch.randn(1, 3, tiny_config.text_dim), torch.tensor([0.5])
    with torch.no_grad():
        out = ours(latents, condition, text, sigma)
    assert torch.isfinite(out).all()
