"""AdaRN modulation/gate: the definition (plain PyTorch) and the ``torch`` backend.

LaVin-DiT's J-DiT block (specs/lavin_dit.md §1.5, §1.8, §1.11, gotchas 5 and 17) wraps each branch in sandwich
RMSNorms (no affine, eps 1e-6) with per-sample modulation, and runs everything in bf16 at inference:

* pre-norm (norm1/norm2) and final layer: ``h = (1 + scale) * RMSNorm(s)``
* post-norm (post_norm1/post_norm2):       ``s = s + tanh(gate) * RMSNorm(a)``

This op is the composition of both, with every part optional. Over the last dim of ``x`` (width D), with rounding
to x's dtype (``rnd``) exactly where the official composition of torch ops in that dtype rounds::

    rstd = 1 / sqrt(mean(x.float() ** 2) + eps)              # fp32 statistics, one value per row
    y = rnd(x.float() * rstd)                                 # (1) apex FusedRMSNorm: normalized value rounded
    y = rnd(y * rnd(1 + scale))       if scale is given       # (2) 1 + scale in x's dtype, (3) the product
    y = rnd(rnd(tanh(gate)) * y)      if gate is given        # (4) tanh in x's dtype, (5) the product
    y = rnd(residual + y)             if residual is given    # (6) the residual add in x's dtype

Each elementwise op computes in fp32 from its (rounded) operands and rounds once, as torch's bf16/fp16 kernels do
on the CPU and the GPU (opmath). In fp32 every ``rnd`` is a no-op; fp64 inputs compute in fp64 throughout.
This module *is* that composition, so in bf16/fp16 it equals it bitwise (tests/ops/test_adarn.py checks all
combinations). Against apex itself, only the fp32 sum of squares may differ (apex reduces in another order), which
can move a normalized value by 1 ulp where it lies next to a rounding boundary.

Layouts. ``x`` is [B, *tokens, D] (any strides): ``scale`` and ``gate`` index its *first* dim and broadcast over
every other dim but the last. Each of them is

* [D]: one vector for every row of x;
* [B, D] or [B, 1, ..., 1, D] (at most ``max(x.ndim, 2)`` dims): one vector per sample x[b]; a leading 1 instead of
  B broadcasts like [D]. A 1-D or 2-D x is [tokens=D] / [B, D]: each row of a 2-D x is its own sample.

``residual`` has x's shape. ``y`` has x's shape and dtype (contiguous). The backends see scale/gate flattened to
2-D [Bs, D] (Bs = 1 or B; see ``as_rows``) and the rows of x grouped as [Bk, T, D] (``geometry``): Bk = B when a
per-sample scale or gate is present, else 1 (all rows form one group). ``rstd`` is [*x.shape[:-1]], fp32 (fp64
for fp64 x).

Backward (the backend contract; computed in fp32 from the same rounded values the forward used), with
x̂ = x·rstd, n = rnd(x̂), m = rnd(1 + scale) (1 without scale), t = rnd(tanh(gate)) (1 without gate)::

    dresidual = dy
    g      = dy * t * m                                        # the grad reaching the normalized value
    dx     = rstd * (g - x̂ * mean(g * x̂))                     # RMSNorm backward, per row
    dscale = sum over the rows of each sample of dy * t * n    # then over samples when scale is [D] / [1, ..., D]
    dgate  = (1 - t²) * sum over those rows of dy * rnd(n * m)

The sums are fp32, in a fixed order (no atomics), and returned in the dtype of scale/gate.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (so fp64 autograd can serve as ground truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def num_samples(x: torch.Tensor) -> int:
    """B: x's first dim when x has a token dim or more ([B, *tokens, D]), else 1 (a 1-D x is one token)."""
    return x.shape[0] if x.dim() >= 2 else 1


def as_rows(v: Optional[torch.Tensor], d: int) -> Optional[torch.Tensor]:
    """scale/gate in any accepted shape -> [Bs, D] (a view when the strides allow one)."""
    if v is None:
        return None
    return v.reshape(v.shape[0] if v.dim() >= 2 else 1, d)


def geometry(x: torch.Tensor, scale2d: Optional[torch.Tensor],
             gate2d: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(Bk, T, D): x's rows grouped into Bk groups of T rows that share one scale/gate row."""
    d = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    b = num_samples(x)
    # Rows of scale/gate are 1 or B (validated by mmkernels.adarn); B rows (B != 1) make the groups per sample.
    per_sample = b != 1 and any(v is not None and v.shape[0] == b for v in (scale2d, gate2d))
    bk = b if per_sample else 1
    return bk, (rows // bk if bk > 0 else 0), d


def reduce_rows(p: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-group sums [Bk, D] -> the parameter's [rows, D] (rows = Bk, or 1 for a broadcast parameter)."""
    return p if p.shape[0] == rows else p.sum(dim=0, keepdim=True)


def adarn(x: torch.Tensor, scale: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
          residual: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable reference (autograd through plain torch ops) taking the public shapes. See the module
    docstring. Inputs are not validated here (mmkernels.adarn does that)."""
    d = x.shape[-1]
    return forward(x, as_rows(scale, d), as_rows(gate, d), residual, eps)[0]


def forward(x: torch.Tensor, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) per the module docstring; scale/gate are [Bs, D]. Differentiable in every tensor input."""
    bk, t, d = geometry(x, scale, gate)
    x3 = x.reshape(bk, t, d)
    xf = x3.to(compute_dtype(x))
    rstd = torch.rsqrt(xf.square().mean(dim=-1) + eps) if d > 0 else xf.new_ones((bk, t))
    y = (xf * rstd.unsqueeze(-1)).to(x.dtype)
    if scale is not None:
        y = y * (1 + scale).unsqueeze(1)
    if gate is not None:
        y = torch.tanh(gate).unsqueeze(1) * y
    if residual is not None:
        y = residual.reshape(bk, t, d) + y
    return y.reshape(x.shape).contiguous(), rstd.reshape(x.shape[:-1])


def backward(dy: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor],
             rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dscale, dgate) in closed form, per the module docstring (dresidual is dy itself, so it is not computed
    here). dscale/dgate have scale/gate's [Bs, D] shape and dtype, and are None when those are None."""
    bk, t, d = geometry(x, scale, gate)
    cd = compute_dtype(x)
    r = rstd.reshape(bk, t, 1).to(cd)
    xhat = x.reshape(bk, t, d).to(cd) * r
    n = xhat.to(x.dtype)
    g = dy.reshape(bk, t, d).to(cd)
    dyf = g
    m = tg = None
    if scale is not None:
        m = (1 + scale).unsqueeze(1)  # in x's dtype, as the forward rounds it
        g = g * m.to(cd)
    if gate is not None:
        tg = torch.tanh(gate).unsqueeze(1).to(cd)
        g = g * tg
    dot = (g * xhat).sum(dim=-1, keepdim=True) / max(d, 1)
    dx = (r * (g - xhat * dot)).to(x.dtype).reshape(x.shape)
    dscale = dgate = None
    if scale is not None:
        ds = dyf * n.to(cd)
        if tg is not None:
            ds = ds * tg
        dscale = reduce_rows(ds.sum(dim=1), scale.shape[0]).to(scale.dtype)
    if gate is not None:
        nm = (n * m) if m is not None else n  # the rounded product the gate multiplied in the forward
        dg = (dyf * nm.to(cd)).sum(dim=1) * (1 - tg.squeeze(1).square())
        dgate = reduce_rows(dg, gate.shape[0]).to(gate.dtype)
    return dx.contiguous(), dscale, dgate
