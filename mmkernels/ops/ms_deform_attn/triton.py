"""Multi-scale deformable attention Triton kernels: the ``triton`` backend. Semantics: reference.py.

Layout of the work: a program owns BLOCK_Q queries of one (batch, head) and all C channels of that head (C <= 1024,
padded to a power of two in registers). It walks the L*P samples of its queries; per sample it reads the location
and weight of each query once and gathers the 4 corner rows [BLOCK_Q, C] of value. Consecutive queries of one head
sample nearby pixels of the same maps, so the gathers mostly hit L2 (value at the Unpair-Seg shapes is 11 MB in
bf16 per image). Value and grad_out are read through their strides (no copy); locations and weights are made
contiguous (a no-op for the module's outputs).

Forward: out[b, q, h*C:(h+1)*C] accumulated in fp32, written once in value's dtype.

Backward, one pass per program over the same samples: grad_out's [BLOCK_Q, C] tile is read once; per sample the 4
corners are gathered again, giving grad_attn (sum over c of g * sampled value) and grad_loc (W_l or H_l * attn *
sum over c of g * the interpolant's derivative) complete in the program (each sample is owned by one program: no
atomics, deterministic); grad_value is scattered with fp32 atomics into a zeroed [B, S, H, C] fp32 buffer and cast
to value's dtype at the end. With ``deterministic=True`` grad_value instead comes from a second kernel that owns
one value row per program and gathers its contributions over the CSR plan (plan.py) in plan order, BLOCK_E entries
at a time, each block reduced by a fixed tree: the result is bitwise repeatable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkernels.ops.ms_deform_attn import plan as _plan

MAX_C = 1024  # channels per head held in one program
TILE_ELEMS = 2048  # target elements of a [BLOCK_Q, BLOCK_C] tile
BLOCK_E = 16  # plan entries per step of the deterministic value-gradient gather


def supports_sizes(value: torch.Tensor) -> str | None:
    C = value.shape[3]
    if C > MAX_C:
        return f"the Triton kernels hold a head's C = {C} channels in one program; at most {MAX_C} are supported"
    return None


@triton.jit
def _sample_setup(LOC, SS, LSI, sidx, q_ok, l):
    """Per query of the tile: the level's table entries and the bilinear cell of sample ``sidx``."""
    Hl = tl.load(SS + 2 * l)
    Wl = tl.load(SS + 2 * l + 1)
    start = tl.load(LSI + l)
    lx = tl.load(LOC + 2 * sidx, mask=q_ok, other=0.0).to(tl.float32)
    ly = tl.load(LOC + 2 * sidx + 1, mask=q_ok, other=0.0).to(tl.float32)
    x = lx * Wl.to(tl.float32) - 0.5
    y = ly * Hl.to(tl.float32) - 0.5
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return Hl, Wl, start, x - x0f, y - y0f, x0f.to(tl.int32), y0f.to(tl.int32)


@triton.jit
def _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, xc, yc):
    """The value rows [BLOCK_Q, BLOCK_C] (fp32, 0 outside the map) at integer corner (xc, yc), and their pointers
    and mask (for the gradient scatter)."""
    ok = q_ok & (xc >= 0) & (xc < Wl) & (yc >= 0) & (yc < Hl)
    row = (start + yc * Wl + xc).to(tl.int64)
    ptr = vbase + row[:, None] * stride_vs + cofs[None, :]
    m = ok[:, None] & c_ok[None, :]
    return tl.load(V + ptr, mask=m, other=0.0).to(tl.float32), ptr, m


@triton.jit
def _msda_fwd_kernel(V, SS, LSI, LOC, ATTN, OUT, Q, H, C, L, P,
                     stride_vb, stride_vs, stride_vh, stride_vc,
                     BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    vbase = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    cofs = cs.to(tl.int64) * stride_vc
    # sample index of (b, q, h, l=0, p=0) in the flat [B, Q, H, L, P] layout
    s0 = ((b.to(tl.int64) * Q + qs) * H + h) * (L * P)
    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    for l in range(L):
        for p in range(P):
            sidx = s0 + l * P + p
            Hl, Wl, start, fx, fy, x0, y0 = _sample_setup(LOC, SS, LSI, sidx, q_ok, l)
            a = tl.load(ATTN + sidx, mask=q_ok, other=0.0).to(tl.float32)
            v00, _p, _m = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0, y0)
            v01, _p, _m = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0 + 1, y0)
            v10, _p, _m = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0, y0 + 1)
            v11, _p, _m = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0 + 1, y0 + 1)
            top = v00 * (1.0 - fx)[:, None] + v01 * fx[:, None]
            bot = v10 * (1.0 - fx)[:, None] + v11 * fx[:, None]
            samp = top * (1.0 - fy)[:, None] + bot * fy[:, None]
            acc += samp * a[:, None]
    out_ptr = ((b.to(tl.int64) * Q + qs) * H + h)[:, None] * C + cs[None, :]
    tl.store(OUT + out_ptr, acc.to(OUT.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


@triton.jit
def _msda_bwd_kernel(V, SS, LSI, LOC, ATTN, G, DV, DLOC, DATTN, S, Q, H, C, L, P,
                     stride_vb, stride_vs, stride_vh, stride_vc,
                     stride_gb, stride_gq, stride_gc,
                     SCATTER_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    qc_ok = q_ok[:, None] & c_ok[None, :]
    vbase = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    cofs = cs.to(tl.int64) * stride_vc
    g_ptr = (b.to(tl.int64) * stride_gb + qs.to(tl.int64)[:, None] * stride_gq
             + (h * C + cs).to(tl.int64)[None, :] * stride_gc)
    g = tl.load(G + g_ptr, mask=qc_ok, other=0.0).to(tl.float32)
    # grad_value buffer: contiguous [B, S, H, C] fp32
    dvbase = (b.to(tl.int64) * S * H + h) * C
    s0 = ((b.to(tl.int64) * Q + qs) * H + h) * (L * P)
    for l in range(L):
        for p in range(P):
            sidx = s0 + l * P + p
            Hl, Wl, start, fx, fy, x0, y0 = _sample_setup(LOC, SS, LSI, sidx, q_ok, l)
            a = tl.load(ATTN + sidx, mask=q_ok, other=0.0).to(tl.float32)
            v00, p00, m00 = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0, y0)
            v01, p01, m01 = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0 + 1, y0)
            v10, p10, m10 = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0, y0 + 1)
            v11, p11, m11 = _corner(V, vbase, stride_vs, cofs, c_ok, q_ok, start, Hl, Wl, x0 + 1, y0 + 1)
            gx = 1.0 - fx
            gy = 1.0 - fy
            top = v00 * gx[:, None] + v01 * fx[:, None]
            bot = v10 * gx[:, None] + v11 * fx[:, None]
            samp = top * gy[:, None] + bot * fy[:, None]
            dsdx = (v01 - v00) * gy[:, None] + (v11 - v10) * fy[:, None]
            dsdy = bot - top
            tl.store(DATTN + sidx, tl.sum(g * samp, axis=1).to(DATTN.dtype.element_ty), mask=q_ok)
            ag = a * Wl.to(tl.float32)
            tl.store(DLOC + 2 * sidx, (ag * tl.sum(g * dsdx, axis=1)).to(DLOC.dtype.element_ty), mask=q_ok)
            ag = a * Hl.to(tl.float32)
            tl.store(DLOC + 2 * sidx + 1, (ag * tl.sum(g * dsdy, axis=1)).to(DLOC.dtype.element_ty), mask=q_ok)
            if SCATTER_DV:
                ga = g * a[:, None]
                # The buffer is contiguous [B, S, H, C]: the corner's row offset in it, from value's pointer.
                for_row = (start + y0 * Wl + x0).to(tl.int64)
                d00 = dvbase + for_row[:, None] * (H * C) + cs[None, :]
                tl.atomic_add(DV + d00, ga * (gx * gy)[:, None], mask=m00)
                tl.atomic_add(DV + d00 + H * C, ga * (fx * gy)[:, None], mask=m01)
                d10 = d00 + Wl.to(tl.int64) * (H * C)
                tl.atomic_add(DV + d10, ga * (gx * fy)[:, None], mask=m10)
                tl.atomic_add(DV + d10 + H * C, ga * (fx * fy)[:, None], mask=m11)


@triton.jit
def _msda_dv_gather_kernel(ENT, OFS, SS, LSI, LOC, ATTN, G, DV, S, Q, H, C, L, P,
                           stride_gb, stride_gq, stride_gc,
                           BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // (S * H)
    s = (r // H) % S
    h = r % H
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    lo = tl.load(OFS + r)
    hi = tl.load(OFS + r + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    es = tl.arange(0, BLOCK_E)
    for i in range(lo, hi, BLOCK_E):
        e_ok = i + es < hi
        e = tl.load(ENT + i + es, mask=e_ok, other=0)
        p = e % P
        l = (e // P) % L
        q = (e // (P * L * H)) % Q
        Hl = tl.load(SS + 2 * l, mask=e_ok, other=1)
        Wl = tl.load(SS + 2 * l + 1, mask=e_ok, other=1)
        rel = s - tl.load(LSI + l, mask=e_ok, other=0)
        yc = (rel // Wl).to(tl.float32)
        xc = (rel % Wl).to(tl.float32)
        x = tl.load(LOC + 2 * e, mask=e_ok, other=0.0).to(tl.float32) * Wl.to(tl.float32) - 0.5
        y = tl.load(LOC + 2 * e + 1, mask=e_ok, other=0.0).to(tl.float32) * Hl.to(tl.float32) - 0.5
        w = tl.maximum(1.0 - tl.abs(x - xc), 0.0) * tl.maximum(1.0 - tl.abs(y - yc), 0.0)
        a = tl.load(ATTN + e, mask=e_ok, other=0.0).to(tl.float32)
        coef = tl.where(e_ok, w * a, 0.0)
        g_ptr = b * stride_gb + q[:, None] * stride_gq + (h * C + cs)[None, :].to(tl.int64) * stride_gc
        g = tl.load(G + g_ptr, mask=e_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(g * coef[:, None], axis=0)
    tl.store(DV + r * C + cs, acc.to(DV.dtype.element_ty), mask=c_ok)


def _blocks(Q: int, C: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(C)
    block_q = max(1, min(64, TILE_ELEMS // block_c, triton.next_power_of_2(Q)))
    return block_q, block_c


def _tables(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    return (spatial_shapes.to(device=device, dtype=torch.int32).contiguous(),
            level_start_index.to(device=device, dtype=torch.int32).contiguous())


def forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    B, S, H, C = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    ss, lsi = _tables(spatial_shapes, level_start_index, value.device)
    loc = sampling_locations.contiguous()
    attn = attention_weights.contiguous()
    out = torch.empty((B, Q, H * C), dtype=value.dtype, device=value.device)
    block_q, block_c = _blocks(Q, C)
    grid = (triton.cdiv(Q, block_q), B * H)
    _msda_fwd_kernel[grid](value, ss, lsi, loc, attn, out, Q, H, C, L, P, *value.stride(),
                           BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=4)
    return out


def backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
             level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, H, C = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    ss, lsi = _tables(spatial_shapes, level_start_index, value.device)
    loc = sampling_locations.contiguous()
    attn = attention_weights.contiguous()
    g = grad_out.view(B, Q, H * C) if grad_out.dim() == 3 else grad_out.reshape(B, Q, H * C)
    dloc = torch.empty_like(loc)
    dattn = torch.empty_like(attn)
    if deterministic:
        dv32 = dloc  # unused by the kernel when SCATTER_DV is False
    else:
        dv32 = torch.zeros((B, S, H, C), dtype=torch.float32, device=value.device)
    block_q, block_c = _blocks(Q, C)
    grid = (triton.cdiv(Q, block_q), B * H)
    _msda_bwd_kernel[grid](value, ss, lsi, loc, attn, g, dv32, dloc, dattn, S, Q, H, C, L, P, *value.stride(),
                           *g.stride(), SCATTER_DV=not deterministic, BLOCK_Q=block_q, BLOCK_C=block_c,
                           num_warps=4)
    if deterministic:
        entries, offsets = _plan.value_grad_csr(spatial_shapes, level_start_index, loc, S)
        dv = torch.empty((B, S, H, C), dtype=value.dtype, device=value.device)
        _msda_dv_gather_kernel[(B * S * H,)](entries, offsets, ss, lsi, loc, attn, g, dv, S, Q, H, C, L, P,
                                             *g.stride(), BLOCK_E=BLOCK_E, BLOCK_C=block_c, num_warps=1)
    else:
        dv = dv32.to(value.dtype)
    return dv, dloc, dattn
