"""FP8Linear's fp8 matmul (rowwise-scaled ``torch._scaled_mm``), its fallback, and quantising a loaded model."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from layered_core import ops
from layered_core.checkpoints import load_mmdit, open_checkpoint, quantized_layers, save_mmdit
from layered_core.ops import (
    E4M3_MAX,
    FP8Linear,
    is_quantizable,
    quantize_fp8,
    quantize_linears_fp8,
    quantize_rows_fp8,
    set_fp8_compute,
)

from .test_checkpoints import inputs
from .test_mmdit import load_ours


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """float8 compared bit for bit: not every device has an equality kernel for it."""
    return tensor.view(torch.uint8) if tensor.dtype in ops.FP8_DTYPES else tensor


def make_linear(in_features=256, out_features=384, seed=0, compute="auto", bias=True, device=None) -> FP8Linear:
    """An FP8Linear holding U(-1/sqrt(K), 1/sqrt(K)) weights (nn.Linear's init scale), bf16 bias."""
    gen = torch.Generator().manual_seed(seed)
    bound = in_features**-0.5
    weight = (torch.rand(out_features, in_features, generator=gen) * 2 - 1) * bound
    linear = FP8Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16, compute=compute, device=device)
    quantized, scale = quantize_fp8(weight)
    with torch.no_grad():
        linear.weight.copy_(quantized)
        linear.weight_scale.copy_(scale)
        if bias:
            linear.bias.copy_((torch.rand(out_features, generator=gen) * 2 - 1) * bound)
    return linear


def activations(*shape, seed=1) -> torch.Tensor:
    """N(0, 1) tokens in bf16 with two outlier tokens, 50x and 1000x the rest (as real activations have)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rows = x.view(-1, shape[-1])
    rows[3] *= 50
    rows[-1] *= 1000
    return x.to(torch.bfloat16)


def emulated_scaled_mm(mat_a, mat_b, scale_a, scale_b, bias=None, out_dtype=None, **_):
    """What torch._scaled_mm computes with rowwise scales, in float32: (A * sa) @ (B * sb) + bias."""
    out = (mat_a.float() * scale_a) @ (mat_b.float() * scale_b)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def cpu_scaled_mm_works() -> bool:
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        out = torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 16).all())


CPU_FP8 = cpu_scaled_mm_works()
NEEDS_CPU_FP8 = pytest.mark.skipif(
    not CPU_FP8, reason=f"torch {torch.__version__} has no CPU torch._scaled_mm; the emulated tests still run"
)


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Records every torch._scaled_mm call (then runs the real one)."""
    calls = []
    real = torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    return calls


# ----------------------------------------------------------------------------- activation quantisation


def test_rows_quantise_to_their_own_range():
    x = activations(7, 64).float()
    x[2] = 0.0
    x[5] *= 1e30  # a huge row is scaled into e4m3 like any other, without overflowing to NaN
    quantized, scale = quantize_rows_fp8(x)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (7, 1) and scale.is_contiguous()
    # Each non-zero row's largest magnitude lands exactly on the top of the e4m3 range.
    top = quantized.float().abs().amax(dim=1)
    assert torch.equal(top[[0, 1, 3, 4, 5, 6]], torch.full((6,), E4M3_MAX))
    # An all-zero row stays zero with a finite scale.
    assert torch.isfinite(scale).all() and (scale > 0).all() and (quantized[2].float() == 0).all()
    # Round to nearest with 3 mantissa bits: within 2^-4 of each value, plus half the subnormal step.
    dequantized = quantized.float() * scale
    assert ((dequantized - x).abs() <= 2**-4 * x.abs() + 2**-10 * scale).all()


# ----------------------------------------------------------------------------- the fp8 matmul on CPU


@pytest.mark.parametrize("backend", ["cpu", "emulated"])
def test_fp8_matmul_matches_dequantized_path(backend, monkeypatch):
    if backend == "cpu" and not CPU_FP8:
        pytest.skip(f"torch {torch.__version__} has no CPU torch._scaled_mm")
    if backend == "emulated":
        monkeypatch.setattr(torch, "_scaled_mm", emulated_scaled_mm)
    linear = make_linear()
    x = activations(2, 37, 256)
    with torch.no_grad():
        linear.compute = "dequantize"
        dequantized = linear(x)
        linear.compute = "fp8"
        fp8 = linear(x)
        rows, row_scale = quantize_rows_fp8(x.reshape(-1, 256))
        exact = emulated_scaled_mm(
            rows, linear.weight.t(), row_scale, linear.weight_scale.reshape(1, 1), linear.bias, torch.float32
        ).reshape(2, 37, 384)
    assert fp8.shape == (2, 37, 384) and fp8.dtype == torch.bfloat16
    # The fp8 kernel computes exactly the quantised product, up to its bf16 output.
    assert relative_l2(fp8, exact) < 5e-3
    # Against bf16 activations, the only new error is e4m3's 3-bit mantissa on the activations
    # (about 2.6e-2 here, the same size as the weights' own fp8 error) ...
    assert relative_l2(fp8, dequantized) < 4e-2
    # ... and per-row scales keep it there for ordinary tokens despite the 1000x outlier token.
    ordinary = torch.ones(74, dtype=torch.bool)
    ordinary[[3, 73]] = False
    assert relative_l2(fp8.reshape(74, -1)[ordinary], dequantized.reshape(74, -1)[ordinary]) < 4e-2


@NEEDS_CPU_FP8
def test_forced_fp8_calls_scaled_mm_with_rowwise_operands(scaled_mm_calls):
    linear = make_linear(compute="fp8")
    x = activations(2, 37, 256)
    with torch.no_grad():
        linear(x)
    assert len(scaled_mm_calls) == 1
    (mat_a, mat_b), kwargs = scaled_mm_calls[0]
    assert mat_a.dtype == torch.float8_e4m3fn and mat_a.shape == (74, 256) and mat_a.stride() == (256, 1)
    # The weight goes in as a column-major view of itself: no copy, no transpose kernel.
    assert mat_b.shape == (256, 384) and mat_b.stride() == (1, 256)
    assert mat_b.data_ptr() == linear.weight.data_ptr()
    assert kwargs["scale_a"].shape == (74, 1) and kwargs["scale_a"].dtype == torch.float32
    assert kwargs["scale_b"].shape == (1, 384) and kwargs["scale_b"].dtype == torch.float32
    assert kwargs["scale_a"].is_contiguous() and kwargs["scale_b"].is_contiguous()
    assert torch.equal(kwargs["scale_b"], linear.weight_scale.expand(1, 384))
    # 74 rows: too few for the bias epilogue, so the bias is added after the product
    assert kwargs["bias"] is None and kwargs["out_dtype"] == torch.bfloat16
    assert kwargs["use_fast_accum"] is True  # the default
    with torch.no_grad():
        out = linear(activations(2, 150, 256))  # 300 rows: the bias goes in the product's epilogue
    assert scaled_mm_calls[1][1]["bias"].dtype == torch.bfloat16 and out.shape == (2, 150, 384)


@pytest.mark.parametrize("compute", ["auto", "dequantize"])
def test_cpu_auto_and_dequantize_do_not_call_scaled_mm(compute, scaled_mm_calls):
    linear = make_linear(compute=compute)
    with torch.no_grad():
        out = linear(activations(5, 256))
    assert scaled_mm_calls == []
    expected = nn.functional.linear(activations(5, 256), linear.dequantized_weight(torch.bfloat16), linear.bias)
    assert torch.equal(out, expected)


@NEEDS_CPU_FP8
def test_fp8_path_compiles_without_graph_breaks():
    linear = make_linear(compute="fp8")
    x = activations(3, 20, 256)
    compiled = torch.compile(linear, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), linear(x))


def test_dtype_casts_keep_the_fp8_weight():
    model = nn.Sequential(make_linear())
    weight = model[0].weight.detach().clone()
    for cast in (lambda m: m.to(torch.float32), lambda m: m.half(), lambda m: m.to("meta", torch.bfloat16)):
        layer = cast(model)[0]
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
        assert not layer.weight.requires_grad
    assert layer.weight.device.type == "meta" and layer.bias.dtype == torch.bfloat16
    model = nn.Sequential(make_linear()).half()
    assert torch.equal(bits(model[0].weight), bits(weight)) and model[0].bias.dtype == torch.float16


def test_compute_mode_is_checked():
    with pytest.raises(ValueError, match="compute must be one of auto, fp8, dequantize, got 'fast'"):
        FP8Linear(16, 16, compute="fast")
    model = nn.Sequential(FP8Linear(16, 16), nn.Linear(16, 16), FP8Linear(16, 32))
    assert set_fp8_compute(model, "dequantize", fast_accum=True) == 2
    assert model[2].compute == "dequantize" and model[2].fast_accum
    with pytest.raises(ValueError, match="compute must be one of"):
        set_fp8_compute(model, "bf16")


# ----------------------------------------------------------------------------- the CUDA choice, on fake tensors
#
# FakeTensorMode runs torch's meta functions, which for device "cuda" check what the CUDA kernels need
# (fp8 operands, row-major A, column-major B, K and N multiples of 16, scale shapes and dtypes), so the
# CUDA call is checked here without a GPU. Whether the device has fp8 tensor cores is patched in.


@pytest.fixture
def fake_cuda(monkeypatch):
    supported = {"value": True}
    monkeypatch.setattr(ops, "fp8_matmul_supported", lambda device: device.type == "cuda" and supported["value"])
    with FakeTensorMode():
        yield supported


FAKE_CASES = {
    # name: (in, out, input shape, input dtype, weight dtype, fp8 tensor cores, uses the fp8 matmul)
    "tokens": (256, 384, (2, 37, 256), torch.bfloat16, torch.float8_e4m3fn, True, True),
    "modulation, M=batch=1": (64, 384, (1, 64), torch.bfloat16, torch.float8_e4m3fn, True, True),
    "fp16 input": (256, 384, (2, 37, 256), torch.float16, torch.float8_e4m3fn, True, False),
    "fp32 input": (256, 384, (2, 37, 256), torch.float32, torch.float8_e4m3fn, True, False),
    "K not /16": (40, 384, (2, 37, 40), torch.bfloat16, torch.float8_e4m3fn, True, False),
    "N not /16": (256, 24, (2, 37, 256), torch.bfloat16, torch.float8_e4m3fn, True, False),
    "e5m2 weight": (256, 384, (2, 37, 256), torch.bfloat16, torch.float8_e5m2, True, False),
    "no fp8 tensor cores": (256, 384, (2, 37, 256), torch.bfloat16, torch.float8_e4m3fn, False, False),
}


@pytest.mark.parametrize("case", list(FAKE_CASES))
def test_auto_picks_the_fp8_matmul_on_cuda_where_it_qualifies(case, fake_cuda, scaled_mm_calls):
    in_features, out_features, shape, dtype, weight_dtype, tensor_cores, expected = FAKE_CASES[case]
    fake_cuda["value"] = tensor_cores
    linear = FP8Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    linear.weight = nn.Parameter(linear.weight.to(weight_dtype), requires_grad=False)
    x = torch.empty(shape, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = linear(x)
    assert out.shape == (*shape[:-1], out_features) and out.dtype == dtype and out.device.type == "cuda"
    assert linear.uses_fp8_matmul(x) is expected
    assert len(scaled_mm_calls) == int(expected)
    if expected:
        (mat_a, mat_b), kwargs = scaled_mm_calls[0]
        assert mat_a.is_contiguous() and mat_b.t().is_contiguous()
        assert kwargs["bias"] is None and kwargs["out_dtype"] == torch.bfloat16  # few rows: bias added after
        linear.compute = "dequantize"
        assert not linear.uses_fp8_matmul(x)
    elif dtype == torch.bfloat16:
        # Forcing fp8 where it cannot run says why instead of failing inside the kernel.
        linear.compute = "fp8"
        with pytest.raises(ValueError, match="compute='fp8' cannot run"):
            linear(x)


def test_auto_falls_back_under_autograd(fake_cuda):
    linear = FP8Linear(256, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert not linear.uses_fp8_matmul(x)
    with torch.no_grad():
        assert linear.uses_fp8_matmul(x)


# ----------------------------------------------------------------------------- quantising a loaded model


@pytest.fixture
def tiny_model(tiny_reference, tiny_config):
    return load_ours(tiny_reference, tiny_config).requires_grad_(False)


def block_linear_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")}


def test_quantize_linears_replaces_the_block_linears(tiny_model, tiny_reference, tiny_config, tmp_path):
    expected = block_linear_names(tiny_model)
    assert len(expected) == 14 * tiny_config.num_layers
    originals = [weakref.ref(tiny_model.get_submodule(name).weight) for name in expected]
    full_bytes = sum(p.numel() * p.element_size() for p in tiny_model.transformer_blocks.parameters())

    names = quantize_linears_fp8(tiny_model)

    assert set(names) == expected
    # The same layers as a file written by save_mmdit's fp8 layout quantises.
    path = save_mmdit(tiny_reference.state_dict(), tmp_path / "fp8.safetensors", layout="fp8-comfy-quant")
    assert set(quantized_layers(open_checkpoint(path), "model.diffusion_model.")) == expected
    for name in expected:
        layer = tiny_model.get_submodule(name)
        assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert type(tiny_model.get_submodule(name)) is nn.Linear
    # The full-precision weights are gone, not merely unreferenced by the model.
    gc.collect()
    assert all(ref() is None for ref in originals)
    fp8_bytes = sum(
        t.numel() * t.element_size()
        for t in tiny_model.transformer_blocks.state_dict().values()
        if t.is_floating_point()
    )
    assert fp8_bytes < 0.3 * full_bytes  # float32 -> float8, biases and scales aside


def test_quantized_model_stays_close_to_full_precision(tiny_model, tiny_config):
    reference = copy.deepcopy(tiny_model)
    latents, condition, text, sigma, mask = inputs(tiny_config)
    with torch.no_grad():
        want = reference(latents, condition, text, sigma, mask)
        quantize_linears_fp8(tiny_model)
        dequantized = tiny_model(latents, condition, text, sigma, mask)
    # e4m3 weights alone (float32 compute, dequantising path): 4.0e-2 on this random tiny model, whose
    # large weights (std 0.2) amplify it; a bf16 copy of the same model is at 0.7e-2.
    assert relative_l2(dequantized, want) < 5e-2

    if not CPU_FP8:
        pytest.skip(f"torch {torch.__version__} has no CPU torch._scaled_mm for the fp8-matmul half")
    # The whole model in bf16 with the fp8 matmul forced: e4m3 weights and activations, bf16 elsewhere.
    tiny_model.to(torch.bfloat16).compute_dtype = torch.bfloat16
    assert set_fp8_compute(tiny_model, "fp8") == 14 * tiny_config.num_layers
    with torch.no_grad():
        fp8 = tiny_model(latents, condition, text, sigma, mask)
    assert relative_l2(fp8, want) < 8e-2  # 5.8e-2 measured


@pytest.mark.parametrize("layout", ["fp8-comfy-quant", "fp8-scaled"])
def test_quantized_state_dict_round_trips(layout, tiny_model, tiny_config, tmp_path):
    quantize_linears_fp8(tiny_model)
    path = save_mmdit(tiny_model.state_dict(), tmp_path / "q.safetensors", layout=layout, config=tiny_config)
    loaded = load_mmdit(path, dtype=torch.float32, fp8="keep")
    ours, theirs = tiny_model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype, name
        assert torch.equal(bits(theirs[name]), bits(tensor)), name
    latents, condition, text, sigma, mask = inputs(tiny_config)
    with torch.no_grad():
        assert torch.equal(
            loaded(latents, condition, text, sigma, mask), tiny_model(latents, condition, text, sigma, mask)
        )


def test_quantize_linears_takes_a_predicate(tiny_model):
    names = quantize_linears_fp8(tiny_model, predicate=lambda name, w: name.endswith("attn.to_q.weight"))
    assert names == ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q"]
    assert isinstance(tiny_model.transformer_blocks[0].attn.to_q, FP8Linear)
    assert type(tiny_model.transformer_blocks[0].attn.to_k) is nn.Linear
    assert is_quantizable("transformer_blocks.0.attn.to_k.weight", tiny_model.transformer_blocks[0].attn.to_k.weight)


def test_fp8_state_dict_refused_by_full_precision_layouts(tiny_model, tmp_path):
    quantize_linears_fp8(tiny_model)
    with pytest.raises(ValueError, match="fp8 layers .*'comfy' layout stores full-precision weights"):
        save_mmdit(tiny_model.state_dict(), tmp_path / "m.safetensors", layout="comfy")
    state = dict(tiny_model.state_dict())
    del state["transformer_blocks.0.attn.to_q.weight_scale"]
    with pytest.raises(ValueError, match="without a '.weight_scale'.*transformer_blocks.0.attn.to_q.weight"):
        save_mmdit(state, tmp_path / "m.safetensors", layout="fp8-comfy-quant")
    assert not (tmp_path / "m.safetensors").exists()
