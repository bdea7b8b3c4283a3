"""Joint attention (LaVin-DiT's ``joint_attn`` core): the definition and the ``torch`` backend.

Inputs are S >= 1 streams (LaVin-DiT: condition then target), each with its own raw projection outputs:

* ``qs[s]``: [B, L_s, Hq*D], ``ks[s]``, ``vs[s]``: [B, L_s, Hkv*D]; feature index = head*D + d (head-major).
* ``q_norm[s]``, ``k_norm[s]``: RMSNorm weights of the stream, or empty lists for no QK-norm.
  ``norm="full"``: RMS over the token's whole vector (all heads, the official behaviour), weights [Hq*D] / [Hkv*D];
  ``norm="head"``: RMS over each head's D values, weights [D].

The math, with J = concat over streams in order (Ltot = sum L_s tokens):

1. q~ = RoPE(RMSNorm_q(q)), k~ = RoPE(RMSNorm_k(k)) per token; RMSNorm is ``x * rsqrt(mean(x^2) + eps) * w`` and
   RoPE is :mod:`mmkernels.ops.rope3d` over ``grid`` covering all Ltot tokens (no RoPE when ``grid`` is empty).
   Norm and RoPE are fp32; q~ and k~ are rounded once to the input dtype (what an MMA consumes).
2. GQA: query head j uses KV head j // (Hq/Hkv).
3. o[j, n] = sum_m softmax_m(scale * q~[j, n] . k~[j//g, m]) v[j//g, m], full bidirectional attention, fp32
   accumulation; ``lse[b, j, n]`` = natural-log log-sum-exp of the scaled scores (fp32), kept for the backward.
4. Output stream s is rows [off_s, off_s + L_s) of o, as [B, L_s, Hq*D] in the input dtype.

The official code differs only in rounding: apex rounds the normalized value to bf16 before the weight multiply and
after it, and RoPE runs in bf16 with a rounding after every op. :func:`official_style` reproduces that path (split
passes, cat, SDPA with expanded KV); it is the benchmark baseline and a bf16 parity check of this reference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mmkernels.ops.rms_norm import reference as rms_ref
from mmkernels.ops.rope3d import reference as rope_ref

Tensors = Sequence[torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32; fp64 stays fp64 (the ground truth of the CPU tests)."""
    return torch.promote_types(dtype, torch.float32)


def qk_transform(x: torch.Tensor, weight: Optional[torch.Tensor], heads: int, norm: str, eps: float,
                 grid: Sequence[int], split: Sequence[int], base: float, offsets: Sequence[int],
                 token_offset: int) -> torch.Tensor:
    """RMSNorm (when ``weight`` is given) then RoPE for one stream, in the compute dtype.

    ``x`` is [B, L, heads*D] raw; returns [B, L, heads, D]. The stream's tokens are joint positions
    ``token_offset .. token_offset+L-1`` of the joint grid.
    """
    B, L, width = x.shape
    D = width // heads
    xf = x.to(compute_dtype(x.dtype))
    if weight is not None:
        if norm == "full":
            xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
            xf = xf.view(B, L, heads, D)
        else:
            xf = xf.view(B, L, heads, D)
            xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    else:
        xf = xf.view(B, L, heads, D)
    if len(grid) == 0 or L == 0:
        return xf
    return _rotate(xf, (grid, split, base, offsets), token_offset, 1.0)


def joint_heads(xs: Tensors, weights: Tensors, heads: int, norm: str, eps: float, rope: tuple, transform: bool):
    """[B, heads, Ltot, D] joint tensor in the input dtype: q~ / k~ (``transform``: norm when ``weights`` is
    non-empty, RoPE when the rope grid is non-empty) or the plain joint v."""
    parts, off = [], 0
    for s, x in enumerate(xs):
        if transform:
            w = weights[s] if len(weights) else None
            y = qk_transform(x, w, heads, norm, eps, *rope, token_offset=off)
        else:
            y = x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads)
        parts.append(y.to(x.dtype))
        off += x.shape[1]
    return torch.cat(parts, dim=1).transpose(1, 2)


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Hq, Ltot] natural log-sum-exp of the scaled scores, in fp32 (fp64 for fp64), over query chunks so that
    memory stays O(chunk * Ltot)."""
    B, H, L, _ = q.shape
    acc = compute_dtype(q.dtype)
    out = torch.empty(B, H, L, dtype=acc, device=q.device)
    chunk = max(1, (1 << 26) // max(1, B * H * k.shape[2]))
    kt = k.to(acc).transpose(-1, -2)
    for i in range(0, L, chunk):
        s = torch.matmul(q[:, :, i:i + chunk].to(acc), kt) * scale
        out[:, :, i:i + chunk] = torch.logsumexp(s, dim=-1)
    return out.float() if acc != torch.float64 else out


def attend(qs: Tensors, ks: Tensors, vs: Tensors, q_norm: Tensors, k_norm: Tensors, eps: float, norm: str,
           rope: tuple, num_heads: int, num_kv_heads: int, scale: float, deterministic: bool = False,
           with_lse: bool = True):
    """Differentiable reference: (list of per-stream outputs [B, L_s, Hq*D], lse [B, Hq, Ltot] or None).

    ``rope`` is (grid, split, base, offsets), with an empty grid for no RoPE.
    """
    q = joint_heads(qs, q_norm, num_heads, norm, eps, rope, True)
    k = joint_heads(ks, k_norm, num_kv_heads, norm, eps, rope, True)
    v = joint_heads(vs, (), num_kv_heads, norm, eps, rope, False)
    group = num_heads // num_kv_heads
    ke = k.repeat_interleave(group, dim=1)
    ve = v.repeat_interleave(group, dim=1)
    if deterministic and q.is_cuda and torch.is_grad_enabled():
        # SDPA's fused CUDA backwards accumulate dQ with atomics; the math path is reproducible.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q, ke, ve, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, ke, ve, scale=scale)
    B, Ltot = o.shape[0], o.shape[2]
    o = o.transpose(1, 2).reshape(B, Ltot, o.shape[1] * o.shape[3])
    outs = list(o.split([x.shape[1] for x in qs], dim=1))
    lse = _lse(q.detach(), ke.detach(), scale) if with_lse else None
    return [_fresh(t) for t in outs], lse


def forward(qs, ks, vs, q_norm, k_norm, eps, norm, rope, num_heads, num_kv_heads, scale, deterministic):
    """The torch backend's forward: (outs, lse), same signature as the Triton and CUDA backends."""
    with torch.no_grad():
        return attend(qs, ks, vs, q_norm, k_norm, eps, norm, rope, num_heads, num_kv_heads, scale, deterministic)


def _rotate(x: torch.Tensor, rope: tuple, token_offset: int, sign: float) -> torch.Tensor:
    """RoPE of [B, L, H, D] ``x`` at joint positions token_offset.., by +theta (sign 1) or -theta (sign -1)."""
    grid, split, base, offsets = rope
    thetas = [t[token_offset:token_offset + x.shape[1]] for t in rope_ref.angles(tuple(grid), tuple(split), base,
                                                                                 tuple(offsets), x.device)]
    return rope_ref.rotate(x, thetas, split, sign)


def _chain_grad(g: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], heads: int, norm: str,
                eps: float, rope: tuple, token_offset: int):
    """(dx, dw) of one stream from g = dL/d(x~) [B, L, heads, D] (compute dtype): inverse rotation, then the
    RMSNorm backward ``dx = r * (dn - n * mean(dn * n))`` with n = x * r, dn = g * w, dw = sum(g * n)."""
    B, L, width = x.shape
    D = width // heads
    if len(rope[0]) and L:
        g = _rotate(g, rope, token_offset, -1.0)
    if weight is None:
        return g.reshape(B, L, width).to(x.dtype), None
    xf = x.to(g.dtype)
    if norm == "full":
        xf, g = xf.reshape(B, L, 1, width), g.reshape(B, L, 1, width)
        w = weight.to(g.dtype)
    else:
        xf = xf.view(B, L, heads, D)
        w = weight.to(g.dtype)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    n = xf * r
    dn = g * w
    dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (g * n).sum(dim=tuple(range(g.dim() - 1)))
    return dx.reshape(B, L, width).to(x.dtype), dw.to(weight.dtype)


def backward(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, rope, num_heads, num_kv_heads, scale,
             deterministic):
    """The torch backend's backward, written out (autograd does not run inside a custom op):
    recompute q~ and k~, then over query chunks P = exp(scale * q~ k~^T - lse), dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO * O)), dq~ = scale * dS k~, dk~ = scale * dS^T q~, and the chain back through
    the rotation and the norm. Memory is O(chunk * Ltot). Returns (dqs, dks, dvs, dq_norm, dk_norm)."""
    del deterministic  # plain matmuls and sums: reproducible
    acc = compute_dtype(qs[0].dtype)
    q = joint_heads(qs, q_norm, num_heads, norm, eps, rope, True).to(acc)
    k = joint_heads(ks, k_norm, num_kv_heads, norm, eps, rope, True).to(acc)
    v = joint_heads(vs, (), num_kv_heads, norm, eps, rope, False).to(acc)
    B, Hq, Ltot, D = q.shape
    group = num_heads // num_kv_heads
    ke = k.repeat_interleave(group, dim=1)
    ve = v.repeat_interleave(group, dim=1)
    do = torch.cat(list(douts), dim=1).view(B, Ltot, Hq, D).transpose(1, 2).to(acc)
    o = torch.cat(list(outs), dim=1).view(B, Ltot, Hq, D).transpose(1, 2).to(acc)
    delta = (do * o).sum(-1)
    dq = torch.empty_like(q)
    dke = torch.zeros_like(ke)
    dve = torch.zeros_like(ve)
    chunk = max(1, (1 << 26) // max(1, B * Hq * Ltot))
    for i in range(0, Ltot, chunk):
        sl = slice(i, i + chunk)
        p = torch.exp(torch.matmul(q[:, :, sl], ke.transpose(-1, -2)) * scale - lse[:, :, sl, None].to(acc))
        dve += torch.matmul(p.transpose(-1, -2), do[:, :, sl])
        ds = p * (torch.matmul(do[:, :, sl], ve.transpose(-1, -2)) - delta[:, :, sl, None])
        dq[:, :, sl] = torch.matmul(ds, ke) * scale
        dke += torch.matmul(ds.transpose(-1, -2), q[:, :, sl]) * scale
    dk = dke.view(B, num_kv_heads, group, Ltot, D).sum(2)
    dv = dve.view(B, num_kv_heads, group, Ltot, D).sum(2)

    grads = ([], [], [], [], [])
    off = 0
    for s in range(len(qs)):
        L = qs[s].shape[1]
        for j, (g, x, ws, heads) in enumerate(((dq, qs[s], q_norm, num_heads), (dk, ks[s], k_norm, num_kv_heads))):
            w = ws[s] if len(ws) else None
            dx, dw = _chain_grad(g[:, :, off:off + L].transpose(1, 2), x, w, heads, norm, eps, rope, off)
            grads[j].append(dx)
            if dw is not None:
                grads[3 + j].append(dw)
        grads[2].append(dv[:, :, off:off + L].transpose(1, 2).reshape(vs[s].shape).to(vs[s].dtype))
        off += L
    return tuple([_fresh(t) for t in group] for group in grads)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A custom op's outputs may not alias each other or an input, so slices of one joint buffer are copied.
    (Always: under dispatch modes such as opcheck's, ``_base`` does not reveal every view.)"""
    return t.clone(memory_format=torch.contiguous_format)


def official_style(qs: Tensors, ks: Tensors, vs: Tensors, q_norm: Tensors, k_norm: Tensors, eps: float,
                   grid: Sequence[int], split: Sequence[int], num_heads: int, num_kv_heads: int, scale: float,
                   attention=None) -> list[torch.Tensor]:
    """The official LaVin-DiT path, written independently: apex-style RMSNorm per stream (two roundings), head split
    with ``contiguous``, ``cat``, bf16 split/cat RoPE (:func:`rope3d_official_style`), then attention on [B, L, H, D]
    with native GQA (``attention(q, k, v, scale)``; default SDPA with KV heads expanded), split, per-stream outputs.
    """
    def heads(x, h):
        return x.view(x.shape[0], x.shape[1], h, -1).contiguous()

    q = torch.cat([heads(rms_ref.rms_norm(x, w, eps) if w is not None else x, num_heads)
                   for x, w in zip(qs, q_norm or [None] * len(qs))], dim=1)
    k = torch.cat([heads(rms_ref.rms_norm(x, w, eps) if w is not None else x, num_kv_heads)
                   for x, w in zip(ks, k_norm or [None] * len(ks))], dim=1)
    v = torch.cat([heads(x, num_kv_heads) for x in vs], dim=1)
    if len(grid):
        q = rope_ref.rope3d_official_style(q, tuple(grid), tuple(split))
        k = rope_ref.rope3d_official_style(k, tuple(grid), tuple(split))
    if attention is None:
        g = num_heads // num_kv_heads
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, dim=1),
                                           v.transpose(1, 2).repeat_interleave(g, dim=1), scale=scale)
        o = o.transpose(1, 2)
    else:
        o = attention(q, k, v, scale)
    o = o.reshape(o.shape[0], o.shape[1], -1)
    return list(o.split([x.shape[1] for x in qs], dim=1))
