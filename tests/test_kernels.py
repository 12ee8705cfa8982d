"""The fused QK-norm + RoPE + join kernel against the PyTorch code it replaces (GPU tests skip without CUDA)."""

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
