"""``mmkernels.joint_attention``: QK RMSNorm + 3D RoPE + GQA flash attention over several streams (LaVin-DiT).

Registered as the custom ops ``mmkernels::joint_attention_fwd`` / ``mmkernels::joint_attention_bwd``
(torch.library) with fake implementations and autograd, so it passes ``torch.library.opcheck`` and runs under
``torch.compile(fullgraph=True)``. Backends: ``torch`` (reference.py, also the CPU path), ``triton`` (triton.py)
and the experimental ``cuda`` (cuda.py: mma.sync forward kernel, Triton prep and backward); see those modules for
the math and the fusion design.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch

from mmkernels import _backend, _checks
from mmkernels.ops.joint_attention import reference
from mmkernels.ops.rope3d import RoPE3DSpec

_OP = _backend.register_op("joint_attention")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORMS = ("full", "head")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def _triton_supports(qs, ks, vs, *rest) -> _backend.Reason:
    return _backend.triton_supports_tensors(*qs, *ks, *vs, dtypes=_KERNEL_DTYPES)


_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 72, 80, 96, 128)  # the head dims csrc/joint_attention instantiates


def _cuda_supports(qs, ks, vs, num_heads=None, *rest) -> _backend.Reason:
    why = _backend.cuda_supports_tensors(*qs, *ks, *vs, dtypes=_CUDA_DTYPES)
    if why is None and _backend.triton_available() is not None:
        why = f"its K/V prep and backward are Triton kernels: {_backend.triton_available()}"
    if why is None and num_heads:
        D = qs[0].shape[2] // num_heads
        if D not in _CUDA_HEAD_DIMS:
            why = f"head dim {D} is not compiled (supported: {', '.join(map(str, _CUDA_HEAD_DIMS))})"
        elif qs[0].shape[0] * num_heads > 65535:
            why = f"batch * num_heads = {qs[0].shape[0] * num_heads} is above the kernel's limit of 65535"
    return why


_OP.register(_backend.Backend("torch", "mmkernels.ops.joint_attention.reference"))
_OP.register(_backend.Backend("triton", "mmkernels.ops.joint_attention.triton", available=_backend.triton_available,
                              supports=_triton_supports))
_OP.register(_backend.Backend("cuda", "mmkernels.ops.joint_attention.cuda", available=_backend.cuda_available,
                              supports=_cuda_supports,
                              experimental="its kernels have not yet passed their tests on a GPU"))


def _impl(backend: str, qs, ks, vs, num_heads: int):
    impl = _OP.resolve(backend, qs, ks, vs, num_heads)
    # No tokens or no batch: nothing for a kernel to do; the reference gives every backend the same answer.
    empty = qs[0].shape[0] == 0 or sum(q.shape[1] for q in qs) == 0
    return reference if empty else impl


def _no_autocast(t: torch.Tensor):
    """Autocast does not stop at a custom op: without this, the reference's matmuls would run in the autocast dtype
    (outputs of another dtype than the fake says, a bf16 LSE). The op defines its own precision."""
    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cpu", "cuda") else \
        contextlib.nullcontext()


def _rope_tuple(grid, split, base, offsets):
    return (tuple(grid), tuple(split), float(base), tuple(offsets))


@torch.library.custom_op("mmkernels::joint_attention_fwd", mutates_args=())
def _joint_attention_fwd(qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                         q_norm: Sequence[torch.Tensor], k_norm: Sequence[torch.Tensor], eps: float, norm: str,
                         grid: Sequence[int], split: Sequence[int], base: float, offsets: Sequence[int],
                         num_heads: int, num_kv_heads: int, scale: float, deterministic: bool,
                         backend: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    with _no_autocast(qs[0]):
        outs, lse = _impl(backend, qs, ks, vs, num_heads).forward(
            list(qs), list(ks), list(vs), list(q_norm), list(k_norm), eps, norm,
            _rope_tuple(grid, split, base, offsets), num_heads, num_kv_heads, scale, deterministic)
    return list(outs), lse


@_joint_attention_fwd.register_fake
def _(qs, ks, vs, q_norm, k_norm, eps, norm, grid, split, base, offsets, num_heads, num_kv_heads, scale,
      deterministic, backend):
    q0 = qs[0]
    total = sum(q.shape[1] for q in qs)
    outs = [q.new_empty((q.shape[0], q.shape[1], q.shape[2])) for q in qs]
    return outs, q0.new_empty((q0.shape[0], num_heads, total), dtype=torch.float32)


@torch.library.custom_op("mmkernels::joint_attention_bwd", mutates_args=())
def _joint_attention_bwd(douts: Sequence[torch.Tensor], qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                         vs: Sequence[torch.Tensor], q_norm: Sequence[torch.Tensor], k_norm: Sequence[torch.Tensor],
                         outs: Sequence[torch.Tensor], lse: torch.Tensor, eps: float, norm: str,
                         grid: Sequence[int], split: Sequence[int], base: float, offsets: Sequence[int],
                         num_heads: int, num_kv_heads: int, scale: float, deterministic: bool,
                         backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                                list[torch.Tensor], list[torch.Tensor]]:
    with _no_autocast(qs[0]):
        grads = _impl(backend, qs, ks, vs, num_heads).backward(
            list(douts), list(qs), list(ks), list(vs), list(q_norm), list(k_norm), list(outs), lse, eps, norm,
            _rope_tuple(grid, split, base, offsets), num_heads, num_kv_heads, scale, deterministic)
    return tuple(list(g) for g in grads)


@_joint_attention_bwd.register_fake
def _(douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, grid, split, base, offsets, num_heads, num_kv_heads,
      scale, deterministic, backend):
    return tuple([t.new_empty(t.shape) for t in group] for group in (qs, ks, vs, q_norm, k_norm))


def _setup_context(ctx, inputs, output):
    qs, ks, vs, q_norm, k_norm, *params = inputs
    outs, lse = output
    ctx.counts = (len(qs), len(ks), len(vs), len(q_norm), len(k_norm))
    ctx.save_for_backward(*qs, *ks, *vs, *q_norm, *k_norm, *outs, lse)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, douts, _dlse):
    saved = list(ctx.saved_tensors)
    groups = []
    for n in ctx.counts + (ctx.counts[0],):
        groups.append(saved[:n])
        saved = saved[n:]
    qs, ks, vs, q_norm, k_norm, outs = groups
    (lse,) = saved
    eps, norm, grid, split, base, offsets, num_heads, num_kv_heads, scale, deterministic, backend = ctx.params
    dqs, dks, dvs, dqn, dkn = torch.ops.mmkernels.joint_attention_bwd(
        douts, qs, ks, vs, q_norm, k_norm, outs, lse, eps, norm, grid, split, base, offsets, num_heads,
        num_kv_heads, scale, deterministic, backend)
    # Non-tensor arguments get None, except that autograd wants an empty list back for an empty list (no RoPE).
    rest = tuple([] if isinstance(p, (list, tuple)) and len(p) == 0 else None for p in ctx.params)
    return (dqs, dks, dvs, dqn, dkn) + rest


_joint_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _streams(name: str, xs) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise TypeError(f"mmkernels.joint_attention: argument '{name}' must be a non-empty sequence of tensors "
                        f"(one [B, L_s, heads*D] tensor per stream), got {type(xs).__name__}")
    return [_checks.tensor("joint_attention", f"{name}[{i}]", x, ndim=3) for i, x in enumerate(xs)]


def _norm_weights(name: str, ws, widths: Sequence[int], S: int, ref: torch.Tensor) -> list[torch.Tensor]:
    if ws is None:
        return []
    if isinstance(ws, torch.Tensor) or not isinstance(ws, Sequence) or len(ws) != S:
        raise TypeError(f"mmkernels.joint_attention: argument '{name}' must be None or a sequence of {S} weight "
                        f"tensors (one per stream), got {type(ws).__name__}"
                        + (f" of length {len(ws)}" if isinstance(ws, Sequence) else ""))
    out = []
    for i, w in enumerate(ws):
        _checks.tensor("joint_attention", f"{name}[{i}]", w, ndim=1)
        if w.shape[0] != widths[i]:
            raise ValueError(f"mmkernels.joint_attention: argument '{name}[{i}]' must have shape [{widths[i]}], "
                             f"got {tuple(w.shape)}")
        _checks.same_device("joint_attention", "qs[0]", ref, f"{name}[{i}]", w)
        out.append(w)
    return out


def joint_attention(qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], *,
                    num_heads: int, num_kv_heads: int, q_norm: Optional[Sequence[torch.Tensor]] = None,
                    k_norm: Optional[Sequence[torch.Tensor]] = None, norm_eps: float = 1e-6, norm: str = "full",
                    rope: Optional[RoPE3DSpec] = None, softmax_scale: Optional[float] = None,
                    deterministic: bool = False) -> list[torch.Tensor]:
    """Attention over the concatenation of S streams, with per-stream QK RMSNorm, 3D RoPE and GQA, fused.

    Args:
        qs, ks, vs: S >= 1 streams each, in order (LaVin-DiT: condition, target). ``qs[s]`` is [B, L_s, Hq*D] and
            ``ks[s]``/``vs[s]`` are [B, L_s, Hkv*D]: raw projection outputs, feature index head*D + d, any strides.
            Same dtype and device everywhere; L_s may differ between streams (and may be 0).
        num_heads, num_kv_heads: Hq and Hkv, Hq % Hkv == 0; query head j uses KV head j // (Hq // Hkv).
        q_norm, k_norm: None, or one RMSNorm weight per stream: [Hq*D] / [Hkv*D] for ``norm="full"`` (RMS over all
            heads of a token, the official behaviour), [D] for ``norm="head"``.
        norm_eps: RMSNorm epsilon (>= 0).
        rope: :class:`mmkernels.RoPE3DSpec` whose grid covers the joint sequence (T*H*W == sum L_s), or None.
        softmax_scale: default D**-0.5.
        deterministic: request bitwise-reproducible gradients. The Triton backward always is (no atomics); the
            torch backend then runs SDPA's math path on CUDA.

    Returns:
        One [B, L_s, Hq*D] tensor per stream (input dtype, contiguous), ready for that stream's output projection.
        Differentiable in every q/k/v stream and norm weight. Head dims: multiples of 8 in [16, 256].
        Math: mmkernels/ops/joint_attention/reference.py.
    """
    op = "joint_attention"
    qs, ks, vs = _streams("qs", qs), _streams("ks", ks), _streams("vs", vs)
    S = len(qs)
    if len(ks) != S or len(vs) != S:
        raise ValueError(f"mmkernels.{op}: qs, ks and vs must hold the same number of streams, got "
                         f"{len(qs)}, {len(ks)} and {len(vs)}")
    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"mmkernels.{op}: argument '{name}' must be a positive int, got {v!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"mmkernels.{op}: num_heads ({num_heads}) must be divisible by num_kv_heads "
                         f"({num_kv_heads}) for grouped-query attention")
    q0 = qs[0]
    B, dtype = q0.shape[0], q0.dtype
    if q0.shape[2] % num_heads:
        raise ValueError(f"mmkernels.{op}: qs[0] has width {q0.shape[2]}, not a multiple of num_heads={num_heads}")
    D = q0.shape[2] // num_heads
    if D % 8 or not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"mmkernels.{op}: head dim {D} (= width {q0.shape[2]} / num_heads {num_heads}) is not "
                         f"supported; expected a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    for name, xs, heads in (("qs", qs, num_heads), ("ks", ks, num_kv_heads), ("vs", vs, num_kv_heads)):
        for i, x in enumerate(xs):
            where = f"mmkernels.{op}: argument '{name}[{i}]' (shape {tuple(x.shape)})"
            if x.dtype != dtype:
                raise TypeError(f"{where} has dtype {x.dtype}, but qs[0] has {dtype}; all streams need one dtype")
            _checks.same_device(op, "qs[0]", q0, f"{name}[{i}]", x)
            if x.shape[0] != B:
                raise ValueError(f"{where} has batch {x.shape[0]}, but qs[0] has batch {B}")
            if x.shape[2] != heads * D:
                raise ValueError(f"{where} must have width {heads}*{D} = {heads * D} (heads * head dim)")
            if x.shape[1] != qs[i].shape[1]:
                raise ValueError(f"{where} has {x.shape[1]} tokens, but qs[{i}] has {qs[i].shape[1]}; "
                                 f"a stream's q, k and v must have the same length")
    if norm not in NORMS:
        raise ValueError(f"mmkernels.{op}: argument 'norm' must be one of {NORMS}, got {norm!r}")
    qw = _norm_weights("q_norm", q_norm, [num_heads * D if norm == "full" else D] * S, S, q0)
    kw = _norm_weights("k_norm", k_norm, [num_kv_heads * D if norm == "full" else D] * S, S, q0)
    eps = _checks.finite_float(op, "norm_eps", norm_eps, nonnegative=True)
    total = sum(q.shape[1] for q in qs)
    if rope is None:
        grid, split, base, offsets = (), (), 10000.0, ()
    elif isinstance(rope, RoPE3DSpec):
        grid, split, base, offsets = rope.resolve(op, D, total)
    else:
        raise TypeError(f"mmkernels.{op}: argument 'rope' must be a mmkernels.RoPE3DSpec or None, "
                        f"got {type(rope).__name__}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else _checks.finite_float(op, "softmax_scale",
                                                                                   softmax_scale, positive=True)
    if not isinstance(deterministic, bool):
        raise TypeError(f"mmkernels.{op}: argument 'deterministic' must be a bool, got {type(deterministic).__name__}")
    outs, _ = torch.ops.mmkernels.joint_attention_fwd(
        qs, ks, vs, qw, kw, eps, norm, list(grid), list(split), base, list(offsets), num_heads, num_kv_heads,
        scale, deterministic, _backend.requested_backend())
    return list(outs)
