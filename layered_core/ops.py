"""Layer factories ("operations") the models are built from.

Every model module takes ``operations=None`` and builds its layers as ``operations.Linear(...)``.
Plain PyTorch gets :class:`TorchOps`; ComfyUI passes its ``comfy.ops`` family instead, which is
what gives weight casting, low-VRAM streaming and LoRA patching there.

:class:`FP8Linear` holds a float8 e4m3 weight with its per-tensor scale, as ComfyUI's scaled fp8
files store them, so a 20 GB fp8 checkpoint stays 20 GB in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """Plain ``torch.nn`` layers: the default ``operations``."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    LayerNorm = nn.LayerNorm
    RMSNorm = nn.RMSNorm
    Embedding = nn.Embedding


def resolve_operations(operations):
    return TorchOps if operations is None else operations


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class FP8Linear(nn.Module):
    """A Linear whose weight stays in float8 with a float32 per-tensor scale.

    ``weight_real = weight.float() * weight_scale``. The matmul runs in the input's dtype on a
    weight dequantised just in time, so only one layer's weight is ever held at full precision.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=torch.float8_e4m3fn),
            requires_grad=False,
        )
        self.register_buffer("weight_scale", torch.ones((), device=device, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def like(cls, linear: nn.Linear) -> FP8Linear:
        """An empty FP8Linear on the meta device shaped like ``linear`` (for assign-loading)."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.weight.dtype}"
