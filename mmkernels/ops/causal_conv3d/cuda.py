"""Causal 3D convolution ``cuda`` backend: glue over ``mmkernels._C`` (csrc/causal_conv3d/). Semantics: reference.py.

Forward: an implicit GEMM, ``y[m, n] = sum_k A[m, k] W[n, k] + bias[n]`` with M = the Ho*Wo positions of one output
frame, N = Cout, K = kt*kh*kw*Cin, fp16/bf16 operands, fp32 accumulation, bias added in fp32, one rounding. The
causal front frames (frame 0 replicated, zeros, or the streaming cache through its own pointer) and the spatial zero
border are index arithmetic in the kernels' operand gather (zero-filled copies), never a padded tensor. Layouts:

* x and the cache are read in channels_last_3d memory order ([B, T, H, W, Cin], channels fastest). A tensor in any
  other layout (NCDHW, a strided view, a start that is not 16-byte aligned) is copied once into channels-last here.
* The weight is reordered once per call into a contiguous [Cout, kt, kh, kw, Cin] (the K-major B operand; a copy of
  Cout*K elements, small next to the activations).
* The kernels write y channels-last. For an x that is not channels-last, the op returns a contiguous y
  (reference.output_format), which costs one more copy here.

Two kernels compute it (csrc/causal_conv3d/conv.h has the tiling and the invariants):

* ``sm80``: ``C.causal_conv3d_fwd``, mma.sync m16n8k16 + ldmatrix, a 4-stage cp.async pipeline, 128x128x32 tiles;
  any sm_80+ GPU.
* ``sm90``: ``C.causal_conv3d_fwd_sm90``, Hopper only: wgmma m64n128k16 with both operands in shared memory (A
  gathered by cp.async, since the im2col gather is irregular), 4 stages, two consumer warpgroups, 128x128x64 tiles.
  Needs 9.0a in the build's TORCH_CUDA_ARCH_LIST.

Which one runs: ``MMKERNELS_CONV3D_CUDA_KERNEL`` = ``auto`` (default: sm90 on a compute-capability-9 device when the
build has 9.0a, else sm80), ``sm80`` or ``sm90`` (an error on anything but Hopper with a 9.0a build). Read at call
time. The backend is experimental until its kernels have passed their tests on a GPU.

Requirements (``supports`` says which one fails, and the Triton backend runs such inputs): CUDA tensors of fp16 or
bf16 (fp32 is left to Triton, which computes it in exact fp32), Cin % 8 == 0 and Cout % 8 == 0 (16-byte channel
chunks), frames and the weight under 2**31 elements, and an importable Triton (for the backward).

Backward: delegated to the Triton backward (dx, dweight, dbias and dcache; triton.py), as joint_attention's cuda
backend delegates its backward.

Streaming: the cache replaces the front frames exactly as in the other backends, and ``return_cache`` is built by the
op itself (__init__.py), whatever the backend. A CTA tile never spans two output frames, so every output frame is
computed by the same tiles in the same order whatever the chunking: chunked calls reproduce a whole-video call
bitwise on this backend too.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from mmkernels import _backend, _ext
from mmkernels.ops.causal_conv3d import reference

DTYPES = (torch.float16, torch.bfloat16)
KERNEL_ENV = "MMKERNELS_CONV3D_CUDA_KERNEL"
KERNELS = _ext.SM_KERNELS
_INT_MAX = 2**31 - 1
_BM = _BN = 128  # the kernels' CTA tile (csrc/causal_conv3d/conv.h)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             cache: Optional[torch.Tensor] = None) -> _backend.Reason:
    """None when the cuda kernels can run these inputs, else why not."""
    why = _backend.cuda_supports_tensors(x, weight, bias, cache, dtypes=DTYPES + (torch.float32,))
    if why is not None:
        return why
    if x.dtype not in DTYPES:
        return "float32 inputs are left to the Triton backend (the cuda kernels are fp16/bf16 tensor-core kernels)"
    if _backend.triton_available() is not None:
        return f"its backward is the Triton backward: {_backend.triton_available()}"
    B, Cin, T, H, W = x.shape
    Cout, _, kt, kh, kw = weight.shape
    if Cin % 8 or Cout % 8:
        return f"Cin = {Cin} and Cout = {Cout} must be multiples of 8 (the kernels move 16-byte channel chunks)"
    _, _, T_out, Ho, Wo = reference.output_shape(x, weight, 1)
    K = kt * kh * kw * Cin
    if max(H * W * Cin, Ho * Wo * Cout, Cout * K, B * T) > _INT_MAX:
        return "a frame or the weight has 2**31 elements or more (the kernels' offsets are 32-bit)"
    ctas = B * T_out * -(-(Ho * Wo) // _BM) * -(-Cout // _BN)
    if ctas > _INT_MAX:
        return f"the grid would have {ctas} CTAs, beyond 2**31 - 1"
    return None


def select_kernel(choice: str, capability: tuple[int, int], archs: Sequence[str]) -> str:
    """Return "sm80" or "sm90", the forward kernel for ``choice`` (a KERNELS value, as in the environment variable)
    on a device of ``capability`` with an extension built for ``archs`` (e.g. ['8.0', '9.0a']); see _ext.select_sm_kernel."""
    return _ext.select_sm_kernel("causal_conv3d", KERNEL_ENV, choice, capability, archs)


def _forward_fn(device: torch.device):
    kernel = select_kernel(os.environ.get(KERNEL_ENV, "auto"), torch.cuda.get_device_capability(device),
                           _ext.compiled_archs())
    return _ext.C.causal_conv3d_fwd_sm90 if kernel == "sm90" else _ext.C.causal_conv3d_fwd


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is channels_last_3d-dense with a 16-byte aligned start, else one channels-last copy."""
    if t.is_contiguous(memory_format=torch.channels_last_3d) and _aligned(t):
        return t
    return t.clone(memory_format=torch.channels_last_3d)  # clone: a fresh (aligned) buffer even when dense


def reordered_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [Cout, Cin, kt, kh, kw] as the kernels' contiguous, 16-byte aligned [Cout, kt, kh, kw, Cin]."""
    w = weight.permute(0, 2, 3, 4, 1)
    return w.contiguous() if not w.is_contiguous() else (w if _aligned(w) else w.clone())


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cache: Optional[torch.Tensor],
            stride: int, replicate: bool) -> torch.Tensor:
    fn = _forward_fn(x.device)
    y = fn(_channels_last(x), reordered_weight(weight), bias.contiguous() if bias is not None else None,
           _channels_last(cache) if cache is not None else None, stride, replicate)
    if reference.output_format(x) != torch.channels_last_3d:
        y = y.contiguous()
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor], stride: int,
             replicate: bool, needs: Sequence[bool]):
    """(dx, dweight, dbias, dcache): the Triton backward (there is no CUDA backward)."""
    from mmkernels.ops.causal_conv3d import triton as _triton

    return _triton.backward(dy, x, weight, cache, stride, replicate, needs)
