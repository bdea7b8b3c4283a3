"""The compiled extension: built whenever nvcc is present, for the expected archs and ops, and importable here."""

import os
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
