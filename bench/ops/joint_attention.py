"""Joint attention benchmark (LaVin-DiT's ``joint_attn``: per-stream QK RMSNorm + 3D RoPE + GQA attention).

Cost per call, B batch, Hq/Hkv heads, head dim D, Ltot = sum of the stream lengths, s = bytes per element. FLOPs are
the *useful* ones, counted at the real head dim (D = 72 even where a kernel pads it to 96 or 128), and the same for
every implementation of a case, so TFLOP/s compare directly:
  forward   4*B*Hq*Ltot^2*D            (QK^T and PV, 2 FLOP per multiply-add; norm/RoPE are O(Ltot*D), not counted)
  backward  2.5x the forward           (so forward+backward = 3.5 * 4*B*Hq*Ltot^2*D)
Bytes (for completeness; attention at these lengths is compute-bound), the op's own minimal traffic, also the same
for every implementation: forward reads the raw q/k/v projections and norm weights and writes the output,
(Hq + 2*Hkv)*D*B*Ltot*s + weights + Hq*D*B*Ltot*s; backward reads them again plus the output and its gradient and
writes the gradients of q/k/v/weights. Expanded KV copies, padding and LSE are not counted.
Ceilings (H200): ~790 TFLOP/s dense bf16 matmul, ~4.3 TB/s.

Bars (issue, H200, bf16):
  * LaVin-DiT 3.4B shapes (D = 72): forward >= 450 useful TFLOP/s and >= 1.25x faster than cuDNN SDPA on already
    normalized and roped inputs; backward >= 350 TFLOP/s.
  * D = 128, L = 16k: forward >= 600 TFLOP/s.
  * The whole op (norm + RoPE + attention from the raw projections) >= 1.5x faster than the official-style unfused
    path, forward and forward+backward.
  * The Triton backend alone >= SDPA flash at D = 72.
Anchors: FlashAttention-3 ~648 TFLOP/s at d = 128; cuDNN ~345-366 useful TFLOP/s at d = 72; FA2/FA3 run 72 as 96.

Shapes: LaVin-DiT 3.4B (B=2, Hq=32, Hkv=8, D=72, per-stream "full" q/k RMSNorm with [Hq*D]/[Hkv*D] weights, 3D RoPE
split 24/24/24 over the joint (T, H, W) grid): 512^2 frames are 32x32 tokens, 256^2 frames 16x16, with 9 or 17
condition frames plus one target frame. Plain shapes: B=1, Hq=Hkv=16, L=16384 at D=128 (one stream) and D=64 (two
streams of 8192), without norm or RoPE (pure attention; the fused prologue has nothing to do). ``--quick``: the first
512^2 shape only. CPU: one tiny fp32 case with our torch backend and the official-style path only.

Implementations, all on the same inputs in the same run (the first is the table's speedup baseline):
  * "official unfused (SDPA)": reference.official_style, the official LaVin-DiT arithmetic (apex-style RMSNorm per
    stream, head split, cat, bf16 split/cat RoPE, SDPA with expanded KV), whole op from the raw projections.
  * "official unfused (flash_attn)": the same with flash_attn.flash_attn_func (native GQA), when importable: the
    real official path.
  * mmkernels[triton] / mmkernels[cuda]: mmkernels.joint_attention, the whole op from the raw projections.
  * Attention only, on inputs already normalized and roped outside the timed region (reference.qk_transform, one
    rounding), labelled "(pre-normed q/k)": torch SDPA pinned to FLASH_ATTENTION, CUDNN_ATTENTION and
    EFFICIENT_ATTENTION ([B, H, L, D] contiguous, KV heads expanded with repeat_interleave outside the timing);
    torch.compile'd flex_attention (no mask or score_mod, enable_gqa); xformers memory_efficient_attention
    ([B, L, H, D], expanded KV) and flash_attn_func ([B, L, H, D], native GQA) when importable.
A baseline that cannot run a shape is recorded as skipped with the reason. Our records carry "x vs cuDNN" and
"x vs SDPA flash" notes (same pass, same case).
Inputs: raw projections ~ N(0, 1); norm weights ~ 1 + 0.1 N(0, 1) (trained-like; weights of spread 1 make softmax
so peaked that bf16 rounding differences alone exceed 1e-2).
Correctness: every output is compared with one expected value per case, SDPA (default backend) on the pre-normed
inputs, i.e. the op's definition (mmkernels/ops/joint_attention/reference.py); nothing materializes Ltot^2. The
relative error is kept in each record's ``rel_err``; over the bound (1e-2 in bf16; 2e-2 for the official path, which
rounds after every norm/RoPE op) the record is marked WRONG.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

import mmkernels
from bench.common import Context, Record, _reason, measure, our_impls
from mmkernels.ops.joint_attention import reference
from mmkernels.ops.rope3d import reference as rope_ref
from mmkernels.testing import randn


class Case(NamedTuple):
    name: str
    batch: int
    lengths: tuple[int, ...]  # per stream, condition first
    hq: int
    hkv: int
    d: int
    norm: bool  # per-stream "full" q/k RMSNorm
    grid: Optional[tuple[int, int, int]]  # 3D RoPE grid over the joint sequence, or None for no RoPE


CASES = [
    Case("LaVin 512^2 9+1f", 2, (9216, 1024), 32, 8, 72, True, (10, 32, 32)),
    Case("LaVin 512^2 17+1f", 2, (17408, 1024), 32, 8, 72, True, (18, 32, 32)),
    Case("LaVin 256^2 9+1f", 2, (2304, 256), 32, 8, 72, True, (10, 16, 16)),
    Case("LaVin 256^2 17+1f", 2, (4352, 256), 32, 8, 72, True, (18, 16, 16)),
    Case("plain d128 16k", 1, (16384,), 16, 16, 128, False, None),
    Case("plain d64 16k 2 streams", 1, (8192, 8192), 16, 16, 64, False, None),
]
QUICK = CASES[:1]
CPU = [Case("tiny", 1, (48, 16), 4, 2, 72, True, (4, 4, 4))]
SPLIT72 = (24, 24, 24)  # the official D//3 split
EPS = 1e-6
PRE = "(pre-normed q/k)"
# The official path rounds to bf16 after every norm/RoPE op, so it differs from the op's definition (fp32 norm and
# RoPE, one rounding) by more than bf16's 1e-2 check on random data (~7e-3 measured on the CPU in bf16); the bound of
# its parity test (tests/ops/test_joint_attention.py::test_reference_matches_official_style) applies.
OFFICIAL_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _cost(c: Case, s: int) -> dict[str, tuple[int, int]]:
    ltot = sum(c.lengths)
    S = len(c.lengths)
    fwd_flops = 4 * c.batch * c.hq * ltot * ltot * c.d
    qkv = (c.hq + 2 * c.hkv) * c.d * c.batch * ltot * s
    weights = S * (c.hq + c.hkv) * c.d * s if c.norm else 0
    out = c.hq * c.d * c.batch * ltot * s
    fwd_bytes = qkv + weights + out
    bwd_bytes = (qkv + weights + 2 * out) + (qkv + weights)  # read inputs, output, dO; write the gradients
    return {"fwd": (fwd_bytes, fwd_flops), "fwd+bwd": (fwd_bytes + bwd_bytes, fwd_flops * 7 // 2)}


def _optional_flash_attn():
    try:
        from flash_attn import flash_attn_func
        return flash_attn_func, None
    except Exception as e:  # not installed, or built against another torch
        return None, f"{type(e).__name__}: {e}"


def _optional_xformers():
    try:
        import xformers.ops as xops
        return xops.memory_efficient_attention, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _shape(c: Case) -> str:
    streams = "+".join(map(str, c.lengths))
    extra = (", norm" if c.norm else "") + (f", rope {c.grid}" if c.grid else "")
    return f"[B={c.batch}, L={streams}, Hq={c.hq}, Hkv={c.hkv}, D={c.d}{extra}]"


def _pre_normed(xs, weights, heads: int, rope: Optional[tuple]) -> torch.Tensor:
    """[B, Ltot, heads, D] joint q~ or k~ (RMSNorm + RoPE in fp32, one rounding: the op's definition), or the
    joint v when ``rope`` is None."""
    if rope is None:
        return reference.joint_heads(xs, (), heads, "full", EPS, ((), (), 10000.0, ()), False).transpose(1, 2)
    return reference.joint_heads(xs, weights or (), heads, "full", EPS, rope, True).transpose(1, 2).contiguous()


def run(ctx: Context) -> list[Record]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    s = torch.finfo(dtype).bits // 8
    cases = CPU if not ctx.cuda else QUICK if ctx.quick else CASES
    records = []
    for c in cases:
        records += _run_case(ctx, c, dtype, s)
        if ctx.cuda:
            torch.cuda.empty_cache()
    return records


def _run_case(ctx: Context, c: Case, dtype, s: int) -> list[Record]:
    dev = ctx.device
    B, Hq, Hkv, D, S = c.batch, c.hq, c.hkv, c.d, len(c.lengths)
    ltot = sum(c.lengths)
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D)
    split = (SPLIT72 if D == 72 else rope_ref.suggest_split(D)) if c.grid else ()
    grid = tuple(c.grid) if c.grid else ()
    rope_spec = mmkernels.RoPE3DSpec(grid, split) if c.grid else None
    # (grid, split, base, offsets) for reference.qk_transform; an empty grid means no RoPE.
    rope_args = (grid, split, 10000.0, (0, 0, 0))

    # Raw per-stream projection outputs and norm weights.
    qs = [randn((B, L, Hq * D), dtype, dev) for L in c.lengths]
    ks = [randn((B, L, Hkv * D), dtype, dev) for L in c.lengths]
    vs = [randn((B, L, Hkv * D), dtype, dev) for L in c.lengths]
    qw = [randn((Hq * D,), dtype, dev, shift=1.0, scale=0.1) for _ in range(S)] if c.norm else []
    kw = [randn((Hkv * D,), dtype, dev, shift=1.0, scale=0.1) for _ in range(S)] if c.norm else []
    flat = (*qs, *ks, *vs, *qw, *kw)
    nw = len(qw)

    def unflat(args):
        return (list(args[:S]), list(args[S:2 * S]), list(args[2 * S:3 * S]), list(args[3 * S:3 * S + nw]),
                list(args[3 * S + nw:]))

    # Pre-normed joint inputs [B, Ltot, H, D] (outside every timed region), the expected output, upstream grads.
    with torch.no_grad():
        q_blhd = _pre_normed(qs, qw, Hq, rope_args)
        k_blhd = _pre_normed(ks, kw, Hkv, rope_args)
        v_blhd = _pre_normed(vs, None, Hkv, None).contiguous()
        q_bhld = q_blhd.transpose(1, 2).contiguous()
        k_bhld = k_blhd.transpose(1, 2).contiguous()
        v_bhld = v_blhd.transpose(1, 2).contiguous()
        k_exp = k_bhld.repeat_interleave(group, dim=1)
        v_exp = v_bhld.repeat_interleave(group, dim=1)
        o_bhld = F.scaled_dot_product_attention(q_bhld, k_exp, v_exp, scale=scale)  # the expected value
    o_blhd = o_bhld.transpose(1, 2)
    expected_streams = list(o_blhd.reshape(B, ltot, Hq * D).split(list(c.lengths), dim=1))
    do_blhd = randn((B, ltot, Hq, D), dtype, dev)
    # Per-stream upstream grads, contiguous like the grads an output projection would hand back.
    do_streams = tuple(t.reshape(B, t.shape[1], Hq * D).contiguous() for t in do_blhd.split(list(c.lengths), dim=1))
    do_bhld = do_blhd.transpose(1, 2).contiguous()

    cost = _cost(c, s)
    shape = _shape(c)
    records: list[Record] = []

    def add(label, fn, args, dy, expected, note="", sdpa=None, tol=None):
        def go():
            return measure(ctx, op="joint_attention", case=c.name, shape=shape, label=label, fn=fn, args=args,
                           grad_args=tuple(range(len(args))), dy=dy, expected=expected, note=note, cost=cost,
                           skip_errors=ctx.cuda, tol=tol)
        if sdpa is None:
            records.extend(go())
        else:
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel([sdpa]):  # pins SDPA's backend for the check, the forward and the backward
                records.extend(go())

    # 1. The official unfused path, whole op from the raw projections (the table's baseline: first).
    def official(*args, attention=None):
        q, k, v, a, b = unflat(args)
        return reference.official_style(q, k, v, a, b, EPS, grid, split, Hq, Hkv, scale, attention=attention)

    add("official unfused (SDPA)", official, flat, do_streams, expected_streams, tol=OFFICIAL_TOL.get(dtype))
    flash_attn_func, flash_why = _optional_flash_attn() if ctx.cuda else (None, "CPU")
    if flash_attn_func is not None:
        def fa(q, k, v, sc):
            return flash_attn_func(q, k, v, softmax_scale=sc)

        add("official unfused (flash_attn)", lambda *a: official(*a, attention=fa), flat, do_streams,
            expected_streams, tol=OFFICIAL_TOL.get(dtype))

    # 2. Ours: every backend that can run here, the whole op.
    def ours(*args):
        q, k, v, a, b = unflat(args)
        return mmkernels.joint_attention(q, k, v, num_heads=Hq, num_kv_heads=Hkv, q_norm=a or None,
                                         k_norm=b or None, norm_eps=EPS, norm="full", rope=rope_spec,
                                         softmax_scale=scale)

    for label, fn, note in our_impls(ctx, "joint_attention", ours, qs, ks, vs):
        add(label, fn, flat, do_streams, expected_streams, note)

    if ctx.cuda:
        # 3. Attention only on pre-normed inputs: SDPA per backend, [B, H, L, D], expanded KV.
        from torch.nn.attention import SDPBackend

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            add(f"SDPA {name} {PRE}", sdpa, (q_bhld, k_exp, v_exp), do_bhld, o_bhld, sdpa=be)

        # 4. FlexAttention, compiled, no mask or score_mod, native GQA.
        try:
            from torch.nn.attention.flex_attention import flex_attention
            torch._dynamo.reset()  # a fresh compile cache per case: never fall back to eager (O(L^2) memory)
            flex = torch.compile(flex_attention, dynamic=False)

            def flex_fn(q, k, v):
                return flex(q, k, v, scale=scale, enable_gqa=Hq != Hkv)

            add(f"flex_attention compiled {PRE}", flex_fn, (q_bhld, k_bhld, v_bhld), do_bhld, o_bhld)
        except Exception as e:  # import-time failure; run-time failures are recorded by measure
            records.extend(_skipped(ctx, c, shape, f"flex_attention compiled {PRE}", cost, e))

        # 5. xformers (expanded KV) and flash-attn (native GQA), [B, L, H, D], when importable.
        mea, xf_why = _optional_xformers()
        if mea is not None:
            k_exp_blhd = k_blhd.repeat_interleave(group, dim=2)
            v_exp_blhd = v_blhd.repeat_interleave(group, dim=2)
            add(f"xformers memory_efficient_attention {PRE}", lambda q, k, v: mea(q, k, v, scale=scale),
                (q_blhd, k_exp_blhd, v_exp_blhd), do_blhd, o_blhd)
        else:
            print(f"joint_attention bench: xformers not importable ({xf_why})", flush=True)
        if flash_attn_func is not None:
            add(f"flash_attn_func {PRE}", lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=scale),
                (q_blhd, k_blhd, v_blhd), do_blhd, o_blhd)
        else:
            print(f"joint_attention bench: flash_attn not importable ({flash_why})", flush=True)

        records.extend(_prologue_records(ctx, c, shape, ks, vs, kw, Hq, Hkv, rope_args, dtype, s))

    _speedup_notes(records)
    return records


def _prologue_records(ctx: Context, c: Case, shape: str, ks, vs, kw, Hq: int, Hkv: int, rope_args, dtype,
                      s: int) -> list[Record]:
    """The Triton backend's K/V prologue alone (k~ = RoPE(RMSNorm(k)) and v into the joint buffers), as GB/s: the
    issue's bar for a separate K-side pass is >= 3.5 TB/s on the H200. Bytes: read k, v (and the k-norm weights),
    write the two joint buffers."""
    from bench.common import time_ms
    from mmkernels.ops.joint_attention import triton as ja

    label = "mmkernels[triton] K/V prologue pass"
    kv = 2 * c.batch * sum(c.lengths) * Hkv * c.d * s
    nbytes = 2 * kv + sum(w.numel() for w in kw) * s
    try:
        geo = ja._Geometry(ks, Hkv, Hkv, "full", rope_args, ctx.device)  # sizes from k: Hkv heads
        ms = time_ms(lambda: ja._joint_kv(geo, ks, vs, kw, EPS, "full", dtype, ctx.device), ctx.device, ctx.quick)
        note = ""
    except Exception as e:
        ms, note = float("nan"), f"skipped: {_reason(e)}"
    dname = str(dtype).replace("torch.", "")
    return [Record("joint_attention", c.name, shape, dname, label, "prologue", ms, nbytes, 0,
                   note=note).finish(ctx.copy_gbps)]


def _skipped(ctx: Context, c: Case, shape: str, label: str, cost, e: BaseException) -> list[Record]:
    dtype = "bfloat16" if ctx.cuda else "float32"
    return [Record("joint_attention", c.name, shape, dtype, label, p, float("nan"), *cost[p],
                   note=f"skipped: {_reason(e)}").finish(ctx.copy_gbps) for p in ("fwd", "fwd+bwd")]


def _speedup_notes(records: list[Record]) -> None:
    """Append "N.NNx vs cuDNN" / "vs SDPA flash" (same pass) to our records, where both were measured."""
    for pass_ in ("fwd", "fwd+bwd"):
        rs = [r for r in records if r.pass_ == pass_ and math.isfinite(r.ms)]
        refs = [(short, next((r for r in rs if r.impl == f"SDPA {name} {PRE}"), None))
                for short, name in (("cuDNN", "cudnn"), ("SDPA flash", "flash"))]
        for r in rs:
            if r.impl.startswith("mmkernels"):
                extra = ", ".join(f"{ref.ms / r.ms:.2f}x vs {short}" for short, ref in refs if ref is not None)
                if extra:
                    r.note = f"{r.note} {extra}".strip()
