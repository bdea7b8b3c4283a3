"""GroupNorm (+ SpatialNorm modulation) + SiLU Triton kernels: the ``triton`` backend. Semantics: see reference.py.

Every tensor is addressed by strides as [B, C, D0, D1, D2] (x's spatial dims padded to three with leading size-1
dims; more than three are merged where the strides allow, else copied once): NCDHW, channels_last_3d, expanded
(stride-0) upstream grads and strided views are read in place. A tile is [BLOCK_C channels, BLOCK_W positions of
D2] of one row (d0, d1); its long axis follows the unit stride (W for NCDHW, channels for channels-last), so loads
coalesce in both layouts. A program walks a range of rows with a fixed column tile, so the column-dependent part of
every address (and the source column of scale/shift) is computed once per program and the per-row part is scalar.

Forward (two passes over x):
  1. ``_stats_kernel``: per-lane Welford over the program's rows, combined per channel (Chan) into a partial
     (mean, M2) per (b, c, program); ``_stats_finalize_kernel``: one program per (b, group) combines its channels'
     partials in a fixed order (deterministic, no atomics) into mean and rstd.
  2. ``_apply_kernel``: normalize, modulate with scale/shift read at their own resolution through the nearest map,
     SiLU, rounding at the points of reference.py.
Backward (two passes over x and dy):
  1. ``_bwd_reduce_kernel``: tiled in *source* space: a program owns a [BLOCK_C, BLOCK_SW] block of scale/shift
     elements of one source row and walks exactly the positions that read them ([BLOCK_C, BLOCK_SW, FWP] tiles,
     FWP = next power of two of the W factor), so dscale/dshift are complete sums written once, deterministic and
     without atomics. It also writes per-(b, c, program) partial sums of dg and dg*xhat. Without scale/shift the
     same kernel runs on a virtual source grid (whole row tiles, several rows per program).
     ``_bwd_finalize_kernel`` sums the partials per channel and per group.
  2. ``_bwd_dx_kernel``: dx from the recomputed dg and the two group means.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mmkernels.ops.group_norm_silu import reference

TILE = 4096  # target elements per [BLOCK_C, BLOCK_W] tile
MAX_BLOCK_W = 1024
MAX_BLOCK_C = 256


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces.


@triton.jit
def _values(x, mean, rstd, w, bias, sc, sh, Y, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(xhat, g, a) of reference.py for an fp32 tile x; per-channel vectors broadcast over the trailing dims of x
    (already expanded by the caller). Y only supplies the output dtype of the rounding points."""
    out_ty = Y.dtype.element_ty
    xhat = (x - mean) * rstd
    gn = xhat
    if HAS_W:
        gn = gn * w
    if HAS_B:
        gn = gn + bias
    g = gn.to(out_ty).to(tl.float32)
    a = g
    if HAS_SCALE:
        a = (a * sc).to(out_ty).to(tl.float32)
    if HAS_SHIFT:
        a = (a + sh).to(out_ty).to(tl.float32)
    return xhat, g, a


@triton.jit
def _idx(v, OFF64: tl.constexpr):
    """Index vectors of the in-row (channel, column) offsets: int32 unless they can pass 2**31 (the launcher
    decides), which keeps the per-program offset tiles at one register per element."""
    out = v
    if OFF64:
        out = v.to(tl.int64)
    return out


@triton.jit
def _silu_grad(a, dy):
    s = 1.0 / (1.0 + tl.exp(-a))
    return dy * (s * (1.0 + a * (1.0 - s)))


@triton.jit
def _src_row(t, h, FT, FH, FIRST: tl.constexpr):
    """Source (d0, d1) of row (t, h) under the nearest map."""
    if FIRST:
        st = tl.where(t > 0, 1 + (t - 1) // FT, 0)
    else:
        st = t // FT
    return st, h // FH


@triton.jit
def _channel_params(MEAN, RSTD, W, BIAS, b, cols, c_ok, G, CPG, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    grp = b * G + cols // CPG
    mean = tl.load(MEAN + grp, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + grp, mask=c_ok, other=0.0)
    w = rstd  # placeholder when there is no weight (never read)
    bias = rstd
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)
    return mean, rstd, w, bias


# ----------------------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _stats_kernel(X, PMEAN, PM2, C, D1, D2, n_rows, rows_per_prog, NP,
                  sxb, sxc, sx0, sx1, sx2,
                  OFF64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_s = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    n_wb = tl.cdiv(D2, BLOCK_W)
    wb = pid_s % n_wb
    r_lo = ((pid_s // n_wb) * rows_per_prog).to(tl.int64)  # int64 rows: offsets can pass 2**31
    r_hi = tl.minimum(r_lo + rows_per_prog, n_rows)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ws = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = ws < D2
    mask = c_ok[:, None] & w_ok[None, :]
    base = X + b.to(tl.int64) * sxb
    offs = _idx(cols, OFF64)[:, None] * sxc + _idx(ws, OFF64)[None, :] * sx2
    # Per-lane Welford over rows (every valid lane sees the same row count), no cross-lane work in the loop.
    mean = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)
    for r in range(r_lo, r_hi):
        t = r // D1
        h = r - t * D1
        x = tl.load(base + (t * sx0 + h * sx1) + offs, mask=mask, other=0.0)
        x = x.to(tl.float32)
        delta = x - mean
        mean += delta * (1.0 / (r - r_lo + 1))
        m2 += delta * (x - mean)
    # Combine the lanes of each channel (equal counts): mean of means, M2 = sum M2 + k * sum (mean_l - mean)^2.
    k = (r_hi - r_lo).to(tl.float32)
    n_w = tl.minimum(D2 - wb * BLOCK_W, BLOCK_W).to(tl.float32)
    cmean = tl.sum(tl.where(mask, mean, 0.0), axis=1) / n_w
    dev = tl.where(mask, mean - cmean[:, None], 0.0)
    cm2 = tl.sum(tl.where(mask, m2, 0.0), axis=1) + k * tl.sum(dev * dev, axis=1)
    out = (b * C + cols).to(tl.int64) * NP + pid_s
    tl.store(PMEAN + out, cmean, mask=c_ok)
    tl.store(PM2 + out, cm2, mask=c_ok)


@triton.jit
def _stats_finalize_kernel(PMEAN, PM2, MEAN, RSTD, C, G, CPG, D2, n_rows, rows_per_prog, NP, eps,
                           BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // G
    g = pid - b * G
    start = (b * C + g * CPG).to(tl.int64) * NP  # the group's partials are contiguous: [CPG, NP]
    total = CPG * NP
    n_wb = tl.cdiv(D2, BLOCK_W)
    cnt = tl.zeros([BLOCK_P], dtype=tl.float32)
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for i0 in range(0, total, BLOCK_P):
        idx = i0 + tl.arange(0, BLOCK_P)
        ok = idx < total
        p = idx % NP
        wb = p % n_wb
        r_lo = (p // n_wb) * rows_per_prog
        n_i = (tl.minimum(n_rows - r_lo, rows_per_prog) * tl.minimum(D2 - wb * BLOCK_W, BLOCK_W)).to(tl.float32)
        n_i = tl.where(ok, n_i, 0.0)
        mean_i = tl.load(PMEAN + start + idx, mask=ok, other=0.0)
        m2_i = tl.load(PM2 + start + idx, mask=ok, other=0.0)
        n_new = cnt + n_i
        frac = tl.where(n_new > 0, n_i / tl.maximum(n_new, 1.0), 0.0)
        delta = mean_i - mean
        mean += delta * frac
        m2 += m2_i + delta * delta * cnt * frac
        cnt = n_new
    n = tl.sum(cnt, axis=0)
    gmean = tl.sum(cnt * mean, axis=0) / n
    dev = mean - gmean
    gm2 = tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)
    var = tl.maximum(gm2 / n, 0.0)
    tl.store(MEAN + pid, gmean)
    tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply_kernel(X, Y, W, BIAS, SCALE, SHIFT, MEAN, RSTD,
                  C, G, CPG, D1, D2, n_rows, rows_per_prog,
                  sxb, sxc, sx0, sx1, sx2,
                  syb, syc, sy0, sy1, sy2,
                  ssb, ssc, ss0, ss1, ss2,
                  shb, shc, sh0, sh1, sh2,
                  FT, FH, FW,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                  SILU: tl.constexpr, FIRST: tl.constexpr, LIKE_X: tl.constexpr, SHIFT_LIKE_SCALE: tl.constexpr,
                  OFF64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_s = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    n_wb = tl.cdiv(D2, BLOCK_W)
    wb = pid_s % n_wb
    r_lo = ((pid_s // n_wb) * rows_per_prog).to(tl.int64)  # int64 rows: offsets can pass 2**31
    r_hi = tl.minimum(r_lo + rows_per_prog, n_rows)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ws = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = c_ok[:, None] & (ws < D2)[None, :]
    mean, rstd, w, bias = _channel_params(MEAN, RSTD, W, BIAS, b, cols, c_ok, G, CPG, HAS_W, HAS_B)
    b64 = b.to(tl.int64)
    ci = _idx(cols, OFF64)
    wi = _idx(ws, OFF64)
    x_offs = ci[:, None] * sxc + wi[None, :] * sx2
    y_offs = x_offs
    if not LIKE_X:
        y_offs = ci[:, None] * syc + wi[None, :] * sy2
    swi = _idx(ws // FW, OFF64)  # source column, once per program
    s_offs = ci[:, None] * ssc + swi[None, :] * ss2
    h_offs = s_offs
    if not SHIFT_LIKE_SCALE:
        h_offs = ci[:, None] * shc + swi[None, :] * sh2
    for r in range(r_lo, r_hi):
        t64 = r // D1
        h64 = r - t64 * D1
        x = tl.load(X + (b64 * sxb + t64 * sx0 + h64 * sx1) + x_offs, mask=mask, other=0.0).to(tl.float32)
        sc = x  # placeholders when absent (never read)
        sh = x
        if HAS_SCALE or HAS_SHIFT:
            st64, sr64 = _src_row(t64, h64, FT, FH, FIRST)
            if HAS_SCALE:
                sc = tl.load(SCALE + (b64 * ssb + st64 * ss0 + sr64 * ss1) + s_offs, mask=mask, other=0.0)
                sc = sc.to(tl.float32)
            if HAS_SHIFT:
                sh = tl.load(SHIFT + (b64 * shb + st64 * sh0 + sr64 * sh1) + h_offs, mask=mask, other=0.0)
                sh = sh.to(tl.float32)
        _xhat, _g, a = _values(x, mean[:, None], rstd[:, None], w[:, None], bias[:, None], sc, sh, Y,
                               HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        if SILU:
            a = a / (1.0 + tl.exp(-a))
        tl.store(Y + (b64 * syb + t64 * sy0 + h64 * sy1) + y_offs, a.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _bwd_reduce_kernel(DY, X, W, BIAS, SCALE, SHIFT, MEAN, RSTD, DSCALE, DSHIFT, PA, PB,
                       C, G, CPG, D0, D1, D2, Q1, Q2, NP,
                       sdb, sdc, sd0, sd1, sd2,
                       sxb, sxc, sx0, sx1, sx2,
                       ssb, ssc, ss0, ss1, ss2,
                       shb, shc, sh0, sh1, sh2,
                       dsb, dsc, ds0, ds1, ds2,
                       dhb, dhc, dh0, dh1, dh2,
                       F0, F1, F2,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       SILU: tl.constexpr, FIRST: tl.constexpr, LIKE_X: tl.constexpr, OFF64: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_SW: tl.constexpr, FWP: tl.constexpr):
    pid_s = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    n_swb = tl.cdiv(Q2, BLOCK_SW)
    swb = pid_s % n_swb
    q01 = pid_s // n_swb
    q0 = q01 // Q1
    q1 = q01 - q0 * Q1
    # The rows that read source row (q0, q1).
    if FIRST:
        t_lo = tl.where(q0 > 0, 1 + (q0 - 1) * F0, 0)
        t_hi = tl.where(q0 > 0, 1 + q0 * F0, 1)
    else:
        t_lo = q0 * F0
        t_hi = tl.minimum(t_lo + F0, D0)
    h_lo = q1 * F1
    h_hi = tl.minimum(h_lo + F1, D1)
    t_lo = t_lo.to(tl.int64)  # int64 loop variables: row offsets can exceed 2**31
    t_hi = t_hi.to(tl.int64)
    h_lo = h_lo.to(tl.int64)
    h_hi = h_hi.to(tl.int64)

    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    sws = swb * BLOCK_SW + tl.arange(0, BLOCK_SW)
    js = tl.arange(0, FWP)
    ws = sws[:, None] * F2 + js[None, :]  # [BLOCK_SW, FWP]: the positions that read source column sws
    w_ok = (sws[:, None] < Q2) & (js[None, :] < F2) & (ws < D2)
    mask = c_ok[:, None, None] & w_ok[None, :, :]
    src_mask = c_ok[:, None] & (sws < Q2)[None, :]
    mean, rstd, w, bias = _channel_params(MEAN, RSTD, W, BIAS, b, cols, c_ok, G, CPG, HAS_W, HAS_B)
    mean3 = mean[:, None, None]
    rstd3 = rstd[:, None, None]
    w3 = w[:, None, None]
    bias3 = bias[:, None, None]
    b64 = b.to(tl.int64)
    cols64 = _idx(cols, OFF64)
    ws64 = _idx(ws, OFF64)
    sws64 = _idx(sws, OFF64)
    q064 = q0.to(tl.int64)
    q164 = q1.to(tl.int64)
    x_offs = cols64[:, None, None] * sxc + ws64[None, :, :] * sx2
    d_offs = x_offs
    if not LIKE_X:
        d_offs = cols64[:, None, None] * sdc + ws64[None, :, :] * sd2
    # Every position of this program reads the same scale/shift block: load it once.
    sc = tl.zeros([BLOCK_C, BLOCK_SW, 1], dtype=tl.float32)
    sh = sc
    if HAS_SCALE:
        sc = tl.load(SCALE + (b64 * ssb + q064 * ss0 + q164 * ss1) + cols64[:, None] * ssc + sws64[None, :] * ss2,
                     mask=src_mask, other=0.0).to(tl.float32)[:, :, None]
    if HAS_SHIFT:
        sh = tl.load(SHIFT + (b64 * shb + q064 * sh0 + q164 * sh1) + cols64[:, None] * shc + sws64[None, :] * sh2,
                     mask=src_mask, other=0.0).to(tl.float32)[:, :, None]
    acc_a = tl.zeros([BLOCK_C, BLOCK_SW, FWP], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C, BLOCK_SW, FWP], dtype=tl.float32)
    acc_sc = tl.zeros([BLOCK_C, BLOCK_SW, FWP], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_C, BLOCK_SW, FWP], dtype=tl.float32)
    for t64 in range(t_lo, t_hi):
        for h64 in range(h_lo, h_hi):
            x = tl.load(X + (b64 * sxb + t64 * sx0 + h64 * sx1) + x_offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + (b64 * sdb + t64 * sd0 + h64 * sd1) + d_offs, mask=mask, other=0.0).to(tl.float32)
            xhat, g, a = _values(x, mean3, rstd3, w3, bias3, sc, sh, X, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
            da = dy
            if SILU:
                da = _silu_grad(a, dy)
            if HAS_SHIFT:
                acc_sh += da
            dg = da
            if HAS_SCALE:
                acc_sc += da * g
                dg = da * sc
            acc_a += dg
            acc_b += dg * xhat
    if HAS_SCALE:
        tl.store(DSCALE + (b64 * dsb + q064 * ds0 + q164 * ds1) + cols64[:, None] * dsc + sws64[None, :] * ds2,
                 tl.sum(acc_sc, axis=2).to(DSCALE.dtype.element_ty), mask=src_mask)
    if HAS_SHIFT:
        tl.store(DSHIFT + (b64 * dhb + q064 * dh0 + q164 * dh1) + cols64[:, None] * dhc + sws64[None, :] * dh2,
                 tl.sum(acc_sh, axis=2).to(DSHIFT.dtype.element_ty), mask=src_mask)
    out = (b * C + cols).to(tl.int64) * NP + pid_s
    tl.store(PA + out, tl.sum(tl.sum(acc_a, axis=2), axis=1), mask=c_ok)
    tl.store(PB + out, tl.sum(tl.sum(acc_b, axis=2), axis=1), mask=c_ok)


@triton.jit
def _bwd_finalize_kernel(PA, PB, W, SA, SB, M1, M2, C, G, CPG, NP, inv_n,
                         HAS_W: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // G
    g = pid - b * G
    acc1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for ci in range(0, CPG):
        c = g * CPG + ci
        start = (b * C + c).to(tl.int64) * NP
        pa = tl.zeros([BLOCK_P], dtype=tl.float32)
        pb = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, NP, BLOCK_P):
            idx = p0 + tl.arange(0, BLOCK_P)
            ok = idx < NP
            pa += tl.load(PA + start + idx, mask=ok, other=0.0)
            pb += tl.load(PB + start + idx, mask=ok, other=0.0)
        tl.store(SA + b * C + c, tl.sum(pa, axis=0))
        tl.store(SB + b * C + c, tl.sum(pb, axis=0))
        if HAS_W:
            wc = tl.load(W + c).to(tl.float32)
            pa = pa * wc
            pb = pb * wc
        acc1 += pa
        acc2 += pb
    tl.store(M1 + pid, tl.sum(acc1, axis=0) * inv_n)
    tl.store(M2 + pid, tl.sum(acc2, axis=0) * inv_n)


@triton.jit
def _bwd_dx_kernel(DY, X, DX, W, BIAS, SCALE, SHIFT, MEAN, RSTD, M1, M2,
                   C, G, CPG, D1, D2, n_rows, rows_per_prog,
                   sdb, sdc, sd0, sd1, sd2,
                   sxb, sxc, sx0, sx1, sx2,
                   sob, soc, so0, so1, so2,
                   ssb, ssc, ss0, ss1, ss2,
                   shb, shc, sh0, sh1, sh2,
                   FT, FH, FW,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   SILU: tl.constexpr, FIRST: tl.constexpr, LIKE_X: tl.constexpr, SHIFT_LIKE_SCALE: tl.constexpr,
                   OFF64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_s = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    n_wb = tl.cdiv(D2, BLOCK_W)
    wb = pid_s % n_wb
    r_lo = ((pid_s // n_wb) * rows_per_prog).to(tl.int64)  # int64 rows: offsets can pass 2**31
    r_hi = tl.minimum(r_lo + rows_per_prog, n_rows)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ws = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = c_ok[:, None] & (ws < D2)[None, :]
    mean, rstd, w, bias = _channel_params(MEAN, RSTD, W, BIAS, b, cols, c_ok, G, CPG, HAS_W, HAS_B)
    grp = b * G + cols // CPG
    m1 = tl.load(M1 + grp, mask=c_ok, other=0.0)[:, None]
    m2 = tl.load(M2 + grp, mask=c_ok, other=0.0)[:, None]
    b64 = b.to(tl.int64)
    ci = _idx(cols, OFF64)
    wi = _idx(ws, OFF64)
    x_offs = ci[:, None] * sxc + wi[None, :] * sx2
    d_offs = x_offs
    o_offs = x_offs
    if not LIKE_X:
        d_offs = ci[:, None] * sdc + wi[None, :] * sd2
        o_offs = ci[:, None] * soc + wi[None, :] * so2
    swi = _idx(ws // FW, OFF64)
    s_offs = ci[:, None] * ssc + swi[None, :] * ss2
    h_offs = s_offs
    if not SHIFT_LIKE_SCALE:
        h_offs = ci[:, None] * shc + swi[None, :] * sh2
    for r in range(r_lo, r_hi):
        t64 = r // D1
        h64 = r - t64 * D1
        x = tl.load(X + (b64 * sxb + t64 * sx0 + h64 * sx1) + x_offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + (b64 * sdb + t64 * sd0 + h64 * sd1) + d_offs, mask=mask, other=0.0).to(tl.float32)
        sc = x
        sh = x
        if HAS_SCALE or HAS_SHIFT:
            st64, sr64 = _src_row(t64, h64, FT, FH, FIRST)
            if HAS_SCALE:
                sc = tl.load(SCALE + (b64 * ssb + st64 * ss0 + sr64 * ss1) + s_offs, mask=mask, other=0.0)
                sc = sc.to(tl.float32)
            if HAS_SHIFT:
                sh = tl.load(SHIFT + (b64 * shb + st64 * sh0 + sr64 * sh1) + h_offs, mask=mask, other=0.0)
                sh = sh.to(tl.float32)
        xhat, _g, a = _values(x, mean[:, None], rstd[:, None], w[:, None], bias[:, None], sc, sh, X,
                              HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        dg = dy
        if SILU:
            dg = _silu_grad(a, dy)
        if HAS_SCALE:
            dg = dg * sc
        if HAS_W:
            dg = dg * w[:, None]
        dx = rstd[:, None] * (dg - m1 - xhat * m2)
        tl.store(DX + (b64 * sob + t64 * so0 + h64 * so1) + o_offs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers.


def canonical(t: torch.Tensor) -> Optional[tuple[tuple[int, int, int], tuple[int, ...]]]:
    """((D0, D1, D2), (stride_b, stride_c, stride_0, stride_1, stride_2)) of t as [B, C, D0, D1, D2], or None when
    more than three spatial dims do not merge without a copy."""
    sp, st = tuple(t.shape[2:]), tuple(t.stride()[2:])
    if len(sp) <= 3:
        pad = 3 - len(sp)
        return (1,) * pad + sp, (t.stride(0), t.stride(1)) + (0,) * pad + st
    try:
        v = t.view(t.shape[0], t.shape[1], -1, sp[-2], sp[-1])
    except RuntimeError:
        return None
    return tuple(v.shape[2:]), tuple(v.stride())


def _in_canonical(t: torch.Tensor):
    """An input as (tensor, sizes, strides), copied once when its spatial dims cannot be merged."""
    c = canonical(t)
    if c is None:
        t = t.contiguous()
        c = canonical(t)
    return t, c[0], c[1]


def supports_layout(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> Optional[str]:
    if x.dim() > 5 and (scale is not None or shift is not None):
        return "scale/shift with more than 3 spatial dims (the kernels map at most 3; use the torch backend)"
    return None


def _tiles(C: int, D2: int, stride_c: int, stride_w: int, heavy: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_W, num_warps): the long axis of the tile follows the unit stride. ``heavy`` kernels (those
    that gather scale/shift per element, and the backward ones) get half the tile: each element then holds several
    live 64-bit addresses and fp32 temporaries, and 16 elements per thread run out of registers (ptxas -v, sm_90)."""
    elems = TILE // 2 if heavy else TILE
    if stride_c == 1 and stride_w != 1:  # channels-last: a row of positions holds C contiguous channels
        block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C, elems)
        block_w = max(1, min(triton.next_power_of_2(D2), elems // block_c))
    else:
        block_w = min(triton.next_power_of_2(D2), MAX_BLOCK_W, elems)
        block_c = max(1, min(triton.next_power_of_2(C), elems // block_w))
    return block_c, block_w, (8 if block_c * block_w >= 2048 else 4)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 16 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: programs run one after another; fewer, longer programs keep partials few


def _rows_per_prog(n_rows: int, n_wb: int, n_cb: int, batch: int, device: torch.device) -> int:
    tiles = n_rows * n_wb * n_cb * batch
    return max(1, min(n_rows, triton.cdiv(tiles, _target_programs(device))))


class _Mod:
    """Kernel arguments for scale/shift: pointers, strides, the nearest map (FT, FH, FW, FIRST), source sizes."""

    def __init__(self, x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]):
        plan = reference.plan_for(x, scale, shift)
        mod = scale if scale is not None else shift
        if plan is None:
            self.factors, self.first, self.src = (1, 1, 1), False, None
        else:
            plan = ((1, False),) * (3 - len(plan)) + tuple(plan)
            self.factors = tuple(f for f, _ in plan)
            self.first = plan[0][1]
            self.src = canonical(mod)[0]
        self.scale_strides = canonical(scale)[1] if scale is not None else (0,) * 5
        self.shift_strides = canonical(shift)[1] if shift is not None else (0,) * 5
        # The shift offsets may reuse the scale's (also when there is no shift: they are never read).
        self.shift_like_scale = shift is None or (scale is not None and self.shift_strides == self.scale_strides)


def _off64(C: int, D2: int, *strides) -> bool:
    """Whether an in-row offset (channel * stride_c + column * stride_2) of any of these tensors can pass 2**31."""
    return any((C - 1) * abs(st[1]) + (D2 - 1) * abs(st[4]) >= 2**31 for st in strides)


def forward(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            eps: float, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C = x.shape[:2]
    G = num_groups
    mod = _Mod(x, scale, shift)
    y = torch.empty_like(x)
    xk, (D0, D1, D2), sx = _in_canonical(x)
    yc = canonical(y)
    y_out = y if yc is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sy = canonical(y_out)[1]
    block_c, block_w, warps = _tiles(C, D2, sx[1], sx[4])
    n_rows, n_wb, n_cb = D0 * D1, triton.cdiv(D2, block_w), triton.cdiv(C, block_c)
    rpp = _rows_per_prog(n_rows, n_wb, n_cb, B, x.device)
    n_p = n_wb * triton.cdiv(n_rows, rpp)
    grid = (n_p, n_cb, B)
    pmean = torch.empty((B, C, n_p), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    off64 = _off64(C, D2, sx, sy, mod.scale_strides, mod.shift_strides)
    _stats_kernel[grid](xk, pmean, pm2, C, D1, D2, n_rows, rpp, n_p, *sx,
                        OFF64=off64, BLOCK_C=block_c, BLOCK_W=block_w, num_warps=warps)
    mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    cpg = C // G
    block_p = min(1024, triton.next_power_of_2(cpg * n_p))
    _stats_finalize_kernel[(B * G,)](pmean, pm2, mean, rstd, C, G, cpg, D2, n_rows, rpp, n_p, eps,
                                     BLOCK_W=block_w, BLOCK_P=block_p, num_warps=4)
    has_mod = scale is not None or shift is not None
    block_c, block_w, warps = _tiles(C, D2, sx[1], sx[4], heavy=has_mod)
    n_wb, n_cb = triton.cdiv(D2, block_w), triton.cdiv(C, block_c)
    rpp = _rows_per_prog(n_rows, n_wb, n_cb, B, x.device)
    dummy = mean
    _apply_kernel[(n_wb * triton.cdiv(n_rows, rpp), n_cb, B)](
        xk, y_out, weight if weight is not None else dummy, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, mean, rstd,
        C, G, cpg, D1, D2, n_rows, rpp, *sx, *sy, *mod.scale_strides, *mod.shift_strides, *mod.factors,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        SILU=bool(silu), FIRST=mod.first, LIKE_X=tuple(sy) == tuple(sx), SHIFT_LIKE_SCALE=mod.shift_like_scale,
        OFF64=off64, BLOCK_C=block_c, BLOCK_W=block_w, num_warps=warps)
    if y_out is not y:
        y.copy_(y_out)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, silu: bool):
    B, C = x.shape[:2]
    G = num_groups
    cpg = C // G
    mod = _Mod(x, scale, shift)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    xk, (D0, D1, D2), sx = _in_canonical(x)
    dyk, _, sd = _in_canonical(dy)
    dx = torch.empty_like(x)
    dx_out = dx if canonical(dx) is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    so = canonical(dx_out)[1]
    dscale = torch.empty_like(scale) if scale is not None else None
    dshift = torch.empty_like(shift) if shift is not None else None
    ds = canonical(dscale)[1] if dscale is not None else (0,) * 5
    dh = canonical(dshift)[1] if dshift is not None else (0,) * 5
    block_c, block_w, warps = _tiles(C, D2, sx[1], sx[4], heavy=True)
    n_rows, n_wb, n_cb = D0 * D1, triton.cdiv(D2, block_w), triton.cdiv(C, block_c)
    dummy = mean
    off64 = _off64(C, D2, sx, sd, so, mod.scale_strides, mod.shift_strides, ds, dh)
    has = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
               HAS_SHIFT=shift is not None, SILU=bool(silu), FIRST=mod.first, OFF64=off64)
    ptrs = (weight if weight is not None else dummy, bias if bias is not None else dummy,
            scale if scale is not None else dummy, shift if shift is not None else dummy, mean, rstd)

    # Pass 1, in source space: a program owns a block of source columns of one source row (with scale/shift), or
    # a whole-row tile of several rows (a virtual source grid) without.
    if mod.src is not None:
        (q0, q1, q2), (f0, f1, f2) = mod.src, mod.factors
    else:
        rpp_h = _rows_per_prog(D1, n_wb, n_cb, B * D0, x.device)
        (q0, q1, q2), (f0, f1, f2) = (D0, triton.cdiv(D1, rpp_h), D2), (1, rpp_h, 1)
    fwp = triton.next_power_of_2(f2)
    block_sw = max(1, min(triton.next_power_of_2(q2), block_w // fwp))
    n_p = q0 * q1 * triton.cdiv(q2, block_sw)
    pa = torch.empty((B, C, n_p), dtype=torch.float32, device=x.device)
    pb = torch.empty_like(pa)
    _bwd_reduce_kernel[(n_p, n_cb, B)](
        dyk, xk, *ptrs, dscale if dscale is not None else dummy, dshift if dshift is not None else dummy, pa, pb,
        C, G, cpg, D0, D1, D2, q1, q2, n_p, *sd, *sx, *mod.scale_strides, *mod.shift_strides, *ds, *dh,
        f0, f1, f2, **has, LIKE_X=tuple(sd) == tuple(sx), BLOCK_C=block_c, BLOCK_SW=block_sw, FWP=fwp,
        num_warps=warps)

    sa = torch.empty((B, C), dtype=torch.float32, device=x.device)
    sb = torch.empty_like(sa)
    m1 = torch.empty((B, G), dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(m1)
    _bwd_finalize_kernel[(B * G,)](pa, pb, ptrs[0], sa, sb, m1, m2, C, G, cpg, n_p, 1.0 / (cpg * D0 * D1 * D2),
                                   HAS_W=weight is not None, BLOCK_P=min(1024, triton.next_power_of_2(n_p)),
                                   num_warps=4)

    # Pass 2: dx.
    rpp = _rows_per_prog(n_rows, n_wb, n_cb, B, x.device)
    _bwd_dx_kernel[(n_wb * triton.cdiv(n_rows, rpp), n_cb, B)](
        dyk, xk, dx_out, *ptrs, m1, m2, C, G, cpg, D1, D2, n_rows, rpp, *sd, *sx, *so,
        *mod.scale_strides, *mod.shift_strides, *mod.factors, **has, LIKE_X=tuple(sd) == tuple(sx) == tuple(so),
        SHIFT_LIKE_SCALE=mod.shift_like_scale, BLOCK_C=block_c, BLOCK_W=block_w, num_warps=warps)
    if dx_out is not dx:
        dx.copy_(dx_out)
    dweight = sb.sum(0).to(weight.dtype) if weight is not None else None
    dbias = sa.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, dscale, dshift


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/ops/triton_aot.py): the launchers' tile shapes at the ST-VAE decoder sizes.


def aot_cases(arch: int, dt: str):
    """(name, kernel, arch, types, constexprs) for the kernel variants the launchers pick at ST-VAE shapes: every
    layout and flag combination for the production target (sm_90, bf16), the channels-last decoder variant
    elsewhere. Unit strides are constexpr 1, as Triton specializes them at run time."""
    ptrs = {n: f"*{dt}" for n in ("X", "Y", "DY", "DX", "SCALE", "SHIFT", "DSCALE", "DSHIFT")}
    f32 = {n: "*fp32" for n in ("PMEAN", "PM2", "MEAN", "RSTD", "PA", "PB", "SA", "SB", "M1", "M2")}
    types = {**ptrs, **f32, "W": f"*{dt}", "BIAS": f"*{dt}", "eps": "fp32", "inv_n": "fp32",
             "sxb": "i64", "syb": "i64", "sdb": "i64", "sob": "i64"}
    full = arch == 90 and dt == "bf16"
    # name: (C, D2, unit-stride axis) at the decoder's C=128 x 512^2 and C=512 x 64^2 stages.
    layouts = {"cl": (128, 512, "c"), "ncdhw": (128, 512, "w"), "cl64": (512, 64, "c"), "ncdhw64": (512, 64, "w")}
    variants = ((True, True, True), (False, False, True), (True, False, False))
    for lname, (C, D2, unit) in (layouts.items() if full else [("cl", layouts["cl"])]):
        strides = (1 if unit == "c" else C * D2, C if unit == "c" else 1)
        light, heavy = _tiles(C, D2, *strides), _tiles(C, D2, *strides, heavy=True)
        units = ("sxc", "syc", "sdc", "soc") if unit == "c" else ("sx2", "sy2", "sd2", "so2")
        tag = f"sm{arch}-{dt}-{lname}"

        def case(kernel, name, tiles, units=units, **const):
            const.update({u: 1 for u in units if u in kernel.arg_names})
            block_c, block_w, warps = tiles
            if kernel is _bwd_reduce_kernel:
                const.update(BLOCK_SW=max(1, block_w // const["FWP"]))
            elif kernel is not _bwd_finalize_kernel:
                const.update(BLOCK_W=block_w)
            if "BLOCK_C" in kernel.arg_names:
                const.update(BLOCK_C=block_c)
            return name, kernel, arch, types, dict(const, num_warps=const.get("num_warps", warps))

        yield case(_stats_kernel, f"group_norm_silu_stats-{tag}", light, OFF64=False)
        yield case(_stats_finalize_kernel, f"group_norm_silu_finalize-{tag}", light, BLOCK_P=1024, num_warps=4)
        yield case(_bwd_finalize_kernel, f"group_norm_silu_bwd_finalize-{tag}", light, HAS_W=True, BLOCK_P=1024,
                   num_warps=4)
        for has_mod, first, silu in (variants if full else variants[:1]):
            flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=has_mod, HAS_SHIFT=has_mod, SILU=silu, FIRST=first,
                         LIKE_X=True, OFF64=False)
            vtag = f"{tag}-mod{int(has_mod)}-first{int(first)}-silu{int(silu)}"
            yield case(_apply_kernel, f"group_norm_silu_apply-{vtag}", heavy if has_mod else light, **flags,
                       SHIFT_LIKE_SCALE=True)
            yield case(_bwd_dx_kernel, f"group_norm_silu_bwd_dx-{vtag}", heavy, **flags, SHIFT_LIKE_SCALE=True)
            # FWP: the latent W factor 8, or the virtual grid's whole rows.
            yield case(_bwd_reduce_kernel, f"group_norm_silu_bwd_reduce-{vtag}", heavy, **flags,
                       FWP=8 if has_mod else 1)
        if full and lname == "cl":  # the general-stride paths: other layouts for y/dy/dx and shift, 64-bit offsets
            flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True, FIRST=True, LIKE_X=False,
                         OFF64=True)
            yield case(_stats_kernel, f"group_norm_silu_stats-{tag}-off64", light, OFF64=True)
            for kernel, kname in ((_apply_kernel, "apply"), (_bwd_dx_kernel, "bwd_dx")):
                yield case(kernel, f"group_norm_silu_{kname}-{tag}-strided-off64", heavy, **flags,
                           SHIFT_LIKE_SCALE=False)
            yield case(_bwd_reduce_kernel, f"group_norm_silu_bwd_reduce-{tag}-strided-off64", heavy, **flags, FWP=8)
