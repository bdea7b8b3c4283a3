"""The compiled extension: built whenever nvcc is present, for the expected archs and ops, and importable here; the
sm_90a joint-attention kernels really use wgmma and TMA, the causal-conv3d kernels mma.sync / wgmma fed by cp.async,
the group-norm kernels exist for every dtype and vector width, and none of the new kernels spills (SASS and resource
inspection, no GPU needed)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mmkernels import _backend, _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return bool(shutil.which("nvcc")) or os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(not _nvcc_present() or torch.version.cuda is None or os.environ.get("MMKERNELS_BUILD_CUDA") == "0",
                    reason="no nvcc or a CPU-only torch (or MMKERNELS_BUILD_CUDA=0): _C is not expected to be built")
def test_cuda_sources_are_compiled_into_C():
    assert _ext.C is not None, f"nvcc is present but mmkernels._C did not import: {_ext.C_ERROR}"
    op_dirs = sorted(d for d in os.listdir(os.path.join(ROOT, "csrc")) if os.path.isdir(os.path.join(ROOT, "csrc", d)))
    assert sorted(_ext.C.compiled_ops()) == op_dirs, "every csrc/<op>/ folder must be compiled and bound"
    for name in _ext.C.compiled_ops():
        assert "cuda" in _backend.OPS[name].backends
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert _ext.C.cuda_archs() == wanted


@pytest.mark.skipif(_ext.C is None, reason="mmkernels._C is not built")
def test_C_rejects_cpu_tensors_clearly():
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        _ext.C.rms_norm_fwd(torch.randn(2, 4), None, 1e-6)
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        _ext.C.rope3d(torch.randn(1, 2, 1, 6), torch.ones(3), [1, 1, 2], [2, 2, 2], [0, 0, 0], False)
    q, k = torch.randn(1, 3, 64, dtype=torch.half), torch.randn(1, 1, 3, 64, dtype=torch.half)
    for fn in (_ext.C.joint_attention_fwd, _ext.C.joint_attention_fwd_sm90):
        with pytest.raises(ValueError, match="argument 'q' must be a CUDA tensor"):
            fn(q, None, None, None, k, k, torch.empty_like(q), torch.empty(1, 1, 3), 0, 0, 1e-6, [], 0.125)
    x = torch.randn(1, 8, 2, 3, 3, dtype=torch.half).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 3, 3, 3, 8, dtype=torch.half)
    for fn in (_ext.C.causal_conv3d_fwd, _ext.C.causal_conv3d_fwd_sm90):
        with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
            fn(x, w, None, None, 1, True)
    x5, stats = torch.randn(1, 4, 1, 2, 3), torch.empty(1, 2)
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        _ext.C.group_norm_silu_fwd(x5, None, None, None, None, torch.empty_like(x5), stats, stats, 2, 1e-6, True,
                                   [1, 1, 1], False, [0, 0])
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        _ext.C.group_norm_silu_bwd(x5, x5, None, None, None, None, stats, stats, torch.empty_like(x5), None, None, 2,
                                   True, [1, 1, 1], False, [0, 0])


@pytest.mark.parametrize("archs,cap,runs", [
    (["8.0", "9.0a"], (9, 0), True),
    (["8.0", "9.0a"], (8, 0), True),
    (["8.0", "9.0a"], (8, 9), True),     # sm_80 cubins run on sm_89
    (["8.0", "9.0a"], (10, 0), False),   # 9.0a is Hopper-only, no PTX
    (["9.0a"], (8, 0), False),
    (["8.0+PTX"], (12, 0), True),
    (["8.6"], (8, 0), False),
])
def test_arch_compatibility_rule(archs, cap, runs):
    assert _ext.arch_runs_on(archs, cap) is runs


def test_python_m_mmkernels_prints_versions_and_table():
    out = subprocess.run([sys.executable, "-m", "mmkernels"], capture_output=True, text=True, check=True,
                         env={**os.environ, "MMKERNELS_BACKEND": ""}).stdout
    assert "torch" in out and "triton" in out and "_C" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert all(b in header for b in ("cuda", "triton", "torch"))
    for op in ("rms_norm", "rope3d"):
        row = next(line for line in out.splitlines() if line.startswith(op))
        assert row.split()[-1] == "yes"  # torch runs everywhere
    if _ext.C is not None:
        assert f"built for {_ext.C.cuda_archs()}" in out
        assert "experimental" in out  # the CUDA kernels are not validated on a GPU yet
    # The cuda backends of causal_conv3d and group_norm_silu are registered, and experimental (auto never picks them).
    note = next(line for line in out.splitlines() if line.startswith("  cuda (") and "experimental:" in line)
    assert "causal_conv3d" in note and "group_norm_silu" in note, note


def _cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton ships (toolkits without it are common); or None."""
    candidates = [shutil.which("cuobjdump"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# Local memory the sm_90a joint-attention kernels may use: accurate sincosf's argument reduction for huge angles
# (the q RoPE prologue; ptxas: "32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"). Anything more
# means register spills in the main loop.
SM90_MAX_STACK = 32
SM90_HEAD_DIMS = (64, 72, 80, 96, 128)


@pytest.mark.skipif(_ext.C is None, reason="mmkernels._C is not built")
def test_sm90a_joint_attention_kernels_use_wgmma_and_tma():
    """In the sm_90a cubins of _C, every instantiation of the Hopper joint-attention kernel issues HGMMA (the wgmma
    QK^T with both operands in shared memory, the PV with A in registers and a transposed B), UTMALDG (TMA tile
    loads), mbarrier waits and setmaxnreg, and uses no more local memory than the documented sincosf stack."""
    if "9.0a" not in _ext.compiled_archs():
        pytest.skip(f"mmkernels._C was built for {_ext.C.cuda_archs()}, without 9.0a: there is no sm_90a cubin")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither on PATH, in CUDA_HOME/bin nor in triton/backends/nvidia/bin)")
    so = _ext.C.__file__
    elfs = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    assert re.search(r"fwd_sm90_bf16\.sm_90a\.cubin", elfs) and re.search(r"fwd_sm90_fp16\.sm_90a\.cubin", elfs), elfs
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", so], capture_output=True, text=True, check=True).stdout
    funcs = {}
    for chunk in sass.split("Function : ")[1:]:
        name, _, body = chunk.partition("\n")
        funcs[name.strip()] = body
    kernels = {n: b for n, b in funcs.items() if "joint_attention_fwd_sm90_kernel" in n}
    wanted = {(t, d) for t in ("6__half", "13__nv_bfloat16") for d in SM90_HEAD_DIMS}
    found = {(t, d) for t, d in wanted for n in kernels if f"I{t}Li{d}EE" in n}
    assert found == wanted, f"sm_90a kernels missing from the SASS: {sorted(wanted - found)}"
    for name, body in kernels.items():
        d = int(re.search(r"Li(\d+)EE", name).group(1))
        assert re.search(r"HGMMA\.64x128x16\.F32\S* R\d+, gdesc\[", body), f"{name}: no shared-memory QK^T HGMMA"
        assert re.search(rf"HGMMA\.64x{d}x16\.F32\S* R\d+, R\d+, gdesc\[UR\d+\]\.tnspB", body), \
            f"{name}: no register-A PV HGMMA with N = {d}"
        assert "UTMALDG.3D" in body, f"{name}: no TMA loads"
        assert "SYNCS.PHASECHK" in body and "SYNCS.ARRIVE" in body, f"{name}: no mbarrier waits/arrivals"
        assert "USETMAXREG" in body, f"{name}: no setmaxnreg"
    usage = subprocess.run([tool, "-res-usage", "-arch", "sm_90a", so], capture_output=True, text=True,
                           check=True).stdout
    rows = re.findall(r"Function (\S*joint_attention_fwd_sm90_kernel\S*):\s*\n?\s*REG:(\d+) STACK:(\d+)", usage)
    assert len(rows) == len(wanted), usage[:2000]
    for name, reg, stack in rows:
        assert int(reg) <= 168, f"{name}: {reg} registers at launch, above the 384-thread bound (65536 / 384 -> 168)"
        assert int(stack) <= SM90_MAX_STACK, f"{name}: {stack} bytes of stack (spills?), expected <= {SM90_MAX_STACK}"


def _sass_functions(tool: str, so: str, arch: str) -> dict:
    """{mangled kernel name: SASS body} of the cubins of ``arch`` in ``so``."""
    sass = subprocess.run([tool, "-sass", "-arch", arch, so], capture_output=True, text=True, check=True).stdout
    funcs = {}
    for chunk in sass.split("Function : ")[1:]:
        name, _, body = chunk.partition("\n")
        funcs[name.strip()] = body
    return funcs


CONV_DTYPES = ("6__half", "13__nv_bfloat16")
GN_KERNELS = ("gn_stats_kernel", "gn_apply_kernel", "gn_bwd_reduce_kernel", "gn_bwd_dx_kernel")
GN_TYPES = {"f": 4, "6__half": 8, "13__nv_bfloat16": 8}  # element type: elements of a 16-byte vector
# Local memory the causal-conv3d and group-norm kernels may use: none (ptxas: "0 bytes stack frame, 0 bytes spill
# stores, 0 bytes spill loads" for every instantiation). Anything more means register spills.
NEW_KERNELS_MAX_STACK = 0


@pytest.mark.skipif(_ext.C is None, reason="mmkernels._C is not built")
def test_conv3d_and_group_norm_kernels_are_compiled():
    """Every instantiation of the causal-conv3d and group-norm kernels is in the sm_80 and sm_90a cubins of _C: the
    conv3d sm_80 kernel issues mma.sync (HMMA.16816) on ldmatrix (LDSM) fragments of cp.async (LDGSTS) tiles, the
    sm_90a one wgmma (HGMMA.64x128x16 from shared-memory descriptors) on cp.async tiles; the group-norm kernels exist
    for fp32/fp16/bf16 with and without 16-byte vectors, and the vector ones load 128 bits at a time. No spills."""
    if "9.0a" not in _ext.compiled_archs() or "8.0" not in _ext.compiled_archs():
        pytest.skip(f"mmkernels._C was built for {_ext.C.cuda_archs()}, not for both 8.0 and 9.0a")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither on PATH, in CUDA_HOME/bin nor in triton/backends/nvidia/bin)")
    so = _ext.C.__file__
    elfs = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for cubin in ("fwd_sm80.sm_80", "fwd_sm80.sm_90a", "fwd_sm90.sm_90a", "kernels.sm_80", "kernels.sm_90a"):
        assert re.search(rf"\b{re.escape(cubin)}\.cubin", elfs), f"{cubin}.cubin missing:\n{elfs}"
    for arch in ("sm_80", "sm_90a"):
        funcs = _sass_functions(tool, so, arch)
        for t in CONV_DTYPES:
            bf16 = "bfloat16" in t
            name = next((n for n in funcs if f"causal_conv3d_fwd_sm80_kernelI{t}EE" in n), None)
            assert name is not None, f"{arch}: causal_conv3d_fwd_sm80_kernel<{t}> missing"
            body = funcs[name]
            assert re.search(r"HMMA\.16816\.F32" + (r"\.BF16" if bf16 else r"\s"), body), f"{arch} {name}: no HMMA"
            assert "LDSM.16.M88.4" in body and "LDGSTS.E" in body, f"{arch} {name}: no ldmatrix / cp.async"
            if arch == "sm_90a":
                name = next((n for n in funcs if f"causal_conv3d_fwd_sm90_kernelI{t}EE" in n), None)
                assert name is not None, f"sm_90a: causal_conv3d_fwd_sm90_kernel<{t}> missing"
                body = funcs[name]
                hgmma = r"HGMMA\.64x128x16\.F32" + (r"\.BF16" if bf16 else "") + r" R\d+, gdesc\[UR\d+\]"
                assert re.search(hgmma, body), f"{name}: no shared-memory HGMMA.64x128x16"
                assert "LDGSTS.E" in body and "WARPGROUP.ARRIVE" in body, f"{name}: no cp.async / wgmma fence"
        for kernel in GN_KERNELS:
            for t, vec in GN_TYPES.items():
                for v in (1, vec):
                    name = next((n for n in funcs if f"{kernel}I{t}Li{v}EE" in n), None)
                    assert name is not None, f"{arch}: {kernel}<{t}, {v}> missing"
                    if v > 1:
                        assert "LDG.E.128" in funcs[name], f"{arch} {name}: no 16-byte loads"
        for kernel in ("gn_stats_finalize_kernel", "gn_bwd_finalize_kernel"):
            assert any(kernel in n for n in funcs), f"{arch}: {kernel} missing"
        usage = subprocess.run([tool, "-res-usage", "-arch", arch, so], capture_output=True, text=True,
                               check=True).stdout
        rows = re.findall(r"Function (\S*(?:causal_conv3d_fwd_sm[89]0_kernel|gn_\w+_kernel)\S*):\s*\n?\s*"
                          r"REG:\d+ STACK:(\d+)", usage)
        expected = 2 * len(CONV_DTYPES) + 2 * len(GN_KERNELS) * len(GN_TYPES) + 2
        assert len(rows) == expected, f"{arch}: {len(rows)} kernels in the resource usage, expected {expected}"
        for name, stack in rows:
            assert int(stack) <= NEW_KERNELS_MAX_STACK, f"{arch} {name}: {stack} bytes of stack (spills?)"
