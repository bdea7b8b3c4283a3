"""Mask pooling: the definition (plain PyTorch) and the ``torch`` backend.

Layouts:

* ``features`` x: [B, C, Hf, Wf], any strides (NCHW-contiguous, channels_last, views, stride 0).
* ``masks``: [B, Q, Hm, Wm] mask *logits* at any resolution (larger, smaller, equal, non-integer ratios), any
  strides. Its dtype may differ from x's.
* output: [B, Q, C] contiguous, in x's dtype. The torch backend also returns ``denom`` [B, Q] (fp32; fp64 when
  an input is fp64) for the backward.

Math, with ``R`` the bilinear resize of the logits from (Hm, Wm) to (Hf, Wf) exactly as
``F.interpolate(mode="bilinear", align_corners=False)`` computed in fp32 (skipped when the sizes are equal), ``rnd``
the rounding to the masks' dtype (a no-op for fp32), ``t`` = ``threshold`` (a logit) and p running over the Hf*Wf
feature pixels::

    r        = R(masks)                                                   (fp32)
    official: m = [rnd(sigmoid(rnd(r))) >= rnd(sigmoid(t))]               (0 or 1; sigmoid(0) = 0.5 by default)
    hard:     m = [r > t]                                                 (0 or 1, fp32 r, no rounding)
    soft:     m = sigmoid(r - t)                                          (fp32)
    denom[b, q]  = sum_p m[b, q, p] + eps
    out[b, q, c] = rnd_x( sum_p x[b, c, p] * m[b, q, p] / denom[b, q] )   (fp32 accumulation, x's dtype out)

"official" is Unpair-Seg's ``MaskPooling`` (../shared/specs/unpair_seg.md §6: thres 0.5, use_sigmoid True,
+1e-8) including its rounding: the official module interpolates and takes the sigmoid in the masks' dtype, and
PyTorch computes both in fp32 and rounds each result to that dtype; ``mask >= thres`` rounds the Python scalar to the
dtype too. In bf16 that matters: sigmoid rounds to 0.5 for logits down to about -0.004, which count as "on". The
official module then sums the binary mask and divides in the masks' dtype and runs the einsum in whatever dtype
autocast gives; here the reduction is in fp32 throughout (the difference is within fp16/bf16 rounding of the output;
and where the official module's +1e-8 underflows, fp16 masks, its empty masks give 0/0 = NaN, ours zeros).
An empty mask (m = 0 everywhere) gives a zero vector in official and hard mode.

Gradients: official and hard mode differentiate x only (the official module builds the mask under no_grad);
soft mode differentiates x and the masks (through the sigmoid and the adjoint of the bilinear resize). With
g = dout / denom (fp32)::

    dx[b, c, p]  = sum_q m[b, q, p] * g[b, q, c]
    soft only:   dm[b, q, p] = sum_c g[b, q, c] * x[b, c, p] - u[b, q],   u[b, q] = sum_c g[b, q, c] * out[b, q, c]
                 dr = dm * s * (1 - s),  s = sigmoid(r - t);   dmasks = R^T(dr)   (the adjoint of the resize)

``u`` uses the forward's output as returned (in x's dtype; every backend does the same). Grads come back in their
input's dtype. This module materializes the resized masks [B, Q, Hf, Wf] (it is the definition); the Triton and
CUDA kernels never do.

``taps`` gives the resize as per-axis tap tables (source index of the two taps and their weights), computed with
the fp32 arithmetic of PyTorch's upsample_bilinear2d; the kernels read them, so that every backend resizes the same
way: ``v = l0h * (l0w * m[h0, w0] + l1w * m[h0, w1]) + l1h * (l0w * m[h1, w0] + l1w * m[h1, w1])``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

OP = "mask_pool"
MODES = ("official", "hard", "soft")


def compute_dtype(features: torch.Tensor, masks: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when either input is fp64 (so fp64 autograd can serve as ground truth)."""
    return torch.promote_types(torch.promote_types(features.dtype, masks.dtype), torch.float32)


def sigmoid_threshold(threshold: float, dtype: torch.dtype) -> float:
    """sigmoid(threshold) as the official ``mask >= thres`` compares it: the probability rounded to the masks' dtype.
    Computed in float64 without overflow for any finite threshold."""
    if threshold >= 0:
        p = 1.0 / (1.0 + math.exp(-threshold))
    else:
        e = math.exp(threshold)
        p = e / (1.0 + e)
    return torch.tensor(p, dtype=torch.float64).to(dtype).item()


@functools.lru_cache(maxsize=256)
def _taps_cpu(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if n_in == n_out:
        i = torch.arange(n_out, dtype=torch.int32)
        return i, i.clone(), torch.zeros(n_out, dtype=torch.float32)
    # PyTorch: scale = (float)in / out; src = max(scale * (dst + 0.5) - 0.5, 0); i0 = (int)src; i1 = i0 + (i0 < in-1).
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.to(torch.int64)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = src - i0.to(torch.float32)
    return i0.to(torch.int32), i1.to(torch.int32), l1


def taps(n_in: int, n_out: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bilinear (align_corners=False) resize of one axis from n_in to n_out positions: for each output position,
    the two source indices (int32 [n_out]) and the weight of the second (fp32 [n_out]; the first's is 1 - it).
    Equal sizes give the identity (i0 = i1 = position, weight 0)."""
    i0, i1, l1 = _taps_cpu(int(n_in), int(n_out))
    return i0.to(device), i1.to(device), l1.to(device)


def resize(masks: torch.Tensor, size, dtype: torch.dtype) -> torch.Tensor:
    """The logits resized to ``size`` = (Hf, Wf) in ``dtype`` (F.interpolate bilinear, align_corners=False), or
    just converted when the sizes are equal (the official module skips the resize then)."""
    m = masks.to(dtype)
    if tuple(masks.shape[-2:]) == tuple(size):
        return m
    if m.shape[1] == 0 or m.shape[0] == 0 or size[0] * size[1] == 0:
        return m.new_zeros(m.shape[:2] + tuple(size))
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)


def weights(masks: torch.Tensor, size, mode: str, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """m [B, Q, Hf, Wf] in ``dtype`` (the compute dtype) per ``mode`` (see the module docstring). Soft weights are
    differentiable in the masks; official and hard weights are constants."""
    r = resize(masks, size, dtype)
    if mode == "soft":
        return torch.sigmoid(r - threshold)
    with torch.no_grad():
        if mode == "hard":
            m = r.detach() > threshold
        else:  # official: resize and sigmoid in the masks' dtype (fp32 math, each result rounded)
            md = masks.dtype
            s = torch.sigmoid(r.detach().to(md).to(dtype)).to(md)
            m = s >= sigmoid_threshold(threshold, md)
        return m.to(dtype)


def mask_pool(features: torch.Tensor, masks: torch.Tensor, mode: str = "official", threshold: float = 0.0,
              eps: float = 1e-8) -> torch.Tensor:
    """The op as a differentiable composition (autograd through it is the ground truth of the tests)."""
    return _pool(features, masks, mode, threshold, eps)[0]


def _pool(features, masks, mode, threshold, eps):
    ct = compute_dtype(features, masks)
    m = weights(masks, features.shape[-2:], mode, threshold, ct)
    denom = m.sum(dim=(-1, -2)) + eps
    num = torch.einsum("bchw,bqhw->bqc", features.to(ct), m)
    return (num / denom[..., None]).to(features.dtype), denom


# ----------------------------------------------------------------------------------------------------------------
# The torch backend: forward and closed-form backward (the contract of every backend).


def forward(features: torch.Tensor, masks: torch.Tensor, mode: str, threshold: float,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Q, C] in x's dtype, contiguous; denom [B, Q] in the compute dtype)."""
    with torch.no_grad():
        out, denom = _pool(features, masks, mode, threshold, eps)
    return out.contiguous(), denom.contiguous()


def backward(dout: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, denom: torch.Tensor, out: torch.Tensor,
             mode: str, threshold: float, need_dx: bool, need_dm: bool):
    """(dx like ``torch.empty_like(features)`` or None, dmasks [B, Q, Hm, Wm] contiguous or None). dmasks only in
    soft mode."""
    ct = compute_dtype(features, masks)
    size = tuple(features.shape[-2:])
    with torch.no_grad():
        g = dout.to(ct) / denom.to(ct)[..., None]
        dx = dm = None
        if need_dx:
            m = weights(masks, size, mode, threshold, ct)
            dx = torch.empty_like(features)
            dx.copy_(torch.einsum("bqc,bqhw->bchw", g, m))
        if need_dm and mode == "soft":
            u = (g * out.to(ct)).sum(-1)
            dmf = torch.einsum("bqc,bchw->bqhw", g, features.to(ct)) - u[..., None, None]
            s = torch.sigmoid(resize(masks, size, ct) - threshold)
            dr = dmf * s * (1.0 - s)
            if tuple(masks.shape[-2:]) != size and dr.numel() > 0:
                dr = torch.ops.aten.upsample_bilinear2d_backward(dr, list(size), list(masks.shape), False)
            elif tuple(masks.shape[-2:]) != size:
                dr = dr.new_zeros(masks.shape)
            dm = dr.to(masks.dtype).contiguous()
    return dx, dm


# ----------------------------------------------------------------------------------------------------------------
# What the kernels read besides the tensors: the tap tables, and for the soft-mode mask backward the feature rows
# (columns) that touch each block of source rows (columns).


def touching(i0: torch.Tensor, i1: torch.Tensor, n_src: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each block of ``block`` source positions [k*block, (k+1)*block): the range [lo, hi) of output positions
    whose taps (i0, i1) touch it (int32 [n_blocks] each; lo == hi when none does).

    Output position h touches the block iff i1[h] >= start and i0[h] < end (i0 <= i1 <= i0 + 1), and i0, i1 are
    non-decreasing in h, so the set is one contiguous range."""
    starts = torch.arange(0, max(n_src, 1), block, dtype=torch.int64, device=i0.device)
    lo = torch.searchsorted(i1.to(torch.int64), starts, side="left")
    hi = torch.searchsorted(i0.to(torch.int64), starts + block, side="left")
    return lo.to(torch.int32), torch.maximum(hi, lo).to(torch.int32)


@functools.lru_cache(maxsize=256)
def tables(hm: int, wm: int, hf: int, wf: int, device: torch.device):
    """(h0, h1, lh, w0, w1, lw) on ``device`` for the resize (hm, wm) -> (hf, wf) (see ``taps``), cached."""
    return taps(hm, hf, device) + taps(wm, wf, device)


@functools.lru_cache(maxsize=256)
def adjoint_ranges(hm: int, wm: int, hf: int, wf: int, block_i: int, block_j: int, device: torch.device):
    """(row_lo, row_hi, col_lo, col_hi) on ``device`` (see ``touching``) for source tiles of block_i x block_j."""
    h0, h1, _ = _taps_cpu(hm, hf)
    w0, w1, _ = _taps_cpu(wm, wf)
    return tuple(t.to(device) for t in touching(h0, h1, hm, block_i) + touching(w0, w1, wm, block_j))
