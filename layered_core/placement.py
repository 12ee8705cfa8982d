"""Where the pipeline's three models sit under a VRAM budget: one large model on the GPU at a time."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .memory import GiB, ResidencyPlan, tensor_bytes, text_encoder_visit_bytes
from .mmdit import image_token_count
from .offload import stream_blocks
from .text import text_encoder_tokens

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


class VRAMBudget:
    """Where the pipeline's three models sit under a VRAM budget: one large model on the GPU at a time.

    The transformer streams its blocks (:class:`BlockStreamer`) and holds block memory only while it
    samples, with K planned for that decomposition's tokens. The VAE and the text encoder live on the
    CPU and visit the GPU while they run, the block memory given back first. The text encoder visits
    for a piece of work (prompts, a caption) only if its weights, its activations for that work
    (:func:`~layered_core.memory.text_encoder_activation_bytes`) and the reserve fit in the budget beside the
    transformer's other weights; otherwise it runs on the CPU, which takes minutes for a caption. Qwen2.5-VL-7B
    with float8 linears kept visits under 12 GiB for a 640 px caption; in bf16 (15.4 GiB) it needs more than 16.
    """

    def __init__(self, transformer, vae, text_encoder, device, budget: int, slots: int = 2):
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"VRAM budget must be a positive number of bytes, got {budget!r}")
        self.device = torch.device(device)
        self.budget = budget
        self.vae = vae.to("cpu") if vae is not None else None
        self.text_encoder = text_encoder
        model = getattr(text_encoder, "model", None)
        self.text_model = model if isinstance(model, nn.Module) else None
        if self.text_model is not None:
            self.text_model.to("cpu")
        self.text_encoder_bytes = tensor_bytes(self.text_model) if self.text_model is not None else 0
        # Refused now only if not even the smallest decomposition (640 px, one layer, no guidance) fits;
        # each call plans K for its own tokens.
        smallest = image_token_count(1, 80, 80, transformer.config.patch_size)
        self.streamer = stream_blocks(
            transformer, device, budget, slots=slots, image_tokens=smallest, text_tokens=1, batch=1, load=False
        )
        self._visiting: set[int] = set()
        self._text_encoder_fits: bool | None = None  # while the text encoder is placed, whether on the GPU
        self._warned_cpu = False

    def describe(self) -> str:
        caption = self.text_encoder_device(text_encoder_tokens(512, caption=True), (640, 640))
        return (
            f"VRAM budget {self.budget / GiB:.2f} GiB: {self.streamer.describe()}; text encoder "
            f"({self.text_encoder_bytes / GiB:.2f} GiB) runs a 640 px caption on {caption}"
        )

    # -- the text encoder ------------------------------------------------------------------------------

    def text_encoder_bytes_needed(self, text_tokens: int, image_size: tuple[int, int] | None = None) -> int:
        """GPU bytes the text encoder's visit takes for this work (see :func:`.memory.text_encoder_visit_bytes`)."""
        return text_encoder_visit_bytes(self.text_model, self.streamer.other_bytes, text_tokens, image_size)

    def text_encoder_fits(self, text_tokens: int, image_size: tuple[int, int] | None = None) -> bool:
        """Whether the text encoder runs on the GPU for this work (see :meth:`text_encoder_placed`); while it is
        placed, whether it is there."""
        if self._text_encoder_fits is not None:
            return self._text_encoder_fits
        return self.text_model is not None and self.text_encoder_bytes_needed(text_tokens, image_size) <= self.budget

    def text_encoder_device(self, text_tokens: int, image_size: tuple[int, int] | None = None) -> torch.device:
        """Where the text encoder runs for this work: the GPU where it fits the budget, else the CPU."""
        return self.device if self.text_encoder_fits(text_tokens, image_size) else CPU

    @contextlib.contextmanager
    def text_encoder_placed(
        self, text_tokens: int, image_size: tuple[int, int] | None = None
    ) -> Iterator[torch.device]:
        """The text encoder where it runs for sequences of ``text_tokens`` text tokens and an image of
        ``image_size`` (width, height; None: no caption), for the duration; yields that device. On the GPU it
        visits (:meth:`visiting`: the blocks given back first) and its caption state goes with it after; on the CPU
        the log says why. Re-entrant: an inner call keeps the outer one's place."""
        if self._text_encoder_fits is not None or self.text_model is None:
            yield self.text_encoder_device(text_tokens, image_size)
            return
        fits = self.text_encoder_fits(text_tokens, image_size)
        if not fits:
            log = logger.info if self._warned_cpu else logger.warning
            self._warned_cpu = True
            log(
                "the text encoder runs on the CPU: with its activations%s and the CUDA workspace reserve it needs "
                "%.2f GiB, more than the %.2f GiB VRAM budget (%.2f GiB of weights; pass a prompt to skip the slow "
                "auto-caption)",
                f" for a {image_size[0]}x{image_size[1]} caption" if image_size else "",
                self.text_encoder_bytes_needed(text_tokens, image_size) / GiB,
                self.budget / GiB,
                self.text_encoder_bytes / GiB,
            )
        self._text_encoder_fits = fits
        try:
            with self.visiting(self.text_model if fits else None):
                try:
                    yield self.device if fits else CPU
                finally:
                    release = getattr(self.text_encoder, "release_caption_state", None)
                    if fits and release is not None:
                        release()
        finally:
            self._text_encoder_fits = None

    # -- visits and sampling -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def visiting(self, module: nn.Module | None) -> Iterator[None]:
        """``module`` on the device for the duration (re-entrant), the blocks' memory given back first; its host
        tensors are kept and put back after, so leaving costs no copy."""
        if module is None or id(module) in self._visiting:
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
