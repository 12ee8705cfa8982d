"""The whole step's fused projections: the model's own Parameters become views of them (no second copy), the model's
forward and generate give what they gave before, and the fused step computes what the unfused one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.caption import GreedyDecoder
from layered_core.caption_fusion import contiguous_rows, fuse_rows
from layered_core.caption_settings import GreedyDecoderUnavailable, greedy_settings, mlp_linears
from layered_core.caption_step import FusedLayerWeights, LayerShape, LayerWeights, StepWeights, decode_hidden
from layered_core.text import PromptEncoder
from layered_core.tiny_models import tiny_text_encoder_set


def noise(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def fused_groups(model) -> list[tuple[torch.Tensor, ...]]:
    """Per layer the parts each fused tensor is made of: q/k/v weights, q/k/v biases, gate/up weights."""
    groups = []
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        gate, up, _ = mlp_linears(layer.mlp)
        groups += [(q.weight, k.weight, v.weight), (q.bias, k.bias, v.bias), (gate.weight, up.weight)]
    return groups


def storage_bytes(model) -> int:
    """Bytes of the distinct storages the model's Parameters live in."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.fixture
def encoder():
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=48, seed=4)
    return PromptEncoder(model, tokenizer, image_processor)


@torch.inference_mode()
def test_fusion_keeps_the_model_and_its_memory(encoder):
    model = encoder.model
    inputs = encoder.caption_inputs(noise(30))
    config = encoder.greedy_config(24)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(contiguous_rows(parts) is None for parts in fused_groups(model))  # separate tensors before
    logits = model(**inputs).logits
    expected = model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]

    decoder = GreedyDecoder(model, step_graph="whole")
    tokens = decoder.generate(inputs, greedy_settings(model, config, inputs))
    assert tokens.tolist() == expected.tolist()
    # every group is now one tensor whose rows the Parameters are, with the values they had, in no more memory
    for parts in fused_groups(model):
        fused = contiguous_rows(parts)
        assert fused is not None and fused.untyped_storage().data_ptr() == parts[0].untyped_storage().data_ptr()
        assert torch.equal(fused, torch.cat(parts))
        assert fused.untyped_storage().nbytes() == fused.numel() * fused.element_size()
    assert storage_bytes(model) == parameter_bytes
    assert decoder._weights is None  # nothing kept between calls that could outlive the model's own tensors
    assert all(isinstance(p, torch.nn.Parameter) and not p.is_inference() for p in model.parameters())

    # the model's own forward and generate on the fused storage: what they gave before
    assert torch.equal(model(**inputs).logits, logits)
    after = model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
    assert after.tolist() == expected.tolist()

    # fused once: the next call finds the views in place and reuses cache and graphs
    pointers = [p.data_ptr() for p in model.parameters()]
    buffers = decoder._buffers
    assert decoder.generate(inputs, greedy_settings(model, config, inputs)).tolist() == expected.tolist()
    assert [p.data_ptr() for p in model.parameters()] == pointers and decoder._buffers is buffers


@torch.inference_mode()
def test_weights_moved_after_fusion_are_fused_again(encoder):
    model = encoder.model
    inputs = encoder.caption_inputs(noise(31))
    config = encoder.greedy_config(12)
    decoder = GreedyDecoder(model, step_graph="whole")
    decoder.generate(inputs, greedy_settings(model, config, inputs))
    model.to(torch.float64)  # a tensor of its own for every Parameter: the views are gone
    assert all(contiguous_rows(parts) is None for parts in fused_groups(model))
    inputs = {name: value.double() if value.is_floating_point() else value for name, value in inputs.items()}
    expected = model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
    assert decoder.generate(inputs, greedy_settings(model, config, inputs)).tolist() == expected.tolist()
    for parts in fused_groups(model):
        fused = contiguous_rows(parts)
        assert fused is not None and fused.dtype == torch.float64
    assert storage_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_pieces_leave_the_weights_apart(encoder):
    inputs = encoder.caption_inputs(noise(32))
    config = encoder.greedy_config(8)
    GreedyDecoder(encoder.model, step_graph="pieces").generate(inputs, greedy_settings(encoder.model, config, inputs))
    assert all(contiguous_rows(parts) is None for parts in fused_groups(encoder.model))


@torch.inference_mode()
def test_fused_step_equals_the_unfused_step(encoder):
    """The same step, one matrix-vector product per fused group against one per projection: the same hidden state
    and cache in float32 (each output element is the same dot product)."""
    model = encoder.model
    inputs = encoder.caption_inputs(noise(33))
    decoder = GreedyDecoder(model, step_graph="whole")
    decoder.generate(inputs, greedy_settings(model, encoder.greedy_config(5), inputs))
    state, shape = decoder._buffers.state, LayerShape.of(model)
    caches = [cache.clone() for cache in (*state.keys, *state.values)]
    fused = StepWeights.of(model, fused=True)
    assert all(isinstance(layer, FusedLayerWeights) for layer in fused.layers)
    hidden = decode_hidden(state, fused, shape)
    fused_caches = [cache.clone() for cache in (*state.keys, *state.values)]
    for cache, saved in zip((*state.keys, *state.values), caches, strict=True):
        cache.copy_(saved)
    apart = StepWeights.of(model)
    assert all(isinstance(layer, LayerWeights) for layer in apart.layers)
    torch.testing.assert_close(decode_hidden(state, apart, shape), hidden, rtol=1e-6, atol=1e-6)
    for cache, expected in zip((*state.keys, *state.values), fused_caches, strict=True):
        torch.testing.assert_close(cache, expected, rtol=1e-6, atol=1e-6)


def test_fuse_rows_refuses_parts_of_different_dtypes():
    parts = (torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(1, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"cannot fuse a torch.float64 \(1, 3\) weight on cpu with a torch.float32"):
        fuse_rows(parts)
    ragged = (torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(1, 4)))
    with pytest.raises(ValueError, match="one dtype, device and row length"):
        fuse_rows(ragged)
    fused = fuse_rows((parts[0], torch.nn.Parameter(torch.full((1, 3), 2.0))))
    assert fused.tolist() == [[1.0] * 3, [1.0] * 3, [2.0] * 3]


def test_unfusable_projections_go_through_generate(encoder):
    model = encoder.model
    inputs = encoder.caption_inputs(noise(34))
    attention = model.model.language_model.layers[1].self_attn
    attention.v_proj.to(torch.float64)
    with pytest.raises(GreedyDecoderUnavailable, match="the projections cannot be fused: cannot fuse a torch.float64"):
        GreedyDecoder(model, step_graph="whole").generate(
            inputs, greedy_settings(model, encoder.greedy_config(4), inputs)
        )


def test_whole_step_in_bfloat16_keeps_a_bfloat16_cache():
    """The whole step's cache is generate's, in the model's dtype, and its attention (the fused kernel, float32
    inside) gives generate's tokens on these images of this model (other images part on near ties)."""
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=64, seed=2)
    encoder = PromptEncoder(model.to(torch.bfloat16), tokenizer, image_processor)
    decoder = GreedyDecoder(model, step_graph="whole")
    for seed in (10, 14):
        inputs = encoder.caption_inputs(noise(seed, (112, 84)))
        config = encoder.greedy_config(48)
        with torch.inference_mode():
            expected = model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
        assert decoder.generate(inputs, greedy_settings(model, config, inputs)).tolist() == expected.tolist()
    assert all(
        cache.dtype == torch.bfloat16 for cache in (*decoder._buffers.state.keys, *decoder._buffers.state.values)
    )
