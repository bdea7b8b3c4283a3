"""``mmkernels.causal_conv3d``: the ST-VAE's causal 3D convolution (LaVin-DiT), with torch / Triton backends.

The official module (specs/lavin_dit.md §2.2, gotcha 12) replicates frame 0 kt-1 times in front of the video,
zero-pads H and W by kh//2, kw//2 on each side, and runs ``nn.Conv3d`` with padding 0 and stride (st, 1, 1). It
materializes both padded copies. Here the padding, the replication and a streaming cache are index arithmetic in
an implicit GEMM (triton.py); the torch backend (reference.py) is the literal definition.

Registered as the custom ops ``mmkernels::causal_conv3d_fwd`` and ``mmkernels::causal_conv3d_bwd``
(torch.library) with fake implementations and autograd: it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``. The experimental ``cuda`` backend (cuda.py) has CUDA forward kernels only.

Cost per call, with M = B*T_out*H_out*W_out output positions, N = Cout, K = Cin*kt*kh*kw, s = bytes per element:

* forward: 2*M*N*K FLOP; bytes (each tensor touched once, the ideal) s*(B*Cin*T*H*W + Cout*K + M*N) (+ the bias).
* backward: dx and dW are 2*M*N*K FLOP each (4*M*N*K, so forward+backward is 6*M*N*K); bytes: read dy, x, W,
  write dx and dW: s*(M*N + 2*B*Cin*T*H*W + 2*Cout*K).
* A 3x3x3 conv is compute-bound: at C=128, 17x512x512 (the first encoder stage) K = 3456, and the arithmetic
  intensity 2*N*K / (s*(K/27 + N)) is ~1700 FLOP/byte in bf16, far above the H200's ridge point
  (~790 TFLOP/s bf16 dense / ~4.3 TB/s = ~184 FLOP/byte). The ceiling is the bf16 MMA rate, ~790 TFLOP/s.
* Anchor to beat: the official-style path, pad/cat copies + cuDNN ``F.conv3d`` (NCDHW, and channels_last_3d,
  where cuDNN's implicit GEMM is reported at ~290 TFLOP/s while the pad/cat/copy around it costs ~40% of a video
  VAE's time). bench/ops/causal_conv3d.py measures both in the same run.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.causal_conv3d import reference

_OP = _backend.register_op("causal_conv3d")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TIME_PADS = ("replicate", "zeros")


def _triton_supports(x, weight, bias=None, cache=None) -> _backend.Reason:
    return _backend.triton_supports_tensors(x, weight, bias, cache, dtypes=_KERNEL_DTYPES)


def _cuda_supports(x, weight, bias=None, cache=None) -> _backend.Reason:
    from mmkernels.ops.causal_conv3d import cuda as conv_cuda

    return conv_cuda.supports(x, weight, bias, cache)


_OP.register(_backend.Backend("torch", "mmkernels.ops.causal_conv3d.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.causal_conv3d.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.causal_conv3d.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


def _impl(backend: str, x, weight, bias, cache, stride: int):
    impl = _OP.resolve(backend, x, weight, bias, cache)
    # Nothing to compute (empty batch, no frames): the reference gives every backend the same (empty/zero) answer.
    B, _, T_out, _, _ = reference.output_shape(x, weight, stride)
    return reference if B == 0 or T_out == 0 else impl


def _no_autocast(t: torch.Tensor):
    """Autocast does not stop at a custom op: without this the reference's convs would run in the autocast dtype.
    The op defines its own precision (fp32 accumulation, output in x's dtype)."""
    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cpu", "cuda") else \
        contextlib.nullcontext()


def _empty_like_layout(t: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of ``shape`` on t's device and dtype, in the layout outputs derived from t get."""
    return torch.empty(tuple(shape), dtype=t.dtype, device=t.device, memory_format=reference.output_format(t))


@torch.library.custom_op("mmkernels::causal_conv3d_fwd", mutates_args=())
def _causal_conv3d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       cache: Optional[torch.Tensor], stride: int, replicate: bool, backend: str) -> torch.Tensor:
    with _no_autocast(x):
        return _impl(backend, x, weight, bias, cache, stride).forward(x, weight, bias, cache, stride, replicate)


@_causal_conv3d_fwd.register_fake
def _(x, weight, bias, cache, stride, replicate, backend):
    return _empty_like_layout(x, reference.output_shape(x, weight, stride))


@torch.library.custom_op("mmkernels::causal_conv3d_bwd", mutates_args=())
def _causal_conv3d_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor],
                       stride: int, replicate: bool, needs: Sequence[bool],
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(x):
        grads = _impl(backend, x, weight, None, cache, stride).backward(dy, x, weight, cache, stride, replicate,
                                                                       tuple(needs))
    # A custom op cannot return None: a gradient that is not needed is an empty placeholder autograd drops.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_causal_conv3d_bwd.register_fake
def _(dy, x, weight, cache, stride, replicate, needs, backend):
    need_x, need_w, need_b, need_c = needs
    return (_empty_like_layout(x, x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            x.new_empty((weight.shape[0],)) if need_b else x.new_empty(0),
            _empty_like_layout(cache, cache.shape) if need_c and cache is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, cache, ctx.stride, ctx.replicate, ctx.backend = inputs
    ctx.save_for_backward(x, weight, cache)


def _backward(ctx, dy):
    x, weight, cache = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    dx, dw, db, dc = torch.ops.mmkernels.causal_conv3d_bwd(dy, x, weight, cache, ctx.stride, ctx.replicate, needs,
                                                           ctx.backend)
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
            dc if needs[3] else None, None, None, None)


_causal_conv3d_fwd.register_autograd(_backward, setup_context=_setup_context)


def _next_cache(x: torch.Tensor, cache: Optional[torch.Tensor], kt: int, replicate: bool) -> torch.Tensor:
    """The last kt-1 frames of [cache-or-padding ; x], as a fresh tensor (differentiable through torch ops)."""
    P, T = kt - 1, x.shape[2]
    if T >= P:
        return x[:, :, T - P:].clone()
    front = reference.front_frames(x, cache, kt, replicate)
    return torch.cat([front[:, :, T:], x], dim=2)


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride: int = 1,
                  time_pad: str = "replicate", cache: Optional[torch.Tensor] = None, return_cache: bool = False):
    """Causal 3D convolution: ST-VAE's ``STVAECausalConv3d`` without the padded copies, plus stride and streaming.

    Args:
        x: [B, Cin, T, H, W], float16/bfloat16/float32 (float64 on the torch backend), NCDHW-contiguous,
            channels_last_3d or any strides. B may be 0; T may be 0 only when the front frames are defined
            without x (a cache, or ``time_pad="zeros"``); Cin, H, W >= 1.
        weight: [Cout, Cin, kt, kh, kw], x's dtype and device. Spatial padding is kh//2 (kw//2) on *each* side as
            in the official module, so odd kernels keep H and W, and an even kh (kw) gives H+1 (W+1) outputs.
        bias: [Cout] or None, x's dtype and device.
        stride: temporal stride, an int >= 1 (spatial stride is 1). Output frame t reads padded frames
            [t*stride, t*stride + kt); T_out = (T + kt-1 - kt)//stride + 1 = (T - 1)//stride + 1.
        time_pad: the kt-1 front frames when there is no cache: "replicate" (frame 0 repeated, the official
            behaviour) or "zeros".
        cache: None, or [B, Cin, kt-1, H, W] (x's dtype and device): the last kt-1 input frames of the previous
            chunk (the ``new_cache`` it returned). It replaces the front padding (time_pad is then unused).
        return_cache: also return ``new_cache``, the last kt-1 frames of [cache-or-padding ; x] (fresh tensor,
            correct even when T < kt-1), for the next chunk.

    Streaming: running a video chunk by chunk, each chunk with the previous chunk's ``new_cache``, gives the
    whole-video output (concatenated in time): bitwise in fp32 on the torch and triton backends, within fp16/bf16
    tolerance otherwise. With stride > 1 the output phase must stay aligned: a chunk that hands on its cache
    (``return_cache=True``) must have T divisible by stride, so the next chunk's first output frame is the next
    whole-video output frame; ValueError otherwise. Only the last chunk may have another length.

    Returns:
        y [B, Cout, T_out, H_out, W_out] in x's dtype, channels_last_3d when x is channels_last_3d (and not also
        NCDHW-contiguous), else contiguous; ``(y, new_cache)`` with ``return_cache=True``. Computed with fp32
        accumulation, rounded once. Differentiable in x, weight, bias and cache.

    Backend: chosen by ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND`` (see mmkernels._backend).
    Math: mmkernels/ops/causal_conv3d/reference.py; kernels: triton.py.
    """
    op = "causal_conv3d"
    _checks.tensor(op, "x", x, ndim=5)
    _checks.tensor(op, "weight", weight, ndim=5)
    B, Cin, T, H, W = x.shape
    Cout, wcin, kt, kh, kw = weight.shape
    if wcin != Cin:
        raise ValueError(f"mmkernels.{op}: argument 'weight' has {wcin} input channels (shape "
                         f"{tuple(weight.shape)}) but x has Cin = {Cin} (x is [B, Cin, T, H, W] = {tuple(x.shape)})")
    if min(Cout, kt, kh, kw) < 1:
        raise ValueError(f"mmkernels.{op}: argument 'weight' must be [Cout, Cin, kt, kh, kw] with every size >= 1, "
                         f"got {tuple(weight.shape)}")
    if min(Cin, H, W) < 1:
        raise ValueError(f"mmkernels.{op}: argument 'x' must have Cin, H and W >= 1, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("cache", cache)):
        if t is None:
            continue
        if name != "weight":
            _checks.tensor(op, name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"mmkernels.{op}: argument '{name}' has dtype {t.dtype} but x has {x.dtype}; "
                            "they must match")
        _checks.same_device(op, "x", x, name, t)
    if bias is not None and tuple(bias.shape) != (Cout,):
        raise ValueError(f"mmkernels.{op}: argument 'bias' must have shape [{Cout}] (weight's Cout), "
                         f"got {tuple(bias.shape)}")
    if cache is not None and tuple(cache.shape) != (B, Cin, kt - 1, H, W):
        raise ValueError(f"mmkernels.{op}: argument 'cache' must have shape [B, Cin, kt-1, H, W] = "
                         f"{[B, Cin, kt - 1, H, W]}, got {list(cache.shape)}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"mmkernels.{op}: argument 'stride' must be an int >= 1 (the temporal stride), "
                         f"got {stride!r}")
    if time_pad not in TIME_PADS:
        raise ValueError(f"mmkernels.{op}: argument 'time_pad' must be one of {TIME_PADS}, got {time_pad!r}")
    if not isinstance(return_cache, bool):
        raise TypeError(f"mmkernels.{op}: argument 'return_cache' must be a bool, got {type(return_cache).__name__}")
    replicate = time_pad == "replicate"
    if T == 0 and cache is None and replicate and kt > 1:
        raise ValueError(f"mmkernels.{op}: argument 'x' has no frames (shape {tuple(x.shape)}), so there is no "
                         "frame 0 to replicate; pass a cache or time_pad='zeros'")
    if return_cache and stride > 1 and T % stride:
        raise ValueError(f"mmkernels.{op}: with stride={stride}, a chunk that returns its cache for a next chunk "
                         f"must have a number of frames divisible by the stride (got T={T}); otherwise the next "
                         "chunk's output frames would be out of phase with the whole video's. Only the last chunk "
                         "(return_cache=False) may have another length")
    y = torch.ops.mmkernels.causal_conv3d_fwd(x, weight, bias, cache, stride, replicate,
                                              _backend.requested_backend())
    if return_cache:
        return y, _next_cache(x, cache, kt, replicate)
    return y
