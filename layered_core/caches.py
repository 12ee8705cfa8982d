"""Where the pack keeps compiled code on disk (~/.cache/qwen-layered, or under $XDG_CACHE_HOME), so that a new
process starts from a warm cache: inductor's compiled blocks and FlashAttention-4's kernels."""

from __future__ import annotations

import os


def cache_folder(name: str, chosen: str | None = None) -> str | None:
    """``~/.cache/qwen-layered/<name>`` (or the folder the user ``chosen``) made if needed, or None where it
    cannot be made."""
    if chosen:
        folder = chosen
    else:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(root, "qwen-layered", name)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return folder


def keep_compiled_code() -> None:
    """Keep inductor's compiled code in the pack's cache folder (unless the user chose one): its default folder
    under /tmp is emptied on reboot, and a warm cache is what makes a compiled run's first call short."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    folder = cache_folder("inductor")
    if folder is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
