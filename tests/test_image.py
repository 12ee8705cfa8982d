"""Input images in every mode, the size buckets, and halo-free resampling of RGBA layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layered_core.image import (
    ImageError,
    bucket_size,
    find_image_files,
    flatten,
    open_image,
    open_image_with_alpha,
    resize_layers,
    resize_rgba,
)


@pytest.mark.parametrize(
    "size,resolution,expected",
    [
        ((1280, 720), 640, (864, 480)),
        ((720, 1280), 640, (480, 864)),
        ((1000, 1000), 640, (640, 640)),
        ((1000, 1000), 1024, (1024, 1024)),
        ((3000, 2000), 1024, (1248, 832)),
    ],
)
def test_bucket_sizes(size, resolution, expected):
    assert bucket_size(*size, resolution) == expected
    width, height = expected
    assert width % 16 == 0 and height % 16 == 0


def test_bucket_refusals():
    with pytest.raises(ValueError, match="resolution must be one of"):
        bucket_size(100, 100, 512)
    with pytest.raises(ImageError, match="aspect ratio"):
        bucket_size(5000, 100)
    with pytest.raises(ImageError, match="empty"):
        bucket_size(0, 10)


def _save(image: Image.Image, path, fmt, **kw):
    image.save(path, fmt, **kw)
    return path


def test_every_mode_becomes_straight_rgba(tmp_path):
    rgb = Image.new("RGB", (6, 4), (200, 100, 50))
    cases = {
        "rgb.png": rgb,
        "l.png": Image.new("L", (6, 4), 128),
        "la.png": Image.new("LA", (6, 4), (128, 64)),
        "rgba.png": Image.new("RGBA", (6, 4), (10, 20, 30, 40)),
        "cmyk.jpg": Image.new("CMYK", (6, 4), (0, 255, 255, 0)),
        "i16.png": Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)),
    }
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    cases["p.png"] = palette
    for name, image in cases.items():
        path = tmp_path / name
        image.save(path, transparency=1) if name == "p.png" else image.save(path)
        rgba = open_image(path)
        assert rgba.mode == "RGBA" and rgba.size == (6, 4), name
    assert open_image(tmp_path / "rgb.png").getpixel((0, 0)) == (200, 100, 50, 255)
    assert open_image(tmp_path / "l.png").getpixel((0, 0)) == (128, 128, 128, 255)
    assert open_image(tmp_path / "la.png").getpixel((0, 0)) == (128, 128, 128, 64)
    assert open_image(tmp_path / "rgba.png").getpixel((0, 0)) == (10, 20, 30, 40)
    assert open_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255, 255)
    assert open_image(tmp_path / "p.png").getpixel((0, 0))[3] == 0  # the transparent palette entry
    red, green, blue, alpha = open_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60 and alpha == 255


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (16, 8), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 4, 4))  # a block, not a pixel: JPEG subsamples colour
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif, quality=100)
    opened = open_image(path)
    assert opened.size == (8, 16)
    r, g, b, _ = opened.getpixel((6, 1))  # the red corner moved to the top right
    assert r > 200 and g < 80 and b < 80


def test_unreadable_files_are_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        open_image(broken)
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.png")


def test_open_image_says_whether_the_file_is_transparent(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "rgb.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 255)).save(tmp_path / "opaque_rgba.png")  # an alpha band, all opaque
    Image.new("LA", (4, 4), (9, 100)).save(tmp_path / "la.png")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "keyed.png", transparency=(1, 2, 3))
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "photo.jpg")
    found = {path.name: open_image_with_alpha(path) for path in tmp_path.iterdir()}
    assert {name: transparent for name, (_, transparent) in found.items()} == {
        "rgb.png": False,
        "opaque_rgba.png": True,
        "la.png": True,
        "keyed.png": True,
        "photo.jpg": False,
    }
    assert found["keyed.png"][0].getpixel((0, 0)) == (1, 2, 3, 0)  # the colour key became alpha 0
    assert found["la.png"][0].getpixel((0, 0)) == (9, 9, 9, 100)


def test_find_image_files_by_suffix_and_pattern_sorted_by_name(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", "._a.jpg", "model.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image
    assert [path.name for path in find_image_files(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    assert [path.name for path in find_image_files(tmp_path, "*.png")] == ["b.PNG"]
    assert [path.name for path in find_image_files(tmp_path, "[ab]*")] == ["a.jpg", "b.PNG"]
    assert find_image_files(tmp_path, "*.gif") == []


def test_flatten_onto_colour():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert flatten(image, (0, 0, 255)).getpixel((0, 0)) == (128, 0, 127, 255)


def test_resize_rgba_is_premultiplied():
    # A red opaque half next to a fully transparent GREEN half: straight resampling would bleed green.
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[:, :4] = (255, 0, 0, 255)
    array[:, 4:] = (0, 255, 0, 0)
    small = np.asarray(resize_rgba(Image.fromarray(array, "RGBA"), (4, 4)))
    visible = small[small[..., 3] > 0]
    assert visible[:, 1].max() <= 1  # no green in any visible pixel


def soft_disc(size: int, radius: float, colour=(1.0, 1.0, 1.0)) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    distance = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2).sqrt()
    alpha = (radius + 2 - distance).clamp(0, 4) / 4  # a 4 px soft edge
    rgb = torch.tensor(colour).view(3, 1, 1).expand(3, size, size) * (alpha > 0)
    return torch.cat([rgb, alpha[None]])[None]  # transparent pixels are black, as decoders often make them


def test_resize_layers_has_no_halo_at_soft_edges():
    disc = soft_disc(64, 20)
    big = resize_layers(disc, (160, 160))
    visible = big[0, 3] > 0.02
    # premultiplied: the colour of every visible pixel stays white
    assert big[0, :3][:, visible].min() > 0.97
    # straight resampling of the same layer would darken the edge (the halo this avoids)
    straight = torch.nn.functional.interpolate(disc, size=(160, 160), mode="bicubic", align_corners=False)
    assert straight[0, :3][:, visible].min() < 0.8
    # alpha itself is resampled like any channel
    assert abs(big[0, 3].mean().item() - disc[0, 3].mean().item()) < 0.01


def test_resize_layers_downscale_and_identity():
    disc = soft_disc(64, 20, colour=(0.2, 0.6, 1.0))
    assert resize_layers(disc, (64, 64)) is disc
    small = resize_layers(disc, (32, 32))
    assert small.shape == (1, 4, 32, 32)
    visible = small[0, 3] > 0.02
    assert torch.allclose(small[0, :3][:, visible].mean(dim=1), torch.tensor([0.2, 0.6, 1.0]), atol=0.01)


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 300x300 is then more than twice the limit
    with pytest.raises(ImageError, match="too large to open safely"):
        open_image(path)
