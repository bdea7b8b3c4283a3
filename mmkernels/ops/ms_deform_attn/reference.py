"""Multi-scale deformable attention: the plain-PyTorch definition (the ``torch`` backend and the test oracle).

Semantics (Deformable-DETR's ``MSDeformAttnFunction``, ../shared/specs/unpair_seg.md §3.2)::

    value                 [B, S, H, C]        S = sum_l H_l * W_l rows, level l at rows [lsi_l, lsi_l + H_l*W_l),
                                              row-major (H_l, W_l); H heads of C channels
    spatial_shapes        [L, 2] int          rows (H_l, W_l)
    level_start_index     [L] int             lsi_l = sum_{k<l} H_k * W_k
    sampling_locations    [B, Q, H, L, P, 2]  (x, y) normalized to [0, 1] (x along W); any real value is allowed
    attention_weights     [B, Q, H, L, P]     any real value (softmaxed by the module, not required here)
    out                   [B, Q, H*C]         head-major channels

    out[b, q, h*C + c] = sum_{l, p} A[b,q,h,l,p] * bilinear_l(b, h, c; x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5)

bilinear_l takes the 4 integer neighbours (x0, y0) = floor(x, y), (x0+1, y0), (x0, y0+1), (x0+1, y0+1) with weights
(1-lx)(1-ly), lx(1-ly), (1-lx)ly, lx*ly (lx = x - x0, ly = y - y0); a neighbour outside the H_l x W_l map contributes
0. That is exactly ``F.grid_sample(V_l, 2*loc - 1, mode="bilinear", padding_mode="zeros", align_corners=False)``:
``forward`` computes it that way (the official fallback), ``gather_forward`` from explicit corners, and the tests
hold the two equal.

Gradients are for value, sampling_locations and attention_weights (the index tensors get none); the gradient of
the location is the derivative of the bilinear interpolant inside each cell (the floor is piecewise constant), i.e.
grad_loc_x = W_l * sum_c g * A * d(bilinear)/dx, as the official CUDA kernel and grid_sample.

Precision: computed in fp32 (fp64 for fp64 inputs) from inputs of any floating dtype, rounded once to value's dtype
at the end; gradients are rounded to the dtype of their input. ``backward`` gathers the 4 corners of every sample
(``torch.gather``) and differentiates explicitly (custom-op implementations run below autograd): it materializes
[B, Q, H, L, P, 4, C] and is meant as a definition, not for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkernels.ops.ms_deform_attn import plan as _plan


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _corners(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, loc: torch.Tensor):
    """The 4 bilinear corners of every sample, in the order (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1):
    rows [B, Q, H, L, P, 4] int64 into value's S axis (0 where the corner is outside its level), valid [..., 4]
    bool, and the cell fractions lx, ly [B, Q, H, L, P] in loc's dtype."""
    hw = spatial_shapes.to(device=loc.device, dtype=torch.int64)
    Hb, Wb = hw[:, 0].view(-1, 1), hw[:, 1].view(-1, 1)  # [L, 1]: broadcast over [..., L, P]
    x = loc[..., 0] * Wb.to(loc.dtype) - 0.5  # [B, Q, H, L, P]
    y = loc[..., 1] * Hb.to(loc.dtype) - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    lx, ly = x - x0, y - y0
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    start = level_start_index.to(device=loc.device, dtype=torch.int64).view(-1, 1)
    rows, valid = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xc, yc = x0 + dx, y0 + dy
            ok = (xc >= 0) & (xc < Wb) & (yc >= 0) & (yc < Hb)
            rows.append(torch.where(ok, start + yc * Wb + xc, torch.zeros_like(xc)))
            valid.append(ok)
    return torch.stack(rows, -1), torch.stack(valid, -1), lx, ly


def _weights(valid: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor):
    """Corner weights [..., 4] (zero outside the map) and their derivatives in lx and ly."""
    one = torch.ones_like(lx)
    wx = torch.stack([1 - lx, lx, 1 - lx, lx], -1)
    wy = torch.stack([1 - ly, 1 - ly, ly, ly], -1)
    sx = torch.stack([-one, one, -one, one], -1)
    sy = torch.stack([-one, -one, one, one], -1)
    m = valid.to(lx.dtype)
    return wx * wy * m, sx * wy * m, wx * sy * m


def _gather(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The corner rows of value: [B, Q, H, L, P, 4, C] (row 0 where the corner is outside; its weight is 0)."""
    B, S, H, C = value.shape
    Q, L, P = rows.shape[1], rows.shape[3], rows.shape[4]
    v = value.permute(0, 2, 1, 3)  # [B, H, S, C]
    idx = rows.permute(0, 2, 1, 3, 4, 5).reshape(B, H, Q * L * P * 4, 1).expand(-1, -1, -1, C)
    out = torch.gather(v, 2, idx).view(B, H, Q, L, P, 4, C)
    return out.permute(0, 2, 1, 3, 4, 5, 6)


def forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """out [B, Q, H*C] in value's dtype (module docstring), computed as the official PyTorch fallback does: one
    ``F.grid_sample`` per level (in fp32, or fp64), then the weighted sum over levels and points."""
    dt = compute_dtype(value, sampling_locations, attention_weights)
    v, loc, attn = value.to(dt), sampling_locations.to(dt), attention_weights.to(dt)
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    levels = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    out = torch.zeros((B * H, C, Q), dtype=dt, device=value.device)
    for lvl, ((h, w), start) in enumerate(zip(levels, starts)):
        vl = v[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * H, C, h, w)
        grid = (2 * loc[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        sampled = F.grid_sample(vl, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = attn[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * H, 1, Q, P)
        out += (sampled * a).sum(-1)
    return out.view(B, H, C, Q).permute(0, 3, 1, 2).reshape(B, Q, H * C).to(value.dtype).contiguous()


def gather_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The same output from the explicit 4-corner gather that ``backward`` differentiates (a second, independent
    formulation of the definition; the tests hold the two equal)."""
    dt = compute_dtype(value, sampling_locations, attention_weights)
    v, loc, attn = value.to(dt), sampling_locations.to(dt), attention_weights.to(dt)
    B, S, H, C = value.shape
    Q = loc.shape[1]
    rows, valid, lx, ly = _corners(spatial_shapes, level_start_index, loc)
    w, _, _ = _weights(valid, lx, ly)
    coef = w * attn.unsqueeze(-1)  # [B, Q, H, L, P, 4]
    out = (_gather(v, rows) * coef.unsqueeze(-1)).sum((3, 4, 5))  # [B, Q, H, C]
    return out.reshape(B, Q, H * C).to(value.dtype)


def backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
             level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value, grad_loc, grad_attn), each in its input's dtype, from the explicit derivatives (custom-op
    implementations run below autograd, so this cannot call it).

    grad_value is a scatter-add over the corners (float atomics on CUDA); with ``deterministic`` it is summed per
    value row over the CSR plan (plan.py) in a fixed order instead. On the CPU both are deterministic.
    """
    dt = compute_dtype(value, sampling_locations, attention_weights)
    v, loc, attn = value.to(dt), sampling_locations.to(dt), attention_weights.to(dt)
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    g = grad_out.to(dt).reshape(B, Q, H, 1, 1, 1, C)
    rows, valid, lx, ly = _corners(spatial_shapes, level_start_index, loc)
    w, dwx, dwy = _weights(valid, lx, ly)
    gv = (_gather(v, rows) * g).sum(-1)  # [B, Q, H, L, P, 4]: g . corner value
    dattn = (w * gv).sum(-1)
    hw = spatial_shapes.to(device=loc.device, dtype=dt)
    dx = (dwx * gv).sum(-1) * attn * hw[:, 1].view(-1, 1)
    dy = (dwy * gv).sum(-1) * attn * hw[:, 0].view(-1, 1)
    dloc = torch.stack([dx, dy], -1)
    if deterministic:
        dv = value_grad_from_plan(grad_out.to(dt), v, spatial_shapes, level_start_index, loc, attn)
    else:
        # A corner outside the map adds nothing: its weight is masked to 0, but 0 * NaN (a NaN or infinite location
        # or weight) would scatter NaN into value row 0, the row _corners indexes for outside corners.
        coef = torch.where(valid, w * attn.unsqueeze(-1), 0)
        contrib = g * coef.unsqueeze(-1)  # [B, Q, H, L, P, 4, C]
        contrib = contrib.permute(0, 2, 1, 3, 4, 5, 6).reshape(B, H, Q * L * P * 4, C)
        idx = rows.permute(0, 2, 1, 3, 4, 5).reshape(B, H, Q * L * P * 4, 1).expand(-1, -1, -1, C)
        dv = torch.zeros((B, H, S, C), dtype=dt, device=value.device).scatter_add_(2, idx, contrib)
        dv = dv.permute(0, 2, 1, 3)
    return (dv.to(value.dtype).contiguous(), dloc.to(sampling_locations.dtype),
            dattn.to(attention_weights.dtype))


def value_grad_from_plan(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                         level_start_index: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """grad_value [B, S, H, C] in grad_out's dtype, summed per destination row over the CSR plan.

    Each contribution is attn * w * grad_out with w = max(0, 1 - |x - xc|) * max(0, 1 - |y - yc|) and (yc, xc) the
    destination pixel (plan.py); ``torch.segment_reduce`` sums each row's contributions serially in plan order,
    so the result is bitwise repeatable on every device.
    """
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    entries, offsets = _plan.value_grad_csr(spatial_shapes, level_start_index, loc, S)
    dest = _plan.entry_rows(offsets)  # destination row of each entry
    b = dest // (S * H)
    s = (dest // H) % S
    h = dest % H
    p = entries % P
    lvl = (entries // P) % L
    q = (entries // (P * L * H)) % Q
    hw = spatial_shapes.to(device=loc.device, dtype=torch.int64)
    Wl, Hl = hw[lvl, 1], hw[lvl, 0]
    rel = s - level_start_index.to(device=loc.device, dtype=torch.int64)[lvl]
    yc, xc = rel // Wl, rel % Wl
    flat_loc = loc.reshape(-1, 2)
    x = flat_loc[entries, 0] * Wl.to(loc.dtype) - 0.5
    y = flat_loc[entries, 1] * Hl.to(loc.dtype) - 0.5
    w = (1 - (x - xc.to(x.dtype)).abs()).clamp_min(0) * (1 - (y - yc.to(y.dtype)).abs()).clamp_min(0)
    coef = w * attn.reshape(-1)[entries]
    g = grad_out.reshape(B, Q, H, C)[b, q, h]  # [E, C]
    contrib = g * coef.unsqueeze(-1)
    lengths = offsets[1:] - offsets[:-1]
    dv = torch.segment_reduce(contrib, "sum", lengths=lengths, axis=0, unsafe=True)
    return dv.view(B, S, H, C)

