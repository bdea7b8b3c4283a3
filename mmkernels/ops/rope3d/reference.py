"""3D rotary position embedding (LaVin-DiT's ``RotaryEmbedding3D``): the definition and the ``torch`` backend.

Layout: ``x`` is [B, L, H, D]: batch, tokens, heads, head dim (any strides, e.g. a view of a [B, L, H*D]
projection output). The output has the same shape and dtype, contiguous.

Positions: the L tokens cover a (T, Hg, Wg) grid in row-major (t, h, w) order, so token n sits at
``(n // (Hg*Wg) + o_t, (n // Wg) % Hg + o_h, n % Wg + o_w)`` with integer offsets ``(o_t, o_h, o_w)``
(default 0). In LaVin-DiT the condition frames come first, so they get t = 0..T_c-1 and the target t = T_c...

Rotation: the head dim is split into contiguous chunks ``split = (d_t, d_h, d_w)`` (even parts summing to D; the
official split is D//3 each, which needs D % 6 == 0). Chunk a rotates by its axis coordinate. Inside a chunk of
size d, element i pairs with element i + d/2 (rotate-half, NeoX style) at frequency::

    inv_freq_i = 1 / base ** ((2i) / d)        i = 0 .. d/2-1, fp32, exactly as the official table
    theta_i    = coord * inv_freq_i            fp32
    out_i       = x_i * cos(theta_i) - x_{i+d/2} * sin(theta_i)
    out_{i+d/2} = x_{i+d/2} * cos(theta_i) + x_i * sin(theta_i)

Arithmetic is fp32 with one rounding to x's dtype at the end. (The official code rounds cos/sin to bf16 and rounds
after every multiply and add; :func:`rope3d_official_style` mirrors that, for baselines and parity checks.)

Backward is the inverse rotation (theta -> -theta), so ``inverse=True`` gives the gradient.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

Triple = tuple[int, int, int]


def default_split(head_dim: int) -> Triple:
    """The official split, D//3 per axis. Needs D % 6 == 0 so that the parts are equal and even."""
    if head_dim % 6 != 0:
        raise ValueError(f"mmkernels.rope3d: split=None needs a head dim divisible by 6 (three equal even parts), "
                         f"got D={head_dim}; pass an explicit split of even parts summing to D, e.g. "
                         f"{suggest_split(head_dim)}")
    return (head_dim // 3,) * 3


def suggest_split(head_dim: int) -> Triple:
    """Even parts summing to an even head_dim, as equal as possible, the larger parts last (64 -> (20, 22, 22))."""
    pairs = head_dim // 2
    base, extra = divmod(pairs, 3)
    parts = [base + (1 if i >= 3 - extra else 0) for i in range(3)]
    return tuple(2 * p for p in parts)  # type: ignore[return-value]


def inv_freq(split: Sequence[int], base: float) -> torch.Tensor:
    """[D/2] fp32 inverse frequencies in pair order (t pairs, then h, then w), computed on the CPU the official way."""
    parts = []
    for d in split:
        if d:
            parts.append(1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)))
    return torch.cat(parts) if parts else torch.zeros(0)


@functools.lru_cache(maxsize=64)
def inv_freq_on(split: Triple, base: float, device: torch.device) -> torch.Tensor:
    """:func:`inv_freq` cached per (split, base, device), so kernels never rebuild it per call."""
    return inv_freq(split, base).to(device)


def positions(grid: Triple, offsets: Triple, device=None) -> torch.Tensor:
    """[L, 3] int64 (t, h, w) coordinates of the grid's tokens in row-major order, plus offsets."""
    axes = [torch.arange(n, device=device) + o for n, o in zip(grid, offsets)]
    t, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=-1)


def angles(grid: Triple, split: Triple, base: float, offsets: Triple, device=None) -> list[torch.Tensor]:
    """Per axis, theta [L, d_a/2] in fp32 (coord * inv_freq)."""
    pos = positions(grid, offsets, device).float()
    out = []
    for a, d in enumerate(split):
        f = inv_freq((d,), base).to(device)
        out.append(pos[:, a, None] * f[None, :])
    return out


def rotate(x: torch.Tensor, thetas: Sequence[torch.Tensor], split: Sequence[int], sign: float = 1.0) -> torch.Tensor:
    """Rotate-half of x [B, L, H, D] in x's dtype by ``sign`` * the per-axis angles ``thetas[a]`` [L, d_a/2]
    (as :func:`angles` gives them, possibly sliced to a range of tokens); sign -1 is the inverse rotation."""
    pieces = []
    for chunk, theta in zip(x.split(list(split), dim=-1), thetas):
        if chunk.shape[-1] == 0:
            continue
        half = chunk.shape[-1] // 2
        cos = theta.cos().to(x.dtype)[None, :, None, :]
        sin = (sign * theta.sin()).to(x.dtype)[None, :, None, :]
        x1, x2 = chunk[..., :half], chunk[..., half:]
        pieces.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))
    return torch.cat(pieces, dim=-1) if pieces else x


def rope3d(x: torch.Tensor, grid: Triple, split: Triple, base: float = 10000.0, offsets: Triple = (0, 0, 0),
           inverse: bool = False) -> torch.Tensor:
    """Differentiable reference, per the module docstring (fp32 math, one rounding)."""
    thetas = angles(grid, split, base, offsets, x.device)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64 (ground truth for tests)
    return rotate(xf, thetas, split, -1.0 if inverse else 1.0).to(x.dtype).contiguous()


def forward(x: torch.Tensor, grid: Triple, split: Triple, base: float, offsets: Triple, inverse: bool) -> torch.Tensor:
    """The torch backend entry point (same signature as the Triton and CUDA backends)."""
    with torch.no_grad():
        return rope3d(x, grid, split, base, offsets, inverse)


def rope3d_official_style(x: torch.Tensor, grid: Triple, split: Triple, base: float = 10000.0) -> torch.Tensor:
    """The official module's arithmetic, written independently: full-width cos/sin tables per axis built in fp32
    and cast to x's dtype, then ``x * cos + rotate_half(x) * sin`` per chunk in x's dtype (rounding after every op),
    with split and cat. This is the baseline the benchmark compares against, and the bf16 parity target."""
    pos = positions(grid, (0, 0, 0), x.device).float()
    outs = []
    for a, chunk in enumerate(x.split(list(split), dim=-1)):
        d = chunk.shape[-1]
        if d == 0:
            continue
        theta = pos[:, a, None] * inv_freq((d,), base).to(x.device)[None, :]
        theta = torch.cat([theta, theta], dim=-1)  # [L, d]: the same angle for i and i + d/2
        cos = theta.cos().to(x.dtype)[None, :, None, :]
        sin = theta.sin().to(x.dtype)[None, :, None, :]
        x1, x2 = chunk[..., : d // 2], chunk[..., d // 2:]
        rotated = torch.cat([-x2, x1], dim=-1)
        outs.append(chunk * cos + rotated * sin)
    return torch.cat(outs, dim=-1)
