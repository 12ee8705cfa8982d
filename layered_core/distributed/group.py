"""The process group of a parallel run as torchrun starts it, the startup handshake, the groups of a layout, and
what a failed collective becomes.

torchrun (``torchrun --nproc-per-node N -m layered_core ...``) starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; there is no process manager here. :func:`start` joins the group: NCCL
when the processes run on CUDA GPUs (each on the GPU of its LOCAL_RANK), gloo on the CPU, with a timeout after
which a collective waiting on a process that died or hangs fails (gloo raises; NCCL's watchdog ends the process).
Beside it a gloo group carries the control messages, the handshake and the summary, as JSON (nothing a peer sends
is unpickled). :func:`handshake` compares every process's fingerprint of its configuration with rank 0's, so that
processes started with other arguments, code or models stop at once with an error naming the difference.
:func:`collective` turns a failed collective into :class:`RankFailure`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .layout import Layout

DEFAULT_TIMEOUT = 600.0
"""Seconds a collective waits for the other processes (PyTorch's own default for NCCL)."""

FINISH_TIMEOUT = timedelta(days=7)
"""How long the end of a run waits for the other image groups. They finish at their own pace (in a resumed run one
group may have nothing left to do while another has hours of images); a process that dies closes its connections,
which ends the wait at once."""

_timeout = DEFAULT_TIMEOUT  # of the group joined, for the errors' text


class ParallelError(Exception):
    """A parallel run cannot go on; every process stops with it. Not a RuntimeError, so that the batch's handling
    of one image's failure (which goes on with the next image) lets it through."""


class ConfigMismatch(ParallelError):
    """The processes of a run were started with different configurations."""


class RankFailure(ParallelError):
    """A collective failed: another process died, or did not answer within the timeout."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Launch | None:
        """The launch torchrun describes, or None when the process was not started by it (no WORLD_SIZE)."""
        if "WORLD_SIZE" not in environ:
            return None
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in environ]
        if missing:
            raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} not: start the processes with torchrun")
        try:
            rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local_rank = int(environ.get("LOCAL_RANK", environ["RANK"]))
        except ValueError as e:
            raise ValueError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers: {e}") from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK {rank} is not one of WORLD_SIZE {world_size}'s ranks")
        return cls(rank, world_size, local_rank)


@dataclass
class Run:
    """A joined process group: this process's launch, its device, the backend and the control group."""

    launch: Launch
    device: torch.device
    backend: str
    timeout: float
    control: dist.ProcessGroup  # gloo, the run's timeout: the handshake
    finish: dist.ProcessGroup  # gloo, FINISH_TIMEOUT: the summary

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size


def start(launch: Launch, device_type: str, timeout: float = DEFAULT_TIMEOUT) -> Run:
    """Join the run's process group: on ``device_type`` "cuda" through NCCL, this process on the GPU of its local
    rank; on "cpu" through gloo. Collectives fail after ``timeout`` seconds of waiting."""
    global _timeout
    if not timeout > 0:
        raise ValueError(f"the parallel timeout must be a positive number of seconds, got {timeout}")
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK {launch.local_rank} has no GPU: this machine has {count} "
                f"(torchrun --nproc-per-node {count})"
            )
        device, backend = torch.device("cuda", launch.local_rank), "nccl"
        torch.cuda.set_device(device)
    elif device_type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"a parallel run takes CUDA GPUs (NCCL) or the CPU (gloo), not {device_type}")
    _timeout = timeout
    wait = timedelta(seconds=timeout)
    with collective(f"joining the process group of {launch.world_size} processes"):
        dist.init_process_group(
            backend,
            timeout=wait,
            rank=launch.rank,
            world_size=launch.world_size,
            device_id=device if backend == "nccl" else None,
        )
        control = dist.new_group(backend="gloo", timeout=wait) if backend != "gloo" else dist.group.WORLD
        finish = dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT)
    return Run(launch, device, backend, timeout, control, finish)


def stop() -> None:
    """Leave the process group, if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Collectives inside the block that fail (gloo raises RuntimeError, NCCL DistBackendError) raise
    :class:`RankFailure` saying ``what`` was under way."""
    try:
        yield
    except (ParallelError, torch.OutOfMemoryError):
        raise
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RankFailure(
            f"{what} failed: a process of the parallel run died or did not answer within {_timeout:.0f} s, so "
            f"the run stops ({detail})"
        ) from error


def all_gather_json(value, group: dist.ProcessGroup) -> list:
    """Every process's ``value`` (anything JSON writes), in rank order, over a CPU (gloo) group."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return [
        json.loads(bytes(g[: int(s.item())].tolist()).decode("utf-8")) for g, s in zip(gathered, sizes, strict=True)
    ]


def differences(fingerprints: list[dict]) -> list[str]:
    """What each rank's fingerprint has that rank 0's has not, as "rank 1 has --steps 20, rank 0 50"."""
    reference = fingerprints[0]
    found = []
    for rank, other in enumerate(fingerprints[1:], start=1):
        for key in sorted(set(reference) | set(other)):
            if other.get(key) != reference.get(key):
                found.append(f"rank {rank} has {key} {_shown(other.get(key))}, rank 0 {_shown(reference.get(key))}")
    return found


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def handshake(run: Run, fingerprint: dict) -> None:
    """Compare every process's ``fingerprint`` (the arguments, code and models it runs with) with rank 0's; on a
    difference every process raises :class:`ConfigMismatch` naming it."""
    with collective("the startup handshake"):
        fingerprints = all_gather_json(fingerprint, run.control)
    found = differences(fingerprints)
    if found:
        shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigMismatch(f"the processes of this run were not started alike: {shown}")


@dataclass
class Groups:
    """This process's groups in a layout: the image group (all the processes on its images), the cfg pair that
    exchanges the branches' velocities and the sequence group; None where the group would be this process alone."""

    layout: Layout
    data_index: int
    cfg_index: int
    sequence_index: int
    image: dist.ProcessGroup | None
    cfg: dist.ProcessGroup | None
    sequence: dist.ProcessGroup | None

    @property
    def writes(self) -> bool:
        """Whether this process writes its image group's outputs (the group's first process does)."""
        return self.cfg_index == 0 and self.sequence_index == 0


def make_groups(run: Run, layout: Layout) -> Groups:
    """The groups of ``layout`` (every process creates every group, in one order, as torch.distributed asks)."""
    if layout.world_size != run.world_size:
        raise ValueError(f"layout {layout} is for {layout.world_size} processes, the run has {run.world_size}")
    mine: dict[str, dist.ProcessGroup | None] = {"image": None, "cfg": None, "sequence": None}
    wait = timedelta(seconds=run.timeout)
    with collective("creating the layout's process groups"):
        for kind, lists in (
            ("image", layout.image_groups()),
            ("cfg", layout.cfg_groups()),
            ("sequence", layout.sequence_groups()),
        ):
            for ranks in lists:
                if len(ranks) > 1:
                    group = dist.new_group(ranks, timeout=wait)
                    if run.rank in ranks:
                        mine[kind] = group
    return Groups(layout, *layout.coordinates(run.rank), **mine)
