"""A transformer block as a function of its weights: :class:`~.mmdit.DualStreamBlock`'s own code run on tensors
handed to it, for whoever holds the weights (ComfyUI's model management hands them over block by block).

The block's code runs on a template block on the meta device with the weights swapped in
(``torch.func.functional_call``). Under ``torch.compile`` the weights are then inputs of the graph, not constants
of one module: a single compiled graph serves every block and every step, for as long as the shapes stay. The
template has the pack's own layers, so the block runs with the pack's attention (FlashAttention-4 where installed),
its fused kernels (:mod:`.kernels`) and, for float8 weights, :class:`~.ops.FP8Linear`'s matmul: the math of the
command line's compiled model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from .caches import keep_compiled_code
from .mmdit import DualStreamBlock, MMDiTConfig
from .ops import FP8_COMPUTE_MODES, FP8Linear


@functools.cache
def block_layers(config: MMDiTConfig) -> dict[str, str]:
    """The layers of a block that hold weights, by name inside the block, in module order: "linear" or "norm"
    (the attention's RMSNorms)."""
    return {
        name: "linear" if isinstance(module, nn.Linear) else "norm"
        for name, module in block_template(config).named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }


@functools.cache
def block_template(config: MMDiTConfig, fp8_layers: frozenset[tuple[str, str]] = frozenset()) -> DualStreamBlock:
    """The meta-device block the weights are swapped into: ``fp8_layers`` holds (linear name, FP8Linear compute
    mode) for the linears whose weights come as float8 with a per-tensor scale, the others are ``torch.nn``
    layers. One template per layout, so blocks of one layout share it (and its compiled graph)."""
    with torch.device("meta"):
        template = DualStreamBlock(config).eval().requires_grad_(False)
    for name, compute in sorted(fp8_layers):
        if compute not in FP8_COMPUTE_MODES:
            raise ValueError(
                f"{name}: FP8Linear compute must be one of {', '.join(FP8_COMPUTE_MODES)}, got {compute!r}"
            )
        parent_name, _, child = name.rpartition(".")
        parent = template.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name!r} is not a linear of the block")
        setattr(parent, child, FP8Linear.like(linear, compute=compute))
    return template


def _functional_call(template, weights, img, txt, temb, pe, mask):
    return torch.func.functional_call(template, dict(weights), (img, txt, temb, pe, mask), strict=True)


_COMPILED = None


def _compiled_call():
    """:func:`_functional_call` under ``torch.compile``, made once (one compiled code for all blocks and templates),
    with inductor's code kept in the pack's cache folder as the command line keeps it."""
    global _COMPILED
    if _COMPILED is None:
        keep_compiled_code()
        _COMPILED = torch.compile(_functional_call)
    return _COMPILED


def call_block(
    template: DualStreamBlock,
    weights: Mapping[str, torch.Tensor],
    img: torch.Tensor,
    txt: torch.Tensor,
    temb: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``template(img, txt, temb, pe, mask)`` with ``weights`` (the block's state-dict names: ``attn.to_q.weight``,
    FP8Linear's ``...weight_scale``; every one of them) in place of the template's own; under ``torch.compile``
    with ``compiled``."""
    if not compiled:
        return _functional_call(template, weights, img, txt, temb, pe, mask)
    # Under dynamic shapes dynamo guards the base of an input that is a view: the first block's streams (views of
    # the input projections' output where no cast separates them) would otherwise get a graph of their own.
    img, txt, temb, pe = (tensor.clone() if tensor._base is not None else tensor for tensor in (img, txt, temb, pe))
    return _compiled_call()(template, weights, img, txt, temb, pe, mask)
