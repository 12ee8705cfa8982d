"""The two CFG branches on two GPUs of one process, without torch.distributed: for ComfyUI, which samples in one
process.

:class:`TwoDeviceCFG` is a branch factory for :func:`~layered_core.sampling.sample`: each step the prompt's forward
runs on the sampler's model and device while a worker thread runs the negative prompt's on a second model on
another GPU (kernel launches return at once, so the two GPUs compute at the same time), and the negative's velocity
comes back to the first GPU. :func:`replicate` makes that second model: a copy of the first with its weights on the
second GPU, made without a second copy on the first.

Memory: the second GPU holds a whole copy of the weights (about 41 GB for the bf16 transformer, 20.5 GB for the fp8
one) and one branch's activations; the first holds one branch's activations instead of a batch-2 forward's. As with
processes (:mod:`.cfg`), both forwards are those of :func:`~layered_core.sampling.separate_branches`, so on two GPUs
of one model the latents equal one GPU's running the branches apart.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable

import torch
from torch import nn

from ..sampling import GuidedBranches, PromptEmbeddings, branch_velocity, separate_branches


def replicate(module: nn.Module, device: str | torch.device) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on ``device``, each copied there straight from where
    it is (never a second copy beside the original); ``module`` is left as it is. Compiled submodules come out
    eager: their compiled code calls the originals."""
    device = torch.device(device)
    memo: dict[int, object] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = nn.Parameter(parameter.detach().to(device, copy=True), requires_grad=False)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.detach().to(device, copy=True)
    replica = copy.deepcopy(module, memo)
    for submodule in replica.modules():
        submodule._compiled_call_impl = None  # what nn.Module.compile set
        vars(submodule).pop("forward", None)  # what VLDMMDiT.compile_blocks set: the class's forward again
    return replica


class TwoDeviceCFG:
    """A branch factory (``sample(..., branches=TwoDeviceCFG(second_model, device))``): the negative prompt's
    branch on ``second_model`` on ``device``, the prompt's on the sampler's model, at the same time."""

    def __init__(self, second_model: Callable, device: str | torch.device):
        self.second_model = second_model
        self.device = torch.device(device)

    def __call__(
        self,
        model: Callable,
        condition: torch.Tensor,
        prompt: PromptEmbeddings,
        negative: PromptEmbeddings | None,
        layer_count: int,
    ) -> GuidedBranches:
        if negative is None:  # unguided: one branch, nothing for the second device to do
            return separate_branches(model, condition, prompt, None, layer_count)
        second_condition, second_negative = condition.to(self.device), negative.to(self.device)

        def negative_branch(latents: torch.Tensor, sigma: torch.Tensor, results: list) -> None:
            try:
                with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                    velocity = branch_velocity(
                        self.second_model,
                        latents.to(self.device),
                        second_condition,
                        second_negative,
                        sigma.to(self.device),
                    )
                    results.append(velocity)
            except BaseException as error:  # handed to the sampling thread
                results.append(error)

        def run(latents: torch.Tensor, sigma: torch.Tensor):
            results: list = []
            worker = threading.Thread(target=negative_branch, args=(latents, sigma, results), daemon=True)
            worker.start()
            try:
                cond = branch_velocity(model, latents, condition, prompt, sigma)
            finally:
                worker.join()
            if isinstance(results[0], BaseException):
                raise results[0]
            return cond, results[0].to(cond.device)

        return run
