"""Euler sampling of the LaVin-DiT flow ODE (official ``sample_ode(sampling_method="euler")``, spec §3), with CFG.

The official sampler integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on hard-coded time grids of
20, 30 or 40 points (so 19, 29 or 39 Euler steps; the velocity is never evaluated at t = 1). We keep those grids
bitwise (fp32 literals) and add a rule for any other number of points (:func:`time_grid`).

dtype behaviour reproduced from torchdiffeq (``official_dtypes=True``): the model sees t cast to the state's dtype at
step 0 (bf16 state) and fp32 afterwards; the state becomes fp32 after the first update (bf16 + fp32 * fp32); the
returned sample is rounded back to the initial state's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

# The official grids (lib/transport/integrators.py), fp32 literals.
OFFICIAL_GRIDS = {
    20: (0.0000, 0.0056, 0.0111, 0.0167, 0.0222, 0.0278, 0.0333, 0.0389, 0.0444, 0.0500, 0.0524, 0.0730, 0.1148,
         0.1777, 0.2618, 0.3671, 0.4936, 0.6412, 0.8100, 1.0000),
    30: (0.0000, 0.0036, 0.0071, 0.0107, 0.0143, 0.0179, 0.0214, 0.0250, 0.0286, 0.0321, 0.0357, 0.0393, 0.0429,
         0.0464, 0.0500, 0.0511, 0.0600, 0.0779, 0.1049, 0.1410, 0.1862, 0.2403, 0.3036, 0.3759, 0.4573, 0.5477,
         0.6472, 0.7557, 0.8733, 1.0000),
    40: (0.0000, 0.0026, 0.0053, 0.0079, 0.0105, 0.0132, 0.0158, 0.0184, 0.0211, 0.0237, 0.0263, 0.0289, 0.0316,
         0.0342, 0.0368, 0.0395, 0.0421, 0.0447, 0.0474, 0.0500, 0.0506, 0.0555, 0.0655, 0.0804, 0.1004, 0.1253,
         0.1553, 0.1902, 0.2302, 0.2752, 0.3251, 0.3801, 0.4401, 0.5051, 0.5750, 0.6500, 0.7300, 0.8150, 0.9050,
         1.0000),
}
HIGH_NOISE_END = 0.05


def time_grid(num_points: int) -> torch.Tensor:
    """The time grid (fp32, from 0 to 1) with ``num_points`` points (num_points - 1 Euler steps).

    20, 30 and 40 give the official grids exactly. Any other count >= 2 follows their shape: the first
    n1 = num_points // 2 points are uniform on [0, 0.05] (the high-noise range where the official grids spend half their
    steps), and the remaining points grow quadratically from 0.05 to 1 (increments that grow linearly, as in the
    official grids' second half).
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"time_grid: num_points must be an int >= 2, got {num_points!r}")
    if num_points in OFFICIAL_GRIDS:
        return torch.tensor(OFFICIAL_GRIDS[num_points], dtype=torch.float32)
    n1 = num_points // 2
    n2 = num_points - n1
    head = torch.linspace(0.0, HIGH_NOISE_END, n1, dtype=torch.float64) if n1 > 1 else torch.zeros(1, dtype=torch.float64)
    s = torch.arange(1, n2 + 1, dtype=torch.float64) / n2
    tail = HIGH_NOISE_END + (1.0 - HIGH_NOISE_END) * s * s
    return torch.cat([head, tail]).float()


def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, grid: torch.Tensor,
          official_dtypes: bool = True) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t_vec) over ``grid`` with Euler steps; t_vec is t repeated to x's batch.

    Returns the final state, in x's dtype when ``official_dtypes`` (torchdiffeq's output buffer), else fp32.
    """
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"euler: grid must be a 1-D tensor of >= 2 times, got shape {tuple(grid.shape)}")
    y = x
    B = x.shape[0]
    grid = grid.to(device=x.device, dtype=torch.float32)
    for k in range(grid.numel() - 1):
        t = grid[k]
        t_model = t.to(y.dtype) if official_dtypes else t  # torchdiffeq casts t to the state's dtype
        v = velocity(y, t_model.expand(B).float())
        y = y + (grid[k + 1] - t) * v.float()  # bf16 + fp32 -> fp32 from the first step on
    return y.to(x.dtype) if official_dtypes else y


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The official guidance in fp32: v_u + scale * (v_c - v_u)."""
    v_u = v_uncond.float()
    return v_u + scale * (v_cond.float() - v_u)
