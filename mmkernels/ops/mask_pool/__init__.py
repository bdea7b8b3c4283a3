"""``mmkernels.mask_pool``: masked average pooling of features under mask logits resized on the fly.

Unpair-Seg's ``MaskPooling`` (../shared/specs/unpair_seg.md §6, §11.3) resizes the mask logits [B, Q, Hm, Wm] to
the feature grid (bilinear, align_corners=False), binarizes them (sigmoid >= 0.5) and takes the masked mean of the
features [B, C, Hf, Wf] -> [B, Q, C]. The official composition materializes the resized masks (and their sigmoid,
the binary mask, the division) at [B, Q, Hf, Wf]; the kernels here compute the resized weights of a tile of
feature pixels from the logits (4 taps each) and feed them straight into a GEMM tile, so nothing of that size exists
(reference.py has the exact semantics, with "hard" and "soft" variants; triton.py and cuda.py the kernels).

Registered as the custom ops ``mmkernels::mask_pool_fwd`` and ``mmkernels::mask_pool_bwd`` (torch.library), with
fake implementations and autograd, so it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``. The ``cuda`` backend (csrc/mask_pool/) is experimental.

Cost (B batch, Q masks, C channels, P = Hf*Wf pixels, s_x / s_m bytes per feature / mask element)::

    forward   FLOP  2*B*Q*C*P (the GEMM) + ~20*B*Q*P (taps, sigmoid, compare)
              bytes features B*C*P*s_x + output B*Q*C*s_x + the mask bytes, counted two ways:
                    all of them  B*Q*Hm*Wm*s_m,
                    those the op must read: the rows that some tap touches, in 32-byte sectors of those rows
                    (a 4x downsample reads rows and columns 4i+1, 4i+2: half the rows, every sector of them)
    backward  dx: the same GEMM transposed (2*B*Q*C*P) reading the masks again, dout (B*Q*C*s_x) and writing dx
              (B*C*P*s_x); soft mode adds dm = dout @ x (2*B*Q*C*P) and the adjoint of the resize, and writes
              dmasks (B*Q*Hm*Wm*s_m).

The benchmark case (bench/ops/mask_pool.py: Q = 1200 masks of 256x256, features 64x64 x 1024, bf16, B = 1):
10.1 GFLOP; masks 157.3 MB in all, 78.6 MB that must be read; features 8.4 MB, output 2.5 MB. H200 ceilings: the
GEMM alone takes 12.7 us at 790 TFLOP/s; HBM moves the bytes that must be read in 20.8 us at 4.3 TB/s (39 us with
every mask byte). So the op is bound by the mask bytes, and the bar ">= 80% of HBM bandwidth on the mask bytes" means
<= 22.9 us for the forward (counting the bytes it must read; <= 45.7 us counting all of them).
What the kernels must also get right is L2: with (BLOCK_Q, BLOCK_C) tiles the masks are re-read ceil(C / BLOCK_C)
times and the features ceil(Q / BLOCK_Q) times. The grid runs the C blocks of one q block together so that only the
first read goes to HBM; at the default 64 x 256 tiles that is 4 x 78.6 MB + 19 x 8.4 MB = 474 MB from L2 per
forward, which at a sustained L2 bandwidth of 8-10 TB/s costs 47-59 us, i.e. L2, not HBM, is the expected limiter,
and the tile shape (triton.BLOCKS["fwd"]) is the first knob of the GPU tuning. The anchor (the baseline to beat by the
">= 5x" bar, in the same run) is the official composition in eager PyTorch (F.interpolate + sigmoid + >= + sum +
einsum), and its torch.compile; "10x less peak memory" is against its [Q, Hf, Wf] temporaries (ours: the output and
[B, Q] denominators, plus fp32 partial sums [splits, B, Q, C] when the pixel loop is split). No performance claim is
made here without a GPU measurement.
"""

from __future__ import annotations

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.mask_pool import reference

_OP = _backend.register_op("mask_pool")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAME = "mask_pool"


def _triton_supports(features, masks, mode, threshold, eps) -> _backend.Reason:
    why = _backend.triton_supports_tensors(features, masks, dtypes=_KERNEL_DTYPES)
    if why is None:
        from mmkernels.ops.mask_pool import triton as mp_triton

        why = mp_triton.supports_sizes(features, masks)
    return why


def _cuda_supports(features, masks, mode, threshold, eps) -> _backend.Reason:
    from mmkernels.ops.mask_pool import cuda as mp_cuda

    return mp_cuda.supports(features, masks, mode, threshold, eps)


_OP.register(_backend.Backend("torch", "mmkernels.ops.mask_pool.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.mask_pool.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.mask_pool.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


def _empty(features: torch.Tensor, masks: torch.Tensor) -> bool:
    """Nothing for a kernel to do: no outputs, or no feature pixels (then every denominator is eps)."""
    B, C, Hf, Wf = features.shape
    return B * masks.shape[1] * C == 0 or Hf * Wf == 0


def _impl(backend: str, features, masks, mode, threshold, eps):
    impl = _OP.resolve(backend, features, masks, mode, threshold, eps)
    return reference if _empty(features, masks) else impl


@torch.library.custom_op("mmkernels::mask_pool_fwd", mutates_args=())
def _mp_fwd(features: torch.Tensor, masks: torch.Tensor, mode: str, threshold: float, eps: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(backend, features, masks, mode, threshold, eps)
    out, denom = impl.forward(features, masks, mode, threshold, eps)
    return out, denom.to(reference.compute_dtype(features, masks))


@_mp_fwd.register_fake
def _(features, masks, mode, threshold, eps, backend):
    B, C = features.shape[:2]
    Q = masks.shape[1]
    return (features.new_empty((B, Q, C)),
            features.new_empty((B, Q), dtype=reference.compute_dtype(features, masks)))


@torch.library.custom_op("mmkernels::mask_pool_bwd", mutates_args=())
def _mp_bwd(dout: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, denom: torch.Tensor, out: torch.Tensor,
            mode: str, threshold: float, need_dx: bool, need_dm: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(backend, features, masks, mode, threshold, 0.0)
    need_dm = need_dm and mode == "soft"
    dx, dm = impl.backward(dout, features, masks, denom, out, mode, threshold, need_dx, need_dm)
    # A custom op cannot return None: grads not asked for get an empty placeholder that autograd drops.
    return (dx if dx is not None else features.new_empty(0),
            dm if dm is not None else masks.new_empty(0))


@_mp_bwd.register_fake
def _(dout, features, masks, denom, out, mode, threshold, need_dx, need_dm, backend):
    dx = torch.empty_like(features) if need_dx else features.new_empty(0)
    dm = masks.new_empty(masks.shape) if need_dm and mode == "soft" else masks.new_empty(0)
    return dx, dm


def _setup_context(ctx, inputs, output):
    features, masks, mode, threshold, _eps, backend = inputs
    out, denom = output
    ctx.save_for_backward(features, masks, denom, out)
    ctx.mode, ctx.threshold, ctx.backend = mode, threshold, backend


def _backward(ctx, dout, _ddenom):
    features, masks, denom, out = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dm = ctx.needs_input_grad[1] and ctx.mode == "soft"
    dx, dm = torch.ops.mmkernels.mask_pool_bwd(dout, features, masks, denom, out, ctx.mode, ctx.threshold,
                                                need_dx, need_dm, ctx.backend)
    return dx if need_dx else None, dm if need_dm else None, None, None, None, None


_mp_fwd.register_autograd(_backward, setup_context=_setup_context)


def mask_pool(features: torch.Tensor, masks: torch.Tensor, *, mode: str = "official", threshold: float = 0.0,
              eps: float = 1e-8) -> torch.Tensor:
    """Average of ``features`` under each mask, the masks resized from their logits to the feature grid.

    Args:
        features: x [B, C, Hf, Wf], float16 / bfloat16 / float32 (float64 on the torch backend), any strides
            (contiguous, channels_last, views).
        masks: mask logits [B, Q, Hm, Wm] at any resolution (bilinearly resized to (Hf, Wf) exactly as
            ``F.interpolate(mode="bilinear", align_corners=False)``, skipped when the sizes are equal), any float
            dtype (it may differ from the features'), any strides. Hm, Wm >= 1 unless Hf*Wf == 0.
        mode: "official" (Unpair-Seg's MaskPooling: sigmoid(resized logit) >= sigmoid(threshold), computed with
            the official rounding in the masks' dtype), "hard" (resized logit > threshold, fp32) or "soft"
            (weights sigmoid(resized logit - threshold), fp32).
        threshold: the threshold as a logit (the default 0.0 is the official sigmoid >= 0.5).
        eps: added to every mask's weight sum (the official 1e-8), finite and >= 0.

    Returns:
        [B, Q, C] contiguous in the features' dtype: sum_p x[b, :, p] * m[b, q, p] / (sum_p m[b, q, p] + eps),
        accumulated in fp32 (an empty mask gives zeros in official and hard mode). Differentiable in the features
        (every mode) and in the masks (soft mode only; official and hard mode give the masks no gradient, as the
        official module builds its mask under no_grad). Every backward is deterministic.

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend).
    """
    _checks.tensor(_NAME, "features", features, ndim=4)
    _checks.tensor(_NAME, "masks", masks, ndim=4)
    _checks.same_device(_NAME, "features", features, "masks", masks)
    if masks.shape[0] != features.shape[0]:
        raise ValueError(f"mmkernels.{_NAME}: argument 'masks' must have features' batch size "
                         f"{features.shape[0]} in dim 0 ([B, Q, Hm, Wm]), got shape {tuple(masks.shape)}")
    if masks.shape[2] * masks.shape[3] == 0 and features.shape[2] * features.shape[3] > 0:
        raise ValueError(f"mmkernels.{_NAME}: argument 'masks' has an empty grid {tuple(masks.shape[2:])}, which "
                         f"cannot be resized to the features' {tuple(features.shape[2:])}")
    if not isinstance(mode, str):
        raise TypeError(f"mmkernels.{_NAME}: argument 'mode' must be a str, got {type(mode).__name__}")
    if mode not in reference.MODES:
        raise ValueError(f"mmkernels.{_NAME}: argument 'mode' must be one of {', '.join(reference.MODES)}, "
                         f"got {mode!r}")
    threshold = _checks.finite_float(_NAME, "threshold", threshold)
    eps = _checks.finite_float(_NAME, "eps", eps, nonnegative=True)
    out, _ = torch.ops.mmkernels.mask_pool_fwd(features, masks, mode, threshold, eps, _backend.requested_backend())
    return out
