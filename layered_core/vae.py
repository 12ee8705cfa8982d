"""The RGBA-VAE of Qwen-Image-Layered, as a 2D network.

The checkpoint is Qwen-Image's Wan 2.1-style causal 3D VAE with four image channels. Qwen-Image-Layered
only ever codes single frames (layers go through as a batch), and on one frame a causal 3D conv sees its
input only through the last temporal tap of its kernel: the two earlier taps meet the causal zero padding.
The temporal resampling convs (``time_conv``) never run on a first frame either. So this model is built
from 2D convs, which halves activation memory and runs faster; :func:`convert_vae_state_dict` slices the
checkpoint's 5D kernels down to 4D and drops the ``time_conv`` weights.

Module names follow the original Wan layout of ComfyUI's single file (``encoder.downsamples.N.residual.2``,
``decoder.head.2``, ``conv1`` / ``conv2``, ...), so a converted checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from .ops import resolve_operations

log = logging.getLogger(__name__)

# Per-channel latent statistics of the Qwen-Image VAE (diffusers' AutoencoderKLQwenImage defaults).
QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Tiled decoding defaults, in latent pixels: tiles of at most 128 (1024 px) with a 16 px (128 px) crossfade.
# Through the decoder's convs one latent pixel reaches about 12 latent pixels (measured with the attention
# switched off), so a 16 px crossfade keeps most border error of each tile where its weight is small.
DEFAULT_TILE = 128
# latent pixels above which decode(tile=None) tiles: 1.5x a 1024x1024 image, more than any size bucket
AUTO_TILE_AREA = 3 * DEFAULT_TILE * DEFAULT_TILE // 2
DEFAULT_OVERLAP = 16

_RGBA_VAE_HINT = (
    "Qwen-Image-Layered needs its 4-channel RGBA-VAE: 'qwen_image_layered_vae.safetensors' "
    "(ComfyUI models/vae) or the vae/ folder of Qwen/Qwen-Image-Layered"
)


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the RGBA-VAE. ``full()`` is the released model, ``tiny()`` a small one for tests."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    image_channels: int = 4
    latents_mean: tuple[float, ...] = field(default=QWEN_IMAGE_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=QWEN_IMAGE_LATENTS_STD)

    def __post_init__(self):
        # Accept lists (e.g. straight from a config.json) but store tuples so the config stays hashable.
        for name in ("dim_mult", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if not self.dim_mult or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise ValueError(f"VAEConfig.dim_mult must be a non-empty tuple of positive ints, got {self.dim_mult}")
        if self.image_channels != 4:
            raise ValueError(
                f"VAEConfig.image_channels must be 4 (RGBA), got {self.image_channels!r}; {_RGBA_VAE_HINT}"
            )
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim:
                raise ValueError(
                    f"VAEConfig.{name} must have z_dim={self.z_dim} values (one per latent channel), got {len(values)}"
                )
        if any(not s > 0 for s in self.latents_std):
            raise ValueError(f"VAEConfig.latents_std must be all positive, got {self.latents_std}")

    @classmethod
    def full(cls) -> VAEConfig:
        """The released Qwen-Image-Layered RGBA-VAE."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A small model with the full model's structure, 8x compression and 16 latent channels."""
        return cls(base_dim=8)

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent pixel along each side (8 for the released model)."""
        return 2 ** (len(self.dim_mult) - 1)


def rms_norm_channels(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's channel vector to RMS 1, then by ``gamma``.

    The norm is taken in float32: in fp16 the sum of squares overflows. Dividing the low-precision ``x`` by
    the float32 norm promotes inside the kernel, so no float32 copy of ``x`` is made first.
    """
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
    normalized = (x / norm).to(x.dtype)
    return normalized * math.sqrt(x.shape[1]) * gamma.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of a (B, C, H, W) tensor; ``gamma`` is (C, 1, 1)."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_channels(x, self.gamma)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        factory = {"dtype": dtype, "device": device}
        # Indices 1, 4, 5 (SiLU, SiLU, dropout) hold no weights but keep the checkpoint's numbering.
        self.residual = nn.Sequential(
            RMSNorm2d(in_dim, **factory),
            nn.SiLU(),
            ops.Conv2d(in_dim, out_dim, 3, padding=1, **factory),
            RMSNorm2d(out_dim, **factory),
            nn.SiLU(),
            nn.Identity(),
            ops.Conv2d(out_dim, out_dim, 3, padding=1, **factory),
        )
        self.shortcut = ops.Conv2d(in_dim, out_dim, 1, **factory) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of the image (the mid-block's global mixing)."""

    def __init__(self, dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        self.norm = RMSNorm2d(dim, dtype=dtype, device=device)
        self.to_qkv = ops.Conv2d(dim, dim * 3, 1, dtype=dtype, device=device)
        self.proj = ops.Conv2d(dim, dim, 1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, 3C)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        out = attention(q, k, v).squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj(out)


class Upsample2x(nn.Module):
    """Nearest 2x upsampling (an exact copy, so it needs no upcast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """2x spatial down- or upsampling; upsampling also halves the channels, as in Wan."""

    def __init__(self, dim: int, mode: str, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        factory = {"dtype": dtype, "device": device}
        if mode == "down":
            # Pad right/bottom only, then a stride-2 valid conv: the checkpoint was trained this way.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), ops.Conv2d(dim, dim, 3, stride=2, **factory))
        elif mode == "up":
            self.resample = nn.Sequential(Upsample2x(), ops.Conv2d(dim, dim // 2, 3, padding=1, **factory))
        else:
            raise ValueError(f"Resample mode must be 'down' or 'up', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


def _middle(dim: int, factory: dict) -> nn.Sequential:
    return nn.Sequential(
        ResidualBlock(dim, dim, **factory), AttentionBlock(dim, **factory), ResidualBlock(dim, dim, **factory)
    )


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        factory = {"dtype": dtype, "device": device, "operations": operations}
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = ops.Conv2d(config.image_channels, dims[0], 3, padding=1, dtype=dtype, device=device)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **factory))
                in_dim = out_dim
            if level != len(config.dim_mult) - 1:
                blocks.append(Resample(out_dim, "down", **factory))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1], factory)
        self.head = nn.Sequential(
            RMSNorm2d(dims[-1], dtype=dtype, device=device),
            nn.SiLU(),
            ops.Conv2d(dims[-1], config.z_dim * 2, 3, padding=1, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_operations(operations)
        factory = {"dtype": dtype, "device": device, "operations": operations}
        dims = [config.base_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        self.conv1 = ops.Conv2d(config.z_dim, dims[0], 3, padding=1, dtype=dtype, device=device)
        self.middle = _middle(dims[0], factory)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if level > 0:
                in_dim //= 2  # the previous level's upsampling conv halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, **factory))
                in_dim = out_dim
            if level != len(config.dim_mult) - 1:
                blocks.append(Resample(out_dim, "up", **factory))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            RMSNorm2d(dims[-1], dtype=dtype, device=device),
            nn.SiLU(),
            ops.Conv2d(dims[-1], config.image_channels, 3, padding=1, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


class RGBAVAE(nn.Module):
    """Qwen-Image-Layered's RGBA-VAE on single frames: (B, 4, H, W) images <-> (B, 16, H/8, W/8) latents."""

    def __init__(self, config: VAEConfig, dtype=None, device=None, operations=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, dtype=dtype, device=device, operations=operations)
        ops = resolve_operations(operations)
        # Names as in Wan: conv1 is the posterior's 1x1 "quant" conv, conv2 the decoder's "post-quant" conv.
        self.conv1 = ops.Conv2d(config.z_dim * 2, config.z_dim * 2, 1, dtype=dtype, device=device)
        self.conv2 = ops.Conv2d(config.z_dim, config.z_dim, 1, dtype=dtype, device=device)
        self.decoder = Decoder(config, dtype=dtype, device=device, operations=operations)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        latents_mean=None,
        latents_std=None,
        dtype=None,
        device=None,
        operations=None,
    ) -> RGBAVAE:
        """Build on the meta device and assign a checkpoint in either layout (see :func:`convert_vae_state_dict`)."""
        converted = convert_vae_state_dict(state_dict)
        config = vae_config_from_state_dict(converted, latents_mean=latents_mean, latents_std=latents_std)
        model = cls(config, dtype=dtype, device="meta", operations=operations)
        converted = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
        model.load_state_dict(converted, strict=True, assign=True)
        return model.eval()

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std), (1, C, 1, 1) float32."""
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, std

    def normalize_latent(self, raw: torch.Tensor) -> torch.Tensor:
        """The raw latent z (B, C, h, w), as ComfyUI's LATENT holds it, normalised per channel as
        ``(z - latents_mean) / latents_std``: what :meth:`decode` takes and :meth:`encode` gives. Float32."""
        mean, std = self._latent_stats(raw.device)
        return (raw.float() - mean) / std

    def denormalize_latent(self, normalised: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize_latent`: ``latent * latents_std + latents_mean``, float32."""
        mean, std = self._latent_stats(normalised.device)
        return normalised.float() * std + mean

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Encode images to normalised latents.

        image: (B, 3 or 4, H, W) in [0, 1], straight alpha; RGB gets alpha = 1. H and W must be multiples
        of 8. Returns the posterior mode, normalised per channel as ``(z - latents_mean) / latents_std``:
        float32 (B, 16, H/8, W/8), roughly zero-mean and unit-variance.
        """
        ratio = self.config.spatial_ratio
        if image.ndim != 4 or image.shape[1] not in (3, 4):
            raise ValueError(f"encode expects an image of shape (B, 3 or 4, H, W), got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if height % ratio or width % ratio:
            raise ValueError(
                f"encode needs height and width that are multiples of {ratio}, got {height}x{width} "
                f"(resize or pad to e.g. {height // ratio * ratio or ratio}x{width // ratio * ratio or ratio})"
            )
        weight = self.encoder.conv1.weight
        x = image.to(device=weight.device, dtype=weight.dtype) * 2 - 1
        if x.shape[1] == 3:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        moments = self.conv1(self.encoder(x))
        return self.normalize_latent(moments[:, : self.config.z_dim])

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tile: int | None = None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
        """Decode normalised latents to straight-alpha RGBA.

        latent: (B, 16, h, w) normalised as :meth:`encode` returns them; layers go in as the batch and are
        decoded independently. Returns float32 (B, 4, 8h, 8w) in [0, 1].

        tile: largest tile side in latent pixels; ``None`` tiles (with 128) only latents larger than
        ``AUTO_TILE_AREA``, i.e. never at the model's size buckets; 0 never tiles. overlap: crossfade width
        between tiles in latent pixels, at most a third of ``tile``. Tiles see only their own part of the
        image in the mid-block's global attention, so tiled output approximates the untiled one; the
        crossfade hides the seams.
        """
        if latent.ndim != 4 or latent.shape[1] != self.config.z_dim:
            raise ValueError(
                f"decode expects a latent of shape (B, {self.config.z_dim}, h, w) with the layers as the batch, "
                f"got {tuple(latent.shape)}"
            )
        height, width = latent.shape[-2:]
        if tile is None:
            # Tiling changes the result (the mid-block attention sees one tile), so the model's own bucket
            # sizes (about 1 MP, any aspect) decode whole; only larger images are tiled.
            if height * width <= AUTO_TILE_AREA:
                return self._decode_tile(latent)
            tile = DEFAULT_TILE
        if tile <= 0 or (height <= tile and width <= tile):
            return self._decode_tile(latent)
        return decode_tiled(self._decode_tile, latent, self.config.spatial_ratio, tile, overlap)

    def _decode_tile(self, latent: torch.Tensor) -> torch.Tensor:
        weight = self.decoder.conv1.weight
        z = self.denormalize_latent(latent.to(weight.device)).to(weight.dtype)
        image = self.decoder(self.conv2(z))
        return (image.float().clamp(-1.0, 1.0) + 1.0) / 2.0


# --- tiled decoding ----------------------------------------------------------------------------------------


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Split ``range(size)`` into equal, evenly spaced spans of at most ``tile`` that overlap by >= ``overlap``.

    The fewest tiles that fit are used, each shrunk to share the length equally, so no tile is a sliver.
    """
    if tile <= 0 or size <= tile:
        return [(0, size)]
    if overlap < 0 or 3 * overlap > tile:
        raise ValueError(f"tile overlap must be between 0 and tile/3 = {tile // 3}, got {overlap} (tile {tile})")
    count = -(-(size - overlap) // (tile - overlap))
    length = -(-(size + (count - 1) * overlap) // count)
    # Integer rounding of k * (size - length) / (count - 1), so the last span ends exactly at size.
    starts = [(2 * k * (size - length) + count - 1) // (2 * (count - 1)) for k in range(count)]
    return [(start, start + length) for start in starts]


def crossfade_weights(spans: list[tuple[int, int]], scale: int = 1) -> torch.Tensor:
    """Per-span 1D blending weights on the ``scale`` x finer output grid: (len(spans), size * scale).

    Where two neighbouring spans overlap, one ramps linearly down as the other ramps up; image borders get
    no ramp. The weights are normalised to sum to 1 at every position (a no-op where only two spans meet).
    """
    size = spans[-1][1] * scale
    pos = torch.arange(size, dtype=torch.float64) + 0.5
    starts = torch.tensor([s for s, _ in spans], dtype=torch.float64) * scale
    ends = torch.tensor([e for _, e in spans], dtype=torch.float64) * scale
    # A span's ramp-in runs over its overlap with the previous span, its ramp-out over that with the next one.
    ramp_in_end = torch.cat([starts[:1], ends[:-1]])
    ramp_out_start = torch.cat([starts[1:], ends[-1:]])
    rise = ((pos - starts[:, None]) / (ramp_in_end - starts).clamp_min(1e-9)[:, None]).clamp(0, 1)
    fall = ((ends[:, None] - pos) / (ends - ramp_out_start).clamp_min(1e-9)[:, None]).clamp(0, 1)
    inside = (pos >= starts[:, None]) & (pos < ends[:, None])
    weights = rise * fall * inside
    return (weights / weights.sum(0, keepdim=True)).float()


def decode_tiled(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
) -> torch.Tensor:
    """Run ``decode_fn`` on overlapping latent tiles one at a time and crossfade them into one image.

    ``decode_fn`` maps (B, C, h, w) to (B, C_out, h * scale, w * scale). Only one tile's activations are
    alive at a time; the output is a preallocated float32 buffer.
    """
    batch, _, height, width = latent.shape
    row_spans, col_spans = tile_spans(height, tile, overlap), tile_spans(width, tile, overlap)
    row_weights = crossfade_weights(row_spans, scale)
    col_weights = crossfade_weights(col_spans, scale)
    out = None
    for i, (y0, y1) in enumerate(row_spans):
        for j, (x0, x1) in enumerate(col_spans):
            piece = decode_fn(latent[:, :, y0:y1, x0:x1])
            if out is None:
                out = torch.zeros(
                    batch, piece.shape[1], height * scale, width * scale, dtype=torch.float32, device=piece.device
                )
            rows, cols = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
            weight = row_weights[i, rows, None].to(out.device) * col_weights[j, None, cols].to(out.device)
            out[:, :, rows, cols].addcmul_(piece.float(), weight)
    return out


DEFAULT_FRAMES_PER_BATCH = 4


def decode_frames(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    frames: torch.Tensor,
    frames_per_batch: int = DEFAULT_FRAMES_PER_BATCH,
) -> torch.Tensor:
    """Decode latent frames (F, C, h, w) a few at a time: ``decode_fn`` on each chunk of at most
    ``frames_per_batch`` frames, each result moved to the CPU, concatenated along the batch.

    The layers of a decomposition decode independently, and the decoder's activations grow with the batch
    (13 GiB for 11 frames at 1024 px), so all 20 layers in one batch would not fit beside the transformer.
    ``decode_fn`` is e.g. :meth:`RGBAVAE.decode`; whatever it needs first (a model loaded, latents
    normalised) is the caller's.
    """
    if isinstance(frames_per_batch, bool) or not isinstance(frames_per_batch, Integral) or frames_per_batch < 1:
        raise ValueError(f"frames_per_batch must be a positive int, got {frames_per_batch!r}")
    return torch.cat([decode_fn(chunk).cpu() for chunk in frames.split(int(frames_per_batch))])


# --- checkpoint conversion ---------------------------------------------------------------------------------

# Weights in the 3D checkpoint that a single frame never uses: the temporal resampling convs.
_TIME_CONV = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.time_conv\.(weight|bias)$")

_DIFFUSERS_MARKERS = ("encoder.conv_in.", "decoder.conv_in.", "encoder.down_blocks.", "decoder.up_blocks.")


def _is_diffusers_layout(keys) -> bool:
    return any(k.startswith(_DIFFUSERS_MARKERS) or k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys)


# The diffusers and Wan names of the same weights: one rule per line for both directions, first match wins.
# {part} is encoder or decoder, {rest} the rest of the name (copied), {block} the rest inside a residual block
# (renamed by _BLOCK_NAMES), {i} and {j} diffusers indices. Wan's index {n} is i * stride + offset with the
# rule's (stride, offset): stride "s" is up_stride, offset -1 the last slot of a level, offset "j" the index j.
_KEY_RULES = (
    ("quant_conv.{rest}", "conv1.{rest}", None),
    ("post_quant_conv.{rest}", "conv2.{rest}", None),
    ("{part}.conv_in.{rest}", "{part}.conv1.{rest}", None),
    ("{part}.norm_out.{rest}", "{part}.head.0.{rest}", None),
    ("{part}.conv_out.{rest}", "{part}.head.2.{rest}", None),
    ("{part}.mid_block.resnets.{i}.{block}", "{part}.middle.{n}.{block}", (2, 0)),
    ("{part}.mid_block.attentions.{i}.{rest}", "{part}.middle.{n}.{rest}", (2, 1)),
    ("{part}.down_blocks.{i}.{block}", "{part}.downsamples.{i}.{block}", None),
    ("{part}.up_blocks.{i}.upsamplers.0.{rest}", "{part}.upsamples.{n}.{rest}", ("s", -1)),
    ("{part}.up_blocks.{i}.resnets.{j}.{block}", "{part}.upsamples.{n}.{block}", ("s", "j")),
)
# Inside a residual block: (diffusers, Wan).
_BLOCK_NAMES = (
    ("norm1", "residual.0"),
    ("conv1", "residual.2"),
    ("norm2", "residual.3"),
    ("conv2", "residual.6"),
    ("conv_shortcut", "shortcut"),
)
_FIELDS = {"part": "encoder|decoder", "rest": ".+", "block": ".+", "i": r"\d+", "j": r"\d+", "n": r"\d+"}


def _compile(template: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(f"(?P<{p}>{_FIELDS[p]})" if k % 2 else re.escape(p) for k, p in enumerate(pieces)))


_RULES = [(_compile(diffusers), diffusers, _compile(wan), wan, index) for diffusers, wan, index in _KEY_RULES]


def _rename_key(key: str, up_stride: int, to_wan: bool) -> str:
    """``key`` renamed by the first rule of _KEY_RULES that matches it; keys none matches come back unchanged."""
    block_names = _BLOCK_NAMES if to_wan else [(wan, diffusers) for diffusers, wan in _BLOCK_NAMES]
    for diffusers_pattern, diffusers, wan_pattern, wan, index in _RULES:
        pattern, target = (diffusers_pattern, wan) if to_wan else (wan_pattern, diffusers)
        if not (m := pattern.fullmatch(key)):
            continue
        fields = m.groupdict()
        if index:
            stride, offset = index
            stride = up_stride if stride == "s" else stride
            if to_wan:
                fields["n"] = int(fields["i"]) * stride + (int(fields["j"]) if offset == "j" else offset % stride)
            else:
                fields["i"], fields["j"] = divmod(int(fields["n"]), stride)
                if offset != "j" and fields["j"] != offset % stride:
                    continue  # another rule's slot
        if "block" in fields:
            for old, new in block_names:
                if fields["block"].startswith(old + "."):
                    fields["block"] = new + fields["block"][len(old) :]
                    break
        return target.format(**fields)
    return key


def wan_key_from_diffusers(key: str, up_stride: int) -> str:
    """The Wan name of one diffusers-named VAE key; keys it does not know come back unchanged.

    ``up_stride`` is the number of Wan ``decoder.upsamples`` entries per decoder level: num_res_blocks + 2.
    """
    return _rename_key(key, up_stride, to_wan=True)


def wan_names_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLQwenImage`` state dict to the original Wan names (tensors untouched)."""
    resnets = [int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    up_stride = max(resnets, default=0) + 2
    return {wan_key_from_diffusers(k, up_stride): v for k, v in state_dict.items()}


def diffusers_key_from_wan(key: str, up_stride: int) -> str:
    """The diffusers name of one Wan-named VAE key (inverse of :func:`wan_key_from_diffusers`)."""
    return _rename_key(key, up_stride, to_wan=False)


# Wan modules that are causal 3D convolutions in the released checkpoints (the rest are 2D convolutions).
_CONV3D = re.compile(r"^(conv[12]|(encoder|decoder)\.(conv1|head\.2|.*\.residual\.[26]|.*\.shortcut))\.weight$")


def checkpoint_state_dict(model: RGBAVAE, layout: str = "wan") -> dict[str, torch.Tensor]:
    """This 2D model's weights in the released 3D layout: ``"wan"`` (ComfyUI's single file) or
    ``"diffusers"`` (the ``vae/`` folder of Qwen/Qwen-Image-Layered).

    A 3x3 kernel becomes a 3x3x3 one whose earlier temporal taps are zero, and the temporal resamplers
    get zero weights: on a single frame (the only input this model sees) the 3D network computes
    exactly what this one does.
    """
    if layout not in ("wan", "diffusers"):
        raise ValueError(f"layout must be 'wan' or 'diffusers', got {layout!r}")
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if _CONV3D.match(key):
            taps = value.shape[-1]
            kernel = value.new_zeros(*value.shape[:2], taps, *value.shape[2:])
            kernel[:, :, -1] = value
            value = kernel
        elif key.endswith(".gamma") and ".middle.1." not in key:
            value = value.reshape(-1, 1, 1, 1)
        out[key] = value
    levels = len(config.dim_mult)
    dims = [config.base_dim * m for m in config.dim_mult]
    stride = config.num_res_blocks + 1
    # Qwen-Image's temporal layout: the encoder's last two downsamplers and the decoder's first two
    # upsamplers are the 3D ones.
    for level in range(1, levels - 1):
        index = level * stride + config.num_res_blocks
        dim = dims[level]
        out[f"encoder.downsamples.{index}.time_conv.weight"] = torch.zeros(dim, dim, 3, 1, 1)
        out[f"encoder.downsamples.{index}.time_conv.bias"] = torch.zeros(dim)
    up_stride = config.num_res_blocks + 2
    decoder_dims = [config.base_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
    for level in range(min(2, levels - 1)):
        dim = decoder_dims[level + 1]
        index = level * up_stride + up_stride - 1
        out[f"decoder.upsamples.{index}.time_conv.weight"] = torch.zeros(2 * dim, dim, 3, 1, 1)
        out[f"decoder.upsamples.{index}.time_conv.bias"] = torch.zeros(2 * dim)
    if layout == "diffusers":
        out = {diffusers_key_from_wan(k, up_stride): v for k, v in out.items()}
    return out


def _wan_names(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return wan_names_from_diffusers(state_dict) if _is_diffusers_layout(state_dict) else state_dict


def _name_some(names, limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"not a Qwen-Image RGBA-VAE state dict: key {key!r} is missing "
            f"({len(state_dict)} keys, e.g. {_name_some(state_dict, 3)})"
        )
    return state_dict[key]


def _infer_shape(sd: Mapping[str, torch.Tensor]) -> dict:
    """VAEConfig's shape fields from a Wan-named state dict."""
    conv_in = _require(sd, "encoder.conv1.weight")
    image_channels = conv_in.shape[1]
    if image_channels == 3:
        raise ValueError(
            "this is the 3-channel (RGB) Qwen-Image / Wan 2.1 VAE (encoder.conv1 takes 3 channels); " + _RGBA_VAE_HINT
        )
    base_dim = conv_in.shape[0]
    z_dim = _require(sd, "decoder.conv1.weight").shape[1]
    encoder_blocks = 1 + max(
        (int(m[1]) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))), default=-1
    )
    decoder_blocks = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))), default=-1)
    # Per level the encoder has R resnets plus a downsampler and the decoder R + 1 resnets plus an upsampler,
    # the last level without one: E = L * R + L - 1 and D = L * (R + 1) + L - 1, so D - E = L.
    levels = decoder_blocks - encoder_blocks
    if levels < 1 or (encoder_blocks + 1) % levels or (encoder_blocks + 1) // levels < 2:
        raise ValueError(
            f"not a Wan-style VAE layout: {encoder_blocks} encoder.downsamples and {decoder_blocks} "
            "decoder.upsamples entries do not fit L levels of R residual blocks"
        )
    num_res_blocks = (encoder_blocks + 1) // levels - 1
    dim_mult = []
    for level in range(levels):
        width = _require(sd, f"encoder.downsamples.{level * (num_res_blocks + 1)}.residual.2.weight").shape[0]
        if width % base_dim:
            raise ValueError(f"encoder level {level} has {width} channels, not a multiple of base_dim {base_dim}")
        dim_mult.append(width // base_dim)
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": tuple(dim_mult),
        "num_res_blocks": num_res_blocks,
        "image_channels": image_channels,
    }


def vae_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], latents_mean=None, latents_std=None
) -> VAEConfig:
    """Infer the VAEConfig of a checkpoint (Wan or diffusers names, 5D or 4D kernels) from tensor shapes.

    latents_mean / latents_std: the checkpoint's config values if it has them; default Qwen-Image's.
    Raises ValueError for the 3-channel Qwen-Image / Wan 2.1 VAE and for state dicts that are not a VAE.
    """
    shape = _infer_shape(_wan_names(state_dict))
    z_dim = shape["z_dim"]
    if (latents_mean is None or latents_std is None) and z_dim != len(QWEN_IMAGE_LATENTS_MEAN):
        raise ValueError(f"the VAE has z_dim={z_dim}; pass latents_mean and latents_std with {z_dim} values each")
    return VAEConfig(
        **shape,
        latents_mean=QWEN_IMAGE_LATENTS_MEAN if latents_mean is None else tuple(float(v) for v in latents_mean),
        latents_std=QWEN_IMAGE_LATENTS_STD if latents_std is None else tuple(float(v) for v in latents_std),
    )


def convert_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an RGBA-VAE checkpoint to this module's 2D, Wan-named state dict.

    Accepts ComfyUI's single file (Wan names, 5D kernels) or a diffusers ``vae/`` folder's weights
    (``conv_in``, ``down_blocks``, ``quant_conv``, ...), with 5D or 4D kernels. 3D kernels keep their last
    temporal slice, RMS gammas become (C, 1, 1), and the ``time_conv`` weights are dropped. Missing,
    unexpected or misshapen keys raise ValueError naming them.
    """
    sd = _wan_names(state_dict)
    shape = _infer_shape(sd)
    # The latent statistics do not change any tensor's shape; neutral ones let any z_dim through here.
    config = VAEConfig(**shape, latents_mean=(0.0,) * shape["z_dim"], latents_std=(1.0,) * shape["z_dim"])
    expected = {k: v.shape for k, v in RGBAVAE(config, device="meta").state_dict().items()}

    converted, unused = {}, []
    for key, value in sd.items():
        if m := _TIME_CONV.match(key):
            if f"{m[1]}.{m[2]}.resample.1.weight" in expected:
                unused.append(key)
                continue
        if value.ndim == 5:
            value = value[:, :, -1].contiguous()
        elif key.endswith(".gamma"):
            value = value.reshape(-1, 1, 1)
        converted[key] = value

    missing = expected.keys() - converted.keys()
    unexpected = converted.keys() - expected.keys()
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {_name_some(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_name_some(unexpected)}")
        raise ValueError(f"RGBA-VAE state dict does not match the model ({config}): " + "; ".join(problems))
    misshapen = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in converted.items() if v.shape != expected[k]
    ]
    if misshapen:
        raise ValueError(f"RGBA-VAE state dict has {len(misshapen)} misshapen tensors: {', '.join(misshapen[:5])}")
    log.debug("RGBA-VAE conversion dropped %d unused time_conv tensors", len(unused))
    return converted
