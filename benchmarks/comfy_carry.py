"""Pack a ComfyUI checkout and the Python packages its import chain needs into one folder that a GPU machine
without a package index can unpack: what benchmarks/comfy_gpu_run.py needs there.

    python -m benchmarks.comfy_carry --comfyui ~/ComfyUI --wheels /tmp/wheels --out .comfy

writes ``<out>/comfyui.tar.xz`` (ComfyUI's code folders and top-level modules, without the tokenizer data, the
frontend or the models) and ``<out>/site.tar.xz`` (the wheels under --wheels unpacked, AMD's backend of
comfy-kitchen left out). On the GPU machine:

    mkdir -p /tmp/comfyui /tmp/site && tar -xJf .comfy/comfyui.tar.xz -C /tmp/comfyui &&
        tar -xJf .comfy/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site

The folder is for the device only: keep it ignored (``.git/info/exclude``), never commit it; it holds ComfyUI's
code, not ours. PyAV is not packed (its wheel alone is most of what a call may carry): comfy_gpu_run.py stands
a placeholder in for it when it is missing (see ``benchmarks.av_placeholder``).
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

CODE = ["comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "app", "utils", "middleware"]
# tokenizer vocabularies and merges: megabytes that no harness run reads
SKIP_DIRS = ("_tokenizer",)
SKIP_IN_SITE = ("comfy_kitchen/backends/hip/",)


def pack_comfyui(comfyui: Path, out: Path) -> int:
    with tarfile.open(out, "w:xz") as archive:
        for name in CODE:
            folder = comfyui / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                relative = path.relative_to(comfyui)
                if path.is_dir() or "__pycache__" in relative.parts:
                    continue
                if path.suffix != ".py" and any(part.endswith(SKIP_DIRS) for part in relative.parts):
                    continue
                archive.add(path, arcname=str(relative))
        for path in sorted(comfyui.glob("*.py")):
            archive.add(path, arcname=path.name)
    return out.stat().st_size


def pack_site(wheels: Path, out: Path) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        site = Path(scratch)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if not member.startswith(SKIP_IN_SITE):
                        archive.extract(member, site)
        with tarfile.open(out, "w:xz") as archive:
            for path in sorted(site.rglob("*")):
                if path.is_file():
                    archive.add(path, arcname=str(path.relative_to(site)))
    return out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--wheels", type=Path, required=True, help="a folder of cp312 manylinux wheels")
    parser.add_argument("--out", type=Path, default=Path(".comfy"))
    args = parser.parse_args()
    if not (args.comfyui / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"{args.comfyui} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    code = pack_comfyui(args.comfyui, args.out / "comfyui.tar.xz")
    site = pack_site(args.wheels, args.out / "site.tar.xz")
    print(f"comfyui.tar.xz {code / 2**20:.1f} MiB, site.tar.xz {site / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
