"""Index bookkeeping shared by the ms_deform_attn backends: level-table validation and the CSR plan of the
deterministic value gradient.

The value gradient is a scatter: every sample (b, q, h, l, p) adds ``attn * corner weight * grad_out[b, q, h, :]``
to the value rows of its (up to) 4 in-range bilinear corners. Float atomics make that sum depend on the order in
which threads arrive. The deterministic mode turns it into a gather: ``value_grad_csr`` lists, for every
destination row r = (b*S + s)*H + h of value, the samples that touch it, in ascending sample id, so a kernel that
owns row r sums them in a fixed order. Built with torch ops only (a stable sort and a bincount, both deterministic
on every device); it costs O(B*Q*H*L*P) int64 memory (4 entries per sample).
"""

from __future__ import annotations

from typing import Optional

import torch

# Level tables already checked, keyed by what identifies their contents: a table on the GPU is checked once (one
# device-to-host copy), not on every call, until it is modified in place (its version counter moves) or freed.
_CHECKED: dict[tuple, None] = {}
_CHECKED_MAX = 64


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t._version, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())


def check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> Optional[str]:
    """None when spatial_shapes [L, 2] (H_l, W_l >= 1) and level_start_index [L] (the exclusive cumulative sum of
    H_l * W_l) describe exactly S value rows, else a sentence saying what is wrong."""
    key = (_key(spatial_shapes), _key(level_start_index), int(S))
    if key in _CHECKED:
        return None
    hw = spatial_shapes.detach().to("cpu", torch.int64)
    lsi = level_start_index.detach().to("cpu", torch.int64)
    if bool((hw < 1).any()):
        return f"every level must have H_l, W_l >= 1, got spatial_shapes {hw.tolist()}"
    sizes = hw[:, 0] * hw[:, 1]
    if int(sizes.sum()) != S:
        return (f"the levels' sizes sum to {int(sizes.sum())} (spatial_shapes {hw.tolist()}) but value has "
                f"S = {S} rows")
    expected = torch.cumsum(sizes, 0) - sizes
    if not torch.equal(lsi, expected):
        return (f"level_start_index must be the exclusive cumulative sum of H_l * W_l, {expected.tolist()}, got "
                f"{lsi.tolist()}")
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = None
    return None


def value_grad_csr(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                   S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entries, offsets): the samples touching each value row, for a gather-form value gradient.

    entries: int64 [E], sample ids e = (((b*Q + q)*H + h)*L + l)*P + p (the flat index of sampling_locations[..., 0]
             divided by 2); offsets: int64 [B*S*H + 1]. Row r = (b*S + s)*H + h owns entries[offsets[r]:offsets[r+1]],
             ascending. A sample is listed under every in-range corner of its bilinear footprint, computed from
             x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5 in fp32 (fp64 for fp64 locations) and floor(). Kernels
             take the corner's pixel from the row (not from their own floor), so rounding cannot disagree.
    """
    B, Q, H, L, P, _ = sampling_locations.shape
    dev = sampling_locations.device
    dt = torch.float64 if sampling_locations.dtype == torch.float64 else torch.float32
    loc = sampling_locations.detach().to(dt)
    hw = spatial_shapes.to(device=dev, dtype=torch.int64)
    Hl, Wl = hw[:, 0].view(-1, 1), hw[:, 1].view(-1, 1)
    start = level_start_index.to(device=dev, dtype=torch.int64).view(-1, 1)
    x0 = torch.floor(loc[..., 0] * hw[:, 1].to(dt).view(-1, 1) - 0.5).to(torch.int64)  # [B, Q, H, L, P]
    y0 = torch.floor(loc[..., 1] * hw[:, 0].to(dt).view(-1, 1) - 0.5).to(torch.int64)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, 1, H, 1, 1)
    keys = []
    for dy in (0, 1):
        for dx in (0, 1):
            xc, yc = x0 + dx, y0 + dy
            valid = (xc >= 0) & (xc < Wl) & (yc >= 0) & (yc < Hl)
            row = ((b * S + start + yc * Wl + xc) * H + h)
            keys.append(torch.where(valid, row, torch.full_like(row, -1)))
    keys = torch.stack(keys, -1).reshape(-1)  # sample-major, so equal keys are in ascending sample id
    ids = torch.arange(keys.numel(), device=dev) // 4
    keep = keys >= 0
    keys, ids = keys[keep], ids[keep]
    keys, order = torch.sort(keys, stable=True)
    entries = ids[order]
    counts = torch.bincount(keys, minlength=B * S * H)
    offsets = torch.zeros(B * S * H + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    return entries, offsets


def entry_rows(offsets: torch.Tensor) -> torch.Tensor:
    """The destination row of every entry of a CSR plan (int64 [E])."""
    rows = torch.arange(offsets.numel() - 1, device=offsets.device)
    return torch.repeat_interleave(rows, offsets[1:] - offsets[:-1])
