"""Compile every Triton kernel for sm_90 and sm_80 without a GPU; run as ``python -m tests.ops.triton_aot``.

It must run in a process without TRITON_INTERPRET (the interpreter patches triton.language), so
test_triton_compile.py starts it as a subprocess. Prints one JSON object: {case: {"ok", "error", "sin_cos"}}.
"""

import json
import os
import re
import sys


def compile_for(kernel, arch: int, types: dict, constexprs: dict):
    """Compile ``kernel`` for sm_<arch>; runtime args not in ``types`` are i32. Pointers carry the 16-byte
    divisibility hint that the launcher's (torch-allocated) tensors get at run time, and ``num_warps`` /
    ``num_stages`` among ``constexprs`` become compile options, so the code matches what runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
    missing = set(constexprs) - set(kernel.arg_names)
    if missing:
        raise ValueError(f"unknown constexprs {missing}")
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if sig[n].startswith("*")}
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _types(dt: str) -> dict:
    ptrs = {n: f"*{dt}" for n in ("X", "W", "Y", "DY", "DX")}
    return {**ptrs, "RSTD": "*fp32", "DWP": "*fp32", "INV_FREQ": "*fp32", "eps": "fp32", "sign": "fp32",
            "stride_xm": "i64", "stride_dym": "i64", "stride_xb": "i64"}


def _attn_types(dt: str) -> dict:
    ptrs = {n: f"*{dt}" for n in ("X", "W", "Y", "DX", "Q", "QW", "K", "V", "O", "DO", "DOJ", "QJ", "KJ", "VJ")}
    f32 = {n: "*fp32" for n in ("G", "INV_FREQ", "RSTD", "QRSTD", "LSE", "DELTA", "DWP", "DQJ", "DKJ", "DVJ")}
    scalars = {n: "fp32" for n in ("eps", "qk_scale", "sm_scale")}
    return {**ptrs, **f32, **scalars}  # every other runtime int (strides, sizes) is i32, as at run time


def joint_attention_cases(arch: int, dt: str):
    """The forward/backward kernels at LaVin-DiT's D=72 (64 + 16 split) and at 64 and 128 (one part), with and
    without norm/RoPE, at the launchers' GPU block sizes. The full matrix for the production target (sm_90, bf16);
    D=72 with full norm + RoPE elsewhere (attention kernels are slow to compile on 2 cores)."""
    import torch

    from mmkernels.ops.joint_attention import triton as ja

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    full = arch == 90 and dt == "bf16"
    prec = ja._prec(dtype)
    types = _attn_types(dt)
    dims = ((72, (24, 24, 24)), (64, (20, 22, 22)), (128, (44, 42, 42)), (256, (84, 86, 86))) if full else \
        ((72, (24, 24, 24)), (256, (84, 86, 86)))
    for D, split in dims:
        DA, DB = ja.head_dim_parts(D)
        fwd = ja._fwd_blocks(dtype, D)
        (bm1, bn1), (bm2, bn2), bwd_warps, bwd_stages = ja._bwd_blocks(dtype, D)
        rope = dict(PT=split[0] // 2, PH=split[1] // 2)
        for norm, use_rope in ((1, True), (2, True), (0, False)) if full else ((1, True),):
            tag = f"sm{arch}-{dt}-D{D}-norm{norm}-rope{int(use_rope)}"
            yield (f"joint_attention_fwd-{tag}", ja._attn_fwd_kernel, arch, types,
                   dict(D=D, DA=DA, DB=DB, NORM=norm, ROPE=use_rope, PREC=prec, BLOCK_M=fwd[0], BLOCK_N=fwd[1],
                        num_warps=fwd[2], num_stages=fwd[3], **rope))
            heads = 32 if norm == 1 else 8
            bt, bh, bd, warps = ja._token_block(heads, D)
            tiles = dict(BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps)
            yield (f"joint_attention_prep-{tag}", ja._qk_prep_kernel, arch, types,
                   dict(H=heads, D=D, NORM=norm, ROPE=use_rope, WRITE_Y=True, WRITE_RSTD=norm == 1, **tiles,
                        **rope))
            yield (f"joint_attention_grad-{tag}", ja._qk_grad_kernel, arch, types,
                   dict(H=heads, D=D, NORM=norm, ROPE=use_rope, **tiles, **rope))
        common = dict(D=D, DA=DA, DB=DB, PREC=prec, num_warps=bwd_warps, num_stages=bwd_stages)
        yield (f"joint_attention_dkdv-sm{arch}-{dt}-D{D}", ja._attn_bwd_dkdv_kernel, arch, types,
               dict(BLOCK_M=bm1, BLOCK_N=bn1, **common))
        yield (f"joint_attention_dq-sm{arch}-{dt}-D{D}", ja._attn_bwd_dq_kernel, arch, types,
               dict(BLOCK_M=bm2, BLOCK_N=bn2, **common))
        yield (f"joint_attention_delta-sm{arch}-{dt}-D{D}", ja._bwd_delta_kernel, arch, types,
               dict(D=D, BLOCK_M=64, BLOCK_D=triton_next_pow2(D)))


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def cases():
    from mmkernels.ops.adarn import triton as adarn
    from mmkernels.ops.causal_conv3d import triton as conv3d
    from mmkernels.ops.group_norm_silu import triton as gn_silu
    from mmkernels.ops.rms_norm import triton as rms
    from mmkernels.ops.rope3d import triton as rope

    for arch, dts in ((90, ("bf16", "fp16", "fp32")), (80, ("bf16",))):
        for dt in dts:
            for one_tile, bm, bn in ((True, 1, 4096), (True, 32, 128), (False, 1, 4096)):
                for has_w in (True, False):
                    const = dict(HAS_W=has_w, ONE_TILE=one_tile, BLOCK_M=bm, BLOCK_N=bn)
                    tag = f"sm{arch}-{dt}-tile{int(one_tile)}-m{bm}-n{bn}-w{int(has_w)}"
                    yield f"rms_norm_fwd-{tag}", rms._rms_norm_fwd_kernel, arch, _types(dt), const
                    yield f"rms_norm_bwd-{tag}", rms._rms_norm_bwd_kernel, arch, _types(dt), const
            yield f"rope3d-sm{arch}-{dt}", rope._rope3d_kernel, arch, _types(dt), dict(P=36, BLOCK_L=32, BLOCK_P=64)
            yield from joint_attention_cases(arch, dt)
            yield from adarn.aot_cases(arch, dt)
            yield from gn_silu.aot_cases(arch, dt)
            yield from conv3d.aot_cases(arch, dt)


_CASES: list = []


def _compile_case(i: int):
    name, kernel, arch, types, const = _CASES[i]
    try:
        compiled = compile_for(kernel, arch, types, const)
        ptx = compiled.asm["ptx"]
        return name, {"ok": True, "error": "", "shared": int(compiled.metadata.shared),
                      "sin_cos": sorted(set(re.findall(r"__nv_(?:sin|cos)f|(?:sin|cos)\.approx\.\w+", ptx)))}
    except Exception as e:  # report every failing variant, not just the first
        return name, {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:], "sin_cos": [], "shared": 0}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import multiprocessing

    _CASES.extend(cases())
    # One process per core (forked, so they inherit the case list): compiling is CPU-bound and independent.
    with multiprocessing.get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        results = dict(pool.map(_compile_case, range(len(_CASES)), chunksize=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
