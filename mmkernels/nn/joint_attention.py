"""``JointAttention`` module: LaVin-DiT's ``joint_attn`` (blocks.py) on the fused :func:`mmkernels.joint_attention`."""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from mmkernels.nn.rms_norm import RMSNorm
from mmkernels.ops.joint_attention import MAX_HEAD_DIM, MIN_HEAD_DIM, NORMS, joint_attention
from mmkernels.ops.rope3d import RoPE3DSpec

_NAME = "JointAttention"


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{_NAME}: argument '{name}' must be a positive int, got {v!r}")
    return v


class Segment(NamedTuple):
    """One independent attention problem inside packed streams (see :meth:`JointAttention.forward`).

    ``lengths``: its token count in each stream, in stream order (0 allowed); ``grid``: its RoPE grid (T, H, W) with
    T*H*W == sum(lengths), or None for no RoPE."""

    lengths: tuple
    grid: Optional[tuple] = None


def _segment_slices(segments, stream_lengths, streams):
    """[(per-stream slices, grid)] for ``segments``, checked against the packed stream lengths."""
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or len(segments) == 0:
        raise ValueError(f"{_NAME}.forward: argument 'segments' must be a non-empty sequence of Segment, got "
                         f"{segments!r}")
    offsets = [0] * len(streams)
    plan = []
    for i, seg in enumerate(segments):
        lengths, grid = (seg.lengths, seg.grid) if isinstance(seg, Segment) else (None, None)
        if (lengths is None or len(lengths) != len(streams)
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lengths)):
            raise ValueError(f"{_NAME}.forward: segments[{i}] must be a Segment with one length >= 0 per stream "
                             f"({', '.join(streams)}), got {seg!r}")
        plan.append(([slice(o, o + n) for o, n in zip(offsets, lengths)], None if grid is None else tuple(grid)))
        offsets = [o + n for o, n in zip(offsets, lengths)]
    if offsets != list(stream_lengths):
        raise ValueError(f"{_NAME}.forward: the segments' lengths sum to {offsets} per stream, but the packed "
                         f"streams have lengths {list(stream_lengths)}")
    return plan


class JointAttention(nn.Module):
    """Joint attention over S token streams (LaVin-DiT: condition, then target), each with its own projections.

    Per stream ``s`` (names from ``streams``, default ``("cond", "x")``) the module owns

    * ``{s}_q``: Linear dim -> Hq*D, ``{s}_k`` / ``{s}_v``: Linear dim -> Hkv*D (no bias unless ``bias``),
    * ``{s}_qnorm`` / ``{s}_knorm``: :class:`mmkernels.nn.RMSNorm` weight holders, [Hq*D] / [Hkv*D] for
      ``norm="full"`` (RMS over all heads of a token: the official behaviour) or [D] each for ``norm="head"``
      (RMS per head, as in most other DiTs); absent when ``qk_norm=False``,
    * ``{s}_proj``: Linear Hq*D -> dim (bias iff ``bias``: the official ``proj`` follows ``qkv_bias`` too),

    and nothing else: the RoPE tables are computed inside the op, so they are not in the state dict. With the defaults
    the state dict is exactly the official ``blocks.{i}.joint_attn.*`` one (LaVin-DiT 3B: dim 2304, 32 query heads,
    8 KV heads, D 72)::

        cond_q.weight [Hq*D, dim]    cond_k.weight [Hkv*D, dim]    cond_v.weight [Hkv*D, dim]
        cond_qnorm.weight [Hq*D]     cond_knorm.weight [Hkv*D]     cond_proj.weight [dim, Hq*D]
        x_q.weight ... x_proj.weight (the same shapes, the target stream's own weights)

    ``forward(*hs, grid=None, deterministic=False)``: ``hs`` holds one [B, L_s, dim] tensor per stream, in the order
    of ``streams``; the L_s may differ. It computes, as the official module does,

    1. q, k, v = {s}_q(h_s), {s}_k(h_s), {s}_v(h_s), feature index head*D + d (head-major);
    2. q and k RMSNorm-ed with the stream's weights (eps ``norm_eps``); v is not normalized;
    3. the streams concatenated along the sequence, in order (cond first), and 3D rotate-half RoPE over the joint
       sequence when ``grid`` = (T, H, W) is given: T*H*W must equal sum L_s, token n of the joint sequence sits at
       (n // (H*W), (n // W) % H, n % W), so the official ``joint_seq_shape = (T_c + T_x, H, W)`` is the grid;
       the head dim is split ``rope_split`` (default D//3 per axis, which needs D % 6 == 0), frequency base
       ``rope_base``;
    4. full bidirectional softmax attention with scale D**-0.5 and GQA (query head j uses KV head j // (Hq/Hkv),
       flash-attn's convention), all of 2-4 in one fused :func:`mmkernels.joint_attention` call;
    5. the output [B, sum L_s, Hq*D] split back per stream and put through ``{s}_proj``.

    It returns a tuple of S tensors [B, L_s, dim]. ``deterministic=True`` asks the op for bitwise-reproducible
    gradients.

    Packed sequences (``segments``, instead of ``grid``): each stream tensor holds several independent sequences one
    after another along L, the same split in every batch row; ``segments[i]`` = :class:`Segment` (its length in
    each stream, its own RoPE grid). Segment i attends only within itself, over its parts of every stream in stream
    order, exactly as if it were run alone; all projections run once over the packed tokens. LaVin-DiT's batched
    classifier-free guidance packs the conditional and the (shorter) unconditional sequence this way.

    There is no dropout: the official ``attn_drop`` / ``proj_drop`` are 0 in every released configuration and have
    no state, so leaving them out changes neither the outputs nor the state dict.

    Autocast: the Linears run in the autocast dtype (q, k and v are then cast to one dtype). The norm weights are
    cast to that dtype as apex ``FusedRMSNorm`` does, and the fused op itself runs with autocast disabled, so its
    fp32 statistics and softmax stay fp32. Outputs have the autocast dtype; parameter gradients have the
    parameters' dtype.

    Parameters are initialized like the official ``initialize_weights``: xavier-uniform Linear weights, zero biases,
    norm weights 1 (see :meth:`reset_parameters`). ``head_dim`` defaults to dim // num_heads and
    ``num_kv_heads`` to ``num_heads``. Head dims must be multiples of 8 in [16, 256] (the op's kernels).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 streams: Sequence[str] = ("cond", "x"), qk_norm: bool = True, norm: str = "full",
                 norm_eps: float = 1e-6, rope_split: Optional[Sequence[int]] = None, rope_base: float = 10000.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        dim = _positive_int("dim", dim)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{_NAME}: num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{_NAME}: dim ({dim}) is not divisible by num_heads ({num_heads}); pass head_dim")
            head_dim = dim // num_heads
        head_dim = _positive_int("head_dim", head_dim)
        if head_dim % 8 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"{_NAME}: head_dim {head_dim} is not supported; expected a multiple of 8 in "
                             f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
        if isinstance(streams, str) or not isinstance(streams, Sequence) or len(streams) == 0:
            raise ValueError(f"{_NAME}: argument 'streams' must be a non-empty sequence of names, got {streams!r}")
        streams = tuple(streams)
        for s in streams:
            if not isinstance(s, str) or not s.isidentifier():
                raise ValueError(f"{_NAME}: argument 'streams' must hold Python identifiers (they prefix the "
                                 f"parameter names), got {s!r}")
        if len(set(streams)) != len(streams):
            raise ValueError(f"{_NAME}: argument 'streams' has duplicate names: {streams}")
        if norm not in NORMS:
            raise ValueError(f"{_NAME}: argument 'norm' must be one of {NORMS}, got {norm!r}")
        if rope_split is not None:
            rope_split = tuple(rope_split)
            if (len(rope_split) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 or p % 2
                                            for p in rope_split) or sum(rope_split) != head_dim):
                raise ValueError(f"{_NAME}: argument 'rope_split' must be 3 even non-negative ints summing to "
                                 f"head_dim={head_dim}, got {rope_split}")
        elif head_dim % 6 == 0:
            rope_split = (head_dim // 3,) * 3
        # else: stays None; a forward with a grid then raises (the op suggests a split).

        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.streams = streams
        self.qk_norm, self.norm, self.norm_eps = bool(qk_norm), norm, float(norm_eps)
        self.rope_split, self.rope_base = rope_split, float(rope_base)
        self.bias = bool(bias)

        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        q_norm_width, k_norm_width = (q_width, kv_width) if norm == "full" else (head_dim, head_dim)
        kw = dict(device=device, dtype=dtype)
        for s in streams:
            setattr(self, f"{s}_q", nn.Linear(dim, q_width, bias=bias, **kw))
            setattr(self, f"{s}_k", nn.Linear(dim, kv_width, bias=bias, **kw))
            setattr(self, f"{s}_v", nn.Linear(dim, kv_width, bias=bias, **kw))
            if self.qk_norm:
                setattr(self, f"{s}_qnorm", RMSNorm(q_norm_width, eps=norm_eps, **kw))
                setattr(self, f"{s}_knorm", RMSNorm(k_norm_width, eps=norm_eps, **kw))
            setattr(self, f"{s}_proj", nn.Linear(q_width, dim, bias=bias, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: xavier-uniform Linear weights, zero biases, norm weights 1."""
        for s in self.streams:
            for suffix in ("q", "k", "v", "proj"):
                lin = getattr(self, f"{s}_{suffix}")
                nn.init.xavier_uniform_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            if self.qk_norm:
                nn.init.ones_(getattr(self, f"{s}_qnorm").weight)
                nn.init.ones_(getattr(self, f"{s}_knorm").weight)

    def forward(self, *hs: torch.Tensor, grid: Optional[Sequence[int]] = None,
                segments: Optional[Sequence[Segment]] = None,
                deterministic: bool = False) -> tuple[torch.Tensor, ...]:
        S = len(self.streams)
        if len(hs) != S:
            raise ValueError(f"{_NAME}.forward: expected {S} stream tensors ({', '.join(self.streams)}) as "
                             f"positional arguments 'hs', got {len(hs)}")
        for i, (s, h) in enumerate(zip(self.streams, hs)):
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"{_NAME}.forward: argument 'hs[{i}]' (stream '{s}') must be a torch.Tensor, "
                                f"got {type(h).__name__}")
            if h.dim() != 3 or h.shape[-1] != self.dim:
                raise ValueError(f"{_NAME}.forward: argument 'hs[{i}]' (stream '{s}') must be [B, L, dim={self.dim}]"
                                 f", got shape {tuple(h.shape)}")
            if h.shape[0] != hs[0].shape[0]:
                raise ValueError(f"{_NAME}.forward: argument 'hs[{i}]' (stream '{s}') has batch {h.shape[0]}, but "
                                 f"hs[0] has batch {hs[0].shape[0]}")

        qs, ks, vs = [], [], []
        for s, h in zip(self.streams, hs):
            qs.append(getattr(self, f"{s}_q")(h))
            ks.append(getattr(self, f"{s}_k")(h))
            vs.append(getattr(self, f"{s}_v")(h))
        # One dtype for the op: under autocast every Linear gives the autocast dtype; the casts are then no-ops.
        dtype = qs[0].dtype
        qs = [t.to(dtype) for t in qs]
        ks = [t.to(dtype) for t in ks]
        vs = [t.to(dtype) for t in vs]

        device_type = hs[0].device.type
        autocast = torch.is_autocast_enabled(device_type)
        q_norm = k_norm = None
        if self.qk_norm:
            q_norm = [getattr(self, f"{s}_qnorm").weight for s in self.streams]
            k_norm = [getattr(self, f"{s}_knorm").weight for s in self.streams]
            if autocast:  # apex FusedRMSNorm casts its weight to the autocast dtype too
                q_norm = [w.to(dtype) for w in q_norm]
                k_norm = [w.to(dtype) for w in k_norm]
        kwargs = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, q_norm=q_norm, k_norm=k_norm,
                      norm_eps=self.norm_eps, norm=self.norm, deterministic=deterministic)
        if segments is None:
            plan = [(None, grid)]
        else:
            if grid is not None:
                raise ValueError(f"{_NAME}.forward: pass either 'grid' or 'segments' (each segment has its own grid),"
                                 " not both")
            plan = _segment_slices(segments, [h.shape[1] for h in hs], self.streams)
        # The op computes its statistics in fp32 itself; autocast would recast its internal matmuls to the
        # low-precision dtype (and make the output dtype differ from the op's fake implementation).
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            parts = []
            for slices, g in plan:
                rope = None if g is None else RoPE3DSpec(g, split=self.rope_split, base=self.rope_base)
                if slices is None:
                    parts.append(joint_attention(qs, ks, vs, rope=rope, **kwargs))
                else:  # views along L: the op takes any strides
                    parts.append(joint_attention([t[:, sl] for t, sl in zip(qs, slices)],
                                                 [t[:, sl] for t, sl in zip(ks, slices)],
                                                 [t[:, sl] for t, sl in zip(vs, slices)], rope=rope, **kwargs))
        # Per stream: the segments' outputs back in packed order (one copy), then one projection over all of them.
        outs = parts[0] if len(parts) == 1 else [torch.cat(o, dim=1) for o in zip(*parts)]
        return tuple(getattr(self, f"{s}_proj")(o) for s, o in zip(self.streams, outs))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, streams={self.streams}, qk_norm={self.qk_norm}, norm={self.norm!r}, "
                f"norm_eps={self.norm_eps}, rope_split={self.rope_split}, rope_base={self.rope_base}, "
                f"bias={self.bias}")
