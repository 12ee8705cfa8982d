"""The schedule, true CFG, batching, seeding, the layer count and cancellation of the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layered_core.mmdit import pack_latents
from layered_core.sampling import (
    Cancelled,
    PromptEmbeddings,
    guided_velocity,
    initial_noise,
    sample,
    schedule_shift,
    sigmas,
)


def test_mu_at_both_buckets():
    assert schedule_shift(40 * 40) == 2.5  # 640x640 px -> 80x80 latent -> 40x40 tokens
    assert schedule_shift(64 * 64) == 4.0  # 1024x1024 px


@pytest.mark.parametrize("steps,mu", [(50, 2.5), (20, 4.0), (1, 2.5)])
def test_sigmas_match_diffusers_scheduler(steps, mu):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0, steps + 1)[:-1], mu=mu)
    ours = sigmas(steps, mu)
    assert ours.shape == (steps + 1,) and ours[-1] == 0 and ours[0] == 1
    assert torch.allclose(ours, scheduler.sigmas.float(), atol=1e-6)
    assert torch.all(ours[1:] < ours[:-1])


class RecordingModel:
    """A stand-in velocity model: records its calls, returns a fixed function of its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, latents, condition, text, sigma, mask):
        self.calls.append((latents.shape[0], text.shape[1], None if mask is None else mask.clone(), sigma.clone()))
        # depends on the text so cond and uncond differ
        return 0.5 * latents + condition[:, :, None] * 0.1 + text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def conditioning(batch, length, value, pad=0):
    embeddings = torch.full((batch, length, 8), value)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad:
        mask[:, -pad:] = False
    return PromptEmbeddings(embeddings, mask)


def test_equal_length_cond_and_uncond_run_as_one_batch():
    model = RecordingModel()
    condition = torch.randn(1, 16, 4, 6)
    out = sample(model, condition, conditioning(1, 5, 1.0), conditioning(1, 5, -1.0), layer_count=3, steps=4, seed=7)
    assert out.shape == (1, 16, 4, 4, 6)
    assert [c[0] for c in model.calls] == [2] * 4  # one batched forward per step, no padding mask
    batch, length, mask, sigma = model.calls[0]
    assert length == 5 and mask is None
    assert torch.equal(sigma, torch.ones(2))


def test_unequal_prompts_run_unmasked_and_agree_with_the_padded_batch():
    """Prompts of different lengths: two unmasked forwards, same result as one padded, masked batch."""
    from layered_core.mmdit import MMDiTConfig, VLDMMDiT

    torch.manual_seed(0)
    model = VLDMMDiT(MMDiTConfig.tiny()).eval()
    calls = []

    def recording(latents, condition, text, sigma, mask):
        calls.append((latents.shape[0], mask))
        return model(latents, condition, text, sigma, mask)

    condition = torch.randn(1, 16, 4, 6)
    positive = PromptEmbeddings(torch.randn(1, 7, 48))
    negative = PromptEmbeddings(torch.randn(1, 2, 48))
    out = sample(recording, condition, positive, negative, layer_count=2, steps=2, seed=3)
    assert [(b, m) for b, m in calls] == [(1, None)] * 4

    # the same step done as one padded batch with a mask
    latents = initial_noise(1, 2, 4, 6, seed=3)
    text = torch.cat([positive.embeddings, torch.cat([negative.embeddings, torch.zeros(1, 5, 48)], 1)])
    mask = torch.tensor([[True] * 7, [True] * 2 + [False] * 5])
    schedule = sigmas(2, schedule_shift(6))
    x = latents
    for i in range(2):
        with torch.no_grad():
            both = model(torch.cat([x, x]), torch.cat([condition, condition]), text, schedule[i].repeat(2), mask)
        x = x + (schedule[i + 1] - schedule[i]) * guided_velocity(both[:1], both[1:], 4.0, True)
    assert torch.allclose(out, x, atol=1e-5)


def test_no_uncond_pass_without_guidance():
    model = RecordingModel()
    condition = torch.randn(1, 16, 4, 6)
    sample(model, condition, conditioning(1, 5, 1.0), conditioning(1, 2, -1.0), layer_count=1, steps=3, cfg_scale=1.0)
    assert [c[0] for c in model.calls] == [1, 1, 1]


def test_euler_steps_follow_the_schedule():
    # velocity = 0: latents never move; velocity = x: x_{i+1} = x_i (1 + s_{i+1} - s_i)
    condition = torch.zeros(1, 16, 2, 2)
    prompt = conditioning(1, 2, 0.0)
    noise = initial_noise(1, 1, 2, 2, seed=3)
    out = sample(lambda x, c, t, s, m: x, condition, prompt, None, layer_count=1, steps=5, noise=noise)
    schedule = sigmas(5, schedule_shift(1))
    factor = torch.prod(1 + schedule[1:] - schedule[:-1])
    assert torch.allclose(out, noise * factor, rtol=1e-5)


def test_cfg_normalize_keeps_the_conditional_norm_per_token():
    cond, uncond = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    plain = guided_velocity(cond, uncond, 4.0, normalize=False)
    assert torch.allclose(plain, uncond + 4.0 * (cond - uncond))
    normalized = guided_velocity(cond, uncond, 4.0, normalize=True)
    assert torch.allclose(pack_latents(normalized).norm(dim=-1), pack_latents(cond).norm(dim=-1), rtol=1e-5)
    direction = pack_latents(normalized) / pack_latents(plain)
    assert torch.allclose(direction, direction[..., :1].expand_as(direction), rtol=1e-4)  # same direction


def test_seeded_noise_matches_reference_order():
    from diffusers.utils.torch_utils import randn_tensor

    ours = initial_noise(2, 3, 4, 6, seed=11)
    theirs = randn_tensor((2, 4, 16, 4, 6), generator=torch.Generator().manual_seed(11))
    assert torch.equal(ours, theirs.permute(0, 2, 1, 3, 4))
    assert torch.equal(ours, initial_noise(2, 3, 4, 6, seed=11))
    assert not torch.equal(ours, initial_noise(2, 3, 4, 6, seed=12))


@pytest.mark.parametrize("layers", [0, 21, -1, 2.5, "4"])
def test_impossible_layer_counts(layers):
    with pytest.raises(ValueError, match="layer count must be an integer from 1 to 20"):
        sample(RecordingModel(), torch.zeros(1, 16, 2, 2), conditioning(1, 2, 0.0), None, layer_count=layers, steps=1)


def test_callback_cancels_within_one_step():
    model = RecordingModel()
    seen = []

    def callback(info):
        seen.append(info.step)
        assert info.denoised.shape == info.latents.shape
        return info.step < 2  # ask to stop after the third step

    with pytest.raises(Cancelled, match="after step 3 of 10"):
        sample(
            model, torch.zeros(1, 16, 2, 2), conditioning(1, 2, 0.0), None, layer_count=1, steps=10, callback=callback
        )
    assert seen == [0, 1, 2] and len(model.calls) == 3


def test_bad_condition_shapes():
    with pytest.raises(ValueError, match="condition latent must be"):
        sample(RecordingModel(), torch.zeros(1, 4, 2, 2), conditioning(1, 2, 0.0), None, layer_count=1)
    with pytest.raises(ValueError, match="must be even"):
        sample(RecordingModel(), torch.zeros(1, 16, 3, 2), conditioning(1, 2, 0.0), None, layer_count=1)
