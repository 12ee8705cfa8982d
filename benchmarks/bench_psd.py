"""How long saving a layered PSD takes: 8 layers at 2048x2048 by default (the target is under 1 s).

Three kinds of stack, from easy to hard for RLE and for compositing:

- design: a synthetic design (opaque background, shapes, soft blobs, text, panels), layers cut to their
  alpha boxes, the way a cleaned-up decomposition looks;
- full-canvas: the same layers on the whole canvas with a faint alpha floor (1..2) and random colour under
  it, like raw decoder output that nobody cropped;
- noise: uniformly random RGBA on every layer, nothing to compress and nothing to skip (the worst case).

Run: ``python -m benchmarks.bench_psd [--size 2048] [--layers 8] [--repeats 5] [--baseline]``.
``--baseline`` also times psd-tools' own high-level path (PixelLayer.frompil + PSDImage.save, which
re-composites the preview itself) on the design stack, once.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import timed
from layered_core.compositing import composite, render_layer
from layered_core.export import save_png_zip
from layered_core.layers import Layer, LayerStack
from layered_core.psd import save_psd
from layered_core.synthetic import synthetic_design


def design_stack(size: int, layers: int) -> LayerStack:
    return synthetic_design(size, size, layer_count=layers, seed=3)


def full_canvas_stack(size: int, layers: int) -> LayerStack:
    rng = np.random.default_rng(1)
    design = design_stack(size, layers)
    out = []
    for layer in design:
        pixels = render_layer(layer, size, size)
        clear = pixels[..., 3] == 0
        pixels[clear, 3] = rng.integers(1, 3, int(clear.sum()), dtype=np.uint8)
        pixels[clear, :3] = rng.integers(0, 256, (int(clear.sum()), 3), dtype=np.uint8)
        out.append(Layer(pixels, layer.name))
    return LayerStack(size, size, tuple(out))


def noise_stack(size: int, layers: int) -> LayerStack:
    rng = np.random.default_rng(2)
    return LayerStack(
        size,
        size,
        tuple(Layer(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), f"noise {i}") for i in range(layers)),
    )


def baseline_psd_tools(stack: LayerStack, path: Path) -> None:
    from PIL import Image
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    document = PSDImage.new("RGBA", stack.size)
    for layer in stack:
        PixelLayer.frompil(Image.fromarray(layer.pixels, "RGBA"), document, layer.name, *layer.offset[::-1])
    document.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()

    import PIL
    import psd_tools

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{args.layers} layers at {args.size}x{args.size}, {args.repeats} runs each; {cpus} CPUs "
        f"({platform.processor() or platform.machine()}); Python {platform.python_version()}, "
        f"numpy {np.__version__}, Pillow {PIL.__version__}, psd-tools {psd_tools.__version__}"
    )
    header = (
        f"{'stack':<12} {'composite s':>12} {'PSD save s (median / min)':>27} {'PSD MB':>8} "
        f"{'ZIP save s':>11} {'ZIP MB':>8}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as directory:
        for name, build in (
            ("design", design_stack),
            ("full-canvas", full_canvas_stack),
            ("noise", noise_stack),
        ):
            stack = build(args.size, args.layers)
            psd_path, zip_path = Path(directory, f"{name}.psd"), Path(directory, f"{name}.zip")
            save_psd(stack, psd_path)  # warm-up: first-touch page faults, imports
            composite_times = timed(lambda stack=stack: composite(stack), 0, args.repeats)
            psd_times = timed(lambda stack=stack, path=psd_path: save_psd(stack, path), 0, args.repeats)
            zip_times = timed(
                lambda stack=stack, path=zip_path: save_png_zip(stack, path), 0, max(1, args.repeats // 2)
            )
            print(
                f"{name:<12} {statistics.median(composite_times):>12.3f} "
                f"{statistics.median(psd_times):>18.3f} / {min(psd_times):.3f} "
                f"{psd_path.stat().st_size / 1e6:>8.1f} {statistics.median(zip_times):>11.3f} "
                f"{zip_path.stat().st_size / 1e6:>8.1f}"
            )
        if args.baseline:
            stack = design_stack(args.size, args.layers)
            path = Path(directory, "baseline.psd")
            started = time.perf_counter()
            baseline_psd_tools(stack, path)
            print(
                f"baseline: psd-tools PixelLayer.frompil + PSDImage.save on the design stack: "
                f"{time.perf_counter() - started:.3f} s, {path.stat().st_size / 1e6:.1f} MB"
            )


if __name__ == "__main__":
    main()
