"""The greedy caption decoder on a text encoder whose linears are kept in float8 (ComfyUI's fp8 file loaded with
``fp8="keep"``): generate's tokens on that same model, token for token, in float32 on a tiny random Qwen2.5-VL."""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from layered_core import caption_step, ops
from layered_core.caption import STEP_GRAPHS, GreedyDecoder
from layered_core.caption_settings import GreedyDecoderUnavailable, greedy_settings, layer_linears
from layered_core.caption_step import FP8Weight, FusedLayerWeights, LayerWeights, StepWeights
from layered_core.checkpoints.text_encoder import save_text_encoder_file
from layered_core.ops import FP8Linear, set_fp8_compute
from layered_core.text import PromptEncoder, load_text_encoder
from layered_core.tiny_models import tiny_text_encoder_set

FALLBACK = "captioning through transformers' generate"
LINEAR_FIELDS = ("q_weight", "k_weight", "v_weight", "o_weight", "gate", "up", "down")


def noise(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def generate_tokens(model, inputs, config) -> list[int]:
    with torch.inference_mode():
        return model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :].tolist()


def decoded(decoder: GreedyDecoder, inputs, config) -> list[int]:
    return decoder.generate(inputs, greedy_settings(decoder.model, config, inputs)).tolist()


@pytest.fixture(scope="module")
def original():
    return tiny_text_encoder_set(hidden_size=48, seed=0)


@pytest.fixture(scope="module")
def encoder(original, tmp_path_factory):
    """The tiny model written as ComfyUI's fp8 file (float32 beside the fp8 linears) and loaded as the pipeline loads
    that file by default, its linears kept in float8."""
    model, tokenizer, _ = original
    folder = tmp_path_factory.mktemp("fp8_text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    path = folder / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_text_encoder_file(model, path, fp8=True, dtype=torch.float32)
    return load_text_encoder(path, dtype=torch.float32, tokenizer_folder=folder / "tokenizer", fp8="keep")


@pytest.fixture
def model(encoder):
    """A copy of the fp8 model for a test that changes it."""
    return copy.deepcopy(encoder.model)


def test_every_layer_linear_is_fp8_and_the_step_multiplies_by_it(encoder):
    model = encoder.model
    layers = model.model.language_model.layers
    assert all(type(linear) is FP8Linear for layer in layers for linear in layer_linears(layer))
    for fused in (False, True):  # layers of fp8 linears stay apart in the whole step too
        weights = StepWeights.of(model, fused=fused)
        for layer, layer_weights in zip(layers, weights.layers, strict=True):
            assert type(layer_weights) is LayerWeights
            for linear, name in zip(layer_linears(layer), LINEAR_FIELDS, strict=True):
                weight = getattr(layer_weights, name)
                # the layer's own tensors, and the dequantising product FP8Linear runs on the CPU
                assert isinstance(weight, FP8Weight) and weight.weight is linear.weight
                assert weight.scale is linear.weight_scale and weight.weight.dtype == torch.float8_e4m3fn
                assert weight.fp8_matmul is False and weight.fast_accum is True
        assert weights.head is model.lm_head.weight and weights.head.dtype == torch.float32


def test_the_fp8_model_picks_other_tokens_than_full_precision(encoder, original):
    """What the tests below compare is the fp8 model's arithmetic: the same request gives other tokens in full
    precision."""
    inputs = encoder.caption_inputs(noise(13))
    config = encoder.greedy_config(24)
    config.min_new_tokens = 24
    assert generate_tokens(encoder.model, inputs, config) != generate_tokens(original[0], inputs, config)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("step_graph", STEP_GRAPHS)
def test_tokens_equal_generate_on_the_fp8_model(encoder, monkeypatch, step_graph, compiled):
    model = encoder.model
    products = []
    if compiled:
        # aot_eager traces and functionalises the step as inductor would (no graph break allowed), without a C++ build
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        torch._dynamo.reset()  # compilations of other tests' steps forgotten, so that this one's are counted
        counters.clear()
    else:  # the decoder's own fp8 products, counted (generate's go through FP8Linear.forward, not through this name)
        real = caption_step.fp8_linear
        monkeypatch.setattr(caption_step, "fp8_linear", lambda *args: products.append(args[4]) or real(*args))
    decoder = GreedyDecoder(model, check_every=4, compile_step=compiled, step_graph=step_graph)
    inputs = encoder.caption_inputs(noise(13))

    config = encoder.greedy_config(24)
    config.min_new_tokens = 24  # every token, the end tokens held off
    free_run = generate_tokens(model, inputs, config)
    assert decoded(decoder, inputs, config) == free_run and len(free_run) == 24
    if not compiled:  # 23 steps after the prefill's token, 7 fp8 products in each of the 2 layers, all dequantising
        assert products == [False] * 23 * 7 * 2

    # the first end token stops it, where generate stops
    config = encoder.greedy_config(24)
    config.eos_token_id = free_run[9]
    expected = generate_tokens(model, inputs, config)
    assert decoded(decoder, inputs, config) == expected and len(expected) == free_run.index(free_run[9]) + 1
    # and min_new_tokens holds it off, as in generate
    config.eos_token_id = free_run[3]
    config.min_new_tokens = 12
    expected = generate_tokens(model, inputs, config)
    assert decoded(decoder, inputs, config) == expected and 12 < len(expected) <= 24
    if compiled:  # one compilation per part, the layer's serving both layers: the fp8 flags are the same constants
        assert counters["stats"]["unique_graphs"] == (3 if step_graph == "whole" else 2)


def cpu_scaled_mm_works() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not cpu_scaled_mm_works(), reason=f"torch {torch.__version__} has no CPU torch._scaled_mm")
@pytest.mark.parametrize("step_graph", STEP_GRAPHS)
def test_the_fp8_matmul_branch_gives_generates_tokens(model, encoder, step_graph):
    """FP8Linear(compute="fp8") runs torch._scaled_mm on the CPU too: the step takes that branch when the layers
    would, and gives generate's tokens through it; a change of the layers' choice between calls is seen."""
    inputs = encoder.caption_inputs(noise(14))
    config = encoder.greedy_config(24)
    config.min_new_tokens = 24
    decoder = GreedyDecoder(model, check_every=4, step_graph=step_graph)
    dequantizing = generate_tokens(model, inputs, config)
    assert decoded(decoder, inputs, config) == dequantizing
    buffers = decoder._buffers

    set_fp8_compute(model, "fp8", fast_accum=False)
    weights = StepWeights.of(model, fused=True)
    assert all(getattr(layer, name).fp8_matmul for layer in weights.layers for name in LINEAR_FIELDS)
    assert not any(getattr(layer, name).fast_accum for layer in weights.layers for name in LINEAR_FIELDS)
    in_fp8 = generate_tokens(model, inputs, config)
    assert in_fp8 != dequantizing  # the activations' e4m3 rounding decides tokens: the branch is seen
    assert decoded(decoder, inputs, config) == in_fp8
    assert decoder._buffers is not buffers  # what a captured step would run changed: built again


@pytest.mark.parametrize("step_graph", STEP_GRAPHS)
def test_layers_of_plain_and_fp8_linears(model, encoder, step_graph):
    """Layer 0 back to plain linears (fused in the whole step), layer 1 with two of its seven plain."""
    layers = model.model.language_model.layers

    def widen(parent, name: str) -> None:
        fp8 = getattr(parent, name)
        plain = torch.nn.Linear(fp8.in_features, fp8.out_features, bias=fp8.bias is not None)
        plain.weight = torch.nn.Parameter(fp8.dequantized_weight(torch.float32), requires_grad=False)
        plain.bias = fp8.bias
        setattr(parent, name, plain)

    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        widen(layers[0].self_attn, name)
    for name in ("gate_proj", "up_proj", "down_proj"):
        widen(layers[0].mlp, name)
    widen(layers[1].self_attn, "k_proj")
    widen(layers[1].mlp, "up_proj")

    weights = StepWeights.of(model, fused=step_graph == "whole")
    first, second = weights.layers
    assert type(first) is (FusedLayerWeights if step_graph == "whole" else LayerWeights)
    assert type(second) is LayerWeights
    kinds = [type(getattr(second, name)).__name__ for name in LINEAR_FIELDS]
    assert kinds == ["FP8Weight", "Parameter", "FP8Weight", "FP8Weight", "FP8Weight", "Parameter", "FP8Weight"]

    inputs = encoder.caption_inputs(noise(15))
    config = encoder.greedy_config(24)
    config.min_new_tokens = 24
    expected = generate_tokens(model, inputs, config)
    assert decoded(GreedyDecoder(model, step_graph=step_graph), inputs, config) == expected


def test_caption_of_an_fp8_encoder_goes_through_the_decoder(encoder, caplog):
    image = noise(16)
    with caplog.at_level(logging.INFO, logger="layered_core.text"):
        caplog.clear()
        text = encoder.caption(image, max_new_tokens=16)
        assert FALLBACK not in caplog.text
        assert encoder._decoder is not None and encoder._decoder._buffers is not None
        # the same caption through generate
        through_generate = PromptEncoder(
            encoder.model, encoder.tokenizer, encoder.image_processor, fast_caption=False
        ).caption(image, max_new_tokens=16)
        assert f"{FALLBACK}: fast_caption is off" in caplog.text
    assert text == through_generate and text


def test_other_fp8_layers_are_refused(model, encoder):
    inputs = encoder.caption_inputs(noise(17))
    config = encoder.greedy_config(4)

    class OtherFP8Linear(FP8Linear):  # a subclass may compute otherwise
        pass

    down = model.model.language_model.layers[1].mlp.down_proj
    down.__class__ = OtherFP8Linear
    with pytest.raises(GreedyDecoderUnavailable, match=r"layer 1 has a linear layer that is not .* \(OtherFP8Linear\)"):
        greedy_settings(model, config, inputs)
    down.__class__ = FP8Linear
    greedy_settings(model, config, inputs)
    model.lm_head = FP8Linear.like(model.lm_head)  # the file's head stays full precision; a quantised one is refused
    with pytest.raises(GreedyDecoderUnavailable, match="the language-model head is a FP8Linear"):
        greedy_settings(model, config, inputs)


# ----------------------------------------------------------------------------- the CUDA choice, on fake tensors
#
# As in test_ops: FakeTensorMode stands in for a CUDA device, whether it has fp8 tensor cores is patched in.


@pytest.fixture
def fake_cuda(monkeypatch):
    supported = {"value": True}
    monkeypatch.setattr(ops, "fp8_matmul_supported", lambda device: device.type == "cuda" and supported["value"])
    with FakeTensorMode():
        yield supported


@pytest.mark.parametrize(
    ("dtype", "tensor_cores", "compute", "expected"),
    [
        (torch.bfloat16, True, "auto", True),
        (torch.float32, True, "auto", False),
        (torch.float16, True, "auto", False),
        (torch.bfloat16, False, "auto", False),
        (torch.bfloat16, True, "dequantize", False),
        (torch.float32, True, "fp8", True),
    ],
)
def test_the_step_chooses_as_the_layer_does_for_its_input(fake_cuda, dtype, tensor_cores, compute, expected):
    fake_cuda["value"] = tensor_cores
    linear = FP8Linear(256, 384, device="cuda", dtype=dtype, compute=compute)
    weight = FP8Weight.of(linear, dtype)
    assert weight.fp8_matmul is expected
    with torch.no_grad():
        assert linear.uses_fp8_matmul(torch.empty(1, 1, 256, device="cuda", dtype=dtype)) is expected


def test_a_forced_fp8_matmul_that_cannot_run_is_refused(fake_cuda):
    fake_cuda["value"] = False
    linear = FP8Linear(256, 384, device="cuda", dtype=torch.bfloat16, compute="fp8")
    with pytest.raises(GreedyDecoderUnavailable, match="compute='fp8' cannot run: cuda.* has no fp8 tensor cores"):
        FP8Weight.of(linear, torch.bfloat16)
