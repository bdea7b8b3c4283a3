"""Mask pooling Triton kernels: the ``triton`` backend. Semantics: reference.py.

Nothing of size [B, Q, Hf, Wf] is ever written: every kernel computes the resized weights of a [BLOCK_Q masks,
BLOCK_P feature pixels] tile on the fly from the logits (4-tap bilinear through the tap tables of reference.taps, 1
tap per axis whose sizes are equal) and feeds them to ``tl.dot`` with fp32 accumulation:

* ``_fwd_kernel``: program (c block, q block, batch x P split) runs out[q, c] += w[q, p] @ x[p, c] over its pixels
  and the denominators sum_p w. One split: it divides and writes out and denom. Several splits (the launcher adds
  them when the (q, c) tiles alone do not fill the GPU): fp32 partials, summed in split order by
  ``_finalize_kernel`` (deterministic, no atomics). The c block runs fastest in the grid, so the programs that
  read the same mask tiles run together and the masks come from HBM about once (the other reads hit L2).
* ``_dx_kernel``: program (p block x c block, c fastest; batch) runs dx[p, c] += (w / denom)[q, p]^T @ dout[q, c] over all q
  (the transposed GEMM; folding 1/denom into w keeps fp16 operands away from underflow).
* ``_dmask_kernel`` (soft mode): program (tile of BLOCK_I x BLOCK_J source mask pixels, q block, batch) walks the
  feature pixels whose taps touch its tile (reference.adjoint_ranges), computes dm = (dout @ x) / denom - u and
  dr = dm * s * (1 - s) for them, and applies the adjoint of the resize as a dot with the tile's interpolation
  matrix A[p, s] (the product of the row and column tap weights, built from the tap tables): dmasks += dr @ A.
  A gather, not a scatter: every dmasks element is written once by one program (deterministic). Feature pixels at
  tile borders are recomputed by the neighbouring tiles.

Operands of the dots: fp32 features get exact fp32 products (``ieee``). fp16/bf16 features: binary weights (official,
hard) go to the tensor cores in the features' dtype, where they are exact; soft weights stay fp32 (``tf32``, into
which fp16/bf16 features convert exactly), so small weights do not underflow fp16.

Addressing: features and masks by strides (contiguous, channels_last, views); batch and mask offsets in int64,
offsets within one batch item of the features in int32 unless they can pass 2**31 (``OFF64``), within one mask in
int32 (supports() checks). Outputs: out [B, Q, C] and dmasks [B, Q, Hm, Wm] contiguous, dx like the features.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmkernels.ops.mask_pool import reference

MODE_ID = {"official": 0, "hard": 1, "soft": 2}
INT32_MAX = 2**31 - 1
MAX_GRID_YZ = 65535

# Block sizes (powers of two >= 16; the launchers shrink them to the problem): (BLOCK_Q, BLOCK_P, BLOCK_C, num_warps)
# per kernel and features' precision ("half": fp16/bf16, "fp32"), and the source tile (BLOCK_I, BLOCK_J) of the mask
# backward. Picked so that no variant spills registers on sm_90 or sm_80 (compiled and checked without a GPU:
# tests/ops/test_mask_pool.py::test_kernels_compile_without_spills); fp32 features take smaller tiles because the
# exact fp32 dot (no tensor cores) keeps its operands in registers. Not yet tuned on a GPU.
BLOCKS = {
    "fwd": {"half": (64, 32, 256, 8), "fp32": (32, 32, 64, 4)},
    "dx": {"half": (64, 64, 128, 8), "fp32": (32, 32, 128, 4)},
    "dmask": {"half": (32, 32, 64, 8), "fp32": (16, 16, 32, 8)},
}
DMASK_TILE = (8, 8)
FINALIZE_BLOCKS = (32, 128, 4)  # (BLOCK_Q, BLOCK_C, num_warps) of the split forward's finalize kernel
# The interpreter gets small blocks (it pays per operation, and tests force multi-block paths with them).
INTERP_BLOCKS = (16, 16, 32, 1)
INTERP_TILE = (4, 8)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _target_programs(device: torch.device) -> int:
    """Programs the forward aims for before it splits the pixel loop: two per SM on a GPU."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def blocks(kind: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_C, num_warps) of kernel ``kind`` (fwd, dx, dmask) for features of ``dtype``."""
    if _interpreted():
        return INTERP_BLOCKS
    return BLOCKS[kind]["fp32" if dtype == torch.float32 else "half"]


def prec(dtype: torch.dtype) -> str:
    """tl.dot precision: exact fp32 products for fp32 features; tf32 (into which fp16/bf16 convert exactly) for the
    fp32 operands (soft weights, dr) next to fp16/bf16 features, whose own dots go to the tensor cores in any case."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _fit(block: int, extent: int) -> int:
    """``block`` shrunk towards the extent's power of two, >= 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(max(int(extent), 1))))


def _off64(t: torch.Tensor) -> bool:
    """Whether offsets within one batch item of ``t`` (all dims but 0) can pass 2**31."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n > 0) > INT32_MAX


def supports_sizes(features: torch.Tensor, masks: torch.Tensor) -> "str | None":
    """The kernels' index limits (shared with the cuda backend)."""
    span = sum((n - 1) * abs(s) for n, s in zip(masks.shape[2:], masks.stride()[2:]) if n > 0)
    if span > INT32_MAX:
        return f"one mask spans {span} elements, above the kernels' int32 limit"
    if features.shape[2] * features.shape[3] > INT32_MAX or masks.shape[1] * features.shape[1] > INT32_MAX:
        return "Hf*Wf or Q*C is above 2**31"
    # Grid dims 1 and 2 hold at most 65535: q blocks of at least 16, and the batch.
    if masks.shape[1] > MAX_GRID_YZ * 16 or features.shape[0] > MAX_GRID_YZ:
        return f"Q = {masks.shape[1]} or B = {features.shape[0]} is above the kernels' grid limits " \
               f"({MAX_GRID_YZ * 16}, {MAX_GRID_YZ})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces.


@triton.jit
def _row(base, r, c0, c1, lw1, ok, SAME_W: tl.constexpr):
    """fp32 [BQ, BP]: one source row (offset r [BP]) of the masks at base [BQ, 1], interpolated along the columns."""
    a = tl.load(base + (r + c0)[None, :], mask=ok, other=0.0).to(tl.float32)
    v = a
    if not SAME_W:
        b = tl.load(base + (r + c1)[None, :], mask=ok, other=0.0).to(tl.float32)
        v = (1.0 - lw1)[None, :] * a + lw1[None, :] * b
    return v


@triton.jit
def _resized(base, ph, pw, p_ok, ok, H0, H1, LH, W0, W1, LW, smh, smw,
             SAME_H: tl.constexpr, SAME_W: tl.constexpr):
    """fp32 r [BQ, BP]: the logits of masks at base [BQ, 1] resized to feature pixels (ph, pw) [BP], computed as
    PyTorch's upsample_bilinear2d: l0h * (l0w * a + l1w * b) + l1h * (l0w * c + l1w * d)."""
    if SAME_W:
        c0 = pw * smw
        c1 = c0
        lw1 = tl.zeros(pw.shape, dtype=tl.float32)
    else:
        c0 = tl.load(W0 + pw, mask=p_ok, other=0) * smw
        c1 = tl.load(W1 + pw, mask=p_ok, other=0) * smw
        lw1 = tl.load(LW + pw, mask=p_ok, other=0.0)
    if SAME_H:
        v = _row(base, ph * smh, c0, c1, lw1, ok, SAME_W)
    else:
        r0 = tl.load(H0 + ph, mask=p_ok, other=0) * smh
        r1 = tl.load(H1 + ph, mask=p_ok, other=0) * smh
        lh1 = tl.load(LH + ph, mask=p_ok, other=0.0)
        top = _row(base, r0, c0, c1, lw1, ok, SAME_W)
        bot = _row(base, r1, c0, c1, lw1, ok, SAME_W)
        v = (1.0 - lh1)[None, :] * top + lh1[None, :] * bot
    return v


@triton.jit
def _weight(r, ok, thr, M, MODE: tl.constexpr):
    """fp32 weights [BQ, BP] from the resized logits r (reference.py): official (rounded to the masks' dtype, thr
    the rounded sigmoid of the threshold), hard (thr the threshold), soft (thr the threshold); 0 where not ok."""
    if MODE == 0:
        mdt = M.dtype.element_ty
        rr = r.to(mdt).to(tl.float32)
        s = (1.0 / (1.0 + tl.exp(-rr))).to(mdt).to(tl.float32)
        w = tl.where(s >= thr, 1.0, 0.0)
    elif MODE == 1:
        w = tl.where(r > thr, 1.0, 0.0)
    else:
        w = 1.0 / (1.0 + tl.exp(thr - r))
    return tl.where(ok, w, 0.0)


@triton.jit
def _idx(v, OFF64: tl.constexpr):
    out = v
    if OFF64:
        out = v.to(tl.int64)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _fwd_kernel(X, M, OUT, DEN, PART, PDEN, H0, H1, LH, W0, W1, LW,
                B, Q, C, Wf, P, NS, p_per_split,
                sxb, sxc, sxh, sxw, smb, smq, smh, smw, thr, eps,
                MODE: tl.constexpr, SAME_H: tl.constexpr, SAME_W: tl.constexpr, SPLIT: tl.constexpr,
                W_F32: tl.constexpr, OFF64: tl.constexpr, PREC: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_bs = tl.program_id(2)
    b = pid_bs // NS
    s = pid_bs - b * NS
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    mbase = M + b.to(tl.int64) * smb + (qs.to(tl.int64) * smq)[:, None]
    xbase = X + b.to(tl.int64) * sxb
    xc = (_idx(cs, OFF64) * sxc)[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    den = tl.zeros([BLOCK_Q], dtype=tl.float32)
    p_lo = s * p_per_split
    p_hi = tl.minimum(P, p_lo + p_per_split)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < p_hi
        ph = ps // Wf
        pw = ps - ph * Wf
        ok = q_ok[:, None] & p_ok[None, :]
        r = _resized(mbase, ph, pw, p_ok, ok, H0, H1, LH, W0, W1, LW, smh, smw, SAME_H, SAME_W)
        w = _weight(r, ok, thr, M, MODE)
        den += tl.sum(w, axis=1)
        xp = (_idx(ph, OFF64) * sxh + _idx(pw, OFF64) * sxw)[:, None]
        xt = tl.load(xbase + xp + xc, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        if W_F32:
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=PREC)
    o_ok = q_ok[:, None] & c_ok[None, :]
    if SPLIT:
        row = (s * B + b).to(tl.int64) * Q + qs
        tl.store(PART + (row * C)[:, None] + cs[None, :], acc, mask=o_ok)
        tl.store(PDEN + row, den, mask=q_ok & (pid_c == 0))
    else:
        d = den + eps
        row = b.to(tl.int64) * Q + qs
        tl.store(OUT + (row * C)[:, None] + cs[None, :], (acc / d[:, None]).to(OUT.dtype.element_ty), mask=o_ok)
        tl.store(DEN + row, d, mask=q_ok & (pid_c == 0))


@triton.jit
def _finalize_kernel(OUT, DEN, PART, PDEN, B, Q, C, NS, eps, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = tl.program_id(2)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = q_ok[:, None] & (cs < C)[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    den = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for s in range(0, NS):  # fixed order: deterministic
        row = (s * B + b).to(tl.int64) * Q + qs
        acc += tl.load(PART + (row * C)[:, None] + cs[None, :], mask=o_ok, other=0.0)
        den += tl.load(PDEN + row, mask=q_ok, other=0.0)
    d = den + eps
    row = b.to(tl.int64) * Q + qs
    tl.store(OUT + (row * C)[:, None] + cs[None, :], (acc / d[:, None]).to(OUT.dtype.element_ty), mask=o_ok)
    tl.store(DEN + row, d, mask=q_ok & (pid_c == 0))


# ----------------------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _dx_kernel(DOUT, DEN, M, DX, H0, H1, LH, W0, W1, LW,
               Q, C, Wf, P, n_c, sgb, sgq, sgc, sdb, sdc, sdh, sdw, smb, smq, smh, smw, thr,
               MODE: tl.constexpr, SAME_H: tl.constexpr, SAME_W: tl.constexpr, OFF64: tl.constexpr,
               PREC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # (p block, c block), c fastest: the programs reading the same mask pixels run together
    pid_p = pid // n_c
    pid_c = pid - pid_p * n_c
    b = tl.program_id(1)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    ph = ps // Wf
    pw = ps - ph * Wf
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    gbase = DOUT + b.to(tl.int64) * sgb + (cs.to(tl.int64) * sgc)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q)
        q_ok = qs < Q
        ok = q_ok[:, None] & p_ok[None, :]
        mbase = M + b.to(tl.int64) * smb + (qs.to(tl.int64) * smq)[:, None]
        r = _resized(mbase, ph, pw, p_ok, ok, H0, H1, LH, W0, W1, LW, smh, smw, SAME_H, SAME_W)
        d = tl.load(DEN + b.to(tl.int64) * Q + qs, mask=q_ok, other=1.0)
        wn = _weight(r, ok, thr, M, MODE) / d[:, None]
        g = tl.load(gbase + (qs.to(tl.int64) * sgq)[:, None], mask=q_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(wn.to(g.dtype)), g, acc, input_precision=PREC)
    off = (_idx(ph, OFF64) * sdh + _idx(pw, OFF64) * sdw)[:, None] + (_idx(cs, OFF64) * sdc)[None, :]
    tl.store(DX + b.to(tl.int64) * sdb + off, acc.to(DX.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _dmask_kernel(DOUT, DEN, U, X, M, DM, H0, H1, LH, W0, W1, LW, RLO, RHI, CLO, CHI,
                  Q, C, Hm, Wm, n_jb, sgb, sgq, sgc, sxb, sxc, sxh, sxw, smb, smq, smh, smw, thr,
                  SAME_H: tl.constexpr, SAME_W: tl.constexpr, OFF64: tl.constexpr, PREC: tl.constexpr,
                  PREC_A: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = tl.program_id(2)
    ib = pid_s // n_jb
    jb = pid_s - ib * n_jb
    ss = tl.arange(0, BLOCK_I * BLOCK_J)
    si = ib * BLOCK_I + ss // BLOCK_J
    sj = jb * BLOCK_J + ss % BLOCK_J
    s_ok = (si < Hm) & (sj < Wm)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    qrow = b.to(tl.int64) * Q + qs
    d = tl.load(DEN + qrow, mask=q_ok, other=1.0)
    u = tl.load(U + qrow, mask=q_ok, other=0.0)
    gbase = DOUT + b.to(tl.int64) * sgb + (qs.to(tl.int64) * sgq)[:, None]
    xbase = X + b.to(tl.int64) * sxb
    mbase = M + b.to(tl.int64) * smb + (qs.to(tl.int64) * smq)[:, None]
    h_lo = tl.load(RLO + ib)
    h_hi = tl.load(RHI + ib)
    w_lo = tl.load(CLO + jb)
    w_hi = tl.load(CHI + jb)
    nw = tl.maximum(w_hi - w_lo, 1)
    n = (h_hi - h_lo) * (w_hi - w_lo)  # feature pixels whose taps touch this source tile
    acc = tl.zeros([BLOCK_Q, BLOCK_I * BLOCK_J], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_P):
        lin = k0 + tl.arange(0, BLOCK_P)
        p_ok = lin < n
        ph = h_lo + lin // nw
        pw = w_lo + lin % nw
        ok = q_ok[:, None] & p_ok[None, :]
        # dout @ x over the channels for these pixels.
        gx = tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32)
        xp = (_idx(ph, OFF64) * sxh + _idx(pw, OFF64) * sxw)[None, :]
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            g = tl.load(gbase + (cs.to(tl.int64) * sgc)[None, :], mask=q_ok[:, None] & c_ok[None, :], other=0.0)
            xt = tl.load(xbase + (_idx(cs, OFF64) * sxc)[:, None] + xp, mask=c_ok[:, None] & p_ok[None, :],
                         other=0.0)
            gx = tl.dot(g, xt, gx, input_precision=PREC)
        r = _resized(mbase, ph, pw, p_ok, ok, H0, H1, LH, W0, W1, LW, smh, smw, SAME_H, SAME_W)
        sg = 1.0 / (1.0 + tl.exp(thr - r))
        dr = tl.where(ok, (gx / d[:, None] - u[:, None]) * sg * (1.0 - sg), 0.0)
        # The tile's interpolation matrix A[p, s] = (row tap weight) * (column tap weight); both taps may hit the
        # same source index (clamped edges, equal sizes), and then their weights add, as in the adjoint.
        h0 = tl.load(H0 + ph, mask=p_ok, other=-1)
        h1 = tl.load(H1 + ph, mask=p_ok, other=-1)
        lh = tl.load(LH + ph, mask=p_ok, other=0.0)
        w0 = tl.load(W0 + pw, mask=p_ok, other=-1)
        w1 = tl.load(W1 + pw, mask=p_ok, other=-1)
        lw = tl.load(LW + pw, mask=p_ok, other=0.0)
        ah = tl.where(h0[:, None] == si[None, :], (1.0 - lh)[:, None], 0.0) + \
            tl.where(h1[:, None] == si[None, :], lh[:, None], 0.0)
        aw = tl.where(w0[:, None] == sj[None, :], (1.0 - lw)[:, None], 0.0) + \
            tl.where(w1[:, None] == sj[None, :], lw[:, None], 0.0)
        acc = tl.dot(dr, ah * aw, acc, input_precision=PREC_A)
    off = (si * Wm + sj).to(tl.int64)
    tl.store(DM + (qrow * Hm * Wm)[:, None] + off[None, :], acc.to(DM.dtype.element_ty),
             mask=q_ok[:, None] & s_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers.


def _common(features: torch.Tensor, masks: torch.Tensor, threshold: float):
    B, C, Hf, Wf = features.shape
    _, Q, Hm, Wm = masks.shape
    tabs = reference.tables(Hm, Wm, Hf, Wf, features.device)
    same_h, same_w = Hm == Hf, Wm == Wf
    return B, C, Hf, Wf, Q, Hm, Wm, tabs, same_h, same_w


def threshold_arg(mode: str, threshold: float, masks_dtype: torch.dtype) -> float:
    """The number the kernels compare with: official the rounded sigmoid of the threshold, else the threshold."""
    if mode == "official":
        return reference.sigmoid_threshold(threshold, masks_dtype)
    return float(torch.tensor(threshold, dtype=torch.float32).item())


def forward(features: torch.Tensor, masks: torch.Tensor, mode: str, threshold: float,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, Hf, Wf, Q, Hm, Wm, tabs, same_h, same_w = _common(features, masks, threshold)
    P = Hf * Wf
    dev = features.device
    out = torch.empty((B, Q, C), dtype=features.dtype, device=dev)
    denom = torch.empty((B, Q), dtype=torch.float32, device=dev)
    bq, bp, bc, warps = blocks("fwd", features.dtype)
    bq, bp, bc = _fit(bq, Q), _fit(bp, P), _fit(bc, C)
    n_q, n_c = triton.cdiv(Q, bq), triton.cdiv(C, bc)
    tiles = n_q * n_c * B
    # Split the pixel loop when the (q, c) tiles alone leave SMs idle; each split keeps at least 4 pixel blocks.
    ns = max(1, min(triton.cdiv(_target_programs(dev), tiles), P // (4 * bp)))
    per = triton.cdiv(triton.cdiv(P, ns), bp) * bp
    ns = triton.cdiv(P, per)
    split = ns > 1
    part = torch.empty((ns, B, Q, C) if split else (1,), dtype=torch.float32, device=dev)
    pden = torch.empty((ns, B, Q) if split else (1,), dtype=torch.float32, device=dev)
    w_f32 = mode == "soft" and features.dtype != torch.float32
    _fwd_kernel[(n_c, n_q, B * ns)](
        features, masks, out, denom, part, pden, *tabs, B, Q, C, Wf, P, ns, per,
        *features.stride(), *masks.stride(), threshold_arg(mode, threshold, masks.dtype), float(eps),
        MODE=MODE_ID[mode], SAME_H=same_h, SAME_W=same_w, SPLIT=split, W_F32=w_f32, OFF64=_off64(features),
        PREC=prec(features.dtype), BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    if split:
        fq, fc, fw = FINALIZE_BLOCKS
        fq, fc = _fit(fq, Q), _fit(fc, C)
        _finalize_kernel[(triton.cdiv(C, fc), triton.cdiv(Q, fq), B)](out, denom, part, pden, B, Q, C, ns, float(eps),
                                                                      BLOCK_Q=fq, BLOCK_C=fc, num_warps=fw)
    return out, denom


def backward(dout: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, denom: torch.Tensor,
             out: torch.Tensor, mode: str, threshold: float, need_dx: bool, need_dm: bool):
    B, C, Hf, Wf, Q, Hm, Wm, tabs, same_h, same_w = _common(features, masks, threshold)
    P = Hf * Wf
    dev = features.device
    dout = dout.to(features.dtype)  # the kernels read it by strides (an expanded grad stays expanded)
    denom = denom.to(torch.float32).contiguous()
    pr = prec(features.dtype)
    thr = threshold_arg(mode, threshold, masks.dtype)
    dx = dm = None
    if need_dx:
        dx = torch.empty_like(features)
        bq, bp, bc, warps = blocks("dx", features.dtype)
        bq, bp, bc = _fit(bq, Q), _fit(bp, P), _fit(bc, C)
        n_c = triton.cdiv(C, bc)
        _dx_kernel[(n_c * triton.cdiv(P, bp), B)](
            dout, denom, masks, dx, *tabs, Q, C, Wf, P, n_c, *dout.stride(), *dx.stride(), *masks.stride(), thr,
            MODE=MODE_ID[mode], SAME_H=same_h, SAME_W=same_w, OFF64=_off64(dx), PREC=pr,
            BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    if need_dm and mode == "soft":
        dm = torch.empty(masks.shape, dtype=masks.dtype, device=dev)
        u = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).div_(denom).contiguous()
        bq, bp, bc, warps = blocks("dmask", features.dtype)
        bi, bj = INTERP_TILE if _interpreted() else DMASK_TILE
        bi, bj = min(bi, triton.next_power_of_2(Hm)), min(bj, triton.next_power_of_2(Wm))
        while bi * bj < 16:  # tl.dot needs N >= 16
            bi, bj = (bi, bj * 2) if bj <= bi else (bi * 2, bj)
        ranges = reference.adjoint_ranges(Hm, Wm, Hf, Wf, bi, bj, dev)
        n_ib, n_jb = triton.cdiv(Hm, bi), triton.cdiv(Wm, bj)
        bq, bc = _fit(bq, Q), _fit(bc, C)
        _dmask_kernel[(n_ib * n_jb, triton.cdiv(Q, bq), B)](
            dout, denom, u, features, masks, dm, *tabs, *ranges, Q, C, Hm, Wm, n_jb, *dout.stride(),
            *features.stride(), *masks.stride(), float(torch.tensor(threshold, dtype=torch.float32).item()),
            SAME_H=same_h, SAME_W=same_w, OFF64=_off64(features), PREC=pr, PREC_A=pr,
            BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc, BLOCK_I=bi, BLOCK_J=bj, num_warps=warps)
    return dx, dm
