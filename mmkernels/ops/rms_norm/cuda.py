"""RMSNorm ``cuda`` backend: thin glue over ``mmkernels._C`` (csrc/rms_norm/rms_norm.cu). Semantics: reference.py.

The kernels read a 2-D [M, N] view with unit column stride and any row stride; anything else (a stride-0 grad, a
transposed input) is copied once. The weight is cast to x's dtype first, which is the op's rounding semantics.
"""

from __future__ import annotations

from typing import Optional

import torch

from mmkernels._ext import C


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.shape[-1] <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def _weight(weight: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if weight is None else weight.to(x.dtype).contiguous()


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = C.rms_norm_fwd(_rows(x), _weight(weight, x), eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    dx, dw_partial = C.rms_norm_bwd(_rows(dy), _rows(x), _weight(weight, x), rstd.reshape(-1).contiguous())
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx.view(x.shape), dw
