"""``decompose`` as one process of a parallel run under torchrun.

    torchrun --nproc-per-node 8 -m layered_core decompose photos/ --out layers/ --model models/
    torchrun --nproc-per-node 8 -m layered_core decompose photo.png --out layers/ --model models/ --parallel cfg=2,seq=4

Every process parses the same command line and plans the same batch. :class:`ParallelDecompose` then joins the
process group, checks that every process was started alike (the handshake), lays the processes out (``--parallel``,
else :func:`~.layout.choose_layout` for the processes and images given) and runs this process's share: the images
of its image group, written by the group's first process only, resumable as a single-process batch is. At the end
the image groups' results come together and rank 0 prints the one summary.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batch import BatchResult, run_batch
from ..checkpoints import infer_mmdit_config, open_transformer
from ..progress import Progress, TerminalProgress
from ..sampling import is_guided
from .cfg import ParallelSampling
from .group import (
    DEFAULT_TIMEOUT,
    Groups,
    Launch,
    Run,
    all_gather_json,
    collective,
    handshake,
    make_groups,
    start,
    stop,
)
from .layout import Layout, check_layout, choose_layout, parse_layout

PACKAGE = Path(__file__).resolve().parents[1]


def add_parallel_arguments(parser) -> None:
    """``decompose``'s flags for runs under torchrun."""
    parser.add_argument(
        "--parallel",
        default="auto",
        metavar="LAYOUT",
        help="under torchrun: how the processes share the work, as dp=D,cfg=C,seq=S (D image groups, each running "
        "the C=1 or 2 CFG branches on their own processes and each branch's sequence over S processes; S divides the "
        "model's 24 heads); auto (the default) makes as many image groups as there are images, then splits the "
        "branches, then the sequence",
    )
    parser.add_argument(
        "--parallel-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before the run stops with an error "
        "(default %(default)s)",
    )


def code_version() -> str:
    """A short hash of this package's source files: processes running other code would not agree."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(args, plan) -> dict:
    """What every process of a run must agree on, by the name an error shows: each flag, the code, torch, the
    images and the model files' sizes."""
    found = {f"--{key.replace('_', '-')}": _plain(value) for key, value in sorted(vars(args).items())}
    images = hashlib.sha256("\n".join(map(str, plan.images)).encode()).hexdigest()[:16]
    found |= {"the code": code_version(), "torch": torch.__version__, "the images": f"{len(plan.images)}, {images}"}
    for path in (plan.models.transformer, plan.models.vae, plan.models.text_encoder):
        found[f"the size of {path}"] = _size(path)
    return found


def _plain(value):
    return value if value is None or isinstance(value, bool | int | float | str) else repr(value)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class RankProgress(TerminalProgress):
    """Another image group's progress: plain lines, each prefixed with the rank; the run's notes are rank 0's."""

    def __init__(self, rank: int, stream=None):
        super().__init__(stream if stream is not None else sys.stderr, interactive=False)
        self.prefix = f"rank {rank}: "

    def note(self, text: str) -> None:
        pass

    def _line(self, text: str) -> None:
        super()._line(self.prefix + text)


class SilentProgress(Progress):
    """The progress of a process that writes nothing: its image group's first process reports."""

    def show(self, text: str, final: bool) -> None:
        pass

    def keep(self, text: str, warning: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class ParallelDecompose:
    """One process's part of a parallel ``decompose``: :meth:`plan` (checks, before anything starts), :meth:`start`
    (the process group, the handshake, the layout), :meth:`run_batch`, :meth:`stop`."""

    launch: Launch
    layout_text: str
    timeout: float
    device_type: str
    run: Run | None = None
    layout: Layout | None = None
    groups: Groups | None = None

    @classmethod
    def plan(cls, args, plan) -> ParallelDecompose | None:
        """The parallel part of ``decompose``, or None for a process torchrun did not start. ValueError for flags
        that cannot work: a layout of several processes without torchrun, one GPU named for all the processes."""
        launch = Launch.from_environment()
        # the layout's syntax, now; one of several processes without torchrun is refused, naming the command
        parse_layout(args.parallel, 1 if launch is None else launch.world_size)
        if launch is None:
            return None
        if args.vram_budget is not None:
            raise ValueError("--vram-budget does not go with a parallel run: every process holds the transformer")
        device = torch.device(plan.device)
        if device.type == "cuda" and device.index is not None and launch.world_size > 1:
            raise ValueError(
                f"--device {plan.device}: under torchrun every process takes the GPU of its LOCAL_RANK; "
                "pass --device cuda (or auto)"
            )
        return cls(launch, args.parallel, args.parallel_timeout, device.type)

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def device(self) -> str:
        return str(self.run.device) if self.run is not None else self.device_type

    def start(self, args, plan) -> None:
        """Join the process group, compare the processes' configurations, lay them out and make the groups."""
        self.run = start(self.launch, self.device_type, self.timeout)
        handshake(self.run, fingerprint(args, plan))
        source, prefix = open_transformer(plan.models.transformer)
        heads = infer_mmdit_config(source, prefix).num_heads
        guided = is_guided(plan.settings.options.cfg_scale)
        layout = parse_layout(self.layout_text, self.launch.world_size)
        if layout is None:
            layout = choose_layout(self.launch.world_size, len(plan.images), heads, guided)
        self.layout = check_layout(layout, heads, guided)
        self.groups = make_groups(self.run, self.layout)

    def describe(self) -> str:
        groups = self.layout.data
        return (
            f"parallel: {self.launch.world_size} processes on {self.run.backend}, {self.layout}: {groups} image "
            f"group{'s' * (groups != 1)} of {self.layout.cfg} CFG branch{'es' * (self.layout.cfg != 1)} x "
            f"{self.layout.sequence} sequence shard{'s' * (self.layout.sequence != 1)}"
        )

    def progress(self, terminal: TerminalProgress) -> Progress:
        """This process's progress: rank 0's is the terminal's; another image group's first process prints plain
        lines with its rank; the other processes, which write nothing, say nothing."""
        if self.rank == 0:
            return terminal
        if self.groups.writes:
            return RankProgress(self.rank, terminal.stream)
        return SilentProgress()

    def run_batch(self, pipeline, plan, progress: Progress) -> BatchResult:
        """This image group's share of the images, then every group's results (the same on every process)."""
        pipeline.parallel = ParallelSampling(pipeline.transformer, self.groups)
        share = plan.images[self.groups.data_index :: self.layout.data]
        result = run_batch(
            pipeline, plan.images, plan.out, plan.settings, progress, share=share, writes=self.groups.writes
        )
        mine = _as_json(result) if self.groups.writes else None
        with collective("gathering the image groups' results"):
            everyone = all_gather_json(mine, self.run.finish)
        return _merged([part for part in everyone if part is not None], plan.images)

    def stop(self) -> None:
        stop()


def _as_json(result: BatchResult) -> dict:
    return {
        "done": [str(p) for p in result.done],
        "skipped": [str(p) for p in result.skipped],
        "failed": {str(p): reason for p, reason in result.failed.items()},
        "redone": {str(p): reason for p, reason in result.redone.items()},
    }


def _merged(parts: list[dict], images: list[Path]) -> BatchResult:
    """The groups' results as one, in the images' order."""
    order = {str(p): index for index, p in enumerate(images)}
    merged = BatchResult()
    for key in ("done", "skipped"):
        paths = sorted((p for part in parts for p in part[key]), key=order.__getitem__)
        getattr(merged, key).extend(Path(p) for p in paths)
    for key in ("failed", "redone"):
        entries = sorted((item for part in parts for item in part[key].items()), key=lambda kv: order[kv[0]])
        getattr(merged, key).update((Path(p), reason) for p, reason in entries)
    return merged
