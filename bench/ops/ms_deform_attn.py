"""Multi-scale deformable attention benchmark at the Unpair-Seg pixel-decoder shapes.

Cases: a 1024^2 input gives levels 32^2, 64^2, 128^2 (res5, res4, res3; S = 21504 rows), the encoder's queries are
the same S positions (Q = S), H = 8 heads x C = 32 channels, P = 4 points; B = 1 and B = 8. Two precisions:
bf16 value with fp32 locations and weights (what the module produces under bf16 autocast), and all-fp32 (the
official pixel decoder).

Cost (N = B*Q*H*L*P samples; s, t = bytes per element of value and of locations/weights)::

    HBM bytes, forward   value B*S*H*C*s + locations 2*N*t + weights N*t + output B*Q*H*C*s
    HBM bytes, fwd+bwd   forward + grad_out read + grad_value written + grad_loc/grad_attn written (3*N*t)
    L2 gathers           4 corner rows of C*s bytes per sample (forward); backward gathers them again and
                         adds 4*C*4 bytes of fp32 atomics per sample
    FLOP                 ~12 per sample-channel forward, ~30 backward (negligible against 790 TFLOP/s)

The floor ("L2-gather floor" rows) is max(HBM bytes / copy bandwidth, gathered bytes / L2 read bandwidth), with
both bandwidths measured in this run: the copy by bench.common, the L2 read bandwidth by a Triton kernel that
streams a 16 MiB buffer (resident in L2) 20 times. The issue's bar: forward within 1.5x of the floor.

Baselines in the same run:
* ``grid_sample``: Deformable-DETR's PyTorch formulation (F.grid_sample per level, the official fallback), in
  value's dtype (the locations cast to it, as grid_sample requires one dtype);
* ``original-style``: the official CUDA kernel's design (one thread per output element (b, q, h, c), scalar
  loads, loops over levels and points) written in Triton, forward only, fp32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, measure, our_impls, time_ms
from mmkernels.testing import randn

LEVELS = [(32, 32), (64, 64), (128, 128)]
CPU_LEVELS = [(4, 4), (8, 8)]


def _tables(levels, device):
    ss = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = ss[:, 0] * ss[:, 1]
    return ss, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def grid_sample_msda(value, levels, loc, attn):
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    samples, start = [], 0
    for lvl, (h, w) in enumerate(levels):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * H, C, h, w)
        start += h * w
        grid = (2 * loc[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        samples.append(F.grid_sample(v, grid.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    s = torch.stack(samples, -2).flatten(-2)
    a = attn.permute(0, 2, 1, 3, 4).reshape(B * H, 1, Q, L * P).to(s.dtype)
    return (s * a).sum(-1).view(B, H, C, Q).permute(0, 3, 1, 2).reshape(B, Q, H * C)


def _triton_baselines():
    import triton
    import triton.language as tl

    @triton.jit
    def original_style_kernel(V, SS, LSI, LOC, ATTN, OUT, total, Q, H, C, L, P, S, BLOCK: tl.constexpr):
        # One lane per output element (b, q, h, c), as the official im2col kernel: scalar gathers, no reuse of a
        # sample's location and weight across the channels of a head.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < total
        c = i % C
        h = (i // C) % H
        q = (i // (C * H)) % Q
        b = i // (C * H * Q)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for l in range(L):
            Hl = tl.load(SS + 2 * l)
            Wl = tl.load(SS + 2 * l + 1)
            start = tl.load(LSI + l)
            for p in range(P):
                sidx = (((b * Q + q) * H + h) * L + l) * P + p
                x = tl.load(LOC + 2 * sidx, mask=ok, other=0.0) * Wl - 0.5
                y = tl.load(LOC + 2 * sidx + 1, mask=ok, other=0.0) * Hl - 0.5
                a = tl.load(ATTN + sidx, mask=ok, other=0.0)
                x0 = tl.floor(x)
                y0 = tl.floor(y)
                fx = x - x0
                fy = y - y0
                xi = x0.to(tl.int32)
                yi = y0.to(tl.int32)
                base = (b.to(tl.int64) * S + start) * H * C + h * C + c
                for dy in range(2):
                    for dx in range(2):
                        xc = xi + dx
                        yc = yi + dy
                        m = ok & (xc >= 0) & (xc < Wl) & (yc >= 0) & (yc < Hl)
                        v = tl.load(V + base + (yc * Wl + xc).to(tl.int64) * H * C, mask=m, other=0.0)
                        w = (fx if dx == 1 else 1.0 - fx) * (fy if dy == 1 else 1.0 - fy)
                        acc += a * w * v.to(tl.float32)
        tl.store(OUT + i, acc.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def l2_read_kernel(X, OUT, N, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for it in range(ITERS):
            offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
        tl.store(OUT + pid, tl.sum(acc))

    def original_style(value, ss, lsi, loc, attn):
        B, S, H, C = value.shape
        Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        out = torch.empty((B, Q, H * C), dtype=value.dtype, device=value.device)
        total = out.numel()
        original_style_kernel[(triton.cdiv(total, 256),)](value, ss.int(), lsi.int(), loc, attn, out, total, Q, H, C,
                                                            L, P, S, BLOCK=256)
        return out

    def l2_read_gbps(device) -> float:
        n = 8 * 2**20  # 16 MiB of bf16: resident in the 50 MB L2 after the first pass
        x = torch.randn(n, device=device).to(torch.bfloat16)
        block, iters = 2048, 8
        progs = triton.cdiv(n, block * iters)
        out = torch.empty(progs, device=device)
        reps = 20

        def run():
            for _ in range(reps):
                l2_read_kernel[(progs,)](x, out, n, BLOCK=block, ITERS=iters)

        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end))
        return reps * 2 * n / (best * 1e-3) / 1e9

    return original_style, l2_read_gbps


def ours(value, ss, lsi, loc, attn):
    return mmkernels.ms_deform_attn(value, ss, lsi, loc, attn)


def ours_deterministic(value, ss, lsi, loc, attn):
    return mmkernels.ms_deform_attn(value, ss, lsi, loc, attn, deterministic=True)


def run(ctx: Context) -> list[Record]:
    records = []
    if ctx.cuda:
        original_style, l2_read_gbps = _triton_baselines()
        l2_gbps = l2_read_gbps(ctx.device)
        levels = LEVELS
        precisions = [(torch.bfloat16, torch.float32)] if ctx.quick else [(torch.bfloat16, torch.float32),
                                                                           (torch.float32, torch.float32)]
        batches = (1,) if ctx.quick else (1, 8)
    else:
        original_style, l2_gbps = None, None
        levels, precisions, batches = CPU_LEVELS, [(torch.float32, torch.float32)], (1,)
    H, C, P = 8, 32, 4
    ss, lsi, S = _tables(levels, ctx.device)
    L = len(levels)
    for B in batches:
        Q = S
        for vdt, cdt in precisions:
            s, t = vdt.itemsize, cdt.itemsize
            g = torch.Generator().manual_seed(0)
            value = randn((B, S, H, C), vdt, ctx.device, generator=g)
            # Locations around each query's own position (as the encoder's reference points + offsets), some
            # outside the maps; softmaxed weights.
            loc = (torch.rand((B, Q, H, L, P, 2), generator=g) * 1.1 - 0.05).to(ctx.device, cdt)
            attn = torch.softmax(torch.randn((B, Q, H, L * P), generator=g), -1).view(B, Q, H, L, P)
            attn = attn.to(ctx.device, cdt)
            dy = randn((B, Q, H * C), vdt, ctx.device, generator=g)
            N = B * Q * H * L * P
            hbm_f = B * S * H * C * s + 3 * N * t + B * Q * H * C * s
            hbm_b = hbm_f + B * Q * H * C * s + B * S * H * C * s + 3 * N * t
            gather_f = 4 * N * C * s
            cost = {"fwd": (hbm_f, 12 * N * C), "fwd+bwd": (hbm_b, 42 * N * C)}
            case = f"B{B} 1024^2 value {str(vdt)[6:]} coords {str(cdt)[6:]}" if ctx.cuda else "cpu small"
            shape = f"value [{B}, {S}, {H}, {C}], levels {levels}, P {P}, Q {Q}"
            expected = grid_sample_msda(value.float(), levels, loc.float(), attn.float()).to(vdt)
            impls = [("grid_sample", lambda v, a, b, lo, at: grid_sample_msda(v, levels, lo, at), "")]
            impls += our_impls(ctx, "ms_deform_attn", ours, value, ss, lsi, loc, attn)
            impls += [(f"{label} deterministic", fn, note) for label, fn, note in
                      our_impls(ctx, "ms_deform_attn", ours_deterministic, value, ss, lsi, loc, attn)]
            for label, fn, note in impls:
                records += measure(ctx, op="ms_deform_attn", case=case, shape=shape, label=label, fn=fn,
                                   args=(value, ss, lsi, loc, attn), grad_args=(0, 3, 4), dy=dy,
                                   expected=expected, note=note, cost=cost, skip_errors=ctx.cuda)
            dname = str(vdt).replace("torch.", "")
            if original_style is not None:
                ms = time_ms(lambda: original_style(value, ss, lsi, loc, attn), ctx.device, ctx.quick)
                records.append(Record("ms_deform_attn", case, shape, dname, "original-style (1 thread/channel)",
                                      "fwd", ms, *cost["fwd"], note="forward only").finish(ctx.copy_gbps))
            if ctx.copy_gbps and l2_gbps:
                floor_ms = max(hbm_f / (ctx.copy_gbps * 1e9), gather_f / (l2_gbps * 1e9)) * 1e3
                records.append(Record("ms_deform_attn", case, shape, dname, "L2-gather floor", "fwd", floor_ms,
                                      *cost["fwd"], note=f"computed: L2 read {l2_gbps:.0f} GB/s measured, "
                                      f"{gather_f / 1e6:.0f} MB gathered; bar: fwd <= 1.5x this"
                                      ).finish(ctx.copy_gbps))
            del value, loc, attn, dy, expected
            if ctx.cuda:
                torch.cuda.empty_cache()
    return records

