"""Memory estimates and the residency plan: how many blocks fit resident under a VRAM budget."""

from __future__ import annotations

import pytest
import torch

from layered_core.memory import (
    ACTIVATION_BYTES_PER_ELEMENT,
    VAE_DECODE_BYTES_PER_PIXEL,
    WORKSPACE_RESERVE,
    GiB,
    activation_bytes,
    plan_residency,
    resident_positions,
    tensor_bytes,
    vae_activation_bytes,
)
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.vae import RGBAVAE, VAEConfig

from .test_offload import fp8_model, tiny_model


def test_plan_takes_the_most_blocks_that_fit():
    blocks, other, activations, reserve = [GiB] * 6, GiB // 2, 3 * GiB // 4, GiB // 4  # fixed part 1.5 GiB
    plan = plan_residency(blocks, other, int(7.5 * GiB), activations, slots=2, reserve=reserve)
    assert (plan.resident_blocks, plan.streamed_blocks, plan.slots, plan.slot_bytes) == (6, 0, 0, 0)
    assert plan.device_bytes == int(7.5 * GiB)
    # one byte less: no longer all of them, and 2 slots to pay for -> 1.5 + K + 2 <= 7.49
    plan = plan_residency(blocks, other, int(7.5 * GiB) - 1, activations, slots=2, reserve=reserve)
    assert (plan.resident_blocks, plan.streamed_blocks, plan.slots, plan.slot_bytes) == (3, 3, 2, 2 * GiB)
    plan = plan_residency(blocks, other, int(3.5 * GiB), activations, slots=2, reserve=reserve)
    assert (plan.resident_blocks, plan.streamed_blocks) == (0, 6)
    plan = plan_residency(blocks, other, int(3.5 * GiB), activations, slots=1, reserve=reserve)
    assert (plan.resident_blocks, plan.slots) == (1, 1)
    with pytest.raises(ValueError, match=r"VRAM budget 3\.40 GiB is too small: .* at least 3\.50 GiB \(2 block slots"):
        plan_residency(blocks, other, int(3.4 * GiB), activations, slots=2, reserve=reserve)
    # a slot is as large as the largest streamed block; resident blocks (one of three: the middle one) do not count
    plan = plan_residency([GiB, GiB, 2 * GiB], 0, int(3.5 * GiB), 0, slots=1, reserve=0)
    assert (plan.resident_indices, plan.resident_bytes, plan.slot_bytes) == ((1,), GiB, 2 * GiB)
    plan = plan_residency([GiB, 2 * GiB, GiB], 0, int(3.5 * GiB), 0, slots=1, reserve=0)
    assert (plan.resident_indices, plan.resident_bytes, plan.slot_bytes) == ((1,), 2 * GiB, GiB)


def test_resident_blocks_are_spread_through_the_forward():
    assert resident_positions(60, 8) == (3, 11, 18, 26, 33, 41, 48, 56)
    assert resident_positions(5, 2) == (1, 3) and resident_positions(5, 0) == ()
    for count in (1, 5, 60):
        assert resident_positions(count, count) == tuple(range(count))
        for resident in range(1, count + 1):
            positions = resident_positions(count, resident)
            assert len(set(positions)) == resident and list(positions) == sorted(positions)
            # the runs of streamed blocks between them differ by at most one block; the two ends make about one
            runs = [b - a - 1 for a, b in zip((-1, *positions), (*positions, count), strict=True)]
            between = runs[1:-1]
            assert not between or max(between) - min(between) <= 1
            assert runs[0] + runs[-1] <= max(between, default=count) + 1
    with pytest.raises(ValueError, match=r"resident blocks must be 0\.\.5, got 6"):
        resident_positions(5, 6)


def test_full_size_plans_at_24_and_16_gib():
    """The numbers the H100 run checks: the full model in bf16 at 640 px, 4 layers, 256 text tokens,
    cond and uncond as one batch of 2."""
    with torch.device("meta"):
        model = VLDMMDiT(MMDiTConfig.full(), dtype=torch.bfloat16)
    blocks = [tensor_bytes(block) for block in model.transformer_blocks]
    other = tensor_bytes(model) - sum(blocks)
    assert blocks[0] == 679_662_592 and len(set(blocks)) == 1  # 0.633 GiB a block
    assert other == 81_058_944
    activations = activation_bytes(model, image_tokens=6 * 40 * 40, text_tokens=256, batch=2)
    assert activations == ACTIVATION_BYTES_PER_ELEMENT * 2 * 9856 * 3072 == 2_906_652_672  # 2.71 GiB
    plans = {gb: plan_residency(blocks, other, gb * GiB, activations, slots=2) for gb in (80, 40, 24, 16, 8)}
    assert {gb: (p.resident_blocks, p.streamed_blocks) for gb, p in plans.items()} == {
        80: (60, 0),
        40: (54, 6),
        24: (29, 31),
        16: (16, 44),
        8: (3, 57),
    }
    assert all(p.device_bytes <= p.budget for p in plans.values())
    with pytest.raises(ValueError, match=r"VRAM budget 5\.00 GiB is too small: .* at least 5\.55 GiB"):
        plan_residency(blocks, other, 5 * GiB, activations, slots=2)
    assert WORKSPACE_RESERVE == 1.5 * GiB


def test_activation_estimate_covers_the_fp8_dequantised_weight(tmp_path):
    plain, fp8 = tiny_model(), fp8_model(tmp_path)
    tokens = dict(image_tokens=100, text_tokens=10, batch=2)
    assert activation_bytes(plain, **tokens) == ACTIVATION_BYTES_PER_ELEMENT * 2 * 110 * 64
    assert activation_bytes(fp8, **tokens) == activation_bytes(plain, **tokens) + 10 * 64 * 384  # img_mod, the largest
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        activation_bytes(plain, 100, 10, 0)


def test_vae_estimate_grows_with_pixels_frames_and_weight_size():
    vae = RGBAVAE(VAEConfig.tiny())
    assert vae_activation_bytes(vae, 2, 4, 6) == 2 * (4 * 8) * (6 * 8) * VAE_DECODE_BYTES_PER_PIXEL * 4  # float32
    assert vae_activation_bytes(vae.to(torch.bfloat16), 2, 4, 6) == vae_activation_bytes(vae.float(), 2, 4, 6) // 2
