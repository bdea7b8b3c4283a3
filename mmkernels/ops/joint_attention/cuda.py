"""Joint attention ``cuda`` backend: glue over ``mmkernels._C`` (csrc/joint_attention/). Semantics: reference.py.

Forward: the K/V side and the full-width q rstd come from the Triton prep kernels (``_joint_kv`` and ``_prep`` in
triton.py, small per-token passes); the attention itself is one of two CUDA kernels, one call per stream, both
computing exactly what triton.py's ``_attn_fwd_kernel`` computes (q-side norm and RoPE in their prologue, online
softmax over the joint keys, outputs straight into the stream's own tensor, natural-log LSE kept for the backward),
fp16/bf16, head dims 64/72/80/96/128:

* ``sm80``: ``C.joint_attention_fwd``, mma.sync + cp.async (csrc/joint_attention/fwd_kernel.cuh), any sm_80+ GPU.
* ``sm90``: ``C.joint_attention_fwd_sm90``, Hopper only (csrc/joint_attention/fwd_sm90.cuh): TMA loads of the K/V
  tiles into an mbarrier-guarded shared-memory ring by a producer warpgroup, two consumer warpgroups doing wgmma
  (QK^T from shared memory, PV with P from registers) and the online softmax, ping-ponging between them so one
  softmax overlaps the other's GEMMs. Needs 9.0a in the build's TORCH_CUDA_ARCH_LIST.

Which one runs: ``MMKERNELS_JA_CUDA_KERNEL`` = ``auto`` (default: sm90 on a compute-capability-9 device when the
build has 9.0a, else sm80), ``sm80`` or ``sm90`` (an error on anything but Hopper with a 9.0a build). Read at call
time. Like the whole backend, both kernels are experimental until they have passed their tests on a GPU.

Backward: delegated to the Triton backward (it consumes the same outputs and LSE). A CUDA backward is a later
stretch goal.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from mmkernels import _ext
from mmkernels._ext import C
from mmkernels.ops.joint_attention import triton as _triton

HEAD_DIMS = (64, 72, 80, 96, 128)  # the head dims csrc/joint_attention instantiates
DTYPES = (torch.float16, torch.bfloat16)
KERNEL_ENV = "MMKERNELS_JA_CUDA_KERNEL"
KERNELS = _ext.SM_KERNELS


def select_kernel(choice: str, capability: tuple[int, int], archs: Sequence[str]) -> str:
    """Return "sm80" or "sm90", the forward kernel for ``choice`` (a KERNELS value, as in the environment variable)
    on a device of ``capability`` with an extension built for ``archs`` (e.g. ['8.0', '9.0a']); see _ext.select_sm_kernel."""
    return _ext.select_sm_kernel("joint_attention", KERNEL_ENV, choice, capability, archs)


def _forward_fn(device: torch.device):
    kernel = select_kernel(os.environ.get(KERNEL_ENV, "auto"), torch.cuda.get_device_capability(device),
                           _ext.compiled_archs())
    return C.joint_attention_fwd_sm90 if kernel == "sm90" else C.joint_attention_fwd


def forward(qs, ks, vs, q_norm, k_norm, eps, norm, rope, num_heads, num_kv_heads, scale, deterministic):
    """(list of [B, L_s, Hq*D] outputs, lse [B, Hq, Ltot] fp32)."""
    del deterministic  # the forward is deterministic
    q0 = qs[0]
    dtype, device = q0.dtype, q0.device
    geo = _triton._Geometry(qs, num_heads, num_kv_heads, norm, rope, device)
    kj, vj = _triton._joint_kv(geo, ks, vs, k_norm, eps, norm, dtype, device)
    lse = torch.empty(geo.B, geo.Hq, geo.Ltot, dtype=torch.float32, device=device)
    if geo.rope:
        rope_args = [geo.grid[1], geo.grid[2], *geo.offsets, geo.split[0] // 2, geo.split[1] // 2]
        freq = geo.freq
    else:
        rope_args, freq = [], None
    fwd = _forward_fn(device)
    outs = []
    for s, q in enumerate(qs):
        L = q.shape[1]
        o = torch.empty(geo.B, L, geo.Hq * geo.D, dtype=dtype, device=device)
        outs.append(o)
        if L == 0:
            continue
        w, code, rstd = _triton._q_norm_args(geo, q, q_norm, s, eps, norm)
        if q.shape[2] > 1 and q.stride(2) != 1:  # the kernel reads rows through their strides, columns densely
            q = q.contiguous()
        fwd(q, w if code else None, rstd, freq, kj, vj, o, lse, geo.offs[s], code, float(eps), rope_args,
            float(scale))
    return outs, lse


def backward(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, rope, num_heads, num_kv_heads, scale,
             deterministic):
    """(dqs, dks, dvs, dq_norm, dk_norm): the Triton backward (no CUDA backward yet)."""
    return _triton.backward(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, rope, num_heads, num_kv_heads,
                            scale, deterministic)
