"""The one-kernel RMSNorm of the caption decoder's uncompiled step (layered_core/row_norm.py) against the step's own
rms_norm: under Triton's interpreter on the CPU (float32) and on a CUDA GPU (skipped here)."""

from __future__ import annotations

import pytest
import torch

from layered_core import row_norm
from layered_core.caption_step import fused_rms_norm, rms_norm
from tests.triton_interpreter import interpreted_lines

TRITON = pytest.mark.skipif(not row_norm.TRITON_INSTALLED, reason="Triton is not installed")
CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and row_norm.TRITON_INSTALLED), reason="needs a CUDA GPU and Triton"
)
WIDTHS = (48, 64, 3584)  # no power of two, one, the 7B's hidden size


def row(width, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(1, 1, width, generator=gen, device=device) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(width, generator=gen, device=device)).to(dtype)
    return x, weight


def test_off_the_kernels_device_the_fused_norm_is_rms_norm():
    x, weight = row(48)
    expected = "Triton is not installed" if not row_norm.TRITON_INSTALLED else "not both on one CUDA device"
    assert expected in row_norm.kernel_problem(x, weight)
    assert torch.equal(fused_rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6))


def interpreted_differences() -> list[str]:
    """Each width's largest relative difference between the kernel and rms_norm on CPU tensors; run in a process
    started with TRITON_INTERPRET=1 (tests/triton_interpreter.py)."""
    lines = []
    for width in WIDTHS:
        x, weight = row(width, seed=width)
        expected = rms_norm(x, weight, 1e-6)
        actual = torch.ops.qwen_layered.row_rms_norm(x, weight, 1e-6)
        lines.append(f"{width} {float((actual - expected).abs().max() / expected.abs().max())}")
    return lines


@TRITON
def test_kernel_equals_rms_norm_under_the_interpreter():
    lines = interpreted_lines("tests.test_row_norm.interpreted_differences")
    assert len(lines) == len(WIDTHS), lines
    for line in lines:
        width, difference = line.split()
        assert float(difference) <= 1e-6, f"width {width}: {difference}"


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_rms_norm_on_cuda(dtype):
    for width in WIDTHS:
        x, weight = row(width, dtype=dtype, device="cuda", seed=width)
        assert row_norm.kernel_problem(x, weight) is None
        expected = rms_norm(x, weight, 1e-6).float()
        actual = fused_rms_norm(x, weight, 1e-6).float()
        # bf16: at most one rounding step apart where the float32 sums' order tips a value over
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=f"width {width}")
