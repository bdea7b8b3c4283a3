"""AdaRN Triton kernels: the ``triton`` backend. Semantics and rounding points: see reference.py.

Both kernels see x's rows as [Bk, T, D] (``reference.geometry``): Bk groups (samples) of T rows that share one
scale/gate row. Each program owns a contiguous range of rows of one group, so it loads its scale/gate row once
and keeps (1 + scale) and tanh(gate) in registers for all its rows. Rows and groups take arbitrary strides (x a
slice of a wider tensor, the chunks of LaVin-DiT's [B, 4D] modulation); the last dim must have unit stride, and the
launchers make one contiguous copy of a tensor whose last stride is not 1 (e.g. the stride-0 upstream grad of
``y.sum().backward()``).

Forward: one pass over x (+ residual): fp32 sum of squares, rstd, then the elementwise chain with a rounding to
the output dtype after each op, exactly where the torch composition rounds; writes y and the fp32 rstd per row.
Rows wider than MAX_TILE_D loop over column tiles twice (statistics, then output).

Backward: one pass over rows (x, dy, rstd -> dx) while each program accumulates its fp32 dscale/dgate partial sums
for its rows in registers, then writes them to its own row of a [programs, D] buffer (no atomics). The caller sums
the partials over a group's programs in a fixed order (``torch.sum`` over one dim), so results are deterministic.

tanh: on a GPU, libdevice's ``__nv_tanhf``, the CUDA math library's tanhf that torch's CUDA tanh calls too (so
tanh(gate) should round identically; not yet checked on a GPU: the gpu-marked tests do). The CPU interpreter
cannot call libdevice, so there a portable fp32 tanh runs (``_tanh_portable``: an odd Taylor polynomial for
|x| < 0.4, (1 - e) / (1 + e) with e = exp(-2|x|) above; a few fp32 ulp), tested against torch.tanh: rounded to fp16
or bf16 it equals torch.tanh for every finite value of those types.

Parity with the official composition (measured on the CPU, fp16, interpreter; x*3, scale*0.5, gate, residual
standard normal; shapes [2,512,72], [2,64,2304], [4,300,100], [2,8,9000]; tests/ops/test_adarn.py checks it):
from the kernel's own normalized value, the rest of the chain ((1 + scale), tanh, both products, the residual add)
reproduces the composition bitwise. The normalized value itself differs in 18 of 632,640 elements (2.8e-5), by 1
ulp: fp32 rstd from a different summation order (and rsqrt) lands on the other side of a rounding boundary. In y
such an element is off by 1-2 ulp after the products, and by up to 8 ulp of y where the residual add cancels
(1.4e-5 to 3.5e-5 of all elements). bf16 on a GPU is not measured here (no GPU in this session). In fp32 the
roundings are no-ops, so on a GPU Triton may contract the gate product and the residual add into one FMA (one
rounding instead of two: within 1 fp32 ulp of the composition).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mmkernels.ops.adarn.reference import geometry, reduce_rows

MAX_TILE_D = 8192  # widest row held in one tile
TILE_ELEMS = 4096  # target elements per [BLOCK_M, BLOCK_D] tile


@triton.jit
def _tanh_portable(x):
    ax = tl.abs(x)
    xs = tl.where(ax < 0.4, x, 0.0)  # the polynomial's argument: large |x| would overflow x * x
    x2 = xs * xs
    # Taylor series of tanh to x^13: the first omitted term is < 5e-9 relative for |x| < 0.4.
    p = 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = xs + xs * (x2 * p)
    # Above 0.4, 1 - e >= 0.55: no cancellation. From |x| = 9 on, fp32 tanh is exactly 1; clamping at 20 keeps
    # -2|x| finite (and a NaN stays NaN: the comparison is false).
    e = tl.exp(-2.0 * tl.where(ax > 20.0, 20.0, ax))
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.4, small, big)


@triton.jit
def _tanh(x, LIBDEVICE_TANH: tl.constexpr):
    if LIBDEVICE_TANH:
        return libdevice.tanh(x)
    else:
        return _tanh_portable(x)


@triton.jit
def _modulation(S, G, b64, stride_sb, stride_gb, c, col_ok, out_ty: tl.constexpr,
                HAS_S: tl.constexpr, HAS_G: tl.constexpr, LIBDEVICE_TANH: tl.constexpr):
    """(m, t) for columns c of group b: fp32 copies of rnd(1 + scale) and rnd(tanh(gate)) (1 when absent)."""
    m = tl.full(c.shape, 1.0, tl.float32)
    t = tl.full(c.shape, 1.0, tl.float32)
    if HAS_S:
        s = tl.load(S + b64 * stride_sb + c, mask=col_ok, other=0.0).to(tl.float32)
        m = (1.0 + s).to(out_ty).to(tl.float32)
    if HAS_G:
        g = tl.load(G + b64 * stride_gb + c, mask=col_ok, other=0.0).to(tl.float32)
        t = _tanh(g, LIBDEVICE_TANH).to(out_ty).to(tl.float32)
    return m, t


@triton.jit
def _chain(x, rstd, m, t, r, out_ty: tl.constexpr, HAS_S: tl.constexpr, HAS_G: tl.constexpr,
           HAS_R: tl.constexpr):
    """The forward's elementwise chain on an fp32 [BLOCK_M, BLOCK_D] tile, rounding after each op."""
    y = (x * rstd[:, None]).to(out_ty).to(tl.float32)
    if HAS_S:
        y = (y * m[None, :]).to(out_ty).to(tl.float32)
    if HAS_G:
        y = (t[None, :] * y).to(out_ty).to(tl.float32)
    if HAS_R:
        y = (r + y).to(out_ty).to(tl.float32)
    return y.to(out_ty)


@triton.jit
def _adarn_fwd_kernel(X, S, G, R, Y, RSTD, T, D, rows_per_prog, progs_per_group,
                      stride_xb, stride_xt, stride_sb, stride_gb, stride_rb, stride_rt, eps,
                      HAS_S: tl.constexpr, HAS_G: tl.constexpr, HAS_R: tl.constexpr, LIBDEVICE_TANH: tl.constexpr,
                      ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b64 = (pid // progs_per_group).to(tl.int64)
    row_start = (pid % progs_per_group) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, T)
    x_base = X + b64 * stride_xb
    r_base = R + b64 * stride_rb
    y_base = Y + b64 * T * D  # y is contiguous [Bk, T, D]
    rstd_base = RSTD + b64 * T
    cols = tl.arange(0, BLOCK_D)
    out_ty = Y.dtype.element_ty
    if ONE_TILE:
        col_ok = cols < D
        m, t = _modulation(S, G, b64, stride_sb, stride_gb, cols, col_ok, out_ty, HAS_S, HAS_G, LIBDEVICE_TANH)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_base + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            r = x
            if HAS_R:
                r = tl.load(r_base + rows64[:, None] * stride_rt + cols[None, :], mask=mask, other=0.0)
                r = r.to(tl.float32)
            y = _chain(x, rstd, m, t, r, out_ty, HAS_S, HAS_G, HAS_R)
            tl.store(y_base + rows64[:, None] * D + cols[None, :], y, mask=mask)
            tl.store(rstd_base + rows, rstd, mask=row_ok)
    else:
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for c0 in range(0, D, BLOCK_D):
                c = c0 + cols
                mask = row_ok[:, None] & (c[None, :] < D)
                x = tl.load(x_base + rows64[:, None] * stride_xt + c[None, :], mask=mask, other=0.0)
                x = x.to(tl.float32)
                acc += x * x
            rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / D + eps)
            for c0 in range(0, D, BLOCK_D):
                c = c0 + cols
                col_ok = c < D
                mask = row_ok[:, None] & col_ok[None, :]
                m, t = _modulation(S, G, b64, stride_sb, stride_gb, c, col_ok, out_ty, HAS_S, HAS_G,
                                   LIBDEVICE_TANH)
                x = tl.load(x_base + rows64[:, None] * stride_xt + c[None, :], mask=mask, other=0.0)
                x = x.to(tl.float32)
                r = x
                if HAS_R:
                    r = tl.load(r_base + rows64[:, None] * stride_rt + c[None, :], mask=mask, other=0.0)
                    r = r.to(tl.float32)
                y = _chain(x, rstd, m, t, r, out_ty, HAS_S, HAS_G, HAS_R)
                tl.store(y_base + rows64[:, None] * D + c[None, :], y, mask=mask)
            tl.store(rstd_base + rows, rstd, mask=row_ok)


@triton.jit
def _adarn_bwd_kernel(DY, X, S, G, RSTD, DX, DSP, DGP, T, D, rows_per_prog, progs_per_group,
                      stride_dyb, stride_dyt, stride_xb, stride_xt, stride_sb, stride_gb,
                      HAS_S: tl.constexpr, HAS_G: tl.constexpr, LIBDEVICE_TANH: tl.constexpr,
                      ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b64 = (pid // progs_per_group).to(tl.int64)
    row_start = (pid % progs_per_group) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, T)
    x_base = X + b64 * stride_xb
    dy_base = DY + b64 * stride_dyb
    dx_base = DX + b64 * T * D  # dx is contiguous [Bk, T, D]
    rstd_base = RSTD + b64 * T
    part = pid.to(tl.int64) * D  # this program's row of the [programs, D] partial sums
    cols = tl.arange(0, BLOCK_D)
    out_ty = DX.dtype.element_ty
    if ONE_TILE:
        col_ok = cols < D
        m, t = _modulation(S, G, b64, stride_sb, stride_gb, cols, col_ok, out_ty, HAS_S, HAS_G, LIBDEVICE_TANH)
        coef = m * t
        ds = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum of dy * n over this program's rows
        dg = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum of dy * rnd(n * m)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_base + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(dy_base + rows64[:, None] * stride_dyt + cols[None, :], mask=mask, other=0.0)
            rstd = tl.load(rstd_base + rows, mask=row_ok, other=0.0)
            xhat = x.to(tl.float32) * rstd[:, None]
            dy = dy.to(tl.float32)
            g = dy * coef[None, :]
            dot = tl.sum(g * xhat, axis=1) / D
            dx = rstd[:, None] * (g - xhat * dot[:, None])
            tl.store(dx_base + rows64[:, None] * D + cols[None, :], dx.to(out_ty), mask=mask)
            if HAS_S or HAS_G:
                n = xhat.to(out_ty).to(tl.float32)
                if HAS_S:
                    ds += tl.sum(dy * n, axis=0)
                if HAS_G:
                    nm = n
                    if HAS_S:
                        nm = (n * m[None, :]).to(out_ty).to(tl.float32)
                    dg += tl.sum(dy * nm, axis=0)
        if HAS_S:
            tl.store(DSP + part + cols, ds * t, mask=col_ok)
        if HAS_G:
            tl.store(DGP + part + cols, dg * (1.0 - t * t), mask=col_ok)
    else:
        if HAS_S:
            for c0 in range(0, D, BLOCK_D):
                c = c0 + cols
                tl.store(DSP + part + c, tl.zeros([BLOCK_D], dtype=tl.float32), mask=c < D)
        if HAS_G:
            for c0 in range(0, D, BLOCK_D):
                c = c0 + cols
                tl.store(DGP + part + c, tl.zeros([BLOCK_D], dtype=tl.float32), mask=c < D)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            rstd = tl.load(rstd_base + rows, mask=row_ok, other=0.0)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for c0 in range(0, D, BLOCK_D):
                c = c0 + cols
                col_ok = c < D
                mask = row_ok[:, None] & col_ok[None, :]
                m, t = _modulation(S, G, b64, stride_sb, stride_gb, c, col_ok, out_ty, HAS_S, HAS_G,
                                   LIBDEVICE_TANH)
                x = tl.load(x_base + rows64[:, None] * stride_xt + c[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_base + rows64[:, None] * stride_dyt + c[None, :], mask=mask, other=0.0)
                acc += dy.to(tl.float32) * (m * t)[None, :] * (x.to(tl.float32) * rstd[:, None])
            dot = tl.sum(acc, axis=1) / D
            for c0 in range(0, D, BLOCK_D):
                c = c0 + cols
                col_ok = c < D
                mask = row_ok[:, None] & col_ok[None, :]
                m, t = _modulation(S, G, b64, stride_sb, stride_gb, c, col_ok, out_ty, HAS_S, HAS_G,
                                   LIBDEVICE_TANH)
                x = tl.load(x_base + rows64[:, None] * stride_xt + c[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_base + rows64[:, None] * stride_dyt + c[None, :], mask=mask, other=0.0)
                xhat = x.to(tl.float32) * rstd[:, None]
                dy = dy.to(tl.float32)
                g = dy * (m * t)[None, :]
                dx = rstd[:, None] * (g - xhat * dot[:, None])
                tl.store(dx_base + rows64[:, None] * D + c[None, :], dx.to(out_ty), mask=mask)
                if HAS_S or HAS_G:
                    n = xhat.to(out_ty).to(tl.float32)
                    if HAS_S:
                        p = tl.load(DSP + part + c, mask=col_ok, other=0.0)
                        tl.store(DSP + part + c, p + tl.sum(dy * n, axis=0) * t, mask=col_ok)
                    if HAS_G:
                        nm = n
                        if HAS_S:
                            nm = (n * m[None, :]).to(out_ty).to(tl.float32)
                        p = tl.load(DGP + part + c, mask=col_ok, other=0.0)
                        tl.store(DGP + part + c, p + tl.sum(dy * nm, axis=0) * (1.0 - t * t), mask=col_ok)


def _tile(d: int) -> tuple[bool, int, int, int]:
    """(one_tile, BLOCK_M, BLOCK_D, num_warps) for rows of width d."""
    block_d = triton.next_power_of_2(max(d, 1))
    one_tile = block_d <= MAX_TILE_D
    if not one_tile:
        block_d = TILE_ELEMS
    block_m = max(1, min(64, TILE_ELEMS // block_d))
    num_warps = 8 if block_m * block_d >= 4096 else 4
    return one_tile, block_m, block_d, num_warps


def _split(bk: int, t: int, block_m: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(rows_per_prog, progs_per_group): each group's T rows cut into ranges of whole BLOCK_M tiles, for about
    ``per_sm`` programs per SM in all (the interpreter gets few programs, which keeps its Python loop short)."""
    if device.type == "cuda":
        target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2
    progs = max(1, min(triton.cdiv(t, block_m), triton.cdiv(target, bk)))
    rows_per_prog = triton.cdiv(triton.cdiv(t, progs), block_m) * block_m
    return rows_per_prog, triton.cdiv(t, rows_per_prog)


def _rows3(v: torch.Tensor, bk: int, t: int, d: int) -> torch.Tensor:
    """v as [Bk, T, D] with unit last stride: a view where the strides allow one, else one copy."""
    v = v.reshape(bk, t, d)
    return v if v.stride(-1) == 1 or d <= 1 else v.contiguous()


def _vec(v: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
    """scale/gate [Bs, D] with unit last stride, and its group stride (0 for a row shared by every group)."""
    if v is None:
        return None, 0
    if v.stride(-1) != 1 and v.shape[-1] > 1:
        v = v.contiguous()
    return v, (v.stride(0) if v.shape[0] > 1 else 0)


def forward(x: torch.Tensor, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    bk, t, d = geometry(x, scale, gate)
    x3 = _rows3(x, bk, t, d)
    r3 = _rows3(residual, bk, t, d) if residual is not None else x3  # R is unused when HAS_R is False
    s, ssb = _vec(scale)
    g, gsb = _vec(gate)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    one_tile, block_m, block_d, num_warps = _tile(d)
    rows_per_prog, ppg = _split(bk, t, block_m, x.device, per_sm=8)
    _adarn_fwd_kernel[(bk * ppg,)](
        x3, s if s is not None else x3, g if g is not None else x3, r3, y, rstd, t, d, rows_per_prog, ppg,
        x3.stride(0), x3.stride(1), ssb, gsb, r3.stride(0), r3.stride(1), eps,
        HAS_S=scale is not None, HAS_G=gate is not None, HAS_R=residual is not None,
        LIBDEVICE_TANH=x.device.type == "cuda", ONE_TILE=one_tile, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps)
    return y, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor],
             rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    bk, t, d = geometry(x, scale, gate)
    x3, dy3 = _rows3(x, bk, t, d), _rows3(dy, bk, t, d)
    s, ssb = _vec(scale)
    g, gsb = _vec(gate)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    one_tile, block_m, block_d, num_warps = _tile(d)
    rows_per_prog, ppg = _split(bk, t, block_m, x.device, per_sm=2)
    progs = bk * ppg
    dsp = torch.empty((progs if s is not None else 0, d), dtype=torch.float32, device=x.device)
    dgp = torch.empty((progs if g is not None else 0, d), dtype=torch.float32, device=x.device)
    _adarn_bwd_kernel[(progs,)](
        dy3, x3, s if s is not None else x3, g if g is not None else x3, rstd.reshape(-1), dx,
        dsp if s is not None else x3, dgp if g is not None else x3, t, d, rows_per_prog, ppg,
        dy3.stride(0), dy3.stride(1), x3.stride(0), x3.stride(1), ssb, gsb,
        HAS_S=s is not None, HAS_G=g is not None, LIBDEVICE_TANH=x.device.type == "cuda",
        ONE_TILE=one_tile, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    # Fixed-order reductions of the per-program partials: over a group's programs, then over groups for a shared row.
    dscale = reduce_rows(dsp.view(bk, ppg, d).sum(dim=1), scale.shape[0]).to(scale.dtype) if s is not None else None
    dgate = reduce_rows(dgp.view(bk, ppg, d).sum(dim=1), gate.shape[0]).to(gate.dtype) if g is not None else None
    return dx, dscale, dgate


def aot_cases(arch: int, dt: str):
    """(name, kernel, arch, types, constexprs) for tests/ops/triton_aot.py, which compiles every Triton kernel for
    sm_90/sm_80 without a GPU, at the launchers' GPU configurations (``_tile``; libdevice tanh) for LaVin-DiT's
    widths: 2304 (one [1, 4096] tile), 72 (a [32, 128] tile) and 9000 (the looped path). Every flag combination
    for the production target (sm_90, bf16, D=2304), the fused kernels elsewhere, and the portable tanh once."""
    types = {**{n: f"*{dt}" for n in ("X", "S", "G", "R", "Y", "DY", "DX")},
             **{n: "*fp32" for n in ("RSTD", "DSP", "DGP")}, "eps": "fp32"}  # every other runtime int is i32
    full = arch == 90 and dt == "bf16"
    variants = [(2304, True, True), (2304, False, False), (72, False, True), (9000, False, True)] if full else \
        [(2304, False, True), (9000, False, True)]
    for d, all_flags, libdevice_tanh in variants:
        one_tile, block_m, block_d, num_warps = _tile(d)
        tiles = dict(ONE_TILE=one_tile, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
        tag = f"sm{arch}-{dt}-D{d}-tanh{'lib' if libdevice_tanh else 'portable'}"
        for s, g, r in itertools.product((False, True), repeat=3) if all_flags else [(True, True, True)]:
            yield (f"adarn_fwd-{tag}-s{int(s)}g{int(g)}r{int(r)}", _adarn_fwd_kernel, arch, types,
                   dict(HAS_S=s, HAS_G=g, HAS_R=r, LIBDEVICE_TANH=libdevice_tanh, **tiles))
        for s, g in itertools.product((False, True), repeat=2) if all_flags else [(True, True)]:
            yield (f"adarn_bwd-{tag}-s{int(s)}g{int(g)}", _adarn_bwd_kernel, arch, types,
                   dict(HAS_S=s, HAS_G=g, LIBDEVICE_TANH=libdevice_tanh, **tiles))
