"""GroupNorm (+ SpatialNorm modulation) + SiLU ``cuda`` backend: glue over ``mmkernels._C`` (csrc/group_norm_silu/).
Semantics: reference.py.

The argument preparation is the Triton backend's (triton.py): every tensor goes to the kernels as a
[B, C, D0, D1, D2] view (``canonical``: spatial dims padded to three, or merged when there are more, copied once only
when they do not merge), the nearest map of scale/shift as per-dim factors and the first-frame flag (``_Mod``), and
outputs that are not canonical are computed into a contiguous buffer and copied back. Weight and bias go in as fp32
(exact for fp16/bf16 parameters, and how the Triton kernels read them).

Kernels (csrc/group_norm_silu/kernels.cu), fp32/fp16/bf16 storage, fp32 math, the rounding points of reference.py:

* forward, two passes over x: per-program partial statistics (Welford per thread, merged per channel in the block),
  combined per (batch, group) in a fixed order into mean and rstd; then normalize, modulate with scale/shift read at
  their own resolution, SiLU;
* backward, two passes over x and dy: a pass tiled in source space (each thread owns the channels of one scale/shift
  element and walks the positions that read it, so dscale/dshift are complete sums written once) that also writes
  per-program partial sums of dg and dg * xhat, combined per (batch, group) in a fixed order; then dx.
  Deterministic: no atomics anywhere.

Threads run along the unit-stride axis: channels for channels_last_3d x (16-byte vector loads and stores when the
channel stride is 1, C is a multiple of 16 bytes' worth of elements and the bases are aligned), positions along the
last dim for NCDHW x (scalar, coalesced), and any strides otherwise (stride 0 included).

Limits (``supports`` says which one fails): CUDA tensors, fp32/fp16/bf16, at most 3 spatial dims when scale/shift
are given (as Triton), a batch of at most 65535 (a grid dimension), at most ``MAX_WALK`` positions of x per
scale/shift element (the nearest map's factors multiplied). The backend is experimental until its kernels
have passed their tests on a GPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mmkernels import _backend
from mmkernels._ext import C
from mmkernels.ops.group_norm_silu.triton import _in_canonical, _Mod, canonical, supports_layout

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launch tuning, passed to the kernels: threads per block (at most 256) and the number of blocks each pass aims for
# (0: 8 per SM). Tests shrink them to force many tiles and programs at small shapes.
BLOCK_THREADS = 0
TARGET_PROGRAMS = 0
MAX_BATCH = 65535
# The backward's source-space pass gives each scale/shift element one thread that walks, one after another, every
# position reading it (the product of the nearest-map factors). The ST-VAE's maps are at most 4 x 8 x 8 = 256; a
# broadcast [B, C, 1, 1, 1] modulation of a 17 x 512 x 512 x would be a 4.4M-step serial walk per thread (seconds).
# Past this bound the backend declines, and auto takes the Triton kernels, which spread a walk over a tile's lanes.
MAX_WALK = 4096


def supports(x, num_groups, weight, bias, eps, scale, shift, silu) -> _backend.Reason:
    """None when the cuda kernels can run these inputs, else why not."""
    why = _backend.cuda_supports_tensors(x, weight, bias, scale, shift, dtypes=DTYPES)
    if why is None:
        why = supports_layout(x, scale, shift)
    if why is None and x.shape[0] > MAX_BATCH:
        why = f"a batch of {x.shape[0]} is above the kernels' limit of {MAX_BATCH}"
    if why is None and (scale is not None or shift is not None):
        walk = math.prod(_Mod(x, scale, shift).factors)
        if walk > MAX_WALK:
            why = (f"each scale/shift element is read by up to {walk} positions of x, above the {MAX_WALK} that one "
                   f"thread of the backward walks serially")
    return why


def _view5(t: torch.Tensor, sizes, strides) -> torch.Tensor:
    return t.as_strided((t.shape[0], t.shape[1]) + tuple(sizes), tuple(strides), t.storage_offset())


def _canonical_view(t: torch.Tensor) -> torch.Tensor:
    """t as its [B, C, D0, D1, D2] view (a contiguous copy first when its spatial dims do not merge)."""
    t, sizes, strides = _in_canonical(t)
    return _view5(t, sizes, strides)


def _out_buffer(t: torch.Tensor) -> torch.Tensor:
    """t itself when it has a canonical view, else a contiguous buffer of its shape (copied into t afterwards)."""
    return t if canonical(t) is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _mod_args(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]):
    mod = _Mod(x, scale, shift)
    views = [None if t is None else _canonical_view(t) for t in (scale, shift)]
    return views, list(mod.factors), bool(mod.first)


def _tuning() -> list[int]:
    return [int(BLOCK_THREADS), int(TARGET_PROGRAMS)]


def forward(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            eps: float, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = x.shape[0]
    (sc, sh), factors, first = _mod_args(x, scale, shift)
    y = torch.empty_like(x)
    y_out = _out_buffer(y)
    mean = torch.empty((B, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    C.group_norm_silu_fwd(_canonical_view(x), _f32(weight), _f32(bias), sc, sh, _canonical_view(y_out), mean, rstd,
                          num_groups, float(eps), bool(silu), factors, first, _tuning())
    if y_out is not y:
        y.copy_(y_out)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, silu: bool):
    """(dx, dweight, dbias, dscale, dshift) as reference.backward; None for absent inputs."""
    (sc, sh), factors, first = _mod_args(x, scale, shift)
    dx = torch.empty_like(x)
    dx_out = _out_buffer(dx)
    dscale = torch.empty_like(scale) if scale is not None else None
    dshift = torch.empty_like(shift) if shift is not None else None
    sa, sb = C.group_norm_silu_bwd(
        _canonical_view(dy), _canonical_view(x), _f32(weight), _f32(bias), sc, sh,
        mean.to(torch.float32).contiguous(), rstd.to(torch.float32).contiguous(), _canonical_view(dx_out),
        None if dscale is None else _canonical_view(dscale), None if dshift is None else _canonical_view(dshift),
        num_groups, bool(silu), factors, first, _tuning())
    if dx_out is not dx:
        dx.copy_(dx_out)
    dweight = sb.sum(0).to(weight.dtype) if weight is not None else None
    dbias = sa.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, dscale, dshift

