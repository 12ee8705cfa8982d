"""How much GPU memory a decomposition needs, and how many transformer blocks fit resident under a budget.

Estimates only, no placement: :mod:`layered_core.offload` streams the blocks that do not fit, and
:mod:`layered_core.placement` moves the pipeline's models under a budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .ops import FP8_DTYPES

GiB = 1024**3

# Peak activation bytes of one forward per element of (batch x tokens x hidden), above the measured peak
# (benchmarks/RESULTS.md). Counted by hand: about 24 in attention (q, k, v, their rotated copies, the output,
# float32 RoPE temporaries) over the float32 residual streams; 48 leaves room for the masked attention path
# and allocator rounding.
ACTIVATION_BYTES_PER_ELEMENT = 48
# Memory the caching allocator does not count as allocated but the GPU must have: lazily loaded kernels,
# cuBLAS and cuDNN workspaces, fragmentation of the allocator's cache.
WORKSPACE_RESERVE = 3 * GiB // 2
# Activations of a text encoder of unknown shape (no Qwen2.5-VL config) on top of its weights.
TEXT_ENCODER_MARGIN = 2 * GiB


def gib(value: float | None, what: str = "VRAM budget") -> int | None:
    """``value`` GiB as bytes (None stays None); a budget must be a positive, finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number of GiB, got {value!r}")
    return int(value * GiB)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor counted once."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def activation_bytes(model: nn.Module, image_tokens: int, text_tokens: int, batch: int) -> int:
    """A conservative peak of a forward's activations on the GPU, in bytes.

    ``image_tokens`` counts every image token (the noisy frames and the condition frame: (layers + 2)
    frames of (h/2)(w/2) patches), ``text_tokens`` the longest prompt, ``batch`` the forward's batch (2
    when cond and uncond run together). Float8 linears add their just-in-time dequantised weight
    (float32, its scaled float32 copy and the bf16 result: 10 bytes per weight) of the largest layer.
    """
    for name, value in (("image_tokens", image_tokens), ("text_tokens", text_tokens), ("batch", batch)):
        if not isinstance(value, int) or value < (0 if name == "text_tokens" else 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    elements = batch * (image_tokens + text_tokens) * model.config.hidden_size
    return ACTIVATION_BYTES_PER_ELEMENT * elements + dequantised_weight_bytes(model)


def dequantised_weight_bytes(model: nn.Module) -> int:
    """What a float8 linear's just-in-time dequantisation holds at once, for the largest of ``model``: float32,
    its scaled float32 copy and the bf16 result, 10 bytes per weight (0 without float8 weights)."""
    largest = max(
        (m.weight.numel() for m in model.modules() if getattr(getattr(m, "weight", None), "dtype", None) in FP8_DTYPES),
        default=0,
    )
    return 10 * largest


def text_encoder_activation_bytes(model: nn.Module, text_tokens: int, image_size: tuple[int, int] | None = None) -> int:
    """A conservative peak of Qwen2.5-VL's activations on the GPU, in bytes, for a sequence of ``text_tokens``
    text tokens (a prompt; or a caption's instruction and the words it writes) and the image tokens of a
    ``image_size`` (width, height) image, whose patches go through the vision tower first.

    Per token or patch in bf16: the residual stream, the norm and the attention's projections (8 x hidden), the
    MLP's gate, up and product (3 x intermediate); one layer's attention scores and softmax as the unfused kernel
    holds them; the key/value cache of the whole sequence; the float32 scores of one vocabulary; and float8 linears'
    dequantised weight (:func:`dequantised_weight_bytes`). :data:`TEXT_ENCODER_MARGIN` for a model without a
    Qwen2.5-VL config.
    """
    config = getattr(model, "config", None)
    text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
    if text is None or vision is None:
        return TEXT_ENCODER_MARGIN

    def tower(rows: int, hidden: int, intermediate: int, heads: int) -> int:
        return 2 * rows * (8 * hidden + 3 * intermediate) + 4 * heads * rows * rows

    patches = 0
    if image_size is not None:
        # the image processor resizes to whole 2x2 groups of patches (28 px for the 7B); one token per group
        group = vision.patch_size * vision.spatial_merge_size
        patches = math.prod(-(-side // group) * vision.spatial_merge_size for side in image_size)
    tokens = text_tokens + patches // vision.spatial_merge_size**2
    head_dim = text.hidden_size // text.num_attention_heads
    cache = 2 * tokens * text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim
    language = tower(tokens, text.hidden_size, text.intermediate_size, text.num_attention_heads)
    image = tower(patches, vision.hidden_size, vision.intermediate_size, vision.num_heads) if patches else 0
    return max(language, image) + cache + 8 * text.vocab_size + dequantised_weight_bytes(model)


def text_encoder_visit_bytes(
    model: nn.Module, other_bytes: int, text_tokens: int, image_size: tuple[int, int] | None = None
) -> int:
    """GPU bytes a visit of the text encoder takes under a VRAM budget: the transformer's ``other_bytes`` (its
    non-block weights stay on the GPU; the blocks are given back), the text encoder's weights, its activations
    (:func:`text_encoder_activation_bytes`) and the CUDA workspace reserve."""
    activations = text_encoder_activation_bytes(model, text_tokens, image_size)
    return other_bytes + tensor_bytes(model) + activations + WORKSPACE_RESERVE


def resident_positions(count: int, resident: int) -> tuple[int, ...]:
    """Which of ``count`` blocks are the ``resident`` ones: the middles of ``resident`` equal runs, spread through
    the forward. Streamed blocks are copied while earlier blocks compute; a resident block between them gives the
    copies of the next ones its compute time too, where resident blocks all at the start would leave the copy
    engine idle while they run."""
    if not 0 <= resident <= count:
        raise ValueError(f"resident blocks must be 0..{count}, got {resident!r}")
    return tuple((2 * j + 1) * count // (2 * resident) for j in range(resident))


@dataclass(frozen=True)
class ResidencyPlan:
    """Where the blocks go under a budget: ``resident_blocks`` of them on the GPU (at
    :func:`resident_positions`), the rest streamed."""

    budget: int
    resident_blocks: int
    streamed_blocks: int
    slots: int  # slots actually allocated: min(requested, streamed)
    other_bytes: int  # non-block weights, always on the GPU
    resident_bytes: int
    slot_bytes: int  # all slots together
    activation_bytes: int
    reserve_bytes: int

    @property
    def device_bytes(self) -> int:
        """What the plan expects the GPU to hold at most."""
        return self.other_bytes + self.resident_bytes + self.slot_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def resident_indices(self) -> tuple[int, ...]:
        return resident_positions(self.resident_blocks + self.streamed_blocks, self.resident_blocks)


def plan_residency(
    block_bytes: list[int],
    other_bytes: int,
    budget: int,
    activations: int,
    slots: int = 2,
    reserve: int = WORKSPACE_RESERVE,
) -> ResidencyPlan:
    """The largest K such that the other weights, K blocks (at :func:`resident_positions`), ``slots`` slots (each
    as large as the largest streamed block), the activations and the reserve fit in ``budget`` bytes.

    K = all blocks needs no slots. Raises ValueError naming the budget and the least one that would do
    when not even K = 0 fits.
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    if budget <= 0:
        raise ValueError(f"VRAM budget must be positive, got {budget} bytes")
    count = len(block_bytes)
    fixed = other_bytes + activations + reserve
    for resident in range(count, -1, -1):
        positions = set(resident_positions(count, resident))
        streamed = [size for index, size in enumerate(block_bytes) if index not in positions]
        used_slots = min(slots, len(streamed))
        slot_bytes = used_slots * max(streamed, default=0)
        resident_bytes = sum(block_bytes) - sum(streamed)
        if fixed + resident_bytes + slot_bytes <= budget:
            sizes = (other_bytes, resident_bytes, slot_bytes, activations, reserve)
            return ResidencyPlan(budget, resident, len(streamed), used_slots, *sizes)
    used_slots = min(slots, count)
    least = fixed + used_slots * max(block_bytes, default=0)
    raise ValueError(
        f"VRAM budget {budget / GiB:.2f} GiB is too small: streaming every block needs at least {least / GiB:.2f} GiB "
        f"({used_slots} block slots {used_slots * max(block_bytes, default=0) / GiB:.2f} GiB, other weights "
        f"{other_bytes / GiB:.2f} GiB, activations {activations / GiB:.2f} GiB, CUDA workspace reserve "
        f"{reserve / GiB:.2f} GiB); raise the budget, or lower the resolution or the layer count"
    )


# Peak bytes of the VAE decoder per output pixel and frame, per byte of the weights' dtype, above the measured
# peaks (benchmarks/RESULTS.md: the decoder in bf16 at 640 and 1024 px).
VAE_DECODE_BYTES_PER_PIXEL = 650


def vae_activation_bytes(vae: nn.Module, frames: int, latent_height: int, latent_width: int) -> int:
    """A conservative peak of the RGBA-VAE's activations for ``frames`` latents of ``latent_height`` x
    ``latent_width``, in bytes: it grows with the output pixels and the weights' dtype."""
    ratio = vae.config.spatial_ratio
    itemsize = next(vae.parameters()).element_size()
    return frames * latent_height * latent_width * ratio * ratio * VAE_DECODE_BYTES_PER_PIXEL * itemsize
