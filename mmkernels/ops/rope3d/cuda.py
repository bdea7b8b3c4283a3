"""3D RoPE ``cuda`` backend: thin glue over ``mmkernels._C`` (csrc/rope3d/rope3d.cu). Semantics: reference.py.

The kernel reads x through its batch/token/head strides and needs a unit stride on the head dim; any other
layout is copied once.
"""

from __future__ import annotations

import torch

from mmkernels._ext import C
from mmkernels.ops.rope3d.reference import inv_freq_on


def forward(x: torch.Tensor, grid, split, base: float, offsets, inverse: bool) -> torch.Tensor:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    freq = inv_freq_on(tuple(split), float(base), x.device)
    return C.rope3d(x, freq, list(grid), list(split), list(offsets), bool(inverse))
