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
from bench.common import Context, Record, time_ms
from mmkernels import _backend, use_backend
from mmkernels.ops.rope3d import reference
from mmkernels.testing import randn, rel_err, tolerance

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
    op = _backend.OPS["rope3d"]
    for b in ("triton", "cuda") if ctx.cuda else ("torch",):
        be = op.backends[b]
        if be.available() is None and be.supports(x) is None:
            def fn(v, g, b=b):
                with use_backend(b):
                    return mmkernels.rope3d(v, g, SPLIT)
            out.append((f"mmkernels[{b}]", fn, "(experimental)" if be.experimental else ""))
    return out


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for name, shape, grid in cases:
        x = randn(shape, dtype, ctx.device)
        dy = randn(shape, dtype, ctx.device)
        numel = x.numel()
        expected = reference.rope3d(x, grid, SPLIT)
        for label, fn, note in _impls(ctx, x):
            err = rel_err(fn(x, grid), expected)
            if err > tolerance(dtype):
                note = f"{note} WRONG: rel err {err:.2e}".strip()
            xg = x.detach().requires_grad_(True)

            def fwd_bwd():
                torch.autograd.grad(fn(xg, grid), (xg,), dy)

            shp = "[" + ", ".join(map(str, shape)) + "]"
            records.append(Record("rope3d", name, shp, str(dtype)[6:], label, "fwd",
                                  time_ms(lambda: fn(x, grid), ctx.device, ctx.quick), 2 * numel * s, 3 * numel,
                                  note=note).finish(ctx.copy_gbps))
            records.append(Record("rope3d", name, shp, str(dtype)[6:], label, "fwd+bwd",
                                  time_ms(fwd_bwd, ctx.device, ctx.quick), 4 * numel * s, 6 * numel,
                                  note=note).finish(ctx.copy_gbps))
    return records
