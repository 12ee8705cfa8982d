"""Command line: ``python -m layered_core {inspect,selftest}``."""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoints import (
    LAYERED_MARKER,
    TRANSFORMER_PREFIXES,
    CheckpointError,
    describe_keys,
    find_prefix,
    infer_mmdit_config,
    open_checkpoint,
    quantized_layers,
)


def inspect_checkpoint(path: str) -> dict:
    """What a checkpoint holds, without loading its tensors."""
    source = open_checkpoint(path)
    keys = source.keys()
    info = {
        "path": str(source.location),
        "holds": describe_keys(keys),
        "tensors": len(keys),
        "bytes": sum(source.dtypes[k].itemsize * _numel(source.shapes[k]) for k in keys),
        "dtypes": sorted({str(source.dtypes[k]).removeprefix("torch.") for k in keys}),
    }
    prefix = find_prefix(keys, TRANSFORMER_PREFIXES, "transformer_blocks.0.")
    if f"{prefix}{LAYERED_MARKER}" in source:
        info["prefix"] = prefix
        info["fp8_layers"] = len(quantized_layers(source, prefix))
        info["config"] = infer_mmdit_config(source, prefix).to_dict()
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layered_core", description="Qwen-Image-Layered in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="say what checkpoint files hold, without loading them")
    p_inspect.add_argument("paths", nargs="+", help="safetensors files, shard indexes or diffusers folders")
    sub.add_parser("selftest", help="tiny random models through every checkpoint layout and the models")
    args = parser.parse_args(argv)

    if args.command == "selftest":
        from .selftest import main as selftest_main

        return selftest_main()
    failed = 0
    for path in args.paths:
        try:
            print(json.dumps(inspect_checkpoint(path), indent=2))
        except CheckpointError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
