"""Layer3D rotary position embedding of the VLD-MMDiT.

Every token has a (frame, row, col) position. Noisy frames take frame index 0..F-1 (0 is the
composite, 1..N the layers), the condition image frame -1. Rows and columns are centred:
-(h - h//2) .. h//2 - 1. Text tokens sit on the diagonal after the image: all three axes equal
start, start+1, ..., with start = max(h//2, w//2, F).

Head dimensions are split between the axes (16, 56, 56 for the full model); within each axis,
consecutive pairs of channels are rotated as complex numbers (interleaved layout).
"""

from __future__ import annotations

import torch

CONDITION_FRAME = -1


def centred_range(length: int, device=None) -> torch.Tensor:
    return torch.arange(length, device=device) - (length - length // 2)


def image_positions(frame_indices: list[int], height: int, width: int, device=None) -> torch.Tensor:
    """(len(frame_indices) * height * width, 3) positions, frame-major then row-major."""
    frames = torch.tensor(frame_indices, device=device)
    rows = centred_range(height, device)
    cols = centred_range(width, device)
    grid = torch.stack(torch.meshgrid(frames, rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def text_start(noisy_frames: int, height: int, width: int) -> int:
    """First text position: past the largest image position on every axis."""
    return max(height // 2, width // 2, noisy_frames)


def layered_positions(
    noisy_frames: int, height: int, width: int, text_length: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the text tokens and of the image tokens (noisy frames, then the condition)."""
    image = image_positions([*range(noisy_frames), CONDITION_FRAME], height, width, device)
    start = text_start(noisy_frames, height, width)
    text = torch.arange(start, start + text_length, device=device)[:, None].expand(-1, 3)
    return text, image


def rope_angles(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """(S, head_dim // 2) rotation angles in float32 for (S, len(axes_dims)) integer positions."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
        angles.append(positions[:, axis].to(torch.float32)[:, None] * inv_freq[None, :])
    return torch.cat(angles, dim=-1)


def rope_cos_sin(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """(S, head_dim // 2, 2) float32 table of (cos, sin) for :func:`apply_rope`."""
    angles = rope_angles(positions, axes_dims, theta)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (..., D) by a (cos, sin) table (..., D/2, 2), in float32.

    The table's leading dimensions broadcast against x's: (S, 1, D/2, 2) for (B, S, H, D) queries.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    cos, sin = cos_sin.unbind(-1)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
