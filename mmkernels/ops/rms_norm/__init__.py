"""``mmkernels.rms_norm``: RMSNorm over the last dim, with torch / Triton / CUDA backends.

Registered as the custom ops ``mmkernels::rms_norm_fwd`` and ``mmkernels::rms_norm_bwd`` (torch.library), with fake
implementations and autograd, so it passes ``torch.library.opcheck`` and runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.rms_norm import reference

_OP = _backend.register_op("rms_norm")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supports(x: torch.Tensor, weight: Optional[torch.Tensor]) -> _backend.Reason:
    return _backend.triton_supports_tensors(x, weight, dtypes=_KERNEL_DTYPES)


def _cuda_supports(x: torch.Tensor, weight: Optional[torch.Tensor]) -> _backend.Reason:
    return _backend.cuda_supports_tensors(x, weight, dtypes=_KERNEL_DTYPES)


_OP.register(_backend.Backend("torch", "mmkernels.ops.rms_norm.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.rms_norm.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.rms_norm.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


def _impl(backend: str, x: torch.Tensor, weight: Optional[torch.Tensor]):
    impl = _OP.resolve(backend, x, weight)
    # Empty inputs need no kernel; the reference gives every backend the same (empty) answer.
    return reference if x.numel() == 0 else impl


@torch.library.custom_op("mmkernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend, x, weight).forward(x, weight, eps)


@_rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=reference.compute_dtype(x))


@torch.library.custom_op("mmkernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _impl(backend, x, weight).backward(dy, x, weight, rstd)
    # A custom op cannot return None: without a weight, dw is an empty placeholder that autograd drops.
    return dx, (dw if dw is not None else x.new_empty(0))


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, backend):
    return x.new_empty(x.shape), (weight.new_empty(weight.shape) if weight is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, _eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.mmkernels.rms_norm_bwd(dy, x, weight, rstd, ctx.backend)
    return dx, (dw if weight is not None else None), None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square normalization over the last dim.

    Args:
        x: [..., N], any floating dtype, any strides (N of any size: 2304, 576, 72, 1, ...).
        weight: optional [N] affine weight, on x's device. It is cast to x's dtype before the multiply.
        eps: added to the mean square, >= 0.

    Returns:
        [..., N] tensor of x's dtype (contiguous):
        ``(x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype) * weight.to(x.dtype)``. Statistics are fp32;
        the normalized value is rounded to x's dtype before the weight multiply, as apex's FusedRMSNorm does
        (the official LaVin-DiT numerics). Differentiable in x and weight.

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend).
    """
    _checks.tensor("rms_norm", "x", x, min_ndim=1)
    if weight is not None:
        _checks.tensor("rms_norm", "weight", weight, ndim=1)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"mmkernels.rms_norm: argument 'weight' must have shape [{x.shape[-1]}] "
                             f"(x's last dim), got {tuple(weight.shape)}")
        _checks.same_device("rms_norm", "x", x, "weight", weight)
    eps = _checks.finite_float("rms_norm", "eps", eps, nonnegative=True)
    y, _ = torch.ops.mmkernels.rms_norm_fwd(x, weight, eps, _backend.requested_backend())
    return y
