"""``mmkernels.group_norm_silu``: GroupNorm (+ SpatialNorm scale/shift at latent resolution) + SiLU, torch / Triton.

The ST-VAE (../shared/specs/lavin_dit.md §2.3, §2.4, §2.7) runs GroupNorm(32, C, eps 1e-6) -> SiLU before every
conv, and in the decoder SpatialNorm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq nearest-resized to f's (T, H, W)
with the first frame resized separately for odd T. The 1x1 convs commute with the nearest resize, so the decoder can
run them at latent resolution and pass their outputs here as ``scale`` and ``shift``: the kernels read them through
the nearest map, and activation-sized scale/shift tensors never exist.

Registered as the custom ops ``mmkernels::group_norm_silu_fwd`` and ``mmkernels::group_norm_silu_bwd``
(torch.library), with fake implementations and autograd, so it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``. The experimental ``cuda`` backend (cuda.py) has CUDA kernels for both passes.

Cost (s = bytes per element of x; N = B*C*prod(spatial); M = the elements of one of scale/shift, small at latent
resolution; per-channel and per-group vectors and partial sums are under 1% at the ST-VAE shapes and not counted)::

    forward   reads x twice (statistics, then normalize), writes y; reads scale/shift:  3*N*s + 2*M*s bytes
    backward  reads x and dy twice (partial sums, then dx), writes dx, reads scale/shift twice and writes their
              grads:                                                                  5*N*s + 6*M*s bytes

Memory-bound: the ceiling is the copy bandwidth (H200 ~4.3 TB/s, H100 ~3.0 TB/s), e.g. bf16 C=128, 17x512x512:
N*s = 1.14 GB, so the forward cannot beat ~0.8 ms on an H200. The anchor (bench/ops/group_norm_silu.py) is the
official-style composition: F.group_norm + F.interpolate (first frame separately) + mul/add + F.silu in eager
PyTorch, and the torch.compile of that composition, measured in the same run. No performance claim is made here
without a GPU measurement.
"""

from __future__ import annotations

from typing import Optional

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.group_norm_silu import reference

_OP = _backend.register_op("group_norm_silu")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAME = "group_norm_silu"


def _triton_supports(x, num_groups, weight, bias, eps, scale, shift, silu) -> _backend.Reason:
    why = _backend.triton_supports_tensors(x, weight, bias, scale, shift, dtypes=_KERNEL_DTYPES)
    if why is None:
        from mmkernels.ops.group_norm_silu import triton as gn_triton

        why = gn_triton.supports_layout(x, scale, shift)
    return why


def _cuda_supports(x, num_groups, weight, bias, eps, scale, shift, silu) -> _backend.Reason:
    from mmkernels.ops.group_norm_silu import cuda as gn_cuda

    return gn_cuda.supports(x, num_groups, weight, bias, eps, scale, shift, silu)


_OP.register(_backend.Backend("torch", "mmkernels.ops.group_norm_silu.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.group_norm_silu.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.group_norm_silu.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


def _impl(backend: str, x, num_groups, weight, bias, eps, scale, shift, silu):
    impl = _OP.resolve(backend, x, num_groups, weight, bias, eps, scale, shift, silu)
    # The nearest-map check runs for every backend (and raises the same ValueError); empty inputs need no kernel.
    reference.plan_for(x, scale, shift)
    return reference if x.numel() == 0 else impl


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return reference.compute_dtype(x)


@torch.library.custom_op("mmkernels::group_norm_silu_fwd", mutates_args=())
def _gn_fwd(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            eps: float, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], silu: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(backend, x, num_groups, weight, bias, eps, scale, shift, silu)
    return impl.forward(x, num_groups, weight, bias, eps, scale, shift, silu)


@_gn_fwd.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, silu, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("mmkernels::group_norm_silu_bwd", mutates_args=())
def _gn_bwd(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            mean: torch.Tensor, rstd: torch.Tensor, silu: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(backend, x, num_groups, weight, bias, 0.0, scale, shift, silu)
    grads = impl.backward(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, silu)
    # A custom op cannot return None: absent inputs get an empty placeholder that autograd drops.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_gn_bwd.register_fake
def _(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, backend):
    return (torch.empty_like(x),) + tuple(torch.empty_like(t) if t is not None else x.new_empty(0)
                                          for t in (weight, bias, scale, shift))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _eps, scale, shift, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, output[1], output[2])
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = torch.ops.mmkernels.group_norm_silu_bwd(
        dy, x, ctx.num_groups, weight, bias, scale, shift, mean, rstd, ctx.silu, ctx.backend)
    return (dx, None, dw if weight is not None else None, db if bias is not None else None, None,
            dscale if scale is not None else None, dshift if shift is not None else None, None, None)


_gn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_modulation(name: str, t, x: torch.Tensor) -> None:
    _checks.tensor(_NAME, name, t, ndim=x.dim())
    if tuple(t.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(f"mmkernels.{_NAME}: argument '{name}' must have shape [B, C, ...] = "
                         f"[{x.shape[0]}, {x.shape[1]}, ...] (x's batch and channels), got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"mmkernels.{_NAME}: argument '{name}' must have x's dtype {x.dtype} (the SpatialNorm "
                        f"multiply and add run in x's dtype), got {t.dtype}")
    _checks.same_device(_NAME, "x", x, name, t)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-6, *, scale: Optional[torch.Tensor] = None,
                    shift: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
    """GroupNorm, then the optional SpatialNorm modulation ``* scale + shift``, then SiLU.

    Args:
        x: [B, C, *spatial] (0 or more spatial dims; the ST-VAE's [B, C, T, H, W]), float16 / bfloat16 / float32
            (float64 on the torch backend), any strides: NCDHW-contiguous, channels_last_3d, views, expanded.
        num_groups: G >= 1 with C % G == 0. Each (batch, group) is normalized over C/G channels and every spatial
            position (all frames).
        weight, bias: optional [C] affine parameters (each independently), any floating dtype, on x's device.
        eps: added to the variance, >= 0.
        scale, shift: optional [B, C, *small] in x's dtype on x's device, any strides (stride 0 broadcasts), the
            same shape when both are given; either may be given alone. ``small`` is x's spatial size or one that
            the official SpatialNorm nearest resize maps by integer factors (per dim: equal, 1, a divisor, or for the
            time dim of a 5-D x with odd T > 1 the first-frame rule T - 1 = f * (Ts - 1)). Read in place at their
            own resolution; other sizes raise ValueError. See reference.py for the exact map.
        silu: apply SiLU at the end (False gives GroupNorm [* scale + shift] alone).

    Returns:
        A fresh tensor with x's shape, dtype and memory format (``torch.empty_like(x)``: channels_last_3d stays
        channels_last_3d). Statistics in fp32; rounded to x's dtype after the GroupNorm, after the multiply, after
        the add and after the SiLU, as the official modules composed in x's dtype (reference.py).
        Differentiable in x, weight, bias, scale and shift (the scale/shift grads are at their own resolution: sums
        over the positions that read each element; every backward is deterministic).

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend).
    """
    _checks.tensor(_NAME, "x", x, min_ndim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"mmkernels.{_NAME}: argument 'num_groups' must be an int, got {type(num_groups).__name__}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"mmkernels.{_NAME}: argument 'num_groups' must be >= 1 and divide the channels "
                         f"(x.shape[1] = {C}), got {num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.tensor(_NAME, name, t, ndim=1)
            if t.shape[0] != C:
                raise ValueError(f"mmkernels.{_NAME}: argument '{name}' must have shape [{C}] (x's channels), "
                                 f"got {tuple(t.shape)}")
            _checks.same_device(_NAME, "x", x, name, t)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            _check_modulation(name, t, x)
    if scale is not None and shift is not None and scale.shape != shift.shape:
        raise ValueError(f"mmkernels.{_NAME}: arguments 'scale' and 'shift' must have the same shape, got "
                         f"{tuple(scale.shape)} and {tuple(shift.shape)}")
    eps = _checks.finite_float(_NAME, "eps", eps, nonnegative=True)
    if not isinstance(silu, bool):
        raise TypeError(f"mmkernels.{_NAME}: argument 'silu' must be a bool, got {type(silu).__name__}")
    if not torch.compiler.is_compiling():
        # The size check in Python ints and numpy, before any kernel (inside compiled graphs it runs in the op).
        reference.plan_for(x, scale, shift)
    y, _, _ = torch.ops.mmkernels.group_norm_silu_fwd(x, num_groups, weight, bias, eps, scale, shift, silu,
                                                      _backend.requested_backend())
    return y
