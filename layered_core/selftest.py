"""Check an install without the 54 GB of weights: tiny random models written in every checkpoint
layout a user can hold, loaded back through the real loaders, run and compared, then the whole
path (caption, decomposition, recursive split, PSD) on a tiny model set."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from psd_tools import PSDImage

from .checkpoints import load_mmdit, load_vae, save_mmdit, save_vae
from .compositing import composite
from .layers import rgba_to_pil
from .pipeline import DecomposeOptions, LayeredPipeline
from .psd import save_psd
from .synthetic import synthetic_design
from .tiny_models import tiny_transformer, tiny_vae, write_tiny_set

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


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def run_selftest(workdir: str | Path | None = None) -> list[Check]:
    """Run every check; returns one :class:`Check` per step."""
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        transformer, vae = tiny_transformer(), tiny_vae()
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
            path = save_vae(vae, tmp / "qwen_image_layered_vae.safetensors", layout="wan")
            loaded_vae = load_vae(path)
            image = torch.rand(2, 4, 64, 96, generator=gen)
            latent = loaded_vae.encode(image)
            decoded = loaded_vae.decode(latent)
            same = torch.equal(latent, vae.encode(image))
            ok = same and decoded.shape == (2, 4, 64, 96) and bool(((decoded >= 0) & (decoded <= 1)).all())
            checks.append(Check("VAE, ComfyUI file: encode + decode", ok, f"latent {tuple(latent.shape)}"))
        except Exception as e:
            checks.append(Check("VAE, ComfyUI file: encode + decode", False, f"{type(e).__name__}: {e}"))
        checks.extend(_whole_path(tmp))
    return checks


def _whole_path(tmp: Path) -> list[Check]:
    """A tiny diffusers-layout folder of all three models, then image -> layers -> split -> PSD and ZIP."""
    checks: list[Check] = []
    try:
        folder = write_tiny_set(tmp / "Qwen-Image-Layered-tiny")
        pipeline = LayeredPipeline.from_files(model=str(folder), dtype=torch.float32)
        checks.append(Check("tiny pipeline folder: write + load", True, "transformer, vae, text encoder"))
    except Exception as e:
        return [Check("tiny pipeline folder: write + load", False, f"{type(e).__name__}: {e}")]

    image = rgba_to_pil(composite(synthetic_design(320, 192, 4, seed=1)))
    steps = []
    try:
        result = pipeline(
            image, "", DecomposeOptions(layer_count=3, steps=2), callback=lambda info: steps.append(info.step)
        )
        ok = result.layer_images.shape[:2] == (3, 4) and bool(result.prompt) and steps == [0, 1]
        size = f"{result.layer_images.shape[-1]}x{result.layer_images.shape[-2]}"
        checks.append(Check("decompose (auto-caption, 3 layers, 2 steps)", ok, f"3 layers at {size}"))
        stack = pipeline.split(result.stack(), 0, 2, prompt="the bottom layer", options=DecomposeOptions(steps=1))
        split_ok = len(stack.get(0).children) == 2
        checks.append(Check("split layer 1 into 2 (recursion)", split_ok, f"{len(stack.get(0).children)} sub-layers"))
        psd_path = save_psd(stack, tmp / "layers.psd")
        read_back = PSDImage.open(psd_path)
        groups = [layer for layer in read_back if layer.is_group()]
        ok = len(groups) == 1 and len(list(read_back.descendants())) == 3 + 2
        checks.append(Check("layered PSD written and read back", ok, f"{psd_path.stat().st_size} bytes"))
    except Exception as e:
        checks.append(Check("decompose -> split -> PSD", False, f"{type(e).__name__}: {e}"))
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
