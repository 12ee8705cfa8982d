"""Fused projection weights for the caption decoder's whole step, without a second copy of the weights.

A decoding step multiplies one token's vector by each weight matrix once, so its time is the time to read the
weights, and a few large matrix-vector products read them faster than many small ones. Per decoder layer the step
reads one [q; k; v] weight (and bias) and one [gate; up] weight instead of three and two.

The fused matrix is the model's own storage: its parts are allocated as one tensor, copied in, and the model's
Parameters then point at their rows of it (``param.data = fused[rows]``), so the model's forward, ``generate`` and
anything else reading the Parameters see the same values at no extra memory. The fused matrix is never kept apart:
each call finds it again as the span of storage its parts lie in one after another (:func:`contiguous_rows`), so
whatever gives a Parameter a tensor of its own (``model.to(dtype)``, a move between devices,
``load_state_dict(assign=True)``) is seen on the next call, which fuses again. A model whose parts share storage
this way is seen by safetensors' and transformers' savers as tensors sharing memory; the pack never saves the text
encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def contiguous_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The concatenation of ``parts`` along their first dimension as a view of their storage, when they lie one
    after another in one storage (same dtype, device and trailing shape, each contiguous); None otherwise."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for part in parts:
        if (
            part.dtype != first.dtype
            or part.device != first.device
            or part.shape[1:] != first.shape[1:]
            or not part.is_contiguous()
            or part.untyped_storage().data_ptr() != storage
            or part.storage_offset() != offset
        ):
            return None
        offset += part.numel()
    rows = sum(part.shape[0] for part in parts)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def fuse_rows(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The concatenation of ``parameters`` along their first dimension, as one tensor whose row ranges the
    Parameters are: moved there first (a copy, after which each Parameter's old tensor is freed) unless they are
    already (:func:`contiguous_rows`)."""
    fused = contiguous_rows(parameters)
    if fused is not None:
        return fused
    first = parameters[0]
    for parameter in parameters:
        if (parameter.dtype, parameter.device, parameter.shape[1:]) != (first.dtype, first.device, first.shape[1:]):
            raise ValueError(
                f"cannot fuse a {parameter.dtype} {tuple(parameter.shape)} weight on {parameter.device} with a "
                f"{first.dtype} {tuple(first.shape)} one on {first.device}: fused parts need one dtype, device and "
                "row length"
            )
    # ordinary tensors, not inference tensors, even when called while decoding: the Parameters keep them
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([parameter.detach() for parameter in parameters])
        start = 0
        for parameter in parameters:
            parameter.data = fused[start : start + parameter.shape[0]]
            start += parameter.shape[0]
    fused = contiguous_rows(parameters)
    if fused is None:
        raise RuntimeError("the fused weights are not where their parts were put (another torch?)")
    return fused
