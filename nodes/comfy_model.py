"""layered_core's models inside ComfyUI's model management.

The transformer becomes the ``diffusion_model`` of core's ``QwenImage`` model class, built with the
``comfy.ops`` family ComfyUI picks (weight casting, low-VRAM streaming, fp8 layouts, LoRA patches),
wrapped in a ``ModelPatcher``: ``load_models_gpu``, core's KSampler, ReferenceLatent and
EmptyQwenImageLayeredLatentImage all work on it. It answers core's calling convention, so the same
MODEL works in core's samplers and in this pack's. Each block whose weights ComfyUI holds ready runs the pack's
own block on them (:mod:`.fast_path`), the others through ComfyUI's layers.

The other way round, :class:`ComfyTransformer` is a ComfyUI MODEL as the transformer layered_core's sampler
and pipeline call, :class:`VAEPatcher` the RGBA-VAE under ComfyUI's model management (with the raw/normalised
latent conversion between ComfyUI's LATENT and the pack's latents), and :class:`ManagedVAE` that VAE as the
pipeline's.
"""

from __future__ import annotations

import logging
from collections import Counter

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import torch

from ..layered_core.checkpoints import infer_mmdit_config, open_transformer
from ..layered_core.memory import activation_bytes, vae_activation_bytes
from ..layered_core.mmdit import MMDiTConfig, VLDMMDiT, image_token_count
from ..layered_core.vae import RGBAVAE
from .comfy_streaming import BlockPrefetch, slot_reserve_bytes
from .comfy_streaming import active as active_streaming
from .comfy_streaming import attach as attach_streaming
from .fast_path import OPTION, block_fast_problem, effective_mode, fast_path_mode, run_fast_block

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}
# prompt tokens a memory estimate assumes when it is not told the prompt's length: more than this pack's
# encoder gives (512) and than a long prompt through core's CLIPTextEncode usually does
DEFAULT_TEXT_TOKENS = 1024


class ComfyLayeredDiT(VLDMMDiT):
    """The VLD-MMDiT with core's ``QwenImageTransformer2DModel`` call signature. Each block runs the fast path
    where its weights allow (:mod:`.fast_path`), else through ComfyUI's layers; ``block_runs`` counts both
    ("fast", "comfy")."""

    def __init__(self, mmdit_config: dict, dtype=None, device=None, operations=None, **unused):
        super().__init__(MMDiTConfig.from_dict(mmdit_config), dtype=dtype, device=device, operations=operations)
        self.dtype = dtype  # core's BaseModel reads the weight dtype from here
        self.block_runs: Counter[str] = Counter()
        self._logged_problems: set[str] = set()

    def forward(self, x, timestep, context, attention_mask=None, ref_latents=None, transformer_options=None, **kwargs):
        if not ref_latents:
            raise ValueError(
                "Qwen-Image-Layered needs the input image's latent: connect it through ReferenceLatent "
                "(or use this pack's Decompose node)"
            )
        condition = ref_latents[0]
        if condition.ndim == 5:
            condition = condition[:, :, 0]
        mask = None
        if attention_mask is not None:
            mask = attention_mask > 0 if attention_mask.is_floating_point() else attention_mask.bool()
        # ComfyUI already cast x to the inference dtype it chose (manual cast included)
        self.compute_dtype = x.dtype if x.dtype.is_floating_point else self.compute_dtype
        return super().forward(x, condition, context, timestep, mask, transformer_options)

    def run_block(self, index, img, txt, temb, pe, mask, transformer_options):
        block = self.transformer_blocks[index]
        # the weights ComfyUI left in host memory come over for either path: under dynamic VRAM by ComfyUI's block
        # prefetch, under the classic patcher's partial load by the pack's streamer (comfy_streaming)
        streaming = active_streaming(self)
        if streaming is not None:
            streaming.before_block(index, img.device)
        try:
            # with no queue (async offload off), the fast path fetches the block's weights itself
            prefetched = isinstance(streaming, BlockPrefetch) and streaming.queue is not None
            return self._run_block_on_weights(block, index, img, txt, temb, pe, mask, transformer_options, prefetched)
        finally:
            if streaming is not None:
                streaming.after_block(index)

    def _run_block_on_weights(self, block, index, img, txt, temb, pe, mask, transformer_options, prefetched):
        mode = effective_mode(fast_path_mode(transformer_options), img.device)
        if mode != "off":
            problem = block_fast_problem(block, self.config, img.device, temb.dtype)
            if problem is None:
                mm.throw_exception_if_processing_interrupted()  # as ComfyUI's layers check before each op
                self.block_runs["fast"] += 1
                return run_fast_block(
                    block,
                    self.config,
                    img,
                    txt,
                    temb,
                    pe,
                    mask,
                    compiled=mode == "compiled",
                    prefetched=prefetched,
                )
            if problem not in self._logged_problems:
                self._logged_problems.add(problem)
                logger.info("block %d runs through ComfyUI's layers, not the fast path: %s", index, problem)
        self.block_runs["comfy"] += 1
        return block(img, txt, temb, pe, mask)


class LayeredQwenImage(comfy.model_base.QwenImage):
    """Core's QwenImage model class around our transformer, with a memory estimate for it."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, device=device, unet_model=ComfyLayeredDiT)

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006 (core's signature)
        """Peak activation bytes of one forward (:func:`activation_bytes`), plus the GPU slots the block streamer
        takes when ComfyUI leaves weights offloaded (:func:`slot_reserve_bytes`). ``input_shape`` is the noisy latent
        [B, 16, N+1, h, w] (B counts cond and uncond when core batches them); the text length is the longest
        ``c_crossattn`` in ``cond_shapes`` where core's sampler passes them, else :data:`DEFAULT_TEXT_TOKENS`."""
        shape = list(input_shape)
        layers = shape[2] - 1 if len(shape) == 5 else 0  # a 4-D latent: one frame
        image_tokens = image_token_count(layers, shape[-2], shape[-1], self.diffusion_model.config.patch_size)
        activations = activation_bytes(self.diffusion_model, image_tokens, _text_tokens(cond_shapes), shape[0])
        # room for the block streamer's slots, when ComfyUI leaves some weights offloaded (comfy_streaming)
        return activations + slot_reserve_bytes(self.diffusion_model)


def _text_tokens(cond_shapes) -> int:
    """The longest prompt in core's ``cond_shapes`` ({name: [shape, ...]}, the text [B, L, D] under
    ``c_crossattn``); :data:`DEFAULT_TEXT_TOKENS` where it is not there (core's ``estimate_memory`` passes
    only the reference latents' shapes, ``load_models_gpu`` callers none)."""
    lengths = [int(shape[1]) for shape in (cond_shapes or {}).get("c_crossattn", []) if len(shape) >= 2]
    return max(lengths, default=DEFAULT_TEXT_TOKENS)


def load_state_dict(path: str) -> tuple[dict, dict, MMDiTConfig]:
    """Tensors (memory-mapped, prefix stripped), safetensors metadata and the shape of a layered transformer."""
    source, prefix = open_transformer(path)
    config = infer_mmdit_config(source, prefix)
    state = {k[len(prefix) :]: source.get(k) for k in source.keys() if k.startswith(prefix)}
    return state, dict(source.metadata), config


def load_layered_model(
    path: str, weight_dtype: str = "default", fast_path: str = "auto"
) -> comfy.model_patcher.ModelPatcher:
    """A MODEL (ModelPatcher) for a layered transformer file or diffusers folder; ``fast_path`` is the mode its
    blocks run in (:data:`.fast_path.MODES`), kept in the MODEL's options so that every sampler sees it."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    fast_path_mode({OPTION: fast_path})  # refused here, before the file is read
    state, metadata, config = load_state_dict(path)
    state, metadata = comfy.utils.convert_old_quants(state, "", metadata=metadata)
    model_config = comfy.supported_models.QwenImage({"image_model": "qwen_image", "mmdit_config": config.to_dict()})
    model_config.quant_config = comfy.utils.detect_layer_quantization(state, "")
    load_device = mm.get_torch_device()
    supported = list(model_config.supported_inference_dtypes)
    dtype = WEIGHT_DTYPES[weight_dtype]
    if dtype is None:
        parameters = comfy.utils.calculate_parameters(state)
        weight = None if model_config.quant_config else comfy.utils.weight_dtype(state)
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=supported, weight_dtype=weight)
    cast_from = None if model_config.quant_config else dtype
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(cast_from, load_device, supported), device=load_device)
    model = LayeredQwenImage(model_config)
    # CoreModelPatcher is what core's loaders use: the dynamic-VRAM patcher on NVIDIA GPUs, the classic one
    # elsewhere (and on older ComfyUI, which has only the classic one)
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, load_device=load_device, offload_device=mm.unet_offload_device())
    model.load_model_weights(state, "")
    patcher.model_options.setdefault("transformer_options", {})[OPTION] = fast_path
    attach_streaming(patcher)
    return patcher


class VAEPatcher:
    """The RGBA-VAE as ComfyUI manages core VAEs: on the VAE device while it runs, offloaded after."""

    def __init__(self, vae: RGBAVAE):
        self.vae = vae
        self.patcher = comfy.model_patcher.ModelPatcher(
            vae, load_device=mm.vae_device(), offload_device=mm.vae_offload_device()
        )

    def _load(self, frames: int, height: int, width: int) -> None:
        needed = vae_activation_bytes(self.vae, frames, height, width)
        mm.load_models_gpu([self.patcher], memory_required=needed)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self._load(1, image.shape[-2] // 8, image.shape[-1] // 8)
        return self.vae.encode(image.to(mm.vae_device()))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self._load(latent.shape[0], latent.shape[-2], latent.shape[-1])
        return self.vae.decode(latent.to(mm.vae_device()))

    def normalize_latent(self, raw: torch.Tensor) -> torch.Tensor:
        """ComfyUI's raw LATENT as the normalised latent :meth:`decode` takes (:meth:`RGBAVAE.normalize_latent`)."""
        return self.vae.normalize_latent(raw)

    def denormalize_latent(self, normalised: torch.Tensor) -> torch.Tensor:
        """A normalised latent, as :meth:`encode` gives it, raw as ComfyUI's LATENT holds it."""
        return self.vae.denormalize_latent(normalised)


class ManagedVAE:
    """This pack's VAE, loaded through ComfyUI before each use, with RGBAVAE's encode/decode."""

    def __init__(self, patcher: VAEPatcher):
        self.patcher = patcher

    def encode(self, image):
        return self.patcher.encode(image)

    def decode(self, latent, tile=None):
        return self.patcher.decode(latent)


class ComfyTransformer:
    """A ComfyUI MODEL as the ``model(latents, condition, text, sigma, mask)`` the sampler calls."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.compute_dtype = patcher.model.get_dtype_inference()

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    def __call__(self, latents, condition, text, sigma, mask):
        base = self.patcher.model
        device, dtype = self.patcher.load_device, self.compute_dtype
        out = base.diffusion_model(
            latents.to(device, dtype),
            sigma.to(device),
            context=text.to(device, dtype),
            attention_mask=None if mask is None else mask.to(device),
            ref_latents=[condition[:, :, None].to(device, dtype)],
            transformer_options=self.patcher.model_options.get("transformer_options", {}),
        )
        return out.float()
