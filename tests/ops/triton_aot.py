"""Compile every Triton kernel for sm_90 and sm_80 without a GPU; run as ``python -m tests.ops.triton_aot``.

It must run in a process without TRITON_INTERPRET (the interpreter patches triton.language), so
test_triton_compile.py starts it as a subprocess. Prints one JSON object: {case: {"ok", "error", "sin_cos"}}.
"""

import json
import os
import re
import sys


def compile_for(kernel, arch: int, types: dict, constexprs: dict):
    """Compile ``kernel`` for sm_<arch>; runtime args not in ``types`` are i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = set(constexprs) - set(kernel.arg_names)
    if missing:
        raise ValueError(f"unknown constexprs {missing}")
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def _types(dt: str) -> dict:
    ptrs = {n: f"*{dt}" for n in ("X", "W", "Y", "DY", "DX")}
    return {**ptrs, "RSTD": "*fp32", "DWP": "*fp32", "INV_FREQ": "*fp32", "eps": "fp32", "sign": "fp32",
            "stride_xm": "i64", "stride_dym": "i64", "stride_xb": "i64"}


def cases():
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


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    results = {}
    for name, kernel, arch, types, const in cases():
        try:
            ptx = compile_for(kernel, arch, types, const).asm["ptx"]
            results[name] = {"ok": True, "error": "",
                             "sin_cos": sorted(set(re.findall(r"__nv_(?:sin|cos)f|(?:sin|cos)\.approx\.\w+", ptx)))}
        except Exception as e:  # report every failing variant, not just the first
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:], "sin_cos": []}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
