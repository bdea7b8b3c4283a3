"""AdaRN benchmark: LaVin-DiT's modulated sandwich norms, the pre and post variants.

* pre  (norm1/norm2, final layer): ``h = (1 + scale) * RMSNorm(x)``, scale [B, 1, D].
* post (post_norm1/post_norm2):    ``s = s + tanh(gate) * RMSNorm(a)``, gate [B, 1, D], residual s.

Cost per [B, L, D] call, M = B*L rows, s = bytes per element:
  pre  forward  reads x, scale, writes y, rstd:           2*s*M*D + s*B*D + 4*M bytes; ~4*M*D FLOP.
  post forward  reads a, residual, gate, writes y, rstd:  3*s*M*D + s*B*D + 4*M bytes; ~5*M*D FLOP.
  backward      reads dy, x, rstd, scale/gate, writes dx and dscale/dgate (dresidual is dy itself):
                3*s*M*D + 2*s*B*D + 4*M bytes; ~10*M*D FLOP.
Memory-bound: the ceiling is the copy bandwidth (H200 ~4.3 TB/s, H100 ~3.0 TB/s). The same byte counts are charged
to every implementation, so GB/s compares times; an unfused path moves more bytes than it is charged.
Baselines in the same run: the official composition in eager PyTorch (F.rms_norm standing in for apex's
FusedRMSNorm: fp32 statistics, one rounding, then separate bf16 elementwise ops) and that composition under
torch.compile (GPU only: compiling on the CPU takes longer than the CPU run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, measure, our_impls
from mmkernels.ops.adarn import reference
from mmkernels.testing import randn

# (name, (B, L, D)): LaVin-DiT 3.4B (D 2304), and the thesis' 1.0B (D 1024) and 0.1B (D 512) widths, at the 3.4B
# token count (B=2, L=10240).
CASES = [("3.4B", (2, 10240, 2304)), ("1.0B", (2, 10240, 1024)), ("0.1B", (2, 10240, 512))]
QUICK = [("3.4B", (2, 10240, 2304)), ("0.1B", (2, 10240, 512))]
CPU = [("small", (2, 64, 256))]
EPS = 1e-6


def official_pre(x, scale):
    return (1 + scale) * F.rms_norm(x, (x.shape[-1],), None, EPS)


def official_post(a, gate, residual):
    return residual + torch.tanh(gate) * F.rms_norm(a, (a.shape[-1],), None, EPS)


def ours_pre(x, scale):
    return mmkernels.adarn(x, scale=scale, eps=EPS)


def ours_post(a, gate, residual):
    return mmkernels.adarn(a, gate=gate, residual=residual, eps=EPS)


def _impls(ctx: Context, official, ours, inputs):
    """(label, fn, note) for the baselines and every backend of ours that can run these inputs here."""
    out = [("official eager", official, "")]
    if ctx.cuda:
        out.append(("official compiled", torch.compile(official, dynamic=False), ""))
    return out + our_impls(ctx, "adarn", ours, *inputs)


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for name, (b, l, d) in cases:
        m = b * l
        x = randn((b, l, d), dtype, ctx.device)
        vec = randn((b, 1, d), dtype, ctx.device, scale=0.5)
        res = randn((b, l, d), dtype, ctx.device)
        dy = randn((b, l, d), dtype, ctx.device)
        bwd_bytes = 3 * s * m * d + 2 * s * b * d + 4 * m
        variants = [  # (variant, official, ours, args, grad_args, expected, fwd bytes, fwd FLOP)
            ("pre", official_pre, ours_pre, (x, vec), (0, 1), reference.adarn(x, scale=vec, eps=EPS),
             2 * s * m * d + s * b * d + 4 * m, 4 * m * d),
            ("post", official_post, ours_post, (x, vec, res), (0, 1, 2),
             reference.adarn(x, gate=vec, residual=res, eps=EPS), 3 * s * m * d + s * b * d + 4 * m, 5 * m * d),
        ]
        for variant, official, ours, args, grad_args, expected, fwd_bytes, fwd_flops in variants:
            cost = {"fwd": (fwd_bytes, fwd_flops), "fwd+bwd": (fwd_bytes + bwd_bytes, fwd_flops + 10 * m * d)}
            for label, fn, note in _impls(ctx, official, ours, args):
                records += measure(ctx, op="adarn", case=f"{name} {variant}", shape=f"[{b}, {l}, {d}]", label=label,
                                   fn=fn, args=args, grad_args=grad_args, dy=dy, expected=expected, note=note,
                                   cost=cost)
    return records
