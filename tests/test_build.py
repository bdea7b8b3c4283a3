"""The compiled extension: built whenever nvcc is present, for the expected archs and ops, and importable here; the
sm_90a joint-attention kernels really use wgmma and TMA (SASS inspection, no GPU needed)."""

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
