"""CFG parallelism: the prompt's branch on one process, the negative prompt's on another, their velocities
exchanged every step so that both take the same Euler step; and :class:`ParallelSampling`, what one process of a
parallel run gives the pipeline to sample with.

What is bit-identical to what. Each process runs exactly the forward that
:func:`~layered_core.sampling.separate_branches` runs for its branch (the same operations in the same order on the
same shapes) and the exchange copies bits, so a CFG-parallel run equals, bit for bit, one process sampling with
``branches=separate_branches`` (two forwards of the images' batch a step) on the same kind of device with the same
thread count. It does not equal the default single-process path bit for bit when that path batches equally long
prompts into one forward of twice the batch: the timestep and modulation products then have two rows instead of
one, which BLAS computes another way (on the CPU in float32 the sampled latents differ by about 1e-6; on GPUs the
kernels chosen for each shape may differ too). Against that path the error is one of rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..sampling import GuidedBranches, PromptEmbeddings, branch_velocity, default_branches
from .group import Groups, collective
from .sequence import SequenceParallel


def share_tensor(tensor: torch.Tensor | None, group: dist.ProcessGroup) -> torch.Tensor | None:
    """Group rank 0's ``tensor`` on every process of ``group`` (shape and dtype sent first, so the others' may
    differ, or be None where rank 0's is)."""
    if group is None:
        return tensor
    device = _collective_device(group)
    present = torch.tensor([tensor is not None], dtype=torch.int64, device=device)
    source = dist.get_global_rank(group, 0)
    with collective("sharing the sampler's inputs"):
        dist.broadcast(present, src=source, group=group)
        if not present.item():
            return None
        header = torch.zeros(9, dtype=torch.int64, device=device)
        if dist.get_rank(group) == 0:
            header[0] = _DTYPES.index(tensor.dtype)
            header[1] = tensor.ndim
            header[2 : 2 + tensor.ndim] = torch.tensor(tensor.shape)
        dist.broadcast(header, src=source, group=group)
        shape = tuple(header[2 : 2 + int(header[1])].tolist())
        if dist.get_rank(group) == 0:
            data = tensor.to(device).contiguous()
        else:
            data = torch.empty(shape, dtype=_DTYPES[int(header[0])], device=device)
        dist.broadcast(data, src=source, group=group)
    return data if tensor is None else data.to(tensor.device)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.bool, torch.int64, torch.uint8)


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where ``group``'s collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_prompt(prompt: PromptEmbeddings | None, group: dist.ProcessGroup | None) -> PromptEmbeddings | None:
    """Group rank 0's prompt embeddings (and mask) on every process of ``group``."""
    embeddings = share_tensor(None if prompt is None else prompt.embeddings, group)
    if embeddings is None:
        return None
    return PromptEmbeddings(embeddings, share_tensor(None if prompt is None else prompt.mask, group))


def exchange(velocity: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches' velocities on both processes of a cfg pair: (the prompt's, the negative prompt's)."""
    velocity = velocity.contiguous()
    both = [torch.empty_like(velocity), torch.empty_like(velocity)]
    with collective("exchanging the CFG branches' velocities"):
        dist.all_gather(both, velocity, group=group)
    return both[0], both[1]


class ParallelSampling:
    """The pipeline's ``parallel`` (see :class:`~layered_core.pipeline.LayeredPipeline`) for one process:

    - :meth:`model`, the velocity model: the transformer on this process's shard of the sequence when the layout
      splits it, else the transformer itself;
    - :meth:`branches`, the branch factory :func:`~layered_core.sampling.sample` takes: the inputs made the same on
      every process of the image group (its first process's), then this process's branch, exchanged, when the
      layout splits the branches; else both branches as one process runs them."""

    def __init__(self, transformer: Callable, groups: Groups):
        self.transformer = transformer
        self.groups = groups
        self.sequence = SequenceParallel(groups.sequence) if groups.sequence is not None else None

    def model(self, latents, condition, text, sigma, text_mask=None) -> torch.Tensor:
        if self.sequence is None:
            return self.transformer(latents, condition, text, sigma, text_mask)
        return self.transformer(latents, condition, text, sigma, text_mask, sequence=self.sequence)

    def branches(
        self,
        model: Callable,
        condition: torch.Tensor,
        prompt: PromptEmbeddings,
        negative: PromptEmbeddings | None,
        layer_count: int,
    ) -> GuidedBranches:
        image_group = self.groups.image
        condition = share_tensor(condition, image_group)
        prompt, negative = share_prompt(prompt, image_group), share_prompt(negative, image_group)
        if self.groups.cfg is None:
            return default_branches(prompt, negative)(model, condition, prompt, negative, layer_count)
        if negative is None:
            raise ValueError(
                "CFG-parallel sampling runs the prompt's and the negative prompt's branches on two processes; this "
                "run is unguided (a cfg scale of 1 or no negative prompt): lay it out with cfg=1"
            )
        own = prompt if self.groups.cfg_index == 0 else negative
        cfg_group = self.groups.cfg

        def run(latents: torch.Tensor, sigma: torch.Tensor):
            return exchange(branch_velocity(model, latents, condition, own, sigma), cfg_group)

        return run
