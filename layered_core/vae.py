"""The RGBA-VAE of Qwen-Image-Layered, as a 2D network.

The checkpoint is Qwen-Image's Wan 2.1-style causal 3D VAE with four image channels. Qwen-Image-Layered
only ever codes single frames (layers go through as a batch), and on one frame a causal 3D conv sees its
input only through the last temporal tap of its kernel: the two earlier taps meet the causal zero padding.
The temporal resampling convs (``time_conv``) never run on a first frame either. So this model is built
from 2D convs, which halves activation memory and runs faster; :mod:`layered_core.checkpoints.vae` slices the
checkpoint's 5D kernels down to 4D and drops the ``time_conv`` weights.

Module names follow the original Wan layout of ComfyUI's single file (``encoder.downsamples.N.residual.2``,
``decoder.head.2``, ``conv1`` / ``conv2``, ...), so a converted checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
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

RGBA_VAE_HINT = (
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
            raise ValueError(f"VAEConfig.image_channels must be 4 (RGBA), got {self.image_channels!r}; {RGBA_VAE_HINT}")
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
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Decode latent frames (F, C, h, w) a few at a time: ``decode_fn`` on each chunk of at most
    ``frames_per_batch`` frames, each result moved to the CPU, concatenated along the batch;
    ``progress(frames decoded, F)`` after each chunk.

    The layers of a decomposition decode independently, and the decoder's activations grow with the batch, so
    all 20 layers in one batch would not fit beside the transformer.
    ``decode_fn`` is e.g. :meth:`RGBAVAE.decode`; whatever it needs first (a model loaded, latents
    normalised) is the caller's.
    """
    if isinstance(frames_per_batch, bool) or not isinstance(frames_per_batch, Integral) or frames_per_batch < 1:
        raise ValueError(f"frames_per_batch must be a positive int, got {frames_per_batch!r}")
    decoded = []
    for chunk in frames.split(int(frames_per_batch)):
        decoded.append(decode_fn(chunk).cpu())
        if progress is not None:
            progress(sum(len(images) for images in decoded), len(frames))
    return torch.cat(decoded)
