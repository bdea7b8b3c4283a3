"""Causal 3D convolution benchmark: the ST-VAE's 3x3x3 convs, encoder and decoder (replicate time padding, stride 1,
bias), at the activation shapes of a 17-frame video.

Which conv runs where (specs/lavin_dit.md §2.6-2.8, models/lavin_dit/stvae.py, STVAEConfig.official(); counted with
hooks on a 17-frame run), B = 1, a 17x512x512 input, (T, H, W) of the conv's output = its input (stride 1):

  encoder (latent 16 x 5 x 64^2; block channels 128, 256, 256, 512; 3 resnets per stage, 2 in the mid block)
    conv_in                       3 -> 128    17 x 512^2   x1
    down 0 resnets              128 -> 128    17 x 512^2   x6     then time pool (17 -> 9) + stride-2 Conv2d
    down 1 resnet 0 conv1       128 -> 256     9 x 256^2   x1     (+ 1x1x1 shortcut 128 -> 256)
    down 1 resnets              256 -> 256     9 x 256^2   x5     then time pool (9 -> 5) + stride-2 Conv2d
    down 2 resnets              256 -> 256     5 x 128^2   x6     then stride-2 Conv2d (no time pooling)
    down 3 resnet 0 conv1       256 -> 512     5 x  64^2   x1     (+ 1x1x1 shortcut 256 -> 512)
    down 3 + mid resnets        512 -> 512     5 x  64^2   x9
    conv_out                    512 -> 32      5 x  64^2   x1     (mean and log-variance)
  decoder (4 resnets per up block, SpatialNorm everywhere: its 1x1x1 16 -> C convs run at latent resolution in ours)
    conv_in                      16 -> 512     5 x  64^2   x1
    mid + up 0 resnets          512 -> 512     5 x  64^2   x12    then nearest x2 in time and space (5 -> 9 frames)
                                                                  and a per-frame 3x3 conv, C=512 at 9 x 128^2
    up 1 resnet 0 conv1         512 -> 256     9 x 128^2   x1     (+ 1x1x1 shortcut 512 -> 256)
    up 1 resnets                256 -> 256     9 x 128^2   x7     then x2 (9 -> 17 frames), 3x3 conv at 17 x 256^2
    up 2 resnets                256 -> 256    17 x 256^2   x8     then x2 in space only, 3x3 conv at 17 x 512^2
    up 3 resnet 0 conv1         256 -> 128    17 x 512^2   x1     (+ 1x1x1 shortcut 256 -> 128)
    up 3 resnets                128 -> 128    17 x 512^2   x7
    conv_out                    128 -> 3      17 x 512^2   x1
A 17x256x256 input halves every H and W. Shapes the two share are measured once: the decoder's 512->512 convs are
"enc3", its 128->128 ones "enc0", and its up-1 256->256 convs of a 512^2 video (9 x 128^2) are "enc1 9x128^2" of a
256^2 one (tests/bench checks that the cases are exactly the model's 3x3x3 convs). The per-frame 3x3
upsampler convs (kt = 1) and the 1x1x1 shortcuts are not in this bench (their official baseline is a different op);
bench/ops/stvae.py times them inside the whole model. ``--quick``: enc0 and enc3 of the 512^2 input and the
decoder's up-2 shape. CPU: one tiny fp32 case, our torch backend and the official-style baselines only.

Cost per call, with M = B*T_out*H*W output positions, N = Cout, K = Cin*27, s = bytes per element:
  forward   2*M*N*K FLOP; reads x and W, writes y: s*(B*Cin*T*H*W + N*K + M*N) bytes.
  backward  dx and dW, 2*M*N*K FLOP each (forward+backward = 6*M*N*K); reads dy, x, W, writes dx, dW:
            s*(M*N + 2*B*Cin*T*H*W + 2*N*K) bytes.
The same counts are charged to every implementation (the official path moves more: its padded copies). The convs
are compute-bound (~1700 FLOP/byte in bf16 at C=128 against the H200's ridge of ~184), so TFLOP/s is the figure of
merit; the ceiling is the bf16 MMA rate (H200 ~790 TFLOP/s, H100 ~798). Peak memory of one call (forward, or
forward+backward) is recorded per implementation (GPU only): the official path holds two padded copies of x.
Issue 4's memory bar, "no activation-sized temporaries", is peak <= 1.1x (input + output + weights): each record's
``extra`` holds ``io_weights_bytes``, the tensors the call must hold (forward: x, W, b and y; forward+backward:
those plus dy, dx, dW and db), and on the GPU ``peak_ratio`` = (the call's inputs, already resident, + the peak
allocation during the call above what was allocated before it) / io_weights_bytes, with the verdict in the note.

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
from dataclasses import dataclass, field, fields

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
    # The decoder's shapes that the encoder does not have (see the table in the module docstring).
    ("dec conv_in 5x64^2", 16, 512, (5, 64, 64)),
    ("dec up1 in 9x128^2", 512, 256, (9, 128, 128)),
    ("dec up2 17x256^2", 256, 256, (17, 256, 256)),
    ("dec up3 in 17x512^2", 256, 128, (17, 512, 512)),
    ("dec conv_out 17x512^2", 128, 3, (17, 512, 512)),
    ("dec conv_in 5x32^2", 16, 512, (5, 32, 32)),
    ("dec up1 in 9x64^2", 512, 256, (9, 64, 64)),
    ("dec up1 9x64^2", 256, 256, (9, 64, 64)),
    ("dec up2 17x128^2", 256, 256, (17, 128, 128)),
    ("dec up3 in 17x256^2", 256, 128, (17, 256, 256)),
    ("dec conv_out 17x256^2", 128, 3, (17, 256, 256)),
    # The encoder's edge convs.
    ("enc conv_in 17x512^2", 3, 128, (17, 512, 512)),
    ("enc conv_out 5x64^2", 512, 32, (5, 64, 64)),
    ("enc conv_in 17x256^2", 3, 128, (17, 256, 256)),
    ("enc conv_out 5x32^2", 512, 32, (5, 32, 32)),
]
QUICK = [c for c in CASES if c[0] in ("enc0 17x512^2", "enc3 5x64^2", "dec up2 17x256^2")]
CPU = [("tiny 5x12^2", 8, 8, (5, 12, 12))]
PEAK_BAR = 1.1  # issue 4: peak <= 1.1x (input + output + weights)


@dataclass
class ConvRecord(Record):
    """A Record with ``extra``: the peak-memory figures of issue 4's bar (written with the record)."""

    extra: dict = field(default_factory=dict)


def _io_weights_bytes(B, cin, cout, size, s) -> dict[str, int]:
    """Bytes the call must hold: forward x, W, b, y; forward+backward also dy, dx, dW, db (the same sizes again)."""
    T, H, W = size
    fwd = s * (B * cin * T * H * W + cout * cin * math.prod(K3) + cout + B * cout * T * H * W)
    return {"fwd": fwd, "fwd+bwd": 2 * fwd}


def _input_bytes(args, dy, pass_) -> int:
    """Bytes of the call's inputs (resident before it): x, W, b, and dy for forward+backward."""
    ts = list(args) + ([dy] if pass_ == "fwd+bwd" else [])
    return sum(t.numel() * t.element_size() for t in ts)


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
        io_w = _io_weights_bytes(B, cin, cout, size, s)
        shape = f"[{B}, {cin}->{cout}, {size[0]}, {size[1]}, {size[2]}] k{''.join(map(str, K3))}"
        for label, fn, args, note in _impls(ctx, x, x_cl, w, w_cl, b):
            recs = measure(ctx, op="causal_conv3d", case=name, shape=shape, label=label, fn=fn, args=args,
                           grad_args=(0, 1, 2), dy=dy, expected=expected, note=note, cost=cost,
                           skip_errors=ctx.cuda)
            gargs = [a.detach().requires_grad_(True) for a in args]
            peaks = {"fwd": lambda fn=fn, args=args: fn(*args),
                     "fwd+bwd": lambda fn=fn, gargs=gargs, dy=dy: torch.autograd.grad(fn(*gargs), gargs, dy)}
            recs = [ConvRecord(**{f.name: getattr(r, f.name) for f in fields(Record)}) for r in recs]
            for r in recs:
                r.extra["io_weights_bytes"] = io_w[r.pass_]
                if not math.isfinite(r.ms):
                    continue
                try:
                    peak = _peak_mb(peaks[r.pass_], ctx.device)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    peak = float("nan")
                if math.isfinite(peak):
                    r.peak_mb = peak
                    ratio = (_input_bytes(args, dy, r.pass_) + peak * 2 ** 20) / io_w[r.pass_]
                    ok = ratio <= PEAK_BAR
                    r.extra.update(peak_ratio=ratio, peak_bar=PEAK_BAR, peak_bar_met=ok)
                    r.note = (f"{r.note} peak {peak:.0f} MiB = {ratio:.2f}x (in + out + weights; bar <= "
                              f"{PEAK_BAR:g}x: {'met' if ok else 'MISSED'})").strip()
            records += recs
        del expected
        if ctx.cuda:
            torch.cuda.empty_cache()
    return records
