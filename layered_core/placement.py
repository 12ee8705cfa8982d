"""Where the pipeline's three models sit under a VRAM budget: one large model on the GPU at a time."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .memory import TEXT_ENCODER_MARGIN, WORKSPACE_RESERVE, GiB, ResidencyPlan, tensor_bytes
from .mmdit import image_token_count
from .offload import stream_blocks

logger = logging.getLogger(__name__)


class VRAMBudget:
    """Where the pipeline's three models sit under a VRAM budget: one large model on the GPU at a time.

    The transformer streams its blocks (:class:`BlockStreamer`) and holds block memory only while it
    samples, with K planned for that decomposition's tokens. The VAE and the text encoder live on the
    CPU and visit the GPU while they run, the block memory given back first. The text encoder visits
    only if its weights, :data:`TEXT_ENCODER_MARGIN` and the reserve fit in the budget beside the
    transformer's other weights; otherwise it runs on the CPU (Qwen2.5-VL-7B is 15.5 GiB in bf16: it
    visits under 24 GiB and runs on the CPU under 16, where an auto-caption takes minutes).
    """

    def __init__(self, transformer, vae, text_encoder, device, budget: int, slots: int = 2):
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"VRAM budget must be a positive number of bytes, got {budget!r}")
        self.device = torch.device(device)
        self.budget = budget
        self.vae = vae.to("cpu") if vae is not None else None
        model = getattr(text_encoder, "model", None)
        if isinstance(model, nn.Module):
            model.to("cpu")
        # Refused now only if not even the smallest decomposition (640 px, one layer, no guidance) fits;
        # each call plans K for its own tokens.
        smallest = image_token_count(1, 80, 80, transformer.config.patch_size)
        self.streamer = stream_blocks(
            transformer, device, budget, slots=slots, image_tokens=smallest, text_tokens=1, batch=1, load=False
        )
        text_bytes = tensor_bytes(model) if isinstance(model, nn.Module) else 0
        self.text_encoder_visits = (
            isinstance(model, nn.Module)
            and self.streamer.other_bytes + text_bytes + TEXT_ENCODER_MARGIN + WORKSPACE_RESERVE <= budget
        )
        if isinstance(model, nn.Module) and not self.text_encoder_visits:
            logger.warning(
                "the text encoder (%.1f GiB) does not fit a %.1f GiB VRAM budget: it runs on the CPU (pass a prompt "
                "to skip the slow auto-caption)",
                text_bytes / GiB,
                budget / GiB,
            )
        self._visiting: set[int] = set()

    def describe(self) -> str:
        where = self.device if self.text_encoder_visits else "cpu"
        return f"VRAM budget {self.budget / GiB:.2f} GiB: {self.streamer.describe()}; text encoder runs on {where}"

    @contextlib.contextmanager
    def visiting(self, module: nn.Module | None, text_encoder: bool = False) -> Iterator[None]:
        """``module`` on the device for the duration (re-entrant); its host tensors are kept and put back
        after, so leaving costs no copy. The text encoder stays on the CPU when it does not fit."""
        if module is None or id(module) in self._visiting or (text_encoder and not self.text_encoder_visits):
            yield
            return
        self.streamer.offload()
        kept = _move_tensors(module, self.device)
        self._visiting.add(id(module))
        try:
            yield
        finally:
            self._visiting.discard(id(module))
            _restore_tensors(kept)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def sampling(self, image_tokens: int, text_tokens: int, batch: int) -> Iterator[ResidencyPlan]:
        """The transformer's blocks on the device, K planned for this workload; given back after."""
        plan = self.streamer.plan(self.budget, image_tokens, text_tokens, batch)
        self.streamer.load(plan.resident_blocks)
        logger.info("sampling with %s", self.streamer.describe())
        try:
            yield plan
        finally:
            self.streamer.offload()


def _move_tensors(module: nn.Module, device: torch.device) -> list:
    """Point every parameter and buffer of ``module`` at a copy on ``device``; returns what to restore.

    Shared tensors are copied once. Parameters keep their objects (new ``.data``), as accelerate does."""
    kept, moved_params, moved_buffers = [], set(), {}
    with torch.no_grad():
        for owner in module.modules():
            for param in owner._parameters.values():
                if param is not None and id(param) not in moved_params:
                    moved_params.add(id(param))
                    kept.append((param, None, None, param.data))
                    param.data = param.data.to(device)
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    if id(buffer) not in moved_buffers:
                        moved_buffers[id(buffer)] = buffer.to(device)
                    kept.append((None, owner, name, buffer))
                    owner._buffers[name] = moved_buffers[id(buffer)]
    return kept


def _restore_tensors(kept: list) -> None:
    for param, owner, name, tensor in kept:
        if param is not None:
            param.data = tensor
        else:
            owner._buffers[name] = tensor
