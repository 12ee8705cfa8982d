"""One process of the parallel tests' gloo runs (tests/test_parallel.py starts them with torchrun's environment):

    RANK=0 WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python -m tests.parallel_worker SCENARIO OUT

The scenarios write rank 0's results into OUT as safetensors files; the test computes the single-process results
from the same seeded model and inputs (:func:`tiny_model`, :func:`forward_case`, :func:`sampling_case`) and compares.
A :class:`~layered_core.distributed.group.ParallelError` ends the process with :data:`PARALLEL_ERROR`, its message on
stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from layered_core.distributed.cfg import ParallelSampling
from layered_core.distributed.group import Launch, ParallelError, handshake, make_groups, start, stop
from layered_core.distributed.layout import Layout
from layered_core.distributed.sequence import SequenceParallel
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.ops import quantize_linears_fp8
from layered_core.sampling import PromptEmbeddings, sample
from layered_core.tiny_models import randomize_

PARALLEL_ERROR = 3
# 12 heads, so that the sequence splits over 2, 3 and 4 processes
CONFIG = MMDiTConfig(num_layers=2, num_heads=12, head_dim=16, text_dim=48, axes_dims=(4, 6, 6))
SEQUENCE_DEGREES = (2, 3, 4)
FORWARD_CASES = ("masked-batch", "short-text")
SAMPLING_STEPS = 3


def tiny_model() -> VLDMMDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VLDMMDiT(CONFIG)
    return randomize_(model, 0, std=0.05).eval().requires_grad_(False)


def forward_case(name: str) -> dict:
    """The inputs of one forward. "masked-batch": batch 2, a prompt of 7 tokens whose second row is padded under a
    mask, 45 image tokens (1 layer, a 10x6 latent): lengths 2 and 4 do not divide. "short-text": 2 text tokens,
    fewer than 3 or 4 processes, and 48 image tokens."""
    gen = torch.Generator().manual_seed(len(name))
    if name == "masked-batch":
        batch, layers, height, width, length = 2, 1, 10, 6, 7
    else:
        batch, layers, height, width, length = 1, 2, 8, 6, 2
    mask = None
    if name == "masked-batch":
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[1, 5:] = False
    return {
        "latents": torch.randn(batch, 16, layers + 1, height, width, generator=gen),
        "condition": torch.randn(batch, 16, height, width, generator=gen),
        "text": torch.randn(batch, length, CONFIG.text_dim, generator=gen),
        "sigma": torch.rand(batch, generator=gen),
        "text_mask": mask,
    }


def sampling_case(equal_lengths: bool = False) -> dict:
    """A guided sampling run: prompts of 7 and 4 tokens (or 5 and 5), 2 layers on a 10x6 latent."""
    gen = torch.Generator().manual_seed(7)
    lengths = (5, 5) if equal_lengths else (7, 4)
    prompt, negative = (PromptEmbeddings(torch.randn(1, n, CONFIG.text_dim, generator=gen)) for n in lengths)
    condition = torch.randn(1, 16, 10, 6, generator=gen)
    return dict(condition=condition, prompt=prompt, negative=negative, layer_count=2, steps=SAMPLING_STEPS)


def _save(out: Path, name: str, tensor: torch.Tensor) -> None:
    save_file({"out": tensor.contiguous()}, str(out / f"{name}.safetensors"))


def sequence_forwards(run, model: VLDMMDiT, out: Path) -> None:
    """Each sequence degree over the first ranks, on each forward case."""
    for degree in SEQUENCE_DEGREES:
        group = dist.new_group(list(range(degree)))  # every rank creates every group
        if run.rank >= degree:
            continue
        sequence = SequenceParallel(group)
        for case in FORWARD_CASES:
            result = model(**forward_case(case), sequence=sequence)
            if run.rank == 0:
                _save(out, f"sequence{degree}-{case}", result)


def parallel_sampling(run, model: VLDMMDiT, layout: Layout, out: Path, name: str, equal_lengths=False) -> None:
    groups = make_groups(run, layout)
    parallel = ParallelSampling(model, groups)
    latents = sample(parallel.model, **sampling_case(equal_lengths), branches=parallel.branches)
    if run.rank == 0:
        _save(out, name, latents)


def fp8_model() -> VLDMMDiT:
    """:func:`tiny_model` with its block linears in float8 (FP8Linear), as an fp8 file loads kept in fp8."""
    model = tiny_model()
    quantize_linears_fp8(model)
    return model


def model_scenario(run, out: Path) -> None:
    model = tiny_model()
    sequence_forwards(run, model, out)
    if run.world_size == 4:
        parallel_sampling(run, model, Layout(data=2, cfg=2), out, "cfg2")
        parallel_sampling(run, model, Layout(data=2, cfg=2), out, "cfg2-equal", equal_lengths=True)
        parallel_sampling(run, model, Layout(cfg=2, sequence=2), out, "cfg2-seq2")
        parallel_sampling(run, fp8_model(), Layout(cfg=2, sequence=2), out, "fp8-cfg2-seq2")


def compile_scenario(run, out: Path) -> None:
    """Sequence degree 2 with the blocks compiled whole (fullgraph: the collectives break no graph)."""
    model = tiny_model()
    for block in model.transformer_blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    sequence = SequenceParallel(dist.group.WORLD)
    result = model(**forward_case("masked-batch"), sequence=sequence)
    if run.rank == 0:
        _save(out, "compiled-sequence2", result)


def memory_scenario(run, out: Path) -> None:
    """Load a transformer file (its path in LOAD_FILE) on the CPU; report how much private memory it took."""
    from layered_core.checkpoints import load_mmdit

    with torch.device("meta"):  # the first model built on the meta device costs a fixed amount (lazy set-up)
        VLDMMDiT(MMDiTConfig.tiny())
    before = _private_kib()
    model = load_mmdit(os.environ["LOAD_FILE"], dtype=torch.float32, device="cpu")
    sum(float(p.float().sum()) for p in model.parameters())  # every page read
    (out / f"private-kib-{run.rank}.txt").write_text(str(_private_kib() - before))
    dist.barrier()


def _private_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


def fault_scenario(run, out: Path, fault: str) -> None:
    """CFG-parallel sampling of many steps (sequence-parallel for "kill-sequence"); at step 2 rank 1 is killed
    ("kill", "kill-sequence") or stops answering ("stop", SIGSTOP: alive, its connections open)."""
    model = tiny_model()
    groups = make_groups(run, Layout(sequence=2) if fault == "kill-sequence" else Layout(cfg=2))
    parallel = ParallelSampling(model, groups)

    def fail(info):
        (out / f"step-{run.rank}").write_text(str(info.step))
        if run.rank == 1 and info.step == 2:
            os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)

    case = sampling_case() | {"steps": 1000}
    started = time.monotonic()
    try:
        sample(parallel.model, **case, branches=parallel.branches, callback=fail)
    finally:
        (out / f"seconds-{run.rank}").write_text(f"{time.monotonic() - started:.2f}")


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    launch = Launch.from_environment()
    try:
        run = start(launch, "cpu", timeout=float(os.environ.get("PARALLEL_TIMEOUT", "30")))
        try:
            handshake(run, {"scenario": scenario, "setting": os.environ.get("SETTING", "")})
            with torch.no_grad():
                if scenario == "model":
                    model_scenario(run, out)
                elif scenario == "compile":
                    compile_scenario(run, out)
                elif scenario == "memory":
                    memory_scenario(run, out)
                elif scenario in ("kill", "kill-sequence", "stop"):
                    fault_scenario(run, out, scenario)
                elif scenario != "handshake":
                    raise ValueError(f"unknown scenario {scenario!r}")
        finally:
            stop()
    except ParallelError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return PARALLEL_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
