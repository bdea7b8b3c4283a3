"""GroupNorm (+ SpatialNorm modulation) + SiLU: the definition (plain PyTorch) and the ``torch`` backend.

Layouts: ``x`` is [B, C, *spatial] with any number of spatial dims (0 or more; the ST-VAE uses 5-D
[B, C, T, H, W]), any strides. ``weight`` and ``bias`` are [C] or None. ``scale`` and ``shift`` are None or
[B, C, *small] with the same number of dims as x, where each small spatial size maps to x's by the integer-factor
nearest map below (the SpatialNorm latent); any strides, stride 0 included.

Math, per (batch b, group g) over its N = C/num_groups * prod(spatial) elements, statistics in fp32 (fp64 for fp64
inputs), and ``rnd`` = rounding to x's dtype (a no-op in fp32)::

    mean, var = mean and biased variance of x[b, group g]        (fp32)
    rstd      = 1 / sqrt(var + eps)
    g  = rnd((x - mean) * rstd * weight + bias)                   # nn.GroupNorm / F.group_norm in x's dtype
    m  = rnd(g * up(scale))        if scale is given, else g      # the SpatialNorm multiply, in x's dtype
    a  = rnd(m + up(shift))        if shift is given, else m      # the SpatialNorm add, in x's dtype
    y  = rnd(a * sigmoid(a))       if silu, else a                # nn.SiLU in x's dtype

These rounding points are those of the official modules composed in x's dtype (the ST-VAE runs in bf16 outside
autocast): ``nn.GroupNorm`` computes in fp32 and rounds once, ``norm * conv_y(zq) + conv_b(zq)`` is a bf16 multiply
and a bf16 add (each computed in fp32 and rounded: a product of two bf16 values is exact in fp32, so rounding it once
is what PyTorch does), and ``F.silu`` computes in fp32 and rounds once. Weight and bias enter in their own dtype
(the official module's parameters are in x's dtype; an fp32 weight with bf16 x is used as fp32, as PyTorch does).

``up`` is the official SpatialNorm resize, ``F.interpolate(mode="nearest")`` to x's spatial size, applied in time
to the first frame and to the remaining frames separately when x is 5-D with odd T > 1 (and the source has more than
one frame). It is accepted only where it is an integer-factor nearest map, per dim (``resize_plan``):

* equal sizes: identity; a source size of 1: every position reads index 0 (a broadcast);
* time of a 5-D x with odd T > 1: frame 0 reads source frame 0, frame t > 0 reads 1 + (t-1) // f where
  f = (T-1)/(Ts-1) must be an integer (the official first-frame split);
* otherwise: position i reads i // f where f = size/source_size must be an integer;
* and the official float32 index arithmetic (``floor(i * float(in/out))``) must give exactly that map (it does not
  for some factors, e.g. 41 and 47), else ``ValueError``.

For a 5-D x with odd T > 1 and Ts == 1, the official split would resize an empty remainder (an error in the official
code); here it is the natural broadcast. ``scale`` and ``shift`` must have the same shape when both are given; either
may be given alone.

Outputs of the forward: y (x's shape, dtype and memory format: ``torch.empty_like(x)``), and mean and rstd [B, G] in
the compute dtype (fp32; fp64 for fp64 x), saved for the backward.

Backward (the backend contract; fp32, straight through the roundings, with the rounded a and g recomputed)::

    da      = dy * s * (1 + a * (1 - s)), s = sigmoid(a)      (dy if not silu)
    dshift  = sum of da over the positions that read each shift element       (at shift's own resolution)
    dscale  = sum of da * g over the positions that read each scale element
    dg      = da * up(scale)                                  (da if no scale)
    dbias   = sum over b and spatial of dg;  dweight = sum over b and spatial of dg * xhat,  xhat = (x - mean) * rstd
    dxhat   = dg * weight
    dx      = rstd * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat))

Every grad is computed in fp32 and rounded once to its input's dtype.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

OP = "group_norm_silu"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (so fp64 autograd can serve as ground truth)."""
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# The nearest-resize plan.


@functools.lru_cache(maxsize=4096)
def official_nearest_is_integer_map(src: int, dst: int) -> bool:
    """Whether ``F.interpolate(mode="nearest")`` from ``src`` to ``dst`` positions maps i to i // (dst/src).

    PyTorch's nearest index (CPU and CUDA): identity when dst == src, i >> 1 when dst == 2*src, else
    ``min(floor(float32(i) * float32(src/dst)), src-1)`` in float32 arithmetic, emulated here exactly with numpy
    float32 (tests/ops/test_group_norm_silu.py checks this against F.interpolate)."""
    if dst % src:
        return False
    if dst == src or dst == 2 * src or src == 1:
        return True
    scale = np.float32(src) / np.float32(dst)
    idx = np.minimum(np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64), src - 1)
    return bool(np.array_equal(idx, np.arange(dst, dtype=np.int64) // (dst // src)))


def resize_plan(size: Sequence[int], src: Sequence[int], *, time_rule: bool,
                name: str = "scale") -> tuple[tuple[int, bool], ...]:
    """Per spatial dim, (factor, first_frame) of the official nearest resize from ``src`` to ``size``.

    first_frame (only for dim 0 when ``time_rule``, i.e. 5-D x): position 0 reads 0 and position t > 0 reads
    1 + (t-1) // factor. Otherwise position i reads i // factor. Raises ValueError (naming ``name``) where the
    official resize is not such a map."""
    size, src = tuple(int(s) for s in size), tuple(int(s) for s in src)
    if len(size) != len(src):
        raise ValueError(f"mmkernels.{OP}: argument '{name}' must have {len(size)} spatial dims, got {len(src)}")
    plan = []
    for k, (n, s) in enumerate(zip(size, src)):
        what = "time" if (time_rule and k == 0) else f"spatial dim {k}"

        def bad(why: str, what=what, n=n, s=s):
            return ValueError(f"mmkernels.{OP}: argument '{name}' has {what} size {s} but x has {n}: {why}")

        if n == 0:
            if s not in (0, 1):
                raise bad("an empty x dim needs a source size of 0 or 1")
            plan.append((1, False))
        elif s == n:
            plan.append((1, False))
        elif s == 1:
            plan.append((n, False))  # every position reads index 0
        elif s <= 0 or s > n:
            raise bad("the source must be smaller than x (an integer-factor nearest upsample)")
        elif time_rule and k == 0 and n % 2 == 1:
            # Odd T > 1: the official SpatialNorm resizes frame 0 and frames 1.. separately.
            if (n - 1) % (s - 1):
                raise bad(f"with odd T the official resize maps frames 1.. ({s - 1} -> {n - 1}), which is not an "
                          "integer factor")
            if not official_nearest_is_integer_map(s - 1, n - 1):
                raise bad(f"F.interpolate's float32 index arithmetic does not give the integer map {s - 1} -> {n - 1}")
            plan.append(((n - 1) // (s - 1), True))
        else:
            if n % s:
                raise bad("not an integer factor, which the official nearest resize does not map evenly")
            if not official_nearest_is_integer_map(s, n):
                raise bad(f"F.interpolate's float32 index arithmetic does not give the integer map {s} -> {n}")
            plan.append((n // s, False))
    return tuple(plan)


def plan_for(x: torch.Tensor, scale: Optional[torch.Tensor],
             shift: Optional[torch.Tensor]) -> Optional[tuple[tuple[int, bool], ...]]:
    """The resize plan of the given modulation tensors (None without scale and shift)."""
    mod = scale if scale is not None else shift
    if mod is None:
        return None
    return resize_plan(x.shape[2:], mod.shape[2:], time_rule=x.dim() == 5,
                       name="scale" if scale is not None else "shift")


def source_index(n: int, factor: int, first: bool, device=None) -> torch.Tensor:
    """The source index read by each of the n positions of one dim (int64 [n])."""
    i = torch.arange(n, device=device)
    if first:
        return torch.where(i == 0, 0, 1 + (i - 1).clamp(min=0) // factor)
    return i // factor


def upsample(t: torch.Tensor, size: Sequence[int], plan) -> torch.Tensor:
    """The official SpatialNorm resize of ``t`` [B, C, *src] to [B, C, *size] (nearest, first frame separately).

    1 to 3 spatial dims use ``F.interpolate`` as the official module does; more dims (which F.interpolate lacks) use
    the integer index map of ``plan`` (the same map, as resize_plan verified)."""
    size = tuple(size)
    if tuple(t.shape[2:]) == size:
        return t
    if t.numel() == 0 or any(n == 0 for n in size):
        return t.new_empty(t.shape[:2] + size)
    if 1 <= len(size) <= 3:
        T = size[0]
        if len(size) == 3 and T > 1 and T % 2 == 1 and t.shape[2] > 1:
            head = F.interpolate(t[:, :, :1], size=(1, *size[1:]), mode="nearest")
            tail = F.interpolate(t[:, :, 1:], size=(T - 1, *size[1:]), mode="nearest")
            return torch.cat([head, tail], dim=2)
        return F.interpolate(t, size=size, mode="nearest")
    for k, ((f, first), n) in enumerate(zip(plan, size)):
        t = t.index_select(2 + k, source_index(n, f, first, t.device))
    return t


def reduce_to_source(g: torch.Tensor, src: Sequence[int], plan) -> torch.Tensor:
    """The adjoint of ``upsample``: sums g [B, C, *size] over the positions that read each source element."""
    for k, ((f, first), s) in enumerate(zip(plan, src)):
        d = 2 + k
        n = g.shape[d]
        if n == s:
            continue
        if n == 0:
            g = g.new_zeros(g.shape[:d] + (s,) + g.shape[d + 1:])
        elif first:
            head = g.narrow(d, 0, 1)
            tail = g.narrow(d, 1, n - 1)
            tail = tail.reshape(tail.shape[:d] + (s - 1, f) + tail.shape[d + 1:]).sum(d + 1)
            g = torch.cat([head, tail], dim=d)
        else:
            g = g.reshape(g.shape[:d] + (s, f) + g.shape[d + 1:]).sum(d + 1)
    return g


# ----------------------------------------------------------------------------------------------------------------
# Forward and backward.


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor, cd: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(cd).view((1, -1) + (1,) * (x.dim() - 2))


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-6, *, scale: Optional[torch.Tensor] = None,
                    shift: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
    """Differentiable reference (autograd through plain torch ops). See the module docstring."""
    return forward(x, num_groups, weight, bias, eps, scale, shift, silu)[0]


def forward(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            eps: float, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) per the module docstring: F.group_norm + F.interpolate + mul/add + F.silu in x's dtype.
    Differentiable in every tensor input."""
    cd = compute_dtype(x)
    B, C = x.shape[:2]
    xf = x.to(cd)
    if x.numel() == 0:  # F.group_norm rejects empty spatial dims; there is nothing to normalize
        return torch.empty_like(x), xf.new_zeros(B, num_groups), xf.new_ones(B, num_groups)
    var, mean = torch.var_mean(xf.reshape(B, num_groups, -1), dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    w = None if weight is None else weight.to(cd)
    b = None if bias is None else bias.to(cd)
    y = F.group_norm(xf, num_groups, w, b, eps).to(x.dtype)
    plan = plan_for(x, scale, shift)
    if scale is not None:
        y = y * upsample(scale, x.shape[2:], plan)
    if shift is not None:
        y = y + upsample(shift, x.shape[2:], plan)
    if silu:
        y = F.silu(y)
    out = torch.empty_like(x)  # a fresh tensor in x's layout, as every backend returns (copy_ is differentiable)
    out.copy_(y)
    return out, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, silu: bool):
    """(dx, dweight, dbias, dscale, dshift) in closed form, per the module docstring; None for absent inputs."""
    cd = compute_dtype(x)
    B, C = x.shape[:2]
    dims = [0] + list(range(2, x.dim()))
    dx = torch.empty_like(x)
    if x.numel() == 0:
        dx.zero_()
        zeros = [None if t is None else torch.zeros_like(t, memory_format=torch.contiguous_format)
                 for t in (weight, bias, scale, shift)]
        return (dx, *zeros)
    shape_g = (B, num_groups, -1)
    xhat = ((x.to(cd).reshape(shape_g) - mean.to(cd)[..., None]) * rstd.to(cd)[..., None]).reshape(x.shape)
    w = _per_channel(weight, x, cd)
    gn = xhat if w is None else xhat * w
    if bias is not None:
        gn = gn + _per_channel(bias, x, cd)
    g = gn.to(x.dtype)
    plan = plan_for(x, scale, shift)
    up_scale = None if scale is None else upsample(scale, x.shape[2:], plan)
    a = g if scale is None else g * up_scale
    if shift is not None:
        a = a + upsample(shift, x.shape[2:], plan)
    da = dy.to(cd)
    if silu:
        af = a.to(cd)
        s = torch.sigmoid(af)
        da = da * (s * (1 + af * (1 - s)))
    dscale = dshift = None
    if shift is not None:
        dshift = _fresh_like(reduce_to_source(da, shift.shape[2:], plan), shift)
    if scale is not None:
        dscale = _fresh_like(reduce_to_source(da * g.to(cd), scale.shape[2:], plan), scale)
        dg = da * up_scale.to(cd)
    else:
        dg = da
    dbias = None if bias is None else dg.sum(dim=dims).to(bias.dtype)
    dweight = None if weight is None else (dg * xhat).sum(dim=dims).to(weight.dtype)
    dxhat = dg if w is None else dg * w
    dxhat_g, xhat_g = dxhat.reshape(shape_g), xhat.reshape(shape_g)
    m1 = dxhat_g.mean(-1, keepdim=True)
    m2 = (dxhat_g * xhat_g).mean(-1, keepdim=True)
    dx.copy_((rstd.to(cd)[..., None] * (dxhat_g - m1 - xhat_g * m2)).reshape(x.shape))
    return dx, dweight, dbias, dscale, dshift


def _fresh_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    out.copy_(value)
    return out
