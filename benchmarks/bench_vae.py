"""Time and memory of the full-size RGBA-VAE: 8 layers at 1024 px, and 2048 px untiled against tiled.

Random weights: speed and memory do not depend on the values. On CUDA the model runs in bfloat16; without
CUDA, or with ``--small``, it runs in float32 at a quarter of the image size (2 layers) so it ends quickly.

    python -m benchmarks.bench_vae            # GPU
    python -m benchmarks.bench_vae --small    # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.measure import peak_gib, reset_peak, sync, timed
from layered_core.vae import DEFAULT_OVERLAP, DEFAULT_TILE, RGBAVAE, VAEConfig


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``repeats`` runs after one warm-up, and peak GiB allocated from the first of them (CUDA
    only)."""
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak()
    seconds = statistics.median(timed(fn, 0, repeats))
    return seconds, peak_gib() if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU float32 at 1/4 of the image size, 2 layers")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3 GPU, 1 CPU)")
    args = parser.parse_args()

    small = args.small or not torch.cuda.is_available()
    device = torch.device("cpu" if small else "cuda")
    dtype = torch.float32 if small else torch.bfloat16
    repeats = args.repeats or (1 if small else 3)
    divisor, layers = (4, 2) if small else (1, 8)
    tile, overlap = (DEFAULT_TILE // divisor, DEFAULT_OVERLAP // divisor)

    torch.manual_seed(0)
    model = RGBAVAE(VAEConfig.full(), dtype=dtype, device=device).eval()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    side, big = 1024 // divisor, 2048 // divisor
    layer_latent = torch.randn(layers, 16, side // 8, side // 8, device=device)
    big_latent = torch.randn(1, 16, big // 8, big // 8, device=device)
    image = torch.rand(1, 4, side, side, device=device)
    cases = [
        (f"encode 1 x {side}x{side}", lambda: model.encode(image)),
        (f"decode {layers} layers x {side}x{side}", lambda: model.decode(layer_latent, tile=0)),
        (f"decode 1 x {big}x{big} untiled", lambda: model.decode(big_latent, tile=0)),
        (
            f"decode 1 x {big}x{big} tiled ({tile}/{overlap} latent px)",
            lambda: model.decode(big_latent, tile=tile, overlap=overlap),
        ),
    ]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"RGBA-VAE full size, {dtype}, {name}, torch {torch.__version__}, weights {weights_gib:.3f} GiB")
    print(f"{'case':<44} {'time (s)':>9} {'peak (GiB)':>11}")
    for label, fn in cases:
        try:
            seconds, peak = measure(fn, device, repeats)
        except torch.OutOfMemoryError:
            print(f"{label:<44} {'OOM':>9} {'-':>11}")
            torch.cuda.empty_cache()
            continue
        peak_text = "-" if peak is None else f"{peak:.2f}"
        print(f"{label:<44} {seconds:>9.3f} {peak_text:>11}", flush=True)


if __name__ == "__main__":
    main()
