"""Causal 3D convolution benchmark: the ST-VAE encoder's 3x3x3 convs (replicate time padding, stride 1, bias).

Shapes (specs/lavin_dit.md §2.6-2.8), B = 1, for a 17x512x512 input video: stage 0 runs at T=17, 512^2 with C=128;
stage 1 at T=9, 256^2 with C=256 (its first conv takes 128 in); stage 2 at T=5, 128^2, C=256; stage 3 at T=5, 64^2
with C=512 (its first conv takes 256 in). A 17x256x256 input halves every H and W. ``--quick``: stage 0 and stage 3
of the 512^2 input. CPU: one tiny fp32 case, our torch backend and the official-style baselines only.

Cost per call, with M = B*T_out*H*W output positions, N = Cout, K = Cin*27, s = bytes per element:
  forward   2*M*N*K FLOP; reads x and W, writes y: s*(B*Cin*T*H*W + N*K + M*N) bytes.
  backward  dx and dW, 2*M*N*K FLOP each (forward+backward = 6*M*N*K); reads dy, x, W, writes dx, dW:
            s*(M*N + 2*B*Cin*T*H*W + 2*N*K) bytes.
The same counts are charged to every implementation (the official path moves more: its padded copies). The convs
are compute-bound (~1700 FLOP/byte in bf16 at C=128 against the H200's ridge of ~184), so TFLOP/s is the figure of
merit; the ceiling is the bf16 MMA rate (H200 ~790 TFLOP/s, H100 ~798). Peak memory of one call (forward, or
forward+backward) is recorded per implementation (GPU only): the official path holds two padded copies of x.

Implementations, on the same inputs in the same run (the first is the table's speedup baseline):
  * "official pad/cat + cuDNN (NCDHW)": the official STVAECausalConv3d arithmetic: cat frame 0 twice in front,
    F.pad zeros by 1 on H and W, F.conv3d, NCDHW tensors.
  * "official pad/cat + cuDNN (channels_last_3d)": the same with x and W channels-last (cuDNN's implicit GEMM).
  * mmkernels[triton] on channels-last x (its coalesced layout), and "mmkernels[triton] (NCDHW x)" on NCDHW x;
    on the CPU mmkernels[torch].
Correctness: every output is compared with the op's definition (reference.forward: fp32 conv, one rounding); over
the dtype's tolerance (1e-2 in bf16) a record is marked WRONG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, measure, our_impls
from mmkernels.ops.causal_conv3d import reference
from mmkernels.testing import randn

K3 = (3, 3, 3)
# (name, Cin, Cout, (T, H, W)) for one 17-frame video of 512^2, then of 256^2.
CASES = [
    ("enc0 17x512^2", 128, 128, (17, 512, 512)),
    ("enc1 in 9x256^2", 128, 256, (9, 256, 256)),
    ("enc1 9x256^2", 256, 256, (9, 256, 256)),
    ("enc2 5x128^2", 256, 256, (5, 128, 128)),
    ("enc3 in 5x64^2", 256, 512, (5, 64, 64)),
    ("enc3 5x64^2", 512, 512, (5, 64, 64)),
    ("enc0 17x256^2", 128, 128, (17, 256, 256)),
    ("enc1 in 9x128^2", 128, 256, (9, 128, 128)),
    ("enc1 9x128^2", 256, 256, (9, 128, 128)),
    ("enc2 5x64^2", 256, 256, (5, 64, 64)),
    ("enc3 in 5x32^2", 256, 512, (5, 32, 32)),
    ("enc3 5x32^2", 512, 512, (5, 32, 32)),
]
QUICK = [CASES[0], CASES[5]]
CPU = [("tiny 5x12^2", 8, 8, (5, 12, 12))]


def official(x, w, b):
    """STVAECausalConv3d.forward: replicate frame 0 kt-1 times in front, zero-pad H and W, conv3d with padding 0."""
    kt, kh, kw = w.shape[2:]
    xp = torch.cat([x[:, :, :1]] * (kt - 1) + [x], dim=2)
    xp = F.pad(xp, (kw // 2, kw // 2, kh // 2, kh // 2))
    return F.conv3d(xp, w, b)


def ours(x, w, b):
    return mmkernels.causal_conv3d(x, w, b)


def _cost(B, Cin, Cout, size) -> dict[str, tuple[int, int]]:
    T, H, W = size
    m, n, k = B * T * H * W, Cout, Cin * math.prod(K3)  # stride 1, odd kernel: T_out, H, W unchanged
    flops = 2 * m * n * k
    x_elems = B * Cin * T * H * W
    fwd_bytes = x_elems + n * k + m * n
    bwd_bytes = m * n + 2 * x_elems + 2 * n * k
    return {"fwd": (fwd_bytes, flops), "fwd+bwd": (fwd_bytes + bwd_bytes, 3 * flops)}


def _peak_mb(fn, device) -> float:
    """Peak allocated memory of one call of ``fn`` above what was allocated before it (MiB); NaN on the CPU."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _impls(ctx: Context, x_ncdhw, x_cl, w, w_cl, b):
    """(label, fn(x, w, b), args, note) for every implementation that can run here."""
    out = [("official pad/cat + cuDNN (NCDHW)" if ctx.cuda else "official pad/cat + conv3d (NCDHW)", official,
            (x_ncdhw, w, b), ""),
           ("official pad/cat + cuDNN (channels_last_3d)" if ctx.cuda else
            "official pad/cat + conv3d (channels_last_3d)", official, (x_cl, w_cl, b), "")]
    for label, fn, note in our_impls(ctx, "causal_conv3d", ours, x_cl, w, b):
        out.append((label, fn, (x_cl, w, b), note))
        if ctx.cuda:
            out.append((f"{label} (NCDHW x)", fn, (x_ncdhw, w, b), note))
    return out


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for name, cin, cout, size in cases:
        B = 1
        x = randn((B, cin, *size), dtype, ctx.device)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        w = randn((cout, cin, *K3), dtype, ctx.device, scale=(cin * 27) ** -0.5)
        w_cl = w.contiguous(memory_format=torch.channels_last_3d)
        b = randn((cout,), dtype, ctx.device)
        dy = randn((B, cout, *size), dtype, ctx.device).contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            expected = reference.forward(x, w, b, None, 1, True)
        cost = {p: (nbytes * s, flops) for p, (nbytes, flops) in _cost(B, cin, cout, size).items()}
        shape = f"[{B}, {cin}->{cout}, {size[0]}, {size[1]}, {size[2]}] k{''.join(map(str, K3))}"
        for label, fn, args, note in _impls(ctx, x, x_cl, w, w_cl, b):
            recs = measure(ctx, op="causal_conv3d", case=name, shape=shape, label=label, fn=fn, args=args,
                           grad_args=(0, 1, 2), dy=dy, expected=expected, note=note, cost=cost,
                           skip_errors=ctx.cuda)
            gargs = [a.detach().requires_grad_(True) for a in args]
            peaks = {"fwd": lambda fn=fn, args=args: fn(*args),
                     "fwd+bwd": lambda fn=fn, gargs=gargs, dy=dy: torch.autograd.grad(fn(*gargs), gargs, dy)}
            for r in recs:
                if not math.isfinite(r.ms):
                    continue
                try:
                    peak = _peak_mb(peaks[r.pass_], ctx.device)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    peak = float("nan")
                if math.isfinite(peak):
                    r.note = f"{r.note} peak {peak:.0f} MiB".strip()
                    if hasattr(r, "peak_mb"):
                        r.peak_mb = peak
            records += recs
        del expected
        if ctx.cuda:
            torch.cuda.empty_cache()
    return records
