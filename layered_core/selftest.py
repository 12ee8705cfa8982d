"""Check an install without the 54 GB of weights: tiny random models written in every checkpoint
layout a user can hold, loaded back through the real loaders, run, and compared."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import load_mmdit, load_vae, save_mmdit
from .mmdit import MMDiTConfig, VLDMMDiT
from .vae import RGBAVAE, VAEConfig

TRANSFORMER_LAYOUTS = {
    # layout -> largest relative max error allowed against the in-memory model
    "diffusers": 1e-5,
    "comfy": 1e-5,
    "comfy-prefixed": 1e-5,
    "fp8-comfy-quant": 0.1,  # e4m3 keeps 3 mantissa bits: the weights themselves differ
    "fp8-scaled": 0.1,
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def random_models(seed: int = 0) -> tuple[VLDMMDiT, RGBAVAE]:
    """The tiny transformer and VAE with seeded weights at PyTorch's default scales."""
    torch.manual_seed(seed)
    transformer = VLDMMDiT(MMDiTConfig.tiny()).eval().requires_grad_(False)
    vae = RGBAVAE(VAEConfig.tiny()).eval().requires_grad_(False)
    return transformer, vae


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def run_selftest(workdir: str | Path | None = None) -> list[Check]:
    """Run every check; returns one :class:`Check` per step."""
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        transformer, vae = random_models()
        config = transformer.config
        gen = torch.Generator().manual_seed(1)
        latents = torch.randn(1, 16, 3, 8, 12, generator=gen)
        condition = torch.randn(1, 16, 8, 12, generator=gen)
        text = torch.randn(1, 7, config.text_dim, generator=gen)
        sigma = torch.tensor([0.6])
        with torch.no_grad():
            expected = transformer(latents, condition, text, sigma)
        for layout, tolerance in TRANSFORMER_LAYOUTS.items():
            name = f"transformer, {layout} layout"
            try:
                target = tmp / (layout if layout == "diffusers" else f"{layout}.safetensors")
                save_mmdit(transformer.state_dict(), target, layout=layout, config=config, shard_bytes=100_000)
                loaded = load_mmdit(target, dtype=torch.float32)
                with torch.no_grad():
                    error = _relative_error(loaded(latents, condition, text, sigma), expected)
                checks.append(Check(name, error <= tolerance, f"rel. max error {error:.1e} (<= {tolerance:g})"))
            except Exception as e:  # a self-test reports every failure instead of stopping at the first
                checks.append(Check(name, False, f"{type(e).__name__}: {e}"))

        try:
            from safetensors.torch import save_file

            path = tmp / "qwen_image_layered_vae.safetensors"
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
            loaded_vae = load_vae(path)
            image = torch.rand(2, 4, 64, 96, generator=gen)
            latent = loaded_vae.encode(image)
            decoded = loaded_vae.decode(latent)
            same = torch.equal(latent, vae.encode(image))
            ok = same and decoded.shape == (2, 4, 64, 96) and bool(((decoded >= 0) & (decoded <= 1)).all())
            checks.append(Check("VAE, ComfyUI file: encode + decode", ok, f"latent {tuple(latent.shape)}"))
        except Exception as e:
            checks.append(Check("VAE, ComfyUI file: encode + decode", False, f"{type(e).__name__}: {e}"))
    return checks


def main() -> int:
    start = time.perf_counter()
    checks = run_selftest()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} passed, {failed} failed ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0
