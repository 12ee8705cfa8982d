"""A transformer block as a function of its weights: the block's own output from the weights handed over, for
full-precision and fp8 layers, and clear refusals of a layout the block does not have."""

from __future__ import annotations

import pytest
import torch

from layered_core.functional_block import block_layers, block_template, call_block
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.ops import FP8Linear, quantize_linears_fp8
from layered_core.tiny_models import randomize_

CONFIG = MMDiTConfig.tiny()


def _streams(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dim, text, image = CONFIG.hidden_size, 5, 12
    img = torch.randn(2, image, dim, generator=generator)
    txt = torch.randn(2, text, dim, generator=generator)
    temb = torch.randn(2, dim, generator=generator)
    pe = torch.randn(text + image, 1, CONFIG.head_dim // 2, 2, generator=generator)
    return img, txt, temb, pe


def _model() -> VLDMMDiT:
    return randomize_(VLDMMDiT(CONFIG), seed=3).eval().requires_grad_(False)


def test_the_block_on_its_handed_weights_is_the_block():
    model = _model()
    img, txt, temb, pe = _streams()
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, :2] = False  # the second sample's prompt is padded
    template = block_template(CONFIG)
    for block in model.transformer_blocks:
        weights = block.state_dict()
        for given_mask in (None, mask):
            expected = block(img, txt, temb, pe, given_mask)
            handed = call_block(template, weights, img, txt, temb, pe, given_mask)
            assert all(torch.equal(a, b) for a, b in zip(handed, expected, strict=True))
    # the template keeps no weights of its own: it stays on the meta device
    assert {p.device.type for p in template.parameters()} == {"meta"}


def test_fp8_layers_run_as_the_quantized_model_runs_them():
    model = _model()
    converted = quantize_linears_fp8(model)
    block = model.transformer_blocks[1]
    fp8 = frozenset((name.removeprefix("transformer_blocks.1."), "auto") for name in converted if ".1." in name)
    assert {name for name, _ in fp8} == {n for n, kind in block_layers(CONFIG).items() if kind == "linear"}
    template = block_template(CONFIG, fp8)
    assert isinstance(template.attn.to_q, FP8Linear) and not isinstance(template.attn.norm_q, FP8Linear)
    img, txt, temb, pe = _streams(1)
    expected = block(img, txt, temb, pe)
    handed = call_block(template, block.state_dict(), img, txt, temb, pe, None)
    assert all(torch.equal(a, b) for a, b in zip(handed, expected, strict=True))
    # one template per layout, shared by the blocks that have it
    assert block_template(CONFIG, fp8) is template and block_template(CONFIG) is not template


def test_a_missing_weight_and_a_layout_the_block_has_not_are_refused():
    block = _model().transformer_blocks[0]
    weights = {k: v for k, v in block.state_dict().items() if k != "attn.to_k.bias"}
    with pytest.raises(RuntimeError, match=r"attn\.to_k\.bias"):
        call_block(block_template(CONFIG), weights, *_streams())
    with pytest.raises(ValueError, match=r"'attn\.norm_q' is not a linear of the block"):
        block_template(CONFIG, frozenset({("attn.norm_q", "auto")}))
    with pytest.raises(ValueError, match=r"attn\.to_q: FP8Linear compute must be one of auto, fp8, dequantize"):
        block_template(CONFIG, frozenset({("attn.to_q", "int4")}))


def test_block_layers_name_every_weight_of_a_block():
    block = _model().transformer_blocks[0]
    layers = block_layers(CONFIG)
    assert {key.rpartition(".")[0] for key in block.state_dict()} == set(layers)
    assert {name for name, kind in layers.items() if kind == "norm"} == {
        "attn.norm_q",
        "attn.norm_k",
        "attn.norm_added_q",
        "attn.norm_added_k",
    }
