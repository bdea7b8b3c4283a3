"""Causal 3D convolution as Triton implicit GEMMs: the ``triton`` backend. Semantics: see reference.py.

Nothing is padded or concatenated: the causal front frames (frame 0 replicated, zeros, or the streaming cache) and
the spatial zero border are index arithmetic inside the kernels. Every kernel reads its tensors by strides (NCDHW,
channels-last, views, the stride-0 upstream grad of ``y.sum().backward()``); with channels-last tensors the channel
stride is 1, which Triton specializes at compile time, so K (channel) loads are coalesced (and vectorized when
the other strides are 16-element multiples, which Triton also specializes).

Forward, ``y = x ⋆ W``: M = B*T_out*H_out*W_out output positions, N = Cout, K = Cin*kt*kh*kw. A program owns
BLOCK_M positions of *one* output frame (b, t) and BLOCK_N output channels. Its time taps are scalars: tap dt reads
padded frame q = t*stride + dt, i.e. x frame q - (kt-1); a negative frame is the cache's frame q (a second base
pointer with its own strides), frame 0 (replicate: a clamp) or nothing (zeros: the tap is skipped). Inside a time
tap one loop runs over K, masking the spatial border: tile by tile within each spatial tap when BLOCK_K divides Cin
(scalar tap offsets, contiguous channels), else over the flattened (kh, kw, Cin) with a per-column tap (narrow
channel counts such as conv_in's 3 fill one tile instead of nine). The weight is pre-permuted (a small copy) to
[kt, kh, kw, Cin, Cout] so that its tiles are row-major in N and a flattened K index addresses it directly.
Because a tile never spans two frames, an output frame's tiles are the same whatever T is: chunked streaming with
the cache reproduces a whole-video call bitwise (same tiles, same operands, same accumulation order).

Backward dx, the transposed problem: M = B*T*H*W input positions, N = Cin, K = Cout*kt*kh*kw, gathered from dy. A
program owns part of one input frame. Padded frame q receives tap dt from output frame t = (q - dt)/stride when that
is an integer in [0, T_out). Input frame tau is padded frame q = tau + kt - 1; with replicate padding and no cache,
frame 0 is also padded frames 0..kt-2, so its programs run q over [0, kt-1]. With a cache, frame 0 gets only its
own taps, and when dcache is wanted kt-1 extra "frames" per batch (padded frames 0..kt-2) write it.
Backward dW: per tap, [Cout, Cin] += dy^T [Cout, positions] @ x_tap [positions, Cin] (N = Cin of one spatial tap
when BLOCK_N divides Cin, else N = the flattened (kh, kw, Cin) of one time tap), split over position tiles into
fp32 partials [splits, kt, Cout, kh, kw, Cin] that are summed in a fixed order: deterministic, no atomics.
dbias is a fp32 reduction of dy (torch.sum with dtype=float32, no upcast copy).

All GEMMs are ``tl.dot`` with fp32 accumulators: exact fp32 (``ieee``) for fp32 inputs, tensor cores for fp16/bf16.
Block sizes (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) default to Hopper bf16 choices and can be overridden
for tuning with ``MMKERNELS_CONV3D_BLOCKS="128,128,64,8,3"`` (all three kernels) or ``"fwd;dx;dw"`` (three such
groups, an empty group keeping the default). BLOCK_N and BLOCK_K shrink (to >= 16) for narrow channel counts.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from mmkernels.ops.causal_conv3d import reference

ENV_BLOCKS = "MMKERNELS_CONV3D_BLOCKS"
_KINDS = ("fwd", "dx", "dw")


# ---------------------------------------------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tap(acc, src, s_c, s_h, s_w, w_tap, h, w, row_ok, n, n_ok, H, W, Cin, Cout,
             KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             PREC: tl.constexpr):
    """acc += one time tap: source frame ``src`` (x's or the cache's, with its strides) times ``w_tap``, the
    [kh, kw, Cin, Cout] weights of that tap.

    EVEN_K (Cin % BLOCK_K == 0): every K tile lies inside one spatial tap, so the tap's offset is a scalar and the
    channels are contiguous (vector loads for channels-last x). Otherwise K runs over the flattened (kh, kw, Cin)
    and every column decodes its own tap: narrow inputs (conv_in's Cin = 3: K = 27) fill one tile instead of nine.
    """
    kk = tl.arange(0, BLOCK_K)
    row = (h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)[:, None]
    if EVEN_K:
        nkc = Cin // BLOCK_K
        for i in range(0, KH * KW * nkc):
            tap = i // nkc
            c = (i - tap * nkc) * BLOCK_K + kk
            dh = tap // KW - KH // 2
            dw = tap % KW - KW // 2
            hi = h + dh
            wi = w + dw
            ok = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a_ptr = src + row + (dh.to(tl.int64) * s_h + dw.to(tl.int64) * s_w) + (c.to(tl.int64) * s_c)[None, :]
            a = tl.load(a_ptr, mask=ok[:, None], other=0.0)
            b = tl.load(w_tap + ((tap * Cin + c) * Cout)[:, None] + n[None, :], mask=n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        KK = KH * KW * Cin
        for k0 in range(0, KK, BLOCK_K):
            k = k0 + kk
            k_ok = k < KK
            tap = k // Cin
            c = k - tap * Cin
            dh = tap // KW - KH // 2
            dw = tap % KW - KW // 2
            hi = h[:, None] + dh[None, :]
            wi = w[:, None] + dw[None, :]
            ok = (row_ok[:, None] & k_ok[None, :]) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            col = dh.to(tl.int64) * s_h + dw.to(tl.int64) * s_w + c.to(tl.int64) * s_c
            a = tl.load(src + row + col[None, :], mask=ok, other=0.0)
            b = tl.load(w_tap + (k * Cout)[:, None] + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _conv3d_fwd_kernel(X, C, WT, BIAS, Y, Cin, Cout, H, W, Ho, Wo, T_out, stride,
                       sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw, syb, syc, syt, syh, syw,
                       KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CACHE: tl.constexpr,
                       REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(Cout, BLOCK_N)
    per_frame = tl.cdiv(Ho * Wo, BLOCK_M) * num_n
    bt = pid // per_frame
    r = pid - bt * per_frame
    pid_m = r // num_n  # N fastest: neighbouring programs share the gathered A tile through L2
    pid_n = r - pid_m * num_n
    b = bt // T_out
    t = bt - b * T_out

    hw = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = hw < Ho * Wo
    h = hw // Wo
    w = hw - h * Wo
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Cout

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_b = X + b.to(tl.int64) * sxb
    for dt in tl.static_range(KT):
        p = t * stride + (dt - (KT - 1))  # x frame of this tap; negative = a front frame
        w_tap = WT + dt * (KH * KW) * Cin * Cout
        if HAS_CACHE:
            if p >= 0:
                acc = _fwd_tap(acc, x_b + p.to(tl.int64) * sxt, sxc, sxh, sxw, w_tap, h, w, row_ok, n, n_ok,
                               H, W, Cin, Cout, KH, KW, BLOCK_K, EVEN_K, PREC)
            else:
                src = C + b.to(tl.int64) * scb + (p + (KT - 1)).to(tl.int64) * sct
                acc = _fwd_tap(acc, src, scc, sch, scw, w_tap, h, w, row_ok, n, n_ok,
                               H, W, Cin, Cout, KH, KW, BLOCK_K, EVEN_K, PREC)
        elif REPLICATE:
            acc = _fwd_tap(acc, x_b + tl.maximum(p, 0).to(tl.int64) * sxt, sxc, sxh, sxw, w_tap, h, w, row_ok, n,
                           n_ok, H, W, Cin, Cout, KH, KW, BLOCK_K, EVEN_K, PREC)
        else:
            if p >= 0:  # zero padding: a front frame contributes nothing
                acc = _fwd_tap(acc, x_b + p.to(tl.int64) * sxt, sxc, sxh, sxw, w_tap, h, w, row_ok, n, n_ok,
                               H, W, Cin, Cout, KH, KW, BLOCK_K, EVEN_K, PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptr = (Y + b.to(tl.int64) * syb + t.to(tl.int64) * syt
             + (h.to(tl.int64) * syh + w.to(tl.int64) * syw)[:, None] + (n.to(tl.int64) * syc)[None, :])
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Backward: dx (and dcache).
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _dx_tap(acc, dy_frame, s_o, s_h, s_w, w_tap, h, w, row_ok, c, c_ok, Ho, Wo, Cin, Cout,
            KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """acc += one time tap of the transposed conv: dy frame ``dy_frame`` times ``w_tap``, the [kh, kw, Cout, Cin]
    weights of that tap. Input position (h, w) was read through spatial offset (dh, dw) by output position
    (h - dh, w - dw). K tiles as in _fwd_tap, over Cout."""
    kk = tl.arange(0, BLOCK_K)
    row = (h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)[:, None]
    if EVEN_K:
        nko = Cout // BLOCK_K
        for i in range(0, KH * KW * nko):
            tap = i // nko
            o = (i - tap * nko) * BLOCK_K + kk
            dh = tap // KW - KH // 2
            dw = tap % KW - KW // 2
            ho = h - dh
            wo = w - dw
            ok = row_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
            a_ptr = dy_frame + row - (dh.to(tl.int64) * s_h + dw.to(tl.int64) * s_w) + (o.to(tl.int64) * s_o)[None, :]
            a = tl.load(a_ptr, mask=ok[:, None], other=0.0)
            b = tl.load(w_tap + ((tap * Cout + o) * Cin)[:, None] + c[None, :], mask=c_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        KK = KH * KW * Cout
        for k0 in range(0, KK, BLOCK_K):
            k = k0 + kk
            k_ok = k < KK
            tap = k // Cout
            o = k - tap * Cout
            dh = tap // KW - KH // 2
            dw = tap % KW - KW // 2
            ho = h[:, None] - dh[None, :]
            wo = w[:, None] - dw[None, :]
            ok = (row_ok[:, None] & k_ok[None, :]) & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
            col = o.to(tl.int64) * s_o - dh.to(tl.int64) * s_h - dw.to(tl.int64) * s_w
            a = tl.load(dy_frame + row + col[None, :], mask=ok, other=0.0)
            b = tl.load(w_tap + (k * Cin)[:, None] + c[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _conv3d_dx_kernel(DY, WD, DX, DC, Cin, Cout, H, W, Ho, Wo, T_out, stride, NF, PC,
                      sdb, sdo, sdt, sdh, sdw, sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
                      KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, REPLICATE_TO_0: tl.constexpr,
                      HAS_DC: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(Cin, BLOCK_N)
    per_frame = tl.cdiv(H * W, BLOCK_M) * num_n
    bf = pid // per_frame
    r = pid - bf * per_frame
    pid_m = r // num_n
    pid_n = r - pid_m * num_n
    b = bf // NF
    f = bf - b * NF  # frames 0..PC-1 are the cache's (dcache), then x's frames

    hw = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = hw < H * W
    h = hw // W
    w = hw - h * W
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < Cin

    # Padded frames that land in this frame: q_hi itself, and with replicate padding frame 0 also owns the
    # replicated front frames 0..kt-2.
    q_hi = f + (KT - 1) - PC
    q_lo = q_hi
    if REPLICATE_TO_0:
        q_lo = tl.where(f == 0, 0, q_hi)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dy_b = DY + b.to(tl.int64) * sdb
    for q in range(q_lo, q_hi + 1):
        for dt in tl.static_range(KT):
            num = q - dt
            t = num // stride
            if (num >= 0) & (t * stride == num) & (t < T_out):
                acc = _dx_tap(acc, dy_b + t.to(tl.int64) * sdt, sdo, sdh, sdw, WD + dt * (KH * KW) * Cout * Cin,
                              h, w, row_ok, c, c_ok, Ho, Wo, Cin, Cout, KH, KW, BLOCK_K, EVEN_K, PREC)
    out = acc.to(DX.dtype.element_ty)
    mask = row_ok[:, None] & c_ok[None, :]
    if HAS_DC:
        if f < PC:
            ptr = (DC + b.to(tl.int64) * scb + f.to(tl.int64) * sct
                   + (h.to(tl.int64) * sch + w.to(tl.int64) * scw)[:, None] + (c.to(tl.int64) * scc)[None, :])
            tl.store(ptr, out, mask=mask)
        else:
            ptr = (DX + b.to(tl.int64) * sxb + (f - PC).to(tl.int64) * sxt
                   + (h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :])
            tl.store(ptr, out, mask=mask)
    else:
        ptr = (DX + b.to(tl.int64) * sxb + f.to(tl.int64) * sxt
               + (h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :])
        tl.store(ptr, out, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Backward: dW (split over position tiles, fp32 partials).
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _frame_source(X, C, b, p, sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
                  KT: tl.constexpr, HAS_CACHE: tl.constexpr, REPLICATE: tl.constexpr):
    """(base pointer, channel/row/column strides, valid) of x frame p of batch b, where a negative p is a front
    frame: the cache's frame p + kt-1, frame 0 (replicate), or nothing (zeros: valid is False). Branch-free, so
    that the loop around it stays software-pipelined."""
    b64 = b.to(tl.int64)
    x_src = X + b64 * sxb + tl.maximum(p, 0).to(tl.int64) * sxt
    if HAS_CACHE:
        in_x = p >= 0
        c_src = C + b64 * scb + tl.minimum(tl.maximum(p + (KT - 1), 0), KT - 1).to(tl.int64) * sct
        return (tl.where(in_x, x_src, c_src), tl.where(in_x, sxc, scc), tl.where(in_x, sxh, sch),
                tl.where(in_x, sxw, scw), p >= -KT)
    elif REPLICATE:
        return x_src, sxc, sxh, sxw, p >= -KT
    else:
        return x_src, sxc, sxh, sxw, p >= 0


@triton.jit
def _conv3d_dw_kernel(DY, X, C, DWP, Cin, Cout, H, W, Ho, Wo, T_out, stride, total_tiles, tiles_per_split,
                      sdb, sdo, sdt, sdh, sdw, sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
                      KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CACHE: tl.constexpr,
                      REPLICATE: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW partial of one split: [Cout tile] x [N tile] summed over its position tiles. N is Cin within one spatial
    tap (EVEN_N, grid axis 1 = kt*kh*kw taps) or the flattened (kh, kw, Cin) of one time tap (axis 1 = kt)."""
    pid = tl.program_id(0)
    split = tl.program_id(2)
    NTAP = KH * KW * Cin  # the partials' row length: (kh, kw, Cin)
    if EVEN_N:
        num_n = tl.cdiv(Cin, BLOCK_N)
    else:
        num_n = tl.cdiv(NTAP, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o < Cout
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        tap = tl.program_id(1) % (KH * KW)
        dt = tl.program_id(1) // (KH * KW)
        c = n
        n_ok = c < Cin
        dh = tap // KW - KH // 2
        dw = tap % KW - KW // 2
        col_out = tap * Cin + c
    else:
        dt = tl.program_id(1)
        n_ok = n < NTAP
        tapv = n // Cin
        c = n - tapv * Cin
        dh = tapv // KW - KH // 2
        dw = tapv % KW - KW // 2
        col_out = n

    kk = tl.arange(0, BLOCK_K)
    n_hw = tl.cdiv(Ho * Wo, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = split * tiles_per_split
    end = tl.minimum(start + tiles_per_split, total_tiles)
    for i in range(start, end):
        # Position tile i: tile hb of output frame (b, t); a tile never spans two frames.
        bt = i // n_hw
        hb = i - bt * n_hw
        b = bt // T_out
        t = bt - b * T_out
        hw = hb * BLOCK_K + kk
        pos_ok = hw < Ho * Wo
        ho = hw // Wo
        wo = hw - ho * Wo
        dy_ptr = (DY + b.to(tl.int64) * sdb + t.to(tl.int64) * sdt + (o.to(tl.int64) * sdo)[:, None]
                  + (ho.to(tl.int64) * sdh + wo.to(tl.int64) * sdw)[None, :])
        a = tl.load(dy_ptr, mask=o_ok[:, None] & pos_ok[None, :], other=0.0)
        src, s_c, s_h, s_w, f_ok = _frame_source(X, C, b, t * stride + dt - (KT - 1), sxb, sxc, sxt, sxh, sxw,
                                                 scb, scc, sct, sch, scw, KT, HAS_CACHE, REPLICATE)
        row = (ho.to(tl.int64) * s_h + wo.to(tl.int64) * s_w)[:, None]
        if EVEN_N:
            hi = ho + dh
            wi = wo + dw
            ok = pos_ok & f_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            x_ptr = src + row + (dh.to(tl.int64) * s_h + dw.to(tl.int64) * s_w) + (c.to(tl.int64) * s_c)[None, :]
            xv = tl.load(x_ptr, mask=ok[:, None] & n_ok[None, :], other=0.0)
        else:
            hi = ho[:, None] + dh[None, :]
            wi = wo[:, None] + dw[None, :]
            ok = ((pos_ok & f_ok)[:, None] & n_ok[None, :]) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            col = dh.to(tl.int64) * s_h + dw.to(tl.int64) * s_w + c.to(tl.int64) * s_c
            xv = tl.load(src + row + col[None, :], mask=ok, other=0.0)
        acc = tl.dot(a, xv, acc, input_precision=PREC)
    base = DWP + ((split * KT + dt) * Cout).to(tl.int64) * NTAP
    tl.store(base + (o * NTAP)[:, None] + col_out[None, :], acc, mask=o_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------------------------

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (no TF32), so the triton backend meets the fp32 tolerance and the
    # streaming results are bitwise; fp16/bf16 go to the tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2_at_least_16(v: int) -> bool:
    return v >= 16 and (v & (v - 1)) == 0


def env_blocks() -> Optional[dict]:
    """The MMKERNELS_CONV3D_BLOCKS override: {kind: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)}, or None."""
    value = os.environ.get(ENV_BLOCKS, "").strip()
    if not value:
        return None
    groups = [g.strip() for g in value.split(";")]
    if len(groups) == 1:
        groups = groups * 3
    err = ValueError(f"environment variable {ENV_BLOCKS} must be 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages' "
                     f"(block sizes powers of two >= 16, warps and stages >= 1), or three such groups for "
                     f"fwd;dx;dw separated by ';' (an empty group keeps the default), got {value!r}")
    if len(groups) != 3:
        raise err
    out = {}
    for kind, g in zip(_KINDS, groups):
        if not g:
            continue
        try:
            ints = tuple(int(v) for v in g.split(","))
        except ValueError:
            raise err from None
        if len(ints) != 5 or not all(_pow2_at_least_16(v) for v in ints[:3]) or min(ints[3:]) < 1:
            raise err
        out[kind] = ints
    return out


def _clamp(block: int, extent: int) -> int:
    """``block`` shrunk towards the extent's power of two, >= 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(max(extent, 1))))


def _fit(block: int, channels: int, taps: int) -> tuple[int, bool]:
    """(block, even) for a reduction over ``taps`` spatial taps x ``channels``: a block that divides the channel
    count (block or block/2) gives the tap-aligned path; otherwise the flattened path, with a block no wider than
    the flattened extent needs."""
    for b in (block, block // 2):
        if b >= 16 and channels % b == 0:
            return b, True
    return _clamp(block, channels * taps), False


def blocks(kind: str, dtype: torch.dtype, m: int, n: int, k_channels: int, taps: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, even) of kernel ``kind``:

    * fwd: M positions (m = H_out*W_out), N = Cout, K = Cin per spatial tap; even = EVEN_K.
    * dx:  M positions (m = H*W), N = Cin, K = Cout per spatial tap; even = EVEN_K.
    * dw:  M = Cout, N = Cin per spatial tap (n = Cin), K positions (k_channels = H_out*W_out); even = EVEN_N.
    """
    env = env_blocks()
    if env and kind in env:  # a tuning knob on GPUs; tests use it to force multi-tile paths in the interpreter
        base = env[kind]
    elif _interpreted():
        base = (32, 32, 64, 4, 1)  # few programs and loop trips: the interpreter pays per operation
    elif dtype == torch.float32:
        base = (64, 64, 32, 4, 2)
    else:
        base = (128, 128, 64, 8, 3)
    bm, bn, bk, warps, stages = base
    if kind == "dw":
        bn, even = _fit(bn, n, taps)
        return _clamp(bm, m), bn, _clamp(bk, k_channels), warps, stages, even
    bk, even = _fit(bk, k_channels, taps)
    return _clamp(bm, m), _clamp(bn, n), bk, warps, stages, even


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _check_weight_indexing(weight: torch.Tensor) -> None:
    # Weight offsets inside the kernels are 32-bit (x, y and dy offsets are 64-bit).
    if weight.numel() >= 2**31:
        raise ValueError(f"mmkernels.causal_conv3d: the triton backend needs weight.numel() < 2**31, "
                         f"got {weight.numel()}")


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cache: Optional[torch.Tensor],
            stride: int, replicate: bool) -> torch.Tensor:
    _check_weight_indexing(weight)
    B, Cout, T_out, Ho, Wo = reference.output_shape(x, weight, stride)
    Cin, _, H, W = x.shape[1:]
    kt, kh, kw = weight.shape[2:]
    y = torch.empty((B, Cout, T_out, Ho, Wo), dtype=x.dtype, device=x.device,
                    memory_format=reference.output_format(x))
    wt = weight.permute(2, 3, 4, 1, 0).contiguous()  # [kt, kh, kw, Cin, Cout]
    bm, bn, bk, warps, stages, even = blocks("fwd", x.dtype, Ho * Wo, Cout, Cin, kh * kw)
    c = cache if cache is not None else x  # unused without a cache
    grid = (B * T_out * triton.cdiv(Ho * Wo, bm) * triton.cdiv(Cout, bn),)
    _conv3d_fwd_kernel[grid](
        x, c, wt, bias if bias is not None else wt, y, Cin, Cout, H, W, Ho, Wo, T_out, stride,
        *x.stride(), *c.stride(), *y.stride(),
        KT=kt, KH=kh, KW=kw, HAS_CACHE=cache is not None, REPLICATE=replicate, HAS_BIAS=bias is not None,
        EVEN_K=even, PREC=_prec(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    return y


def _dx(dy, x, weight, cache, stride, replicate, need_c):
    B, Cin, T, H, W = x.shape
    Cout, _, kt, kh, kw = weight.shape
    T_out, Ho, Wo = dy.shape[2:]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=reference.output_format(x))
    dc = torch.empty(cache.shape, dtype=cache.dtype, device=cache.device,
                     memory_format=reference.output_format(cache)) if need_c else dx
    pc = kt - 1 if need_c else 0
    wd = weight.permute(2, 3, 4, 0, 1).contiguous()  # [kt, kh, kw, Cout, Cin]
    bm, bn, bk, warps, stages, even = blocks("dx", x.dtype, H * W, Cin, Cout, kh * kw)
    nf = T + pc
    grid = (B * nf * triton.cdiv(H * W, bm) * triton.cdiv(Cin, bn),)
    _conv3d_dx_kernel[grid](
        dy, wd, dx, dc, Cin, Cout, H, W, Ho, Wo, T_out, stride, nf, pc,
        *dy.stride(), *dx.stride(), *dc.stride(),
        KT=kt, KH=kh, KW=kw, REPLICATE_TO_0=replicate and cache is None, HAS_DC=need_c,
        EVEN_K=even, PREC=_prec(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    return dx, (dc if need_c else None)


def _dw(dy, x, weight, cache, stride, replicate):
    B, Cin, T, H, W = x.shape
    Cout, _, kt, kh, kw = weight.shape
    T_out, Ho, Wo = dy.shape[2:]
    bm, bn, bk, warps, stages, even = blocks("dw", x.dtype, Cout, Cin, Ho * Wo, kh * kw)
    tiles = triton.cdiv(Cout, bm) * (triton.cdiv(Cin, bn) if even else triton.cdiv(kh * kw * Cin, bn))
    taps = kt * kh * kw if even else kt  # grid axis 1
    total = B * T_out * triton.cdiv(Ho * Wo, bk)
    if _interpreted():
        splits = min(2, total)  # exercises the partial-sum path at test sizes
    else:
        # Enough programs for two waves; the partials (fp32, one [kt, Cout, kh*kw*Cin] slab per split) <= 256 MiB.
        splits = triton.cdiv(2 * _num_sms(x.device), tiles * taps)
        splits = max(1, min(splits, total, 65535, (256 << 20) // (4 * weight.numel())))
    per = triton.cdiv(total, splits)
    splits = triton.cdiv(total, per)
    dwp = torch.empty((splits, kt, Cout, kh, kw, Cin), dtype=torch.float32, device=x.device)
    c = cache if cache is not None else x
    _conv3d_dw_kernel[(tiles, taps, splits)](
        dy, x, c, dwp, Cin, Cout, H, W, Ho, Wo, T_out, stride, total, per,
        *dy.stride(), *x.stride(), *c.stride(),
        KT=kt, KH=kh, KW=kw, HAS_CACHE=cache is not None, REPLICATE=replicate, EVEN_N=even, PREC=_prec(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    dw = dwp[0] if splits == 1 else dwp.sum(dim=0)  # a fixed-order reduction: deterministic
    return dw.permute(1, 4, 0, 2, 3).to(weight.dtype).contiguous()  # [kt, Cout, kh, kw, Cin] -> weight's layout


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor], stride: int,
             replicate: bool, needs: Sequence[bool]):
    """(dx, dweight, dbias, dcache) as reference.backward, each None where not needed."""
    _check_weight_indexing(weight)
    need_x, need_w, need_b, need_c = needs
    need_c = need_c and cache is not None
    dx = dw = db = dc = None
    if need_x or need_c:
        dx, dc = _dx(dy, x, weight, cache, stride, replicate, need_c)
        dx = dx if need_x else None
    if need_w:
        dw = _dw(dy, x, weight, cache, stride, replicate)
    if need_b:
        db = torch.sum(dy, dim=(0, 2, 3, 4), dtype=torch.float32).to(x.dtype)
    return dx, dw, db, dc


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/ops/triton_aot.py compiles them for sm_90 / sm_80 without a GPU).
# ---------------------------------------------------------------------------------------------------------------

def aot_cases(arch: int, dt: str):
    """(name, kernel, arch, types, constexprs) for tests/ops/triton_aot.py, which compiles them for sm_90/sm_80
    without a GPU: every kernel at the launchers' GPU block sizes for the ST-VAE's 3x3x3 convs (C = 128..512, the
    tap-aligned paths, channels-last), every padding variant for the production target (sm_90, bf16), and the
    flattened paths of conv_in (Cin = 3) and conv_out (Cout = 3) with generic (NCDHW) strides."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    ptrs = {n: f"*{dt}" for n in ("X", "C", "WT", "WD", "BIAS", "Y", "DY", "DX", "DC")}
    types = {**ptrs, "DWP": "*fp32", **{n: "i64" for n in ("sxb", "scb", "syb", "sdb")}}
    full = arch == 90 and dt == "bf16"
    k3 = dict(KT=3, KH=3, KW=3, PREC=_prec(dtype))

    def channels_last(kernel):  # Triton specializes stride-1 ints at run time; channels-last has unit C strides
        return {k: 1 for k in ("sxc", "scc", "syc", "sdo") if k in kernel.arg_names}

    def tiles(kind, m, n, k):
        bm, bn, bk, warps, stages, even = blocks(kind, dtype, m, n, k, 9)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages), even

    for has_cache, replicate in ((False, True), (True, True), (False, False)) if full else ((False, True),):
        tag = f"sm{arch}-{dt}-c256-cache{int(has_cache)}-rep{int(replicate)}"
        t, even = tiles("fwd", 4096, 256, 256)
        yield (f"causal_conv3d_fwd-{tag}", _conv3d_fwd_kernel, arch, types,
               dict(HAS_CACHE=has_cache, REPLICATE=replicate, HAS_BIAS=True, EVEN_K=even, **k3, **t,
                    **channels_last(_conv3d_fwd_kernel)))
        t, even = tiles("dx", 4096, 256, 256)
        yield (f"causal_conv3d_dx-{tag}", _conv3d_dx_kernel, arch, types,
               dict(REPLICATE_TO_0=replicate and not has_cache, HAS_DC=has_cache, EVEN_K=even, **k3, **t,
                    **channels_last(_conv3d_dx_kernel)))
        t, even = tiles("dw", 256, 256, 4096)
        yield (f"causal_conv3d_dw-{tag}", _conv3d_dw_kernel, arch, types,
               dict(HAS_CACHE=has_cache, REPLICATE=replicate, EVEN_N=even, **k3, **t,
                    **channels_last(_conv3d_dw_kernel)))
    if full:
        t, even = tiles("fwd", 4096, 128, 3)  # conv_in: 3 -> 128
        yield (f"causal_conv3d_fwd-sm{arch}-{dt}-cin3", _conv3d_fwd_kernel, arch, types,
               dict(HAS_CACHE=False, REPLICATE=True, HAS_BIAS=True, EVEN_K=even, **k3, **t))
        t, even = tiles("dw", 128, 3, 4096)
        yield (f"causal_conv3d_dw-sm{arch}-{dt}-cin3", _conv3d_dw_kernel, arch, types,
               dict(HAS_CACHE=False, REPLICATE=True, EVEN_N=even, **k3, **t))
        t, even = tiles("dx", 4096, 128, 3)  # conv_out: 128 -> 3, its dx reduces over Cout = 3
        yield (f"causal_conv3d_dx-sm{arch}-{dt}-cout3", _conv3d_dx_kernel, arch, types,
               dict(REPLICATE_TO_0=True, HAS_DC=False, EVEN_K=even, **k3, **t))
        t, even = tiles("fwd", 4096, 512, 256)  # a 1x1x1 conv (SpatialNorm's conv_y / conv_b)
        yield (f"causal_conv3d_fwd-sm{arch}-{dt}-k1", _conv3d_fwd_kernel, arch, types,
               dict(HAS_CACHE=False, REPLICATE=True, HAS_BIAS=True, EVEN_K=even, KT=1, KH=1, KW=1,
                    PREC=_prec(dtype), **t))
