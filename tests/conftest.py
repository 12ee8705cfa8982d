"""Shared fixtures: tiny random reference models from diffusers, the test oracle."""

from __future__ import annotations

import pytest
import torch

from layered_core.mmdit import MMDiTConfig
from layered_core.tiny_models import randomize_

torch.set_num_threads(max(1, torch.get_num_threads()))


def reference_transformer(config: MMDiTConfig, seed: int = 0):
    """diffusers' QwenImageTransformer2DModel configured as Qwen-Image-Layered, random weights."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.text_dim,
        axes_dims_rope=config.axes_dims,
        use_additional_t_cond=True,
        use_layer3d_rope=True,
    )
    return randomize_(model, seed).eval()


@pytest.fixture(scope="session")
def tiny_config() -> MMDiTConfig:
    return MMDiTConfig.tiny()


@pytest.fixture(scope="session")
def tiny_reference(tiny_config):
    return reference_transformer(tiny_config)
