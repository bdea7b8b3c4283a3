"""RMSNorm Triton kernels: the ``triton`` backend. Semantics: see reference.py.

Both kernels take a 2-D [M, N] view with arbitrary row and column strides (a stride-0 upstream grad from
``y.sum().backward()`` included; Triton specializes unit strides at compile time), so no input is copied.

Forward: a program normalizes BLOCK_M rows. When the row fits one tile (N <= MAX_TILE_N) it is read once; wider rows
loop over column tiles twice (sum of squares, then normalize).
Backward: a program owns a contiguous range of rows and keeps fp32 dw partial sums for its columns; the partials
[P, N] are summed by the caller. Wide rows loop over column tiles, accumulating dw in the program's own partial row.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_TILE_N = 8192  # widest row held in one tile
TILE_ELEMS = 4096  # target elements per [BLOCK_M, BLOCK_N] tile


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, M, N, stride_xm, stride_xn, eps,
                         HAS_W: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    out_ty = Y.dtype.element_ty
    if ONE_TILE:
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = (x * rstd[:, None]).to(out_ty)
        if HAS_W:
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(out_ty)
            y = (y.to(tl.float32) * w.to(tl.float32)).to(out_ty)
        tl.store(Y + rows64[:, None] * N + cols[None, :], y, mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(X + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
            x = x.to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(X + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
            y = (x.to(tl.float32) * rstd[:, None]).to(out_ty)
            if HAS_W:
                w = tl.load(W + c, mask=c < N, other=0.0).to(out_ty)
                y = (y.to(tl.float32) * w.to(tl.float32)).to(out_ty)
            tl.store(Y + rows64[:, None] * N + c[None, :], y, mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DWP, M, N, rows_per_prog,
                         stride_dym, stride_dyn, stride_xm, stride_xn,
                         HAS_W: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    cols = tl.arange(0, BLOCK_N)
    out_ty = DX.dtype.element_ty
    dwp_row = DWP + pid.to(tl.int64) * N
    if ONE_TILE:
        col_ok = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(out_ty).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
            dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x.to(tl.float32) * rstd[:, None]
            dy = dy.to(tl.float32)
            g = dy * w[None, :] if HAS_W else dy
            dot = tl.sum(g * xhat, axis=1) / N
            dx = rstd[:, None] * (g - xhat * dot[:, None])
            tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(out_ty), mask=mask)
            if HAS_W:
                dw += tl.sum(dy * xhat, axis=0)
        if HAS_W:
            tl.store(dwp_row + cols, dw, mask=col_ok)
    else:
        if HAS_W:
            for start in range(0, N, BLOCK_N):
                c = start + cols
                tl.store(dwp_row + c, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c < N)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < N)
                x = tl.load(X + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
                dy = tl.load(DY + rows64[:, None] * stride_dym + c[None, :] * stride_dyn, mask=mask, other=0.0)
                g = dy.to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + c, mask=c < N, other=0.0).to(out_ty).to(tl.float32)[None, :]
                acc += g * x.to(tl.float32) * rstd[:, None]
            dot = tl.sum(acc, axis=1) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < N)
                x = tl.load(X + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
                dy = tl.load(DY + rows64[:, None] * stride_dym + c[None, :] * stride_dyn, mask=mask, other=0.0)
                xhat = x.to(tl.float32) * rstd[:, None]
                dy = dy.to(tl.float32)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + c, mask=c < N, other=0.0).to(out_ty).to(tl.float32)[None, :]
                dx = rstd[:, None] * (g - xhat * dot[:, None])
                tl.store(DX + rows64[:, None] * N + c[None, :], dx.to(out_ty), mask=mask)
                if HAS_W:
                    part = tl.load(dwp_row + c, mask=c < N, other=0.0)
                    tl.store(dwp_row + c, part + tl.sum(dy * xhat, axis=0), mask=c < N)


def _tile(n: int) -> tuple[bool, int, int, int]:
    """(one_tile, BLOCK_M, BLOCK_N, num_warps) for rows of width n."""
    block_n = triton.next_power_of_2(max(n, 1))
    one_tile = block_n <= MAX_TILE_N
    if not one_tile:
        block_n = TILE_ELEMS
    block_m = max(1, min(64, TILE_ELEMS // block_n))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return one_tile, block_m, block_n, num_warps


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    # reshape returns a view whenever the leading dims can be merged (expanded grads included), else one copy.
    return t.reshape(-1, t.shape[-1])


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _as_2d(x)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    one_tile, block_m, block_n, num_warps = _tile(n)
    w = weight.contiguous() if weight is not None else x2  # W is unused when HAS_W is False
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, w, y, rstd, m, n, x2.stride(0), x2.stride(1), eps,
        HAS_W=weight is not None, ONE_TILE=one_tile, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, rstd


def _num_programs(m: int, block_m: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few programs keep the Python loop short
        target = 4
    return max(1, min(target, triton.cdiv(m, block_m)))


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
             rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    n = x.shape[-1]
    x2, dy2 = _as_2d(x), _as_2d(dy)
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    one_tile, block_m, block_n, num_warps = _tile(n)
    progs = _num_programs(m, block_m, x.device)
    rows_per_prog = triton.cdiv(m, progs)
    progs = triton.cdiv(m, rows_per_prog)
    has_w = weight is not None
    dwp = torch.empty((progs if has_w else 0, n), dtype=torch.float32, device=x.device)
    w = weight.contiguous() if has_w else x2
    _rms_norm_bwd_kernel[(progs,)](
        dy2, x2, w, rstd.reshape(-1), dx, dwp if has_w else x2, m, n, rows_per_prog,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        HAS_W=has_w, ONE_TILE=one_tile, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    dw = dwp.sum(dim=0).to(weight.dtype) if has_w else None
    return dx, dw
