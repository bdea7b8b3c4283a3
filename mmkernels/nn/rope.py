"""``RotaryEmbedding3D`` module: LaVin-DiT's 3D RoPE on :func:`mmkernels.rope3d`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from mmkernels.ops.rope3d import reference, rope3d


class RotaryEmbedding3D(nn.Module):
    """Rotate-half 3D rotary embedding for heads of size ``head_dim`` split into (t, h, w) parts.

    Like the official module it has no parameters or buffers, so it adds nothing to a state dict. The split defaults
    to head_dim // 3 per axis (head_dim % 6 == 0); give one explicitly otherwise (e.g. (16, 24, 24) for 64).

    ``forward(x, grid, offsets=None)`` takes x [B, L, H, D] with L = T*Hg*Wg tokens in (t, h, w) row-major order and
    returns the rotated tensor, see :func:`mmkernels.rope3d`.
    """

    def __init__(self, head_dim: int, split: Optional[Sequence[int]] = None, base: float = 10000.0):
        super().__init__()
        self.head_dim = int(head_dim)
        self.split = tuple(split) if split is not None else reference.default_split(self.head_dim)
        if sum(self.split) != self.head_dim or any(p % 2 or p < 0 for p in self.split) or len(self.split) != 3:
            raise ValueError(f"RotaryEmbedding3D: split {self.split} must be 3 even parts summing to "
                             f"head_dim={self.head_dim}")
        self.base = float(base)

    def forward(self, x: torch.Tensor, grid: Sequence[int], offsets: Optional[Sequence[int]] = None) -> torch.Tensor:
        return rope3d(x, grid, self.split, self.base, offsets)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, split={self.split}, base={self.base}"
