"""Image -> RGBA layers: the decomposition pipeline, and recursive splitting of a layer.

Data flows one way: image -> condition latent (VAE) -> prompt embeddings (Qwen2.5-VL) -> sampler
(VLD-MMDiT) -> latent frames -> RGBA layers (VAE) -> layer stack.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from .checkpoints import load_mmdit, load_vae
from .image import BUCKETS, bucket_size, flatten, image_to_bchw, resize_layers, resize_rgba, to_rgba
from .layers import LayerStack, attach_split, rgba_to_pil, stack_from_bhwc
from .memory import gib
from .mmdit import image_token_count
from .placement import VRAMBudget
from .sampling import PromptEmbeddings, StepInfo, check_layer_count, forward_batch, sample
from .text import load_text_encoder, text_encoder_tokens
from .vae import DEFAULT_FRAMES_PER_BATCH, decode_frames

logger = logging.getLogger(__name__)

CAPTION_LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class DecomposeOptions:
    """Settings of one decomposition; the defaults are the official app's."""

    layer_count: int = 4
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_normalize: bool = True
    negative_prompt: str = " "
    resolution: int = 640
    seed: int = 0
    caption_language: str = "en"
    keep_input_size: bool = False  # layers at the input's own size instead of the model's bucket
    max_sequence_length: int = 512  # prompt tokens kept (the reference pipeline's default; at most 1024)
    background: tuple[int, int, int] | None = None  # flatten RGBA input onto this colour first

    def __post_init__(self):
        if self.caption_language not in CAPTION_LANGUAGES:
            raise ValueError(f"caption_language must be one of {CAPTION_LANGUAGES}, got {self.caption_language!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 1 <= self.max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be in 1..1024, got {self.max_sequence_length}")
        # checked here, before any model runs, so a bad setting costs nothing
        check_layer_count(self.layer_count)
        if not self.cfg_scale > 0:
            raise ValueError(f"cfg_scale must be positive, got {self.cfg_scale}")
        if self.resolution not in BUCKETS:
            raise ValueError(f"resolution must be one of {BUCKETS}, got {self.resolution}")


@dataclass
class Decomposition:
    """The model's answer: N straight-alpha RGBA layers bottom to top, and its own composite (frame 0)."""

    layer_images: torch.Tensor  # (N, 4, H, W) float32 in [0, 1]
    composite: torch.Tensor  # (4, H, W) float32 in [0, 1]
    prompt: str
    seconds: dict[str, float] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)  # where each stage of ``seconds`` ran ("cuda:0", "cpu")

    def stack(self, names: list[str] | None = None) -> LayerStack:
        """The layers as a :class:`LayerStack`, each cut to its alpha box."""
        return stack_from_bhwc(self.layer_images.permute(0, 2, 3, 1), names=names)


def is_blank_prompt(prompt: str | None) -> bool:
    """Whether ``prompt`` is empty, which asks for the auto-caption (as in the reference)."""
    return prompt is None or prompt.strip() == ""


class LayeredPipeline:
    """The three models and the steps between them.

    ``transformer`` is a :class:`VLDMMDiT`, ``vae`` an :class:`RGBAVAE`, ``text_encoder`` an object with
    ``encode(prompts) -> (embeddings, mask)`` and ``caption(image, language) -> str`` (see ``text.py``);
    it may be None when every call passes ``prompt_embeddings``. ``vram_budget`` (an
    :class:`~layered_core.placement.VRAMBudget`) places the models for a small GPU: transformer blocks
    streamed, the VAE and text encoder on the GPU only while they run; None leaves every model where it is.
    ``parallel`` (a :class:`~layered_core.distributed.cfg.ParallelSampling`) samples as one process of a parallel
    run: its ``model`` in place of the transformer, its ``branches`` for the step's forwards.
    """

    def __init__(self, transformer, vae, text_encoder=None, vram_budget=None, parallel=None):
        if parallel is not None and vram_budget is not None:
            raise ValueError("a parallel run with a VRAM budget is not supported: each process holds the transformer")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.vram_budget = vram_budget
        self.parallel = parallel

    @classmethod
    def from_files(
        cls,
        model: str | None = None,
        transformer: str | None = None,
        vae: str | None = None,
        text_encoder: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        fp8: str = "keep",
        vram_budget_gb: float | None = None,
        compile: bool = False,
        tokenizer: str | None = None,
    ) -> LayeredPipeline:
        """Load from a diffusers pipeline folder (``model``) and/or single files for each component.

        ``tokenizer`` is the tokenizer folder of a single-file text encoder (ComfyUI's; see
        :func:`~layered_core.text.load_text_encoder`); ``fp8`` applies to fp8 transformer and text-encoder files.

        ``vram_budget_gb`` (GiB) runs within that much GPU memory: the models load on the CPU and the
        transformer's blocks stream to ``device`` (see :class:`~layered_core.placement.VRAMBudget`).
        ``compile`` compiles the transformer's blocks (:meth:`VLDMMDiT.compile_blocks`): faster steps after some
        seconds of compilation on the first (figures in benchmarks/RESULTS.md), streamed blocks too."""
        transformer = transformer or model
        vae = vae or model
        text_encoder = text_encoder or model
        if transformer is None or vae is None:
            raise ValueError("need a transformer and a VAE: pass a diffusers folder, or both files")

        def load_text(on: str | torch.device):
            if text_encoder is None:
                return None
            return load_text_encoder(text_encoder, dtype=dtype, device=on, tokenizer_folder=tokenizer, fp8=fp8)

        if vram_budget_gb is not None:
            budget = gib(vram_budget_gb)  # checked before minutes of loading
            models = (
                load_mmdit(transformer, dtype=dtype, device="cpu", fp8=fp8),
                load_vae(vae, dtype=dtype, device="cpu"),
                load_text("cpu"),
            )
            pipeline = cls(*models, vram_budget=VRAMBudget(*models, device=device, budget=budget))
        else:
            pipeline = cls(
                load_mmdit(transformer, dtype=dtype, device=device, fp8=fp8),
                load_vae(vae, dtype=dtype, device=device),
                load_text(device),
            )
        if compile:
            pipeline.transformer.compile_blocks()
        return pipeline

    # -- steps ---------------------------------------------------------------------------------------------

    def prepare_image(self, image: Image.Image, options: DecomposeOptions) -> Image.Image:
        """Straight RGBA at the model's bucket size (alpha kept, or flattened onto ``background``)."""
        image = to_rgba(image)
        if options.background is not None:
            image = flatten(image, options.background)
        return resize_rgba(image, bucket_size(*image.size, options.resolution))

    def _on_device(self, module):
        """Under a VRAM budget, ``module`` visits the GPU for the ``with`` block; else nothing happens."""
        if self.vram_budget is None:
            return contextlib.nullcontext()
        return self.vram_budget.visiting(module)

    def _vae_device(self) -> torch.device:
        return _device_of(self.vae) if self.vram_budget is None else self.vram_budget.device

    def _text_encoder_placed(self, max_sequence_length: int, caption_image: Image.Image | None = None):
        """The text encoder where it runs, for the ``with`` block (yields that device): under a VRAM budget, the
        budget's choice for prompts of ``max_sequence_length`` tokens and a caption of ``caption_image`` (GPU or
        CPU); else where it is."""
        if self.vram_budget is None:
            return contextlib.nullcontext(_device_of(getattr(self.text_encoder, "model", None)))
        tokens = text_encoder_tokens(max_sequence_length, caption=caption_image is not None)
        return self.vram_budget.text_encoder_placed(tokens, None if caption_image is None else caption_image.size)

    def _transformer_on_device(self, condition, options, positive, negative):
        """Under a VRAM budget, the transformer's blocks on the GPU for sampling, planned for this image's
        tokens (yields the plan); else nothing happens (yields None)."""
        if self.vram_budget is None:
            return contextlib.nullcontext()
        patch = self.transformer.config.patch_size
        image_tokens = image_token_count(options.layer_count, *condition.shape[-2:], patch)
        prompts = [c for c in (positive, negative) if c is not None]
        batch = forward_batch(condition.shape[0], options.cfg_scale, negative is not None)
        return self.vram_budget.sampling(image_tokens, max(c.embeddings.shape[1] for c in prompts), batch)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """Normalised condition latent (1, 16, h, w) of a bucket-sized RGBA image."""
        with self._on_device(self.vae):
            return self.vae.encode(image_to_bchw(image))

    def encode_text(self, prompts: list[str], max_sequence_length: int = 512) -> PromptEmbeddings:
        """Prompt embeddings; like the reference, tokens past ``max_sequence_length`` are dropped."""
        if self.text_encoder is None:
            raise ValueError("no text encoder loaded: pass prompt_embeddings, or load one with load_text_encoder")
        with self._text_encoder_placed(max_sequence_length):
            embeddings, mask = self.text_encoder.encode(prompts, max_sequence_length=max_sequence_length, truncate=True)
        if embeddings.shape[1] == max_sequence_length:
            logger.warning("a prompt reached %d tokens; anything longer was cut off", max_sequence_length)
        return PromptEmbeddings(embeddings, mask)

    def caption(self, image: Image.Image, language: str = "en") -> str:
        if self.text_encoder is None:
            raise ValueError("the prompt is empty and no text encoder is loaded to caption the image")
        with self._text_encoder_placed(0, caption_image=image):
            return self.text_encoder.caption(image, language=language)

    def decode(
        self,
        latents: torch.Tensor,
        frames_per_batch: int = DEFAULT_FRAMES_PER_BATCH,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 16, N+1, h, w) latents -> (layers (N, 4, H, W), composite (4, H, W)), on the CPU.

        Frames are decoded independently, ``frames_per_batch`` at a time, ``progress(frames decoded, N+1)``
        after each batch (see :func:`decode_frames`)."""
        frames = latents[0].transpose(0, 1)  # (N+1, 16, h, w)
        with self._on_device(self.vae):
            images = decode_frames(self.vae.decode, frames, frames_per_batch, progress)
        return images[1:], images[0]

    # -- the whole path ------------------------------------------------------------------------------------

    def __call__(
        self,
        image: Image.Image,
        prompt: str | None = None,
        options: DecomposeOptions | None = None,
        callback: Callable[[StepInfo], bool | None] | None = None,
        prompt_embeddings: tuple[PromptEmbeddings, PromptEmbeddings | None] | None = None,
        decode_progress: Callable[[int, int], None] | None = None,
    ) -> Decomposition:
        """Decompose ``image`` into ``options.layer_count`` RGBA layers.

        An empty prompt is replaced by an auto-caption of the resized image. ``prompt_embeddings``
        (cond, uncond) skips the text encoder. ``callback`` is called after each sampling step,
        ``decode_progress(frames decoded, N+1)`` while the frames decode (see :meth:`decode`).
        """
        options = options or DecomposeOptions()
        seconds: dict[str, float] = {}
        devices: dict[str, str] = {}
        original_size = image.size
        start = time.perf_counter()
        prepared = self.prepare_image(image, options)
        condition = self.encode_image(prepared)
        _synchronize(condition.device)
        seconds["encode image"] = time.perf_counter() - start
        devices["encode image"] = str(self._vae_device())

        start = time.perf_counter()
        if prompt_embeddings is not None:
            positive, negative = prompt_embeddings
        else:
            captioning = is_blank_prompt(prompt)
            # under a VRAM budget: one place for the caption and both prompts (a visit of the GPU where it fits)
            with self._text_encoder_placed(options.max_sequence_length, prepared if captioning else None) as on:
                if captioning:
                    prompt = self.caption(prepared, options.caption_language)
                    logger.debug("auto-caption on %s: %s", on, prompt)
                    seconds["caption"], devices["caption"] = time.perf_counter() - start, str(on)
                    start = time.perf_counter()
                positive = self.encode_text([prompt], options.max_sequence_length)
                negative = None
                if options.cfg_scale > 1:
                    negative = self.encode_text([options.negative_prompt], options.max_sequence_length)
            devices["text"] = str(on)
        _synchronize(positive.embeddings.device)
        seconds["text"] = time.perf_counter() - start

        device = _device_of(self.transformer)
        dtype = getattr(self.transformer, "compute_dtype", torch.float32)
        positive = positive.to(device, dtype)
        negative = None if negative is None else negative.to(device, dtype)

        model, branches = self.transformer, None
        if self.parallel is not None:
            model, branches = self.parallel.model, self.parallel.branches
        start = time.perf_counter()
        with self._transformer_on_device(condition, options, positive, negative) as plan:
            latents = sample(
                model,
                condition.to(device),
                positive,
                negative,
                layer_count=options.layer_count,
                steps=options.steps,
                cfg_scale=options.cfg_scale,
                cfg_normalize=options.cfg_normalize,
                seed=options.seed,
                callback=callback,
                # streamed weights cost a copy per forward: cond and uncond share one (padded, masked)
                batch_guidance=plan is not None and plan.streamed_blocks > 0,
                branches=branches,
            )
        _synchronize(device)
        seconds["sampling"], devices["sampling"] = time.perf_counter() - start, str(device)

        start = time.perf_counter()
        layer_images, composite = self.decode(latents, progress=decode_progress)
        if options.keep_input_size:
            both = resize_layers(torch.cat([layer_images, composite[None]]), original_size)
            layer_images, composite = both[:-1], both[-1]
        layer_images, composite = layer_images.float().cpu(), composite.float().cpu()
        seconds["decode"], devices["decode"] = time.perf_counter() - start, str(self._vae_device())
        return Decomposition(layer_images, composite, prompt or "", seconds, devices)

    def split(
        self,
        stack: LayerStack,
        path,
        count: int,
        prompt: str | None = None,
        options: DecomposeOptions | None = None,
        callback: Callable[[StepInfo], bool | None] | None = None,
        max_depth: int = 3,
        decode_progress: Callable[[int, int], None] | None = None,
    ) -> LayerStack:
        """Split the layer at ``path`` into ``count`` sub-layers: a new stack whose tree holds them.

        The layer's own pixels (its alpha box) are decomposed with their alpha kept, and the sub-layers
        are brought back to the layer's size and position, so flattening the tree redraws the layer.
        ``callback`` and ``decode_progress`` report as in :meth:`__call__`.
        """
        resolved = stack.resolve(path)
        if len(resolved) > max_depth:
            raise ValueError(f"layer {path!r} is at depth {len(resolved)}; splitting is limited to depth {max_depth}")
        layer = stack.get(resolved)
        if layer.is_split:
            raise ValueError(f"layer {layer.name!r} is already split; split one of its sub-layers instead")
        if layer.width < 8 or layer.height < 8 or not np.any(layer.pixels[..., 3]):
            raise ValueError(f"layer {layer.name!r} is empty or smaller than 8x8 pixels: nothing to split")
        options = replace(options or DecomposeOptions(), layer_count=count, keep_input_size=True, background=None)
        result = self(rgba_to_pil(layer.pixels), prompt, options, callback, decode_progress=decode_progress)
        names = [f"{layer.name} / {index + 1}" for index in range(count)]
        sub_stack = stack_from_bhwc(result.layer_images.permute(0, 2, 3, 1), names=names)
        return attach_split(stack, resolved, sub_stack)


def _device_of(module) -> torch.device:
    if isinstance(getattr(module, "device", None), torch.device):
        return module.device
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
