"""3D RoPE benchmark.

Cost per call on x [B, L, H, D], s = bytes per element: reads and writes x once, 2*B*L*H*D*s bytes; ~3 FLOP per
element (the D/2 sin/cos per token are shared by all B*H heads). Memory-bound: the ceiling is the copy bandwidth.
Bars (issue 2, H200, bf16, the LaVin-DiT 3.4B query [2, 10240, 32, 72], grid (10, 32, 32)): >= 3.0 TB/s and
>= 4x the official split/cat/rotate-half code.
Baselines in the same run: the official arithmetic (reference.rope3d_official_style: bf16 cos/sin tables, split,
rotate-half by cat, multiply-add, cat) and the torch.compile'd reference.
"""

from __future__ import annotations

import torch

import mmkernels
from bench.common import Context, Record, measure, our_impls
from mmkernels.ops.rope3d import reference
from mmkernels.testing import randn

# (name, [B, L, H, D], grid): LaVin-DiT 3.4B queries and keys over 10 frames of 32x32 tokens.
CASES = [("3B q", (2, 10240, 32, 72), (10, 32, 32)), ("3B k", (2, 10240, 8, 72), (10, 32, 32))]
QUICK = CASES[:1]
CPU = [("small q", (1, 512, 4, 72), (2, 16, 16))]
SPLIT = (24, 24, 24)


def _impls(ctx: Context, x):
    out = [("official split/cat", lambda v, g: reference.rope3d_official_style(v, g, SPLIT), "")]
    if ctx.cuda:
        compiled = torch.compile(reference.rope3d, dynamic=False)
        out.append(("compiled reference", lambda v, g: compiled(v, g, SPLIT), ""))
    return out + our_impls(ctx, "rope3d", lambda v, g: mmkernels.rope3d(v, g, SPLIT), x)


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for name, shape, grid in cases:
        x = randn(shape, dtype, ctx.device)
        dy = randn(shape, dtype, ctx.device)
        numel = x.numel()
        cost = {"fwd": (2 * numel * s, 3 * numel), "fwd+bwd": (4 * numel * s, 6 * numel)}
        expected = reference.rope3d(x, grid, SPLIT)
        for label, fn, note in _impls(ctx, x):
            records += measure(ctx, op="rope3d", case=name, shape="[" + ", ".join(map(str, shape)) + "]",
                               label=label, fn=fn, args=(x, grid), grad_args=(0,), dy=dy, expected=expected,
                               note=note, cost=cost)
    return records
