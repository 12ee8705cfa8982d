"""The fused kernels (QK-norm + RoPE + join; GEMM + GELU) against the PyTorch code they replace (GPU tests skip
without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layered_core import kernels
from layered_core.rope import rope_cos_sin


def inputs(batch=2, text_len=5, image_len=37, heads=3, head_dim=32, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    txt = torch.randn(batch, text_len, heads, head_dim, generator=gen).to(device, dtype)
    img = (3 * torch.randn(batch, image_len, heads, head_dim, generator=gen)).to(device, dtype)
    positions = torch.randint(-20, 20, (text_len + image_len, 3), generator=gen)
    axes = (head_dim // 4, head_dim // 4 + head_dim // 8, head_dim // 4 + head_dim // 8)
    pe = rope_cos_sin(positions, axes, 10000.0)[:, None].to(device)
    norms = []
    for _ in range(2):
        norm = nn.RMSNorm(head_dim, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.2 * torch.randn(head_dim, generator=gen))
        norms.append(norm.to(device, dtype))
    return txt, img, norms[0], norms[1], pe


def float64_truth(txt, img, txt_norm, img_norm, pe):
    def one(x, norm, table):
        x = x.double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
        real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = table.double().unbind(-1)
        return torch.stack([real * cos - imag * sin, real * sin + imag * cos], -1).flatten(-2)

    text_len = txt.shape[1]
    return torch.cat([one(txt, txt_norm, pe[:text_len]), one(img, img_norm, pe[text_len:])], 1)


def test_reference_matches_float64_on_cpu():
    txt, img, txt_norm, img_norm, pe = inputs()
    out = kernels.norm_rope_join(txt, img, txt_norm, img_norm, pe)  # no CUDA: the PyTorch path
    assert out.shape == (2, 42, 3, 32)
    torch.testing.assert_close(out.double(), float64_truth(txt, img, txt_norm, img_norm, pe), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, kernels.norm_rope_join_reference(txt, img, txt_norm, img_norm, pe))


def test_weights_the_kernel_must_not_take():
    txt, img, txt_norm, img_norm, pe = inputs()
    assert kernels._plain_weight(txt_norm, txt) is txt_norm.weight
    # ComfyUI's ops cast, patch or offload the weight inside forward: the kernel would skip that
    txt_norm.comfy_cast_weights = True
    assert kernels._plain_weight(txt_norm, txt) is None
    del txt_norm.comfy_cast_weights
    txt_norm.weight_function = [lambda w: w * 2]
    assert kernels._plain_weight(txt_norm, txt) is None
    assert kernels._plain_weight(nn.LayerNorm(32), txt) is None
    assert kernels._plain_weight(nn.RMSNorm(16), txt) is None  # another width


needs_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.TRITON_INSTALLED), reason="needs a CUDA GPU and Triton"
)


@needs_cuda_triton
@pytest.mark.parametrize(
    "shape,dtype",
    [
        (dict(), torch.bfloat16),
        (dict(heads=24, head_dim=128, text_len=256, image_len=1600), torch.bfloat16),
        (dict(batch=1, heads=5, head_dim=64, text_len=1, image_len=9), torch.float16),
    ],
)
def test_kernel_matches_float64_on_gpu(shape, dtype):
    txt, img, txt_norm, img_norm, pe = inputs(dtype=dtype, device="cuda", **shape)
    truth = float64_truth(txt, img, txt_norm, img_norm, pe)
    with torch.inference_mode():
        fused = kernels.norm_rope_join(txt, img, txt_norm, img_norm, pe)
        torch_path = kernels.norm_rope_join_reference(txt, img, txt_norm, img_norm, pe)
    assert fused.dtype == dtype and fused.shape == truth.shape
    fused_error = ((fused.double() - truth).norm() / truth.norm()).item()
    torch_error = ((torch_path.double() - truth).norm() / truth.norm()).item()
    # one rounding to the output dtype at the end: no worse than the PyTorch path, which rounds twice
    assert fused_error <= torch_error * 1.05 + 1e-6, (fused_error, torch_error)
    assert fused_error < 4e-3


@needs_cuda_triton
def test_kernel_under_torch_compile_and_float32_weights():
    txt, img, txt_norm, img_norm, pe = inputs(dtype=torch.bfloat16, device="cuda", seed=3)
    img_norm.float()
    txt_norm.float()
    compiled = torch.compile(kernels.norm_rope_join, fullgraph=True)
    with torch.inference_mode():
        out = compiled(txt, img, txt_norm, img_norm, pe)
    truth = float64_truth(txt, img, txt_norm, img_norm, pe)
    assert ((out.double() - truth).norm() / truth.norm()).item() < 4e-3


def gelu_inputs(rows=37, dim_in=64, dim_out=256, dtype=torch.float32, device="cpu", seed=0, batch=(2,)):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    linear = nn.Linear(dim_in, dim_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(dim_out, dim_in, generator=gen) / dim_in**0.5)
        linear.bias.copy_(torch.randn(dim_out, generator=gen))
    x = torch.randn(*batch, rows, dim_in, generator=gen)
    return x.to(device, dtype), linear.to(device, dtype)


def gelu_truth(x, linear):
    h = x.double() @ linear.weight.double().t() + linear.bias.double()
    return torch.nn.functional.gelu(h, approximate="tanh")


def rel_error(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_linear_gelu_on_cpu_is_the_tanh_form():
    x, linear = gelu_inputs()
    out = kernels.linear_gelu(x, linear)
    assert out.shape == (2, 37, 256)
    torch.testing.assert_close(out.double(), gelu_truth(x, linear), rtol=1e-5, atol=1e-5)
    # cuBLASLt's epilogue op computes the exact GELU on the CPU: the CPU must not take it
    exact = torch.nn.functional.gelu(linear(x))
    assert (out - exact).abs().max() > 1e-4
    with pytest.raises(ValueError, match="epilogue must be one of"):
        kernels.linear_gelu(x, linear, epilogue="triton")


def test_linears_the_fused_gemm_must_not_take():
    x, linear = gelu_inputs()
    assert kernels.plain_linear(linear, x) == (linear.weight, linear.bias)
    linear.comfy_cast_weights = True  # ComfyUI casts or offloads this weight inside forward
    assert kernels.plain_linear(linear, x) is None
    del linear.comfy_cast_weights
    linear.bias_function = [lambda b: b * 2]  # a patch applied on the fly
    assert kernels.plain_linear(linear, x) is None
    del linear.bias_function
    linear.weight_function = [lambda w: w * 2]
    assert kernels.plain_linear(linear, x) is None
    del linear.weight_function
    assert kernels.plain_linear(linear, x.double()) is None  # another dtype
    assert kernels.plain_linear(linear, x.to("meta")) is None  # another device
    assert kernels.plain_linear(nn.Identity(), x) is None

    class LoRALinear(nn.Linear):  # its own forward: calling the weight directly would skip the LoRA
        def forward(self, x):
            return super().forward(x) * 2

    lora = LoRALinear(64, 256)
    assert kernels.plain_linear(lora, x) is None
    handle = linear.register_forward_hook(lambda module, args, out: out * 2)
    assert kernels.plain_linear(linear, x) is None
    handle.remove()
    assert kernels.plain_linear(linear, x) is not None
    linear.weight = None  # ComfyUI's lazily loaded weight
    assert kernels.plain_linear(linear, x) is None
    assert kernels.quack_gelu_problem(x, torch.empty(256, 64)) is not None  # CPU input


def test_quack_takes_only_long_inputs(monkeypatch):
    # as on a Hopper GPU with quack installed, without needing either
    monkeypatch.setattr(kernels, "QUACK_INSTALLED", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    weight = torch.empty(256, 64)
    short = torch.empty(2, 37, 64, dtype=torch.bfloat16, device="meta")
    assert "rows" in kernels.quack_gelu_problem(short, weight)
    long = torch.empty(2, kernels.QUACK_MIN_ROWS // 2, 64, dtype=torch.bfloat16, device="meta")
    assert kernels.quack_gelu_problem(long, weight) is None
    assert "bf16 or fp16" in kernels.quack_gelu_problem(long.float(), weight)
    assert "multiples of 8" in kernels.quack_gelu_problem(long, torch.empty(250, 64))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_quack = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.QUACK_INSTALLED and torch.cuda.get_device_capability()[0] in (9, 10)),
    reason="needs quack-kernels and a Hopper or Blackwell GPU",
)


@needs_cuda
@pytest.mark.parametrize(
    "epilogue,dtype,shape",
    [
        ("cublaslt", torch.bfloat16, dict()),
        pytest.param("auto", torch.bfloat16, dict(rows=2500, dim_in=512, dim_out=2048), marks=needs_quack),
        pytest.param("auto", torch.float16, dict(rows=4100, dim_in=64, dim_out=256, batch=()), marks=needs_quack),
    ],
)
def test_linear_gelu_matches_float64_on_gpu(epilogue, dtype, shape):
    x, linear = gelu_inputs(dtype=dtype, device="cuda", **shape)
    if epilogue == "auto":
        assert kernels.quack_gelu_problem(x, linear.weight) is None  # this case tests quack's GEMM
    truth = gelu_truth(x, linear)
    with torch.inference_mode():
        fused = kernels.linear_gelu(x, linear, epilogue)
        two_ops = kernels.linear_gelu(x, linear, "none")
    assert fused.shape == truth.shape and fused.dtype == dtype
    # one rounding at the end instead of two: no worse than a linear and a GELU
    assert rel_error(fused, truth) <= rel_error(two_ops, truth) * 1.05 + 1e-6
    assert rel_error(fused, truth) < 4e-3


@needs_quack
def test_quack_gelu_inside_torch_compile():
    x, linear = gelu_inputs(rows=4096, dim_in=128, dim_out=512, dtype=torch.bfloat16, device="cuda", seed=5)
    assert kernels.quack_gelu_problem(x, linear.weight) is None
    compiled = torch.compile(lambda x: kernels.linear_gelu(x * 2, linear) + 1, fullgraph=True)
    with torch.inference_mode():
        out = compiled(x)
    assert rel_error(out, gelu_truth(x * 2, linear) + 1) < 4e-3


@needs_quack
def test_quack_op_falls_back_on_unaligned_data():
    x, linear = gelu_inputs(rows=4096, dim_in=128, dim_out=512, dtype=torch.bfloat16, device="cuda", seed=6, batch=())
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x)  # 2 bytes off 16
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    with torch.inference_mode():
        out = torch.ops.qwen_layered.quack_linear_gelu(shifted, linear.weight, linear.bias)
    assert rel_error(out, gelu_truth(x, linear)) < 4e-3
