"""Mask pooling benchmark at Unpair-Seg's region-embedding shape (spec §11.3): Q = 1200 mask logits of 256x256
pooled over CLIP features of 64x64 x 1024 channels, bf16, B = 1, official mode (sigmoid >= 0.5, masked mean).

Cost per call (B batch, Q masks, C channels, P = Hf*Wf, s = 2 bytes)::

    FLOP      forward 2*B*Q*C*P (the GEMM; the taps and sigmoid add ~20*B*Q*P); forward+backward twice that (dx is
              the transposed GEMM; official mode gives the masks no grad)
    bytes     forward   features B*C*P*s + output B*Q*C*s + the mask bytes the op must read;
              backward  the mask bytes again + dout B*Q*C*s + dx B*C*P*s

The mask bytes are counted two ways, and the records say both: "all" = B*Q*Hm*Wm*s (157.3 MB here), and "must
read" = the 32-byte sectors of the rows some tap touches (the 256 -> 64 resize reads rows and columns 4i+1, 4i+2:
half the rows, every sector of them: 78.6 MB). The records' GB/s and "% copy" use the must-read bytes (the honest
count for the op: a kernel cannot avoid them, and cannot need more); each note adds the mask-byte bandwidth both ways
against the issue's bar (>= 80% of the copy bandwidth measured in this run). H200 floors: 12.7 us of GEMM at
790 TFLOP/s, 20.8 us to move the must-read bytes at 4.3 TB/s (39 us with every mask byte).

Baselines in the same run: the official MaskPooling composition (F.interpolate + sigmoid + >= + sum + divide +
einsum) in eager PyTorch, and its torch.compile (GPU). Our records' notes give the speedup against the eager one
(bar >= 5x) and the peak-memory ratio (bar >= 10x less; peak = the call's allocations above what was allocated
before it, measured on the GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, measure, our_impls
from bench.ops.causal_conv3d import _peak_mb
from mmkernels.ops.mask_pool import reference
from mmkernels.testing import randn

# (name, B, Q, (Hm, Wm), C, (Hf, Wf), mode)
CASES = [("unpair-seg regions", 1, 1200, (256, 256), 1024, (64, 64), "official"),
         ("res5 grid", 1, 1200, (256, 256), 1536, (32, 32), "official"),
         ("soft 128->64", 1, 400, (128, 128), 256, (64, 64), "soft")]
QUICK = CASES[:1]
CPU = [("small", 1, 40, (64, 64), 64, (16, 16), "official"), ("small soft", 1, 40, (32, 32), 64, (16, 16), "soft")]
SPEED_BAR, PEAK_BAR, HBM_BAR = 5.0, 10.0, 0.8


def official(x, mask, mode="official"):
    """Unpair-Seg's MaskPooling.forward (official mode); "soft": the same composition with sigmoid weights."""
    if not x.shape[-2:] == mask.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if mode == "soft":
        mask = mask.sigmoid()
    else:
        with torch.no_grad():
            mask = (mask.detach().sigmoid() >= 0.5).to(mask.dtype)
    denorm = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("bchw,bqhw->bqc", x, mask / denorm)


def _ours(x, mask, mode):
    return mmkernels.mask_pool(x, mask, mode=mode)


def mask_bytes(B, Q, msize, fsize, s) -> tuple[int, int]:
    """(all mask bytes, the bytes the op must read): rows touched by a tap x the 32-byte sectors of those rows that
    hold a touched column (rows assumed 32-byte aligned, as a contiguous 256-wide bf16 row is)."""
    (Hm, Wm), (Hf, Wf) = msize, fsize
    h0, h1, _ = reference.taps(Hm, Hf)
    w0, w1, _ = reference.taps(Wm, Wf)
    rows = len(set(h0.tolist()) | set(h1.tolist()))
    per_sector = max(1, 32 // s)
    sectors = len({c // per_sector for c in set(w0.tolist()) | set(w1.tolist())})
    return B * Q * Hm * Wm * s, B * Q * rows * min(sectors * 32, Wm * s)


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for name, B, Q, msize, C, fsize, mode in cases:
        x = randn((B, C, *fsize), dtype, ctx.device)
        m = randn((B, Q, *msize), dtype, ctx.device, scale=2.0)
        dout = randn((B, Q, C), dtype, ctx.device)
        P = fsize[0] * fsize[1]
        all_m, must_m = mask_bytes(B, Q, msize, fsize, s)
        io = B * C * P * s + B * Q * C * s
        flops = 2 * B * Q * C * P
        soft = mode == "soft"
        fwd_bytes = must_m + io
        bwd_bytes = must_m + io + (all_m + must_m + B * Q * C * 4 if soft else 0)  # soft: dmasks written, dm pass
        cost = {"fwd": (fwd_bytes, flops), "fwd+bwd": (fwd_bytes + bwd_bytes, flops * (3 if soft else 2))}
        expected = reference.mask_pool(x, m, mode)
        grad_args = (0, 1) if soft else (0,)
        impls = [("official eager", lambda a, b, mode=mode: official(a, b, mode), "")]
        if ctx.cuda:
            impls.append(("official compiled", torch.compile(lambda a, b, mode=mode: official(a, b, mode),
                                                             dynamic=False), ""))
        ours = [(label, (lambda a, b, fn=fn, mode=mode: fn(a, b, mode)), note)
                for label, fn, note in our_impls(ctx, "mask_pool", _ours, x, m, mode, 0.0, 1e-8)]
        shape = f"[{B}, {Q}, {msize[0]}x{msize[1]}] -> [{B}, {C}, {fsize[0]}x{fsize[1]}] {mode}"
        case_records = []
        for label, fn, note in impls + ours:
            recs = measure(ctx, op="mask_pool", case=name, shape=shape, label=label, fn=fn, args=(x, m),
                           grad_args=grad_args, dy=dout, expected=expected, note=note, cost=cost,
                           skip_errors=ctx.cuda)
            for r in recs:
                if ctx.cuda and math.isfinite(r.ms):
                    gargs = [t.detach().requires_grad_(i in grad_args) for i, t in enumerate((x, m))]
                    call = (lambda fn=fn: fn(x, m)) if r.pass_ == "fwd" else \
                        (lambda fn=fn, gargs=gargs: torch.autograd.grad(
                            fn(*gargs), [gargs[i] for i in grad_args], dout))
                    try:
                        r.peak_mb = _peak_mb(call, ctx.device)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                if r.impl.startswith("mmkernels") and r.pass_ == "fwd" and math.isfinite(r.ms) and ctx.copy_gbps:
                    sec = r.ms * 1e-3
                    frac_must = must_m / sec / 1e9 / ctx.copy_gbps
                    frac_all = all_m / sec / 1e9 / ctx.copy_gbps
                    r.note = (f"{r.note} mask bytes {frac_must:.0%} of copy (must-read {must_m / 1e6:.1f} MB), "
                              f"{frac_all:.0%} (all {all_m / 1e6:.1f} MB); bar {HBM_BAR:.0%}").strip()
            case_records += recs
        if ctx.cuda:  # the bars are about GPU kernels; CPU timings of the torch path say nothing about them
            _bars(case_records)
        records += case_records
        del expected
        if ctx.cuda:
            torch.cuda.empty_cache()
    return records


def _bars(records: list[Record]) -> None:
    """Note on each of our records its speedup and peak-memory ratio against the eager official composition."""
    for pass_ in ("fwd", "fwd+bwd"):
        base = next((r for r in records if r.impl == "official eager" and r.pass_ == pass_), None)
        if base is None or not math.isfinite(base.ms):
            continue
        for r in records:
            if not r.impl.startswith("mmkernels") or r.pass_ != pass_ or not math.isfinite(r.ms):
                continue
            speed = base.ms / r.ms
            r.note = f"{r.note} {speed:.1f}x vs eager (bar {SPEED_BAR:g}x: {'met' if speed >= SPEED_BAR else 'MISSED'})"
            if r.peak_mb is not None and base.peak_mb is not None and r.peak_mb > 0:
                ratio = base.peak_mb / r.peak_mb
                r.note += (f"; peak {r.peak_mb:.1f} MiB vs {base.peak_mb:.1f} MiB = {ratio:.1f}x less (bar "
                           f"{PEAK_BAR:g}x: {'met' if ratio >= PEAK_BAR else 'MISSED'})")
            r.note = r.note.strip()
