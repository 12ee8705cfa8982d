"""Parallel decomposition on gloo (CPU processes): CFG-parallel sampling bit-identical to one process running the two
branches apart, sequence parallelism (degrees 2, 3 and 4, lengths they do not divide, a padded prompt's mask)
within 1e-6 of one process in float32, both together, compiled blocks, the processes sharing memory-mapped weights,
a killed or stopped rank and a mismatched configuration ending the run with an error, and ``decompose`` under
torchrun: data parallel over a folder (each image written once, one summary, resumable) and CFG parallel.

The processes are started as torchrun starts them (its environment; :mod:`tests.parallel_worker` is one of them),
each on one thread: the single-process references below are computed on one thread too, as CPU results may depend
on the thread count."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from layered_core.checkpoints import save_mmdit
from layered_core.cli import build_parser, main
from layered_core.distributed.command import fingerprint
from layered_core.distributed.group import Launch, differences
from layered_core.distributed.layout import Layout, check_layout, choose_layout, parse_layout
from layered_core.distributed.sequence import SequenceShard, balanced_splits
from layered_core.distributed.two_devices import TwoDeviceCFG, replicate
from layered_core.mmdit import MMDiTConfig, VLDMMDiT
from layered_core.sampling import sample, separate_branches
from tests.comfy_server import _free_port
from tests.parallel_worker import (
    FORWARD_CASES,
    PARALLEL_ERROR,
    SEQUENCE_DEGREES,
    forward_case,
    fp8_model,
    sampling_case,
    tiny_model,
)

REPO = Path(__file__).resolve().parents[1]


def start_ranks(world: int, scenario: str, out: Path, env: dict | None = None, per_rank=None) -> list:
    """``world`` worker processes with torchrun's environment (``per_rank(rank)`` adds to one's)."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    children = []
    for rank in range(world):
        environ = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        environ |= {"MASTER_PORT": port, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
        environ |= (env or {}) | (per_rank(rank) if per_rank else {})
        command = [sys.executable, "-m", "tests.parallel_worker", scenario, str(out)]
        children.append(subprocess.Popen(command, cwd=REPO, env=environ, stderr=subprocess.PIPE, text=True))
    return children


def finish(children, timeout: float = 120) -> list[tuple[int, str]]:
    """(exit code, stderr) of each, killing any still running after ``timeout`` seconds."""
    results = []
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            _, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        results.append((child.returncode, err))
    return results


def run_ranks(world: int, scenario: str, out: Path, **kwargs) -> list[tuple[int, str]]:
    results = finish(start_ranks(world, scenario, out, **kwargs))
    for code, err in results:
        assert code == 0, err
    return results


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def result(out: Path, name: str) -> torch.Tensor:
    return load_file(str(out / f"{name}.safetensors"))["out"]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """Four processes: sequence degrees 2, 3, 4 on both forward cases, cfg=2 (two pairs), cfg=2 x seq=2."""
    out = tmp_path_factory.mktemp("parallel")
    run_ranks(4, "model", out)
    return out


@pytest.fixture(scope="module")
def reference_model():
    return tiny_model()


@pytest.mark.parametrize("equal_lengths", [False, True], ids=["prompts-7-and-4", "prompts-5-and-5"])
def test_cfg_parallel_is_bit_identical_to_one_process_running_the_branches_apart(
    model_run, reference_model, equal_lengths
):
    name = "cfg2-equal" if equal_lengths else "cfg2"
    with one_thread(), torch.no_grad():
        alone = sample(reference_model, **sampling_case(equal_lengths), branches=separate_branches)
        default = sample(reference_model, **sampling_case(equal_lengths))  # equal lengths: one batch-2 forward
    assert torch.equal(result(model_run, name), alone)
    # against the batched forward the difference is rounding (the batch-2 modulation products round otherwise)
    assert relative_l2(result(model_run, name), default) < 1e-6


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("degree", SEQUENCE_DEGREES)
def test_sequence_parallel_forward_is_within_1e6_of_one_process(model_run, reference_model, degree, case):
    with one_thread(), torch.no_grad():
        alone = reference_model(**forward_case(case))
    ours = result(model_run, f"sequence{degree}-{case}")
    assert ours.shape == alone.shape
    assert relative_l2(ours, alone) < 1e-6
    assert ((ours - alone).abs().max() / alone.abs().max()).item() < 1e-6


@pytest.mark.parametrize("weights", ["float32", "fp8"])
def test_cfg_and_sequence_parallel_together_sample_as_one_process(model_run, reference_model, weights):
    model = reference_model if weights == "float32" else fp8_model()
    with one_thread(), torch.no_grad():
        alone = sample(model, **sampling_case(), branches=separate_branches)
    assert relative_l2(result(model_run, "cfg2-seq2" if weights == "float32" else "fp8-cfg2-seq2"), alone) < 1e-6


def test_compiled_blocks_run_the_sequence_parallel_attention_whole(tmp_path, reference_model):
    run_ranks(2, "compile", tmp_path)
    with one_thread(), torch.no_grad():
        alone = reference_model(**forward_case("masked-batch"))
    assert relative_l2(result(tmp_path, "compiled-sequence2"), alone) < 1e-6


def test_processes_on_one_host_share_the_memory_mapped_weights(tmp_path):
    """Two processes load a 170 MB float32 transformer file on the CPU: the tensors stay views of the file's page
    cache, so neither holds a private copy."""
    config = MMDiTConfig(num_layers=8, num_heads=12, head_dim=32, text_dim=48, axes_dims=(8, 12, 12))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = VLDMMDiT(config).state_dict()
    path = save_mmdit(state, tmp_path / "transformer.safetensors", layout="comfy", config=config)
    file_kib = path.stat().st_size // 1024
    del state
    run_ranks(2, "memory", tmp_path, env={"LOAD_FILE": str(path)})
    for rank in (0, 1):
        private = int((tmp_path / f"private-kib-{rank}.txt").read_text())
        assert private < 0.1 * file_kib, f"rank {rank} took {private} KiB of private memory for a {file_kib} KiB file"


def test_a_killed_rank_ends_the_run_with_an_error(tmp_path):
    # a timeout far above what noticing the death takes even on a loaded machine: ending before it proves the death
    # was noticed, not waited out
    results = finish(start_ranks(2, "kill", tmp_path, env={"PARALLEL_TIMEOUT": "60"}), timeout=150)
    (code, err), (killed, _) = results
    assert killed == -signal.SIGKILL
    assert code == PARALLEL_ERROR, err
    assert "RankFailure: exchanging the CFG branches' velocities failed: a process of the parallel run died" in err
    assert int((tmp_path / "step-0").read_text()) == 2  # rank 1 died after step 2: rank 0 stopped at step 3
    assert float((tmp_path / "seconds-0").read_text()) < 60


def test_a_rank_killed_inside_the_sequence_parallel_attention_ends_the_run_with_an_error(tmp_path):
    results = finish(start_ranks(2, "kill-sequence", tmp_path, env={"PARALLEL_TIMEOUT": "20"}), timeout=90)
    (code, err), (killed, _) = results
    assert killed == -signal.SIGKILL
    assert code == PARALLEL_ERROR, err
    assert "RankFailure: the sequence-parallel attention's all-to-all failed: a process of the parallel run died" in err


def test_a_rank_that_stops_answering_ends_the_run_within_the_timeout(tmp_path):
    children = start_ranks(2, "stop", tmp_path, env={"PARALLEL_TIMEOUT": "4"})
    try:
        code, err = finish(children[:1], timeout=90)[0]
    finally:
        children[1].send_signal(signal.SIGKILL)  # stopped, it would wait for SIGCONT
        children[1].communicate()
    assert code == PARALLEL_ERROR, err
    assert "did not answer within 4 s" in err
    assert (
        4 <= float((tmp_path / "seconds-0").read_text()) < 4 + 40
    )  # the timeout, then at most a loaded machine's delay


def test_a_mismatched_configuration_stops_every_rank(tmp_path):
    results = finish(start_ranks(2, "handshake", tmp_path, per_rank=lambda rank: {"SETTING": "ab"[rank]}))
    for code, err in results:
        assert code == PARALLEL_ERROR, err
        assert (
            "ConfigMismatch: the processes of this run were not started alike: rank 1 has setting 'b', rank 0 'a'"
            in (err)
        )


# -- decompose under torchrun ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory) -> Path:
    from layered_core.tiny_models import write_comfy_models

    models = tmp_path_factory.mktemp("comfy") / "models"
    write_comfy_models(models)
    return models


def noise_images(folder: Path, names: str) -> Path:
    folder.mkdir()
    for seed, name in enumerate(names):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def decompose(*args: str, processes: int = 0) -> subprocess.CompletedProcess:
    """``decompose`` on the tiny models, as torchrun runs it with ``processes`` (else one plain process)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    launcher += ["--master-port", str(_free_port()), "-m", "layered_core"]
    command = launcher if processes else [sys.executable, "-m", "layered_core"]
    settings = ["--layers", "2", "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--format", "png"]
    environ = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "decompose", *args, *settings], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )


def test_data_parallel_decompose_writes_each_image_once_with_one_summary_and_resumes(comfy_models, tmp_path):
    images = noise_images(tmp_path / "images", "abc")
    out = tmp_path / "out"
    args = (str(images), "--out", str(out), "--model", str(comfy_models), "--prompt", "a test")
    first = decompose(*args, processes=2)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(" done, ") == 1 and "3 done, 0 skipped (already done), 0 failed" in first.stdout
    assert "parallel: 2 processes on gloo, dp=2,cfg=1,seq=1" in first.stderr
    done = re.findall(r"^(rank 1: )?\[\d/\d\] \S+/images/(\w)\.png: done in ", first.stderr, flags=re.MULTILINE)
    # rank 0 takes images 1 and 3, rank 1 image 2: each image once
    assert sorted(done) == [("", "a"), ("", "c"), ("rank 1: ", "b")]
    for name in "abc":
        assert sorted(p.name for p in (out / name).iterdir()) == ["done.json", "layer_01.png", "layer_02.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]

    again = decompose(*args)  # the records are an image's, not a process's: one process takes the run up
    assert again.returncode == 0, again.stderr
    assert "0 done, 3 skipped (already done), 0 failed" in again.stdout


def test_cfg_parallel_decompose_writes_the_single_process_layers(comfy_models, tmp_path):
    """The prompt and the negative prompt differ in length, so one process runs the branches as two forwards:
    the CFG-parallel run samples the same bits, and the layers are the same pixels."""
    images = noise_images(tmp_path / "images", "a")
    common = ("--model", str(comfy_models), "--prompt", "a red cat sitting on a blue sofa")
    parallel = decompose(str(images), "--out", str(tmp_path / "parallel"), *common, "--parallel", "cfg=2", processes=2)
    assert parallel.returncode == 0, parallel.stderr
    assert "parallel: 2 processes on gloo, dp=1,cfg=2,seq=1" in parallel.stderr
    alone = decompose(str(images), "--out", str(tmp_path / "alone"), *common)
    assert alone.returncode == 0, alone.stderr
    for name in ("layer_01.png", "layer_02.png"):
        ours, theirs = (np.asarray(Image.open(tmp_path / run / "a" / name)) for run in ("parallel", "alone"))
        assert np.array_equal(ours, theirs)


def test_a_layout_that_needs_torchrun_is_refused_without_it(comfy_models, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    images = noise_images(tmp_path / "images", "a")
    args = ["decompose", str(images), "--out", str(tmp_path / "out"), "--model", str(comfy_models), "--device", "cpu"]
    assert main([*args, "--parallel", "cfg=2"]) == 2
    err = capsys.readouterr().err
    assert "--parallel cfg=2 runs 2 processes per image, which do not divide the 1 started" in err
    assert "(torchrun --nproc-per-node 2 -m layered_core ...)" in err
    assert main([*args, "--parallel", "cfg=2,seq"]) == 2
    assert (
        "--parallel cfg=2,seq: expected 'auto' or degrees such as dp=2,cfg=2,seq=2; got 'seq'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


# -- the layout and the shards, without processes ---------------------------------------------------------------


def test_layouts_parse_and_refuse_what_cannot_run():
    assert parse_layout("auto", 8) is None
    assert parse_layout("cfg=2,seq=4", 8) == Layout(data=1, cfg=2, sequence=4)
    assert parse_layout("seq=2", 8) == Layout(data=4, cfg=1, sequence=2)
    assert parse_layout("dp=2, cfg=2, seq=2", 8) == Layout(2, 2, 2)
    for text, problem in (
        ("dp=2,cfg=2", "--parallel dp=2,cfg=2 lays out 4 processes, but 8 were started"),
        ("cfg=3", "the cfg degree is 1 or 2"),
        ("seq=0", "got 'seq=0'"),
        ("cfg=2,cfg=2", "cfg is given twice"),
        ("seq=3", "runs 3 processes per image, which do not divide the 8 started"),
    ):
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_layout(text, 8)
    with pytest.raises(ValueError, match=re.escape("does not divide the model's 24 attention heads; it takes 1, 2, 3")):
        check_layout(Layout(sequence=5), heads=24, guided=True)
    with pytest.raises(ValueError, match="this run is unguided"):
        check_layout(Layout(cfg=2), heads=24, guided=False)


@pytest.mark.parametrize(
    "world, images, heads, guided, expected",
    [
        (8, 1, 24, True, Layout(1, 2, 4)),  # one image: both branches, each over 4 processes
        (8, 100, 24, True, Layout(8, 1, 1)),  # many: every process its own images
        (8, 3, 24, True, Layout(2, 2, 2)),  # the most groups up to the image count
        (8, 1, 24, False, Layout(1, 1, 8)),  # unguided: no branches to split
        (5, 1, 24, True, Layout(5, 1, 1)),  # 5 does not divide the heads: groups left without images
        (6, 1, 2, True, Layout(3, 2, 1)),
    ],
)
def test_the_automatic_layout(world, images, heads, guided, expected):
    assert choose_layout(world, images, heads, guided) == expected


def test_a_layouts_groups():
    layout = Layout(2, 2, 2)
    assert layout.coordinates(5) == (1, 0, 1) and layout.rank(1, 0, 1) == 5
    assert layout.image_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.cfg_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.sequence_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_shard_cuts_each_stream_and_orders_the_mask_as_the_keys_are_gathered():
    assert balanced_splits(7, 3) == [3, 2, 2] and balanced_splits(2, 4) == [1, 1, 0, 0]
    text_length, image_length = 5, 7
    tokens = torch.arange(image_length)[None, :, None].float()
    text = 100 + torch.arange(text_length)[None, :, None].float()
    pe = torch.arange(text_length + image_length)[:, None, None, None].float()
    mask = torch.tensor([[True, True, True, False, False] + [True] * image_length])
    shards = [SequenceShard("unused", rank, 3, text_length, image_length) for rank in range(3)]
    cuts = [shard.cut(tokens, text, pe, mask) for shard in shards]
    assert [c[0].flatten().tolist() for c in cuts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [c[1].flatten().tolist() for c in cuts] == [[100, 101], [102, 103], [104]]
    # the RoPE rows of each process's [text ; image]: the joint positions of its tokens
    assert [c[2].flatten().tolist() for c in cuts] == [[0, 1, 5, 6, 7], [2, 3, 8, 9], [4, 10, 11]]
    # the keys gathered in rank order: text 0 1, image 0 1 2, text 2 3, image 3 4, text 4, image 5 6
    gathered = [True, True, True, True, True, True, False, True, True, False, True, True]
    assert all(c[3].tolist() == [gathered] for c in cuts)
    assert shards[0].lengths == [5, 4, 3]
    with pytest.raises(ValueError, match="this shard is for 5 text and 7 image tokens, got 4 and 7"):
        shards[0].cut(tokens, text[:, :4], pe, mask)


def test_torchruns_environment_is_read_and_checked():
    assert Launch.from_environment({}) is None
    environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert Launch.from_environment(environ) == Launch(rank=1, world_size=2, local_rank=1)
    with pytest.raises(ValueError, match="WORLD_SIZE is set but RANK, MASTER_ADDR, MASTER_PORT not"):
        Launch.from_environment({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK 2 is not one of WORLD_SIZE 2's ranks"):
        Launch.from_environment(environ | {"RANK": "2"})


# -- two devices of one process (ComfyUI's) ---------------------------------------------------------------------


def test_two_device_cfg_samples_the_bits_of_one_device_running_the_branches_apart(reference_model):
    """On the CPU both "devices" are the CPU: the second branch runs on a replica in a worker thread."""
    replica = replicate(reference_model, "cpu")
    with one_thread(), torch.no_grad():
        alone = sample(reference_model, **sampling_case(), branches=separate_branches)
        both = sample(reference_model, **sampling_case(), branches=TwoDeviceCFG(replica, "cpu"))
        unguided = sample(
            reference_model, **sampling_case() | {"negative": None}, branches=TwoDeviceCFG(replica, "cpu")
        )
        plain = sample(reference_model, **sampling_case() | {"negative": None})
    assert torch.equal(both, alone)
    assert torch.equal(unguided, plain)


def test_a_replica_of_compiled_blocks_runs_its_own_weights():
    model = tiny_model()
    model.compile_blocks()  # never run here: the replica must come out with plain blocks, running its own weights
    replica = replicate(model, "cpu")
    assert model.blocks_compiled and not replica.blocks_compiled
    model.uncompile_blocks()
    for parameter in replica.parameters():
        parameter.data.zero_()
    with torch.no_grad():
        assert not replica(**forward_case("short-text")).any()


def test_a_replica_copies_every_tensor_straight_to_its_device(reference_model):
    replica = replicate(reference_model, "meta")  # a copy made through the original's device would be on the CPU
    assert all(t.device.type == "meta" for t in [*replica.parameters(), *replica.buffers()])
    assert all(p.device.type == "cpu" for p in reference_model.parameters())
    on_cpu = replicate(reference_model, "cpu")
    for (name, ours), theirs in zip(on_cpu.named_parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(ours, theirs) and ours.data_ptr() != theirs.data_ptr(), name


def test_a_failing_second_branch_fails_the_step(reference_model):
    def broken(*args):
        raise RuntimeError("the second GPU is gone")

    with pytest.raises(RuntimeError, match="the second GPU is gone"), torch.no_grad():
        sample(reference_model, **sampling_case(), branches=TwoDeviceCFG(broken, "cpu"))


def test_the_handshake_names_the_flag_two_processes_differ_in(tmp_path):
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"0" * 10)
    plan = types.SimpleNamespace(
        images=[tmp_path / "a.png"],
        models=types.SimpleNamespace(transformer=model_file, vae=tmp_path, text_encoder=tmp_path),
    )
    parser = build_parser()
    common = ["decompose", "a.png", "--out", "out", "--background", "ffffff"]
    prints = [fingerprint(parser.parse_args([*common, "--steps", steps]), plan) for steps in ("50", "20")]
    assert differences(prints) == ["rank 1 has --steps 20, rank 0 50"]
    assert prints[0]["--background"] == "(255, 255, 255)" and prints[0][f"the size of {model_file}"] == 10
