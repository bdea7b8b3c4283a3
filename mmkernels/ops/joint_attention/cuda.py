"""Joint attention ``cuda`` backend: glue over ``mmkernels._C`` (csrc/joint_attention/). Semantics: reference.py.

Forward: the K/V side and the full-width q rstd come from the Triton prep kernels (``_joint_kv`` and ``_prep`` in
triton.py, small per-token passes); the attention itself is the mma.sync kernel ``C.joint_attention_fwd`` (sm_80+,
fp16/bf16, head dims 64/72/80/96/128), one call per stream, computing exactly what triton.py's ``_attn_fwd_kernel``
computes (q-side norm and RoPE in its prologue, online softmax over the joint keys, outputs straight into the
stream's own tensor, natural-log LSE kept for the backward).

Backward: delegated to the Triton backward (it consumes the same outputs and LSE). A CUDA backward is a later
stretch goal.
"""

from __future__ import annotations

import torch

from mmkernels._ext import C
from mmkernels.ops.joint_attention import triton as _triton

HEAD_DIMS = (64, 72, 80, 96, 128)  # the head dims csrc/joint_attention instantiates
DTYPES = (torch.float16, torch.bfloat16)


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
        C.joint_attention_fwd(q, w if code else None, rstd, freq, kj, vj, o, lse, geo.offs[s], code, float(eps),
                              rope_args, float(scale))
    return outs, lse


def backward(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, rope, num_heads, num_kv_heads, scale,
             deterministic):
    """(dqs, dks, dvs, dq_norm, dk_norm): the Triton backward (no CUDA backward yet)."""
    return _triton.backward(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, rope, num_heads, num_kv_heads,
                            scale, deterministic)
