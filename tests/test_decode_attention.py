"""The caption decoder's attention over a fixed-capacity cache (layered_core/decode_attention.py): the masked fused
attention against transformers' call over exactly the cached length, and the split Triton kernels against the
masked attention, under Triton's interpreter on the CPU (float32) and on a CUDA GPU (the GPU tests skip here)."""

from __future__ import annotations

import math

import pytest
import torch

from layered_core import decode_attention as da
from layered_core.caption_step import attend
from tests.triton_interpreter import interpreted_lines

TRITON = pytest.mark.skipif(not da.TRITON_INSTALLED, reason="Triton is not installed")
CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and da.TRITON_INSTALLED), reason="needs a CUDA GPU and Triton")


def cache(heads, kv_heads, capacity, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """A query and a cache whose every slot holds random keys and values (the slots after the position must not
    count)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return (
        randn(1, heads, 1, head_dim),
        randn(1, kv_heads, capacity, head_dim, scale=3.0),
        randn(1, kv_heads, capacity, head_dim),
    )


def test_masked_attention_equals_sdpa_over_the_cached_length():
    query, keys, values = cache(6, 2, 40, 16)
    slots = torch.arange(40)
    for position in (0, 17, 39):
        bias = da.attention_bias(slots, torch.tensor([position]), torch.float32)
        assert bias[: position + 1].eq(0).all() and bias[position + 1 :].eq(-math.inf).all()
        expected = attend(query, keys, values, position + 1, 0.25)
        actual = da.masked_attention(query, keys, values, torch.tensor([position]), 0.25)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_kernel_problem_names_what_stops_the_kernels():
    query, keys, values = cache(6, 2, 40, 16)
    position = torch.tensor([3])
    if not da.TRITON_INSTALLED:
        assert da.kernel_problem(query, keys, values, position) == "Triton is not installed"
    else:
        assert da.kernel_problem(query, keys, values, position) == "the tensors are not all on one CUDA device"
    # off the kernels' device, decode_attention is the masked attention
    torch.testing.assert_close(
        da.decode_attention(query, keys, values, position, 0.25),
        da.masked_attention(query, keys, values, position, 0.25),
        rtol=0,
        atol=0,
    )


# (heads, kv_heads, capacity, head_dim, positions) the interpreter runs
INTERPRETED_CASES = [
    (28, 4, 384, 16, (0, 63, 64, 127, 128, 129, 300, 383)),  # the 7B's grouping: 7 query heads a key head
    (4, 4, 200, 32, (0, 130, 199)),  # no grouping; a capacity that is no multiple of a chunk
    (32, 2, 256, 16, (5, 255)),  # 16 query heads a key head: the rows of one block exactly
]


def interpreted_differences() -> list[str]:
    """Each case's largest difference between the kernels and the masked attention, on CPU tensors; run in a
    process started with TRITON_INTERPRET=1 (tests/triton_interpreter.py)."""
    lines = []
    for heads, kv_heads, capacity, head_dim, positions in INTERPRETED_CASES:
        query, keys, values = cache(heads, kv_heads, capacity, head_dim, seed=heads)
        for position in positions:
            at = torch.tensor([position])
            expected = da.masked_attention(query, keys, values, at, 0.3)
            actual = torch.ops.qwen_layered.decode_attention(query, keys, values, at, 0.3)
            lines.append(
                f"{heads} {kv_heads} {capacity} {head_dim} {position} {float((actual - expected).abs().max())}"
            )
    return lines


@TRITON
def test_kernels_equal_the_masked_attention_under_the_interpreter():
    lines = interpreted_lines("tests.test_decode_attention.interpreted_differences")
    assert len(lines) == sum(len(case[4]) for case in INTERPRETED_CASES), lines
    for line in lines:
        *case, difference = line.split()
        assert float(difference) <= 1e-5, f"heads, kv_heads, capacity, head_dim, position {case}: {difference}"


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_equal_the_masked_attention_on_cuda(dtype):
    """The 7B's shape (28 query heads on 4 key/value heads of 128, a 1280-slot cache)."""
    query, keys, values = cache(28, 4, 1280, 128, dtype=dtype, device="cuda")
    for position in (0, 127, 128, 814, 1070, 1279):
        at = torch.tensor([position], device="cuda")
        assert da.kernel_problem(query, keys, values, at) is None
        expected = da.masked_attention(query, keys, values, at, 128**-0.5).float()
        actual = da.decode_attention(query, keys, values, at, 128**-0.5).float()
        # bf16: the weights rounded to bf16 before the product with the values, as flash attention rounds them
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=f"position {position}")


@CUDA
def test_kernels_replay_in_a_cuda_graph_under_torch_compile():
    """Compiled (the kernels opaque to inductor) and captured once, then replayed at other positions: each replay
    reads the position on the device."""
    query, keys, values = cache(28, 4, 512, 128, dtype=torch.bfloat16, device="cuda")
    position = torch.tensor([10], device="cuda")
    compiled = torch.compile(da.decode_attention, fullgraph=True, dynamic=False)
    out = torch.empty_like(query)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            out.copy_(compiled(query, keys, values, position, 0.1))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(compiled(query, keys, values, position, 0.1))
    for at in (0, 200, 511):
        position.fill_(at)
        graph.replay()
        expected = da.masked_attention(query, keys, values, position, 0.1)
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2, msg=f"position {at}")
