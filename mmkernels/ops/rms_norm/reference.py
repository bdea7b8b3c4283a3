"""RMSNorm: the definition (plain PyTorch) and the ``torch`` backend.

Math, over the last dim of ``x`` (width N), with statistics in fp32::

    rstd = 1 / sqrt(mean(x.float() ** 2) + eps)          # one value per row
    y    = (x.float() * rstd).to(x.dtype)                  # normalized, rounded to the input dtype
    y    = y * weight.to(x.dtype)     (if weight is given)  # product rounded to the input dtype

The two roundings are apex ``FusedRMSNorm``'s, which LaVin-DiT uses (specs/lavin_dit.md §1.11): the normalized
value is rounded to bf16 before the weight multiply. In fp32 both roundings are no-ops.

Layouts: ``x`` is [..., N] (any strides), ``weight`` is [N] or None. ``y`` has x's shape and dtype (contiguous);
``rstd`` is fp32 [...] (x's shape without the last dim).

Backward (the backend contract; computed in fp32, with x̂ = x·rstd and g = dy·w)::

    dx = rstd * (g - x̂ * mean(g * x̂))                     # per row
    dw = sum over rows of dy * x̂                          # in fp32, returned in weight's dtype
"""

from __future__ import annotations

from typing import Optional

import torch


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable reference (autograd through plain torch ops). See the module docstring."""
    return forward(x, weight, eps)[0]


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) per the module docstring. Differentiable in x and weight."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dim=-1) + eps) if x.shape[-1] > 0 else xf.new_ones(x.shape[:-1])
    y = (xf * rstd.unsqueeze(-1)).to(x.dtype)
    if weight is not None:
        y = y * weight.to(x.dtype)
    return y.contiguous(), rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dx, dw) in closed form, per the module docstring. dw is None when weight is None."""
    xhat = x.float() * rstd.unsqueeze(-1)
    g = dy.float()
    if weight is not None:
        g = g * weight.to(x.dtype).float()
    n = x.shape[-1]
    dot = (g * xhat).sum(dim=-1, keepdim=True) / max(n, 1)
    dx = (rstd.unsqueeze(-1) * (g - xhat * dot)).to(x.dtype)
    dw = None
    if weight is not None:
        dw = (dy.float() * xhat).reshape(-1, n).sum(dim=0).to(weight.dtype)
    return dx.contiguous(), dw
