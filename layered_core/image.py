"""Input images: any file or PIL mode to straight RGBA, the model's size buckets, and resampling of
RGBA layers without halos (colour resampled premultiplied by alpha)."""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
BUCKETS = (640, 1024)
MIN_SIDE = 16  # one 2x2 patch of the 8x-downsampled latent
MAX_ASPECT = 8.0


class ImageError(ValueError):
    """An input image that cannot be used; the message names it and the problem."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as straight RGBA, EXIF orientation applied."""
    return open_image_with_alpha(path)[0]


def open_image_with_alpha(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """Open an image file as straight RGBA, EXIF orientation applied, and say whether the file itself is
    transparent (an alpha band, or a palette or colour key marked transparent) rather than opaque."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            transparent = "transparency" in image.info or any(band in ("A", "a") for band in image.getbands())
            return to_rgba(ImageOps.exif_transpose(image), name=str(path)), transparent
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused, the image is too large to open safely ({e})") from None


def find_image_files(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The image files directly in ``folder`` (by suffix, not recursive) whose names match the glob
    ``pattern`` (either case, as the suffixes), sorted by name. Hidden files are left out: a macOS
    ``._photo.jpg`` is no image."""
    folder = Path(folder)
    found = [
        path
        for path in folder.iterdir()
        if not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
        and fnmatch.fnmatchcase(path.name.lower(), pattern.lower())
        and path.is_file()
    ]
    return sorted(found, key=lambda path: path.name)


def to_rgba(image: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode as 8-bit straight RGBA. Opaque modes get alpha 255; 16-bit and float grey scale down."""
    mode = image.mode
    if mode == "RGBA":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGBA")
    if mode in ("RGB", "L", "LA", "P", "PA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX"):
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        return image.convert("RGBA")
    raise ImageError(f"{name}: unsupported image mode {mode!r}")


def flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite straight RGBA over an opaque colour (alpha becomes 255)."""
    base = Image.new("RGBA", image.size, (*background, 255))
    return Image.alpha_composite(base, image)


def bucket_size(width: int, height: int, resolution: int = 640) -> tuple[int, int]:
    """The (width, height) the model runs at: area ``resolution**2``, the input's aspect kept, each side
    rounded to a multiple of 32, then floored to 16 (a 1280x720 input gives 864x480)."""
    if resolution not in BUCKETS:
        raise ValueError(f"resolution must be one of {BUCKETS}, got {resolution}")
    if width < 1 or height < 1:
        raise ImageError(f"image is empty ({width}x{height})")
    ratio = width / height
    if max(ratio, 1 / ratio) > MAX_ASPECT:
        raise ImageError(
            f"image aspect ratio {width}x{height} is more extreme than {MAX_ASPECT:g}:1; crop or pad it first"
        )
    bucket_width = math.sqrt(resolution * resolution * ratio)
    bucket_height = bucket_width / ratio
    bucket_width = round(bucket_width / 32) * 32 // 16 * 16
    bucket_height = round(bucket_height / 32) * 32 // 16 * 16
    return max(bucket_width, MIN_SIDE * 2), max(bucket_height, MIN_SIDE * 2)


def resize_rgba(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos resize of straight RGBA; Pillow resamples RGBA premultiplied, so edges get no halo."""
    if image.size == tuple(size):
        return image
    return image.resize(tuple(size), Image.Resampling.LANCZOS)


def image_to_bchw(image: Image.Image) -> torch.Tensor:
    """RGBA PIL image as float32 (1, 4, H, W) in [0, 1]."""
    array = np.asarray(to_rgba(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def resize_layers(layers: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample straight-alpha RGBA layers (N, 4, H, W) in [0, 1] to ``size`` = (width, height).

    Colour is resampled premultiplied by alpha and divided back afterwards, so a soft edge keeps its
    colour instead of picking up the (meaningless) colour of transparent pixels next to it.
    """
    width, height = size
    if layers.shape[-2:] == (height, width):
        return layers
    alpha = layers[:, 3:4]
    premultiplied = torch.cat([layers[:, :3] * alpha, alpha], dim=1).float()
    shrinking = height < layers.shape[-2] or width < layers.shape[-1]
    out = F.interpolate(premultiplied, size=(height, width), mode="bicubic", align_corners=False, antialias=shrinking)
    out_alpha = out[:, 3:4].clamp(0, 1)
    colour = torch.where(out_alpha > 1e-6, out[:, :3] / out_alpha.clamp(min=1e-6), torch.zeros_like(out[:, :3]))
    return torch.cat([colour.clamp(0, 1), out_alpha], dim=1).to(layers.dtype)
