"""Qwen2's RMSNorm of one token's hidden state in one Triton kernel: the norms of the caption decoder's uncompiled
whole step (:mod:`.caption_step`).

Uncompiled, ``rms_norm``'s arithmetic is eight elementwise and reduction kernels on a vector of a few thousand
values, each a few microseconds of launch and drain in the captured graph, three norms a layer; here it is one.
The arithmetic is transformers' (float32, the mean of squares, the reciprocal square root, back to the input's
dtype, times the weight), the sum of squares in the kernel's order. A compiled step fuses the norm itself and does
not use this.
"""

from __future__ import annotations

import contextlib

import torch

from .kernels import TRITON_INSTALLED, triton_next_power_of_2

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# one thread block holds the whole row
MAX_WIDTH = 16384


def kernel_problem(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot normalise ``x`` (one row) with ``weight``, or None when it can; every check is static."""
    if not TRITON_INSTALLED:
        return "Triton is not installed"
    if not (x.is_cuda and weight.device == x.device):
        return "the tensors are not both on one CUDA device"
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
        return f"dtypes {x.dtype} and {weight.dtype}: one of {KERNEL_DTYPES} for both"
    width = weight.shape[-1]
    if weight.dim() != 1 or x.numel() != width or x.shape[-1] != width or width > MAX_WIDTH:
        return f"x of shape {tuple(x.shape)} is not one row of the weight's {width} (at most {MAX_WIDTH})"
    if not (x.is_contiguous() and weight.is_contiguous()):
        return "a tensor is not contiguous"
    return None


@torch.library.custom_op("qwen_layered::row_rms_norm", mutates_args=())
def row_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` of one row, the mean in float32; tensors that pass
    :func:`kernel_problem` (on CPU tensors under Triton's interpreter only)."""
    out = torch.empty_like(x)
    width = weight.shape[-1]
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:
        _kernel()[(1,)](x, weight, out, eps, WIDTH=width, BLOCK=triton_next_power_of_2(width))
    return out


@row_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


_KERNEL = None


def _kernel():
    """The Triton kernel, defined on first use so that importing this module needs no Triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def row_rms_norm_kernel(x_ptr, weight_ptr, out_ptr, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        columns = tl.arange(0, BLOCK)
        inside = columns < WIDTH
        x = tl.load(x_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, 0) / WIDTH
        normed = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0)
        out = weight.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + columns, out.to(out_ptr.dtype.element_ty), mask=inside)

    _KERNEL = row_rms_norm_kernel
    return _KERNEL
