"""Scaled dot-product attention over heads, as one small function the models call.

Two kernels can serve it:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, which picks cuDNN's or FlashAttention-2's
  kernel on NVIDIA GPUs and a math or flash kernel on the CPU. Always available.
- ``"flash4"``: FlashAttention-4's CuTe kernels (``pip install flash-attn-4``), for Hopper and Blackwell GPUs
  (compute capability 9.x and 10.x), bf16 or fp16, no mask. It is an optional extra: where it is installed and
  the call fits, ``"auto"`` (the default) takes it, else SDPA. On Hopper with 128-wide heads it runs 128 x 192
  tiles, faster than FA4's default 128 x 128 at the step's shape (benchmarks/RESULTS.md). Its compiled kernels
  are kept on disk (FA4's own cache, switched on here unless ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED`` is set),
  so a new process does not compile them again.

:func:`set_attention_backend` picks one for the whole process (``QWEN_LAYERED_ATTENTION`` sets the default).
:func:`attention_override` routes the models' calls through another function for a while: sequence-parallel
attention (:mod:`.distributed.sequence`) gathers the heads' whole sequence across processes around
:func:`local_attention`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .caches import cache_folder

BACKENDS = ("auto", "sdpa", "flash4")
_backend = os.environ.get("QWEN_LAYERED_ATTENTION", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"QWEN_LAYERED_ATTENTION must be one of {', '.join(BACKENDS)}, got {_backend!r}")


def set_attention_backend(name: str) -> str:
    """Select the attention kernel: ``"auto"``, ``"sdpa"`` or ``"flash4"``; returns the previous choice.

    ``"flash4"`` raises here when FlashAttention-4 is not installed, and at call time when a call cannot use it
    (CPU tensors, a mask, an unsupported GPU or dtype), rather than quietly running something else.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "flash4" and not flash4_installed():
        raise ValueError(
            "attention backend 'flash4' needs FlashAttention-4 (pip install flash-attn-4), which is not installed"
        )
    previous, _backend = _backend, name
    return previous


def attention_backend() -> str:
    return _backend


def _find_flash4() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # no flash_attn at all, or FlashAttention-2's, which has no cute
        return False


# Looked up once (finding the spec does not import the kernels); a constant to torch.compile.
FLASH4_INSTALLED = _find_flash4()


def flash4_installed() -> bool:
    return FLASH4_INSTALLED


def flash4_problem(q: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why FlashAttention-4 cannot take this call, or None when it can. Static checks only (device, dtype,
    shape), so torch.compile traces the choice without a graph break."""
    if not flash4_installed():
        return "FlashAttention-4 is not installed (pip install flash-attn-4)"
    if q.device.type != "cuda" or torch.version.hip:
        return f"it runs on NVIDIA GPUs only, the tensors are on {q.device}"
    properties = torch.cuda.get_device_properties(q.device)
    if properties.major not in (9, 10):
        return f"it needs compute capability 9.x or 10.x, {properties.name} is {properties.major}.{properties.minor}"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bf16 or fp16 tensors, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head size {q.shape[-1]} is not a multiple of 8 up to 256"
    if mask is not None:
        return "it is used without a mask here (masked batches go to SDPA)"
    return None


def _enable_flash4_disk_cache() -> None:
    """Switch FA4's on-disk kernel cache on (in ~/.cache/qwen-layered) unless the user set the switch, or the
    folder cannot be made. FA4 reads the switch when first imported, so this runs before that import."""
    if "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED" in os.environ:
        return
    folder = cache_folder("flash-attention-cute", os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"))
    if folder is None:
        return  # no writable cache folder: FA4 compiles in every process, as it does by default
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = folder
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"


def flash4_tile(q: torch.Tensor) -> tuple[int, int] | None:
    """The (query, key) tile FA4 runs with here, or None for FA4's own choice: on Hopper with 128-wide heads,
    128 x 192, which beat FA4's default 128 x 128 at the step's attention shape (benchmarks/bench_kernels.py)."""
    if q.shape[-1] == 128 and torch.cuda.get_device_capability(q.device)[0] == 9:
        return (128, 192)
    return None


_FLASH4_FORWARD = None


def _flash4_forward():
    """FA4's launcher below the public flash_attn_func, which does not expose the tile size (the pinned FA4
    version has both); inference only, so no autograd wrapper is needed. Imported once, with the disk cache
    switched on first."""
    global _FLASH4_FORWARD
    if _FLASH4_FORWARD is None:
        _enable_flash4_disk_cache()
        from flash_attn.cute.interface import _flash_attn_fwd

        _FLASH4_FORWARD = _flash_attn_fwd
    return _FLASH4_FORWARD


@torch.library.custom_op("qwen_layered::flash4_attention", mutates_args=())
def _flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # An opaque op to torch.compile: dynamo does not trace into FlashAttention-4's Python launcher.
    forward = _flash4_forward()
    tile = flash4_tile(q)
    with torch.cuda.device(q.device):
        if tile is None:
            out = forward(q, k, v)
        else:
            out = forward(q, k, v, tile_mn=tile, mma_pv_is_rs=True, intra_wg_overlap=True)
    return out[0]  # (out, lse, ...)


@_flash4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
_override: AttentionFunction | None = None


@contextlib.contextmanager
def attention_override(function: AttentionFunction | None) -> Iterator[None]:
    """:func:`attention` calls ``function`` instead inside the ``with`` block (None: no change). Process-wide, and
    read by compiled code as a global: one function object per kind of call keeps torch.compile from compiling
    again."""
    global _override
    previous, _override = _override, function if function is not None else _override
    try:
        yield
    finally:
        _override = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, S, H, D); mask: None or boolean (B, S_k), True = attend. Returns (B, S, H * D)."""
    if _override is not None:
        return _override(q, k, v, mask)
    return local_attention(q, k, v, mask)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`attention` on this process's kernels, whatever the override."""
    if _backend != "sdpa":
        problem = flash4_problem(q, mask)
        if problem is None:
            return _flash4_attention(q, k, v).flatten(2)
        if _backend == "flash4":
            raise ValueError(f"attention backend 'flash4' cannot run this call: {problem}")
    if mask is not None:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)
