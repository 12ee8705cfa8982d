"""Compiled blocks under weight streaming, with inductor on the CPU: the hooks run eagerly around one compiled graph
that serves every block and every slot (no recompilation), and the output is the resident compiled model's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from layered_core.offload import BlockStreamer, stream_blocks
from layered_core.pipeline import DecomposeOptions, LayeredPipeline

from .test_offload import (
    BLOCKS,
    RecordingBudget,
    RecordingTransfers,
    SlowCopies,
    fp8_model,
    inputs,
    models,
    picture,
    run,
    tiny_model,
)

# Streamed and resident compiled blocks run the same kernels on the same values: equal bit for bit. Against the
# eager model the compiled one differs by inductor's float32 rounding (fused kernels, another summation order):
# the bound is a few times what these tiny models show, in the velocity and in the decoded layers.
EAGER_RELATIVE_L2 = 2e-6


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after: earlier compilations of the block's code would
    otherwise serve this test's."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_streamed_blocks_reuse_one_compiled_graph_for_every_block_and_slot(fresh_dynamo):
    plain = tiny_model()
    eager = run(plain)
    resident = copy.deepcopy(plain)
    resident.compile_blocks()
    model = copy.deepcopy(plain)
    transfers = RecordingTransfers()
    streamer = BlockStreamer(model, "cpu", slots=2, transfers=transfers)
    streamer.load(2)
    model.compile_blocks()
    assert streamer.streamed_indices == (0, 2, 4)  # 3 blocks through 2 slots: each runs from both over 2 forwards

    patched = []

    def patch(args, extra):
        patched.append(args["transformer_options"]["block_index"])
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("double_block", 2): patch, ("double_block", 3): patch}}}
    latents, condition, text, sigma, _ = inputs()
    # a recompilation (a guard that failed for another block, slot or weight address) raises
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        want = run(resident)
        assert graphs_compiled() == 1
        for _ in range(2):
            assert torch.equal(run(model), want)
        want_patched = resident(latents, condition, text, sigma, transformer_options=options)
        assert torch.equal(model(latents, condition, text, sigma, transformer_options=options), want_patched)
    assert graphs_compiled() == 1
    assert relative_l2(want, eager) < EAGER_RELATIVE_L2 and not torch.equal(want, eager)  # compiled, not eager
    assert torch.equal(want_patched, want) and patched == [2, 3, 2, 3]

    # the hooks ran around the compiled forwards: each streamed block waited for its copy, in both slots
    waits = [(slot, block) for kind, slot, block in transfers.log if kind == "wait"]
    assert [block for _, block in waits] == [0, 2, 4] * 3
    assert all({slot for slot, b in waits if b == block} == {0, 1} for block in streamer.streamed_indices)
    # the views the graph ran on keep inductor's 16-byte alignment
    for block in model.transformer_blocks:
        assert all(p.data_ptr() % 16 == 0 for p in block.parameters())


def test_fp8_blocks_with_their_scales_stream_compiled(tmp_path, fresh_dynamo):
    plain = fp8_model(tmp_path)  # float8 weights (parameters) and float32 scales (buffers) in the packed slots
    eager = run(plain)
    resident = copy.deepcopy(plain)
    resident.compile_blocks()
    model = copy.deepcopy(plain)
    stream_blocks(model, "cpu", resident_blocks=1, slots=2)
    model.compile_blocks()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        want = run(resident)
        for _ in range(2):
            assert torch.equal(run(model), want)
    assert graphs_compiled() == 1
    assert relative_l2(want, eager) < EAGER_RELATIVE_L2


def test_pipeline_under_a_budget_runs_compiled_streamed_blocks(fresh_dynamo):
    options = DecomposeOptions(layer_count=1, steps=2, seed=4)
    transformer, vae, text = models()
    roomy = RecordingBudget(transformer, vae, text, "cpu", budget=8 * 2**30)
    want = LayeredPipeline(transformer, vae, text, vram_budget=roomy)(picture(), "", options)
    (plan,) = roomy.plans
    # room for 2 resident blocks and 2 slots (as in test_offload): streamed, cond and uncond in one masked batch
    tight = plan.reserve_bytes + plan.other_bytes + plan.activation_bytes + 4 * plan.resident_bytes // BLOCKS
    eager_transformer, vae, text = models()
    squeezed = RecordingBudget(eager_transformer, vae, text, "cpu", budget=tight + 100)
    eager = LayeredPipeline(eager_transformer, vae, text, vram_budget=squeezed)(picture(), "", options)

    transformer, vae, text = models()
    squeezed = RecordingBudget(transformer, vae, text, "cpu", budget=tight + 100)
    transformer.compile_blocks()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = LayeredPipeline(transformer, vae, text, vram_budget=squeezed)(picture(), "", options)
    assert [(p.resident_blocks, p.streamed_blocks) for p in squeezed.plans] == [(2, 3)]
    assert graphs_compiled() == 1  # one graph for 5 blocks, 2 steps
    assert got.prompt == eager.prompt == want.prompt == "caption en 832x480"
    assert relative_l2(got.layer_images, eager.layer_images) < EAGER_RELATIVE_L2
    assert torch.allclose(got.layer_images, want.layer_images, atol=1e-4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_compiled_streaming_with_slow_copies_and_compute_equals_resident_compiled(fresh_dynamo):
    plain = tiny_model(torch.bfloat16)
    resident = copy.deepcopy(plain).cuda()
    resident.compile_blocks()
    model = copy.deepcopy(plain)
    streamer = BlockStreamer(model, "cuda", slots=2, transfers=SlowCopies(torch.device("cuda", 0), 2))
    streamer.load(2)
    model.compile_blocks()
    for block in model.transformer_blocks:  # a busy compute stream: a copy that did not wait would overwrite
        block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(2_000_000))
    gpu_inputs = [None if t is None else t.cuda() for t in inputs(torch.bfloat16)]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        want = resident(*gpu_inputs)
        for _ in range(3):
            assert torch.equal(model(*gpu_inputs), want)
    assert graphs_compiled() == 1
