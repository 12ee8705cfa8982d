"""How the processes of a parallel run share the work: ``data x cfg x sequence``.

A run of W processes is ``data`` image groups of ``cfg * sequence`` processes each. An image group decomposes its
own share of the images; inside one, the two CFG branches (the prompt's and the negative prompt's) run on different
processes when ``cfg`` is 2, and each branch's joint sequence is split over ``sequence`` processes (Ulysses, see
:mod:`.sequence`). Rank r sits at data index ``r // (cfg * sequence)``, cfg index ``(r // sequence) % cfg`` and
sequence index ``r % sequence``: the processes of one sequence group, which talk most, are neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMES = {"dp": "data", "data": "data", "cfg": "cfg", "seq": "sequence", "sequence": "sequence"}


@dataclass(frozen=True)
class Layout:
    """``data`` image groups, each of ``cfg`` branches (1 or 2) times ``sequence`` shards."""

    data: int = 1
    cfg: int = 1
    sequence: int = 1

    def __post_init__(self):
        for name in ("data", "cfg", "sequence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"the {name} degree must be a positive integer, got {value!r}")
        if self.cfg > 2:
            raise ValueError(
                f"the cfg degree is 1 or 2 (two branches: the prompt's and the negative's), got {self.cfg}"
            )

    @property
    def world_size(self) -> int:
        return self.data * self.cfg * self.sequence

    @property
    def group_size(self) -> int:
        """The processes that decompose one image together."""
        return self.cfg * self.sequence

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(data index, cfg index, sequence index) of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this layout's {self.world_size} processes")
        return rank // self.group_size, (rank // self.sequence) % self.cfg, rank % self.sequence

    def rank(self, data: int, cfg: int, sequence: int) -> int:
        return data * self.group_size + cfg * self.sequence + sequence

    def image_groups(self) -> list[list[int]]:
        """The ranks of each image group, in data order."""
        return [[self.rank(d, c, s) for c in range(self.cfg) for s in range(self.sequence)] for d in range(self.data)]

    def cfg_groups(self) -> list[list[int]]:
        """The ranks that exchange their branches' velocities: same image group and sequence index, cfg order."""
        return [[self.rank(d, c, s) for c in range(self.cfg)] for d in range(self.data) for s in range(self.sequence)]

    def sequence_groups(self) -> list[list[int]]:
        """The ranks that share one branch's sequence, in shard order."""
        return [[self.rank(d, c, s) for s in range(self.sequence)] for d in range(self.data) for c in range(self.cfg)]

    def __str__(self) -> str:
        return f"dp={self.data},cfg={self.cfg},seq={self.sequence}"


def parse_layout(text: str, world_size: int) -> Layout | None:
    """``--parallel``'s value for a run of ``world_size`` processes: None for "auto", else the layout it names, as
    ``cfg=2,seq=4`` (keys dp, cfg, seq; an absent cfg or seq is 1, an absent dp takes the processes left over)."""
    text = text.strip()
    if text == "auto":
        return None
    degrees: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, equals, value = part.partition("=")
        name = NAMES.get(key.strip())
        if not equals or name is None or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--parallel {text}: expected 'auto' or degrees such as dp=2,cfg=2,seq=2; got {part!r}")
        if name in degrees:
            raise ValueError(f"--parallel {text}: {key.strip()} is given twice")
        degrees[name] = int(value)
    if not degrees:
        raise ValueError("--parallel: expected 'auto' or degrees such as cfg=2,seq=4")
    try:
        per_image = Layout(cfg=degrees.get("cfg", 1), sequence=degrees.get("sequence", 1)).group_size
    except ValueError as e:
        raise ValueError(f"--parallel {text}: {e}") from None
    if "data" not in degrees:
        if world_size % per_image:
            raise ValueError(
                f"--parallel {text} runs {per_image} processes per image, which do not divide the {world_size} "
                f"started: start a multiple of {per_image} (torchrun --nproc-per-node {per_image} -m layered_core ...)"
            )
        degrees["data"] = world_size // per_image
    layout = Layout(**degrees)
    if layout.world_size != world_size:
        raise ValueError(
            f"--parallel {text} lays out {layout.world_size} processes, but {world_size} were started "
            f"(torchrun --nproc-per-node {layout.world_size} -m layered_core ...)"
        )
    return layout


def sequence_degrees(heads: int) -> list[int]:
    """The sequence degrees a model of ``heads`` attention heads takes: the divisors of ``heads``."""
    return [d for d in range(1, heads + 1) if heads % d == 0]


def check_layout(layout: Layout, heads: int, guided: bool) -> Layout:
    """``layout`` if it can run a model of ``heads`` heads, guided or not; else ValueError saying what can."""
    if heads % layout.sequence:
        degrees = ", ".join(map(str, sequence_degrees(heads)))
        raise ValueError(
            f"--parallel {layout}: the sequence degree {layout.sequence} does not divide the model's {heads} attention "
            f"heads; it takes {degrees}"
        )
    if layout.cfg == 2 and not guided:
        raise ValueError(
            f"--parallel {layout}: cfg=2 runs the prompt's and the negative prompt's branches on two processes, and "
            "this run is unguided (--cfg 1): use cfg=1"
        )
    return layout


def choose_layout(world_size: int, images: int, heads: int, guided: bool) -> Layout:
    """The layout for ``world_size`` processes and ``images`` images: as many image groups as there are images
    (each group's processes work alone, so more groups is the better use), the processes of a group split into
    the two CFG branches when guided, then into sequence shards. An image group gets no images only when no layout
    with fewer groups fits the model's heads."""
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    # the most groups up to the image count, then (if none of those fits) the fewest above it
    order = sorted((d for d in divisors if d <= images), reverse=True) + [d for d in divisors if d > images]
    for data in order:
        per_image = world_size // data
        cfg = 2 if guided and per_image % 2 == 0 else 1
        if heads % (per_image // cfg) == 0:
            return Layout(data, cfg, per_image // cfg)
    raise AssertionError("data = world_size always fits")  # per_image 1
