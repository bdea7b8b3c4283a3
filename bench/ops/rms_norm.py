"""RMSNorm benchmark.

Cost per [M, N] call, s = bytes per element:
  forward   reads x and w, writes y and rstd: 2*M*N*s + N*s + 4*M bytes; ~4*M*N FLOP.
  backward  reads dy, x, w, rstd, writes dx and dw: 3*M*N*s + 2*N*s + 4*M bytes (+ dw partials); ~8*M*N FLOP.
Memory-bound: the ceiling is the copy bandwidth (H200 ~4.3 TB/s, H100 ~3.0 TB/s). Bars (issue 2, H200, bf16,
[16384, 2304]): forward+backward >= 3.0 TB/s effective, forward >= 1.3x torch.nn.functional.rms_norm.
Baselines in the same run: torch.nn.functional.rms_norm and the torch.compile'd reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, time_ms
from mmkernels import _backend, use_backend
from mmkernels.ops.rms_norm import reference
from mmkernels.testing import randn, rel_err, tolerance

# (name, (M, N)): the bar shape and LaVin-DiT 3.4B's norms (B=2, L=10240 tokens: QK-norm over 2304 and 576
# features; per-head norm over 72).
CASES = [("bar", (16384, 2304)), ("3B qnorm", (20480, 2304)), ("3B knorm", (20480, 576)), ("3B head", (655360, 72))]
QUICK = [("bar", (16384, 2304)), ("3B knorm", (20480, 576))]
CPU = [("small", (256, 2304)), ("small knorm", (512, 576))]
EPS = 1e-6


def _ours(backend):
    def fn(x, w):
        with use_backend(backend):
            return mmkernels.rms_norm(x, w, EPS)
    return fn


def _impls(ctx: Context, x, w):
    """(label, fn(x, w), note) for every implementation that can run these inputs here."""
    n = x.shape[-1]
    out = [("F.rms_norm", lambda a, b: F.rms_norm(a, (n,), b, EPS), "")]
    if ctx.cuda:
        out.append(("compiled reference", torch.compile(reference.rms_norm, dynamic=False), ""))
    op = _backend.OPS["rms_norm"]
    for b in ("triton", "cuda") if ctx.cuda else ("torch",):
        be = op.backends[b]
        if be.available() is None and be.supports(x, w) is None:
            out.append((f"mmkernels[{b}]", _ours(b), "(experimental)" if be.experimental else ""))
    return out


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for name, (m, n) in cases:
        x = randn((m, n), dtype, ctx.device)
        w = randn((n,), dtype, ctx.device, shift=1.0)
        dy = randn((m, n), dtype, ctx.device)
        expected = reference.rms_norm(x, w, EPS)
        fwd_bytes = 2 * m * n * s + n * s + 4 * m
        bwd_bytes = 3 * m * n * s + 2 * n * s + 4 * m
        for label, fn, note in _impls(ctx, x, w):
            err = rel_err(fn(x, w), expected)
            if err > tolerance(dtype):
                note = f"{note} WRONG: rel err {err:.2e}".strip()
            xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

            def fwd_bwd():
                torch.autograd.grad(fn(xg, wg), (xg, wg), dy)

            shape = f"[{m}, {n}]"
            records.append(Record("rms_norm", name, shape, str(dtype)[6:], label, "fwd",
                                  time_ms(lambda: fn(x, w), ctx.device, ctx.quick), fwd_bytes, 4 * m * n,
                                  note=note).finish(ctx.copy_gbps))
            records.append(Record("rms_norm", name, shape, str(dtype)[6:], label, "fwd+bwd",
                                  time_ms(fwd_bwd, ctx.device, ctx.quick), fwd_bytes + bwd_bytes, 12 * m * n,
                                  note=note).finish(ctx.copy_gbps))
    return records
