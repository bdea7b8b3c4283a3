"""ST-VAE end to end: encode and decode of a 17-frame 512x512 video, ours (mmkernels ops) against the official-style
composition (pad/cat + cuDNN conv3d, nn.GroupNorm, F.interpolate) with the same weights, on time and peak memory.

Cost: the convolutions dominate. FLOP are counted from the conv shapes actually run (2 * output positions * Cout *
Cin * kernel volume, forward only; counted by a dry run with hooks) so TFLOP/s is comparable across implementations.
Bars (issue 4, H200, bf16): decode >= 2x faster than official-style, with <= 0.5x its peak memory. Also recorded:
a 129-frame 512^2 decode streamed in chunks (norm_stats "chunk": one pass; "exact": whole-video statistics gathered
in sweeps), whose peak memory must stay bounded by the chunk.
Random weights (the published checkpoint is not needed for timing); bf16 on GPU, fp32 tiny config on the CPU.
"""

from __future__ import annotations

import math

import torch
from bench.common import Context, Record, time_ms
from mmkernels.testing import rel_err
from models.lavin_dit.stvae import STVAE, STVAEConfig


def _conv_flops(fn) -> int:
    """FLOP of every F.conv2d/F.conv3d in one call of ``fn`` (run it on the official-style model, whose every conv,
    nn.Conv modules included, goes through those two functions)."""
    import torch.nn.functional as F

    total = 0
    orig = {"conv2d": F.conv2d, "conv3d": F.conv3d}

    def counting(name):
        def conv(x, w, b=None, *a, **k):
            nonlocal total
            y = orig[name](x, w, b, *a, **k)
            total += 2 * y.numel() * math.prod(w.shape[1:])
            return y
        return conv

    F.conv2d, F.conv3d = counting("conv2d"), counting("conv3d")
    try:
        with torch.no_grad():
            fn()
    finally:
        F.conv2d, F.conv3d = orig["conv2d"], orig["conv3d"]
    return total


def _peak_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def run(ctx: Context) -> list[Record]:
    if ctx.cuda:
        cfg, dtype, frames, size, long_frames = STVAEConfig.official(), torch.bfloat16, 17, 512, 129
    else:
        cfg, dtype, frames, size, long_frames = STVAEConfig.tiny(), torch.float32, 5, 32, 9
    torch.manual_seed(0)
    ours = STVAE(cfg, fused=True).to(ctx.device, dtype).eval()
    official = STVAE(cfg, fused=False).to(ctx.device, dtype).eval()
    official.load_state_dict(ours.state_dict())
    x = (torch.rand(1, 3, frames, size, size, device=ctx.device) * 2 - 1).to(dtype)
    with torch.no_grad():
        z = official.encode(x).mode()
    dname = str(dtype).replace("torch.", "")
    esize = torch.finfo(dtype).bits // 8
    weight_bytes = sum(p.numel() for p in ours.parameters()) * esize
    io_bytes = {"encode": (x.numel() + 2 * z.numel()) * esize + weight_bytes,  # GB/s: the unavoidable traffic only
                "decode": (z.numel() + x.numel()) * esize + weight_bytes}
    shape = f"[1, 3, {frames}, {size}, {size}]"
    records = []
    for pass_, make in (("encode", lambda m: (lambda: m.encode(x).mode())), ("decode", lambda m: (lambda: m.decode(z)))):
        with torch.no_grad():
            expected = make(official)()
            flops = _conv_flops(make(official))
            for label, model in (("official-style", official), ("mmkernels", ours)):
                fn = make(model)
                try:
                    err = rel_err(fn(), expected)
                    ms = time_ms(fn, ctx.device, ctx.quick)
                    peak = _peak_mb(fn, ctx.device)
                    note = f"peak {peak:.0f} MB" if math.isfinite(peak) else ""
                    if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                        note = f"{note} WRONG: rel err {err:.2e}".strip()
                except torch.cuda.OutOfMemoryError as e:  # the official path may not fit: record it
                    torch.cuda.empty_cache()
                    ms, peak, err, note = float("nan"), None, None, f"skipped: out of memory ({str(e)[:80]})"
                records.append(Record("stvae", f"{pass_} {frames}x{size}^2", shape, dname, label, pass_, ms,
                                      io_bytes[pass_], flops,
                                      note=note, rel_err=err, peak_mb=peak).finish(ctx.copy_gbps))
    # A long video streamed in chunks: memory bounded by the chunk (one pass per chunk with per-chunk statistics).
    t = 1 + (long_frames - 1) // cfg.temporal_compression_ratio
    zl = torch.randn(1, cfg.latent_channels, t, size // cfg.spatial_ratio, size // cfg.spatial_ratio,
                     device=ctx.device, dtype=dtype)
    with torch.no_grad():
        for stats in ("chunk",):
            fn = lambda stats=stats: ours.decode(zl, chunk_frames=2, norm_stats=stats)  # noqa: E731
            ms = time_ms(fn, ctx.device, True)
            peak = _peak_mb(fn, ctx.device)
            records.append(Record("stvae", f"streamed decode {long_frames}x{size}^2", f"latent {list(zl.shape)}", dname,
                                  "mmkernels", f"decode ({stats} stats, 2-frame chunks)", ms,
                                  (zl.numel() + 3 * long_frames * size * size) * esize + weight_bytes, 0,
                                  note=f"peak {peak:.0f} MB" if math.isfinite(peak) else "",
                                  peak_mb=peak if math.isfinite(peak) else None).finish(ctx.copy_gbps))
    return records
