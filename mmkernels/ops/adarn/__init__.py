"""``mmkernels.adarn``: LaVin-DiT's fused AdaRN modulation / gate (RMSNorm, (1 + scale), tanh(gate), residual add).

The official J-DiT block (specs/lavin_dit.md §1.5, §1.8, §1.11) runs, per stream and branch, an apex FusedRMSNorm
followed by separate bf16 elementwise kernels; this op is one pass. Semantics and rounding points: reference.py.
Backends: ``torch`` (reference.py, the plain composition with a closed-form backward) and ``triton`` (triton.py:
one-pass forward, one-pass backward plus a fixed-order reduction of dscale/dgate partials; tested in the Triton
interpreter and compiled ahead of time for sm_80/sm_90, like every Triton backend here). There is no CUDA
(``mmkernels._C``) backend.

Registered as the custom ops ``mmkernels::adarn_fwd`` and ``mmkernels::adarn_bwd`` (torch.library) with fake
implementations and autograd: it passes ``torch.library.opcheck`` and runs under ``torch.compile(fullgraph=True)``.

Cost per call, M = rows of x (B·L), D = width, s = bytes per element, B·D-sized scale/gate traffic negligible:

* pre  (scale; norm1/norm2/final layer) forward: read x, write y and rstd: 2·s·M·D + 4·M bytes.
* post (gate + residual; post_norm1/2)   forward: read a and residual, write y and rstd: 3·s·M·D + 4·M bytes.
* backward (either): read dy, x, rstd, write dx (dresidual is dy itself: no traffic): 3·s·M·D + 4·M bytes, plus
  the dscale/dgate partials (fp32, about 2·SMs rows of D each).
* ~4 FLOP/element forward, ~10 backward: memory-bound. The ceiling is the copy bandwidth, ~4.3 TB/s on the H200
  (~3.0 TB/s on the H100, design.md §5).

At LaVin-DiT 3.4B's shape (B=2, L=10240, D=2304, bf16: x is 94.4 MB) that is 188.7 MB (pre) and 283.1 MB (post)
per forward, i.e. at best ~44 µs and ~66 µs on an H200. The anchor to beat is the official composition measured in
the same run by bench/ops/adarn.py: in eager PyTorch it is a norm kernel plus one kernel per elementwise op, about
4·s·M·D bytes (pre: norm read+write, multiply read+write, 377.5 MB) and 7·s·M·D (post: norm, multiply, residual add,
660.6 MB), so 2x and 2.3x our bytes; under torch.compile, inductor can fuse the chain into one reduction kernel with
our byte count, so there the bar is parity or better. These are byte counts, not measurements.
"""

from __future__ import annotations

from typing import Optional

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.adarn import reference

_OP = _backend.register_op("adarn")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supports(x: torch.Tensor, scale: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None) -> _backend.Reason:
    return _backend.triton_supports_tensors(x, scale, gate, residual, dtypes=_KERNEL_DTYPES)


_OP.register(_backend.Backend("torch", "mmkernels.ops.adarn.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.adarn.triton", available=_backend.triton_available,
                              supports=_triton_supports))


def _impl(backend: str, x: torch.Tensor, scale, gate, residual):
    impl = _OP.resolve(backend, x, scale, gate, residual)
    # Empty inputs need no kernel; the reference gives every backend the same (empty) answer.
    return reference if x.numel() == 0 else impl


@torch.library.custom_op("mmkernels::adarn_fwd", mutates_args=())
def _adarn_fwd(x: torch.Tensor, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend, x, scale, gate, residual).forward(x, scale, gate, residual, eps)


@_adarn_fwd.register_fake
def _(x, scale, gate, residual, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=reference.compute_dtype(x))


@torch.library.custom_op("mmkernels::adarn_bwd", mutates_args=())
def _adarn_bwd(dy: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor],
               rstd: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dscale, dgate = _impl(backend, x, scale, gate, None).backward(dy, x, scale, gate, rstd)
    # A custom op cannot return None: an absent scale/gate gets an empty placeholder that autograd drops.
    return dx, (dscale if dscale is not None else x.new_empty(0)), (dgate if dgate is not None else x.new_empty(0))


@_adarn_bwd.register_fake
def _(dy, x, scale, gate, rstd, backend):
    return (x.new_empty(x.shape), scale.new_empty(scale.shape) if scale is not None else x.new_empty(0),
            gate.new_empty(gate.shape) if gate is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, scale, gate, residual, _eps, backend = inputs
    ctx.save_for_backward(x, scale, gate, output[1])
    ctx.has_residual = residual is not None
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, scale, gate, rstd = ctx.saved_tensors
    dx, dscale, dgate = torch.ops.mmkernels.adarn_bwd(dy, x, scale, gate, rstd, ctx.backend)
    return (dx, dscale if scale is not None else None, dgate if gate is not None else None,
            dy if ctx.has_residual else None, None, None)


_adarn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_vector(name: str, v, x: torch.Tensor) -> None:
    _checks.tensor("adarn", name, v, min_ndim=1)
    _checks.same_device("adarn", "x", x, name, v)
    if v.dtype != x.dtype:
        raise TypeError(f"mmkernels.adarn: argument '{name}' must have x's dtype {x.dtype}, got {v.dtype}")
    d, b, max_dims = x.shape[-1], reference.num_samples(x), max(x.dim(), 2)
    if v.shape[-1] != d:
        raise ValueError(f"mmkernels.adarn: argument '{name}' must have last dim D = {d} (x's last dim), "
                         f"got shape {tuple(v.shape)}")
    if v.dim() > 1 and (v.dim() > max_dims or v.shape[0] not in (b, 1) or any(n != 1 for n in v.shape[1:-1])):
        raise ValueError(f"mmkernels.adarn: argument '{name}' must have shape [D], [B, D] or [B, 1, ..., 1, D] "
                         f"(at most {max_dims} dims) with B = {b} (x's first dim) or 1 and D = {d}, "
                         f"got {tuple(v.shape)}")


def adarn(x: torch.Tensor, scale: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
          residual: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Fused AdaRN: ``residual + tanh(gate) * ((1 + scale) * RMSNorm(x))``, every part optional.

    Args:
        x: [B, *tokens, D] (e.g. [B, L, D]; a 2-D x is [B, D], a 1-D x one token), float32/float16/bfloat16 (or
            float64 on the torch backend), any strides.
        scale, gate: optional, x's dtype and device, each [D] (shared by every row) or [B, D] / [B, 1, ..., 1, D]
            (one vector per sample x[b], broadcast over the token dims; a leading 1 broadcasts like [D]).
        residual: optional, x's shape, dtype and device, any strides.
        eps: added to the mean square, >= 0.

    Returns:
        A fresh contiguous tensor of x's shape and dtype::

            y = rnd(x * rsqrt(mean(x**2) + eps))       # fp32 statistics (apex FusedRMSNorm, no affine)
            y = rnd(y * rnd(1 + scale))                 # if scale
            y = rnd(rnd(tanh(gate)) * y)                # if gate
            y = rnd(residual + y)                       # if residual

        where rnd rounds to x's dtype: the rounding points of the official bf16 composition of torch ops
        (reference.py). Differentiable in x, scale, gate and residual; the scale/gate grads are reduced over tokens
        (and over samples for a shared vector) in a fixed order, so they are deterministic.

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend).
    """
    _checks.tensor("adarn", "x", x, min_ndim=1)
    for name, v in (("scale", scale), ("gate", gate)):
        if v is not None:
            _check_vector(name, v, x)
    if residual is not None:
        _checks.tensor("adarn", "residual", residual)
        _checks.same_device("adarn", "x", x, "residual", residual)
        if residual.dtype != x.dtype:
            raise TypeError(f"mmkernels.adarn: argument 'residual' must have x's dtype {x.dtype}, "
                            f"got {residual.dtype}")
        if residual.shape != x.shape:
            raise ValueError(f"mmkernels.adarn: argument 'residual' must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    eps = _checks.finite_float("adarn", "eps", eps, nonnegative=True)
    d = x.shape[-1]
    y, _ = torch.ops.mmkernels.adarn_fwd(x, reference.as_rows(scale, d), reference.as_rows(gate, d), residual, eps,
                                         _backend.requested_backend())
    return y
