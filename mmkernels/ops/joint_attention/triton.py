"""Joint attention Triton kernels: the ``triton`` backend. Semantics: see reference.py.

Forward (per call: 2S + S' + S launches, where S' counts streams with full-width q-norm):

1. ``_qk_prep_kernel`` per stream writes k~ = RoPE(RMSNorm(k)) and v into joint head-major buffers
   [B, Hkv, Ltot, D] (K and V are 1/g of Q's size, so this pass is small, and every KV tile the attention loop
   reads is then a contiguous [BLOCK_N, D] slab that never straddles a stream boundary).
2. With ``norm="full"`` the q-side RMS spans all Hq heads of a token, which no single attention program sees, so the
   same kernel computes only the per-token rstd of q ([B, L_s] fp32, 4 bytes per token).
3. ``_attn_fwd_kernel`` per stream: a program owns BLOCK_M queries of one (batch, query head). Its prologue loads
   the raw q tile straight from the stream's projection output, applies the norm (rstd from step 2, or the
   per-head RMS computed in place), the weight and the rotation, and rounds once to the input dtype; then the
   usual online-softmax loop (exp2, fp32 accumulators) runs over the joint K/V. Outputs go straight into the
   stream's own [B, L_s, Hq*D] tensor; the natural-log LSE [B, Hq, Ltot] is kept for the backward.

Head dims that are not a power of two run as two MMA parts, D = DA + DB with DA the largest power of two <= D and
DB the next power of two >= D - DA (at least 16, the MMA minimum): 72 = 64 + 16 (8 masked), 80 = 64 + 16,
96 = 64 + 32. So D=72 costs 80 columns of MMA work, not 128.

Backward (FA2 scheme, no atomics, so every run gives the same bits; ``deterministic`` needs nothing more):

1. q~ (recomputed by the prep kernel) and dO go into joint head-major buffers; ``_bwd_delta_kernel`` also forms
   delta = rowsum(dO * O).
2. ``_attn_bwd_dkdv_kernel``: a program owns BLOCK_N keys of one KV head and loops over the g query heads of its
   group and all query blocks, accumulating dk~ and dv in registers. ``_attn_bwd_dq_kernel``: a program owns
   BLOCK_M queries of one head and loops over all keys. Both write fp32 joint buffers.
3. ``_qk_grad_kernel`` per stream folds the chain back: inverse rotation, then the RMSNorm backward (the full-width
   RMS couples all heads of a token, so this cannot live in the per-head MMA epilogues), writing dq/dk in the input
   dtype plus per-program fp32 dW partials (summed in a fixed order). For v it only converts dv.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmkernels._backend import triton_interpreted
from mmkernels.ops.rope3d.reference import inv_freq_on

NORM_CODES = {"none": 0, "full": 1, "head": 2}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


def head_dim_parts(D: int) -> tuple[int, int]:
    """(DA, DB): the two MMA widths D runs as (DB = 0 when D is a power of two)."""
    da = 1 << (D.bit_length() - 1)
    rest = D - da
    db = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return da, db


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: the rotate-half column map, the token coordinates, and the fused norm + rotation of a tile.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rope_cols(d, D: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr):
    """For head-dim columns ``d``: partner column, rotation sign, inverse-frequency index and axis (0 t, 1 h, 2 w).

    Chunks are [0, 2PT) -> t, [2PT, 2PT+2PH) -> h, the rest -> w; in a chunk of half-size n, column i < n pairs
    with i + n: out_i = x_i cos - x_{i+n} sin, out_{i+n} = x_{i+n} cos + x_i sin.
    """
    PW: tl.constexpr = D // 2 - PT - PH
    c_h = 2 * PT
    c_w = 2 * PT + 2 * PH
    in_t = d < c_h
    in_h = (d >= c_h) & (d < c_w)
    start = tl.where(in_t, 0, tl.where(in_h, c_h, c_w))
    half = tl.where(in_t, PT, tl.where(in_h, PH, PW))
    r = d - start
    first = r < half
    partner = tl.where(first, d + half, d - half)
    sign = tl.where(first, -1.0, 1.0)
    pair = start // 2 + tl.where(first, r, r - half)
    axis = tl.where(in_t, 0, tl.where(in_h, 1, 2))
    return partner, sign, pair, axis


@triton.jit
def _theta(pos, axis, freq, grid_h, grid_w, off_t, off_h, off_w):
    """[M, C] fp32 angles for joint positions ``pos`` [M] and columns with ``axis``/``freq`` [C]."""
    ct = pos // (grid_h * grid_w) + off_t
    ch = (pos // grid_w) % grid_h + off_h
    cw = pos % grid_w + off_w
    coord = tl.where(axis[None, :] == 0, ct[:, None], tl.where(axis[None, :] == 1, ch[:, None], cw[:, None]))
    return coord.to(tl.float32) * freq[None, :]


@triton.jit
def _q_tile(rows, ok, pos, r, W, w_off, INV_FREQ, sxc, d, grid_h, grid_w, off_t, off_h, off_w,
            D: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    """fp32 [M, C] tile of RoPE(x * r * w) for row pointers ``rows`` [M] (pointing at this head's column 0) and
    head-dim columns ``d`` [C]; ``r`` is the [M, 1] rstd (unused when NORM == 0), ``w_off`` the weight's offset."""
    d_ok = d < D
    mask = ok[:, None] & d_ok[None, :]
    x = tl.load(rows[:, None] + d[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        w = tl.load(W + w_off + d, mask=d_ok, other=0.0).to(tl.float32)
        x = x * r * w[None, :]
    if ROPE:
        partner, sign, pair, axis = _rope_cols(d, D, PT, PH)
        xp = tl.load(rows[:, None] + partner[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        if NORM != 0:
            wp = tl.load(W + w_off + partner, mask=d_ok, other=0.0).to(tl.float32)
            xp = xp * r * wp[None, :]
        freq = tl.load(INV_FREQ + pair, mask=d_ok, other=0.0)
        theta = _theta(pos, axis, freq, grid_h, grid_w, off_t, off_h, off_w)
        x = x * tl.cos(theta) + sign[None, :] * xp * tl.sin(theta)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Per-token passes: norm + rotation into joint buffers (forward), and the chain rule back (backward).
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _qk_prep_kernel(X, W, INV_FREQ, Y, RSTD, L, tok_off, eps,
                    sxb, sxl, sxc, syb, syh,
                    grid_h, grid_w, off_t, off_h, off_w,
                    H: tl.constexpr, D: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr,
                    NORM: tl.constexpr, ROPE: tl.constexpr, WRITE_Y: tl.constexpr, WRITE_RSTD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[b, h, tok_off + t, :] = RoPE(RMSNorm(x[b, t, h*D:(h+1)*D])) for a [BLOCK_T, heads, D] tile of tokens
    (the whole tile is in flight at once); optionally only the per-token rstd (norm "full")."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    t3 = t[:, None, None]
    h3 = h[None, :, None]
    d3 = d[None, None, :]
    mask = (t3 < L) & (h3 < H) & (d3 < D)
    col = h3 * D + d3
    rows = X + b * sxb + t3.to(tl.int64) * sxl
    x = tl.load(rows + col * sxc, mask=mask, other=0.0).to(tl.float32)
    if NORM == 1:
        r = tl.rsqrt(tl.sum(tl.sum(x * x, 2), 1) / (H * D) + eps)
        if WRITE_RSTD:
            tl.store(RSTD + b * L + t, r, mask=t < L)
        r3 = r[:, None, None]
    elif NORM == 2:
        r3 = tl.rsqrt(tl.sum(x * x, 2) / D + eps)[:, :, None]
    if WRITE_Y:
        if NORM == 1:
            w_col = col
        else:
            w_col = d3 + 0 * h3
        if NORM != 0:
            x = x * r3 * tl.load(W + w_col, mask=(h3 < H) & (d3 < D), other=0.0).to(tl.float32)
        if ROPE:
            partner, sign, pair, axis = _rope_cols(d, D, PT, PH)
            p3 = partner[None, None, :]
            xp = tl.load(rows + (h3 * D + p3) * sxc, mask=mask, other=0.0).to(tl.float32)
            if NORM != 0:
                if NORM == 1:
                    wp_col = h3 * D + p3
                else:
                    wp_col = p3 + 0 * h3
                xp = xp * r3 * tl.load(W + wp_col, mask=(h3 < H) & (d3 < D), other=0.0).to(tl.float32)
            freq = tl.load(INV_FREQ + pair, mask=d < D, other=0.0)
            theta = _theta(tok_off + t, axis, freq, grid_h, grid_w, off_t, off_h, off_w)[:, None, :]
            x = x * tl.cos(theta) + sign[None, None, :] * xp * tl.sin(theta)
        # Joint buffers are contiguous: the token stride is the constexpr D (72 as a runtime int would block
        # vector stores, being no multiple of 16).
        dst = Y + b * syb + h3.to(tl.int64) * syh + (tok_off + t3).to(tl.int64) * D + d3
        tl.store(dst, x.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _qk_grad_kernel(G, X, W, INV_FREQ, DX, DWP, L, tok_off, eps, blocks_per_prog,
                    sgb, sgh, sxb, sxl, sxc,
                    grid_h, grid_w, off_t, off_h, off_w,
                    H: tl.constexpr, D: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr,
                    NORM: tl.constexpr, ROPE: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx for y = RoPE(RMSNorm(x)) from g = dL/dy (joint layout), [BLOCK_T, heads, D] tiles at a time, and this
    program's dW partial sums (fixed order: reproducible)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h3 = h[None, :, None]
    d3 = d[None, None, :]
    hd_ok = (h3 < H) & (d3 < D)
    col = h3 * D + d3
    if NORM == 1:
        w_col = col
    else:
        w_col = d3 + 0 * h3
    if NORM != 0:
        w = tl.load(W + w_col, mask=hd_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    if ROPE:
        partner, sign, pair, axis = _rope_cols(d, D, PT, PH)
        freq = tl.load(INV_FREQ + pair, mask=d < D, other=0.0)
    g_base = G + b.to(tl.int64) * sgb + h3.to(tl.int64) * sgh
    for i in range(blocks_per_prog):
        t = (pid * blocks_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        t3 = t[:, None, None]
        mask = (t3 < L) & hd_ok
        g_rows = g_base + (tok_off + t3).to(tl.int64) * D  # contiguous joint buffer (see the prep kernel)
        u = tl.load(g_rows + d3, mask=mask, other=0.0).to(tl.float32)
        if ROPE:  # the inverse rotation
            gp = tl.load(g_rows + partner[None, None, :], mask=mask, other=0.0).to(tl.float32)
            theta = _theta(tok_off + t, axis, freq, grid_h, grid_w, off_t, off_h, off_w)[:, None, :]
            u = u * tl.cos(theta) - sign[None, None, :] * gp * tl.sin(theta)
        if NORM != 0:
            x = tl.load(X + b.to(tl.int64) * sxb + t3.to(tl.int64) * sxl + col * sxc, mask=mask,
                        other=0.0).to(tl.float32)
            if NORM == 1:
                r3 = tl.rsqrt(tl.sum(tl.sum(x * x, 2), 1) / (H * D) + eps)[:, None, None]
            else:
                r3 = tl.rsqrt(tl.sum(x * x, 2) / D + eps)[:, :, None]
            n = tl.where(mask, x * r3, 0.0)  # padded slots: rsqrt(0 + eps) is inf when eps == 0
            dw += tl.sum(u * n, 0)
            dn = u * w
            if NORM == 1:
                u = r3 * (dn - n * (tl.sum(tl.sum(dn * n, 2), 1) / (H * D))[:, None, None])
            else:
                u = r3 * (dn - n * (tl.sum(dn * n, 2) / D)[:, :, None])
        dst = DX + (b.to(tl.int64) * L + t3) * (H * D) + col
        tl.store(dst, u.to(DX.dtype.element_ty), mask=mask)
    lin = (b * tl.num_programs(0) + pid).to(tl.int64)
    if NORM == 1:
        tl.store(DWP + lin * (H * D) + h[:, None] * D + d[None, :], dw, mask=(h[:, None] < H) & (d[None, :] < D))
    elif NORM == 2:
        tl.store(DWP + lin * D + d, tl.sum(dw, 0), mask=d < D)


# ---------------------------------------------------------------------------------------------------------------
# Attention forward.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(qA, qB, accA, accB, m_i, l_i, k_base, v_base, start_n, Ltot, qk_scale,
              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, PREC: tl.constexpr):
    n = start_n + tl.arange(0, BLOCK_N)
    dA = tl.arange(0, DA)
    n_ok = n < Ltot
    if MASK:
        kA = tl.load(k_base + n[None, :] * D + dA[:, None], mask=n_ok[None, :], other=0.0)
    else:
        kA = tl.load(k_base + n[None, :] * D + dA[:, None])
    s = tl.dot(qA, kA, input_precision=PREC)
    if DB > 0:
        dB = DA + tl.arange(0, DB)
        if MASK:
            kB = tl.load(k_base + n[None, :] * D + dB[:, None], mask=(dB < D)[:, None] & n_ok[None, :], other=0.0)
        else:
            kB = tl.load(k_base + n[None, :] * D + dB[:, None], mask=(dB < D)[:, None], other=0.0)
        s = tl.dot(qB, kB, s, input_precision=PREC)
    if MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    # Scores stay unscaled: the scale folds into the max and into one FMA per score (exp2 domain).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = p.to(v_base.dtype.element_ty)
    if MASK:
        vA = tl.load(v_base + n[:, None] * D + dA[None, :], mask=n_ok[:, None], other=0.0)
    else:
        vA = tl.load(v_base + n[:, None] * D + dA[None, :])
    accA = tl.dot(pv, vA, accA * alpha[:, None], input_precision=PREC)
    if DB > 0:
        if MASK:
            vB = tl.load(v_base + n[:, None] * D + dB[None, :], mask=n_ok[:, None] & (dB < D)[None, :], other=0.0)
        else:
            vB = tl.load(v_base + n[:, None] * D + dB[None, :], mask=(dB < D)[None, :], other=0.0)
        accB = tl.dot(pv, vB, accB * alpha[:, None], input_precision=PREC)
    return accA, accB, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, QW, QRSTD, INV_FREQ, K, V, O, LSE,
                     L, Ltot, tok_off, Hq, group, qk_scale, eps,
                     sqb, sql, sqc, grid_h, grid_w, off_t, off_h, off_w,
                     D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr,
                     NORM: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hk = hq // group
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < L
    pos = tok_off + m
    rows = Q + b.to(tl.int64) * sqb + m.to(tl.int64) * sql + (hq * D) * sqc
    dA = tl.arange(0, DA)

    # Prologue: this tile's q~ (norm, weight, rotation in fp32, one rounding).
    if NORM == 1:
        r = tl.load(QRSTD + b * L + m, mask=m_ok, other=0.0)[:, None]
        w_off = hq * D
    elif NORM == 2:
        xa = tl.load(rows[:, None] + dA[None, :] * sqc, mask=m_ok[:, None], other=0.0).to(tl.float32)
        ss = tl.sum(xa * xa, 1)
        if DB > 0:
            dB0 = DA + tl.arange(0, DB)
            xb = tl.load(rows[:, None] + dB0[None, :] * sqc, mask=m_ok[:, None] & (dB0 < D)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xb * xb, 1)
        r = tl.rsqrt(ss / D + eps)[:, None]
        w_off = 0
    else:
        r = 1.0
        w_off = 0
    in_ty = K.dtype.element_ty
    qA = _q_tile(rows, m_ok, pos, r, QW, w_off, INV_FREQ, sqc, dA, grid_h, grid_w, off_t, off_h, off_w,
                 D, PT, PH, NORM, ROPE).to(in_ty)
    accA = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        dB = DA + tl.arange(0, DB)
        qB = _q_tile(rows, m_ok, pos, r, QW, w_off, INV_FREQ, sqc, dB, grid_h, grid_w, off_t, off_h, off_w,
                     D, PT, PH, NORM, ROPE).to(in_ty)
        accB = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    else:
        qB = qA
        accB = accA
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    kv_off = (b * (Hq // group) + hk).to(tl.int64) * Ltot * D
    k_base = K + kv_off
    v_base = V + kv_off
    n_full = (Ltot // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        accA, accB, m_i, l_i = _fwd_step(qA, qB, accA, accB, m_i, l_i, k_base, v_base, start_n, Ltot, qk_scale,
                                         D, DA, DB, BLOCK_N, False, PREC)
    if n_full < Ltot:
        accA, accB, m_i, l_i = _fwd_step(qA, qB, accA, accB, m_i, l_i, k_base, v_base, n_full, Ltot, qk_scale,
                                         D, DA, DB, BLOCK_N, True, PREC)

    # Epilogue: normalize, store into the stream's own output, keep the natural-log LSE.
    inv_l = 1.0 / l_i
    o_rows = O + (b.to(tl.int64) * L + m) * (Hq * D) + hq * D
    out_ty = O.dtype.element_ty
    tl.store(o_rows[:, None] + dA[None, :], (accA * inv_l[:, None]).to(out_ty), mask=m_ok[:, None])
    if DB > 0:
        tl.store(o_rows[:, None] + dB[None, :], (accB * inv_l[:, None]).to(out_ty),
                 mask=m_ok[:, None] & (dB < D)[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * Ltot + pos, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------------------------
# Attention backward.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(DO, O, DOJ, DELTA, L, Ltot, tok_off, Hq, sdb, sdl, sdc,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) per (b, head, token), and dO copied into the joint head-major buffer."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (m < L)[:, None] & (d < D)[None, :]
    do = tl.load(DO + b.to(tl.int64) * sdb + m[:, None].to(tl.int64) * sdl + (hq * D + d[None, :]) * sdc,
                 mask=mask, other=0.0).to(tl.float32)
    o = tl.load(O + (b.to(tl.int64) * L + m[:, None]) * (Hq * D) + hq * D + d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    j = pid_bh.to(tl.int64) * Ltot + tok_off + m
    tl.store(DELTA + j, tl.sum(do * o, 1), mask=m < L)
    tl.store(DOJ + j[:, None] * D + d[None, :], do.to(DOJ.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dkdv_kernel(QJ, KJ, VJ, DOJ, LSE, DELTA, DKJ, DVJ, Ltot, Hq, group, qk_scale, sm_scale,
                          D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = Hq // group
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Ltot
    dA = tl.arange(0, DA)
    kv_rows = pid_bh.to(tl.int64) * Ltot + n
    kA = tl.load(KJ + kv_rows[:, None] * D + dA[None, :], mask=n_ok[:, None], other=0.0)
    vA = tl.load(VJ + kv_rows[:, None] * D + dA[None, :], mask=n_ok[:, None], other=0.0)
    dkA = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dvA = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    if DB > 0:
        dB = DA + tl.arange(0, DB)
        maskB = n_ok[:, None] & (dB < D)[None, :]
        kB = tl.load(KJ + kv_rows[:, None] * D + dB[None, :], mask=maskB, other=0.0)
        vB = tl.load(VJ + kv_rows[:, None] * D + dB[None, :], mask=maskB, other=0.0)
        dkB = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
        dvB = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    in_ty = KJ.dtype.element_ty
    for g in range(group):
        q_head = (b * Hq + hk * group + g).to(tl.int64) * Ltot
        for start_m in range(0, Ltot, BLOCK_M):
            m = start_m + tl.arange(0, BLOCK_M)
            m_ok = m < Ltot
            rows = q_head + m
            qAT = tl.load(QJ + rows[None, :] * D + dA[:, None], mask=m_ok[None, :], other=0.0)
            sT = tl.dot(kA, qAT, input_precision=PREC)
            if DB > 0:
                qBT = tl.load(QJ + rows[None, :] * D + dB[:, None], mask=m_ok[None, :] & (dB < D)[:, None],
                              other=0.0)
                sT = tl.dot(kB, qBT, sT, input_precision=PREC)
            lse = tl.load(LSE + rows, mask=m_ok, other=float("inf")) * 1.4426950408889634
            pT = tl.math.exp2(sT * qk_scale - lse[None, :])
            doA = tl.load(DOJ + rows[:, None] * D + dA[None, :], mask=m_ok[:, None], other=0.0)
            pTc = pT.to(in_ty)
            dvA = tl.dot(pTc, doA, dvA, input_precision=PREC)
            dpT = tl.dot(vA, tl.trans(doA), input_precision=PREC)
            if DB > 0:
                doB = tl.load(DOJ + rows[:, None] * D + dB[None, :], mask=m_ok[:, None] & (dB < D)[None, :],
                              other=0.0)
                dvB = tl.dot(pTc, doB, dvB, input_precision=PREC)
                dpT = tl.dot(vB, tl.trans(doB), dpT, input_precision=PREC)
            delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
            dsT = (pT * (dpT - delta[None, :])).to(in_ty)
            dkA = tl.dot(dsT, tl.trans(qAT), dkA, input_precision=PREC)
            if DB > 0:
                dkB = tl.dot(dsT, tl.trans(qBT), dkB, input_precision=PREC)
    tl.store(DKJ + kv_rows[:, None] * D + dA[None, :], dkA * sm_scale, mask=n_ok[:, None])
    tl.store(DVJ + kv_rows[:, None] * D + dA[None, :], dvA, mask=n_ok[:, None])
    if DB > 0:
        tl.store(DKJ + kv_rows[:, None] * D + dB[None, :], dkB * sm_scale, mask=maskB)
        tl.store(DVJ + kv_rows[:, None] * D + dB[None, :], dvB, mask=maskB)


@triton.jit
def _attn_bwd_dq_kernel(QJ, KJ, VJ, DOJ, LSE, DELTA, DQJ, Ltot, Hq, group, qk_scale, sm_scale,
                        D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hk = (pid_bh % Hq) // group
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < Ltot
    rows = pid_bh.to(tl.int64) * Ltot + m
    dA = tl.arange(0, DA)
    qA = tl.load(QJ + rows[:, None] * D + dA[None, :], mask=m_ok[:, None], other=0.0)
    doA = tl.load(DOJ + rows[:, None] * D + dA[None, :], mask=m_ok[:, None], other=0.0)
    dqA = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        dB = DA + tl.arange(0, DB)
        maskB = m_ok[:, None] & (dB < D)[None, :]
        qB = tl.load(QJ + rows[:, None] * D + dB[None, :], mask=maskB, other=0.0)
        doB = tl.load(DOJ + rows[:, None] * D + dB[None, :], mask=maskB, other=0.0)
        dqB = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    lse = tl.load(LSE + rows, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
    kv_head = (b * (Hq // group) + hk).to(tl.int64) * Ltot
    in_ty = KJ.dtype.element_ty
    for start_n in range(0, Ltot, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < Ltot
        kv_rows = kv_head + n
        kAT = tl.load(KJ + kv_rows[None, :] * D + dA[:, None], mask=n_ok[None, :], other=0.0)
        vAT = tl.load(VJ + kv_rows[None, :] * D + dA[:, None], mask=n_ok[None, :], other=0.0)
        s = tl.dot(qA, kAT, input_precision=PREC)
        dp = tl.dot(doA, vAT, input_precision=PREC)
        if DB > 0:
            maskBT = (dB < D)[:, None] & n_ok[None, :]
            kBT = tl.load(KJ + kv_rows[None, :] * D + dB[:, None], mask=maskBT, other=0.0)
            vBT = tl.load(VJ + kv_rows[None, :] * D + dB[:, None], mask=maskBT, other=0.0)
            s = tl.dot(qB, kBT, s, input_precision=PREC)
            dp = tl.dot(doB, vBT, dp, input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(in_ty)
        dqA = tl.dot(ds, tl.trans(kAT), dqA, input_precision=PREC)
        if DB > 0:
            dqB = tl.dot(ds, tl.trans(kBT), dqB, input_precision=PREC)
    tl.store(DQJ + rows[:, None] * D + dA[None, :], dqA * sm_scale, mask=m_ok[:, None])
    if DB > 0:
        tl.store(DQJ + rows[:, None] * D + dB[None, :], dqB * sm_scale, mask=maskB)


# ---------------------------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------------------------

def _env_ints(name: str, count: int):
    """Block-size override from the environment (a tuning knob for GPU sessions), validated."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        ints = tuple(int(v) for v in value.split(","))
    except ValueError:
        ints = ()
    if len(ints) != count or any(v < 1 for v in ints):
        raise ValueError(f"environment variable {name} must hold {count} positive comma-separated ints, got {value!r}")
    return ints


def _fwd_blocks(dtype: torch.dtype, D: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward; MMKERNELS_JA_FWD="128,64,8,3" overrides on GPU.
    Head dims above 128 and fp32 take smaller tiles so that the K/V stages fit in shared memory."""
    if triton_interpreted():
        return 16, 16, 4, 1
    env = _env_ints("MMKERNELS_JA_FWD", 4)
    if env:
        return env
    if dtype == torch.float32:
        return (64, 32, 4, 2) if D <= 128 else (32, 32, 4, 2)
    return (128, 64, 8, 3) if D <= 128 else (64, 32, 4, 2)


def _bwd_blocks(dtype: torch.dtype, D: int):
    """((BLOCK_M, BLOCK_N) of dK/dV, (BLOCK_M, BLOCK_N) of dQ, num_warps, num_stages);
    MMKERNELS_JA_BWD="32,128,128,32,8,2" overrides on GPU."""
    if triton_interpreted():
        return (16, 16), (16, 16), 4, 1
    env = _env_ints("MMKERNELS_JA_BWD", 6)
    if env:
        return (env[0], env[1]), (env[2], env[3]), env[4], env[5]
    if dtype == torch.float32:
        return ((16, 64), (64, 16), 4, 2) if D <= 128 else ((16, 32), (32, 16), 4, 1)
    return ((32, 128), (128, 32), 8, 2) if D <= 128 else ((16, 64), (64, 16), 4, 2)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _Geometry:
    """Sizes and RoPE/norm settings shared by every launch of one call."""

    def __init__(self, qs, num_heads, num_kv_heads, norm, rope, device):
        self.B = qs[0].shape[0]
        self.D = qs[0].shape[2] // num_heads
        self.Hq, self.Hkv = num_heads, num_kv_heads
        self.group = num_heads // num_kv_heads
        self.lens = [q.shape[1] for q in qs]
        self.offs = [sum(self.lens[:i]) for i in range(len(qs))]
        self.Ltot = sum(self.lens)
        self.norm = norm
        grid, split, base, offsets = rope
        self.rope = len(grid) > 0
        if self.rope:
            self.grid, self.split, self.offsets = tuple(grid), tuple(split), tuple(offsets)
            self.freq = inv_freq_on(self.split, float(base), device)
        else:
            self.grid, self.split, self.offsets = (1, 1, 1), (self.D, 0, 0), (0, 0, 0)
            self.freq = torch.zeros(1, dtype=torch.float32, device=device)
        self.DA, self.DB = head_dim_parts(self.D)

    def rope_args(self):
        return (self.grid[1], self.grid[2], *self.offsets)

    def rope_consts(self, rope: bool = True):
        return dict(PT=self.split[0] // 2, PH=self.split[1] // 2, ROPE=self.rope and rope)


def _token_block(heads: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps) of the per-token passes: about 4096 elements per tile, so a program
    keeps several tokens' loads in flight (these passes are bandwidth-bound)."""
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(D)
    block_t = 2 if triton_interpreted() else max(1, min(16, 4096 // (block_h * block_d)))
    warps = 4 if block_t * block_h * block_d <= 2048 else 8
    return block_t, block_h, block_d, warps


def _prep(geo: _Geometry, x, weight, heads, s, y=None, rstd=None, eps=0.0, norm="none", rope=True):
    """Launch _qk_prep_kernel for stream ``s``: y (joint [B, heads, Ltot, D]) and/or rstd ([B, L_s]).
    ``rope=False`` skips the rotation (v)."""
    L = x.shape[1]
    if L == 0:
        return
    write_y = y is not None
    dst = y if write_y else x
    code = NORM_CODES[norm] if weight is not None else 0
    block_t, block_h, block_d, warps = _token_block(heads, geo.D)
    consts = geo.rope_consts(rope and write_y)
    _qk_prep_kernel[(triton.cdiv(L, block_t), geo.B)](
        x, weight if weight is not None else x, geo.freq, dst, rstd if rstd is not None else geo.freq,
        L, geo.offs[s], eps, x.stride(0), x.stride(1), x.stride(2),
        *((y.stride(0), y.stride(1)) if write_y else (0, 0)), *geo.rope_args(),
        H=heads, D=geo.D, NORM=code, WRITE_Y=write_y, WRITE_RSTD=rstd is not None, BLOCK_T=block_t,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps, **consts)


def _grad(geo: _Geometry, g, x, weight, heads, s, eps, norm, rope=True):
    """Launch _qk_grad_kernel for stream ``s``: (dx [B, L_s, heads*D] in x's dtype, dW or None).
    ``rope=False`` skips the inverse rotation (v)."""
    L = x.shape[1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    code = NORM_CODES[norm] if weight is not None else 0
    if L == 0:
        return dx, (torch.zeros_like(weight) if weight is not None else None)
    block_t, block_h, block_d, warps = _token_block(heads, geo.D)
    blocks = triton.cdiv(L, block_t)
    if triton_interpreted():
        progs = min(blocks, 4)
    else:  # a few programs per SM; each reduces its own dW partial over its token blocks
        progs = min(blocks, max(1, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count // geo.B))
    per = triton.cdiv(blocks, progs)
    progs = triton.cdiv(blocks, per)
    width = weight.numel() if weight is not None else 1
    dwp = torch.empty(geo.B * progs, width, dtype=torch.float32, device=x.device)
    _qk_grad_kernel[(progs, geo.B)](
        g, x, weight if weight is not None else x, geo.freq, dx, dwp, L, geo.offs[s], eps, per,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), x.stride(2), *geo.rope_args(),
        H=heads, D=geo.D, NORM=code, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
        **geo.rope_consts(rope))
    dw = dwp.sum(0).to(weight.dtype) if weight is not None else None
    return dx, dw


def _q_norm_args(geo: _Geometry, q, q_norm, s: int, eps: float, norm: str):
    """(weight or None, norm code, rstd or None) for stream ``s``'s queries in the attention prologue. A full-width
    RMS spans all heads of a token, which no attention program sees, so one prep pass computes it ([B, L_s])."""
    w = q_norm[s] if len(q_norm) else None
    code = NORM_CODES[norm] if w is not None else 0
    rstd = None
    if code == 1:
        rstd = torch.empty(geo.B, q.shape[1], dtype=torch.float32, device=q.device)
        _prep(geo, q, w, geo.Hq, s, rstd=rstd, eps=eps, norm=norm)
    return w, code, rstd


def _joint_kv(geo: _Geometry, ks, vs, k_norm, eps, norm, dtype, device):
    kj = torch.empty(geo.B, geo.Hkv, geo.Ltot, geo.D, dtype=dtype, device=device)
    vj = torch.empty_like(kj)
    for s, (k, v) in enumerate(zip(ks, vs)):
        _prep(geo, k, k_norm[s] if len(k_norm) else None, geo.Hkv, s, y=kj, eps=eps, norm=norm)
        _prep(geo, v, None, geo.Hkv, s, y=vj, rope=False)
    return kj, vj


def forward(qs, ks, vs, q_norm, k_norm, eps, norm, rope, num_heads, num_kv_heads, scale, deterministic):
    """(list of [B, L_s, Hq*D] outputs, lse [B, Hq, Ltot] fp32)."""
    del deterministic  # the forward is deterministic
    q0 = qs[0]
    dtype, device = q0.dtype, q0.device
    geo = _Geometry(qs, num_heads, num_kv_heads, norm, rope, device)
    kj, vj = _joint_kv(geo, ks, vs, k_norm, eps, norm, dtype, device)
    lse = torch.empty(geo.B, geo.Hq, geo.Ltot, dtype=torch.float32, device=device)
    bm, bn, warps, stages = _fwd_blocks(dtype, geo.D)
    outs = []
    for s, q in enumerate(qs):
        L = q.shape[1]
        o = torch.empty(geo.B, L, geo.Hq * geo.D, dtype=dtype, device=device)
        outs.append(o)
        if L == 0:
            continue
        w, code, rstd = _q_norm_args(geo, q, q_norm, s, eps, norm)
        _attn_fwd_kernel[(triton.cdiv(L, bm), geo.B * geo.Hq)](
            q, w if w is not None else q, rstd if rstd is not None else lse, geo.freq, kj, vj, o, lse,
            L, geo.Ltot, geo.offs[s], geo.Hq, geo.group, scale * LOG2E, eps,
            q.stride(0), q.stride(1), q.stride(2), *geo.rope_args(),
            D=geo.D, DA=geo.DA, DB=geo.DB, NORM=code, PREC=_prec(dtype), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps, num_stages=stages, **geo.rope_consts())
    return outs, lse


def backward(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, rope, num_heads, num_kv_heads, scale,
             deterministic):
    """(dqs, dks, dvs, dq_norm, dk_norm); always bitwise reproducible (no atomics, fixed-order dW sums)."""
    del deterministic
    q0 = qs[0]
    dtype, device = q0.dtype, q0.device
    geo = _Geometry(qs, num_heads, num_kv_heads, norm, rope, device)
    B, Hq, Hkv, Ltot, D = geo.B, geo.Hq, geo.Hkv, geo.Ltot, geo.D
    kj, vj = _joint_kv(geo, ks, vs, k_norm, eps, norm, dtype, device)
    qj = torch.empty(B, Hq, Ltot, D, dtype=dtype, device=device)
    doj = torch.empty_like(qj)
    delta = torch.empty(B, Hq, Ltot, dtype=torch.float32, device=device)
    block_d = triton.next_power_of_2(D)
    bm_delta = 16 if triton_interpreted() else 64
    for s, (q, do, o) in enumerate(zip(qs, douts, outs)):
        _prep(geo, q, q_norm[s] if len(q_norm) else None, Hq, s, y=qj, eps=eps, norm=norm)
        L = q.shape[1]
        if L:
            _bwd_delta_kernel[(triton.cdiv(L, bm_delta), B * Hq)](
                do, o, doj, delta, L, Ltot, geo.offs[s], Hq, do.stride(0), do.stride(1), do.stride(2),
                D=D, BLOCK_M=bm_delta, BLOCK_D=block_d, num_warps=4)

    (bm1, bn1), (bm2, bn2), warps, stages = _bwd_blocks(dtype, D)
    dkj = torch.empty(B, Hkv, Ltot, D, dtype=torch.float32, device=device)
    dvj = torch.empty_like(dkj)
    dqj = torch.empty(B, Hq, Ltot, D, dtype=torch.float32, device=device)
    common = dict(D=D, DA=geo.DA, DB=geo.DB, PREC=_prec(dtype), num_warps=warps, num_stages=stages)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Ltot, bn1), B * Hkv)](
        qj, kj, vj, doj, lse, delta, dkj, dvj, Ltot, Hq, geo.group, scale * LOG2E, scale,
        BLOCK_M=bm1, BLOCK_N=bn1, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(Ltot, bm2), B * Hq)](
        qj, kj, vj, doj, lse, delta, dqj, Ltot, Hq, geo.group, scale * LOG2E, scale,
        BLOCK_M=bm2, BLOCK_N=bn2, **common)

    dqs, dks, dvs, dqw, dkw = [], [], [], [], []
    for s in range(len(qs)):
        wq = q_norm[s] if len(q_norm) else None
        wk = k_norm[s] if len(k_norm) else None
        dq, gwq = _grad(geo, dqj, qs[s], wq, Hq, s, eps, norm)
        dk, gwk = _grad(geo, dkj, ks[s], wk, Hkv, s, eps, norm)
        dv, _ = _grad(geo, dvj, vs[s], None, Hkv, s, eps, norm, rope=False)
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
        if gwq is not None:
            dqw.append(gwq)
        if gwk is not None:
            dkw.append(gwk)
    return dqs, dks, dvs, dqw, dkw
