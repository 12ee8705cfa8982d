"""The greedy caption decoder against transformers' generate, token for token, on tiny float32 Qwen2.5-VL models."""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from layered_core import caption
from layered_core.caption import STEP_GRAPHS, GreedyDecoder
from layered_core.caption_settings import GreedyDecoderUnavailable, greedy_settings
from layered_core.caption_step import (
    LayerShape,
    LayerWeights,
    StepWeights,
    attend,
    attention_inputs,
    decode_hidden,
    head_scores,
    layer_output,
    penalize,
    rms_norm,
    select_next,
    whole_step,
)
from layered_core.text import PromptEncoder
from layered_core.tiny_models import tiny_text_encoder_set

FALLBACK = "captioning through transformers' generate"


@pytest.fixture(scope="module")
def encoder():
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=48, seed=0)
    return PromptEncoder(model, tokenizer, image_processor)


@pytest.fixture(params=STEP_GRAPHS)
def step_graph(request, encoder):
    """Each step mode in turn, as the decoder the encoder captions with."""
    encoder._decoder = GreedyDecoder(encoder.model, step_graph=request.param)
    yield request.param
    encoder._decoder = None


def noise(seed: int, size=(64, 64), mode="RGB") -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def generate_tokens(model, inputs, config) -> torch.Tensor:
    return model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]


def assert_fast_path_equals_generate(encoder, inputs, config, caplog) -> torch.Tensor:
    """The encoder's tokens, checked equal to generate's and to have come from the greedy decoder."""
    expected = generate_tokens(encoder.model, inputs, config)
    with caplog.at_level(logging.INFO, logger="layered_core.text"):
        caplog.clear()
        tokens = encoder.caption_tokens(inputs, config)
    assert FALLBACK not in caplog.text
    assert tokens.tolist() == expected.tolist()
    return tokens


@pytest.mark.parametrize(
    ("seed", "size", "mode", "language", "max_new_tokens"),
    [
        (0, (64, 64), "RGB", "en", 1),
        (1, (80, 48), "RGBA", "zh", 17),
        (2, (112, 56), "RGB", "en", 33),
        (3, (56, 112), "RGB", "zh", 64),
    ],
    ids=["one-token", "zh-17", "wide-33", "tall-64"],
)
def test_tokens_equal_generate_to_the_limit(encoder, step_graph, caplog, seed, size, mode, language, max_new_tokens):
    inputs = encoder.caption_inputs(noise(seed, size, mode), language)
    tokens = assert_fast_path_equals_generate(encoder, inputs, encoder.greedy_config(max_new_tokens), caplog)
    # the random model never picks an end token: every run goes to the limit
    assert len(tokens) == max_new_tokens
    assert encoder._decoder._buffers.step_graph == step_graph


def test_a_prompt_without_an_image_like_generate(encoder, step_graph, caplog):
    tokens = encoder.tokenizer("a poster with a red title and a cat on a sofa", return_tensors="pt")
    inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
    assert encoder.model.config.image_token_id not in inputs["input_ids"][0].tolist()
    # after a caption of an image, whose rotary offset the text-only prompt must not inherit
    assert_fast_path_equals_generate(encoder, encoder.caption_inputs(noise(21)), encoder.greedy_config(8), caplog)
    config = encoder.greedy_config(24)
    config.repetition_penalty = 1.3
    assert len(assert_fast_path_equals_generate(encoder, inputs, config, caplog)) == 24


def test_tokens_equal_generate_in_bfloat16(caplog):
    """In pieces the attention is transformers' own call over the same keys, so even bf16 rounding gives generate's
    tokens. (The whole step, whose attention covers the whole cache behind a mask, parts from generate on image 15
    of this model.)"""
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=64, seed=2)
    encoder = PromptEncoder(model.to(torch.bfloat16), tokenizer, image_processor)
    encoder._decoder = GreedyDecoder(encoder.model, step_graph="pieces")
    for seed in (14, 15):
        inputs = encoder.caption_inputs(noise(seed, (112, 84)))
        tokens = assert_fast_path_equals_generate(encoder, inputs, encoder.greedy_config(48), caplog)
        assert len(tokens) >= 40  # long enough for rounding to have had its chances


@pytest.mark.parametrize("end_index", [0, 5, 16, 23])
def test_stops_at_the_first_end_token_like_generate(encoder, step_graph, caplog, end_index):
    inputs = encoder.caption_inputs(noise(4))
    free_run = generate_tokens(encoder.model, inputs, encoder.greedy_config(40))
    config = encoder.greedy_config(40)
    # the token the model picks at end_index becomes the end token: generate stops at its first appearance
    end_token = int(free_run[end_index])
    never_picked = next(t for t in range(len(encoder.tokenizer)) if t not in free_run.tolist())
    config.eos_token_id = [never_picked, end_token]
    tokens = assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    first = free_run.tolist().index(end_token)
    assert len(tokens) == first + 1 and int(tokens[-1]) == end_token


@pytest.mark.parametrize("check_every", [1, 4, 7])
@pytest.mark.parametrize("step_graph", STEP_GRAPHS)
def test_end_token_inside_a_block_of_steps(encoder, check_every, step_graph):
    """Steps run past the end token up to the next look; none of their tokens is returned."""
    inputs = encoder.caption_inputs(noise(5))
    free_run = generate_tokens(encoder.model, inputs, encoder.greedy_config(30))
    config = encoder.greedy_config(30)
    config.eos_token_id = int(free_run[9])
    expected = generate_tokens(encoder.model, inputs, config)
    decoder = GreedyDecoder(encoder.model, check_every=check_every, step_graph=step_graph)
    tokens = decoder.generate(inputs, greedy_settings(encoder.model, config, inputs))
    assert tokens.tolist() == expected.tolist()
    assert len(tokens) <= 10


@pytest.mark.parametrize("step_graph", STEP_GRAPHS)
def test_compiled_step_gives_the_same_tokens(encoder, monkeypatch, step_graph):
    # aot_eager traces and functionalises the step as inductor would (no graph break allowed), without a C++ build
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    inputs = encoder.caption_inputs(noise(13))
    config = encoder.greedy_config(20)
    config.eos_token_id = int(generate_tokens(encoder.model, inputs, config)[14])
    expected = generate_tokens(encoder.model, inputs, config)
    decoder = GreedyDecoder(encoder.model, check_every=4, compile_step=True, step_graph=step_graph)
    assert decoder.generate(inputs, greedy_settings(encoder.model, config, inputs)).tolist() == expected.tolist()
    assert len(expected) <= 15


def test_min_new_tokens_holds_off_the_end_token_like_generate(encoder, step_graph, caplog):
    inputs = encoder.caption_inputs(noise(6))
    free_run = generate_tokens(encoder.model, inputs, encoder.greedy_config(24))
    config = encoder.greedy_config(24)
    config.eos_token_id = int(free_run[3])
    config.min_new_tokens = 12
    tokens = assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    assert 12 < len(tokens) <= 24
    config.min_new_tokens = 24  # what the benchmark does to force every token
    tokens = assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    assert len(tokens) == 24
    # min_length counts the prompt
    config.min_new_tokens = None
    config.min_length = inputs["input_ids"].shape[1] + 8
    assert greedy_settings(encoder.model, config, inputs).min_new_tokens == 8
    tokens = assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    assert len(tokens) > 8


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_other_repetition_penalties_like_generate(encoder, step_graph, caplog, penalty):
    inputs = encoder.caption_inputs(noise(7))
    config = encoder.greedy_config(32)
    config.repetition_penalty = penalty
    tokens = assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    config.repetition_penalty = 1.05
    # the penalty decides tokens here, so the equality above is not reached by ignoring it
    assert tokens.tolist() != generate_tokens(encoder.model, inputs, config).tolist()


def test_cache_and_state_reused_across_captions(encoder, step_graph, caplog, monkeypatch):
    monkeypatch.setattr(caption, "CACHE_GRANULE", 128)  # a rebuild within a hundred tokens
    small, large = encoder.caption_inputs(noise(8)), encoder.caption_inputs(noise(9, (112, 112)))
    config = encoder.greedy_config(20)
    first = assert_fast_path_equals_generate(encoder, small, config, caplog)
    buffers = encoder._decoder._buffers
    assert large["input_ids"].shape[1] + 20 <= buffers.capacity
    assert_fast_path_equals_generate(encoder, large, config, caplog)
    assert encoder._decoder._buffers is buffers  # both fit one cache: nothing is rebuilt
    # nothing of the previous caption leaks into the next one (seen tokens, positions, end tokens)
    assert encoder.caption_tokens(small, config).tolist() == first.tolist()
    longer = encoder.greedy_config(buffers.capacity - small["input_ids"].shape[1] + 1)
    assert_fast_path_equals_generate(encoder, small, longer, caplog)
    assert encoder._decoder._buffers.capacity == buffers.capacity + 128


@pytest.mark.parametrize("step_graph", STEP_GRAPHS)
def test_weights_that_moved_get_a_new_cache(caplog, step_graph):
    model, tokenizer, image_processor = tiny_text_encoder_set(hidden_size=48, seed=3)
    encoder = PromptEncoder(model, tokenizer, image_processor)
    encoder._decoder = GreedyDecoder(model, step_graph=step_graph)
    inputs = encoder.caption_inputs(noise(10))
    config = encoder.greedy_config(12)
    assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    buffers = encoder._decoder._buffers
    model.to(torch.float64)  # new tensors: what a move between devices does too
    inputs = {name: value.double() if value.is_floating_point() else value for name, value in inputs.items()}
    assert_fast_path_equals_generate(encoder, inputs, config, caplog)
    assert encoder._decoder._buffers is not buffers
    assert encoder._decoder._buffers.state.keys[0].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_layer_are_the_models_own_arithmetic(encoder, dtype):
    layer = copy.deepcopy(encoder.model.model.language_model.layers[0]).to(dtype)
    hidden = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    norm = layer.input_layernorm
    assert torch.equal(rms_norm(hidden, norm.weight, norm.variance_epsilon), norm(hidden))
    mlp_input = rms_norm(hidden, layer.post_attention_layernorm.weight, norm.variance_epsilon)
    weights = LayerWeights.of(layer, dtype)
    mlp = F.linear(F.silu(F.linear(mlp_input, weights.gate)) * F.linear(mlp_input, weights.up), weights.down)
    assert torch.equal(mlp, layer.mlp(layer.post_attention_layernorm(hidden)))


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """Every element within ``relative`` times the largest magnitude of ``expected``."""
    difference = float((actual - expected).abs().max())
    assert difference <= relative * float(expected.abs().max()), difference


@torch.inference_mode()  # the decoder's buffers are inference tensors
def test_whole_step_equals_the_pieces_in_float32(encoder):
    """One whole step (attention over the whole cache behind the mask, rotary tables per slot) against the pieces
    (transformers' attention over the cached length, rotary of the one position), on a cache whose slots after the
    position hold garbage: the hidden state, the logits, the cache written and the token picked."""
    model = encoder.model
    inputs = encoder.caption_inputs(noise(20))
    decoder = GreedyDecoder(model, step_graph="whole")
    settings = greedy_settings(model, encoder.greedy_config(5), inputs)
    decoder.generate(inputs, settings)
    buffers = decoder._buffers
    state = buffers.state
    position = int(state.position)
    assert position == inputs["input_ids"].shape[1] + 4 and int(buffers.rope_delta) != 0
    gen = torch.Generator().manual_seed(1)
    for cache in (*state.keys, *state.values):
        cache[:, :, position:] = 10 * torch.randn(cache[:, :, position:].shape, generator=gen)
    pieces_cache = [cache.clone() for cache in (*state.keys, *state.values)]
    weights, shape = StepWeights.of(model), LayerShape.of(model)
    layer_count = len(weights.layers)

    hidden = F.embedding(state.picks.token, weights.embed)
    rotary_position = (state.position + buffers.rope_delta).view(1, 1, 1).expand(3, 1, 1)
    rope = model.model.language_model.rotary_emb(hidden, rotary_position)
    for index, layer in enumerate(weights.layers):
        keys, values = pieces_cache[index], pieces_cache[layer_count + index]
        query = attention_inputs(hidden, rope, state.position, keys, values, layer, shape)
        hidden = layer_output(hidden, attend(query, keys, values, position + 1, shape.scaling), layer, shape)
    scores = head_scores(hidden, weights, shape.eps)

    whole = decode_hidden(state, weights, shape)
    # the attentions differ in their float32 summation order only; the random layers amplify that a few times
    assert_close_to_scale(whole, hidden, 2e-6)
    assert_close_to_scale(head_scores(whole, weights, shape.eps), scores, 2e-6)
    for cache, expected in zip((*state.keys, *state.values), pieces_cache, strict=True):
        assert_close_to_scale(cache[:, :, : position + 1], expected[:, :, : position + 1], 2e-6)
    # the first layer's key and value come before any attention: the same arithmetic, the same bits
    assert torch.equal(state.keys[0][:, :, position], pieces_cache[0][:, :, position])
    assert torch.equal(state.values[0][:, :, position], pieces_cache[layer_count][:, :, position])

    seen = state.picks.seen.clone()
    whole_step(state, weights, shape, settings.repetition_penalty)
    nothing_banned = torch.zeros_like(state.picks.eos)
    assert int(state.picks.out[5]) == int(select_next(scores, seen, nothing_banned, settings.repetition_penalty))
    assert int(state.position) == position + 1 and int(state.picks.count) == 6


def test_step_graph_is_whole_where_cuda_graphs_run(encoder):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert GreedyDecoder(encoder.model).step_graph_for(cuda) == "whole"
    assert GreedyDecoder(encoder.model).step_graph_for(cpu) == "pieces"
    assert GreedyDecoder(encoder.model, cuda_graph=False).step_graph_for(cuda) == "pieces"
    assert GreedyDecoder(encoder.model, step_graph="whole").step_graph_for(cpu) == "whole"
    assert GreedyDecoder(encoder.model, step_graph="pieces").step_graph_for(cuda) == "pieces"
    with pytest.raises(ValueError, match="step_graph must be one of"):
        GreedyDecoder(encoder.model, step_graph="one")
    with pytest.raises(ValueError, match="check_every must be at least 1, got 0"):
        GreedyDecoder(encoder.model, check_every=0)


def test_penalty_equals_transformers_processor():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 300, generator=gen) * 5
    input_ids = torch.randint(0, 300, (2, 40), generator=gen)  # with repeats
    seen = torch.zeros(2, 300, dtype=torch.bool).scatter_(1, input_ids, True)
    for penalty in (1.05, 1.5, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone())
        assert torch.equal(penalize(scores, seen, penalty), expected)
    assert penalize(scores, seen, 1.0) is scores


def test_select_next_bans_then_takes_the_first_maximum():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 4.0]])
    seen = torch.tensor([[False, False, False, False, True]])
    nothing = torch.zeros(5, dtype=torch.bool)
    assert select_next(scores, seen, nothing, 1.0).tolist() == [4]
    # 4 / 1.5 < 3: the seen token loses; of two equal maxima the first wins, as torch.argmax in generate
    assert select_next(scores, seen, nothing, 1.5).tolist() == [1]
    banned = torch.tensor([False, True, True, False, True])
    assert select_next(scores, seen, banned, 1.0).tolist() == [3]


def test_settings_that_go_through_generate(encoder, caplog):
    image = noise(11)
    inputs = encoder.caption_inputs(image)
    greedy = encoder.greedy_config(8)
    for name, value in [("do_sample", True), ("num_beams", 2), ("no_repeat_ngram_size", 3), ("suppress_tokens", [5])]:
        config = copy.deepcopy(greedy)
        setattr(config, name, value)
        with pytest.raises(GreedyDecoderUnavailable, match=f"generation setting {name}="):
            greedy_settings(encoder.model, config, inputs)
    no_limit = copy.deepcopy(greedy)
    no_limit.max_new_tokens = None
    with pytest.raises(GreedyDecoderUnavailable, match="max_new_tokens=None"):
        greedy_settings(encoder.model, no_limit, inputs)

    # taken through generate, said in the log, with generate's tokens
    config = copy.deepcopy(greedy)
    config.no_repeat_ngram_size = 2
    with caplog.at_level(logging.INFO, logger="layered_core.text"):
        caplog.clear()
        tokens = encoder.caption_tokens(inputs, config)
    assert f"{FALLBACK}: generation setting no_repeat_ngram_size=2" in caplog.text
    assert tokens.tolist() == generate_tokens(encoder.model, inputs, config).tolist()


def test_inputs_and_models_that_go_through_generate(encoder, caplog):
    inputs = encoder.caption_inputs(noise(12))
    config = encoder.greedy_config(8)
    two = {name: torch.cat([value, value]) for name, value in inputs.items()}
    with pytest.raises(GreedyDecoderUnavailable, match="only one prompt at a time"):
        greedy_settings(encoder.model, config, two)
    padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(GreedyDecoderUnavailable, match="padding"):
        greedy_settings(encoder.model, config, padded)
    with pytest.raises(GreedyDecoderUnavailable, match="not a Qwen2_5_VLForConditionalGeneration"):
        greedy_settings(encoder.model.model, config, inputs)

    wrapped = copy.deepcopy(encoder.model)
    # what a LoRA or a quantisation wrapper looks like to the decoder: a projection it cannot reduce to its weights
    wrapped.model.language_model.layers[1].mlp.up_proj = torch.nn.Sequential(
        wrapped.model.language_model.layers[1].mlp.up_proj
    )
    refused = r"layer 1 has a linear layer that is not torch.nn.Linear or FP8Linear \(Sequential\)"
    with pytest.raises(GreedyDecoderUnavailable, match=refused):
        greedy_settings(wrapped, config, inputs)
    wrapped = copy.deepcopy(encoder.model)
    wrapped.model.language_model.embed_tokens = torch.nn.Sequential(wrapped.model.language_model.embed_tokens)
    with pytest.raises(GreedyDecoderUnavailable, match="the token embedding is a Sequential"):
        greedy_settings(wrapped, config, inputs)

    encoder.model.train()
    try:
        with pytest.raises(GreedyDecoderUnavailable, match="training mode"):
            greedy_settings(encoder.model, config, inputs)
    finally:
        encoder.model.eval()

    off = PromptEncoder(encoder.model, encoder.tokenizer, encoder.image_processor, fast_caption=False)
    with caplog.at_level(logging.INFO, logger="layered_core.text"):
        caplog.clear()
        caption = off.caption(noise(12), max_new_tokens=8)
    assert f"{FALLBACK}: fast_caption is off" in caplog.text and off._decoder is None
    assert caption == encoder.caption(noise(12), max_new_tokens=8)
