"""Block weight streaming on the CPU: same outputs as the plain model, the copy/compute ordering, the
residency plan, and the pipeline and command line under a VRAM budget."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.checkpoints import load_mmdit, save_mmdit
from layered_core.memory import ACTIVATION_BYTES_PER_ELEMENT, GiB, gib, tensor_bytes
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.offload import BlockStreamer, CudaTransfers, SyncTransfers, stream_blocks
from layered_core.ops import FP8Linear, quantize_fp8
from layered_core.pipeline import DecomposeOptions, LayeredPipeline
from layered_core.placement import VRAMBudget
from layered_core.sampling import PromptEmbeddings, sample
from layered_core.text import text_encoder_tokens
from layered_core.tiny_models import randomize_
from layered_core.vae import RGBAVAE, VAEConfig

from .conftest import FakeTextEncoder

BLOCKS = 5
CONFIG = replace(MMDiTConfig.tiny(), num_layers=BLOCKS)  # tiny width, enough blocks to stream


def tiny_model(dtype=torch.float32, seed=0) -> VLDMMDiT:
    model = VLDMMDiT(CONFIG, dtype=dtype).eval().requires_grad_(False)
    return randomize_(model, seed)


def inputs(dtype=torch.float32, seed=1, masked=False):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2]) if masked else None
    return (
        torch.randn(2, 16, 3, 4, 6, generator=gen).to(dtype),
        torch.randn(2, 16, 4, 6, generator=gen).to(dtype),
        torch.randn(2, 5, CONFIG.text_dim, generator=gen).to(dtype),
        torch.tensor([0.9, 0.35]),
        mask,
    )


def run(model, dtype=torch.float32, masked=False):
    with torch.no_grad():
        return model(*inputs(dtype, masked=masked))


def points_into(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("resident", [0, 1, 3, BLOCKS])
def test_streamed_output_equals_the_plain_model(resident, slots, dtype):
    plain = tiny_model(dtype)
    want = run(plain, dtype)
    want_masked = run(plain, dtype, masked=True)
    model = copy.deepcopy(plain)
    streamer = stream_blocks(model, "cpu", resident_blocks=resident, slots=slots)
    assert (streamer.resident_blocks, streamer.streamed_blocks) == (resident, BLOCKS - resident)
    assert streamer.used_slots == min(slots, BLOCKS - resident)
    # resident blocks spread through the forward: the middles of equal runs
    assert streamer.resident_indices == {0: (), 1: (2,), 3: (0, 2, 4), BLOCKS: tuple(range(BLOCKS))}[resident]
    # the same math on the same values: bit for bit, on the first forward and on later ones
    assert torch.equal(run(model, dtype), want)
    assert torch.equal(run(model, dtype, masked=True), want_masked)
    assert torch.equal(run(model, dtype), want)
    # between forwards a streamed block's tensors are views of its packed host buffer
    for index in streamer.streamed_indices:
        for tensor in [*model.transformer_blocks[index].parameters(), *model.transformer_blocks[index].buffers()]:
            assert points_into(tensor, streamer.host_buffers[index])


def fp8_model(tmp_path, blocks=None) -> VLDMMDiT:
    """The tiny model through an fp8 file, loaded with fp8 kept; ``blocks`` quantises only those blocks
    (so the blocks get two layouts)."""
    model = tiny_model()
    if blocks is None:
        path = save_mmdit(model.state_dict(), tmp_path / "fp8.safetensors", layout="fp8-comfy-quant", config=CONFIG)
        return load_mmdit(path, dtype=torch.float32, fp8="keep")
    with torch.no_grad():
        for index in blocks:
            for name, linear in list(model.transformer_blocks[index].named_modules()):
                if isinstance(linear, torch.nn.Linear):
                    parent_name, _, child = name.rpartition(".")
                    fp8 = FP8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
                    weight, scale = quantize_fp8(linear.weight)
                    fp8.weight.data, fp8.weight_scale = weight, scale
                    fp8.bias.data = linear.bias.data.clone()
                    setattr(model.transformer_blocks[index].get_submodule(parent_name), child, fp8)
    return model


@pytest.mark.parametrize("resident,slots", [(0, 2), (1, 1), (2, 3), (BLOCKS, 2)])
def test_fp8_kept_blocks_stream_with_their_scales(tmp_path, resident, slots):
    plain = fp8_model(tmp_path)
    linear = plain.transformer_blocks[0].attn.to_q
    assert isinstance(linear, FP8Linear) and linear.weight.dtype == torch.float8_e4m3fn
    want = run(plain)
    model = copy.deepcopy(plain)
    streamer = stream_blocks(model, "cpu", resident_blocks=resident, slots=slots)
    assert torch.equal(run(model), want)
    assert torch.equal(run(model), want)
    block = model.transformer_blocks[BLOCKS - 1]
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert block.attn.to_q.weight_scale.dtype == torch.float32
    if resident < BLOCKS:
        assert points_into(block.attn.to_q.weight_scale, streamer.host_buffers[BLOCKS - 1])
    # float8 weights: about a quarter of the float32 block (biases stay float32, scales are added)
    assert streamer.block_bytes[0] < 0.4 * tensor_bytes(tiny_model().transformer_blocks[0])


def test_blocks_of_different_layouts_share_slots_sized_for_the_largest(tmp_path):
    plain = fp8_model(tmp_path, blocks=[1, 3])
    want = run(plain)
    model = copy.deepcopy(plain)
    streamer = stream_blocks(model, "cpu", resident_blocks=0, slots=2)
    assert streamer.layout_count == 2
    assert streamer.block_bytes[1] < streamer.block_bytes[0] == streamer.slot_bytes
    assert torch.equal(run(model), want)
    assert torch.equal(run(model), want)


class RecordingTransfers(SyncTransfers):
    """Synchronous copies that log what the CUDA path would enqueue, in order."""

    def __init__(self):
        self.log = []

    def copy(self, slot, destination, source, block):
        self.log.append(("copy", slot, block))
        super().copy(slot, destination, source, block)

    def wait_copied(self, slot, block):
        self.log.append(("wait", slot, block))

    def mark_free(self, slot, block):
        self.log.append(("free", slot, block))


def recorded_forwards(resident, slots, forwards=2):
    model = tiny_model()
    want = run(model)
    transfers = RecordingTransfers()
    streamer = BlockStreamer(model, "cpu", slots, transfers=transfers)
    streamer.load(resident)
    for index, block in enumerate(model.transformer_blocks):
        # after the streamer's pre-hook, before its post-hook: the span in which the block computes
        block.register_forward_pre_hook(lambda m, a, i=index: transfers.log.append(("start", None, i)))
        block.register_forward_hook(lambda m, a, o, i=index: transfers.log.append(("end", None, i)), prepend=True)
    for _ in range(forwards):
        assert torch.equal(run(model), want)
    return streamer, transfers.log


@pytest.mark.parametrize("resident,slots", [(0, 1), (0, 2), (1, 2), (2, 3), (1, 4), (3, 2)])
def test_a_slot_is_never_overwritten_while_its_block_runs(resident, slots):
    streamer, log = recorded_forwards(resident, slots)
    in_slot = {}  # slot -> block whose copy was issued last
    running = {}  # slot -> block that started and has not yet freed it
    waiting = set()  # blocks copied that have not run since
    for kind, slot, block in log:
        if kind == "copy":
            assert slot not in running, f"copy of block {block} into slot {slot} while block {running[slot]} runs"
            assert in_slot.get(slot) not in waiting, f"block {in_slot[slot]} overwritten before it ran"
            in_slot[slot] = block
            waiting.add(block)
        elif kind == "wait":
            assert in_slot[slot] == block  # the compute waits for the copy of its own block
            running[slot] = block
            waiting.discard(block)
        elif kind == "free":
            assert running.pop(slot) == block
        elif kind == "start" and block in streamer.streamed_indices:
            assert block in running.values()  # it computes on its slot, between its wait and its free
    assert not running


@pytest.mark.parametrize("resident,slots", [(0, 2), (1, 2), (2, 2), (1, 3), (0, 4)])
def test_copies_go_as_far_ahead_as_there_are_slots_and_on_into_the_next_forward(resident, slots):
    streamer, log = recorded_forwards(resident, slots, forwards=2)
    streamed = streamer.streamed_indices
    # the streamed blocks' runs over both forwards, in order; the k-th copy is for the k-th run
    starts = [at for at, (kind, _, block) in enumerate(log) if kind == "start" and block in streamed]
    copies = [(at, block) for at, (kind, _, block) in enumerate(log) if kind == "copy"]
    assert len(starts) == 2 * len(streamed)
    # the runs of both forwards, and the first slots - 1 of a third, prefetched while the second ends
    assert [block for _, block in copies] == [*streamed, *streamed, *streamed[: slots - 1]]
    for run, (at, _) in enumerate(copies):
        if run >= slots - 1 and run - (slots - 1) < len(starts):
            assert at < starts[run - (slots - 1)]  # issued before the block slots - 1 runs earlier starts
        if run >= slots:
            assert at > starts[run - slots]  # its slot held the block slots runs earlier
        else:
            assert at < starts[0]  # at load


def test_copies_per_forward_and_blocks_kept_in_slots_across_forwards():
    streamer, log = recorded_forwards(resident=1, slots=2, forwards=3)
    # every streamed block, every forward, and the first one again for a next forward
    assert sum(kind == "copy" for kind, _, _ in log) == 3 * (BLOCKS - 1) + 1
    # with as many slots as streamed blocks they stay in place: copied once, at load, for all forwards
    streamer, log = recorded_forwards(resident=2, slots=3, forwards=3)
    assert streamer.streamed_indices == (0, 2, 4)
    assert [entry for entry in log if entry[0] == "copy"] == [("copy", 0, 0), ("copy", 1, 2), ("copy", 2, 4)]


def test_remove_restores_ordinary_tensors_that_give_the_same_output():
    plain = tiny_model()
    want = run(plain)
    model = copy.deepcopy(plain)
    params = list(model.parameters())
    streamer = stream_blocks(model, "cpu", resident_blocks=2, slots=2)
    run(model)
    assert streamer.remove() is model
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the same Parameter objects
    assert not any(block._forward_pre_hooks or block._forward_hooks for block in model.transformer_blocks)
    assert streamer.host_bytes == 0
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(params)  # no tensor is a view into a shared packed buffer any more
    assert torch.equal(run(model), want)
    state, original = model.state_dict(), plain.state_dict()
    assert list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in state)
    stream_blocks(model, "cpu", resident_blocks=0, slots=1)  # and it can be streamed again
    assert torch.equal(run(model), want)


def test_block_patches_that_call_the_original_stream_too():
    plain = tiny_model()
    seen = []

    def patch(args, extra):
        seen.append(args["img"].shape)
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("double_block", 1): patch, ("double_block", 3): patch}}}
    latents, condition, text, sigma, _ = inputs()
    with torch.no_grad():
        want = plain(latents, condition, text, sigma, transformer_options=options)
        model = copy.deepcopy(plain)
        stream_blocks(model, "cpu", resident_blocks=0, slots=2)
        assert torch.equal(model(latents, condition, text, sigma, transformer_options=options), want)
    assert len(seen) == 4


def test_an_error_in_a_block_or_in_load_leaves_the_streamer_usable():
    model = tiny_model()
    want = run(model)
    transfers = RecordingTransfers()
    streamer = BlockStreamer(model, "cpu", 2, transfers=transfers)
    streamer.load(1)
    assert streamer.streamed_indices == (0, 1, 3, 4)

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = model.transformer_blocks[3].register_forward_hook(fail, prepend=True)
    with pytest.raises(RuntimeError, match="boom"):
        run(model)
    assert transfers.log[-1] == ("free", 0, 3)  # the slot was given back all the same
    handle.remove()
    assert torch.equal(run(model), want)

    class FailingTransfers(RecordingTransfers):
        def slots_allocated(self):
            raise torch.OutOfMemoryError("simulated")

    streamer = BlockStreamer(tiny_model(), "cpu", 2, transfers=FailingTransfers())
    with pytest.raises(torch.OutOfMemoryError):
        streamer.load(2)
    assert not streamer.loaded and streamer._resident == [] and streamer._slots == []
    assert all(points_into(p, streamer.host_buffers[0]) for p in streamer.blocks[0].parameters())


def test_remove_is_final():
    streamer = stream_blocks(tiny_model(), "cpu", resident_blocks=1)
    model = streamer.remove()
    assert streamer.remove() is model  # twice is harmless
    with pytest.raises(RuntimeError, match="was removed"):
        streamer.load(1)


def test_offload_and_load_with_another_resident_count():
    model = tiny_model()
    want = run(model)
    streamer = stream_blocks(model, "cpu", resident_blocks=3, slots=2)
    streamer.offload()
    assert not streamer.loaded
    assert all(points_into(p, streamer.host_buffers[0]) for p in model.transformer_blocks[0].parameters())
    assert torch.equal(run(model), want)  # the forward loads again, with the same K
    assert streamer.loaded and streamer.resident_blocks == 3
    streamer.load(1)
    assert (streamer.resident_blocks, streamer.streamed_blocks, streamer.used_slots) == (1, 4, 2)
    assert torch.equal(run(model), want)
    assert "1 of 5 blocks resident on cpu, 4 streamed through 2 slots" in streamer.describe()
    with pytest.raises(ValueError, match="resident_blocks must be 0..5, got 6"):
        streamer.load(6)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of vram_budget"):
        stream_blocks(tiny_model(), "cpu")
    with pytest.raises(ValueError, match="exactly one of vram_budget"):
        stream_blocks(tiny_model(), "cpu", vram_budget=GiB, resident_blocks=1)
    with pytest.raises(ValueError, match="slots must be a positive integer, got 0"):
        stream_blocks(tiny_model(), "cpu", resident_blocks=1, slots=0)
    with torch.device("meta"):
        empty = VLDMMDiT(CONFIG)
    with pytest.raises(ValueError, match="on the meta device"):
        stream_blocks(empty, "cpu", resident_blocks=0)
    for bad in (0, -1, float("nan"), float("inf"), "24", True):
        with pytest.raises(ValueError, match="VRAM budget must be a positive number of GiB"):
            gib(bad)
    assert gib(24) == 24 * 2**30 and gib(0.5) == 2**29 and gib(None) is None


# --------------------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class SlowCopies(CudaTransfers):
    """Each copy starts late: a block that did not wait for its copy would read the previous weights."""

    def copy(self, slot, destination, source, block):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(2_000_000)
        super().copy(slot, destination, source, block)


def cuda_run(model):
    with torch.no_grad():
        return model(*[None if t is None else t.cuda() for t in inputs(torch.bfloat16)])


def registered(buffer: torch.Tensor) -> bool:
    """Whether the buffer is page-locked by cudaHostRegister (torch's is_pinned() does not see that): a
    second registration fails with cudaErrorHostMemoryAlreadyRegistered."""
    from layered_core.offload import _clear_cuda_error

    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1))
    if error == 0:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        return False
    _clear_cuda_error()
    return error == 712


def stall_every_block(model, cycles=2_000_000):
    """Keep the compute stream busy for a while at the start of every block (after its copy was waited
    for): a copy that did not wait for its slot to be free would overwrite weights still in use."""
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(cycles))


@needs_cuda
@pytest.mark.parametrize("resident,slots", [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_cuda_streaming_with_a_slow_compute_stream_equals_the_resident_model(resident, slots):
    plain = tiny_model(torch.bfloat16)
    want = cuda_run(copy.deepcopy(plain).cuda())
    model = copy.deepcopy(plain)
    streamer = stream_blocks(model, "cuda", resident_blocks=resident, slots=slots)
    assert streamer.pinned_bytes == streamer.host_bytes > 0
    assert all(registered(buffer) for buffer in streamer.host_buffers)
    stall_every_block(model)
    for _ in range(3):
        assert torch.equal(cuda_run(model), want)
    before = torch.cuda.memory_allocated()
    streamer.offload()
    assert before - torch.cuda.memory_allocated() >= sum(streamer.block_bytes[:resident])
    assert torch.equal(cuda_run(model), want)  # loads again
    streamer.remove("cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert torch.equal(cuda_run(model), want)


@needs_cuda
@pytest.mark.parametrize("slots", [1, 2])
def test_cuda_streaming_with_slow_copies_equals_the_resident_model(slots):
    plain = tiny_model(torch.bfloat16)
    want = cuda_run(copy.deepcopy(plain).cuda())
    model = copy.deepcopy(plain)
    streamer = BlockStreamer(model, "cuda", slots, transfers=SlowCopies(torch.device("cuda", 0), slots))
    streamer.load(1)
    for _ in range(3):
        assert torch.equal(cuda_run(model), want)


# --------------------------------------------------------------------------- sampling and the pipeline


def test_batch_guidance_pads_the_shorter_prompt_and_matches_two_forwards():
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    condition = torch.randn(1, 16, 4, 6, generator=gen)
    prompt = PromptEmbeddings(torch.randn(1, 7, CONFIG.text_dim, generator=gen))
    negative = PromptEmbeddings(torch.randn(1, 2, CONFIG.text_dim, generator=gen))
    calls, lengths = [], []

    def counted(*args):
        calls.append(args[0].shape[0])
        lengths.append(args[2].shape[1])
        return model(*args)

    settings = dict(layer_count=2, steps=3, cfg_scale=4.0, seed=1)
    two = sample(counted, condition, prompt, negative, **settings)
    assert calls == [1, 1] * 3
    calls.clear()
    one = sample(counted, condition, prompt, negative, batch_guidance=True, **settings)
    assert calls == [2] * 3
    # 7 prompt tokens padded to 8, so that with the 4 x 2 x 3 image tokens the sequence is a multiple of 8
    assert lengths[-1] == 8
    # the same math up to the masked attention kernel's rounding
    assert ((one - two).norm() / two.norm()).item() < 1e-5 and (one - two).abs().max().item() < 1e-4


def picture(width=100, height=60, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def models():
    transformer = tiny_model()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
    return transformer, vae, FakeTextEncoder(CONFIG.text_dim)


class RecordingBudget(VRAMBudget):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plans = []

    def sampling(self, image_tokens, text_tokens, batch):
        context = super().sampling(image_tokens, text_tokens, batch)
        self.plans.append(self.streamer.plan(self.budget, image_tokens, text_tokens, batch))
        return context


def test_pipeline_under_a_budget_gives_the_same_layers():
    options = DecomposeOptions(layer_count=1, steps=1, seed=4)
    want = LayeredPipeline(*models())(picture(), "a poster", options)

    transformer, vae, text = models()
    roomy = RecordingBudget(transformer, vae, text, "cpu", budget=8 * GiB)
    got = LayeredPipeline(transformer, vae, text, vram_budget=roomy)(picture(), "a poster", options)
    assert torch.equal(got.layer_images, want.layer_images) and torch.equal(got.composite, want.composite)
    (plan,) = roomy.plans
    # 100x60 -> the 832x480 bucket: 3 frames of 52x30 patches; prompts of 8 and 1 tokens; cond + uncond
    assert plan.activation_bytes == ACTIVATION_BYTES_PER_ELEMENT * 2 * (3 * 52 * 30 + 8) * 64
    assert (plan.resident_blocks, plan.streamed_blocks) == (BLOCKS, 0)
    assert not roomy.streamer.loaded  # block memory given back after sampling
    assert roomy.text_encoder_fits(text_encoder_tokens(512)) and text.devices == ["cpu", "cpu"]

    # a budget with room for 2 resident blocks and 2 slots: streamed, and cond + uncond in one masked batch
    transformer, vae, text = models()
    tight = plan.reserve_bytes + plan.other_bytes + plan.activation_bytes + 4 * plan.resident_bytes // BLOCKS
    squeezed = RecordingBudget(transformer, vae, text, "cpu", budget=tight + 100)
    got = LayeredPipeline(transformer, vae, text, vram_budget=squeezed)(picture(), "a poster", options)
    (plan,) = squeezed.plans
    assert (plan.resident_blocks, plan.streamed_blocks, plan.slots) == (2, 3, 2)
    assert torch.allclose(got.layer_images, want.layer_images, atol=1e-4)
    # 2 KiB of weights + the 2 GiB margin of a model of unknown shape do not fit beside the blocks
    assert not squeezed.text_encoder_fits(text_encoder_tokens(512))


def test_from_files_with_a_budget(tmp_path):
    from layered_core.tiny_models import write_tiny_set

    folder = write_tiny_set(tmp_path / "tiny", components=["model_index", "transformer", "vae"])
    options = DecomposeOptions(layer_count=1, steps=1)
    files = dict(transformer=folder, vae=folder, dtype=torch.float32)
    plain = LayeredPipeline.from_files(**files)
    budgeted = LayeredPipeline.from_files(**files, vram_budget_gb=4)
    assert plain.vram_budget is None and budgeted.vram_budget.budget == 4 * GiB
    assert "VRAM budget 4.00 GiB" in budgeted.vram_budget.describe()
    embeddings = (PromptEmbeddings(torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(0))), None)
    a = plain(picture(), "x", options, prompt_embeddings=embeddings)
    b = budgeted(picture(), "x", options, prompt_embeddings=embeddings)
    assert torch.equal(a.layer_images, b.layer_images)
    with pytest.raises(ValueError, match=r"VRAM budget 0\.50 GiB is too small: .* at least 1\.5\d GiB"):
        LayeredPipeline.from_files(**files, vram_budget_gb=0.5)
    with pytest.raises(ValueError, match="VRAM budget must be a positive number of GiB, got -2"):
        LayeredPipeline.from_files(**files, vram_budget_gb=-2)


def test_decompose_command_with_a_vram_budget(tmp_path, capsys):
    from layered_core.cli import main
    from layered_core.tiny_models import write_tiny_set

    folder = write_tiny_set(tmp_path / "tiny")
    picture(64, 48).save(tmp_path / "in.png")
    base = ["decompose", str(tmp_path / "in.png"), "--out", str(tmp_path / "out"), "--model", str(folder)]
    base += ["--layers", "1", "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--prompt", "a test"]
    assert main([*base, "--vram-budget", "0"]) == 2
    assert "VRAM budget must be a positive number of GiB, got 0.0" in capsys.readouterr().err
    assert main([*base, "--vram-budget", "1"]) == 2
    assert "VRAM budget 1.00 GiB is too small" in capsys.readouterr().err
    assert main([*base, "--vram-budget", "6", "--format", "png"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert (tmp_path / "out" / "in" / "layer_01.png").exists()
