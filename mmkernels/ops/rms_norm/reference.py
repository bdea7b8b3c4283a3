"""RMSNorm: the definition (plain PyTorch) and the ``torch`` backend.

Math, over the last dim of ``x`` (width N), with statistics in fp32::

    rstd = 1 / sqrt(mean(x.float() ** 2) + eps)          # one value per row
    y    = (x.float() * rstd).to(x.dtype)                  # normalized, rounded to the input dtype
    y    = y * weight.to(x.dtype)     (if weight is given)  # product rounded to the input dtype

The two roundings are apex ``FusedRMSNorm``'s, which LaVin-DiT uses (specs/lavin_dit.md §1.11): the normalized
value is rounded to bf16 before the weight multiply. In fp32 both roundings are no-ops.

Layouts: ``x`` is [..., N] (any strides), ``weight`` is [N] or None. ``y`` has x's shape and dtype (contiguous);
``rstd`` is fp32 [...] (x's shape without the last dim). (fp64 inputs compute, and return rstd, in fp64.)

Backward (the backend contract; computed in fp32, with x̂ = x·rstd and g = dy·w)::

    dx = rstd * (g - x̂ * mean(g * x̂))                     # per row
    dw = sum over rows of dy * x̂                          # in fp32, returned in weight's dtype
"""

from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (so fp64 autograd can serve as ground truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable reference (autograd through plain torch ops). See the module docstring."""
    return forward(x, weight, eps)[0]


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) per the module docstring. Differentiable in x and weight."""
    xf = x.to(compute_dtype(x))
    rstd = torch.rsqrt(xf.square().mean(dim=-1) + eps) if x.shape[-1] > 0 else xf.new_ones(x.shape[:-1])
    y = (xf * rstd.unsqueeze(-1)).to(x.dtype)
    if weight is not None:
        y = y * weight.to(x.dtype)
    return y.contiguous(), rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dx, dw) in closed form, per the module docstring. dw is None when weight is None."""
    cd = compute_dtype(x)
    xhat = x.to(cd) * rstd.unsqueeze(-1).to(cd)
    g = dy.to(cd)
    if weight is not None:
        g = g * weight.to(x.dtype).to(cd)
    n = x.shape[-1]
    dot = (g * xhat).sum(dim=-1, keepdim=True) / max(n, 1)
    dx = (rstd.unsqueeze(-1).to(cd) * (g - xhat * dot)).to(x.dtype)
    dw = None
    if weight is not None:
        dw = (dy.to(cd) * xhat).reshape(-1, n).sum(dim=0).to(weight.dtype)
    return dx.contiguous(), dw
