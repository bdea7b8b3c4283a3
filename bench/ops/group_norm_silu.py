"""GroupNorm (+ SpatialNorm modulation) + SiLU benchmark at the ST-VAE decoder's shapes (17 frames of 512x512).

Two variants per shape, x in channels_last_3d (the layout the decoder's convs want), 32 groups:
* ``gn+silu``:      SiLU(GroupNorm(x)), the encoder and the plain norms;
* ``spatialnorm``:  SiLU(GroupNorm(x) * up(scale) + up(shift)), the decoder's SpatialNorm, with scale/shift given at
  the latent resolution [B, C, 5, 64, 64] (the 1x1 convs of zq run there; ``up`` is the official nearest resize,
  first frame separately). Ours reads them in place; the official composition materializes both at x's size.

Cost per call, N = elements of x, M = elements of one of scale/shift (0 without), s = bytes per element:
  forward   reads x twice (statistics, then normalize), writes y, reads scale and shift:  3*N*s + 2*M*s bytes.
  backward  reads x and dy twice, writes dx; reads scale/shift twice, writes their grads: 5*N*s + 6*M*s bytes.
  FLOP (~10 per element forward, ~25 backward) are negligible: the op is memory-bound. The ceiling is the copy
  bandwidth (H200 ~4.3 TB/s, H100 ~3.0 TB/s; "% copy" is against the copy measured in the same run). The same byte
  counts are charged to every implementation, so GB/s compares times; the official composition moves more bytes
  than it is charged (its GroupNorm output, the resized scale/shift and the intermediate products).
Baselines in the same run (the anchor): the official-style composition in eager PyTorch (F.group_norm +
F.interpolate + mul/add + F.silu) and the same composition under torch.compile (GPU only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, measure, our_impls
from mmkernels.ops.group_norm_silu import reference
from mmkernels.testing import randn

GROUPS = 32
EPS = 1e-6
LATENT = (5, 64, 64)  # the latent of a 17x512x512 clip
# (name, C, (T, H, W)): the decoder's norms for a 17x512x512 clip.
CASES = [("C128 17x512^2", 128, (17, 512, 512)), ("C256 17x256^2", 256, (17, 256, 256)),
         ("C512 5x128^2", 512, (5, 128, 128)), ("C512 5x64^2", 512, (5, 64, 64))]
QUICK = [("C128 17x512^2", 128, (17, 512, 512)), ("C512 5x64^2", 512, (5, 64, 64))]
CPU = [("small", 64, (5, 16, 16))]
CPU_LATENT = (2, 4, 4)


def official_resize(t, size):
    """STVAESpatialNorm3D's resize: F.interpolate nearest, the first frame separately when T is odd and > 1."""
    T = size[0]
    if T > 1 and T % 2 == 1 and t.shape[2] > 1:
        first = F.interpolate(t[:, :, :1], size=(1, *size[1:]), mode="nearest")
        rest = F.interpolate(t[:, :, 1:], size=(T - 1, *size[1:]), mode="nearest")
        return torch.cat([first, rest], dim=2)
    return F.interpolate(t, size=tuple(size), mode="nearest")


def official(x, w, b, scale=None, shift=None):
    y = F.group_norm(x, GROUPS, w, b, EPS)
    if scale is not None:
        y = y * official_resize(scale, x.shape[2:]) + official_resize(shift, x.shape[2:])
    return F.silu(y)


def ours(x, w, b, scale=None, shift=None):
    return mmkernels.group_norm_silu(x, GROUPS, w, b, EPS, scale=scale, shift=shift)


def _impls(ctx: Context, inputs):
    out = [("official eager", official, "")]
    if ctx.cuda:
        out.append(("official compiled", torch.compile(official, dynamic=False), ""))
    return out + our_impls(ctx, "group_norm_silu", ours, inputs[0], GROUPS, *inputs[1:3], EPS,
                           *(inputs[3:] if len(inputs) > 3 else (None, None)), True)


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases, latent = (CPU, CPU_LATENT) if not ctx.cuda else (QUICK if ctx.quick else CASES, LATENT)
    records = []
    for name, C, size in cases:
        shape = (1, C, *size)
        x = randn(shape, dtype, ctx.device).to(memory_format=torch.channels_last_3d)
        w = randn((C,), dtype, ctx.device, shift=1.0)
        b = randn((C,), dtype, ctx.device)
        dy = randn(shape, dtype, ctx.device).to(memory_format=torch.channels_last_3d)
        n = x.numel()
        src = tuple(min(a, t) for a, t in zip(latent, size))
        scale = randn((1, C, *src), dtype, ctx.device, scale=0.5, shift=1.0).to(memory_format=torch.channels_last_3d)
        shift = randn((1, C, *src), dtype, ctx.device, scale=0.5).to(memory_format=torch.channels_last_3d)
        m = scale.numel()
        variants = [("gn+silu", (x, w, b), (0, 1, 2), 0), ("spatialnorm", (x, w, b, scale, shift), (0, 1, 2, 3, 4), m)]
        for variant, args, grad_args, mm in variants:
            expected = reference.group_norm_silu(x, GROUPS, w, b, EPS, scale=args[3] if mm else None,
                                                 shift=args[4] if mm else None)
            fwd = 3 * n * s + 2 * mm * s
            bwd = 5 * n * s + 6 * mm * s
            cost = {"fwd": (fwd, 10 * n), "fwd+bwd": (fwd + bwd, 35 * n)}
            label_shape = f"[1, {C}, {', '.join(map(str, size))}]" + (f" scale {list(src)}" if mm else "")
            for label, fn, note in _impls(ctx, args):
                records += measure(ctx, op="group_norm_silu", case=f"{name} {variant}", shape=label_shape,
                                   label=label, fn=fn, args=args, grad_args=grad_args, dy=dy, expected=expected,
                                   note=note, cost=cost, skip_errors=ctx.cuda)
            del expected
        if ctx.cuda:
            torch.cuda.empty_cache()
    return records
