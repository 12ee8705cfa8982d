"""Scaled dot-product attention over heads, as one small function the models call."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, H, S, D); mask: None or boolean (B, S_k), True = attend. Returns (B, S, H * D)."""
    if mask is not None:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)
