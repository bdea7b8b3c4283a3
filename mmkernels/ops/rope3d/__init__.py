"""``mmkernels.rope3d``: LaVin-DiT's 3D rotate-half rotary embedding, with torch / Triton / CUDA backends.

Registered as the custom op ``mmkernels::rope3d`` (torch.library) with a fake implementation and autograd (the
backward is the same op with the inverse rotation), so it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.rope3d import reference

_OP = _backend.register_op("rope3d")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_MAX_HEAD_DIM = 8192  # the kernel keeps a tile of cos/sin for D/2 pairs in shared memory


def _triton_supports(x: torch.Tensor) -> _backend.Reason:
    return _backend.triton_supports_tensors(x, dtypes=_KERNEL_DTYPES)


def _cuda_supports(x: torch.Tensor) -> _backend.Reason:
    why = _backend.cuda_supports_tensors(x, dtypes=_KERNEL_DTYPES)
    if why is None and x.shape[-1] > _CUDA_MAX_HEAD_DIM:
        why = f"head dim {x.shape[-1]} is above the kernel's limit of {_CUDA_MAX_HEAD_DIM}"
    if why is None and x.shape[0] * x.shape[2] * x.shape[3] >= 2**31:
        why = "B*H*D must be below 2**31 (32-bit indexing inside a token)"
    return why


_OP.register(_backend.Backend("torch", "mmkernels.ops.rope3d.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.rope3d.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.rope3d.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


@torch.library.custom_op("mmkernels::rope3d", mutates_args=())
def _rope3d(x: torch.Tensor, grid: Sequence[int], split: Sequence[int], base: float, offsets: Sequence[int],
            inverse: bool, backend: str) -> torch.Tensor:
    impl = _OP.resolve(backend, x)
    # Empty inputs need no kernel; the reference gives every backend the same (empty) answer.
    return (reference if x.numel() == 0 else impl).forward(x, tuple(grid), tuple(split), base, tuple(offsets), inverse)


@_rope3d.register_fake
def _(x, grid, split, base, offsets, inverse, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _x, ctx.grid, ctx.split, ctx.base, ctx.offsets, ctx.inverse, ctx.backend = inputs


def _backward(ctx, dy):
    dx = torch.ops.mmkernels.rope3d(dy, ctx.grid, ctx.split, ctx.base, ctx.offsets, not ctx.inverse, ctx.backend)
    return dx, None, None, None, None, None, None


_rope3d.register_autograd(_backward, setup_context=_setup_context)


def _check_split(split, head_dim: int, op: str = "rope3d", name: str = "split",
                 head_dim_is: str = "the head dim (x.shape[-1])") -> tuple[int, int, int]:
    if split is None:
        return reference.default_split(head_dim)
    parts = _checks.int_triple(op, name, split)
    if any(p < 0 or p % 2 for p in parts):
        raise ValueError(f"mmkernels.{op}: argument '{name}' must hold even, non-negative parts (each chunk "
                         f"rotates halves), got {parts}")
    if sum(parts) != head_dim:
        raise ValueError(f"mmkernels.{op}: argument '{name}' {parts} sums to {sum(parts)}, but {head_dim_is} "
                         f"is {head_dim}")
    return parts


def rope3d(x: torch.Tensor, grid: Sequence[int], split: Optional[Sequence[int]] = None, base: float = 10000.0,
           offsets: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rotate-half 3D rotary embedding, exactly LaVin-DiT's ``RotaryEmbedding3D`` (fp32 angles and arithmetic).

    Args:
        x: [B, L, H, D] queries or keys; any strides (for instance ``proj(h).view(B, L, H, D)``), no copy is made.
        grid: (T, Hg, Wg) token grid with T*Hg*Wg == L; token n sits at (n // (Hg*Wg), (n // Wg) % Hg, n % Wg).
        split: head-dim parts (d_t, d_h, d_w), even, summing to D. Default: D//3 each (needs D % 6 == 0).
        base: frequency base for all three axes (inv_freq_i = base^(-2i/d)).
        offsets: integer offsets (o_t, o_h, o_w) added to the coordinates. Default (0, 0, 0).

    Returns:
        [B, L, H, D] tensor of x's dtype (contiguous). Differentiable; the backward is the inverse rotation.
        Formulas: mmkernels/ops/rope3d/reference.py.
    """
    _checks.tensor("rope3d", "x", x, ndim=4)
    B, L, H, D = x.shape
    grid = _checks.int_triple("rope3d", "grid", grid, minimum=0)
    if grid[0] * grid[1] * grid[2] != L:
        raise ValueError(f"mmkernels.rope3d: grid {grid} holds {grid[0] * grid[1] * grid[2]} tokens, but x has "
                         f"L={L} (x is [B, L, H, D] = {tuple(x.shape)})")
    split = _check_split(split, D)
    base = _checks.finite_float("rope3d", "base", base, positive=True)
    offsets = (0, 0, 0) if offsets is None else _checks.int_triple("rope3d", "offsets", offsets)
    return torch.ops.mmkernels.rope3d(x, list(grid), list(split), base, list(offsets), False,
                                      _backend.requested_backend())


@dataclass(frozen=True)
class RoPE3DSpec:
    """Where a sequence sits on a (T, H, W) token grid, for ops that apply 3D RoPE internally (joint_attention).

    Attributes:
        grid: (T, Hg, Wg), covering the whole (joint) sequence in row-major (t, h, w) order.
        split: head-dim parts (d_t, d_h, d_w), even, summing to the head dim; None = D//3 each (needs D % 6 == 0).
        base: frequency base for all three axes.
        offsets: integer offsets (o_t, o_h, o_w) added to the coordinates; None = (0, 0, 0).

    The semantics are exactly :func:`rope3d`'s (see mmkernels/ops/rope3d/reference.py).
    """

    grid: Sequence[int]
    split: Optional[Sequence[int]] = None
    base: float = 10000.0
    offsets: Optional[Sequence[int]] = None

    def resolve(self, op: str, head_dim: int, length: int) -> tuple[tuple[int, int, int], tuple[int, int, int],
                                                                      float, tuple[int, int, int]]:
        """Validated (grid, split, base, offsets) for a sequence of ``length`` tokens with head dim ``head_dim``."""
        grid = _checks.int_triple(op, "rope.grid", self.grid, minimum=0)
        if grid[0] * grid[1] * grid[2] != length:
            raise ValueError(f"mmkernels.{op}: rope.grid {grid} holds {grid[0] * grid[1] * grid[2]} tokens, but "
                             f"the sequence has {length}")
        split = _check_split(self.split, head_dim, op, "rope.split", "the head dim")
        base = _checks.finite_float(op, "rope.base", self.base, positive=True)
        offsets = (0, 0, 0) if self.offsets is None else _checks.int_triple(op, "rope.offsets", self.offsets)
        return grid, split, base, offsets
