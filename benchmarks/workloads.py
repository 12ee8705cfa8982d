"""What the benchmarks run: the problem size and its arguments, random weights, the full-size VLD-MMDiT with them,
the inputs of one sampling step and its FLOP count, diffusers' reference transformer on the same tensors, a
Qwen2.5-VL-7B-shaped text encoder, and the prompt and image of a whole decomposition."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from benchmarks.measure import sync
from layered_core.mmdit import MMDiTConfig, VLDMMDiT, pack_latents, unpack_latents
from layered_core.ops import FP8Linear, quantize_fp8


@dataclass(frozen=True)
class Shape:
    """The problem size: square image side in pixels, layers, text tokens per prompt; the issue's setting by
    default."""

    resolution: int = 640
    layers: int = 4
    text_tokens: int = 256

    @classmethod
    def of(cls, args: argparse.Namespace) -> Shape:
        """The shape of ``add_shape_arguments``' parsed arguments."""
        return cls(args.resolution, args.layers, args.text_tokens)

    @property
    def frame_tokens(self) -> int:
        """Tokens of one latent frame: 2x2 patches of the image downsampled 8x."""
        return (self.resolution // 16) ** 2

    @property
    def noisy_tokens(self) -> int:
        """Tokens of the noisy frames: the composite and each layer."""
        return (self.layers + 1) * self.frame_tokens

    @property
    def image_tokens(self) -> int:
        """Tokens of the noisy frames and the condition frame."""
        return self.noisy_tokens + self.frame_tokens

    @property
    def tokens(self) -> int:
        """The joint sequence of one sample: image and text tokens."""
        return self.image_tokens + self.text_tokens


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The problem size every full-size benchmark takes (``Shape.of`` reads it back)."""
    parser.add_argument("--resolution", type=int, default=Shape.resolution, help="square image side in pixels")
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--text-tokens", type=int, default=Shape.text_tokens)


def flops_per_forward(config: MMDiTConfig, shape: Shape) -> float:
    """Matrix-product and attention FLOP of one batch-1 forward."""
    d = config.hidden_size
    s = shape.tokens
    linear = 2 * s * (4 * d * d + 2 * config.mlp_ratio * d * d)
    attn = 4 * s * s * d
    head = 2 * shape.noisy_tokens * d * 64
    return config.num_layers * (linear + attn) + head


def random_weights_(module: torch.nn.Module, seed: int = 0, generate_on=None) -> None:
    """Random weights at PyTorch's default Linear scale, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (convolutions alike); an
    embedding N(0, 1) as nn.Embedding draws it, token embeddings N(0, 0.02) as language models initialise them; norm
    weights near 1 so they are exercised; small biases; an FP8Linear's weight quantised with a per-tensor scale.

    One generator of ``seed`` draws them on ``generate_on`` (default: the module's device), and they are copied into
    the module's tensors: a model on the host fills faster from the GPU."""
    generate_on = generate_on or next(module.parameters()).device
    gen = torch.Generator(device=generate_on).manual_seed(seed)
    modules = dict(module.named_modules())
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and "embed_tokens" in name:
                value = 0.02 * torch.randn(p.shape, generator=gen, device=generate_on)
            elif p.ndim == 2 and "embedding" in name:
                value = torch.randn(p.shape, generator=gen, device=generate_on)
            elif p.ndim >= 2:
                fan_in = p.numel() // p.shape[0]
                value = (torch.rand(p.shape, generator=gen, device=generate_on) * 2 - 1) / fan_in**0.5
            elif name.endswith(".weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=generate_on)
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen, device=generate_on)
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, FP8Linear) and name.endswith(".weight"):
                value, scale = quantize_fp8(value)
                owner.weight_scale.copy_(scale)
            p.copy_(value.to(p.dtype))


def random_model(
    config: MMDiTConfig, dtype: torch.dtype, device, generate_on=None, fp8_blocks: bool = False
) -> VLDMMDiT:
    """The transformer built on the meta device, then materialised on ``device`` with random weights (drawn on
    ``generate_on``, default ``device``), computing in ``dtype``. With ``fp8_blocks`` the blocks' linears are
    FP8Linear: float8 weights with per-tensor scales."""
    with torch.device("meta"):
        model = VLDMMDiT(config, dtype=dtype)
    if fp8_blocks:
        for block in model.transformer_blocks:
            for name, linear in list(block.named_modules()):
                if isinstance(linear, torch.nn.Linear):
                    parent, _, child = name.rpartition(".")
                    fp8_linear = FP8Linear(linear.in_features, linear.out_features, dtype=dtype, device="meta")
                    setattr(block.get_submodule(parent), child, fp8_linear)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    random_weights_(model, generate_on=generate_on)
    model.compute_dtype = dtype
    return model


def announced_random_model(config: MMDiTConfig, dtype: torch.dtype, device) -> VLDMMDiT:
    """``random_model``, printing its parameter count and how long the build took."""
    start = time.perf_counter()
    model = random_model(config, dtype, device)
    sync()
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.1f} s", flush=True)
    return model


class StepInputs(NamedTuple):
    latents: torch.Tensor  # (batch, 16, layers + 1, h, w): the noisy composite and layers
    condition: torch.Tensor  # (batch, 16, h, w): the input image's latent
    text: torch.Tensor  # (batch, text tokens, text dim)
    sigma: torch.Tensor  # (batch,)
    flops: float  # of one batch-1 forward
    tokens: int  # per sample


def step_inputs(config: MMDiTConfig, shape: Shape, dtype: torch.dtype, device, batch: int = 2) -> StepInputs:
    """Random inputs of one step at ``shape`` (seed 1), the text in ``dtype``; by default cond and uncond as one
    batch of 2."""
    side = shape.resolution // 8
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(batch, 16, shape.layers + 1, side, side, generator=gen, device=device)
    condition = torch.randn(batch, 16, side, side, generator=gen, device=device)
    text = torch.randn(batch, shape.text_tokens, config.text_dim, generator=gen, device=device).to(dtype)
    # 0.75 is exact in bf16: diffusers casts the timestep to the model dtype, and a sigma like 0.7 would
    # become 0.6992 there, which on its own moves the output (benchmarks/RESULTS.md says how far).
    sigma = torch.full((batch,), 0.75, device=device)
    return StepInputs(latents, condition, text, sigma, flops_per_forward(config, shape), shape.tokens)


def reference_model(state: dict, config: MMDiTConfig):
    """diffusers' model around the given tensors (assigned, not copied)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope

    kwargs = {key: value for key, value in config.to_diffusers().items() if key != "_class_name"}
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(**kwargs)
    # Its RoPE tables are plain attributes computed at construction: rebuild them off the meta device.
    ref.pos_embed = QwenEmbedLayer3DRope(theta=10000, axes_dim=list(config.axes_dims), scale_rope=True)
    ref.load_state_dict(state, strict=True, assign=True)
    return ref.eval()


def reference_forward(ref, latents, condition, text, sigma, dtype) -> torch.Tensor:
    """diffusers' model on our inputs (noisy frames then the condition frame), computing in ``dtype``;
    returns the noisy frames' velocity as (B, 16, F, h, w)."""
    batch, _, frames, h, w = latents.shape
    grid = (h // 2) * (w // 2)
    tokens = torch.cat([pack_latents(latents), pack_latents(condition[:, :, None])], 1)
    out = ref(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=text.to(dtype),
        timestep=sigma.to(dtype),
        img_shapes=[[(1, h // 2, w // 2)] * (frames + 1)] * batch,
        additional_t_cond=torch.zeros(batch, dtype=torch.long, device=latents.device),
        return_dict=False,
    )[0]
    return unpack_latents(out[:, : frames * grid], frames, h, w)


def float32_reference(state: dict, config: MMDiTConfig):
    """diffusers' model on our tensors, computing in float32 with one block widened at a time.

    A float32 copy of all the weights (twice the bf16 model) fits neither beside ours on the GPU nor in host
    memory, so each block is widened to float32 just before it runs and narrowed back after (exact: bf16 ->
    fp32 is lossless)."""
    ref = reference_model(state, config)
    for name, child in ref.named_children():
        if name != "transformer_blocks":
            child.float()  # small modules: a float32 copy of their own

    def widen(block, args):
        block._narrow = {n: p.data for n, p in block.named_parameters()}
        for p in block.parameters():
            p.data = p.data.float()

    def narrow(block, args, output):
        for n, p in block.named_parameters():
            p.data = block._narrow[n]
        del block._narrow

    for block in ref.transformer_blocks:
        block.register_forward_pre_hook(widen)
        block.register_forward_hook(narrow)
    return ref


def float32_reference_output(model: VLDMMDiT, config: MMDiTConfig, latents, condition, text, sigma) -> torch.Tensor:
    """The truth: sample 0 through diffusers' model on ``model``'s weights computing in float32 (TF32 off, see
    ``float32_reference``); prints how long it took."""
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    ref32 = float32_reference(model.state_dict(), config)
    out = reference_forward(ref32, latents[:1], condition[:1], text[:1], sigma[:1], torch.float32)
    print(f"float32 reference forward: {time.perf_counter() - t0:.1f} s", flush=True)
    return out.float()


# Qwen2.5-VL-7B-Instruct's shape (config.json of the release).
QWEN25_VL_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    tie_word_embeddings=False,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    rope_theta=1000000.0,
)
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
)


def full_text_encoder(device, dtype: torch.dtype = torch.bfloat16, generate_on=None, fp8: bool = False):
    """A Qwen2.5-VL-7B-shaped text encoder built on ``device`` in ``dtype`` with ``random_weights_`` (drawn on
    ``generate_on``), as a PromptEncoder with the tiny offline tokenizer: the real one cannot be had offline. With
    ``fp8`` the linears ComfyUI's fp8 file stores in float8 are FP8Linear, as that file loads with ``fp8="keep"``.

    Built without transformers' weight init (``random_weights_`` replaces it); not on the meta device, so that
    the rotary buffers computed at construction are right."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from layered_core.checkpoints.qwen_vl_release import vision_token_ids
    from layered_core.text import PromptEncoder
    from layered_core.tiny_models import tiny_tokenizer

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pay for transformers' init
            import contextlib

            no_init_weights = contextlib.nullcontext
    tokenizer = tiny_tokenizer()
    # the image token ids of the tokenizer the prompts go through, so that a caption request finds its image
    config = Qwen2_5_VLConfig(
        text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION, **vision_token_ids(tokenizer)
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    if fp8:
        from layered_core.checkpoints.text_encoder import is_quantized_in_comfy_file

        for name, linear in list(model.named_modules()):
            if type(linear) is torch.nn.Linear and is_quantized_in_comfy_file(f"{name}.weight", linear.weight):
                parent, _, child = name.rpartition(".")
                bias = linear.bias is not None
                replacement = FP8Linear(linear.in_features, linear.out_features, bias, device=device, dtype=dtype)
                setattr(model.get_submodule(parent), child, replacement)
    random_weights_(model, generate_on=generate_on)
    return PromptEncoder(model.eval().requires_grad_(False), tokenizer)


def full_caption_encoder(device, dtype: torch.dtype = torch.bfloat16, generate_on=None, fp8: bool = False):
    """``full_text_encoder`` made ready to caption: the release's image processor settings and its generation
    settings (repetition penalty 1.05, top_k 1; the end tokens are the offline tokenizer's <|im_end|> and
    <|endoftext|>)."""
    from layered_core.checkpoints.qwen_vl_release import generation_config, image_processor

    encoder = full_text_encoder(device, dtype, generate_on, fp8)
    encoder.image_processor = image_processor()
    encoder.model.generation_config = generation_config(encoder.tokenizer)
    return encoder


PROMPT_WORDS = "a poster with a red title, a photo of a cat on a sofa, soft shadows and a white frame"


def prompt_of_length(tokenizer, tokens: int) -> str:
    """``PROMPT_WORDS`` repeated, cut to ``tokens`` tokens of ``tokenizer``."""
    prompt = PROMPT_WORDS
    while len(tokenizer(prompt).input_ids) < tokens:
        prompt += " " + PROMPT_WORDS
    return tokenizer.decode(tokenizer(prompt).input_ids[:tokens])


def noise_image(width: int, height: int) -> Image.Image:
    """Uniform RGB noise (seed 0): the input of a whole decomposition, whose speed does not depend on it."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
