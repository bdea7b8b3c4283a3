"""3D RoPE Triton kernel: the ``triton`` backend. Semantics: see reference.py.

A program takes BLOCK_L tokens of one batch row. It computes their angles once, as a [BLOCK_L, D/2] tile (the
coordinate of each token on each pair's axis times the pair's inverse frequency), and then rotates every head of
those tokens with it. Reads use x's strides (a view of a [B, L, H*D] projection output needs no copy); the output
is contiguous. The inverse frequencies come from a [D/2] fp32 table computed once per (split, base, device).

Angles reach hundreds of radians. tl.sin/tl.cos lower to libdevice's __nv_sinf/__nv_cosf, which reduce large
arguments accurately (not to sin.approx); tests/ops/test_triton_compile.py checks that in the generated PTX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkernels.ops.rope3d.reference import inv_freq_on


@triton.jit
def _rope3d_kernel(X, INV_FREQ, Y, L, H, stride_xb, stride_xl, stride_xh, stride_xd,
                   grid_h, grid_w, off_t, off_h, off_w, pairs_t, pairs_h, sign,
                   P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    toks = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    tok_ok = toks < L
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P

    # Which axis each pair belongs to, and where its two elements sit in the head vector.
    in_t = p < pairs_t
    in_h = (p >= pairs_t) & (p < pairs_t + pairs_h)
    first = tl.where(in_t, 0, tl.where(in_h, pairs_t, pairs_t + pairs_h))  # first pair of the chunk
    half = tl.where(in_t, pairs_t, tl.where(in_h, pairs_h, P - pairs_t - pairs_h))
    lo = 2 * first + (p - first)
    hi = lo + half

    # Angles for the tile: coordinate on the pair's axis times its inverse frequency, in fp32.
    coord_t = toks // (grid_h * grid_w) + off_t
    coord_h = (toks // grid_w) % grid_h + off_h
    coord_w = toks % grid_w + off_w
    coord = tl.where(in_t[None, :], coord_t[:, None], tl.where(in_h[None, :], coord_h[:, None], coord_w[:, None]))
    freq = tl.load(INV_FREQ + p, mask=p_ok, other=0.0)
    theta = coord.to(tl.float32) * freq[None, :]
    c = tl.cos(theta)
    s = tl.sin(theta) * sign

    mask = tok_ok[:, None] & p_ok[None, :]
    toks64 = toks.to(tl.int64)
    x_tok = X + b * stride_xb + toks64[:, None] * stride_xl
    y_tok = Y + ((b * L + toks64) * H)[:, None] * (2 * P)
    out_ty = Y.dtype.element_ty
    for h in range(H):
        xp = x_tok + h * stride_xh
        x_lo = tl.load(xp + lo[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x_hi = tl.load(xp + hi[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        yp = y_tok + h * (2 * P)
        tl.store(yp + lo[None, :], (x_lo * c - x_hi * s).to(out_ty), mask=mask)
        tl.store(yp + hi[None, :], (x_hi * c + x_lo * s).to(out_ty), mask=mask)


def forward(x: torch.Tensor, grid, split, base: float, offsets, inverse: bool) -> torch.Tensor:
    B, L, H, D = x.shape
    y = torch.empty((B, L, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    P = D // 2
    block_p = triton.next_power_of_2(max(P, 1))
    block_l = max(1, min(64, 2048 // block_p))
    freq = inv_freq_on(tuple(split), float(base), x.device)
    _rope3d_kernel[(triton.cdiv(L, block_l), B)](
        x, freq, y, L, H, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        grid[1], grid[2], offsets[0], offsets[1], offsets[2], split[0] // 2, split[1] // 2,
        -1.0 if inverse else 1.0, P=P, BLOCK_L=block_l, BLOCK_P=block_p, num_warps=4)
    return y
