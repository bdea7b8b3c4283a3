"""Build script for mmkernels.

The package is pure Python plus one optional compiled extension, ``mmkernels._C``, which holds the CUDA kernels
under ``csrc/``. Install it against the torch you already have, as with flash-attn::

    pip install --no-build-isolation -e .

Environment:
    MMKERNELS_BUILD_CUDA   auto (default): build ``_C`` when nvcc and a CUDA build of torch are both present;
                           1: build it or fail; 0: never build it (Triton and torch backends only).
    TORCH_CUDA_ARCH_LIST   archs to compile for, default "8.0;9.0a" (Ampere mma.sync, Hopper wgmma/TMA).
    CUDA_HOME              the toolkit; defaults to /usr/local/cuda when nvcc is there. torch's own guess from
                           the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local) cannot link -lcudart.
    MAX_JOBS               parallel nvcc jobs for ninja (default: all cores).
    PYTORCH_NVCC           set to "ccache /path/to/nvcc" to cache object files; setup.py does this itself when
                           ccache is on PATH.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _log(msg: str) -> None:
    print(f"mmkernels setup: {msg}", file=sys.stderr)


def _find_cuda_home():
    """The CUDA toolkit root, or None. Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME then)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Follow symlinks: /usr/local/bin/nvcc is often a link into the real toolkit.
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(home, "include")) and glob.glob(os.path.join(home, "lib*", "libcudart*")):
            return home
    return None


def _cutlass_include():
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(os.path.join(path, "cute")) else None


def _cuda_extension():
    """The extension to build, or None (with a one-line reason) when building CUDA code is off or impossible."""
    mode = os.environ.get("MMKERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MMKERNELS_BUILD_CUDA={mode!r}: expected auto, 0 or 1")
    if mode == "0":
        _log("MMKERNELS_BUILD_CUDA=0: installing pure Python (Triton and torch backends only).")
        return None

    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
    except ImportError:
        why = "torch is not installed in the build environment (use pip install --no-build-isolation)"
    else:
        why = None if torch.version.cuda else f"torch {torch.__version__} is not a CUDA build"
    if why is None and cuda_home is None:
        why = "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    if why:
        if mode == "1":
            raise SystemExit(f"MMKERNELS_BUILD_CUDA=1 but {why}.")
        _log(f"not building the CUDA extension: {why}. Installing pure Python (Triton and torch backends only).")
        return None

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if "PYTORCH_NVCC" not in os.environ and shutil.which("ccache"):
        os.environ["PYTORCH_NVCC"] = f"{shutil.which('ccache')} {os.path.join(cuda_home, 'bin', 'nvcc')}"

    from torch.utils.cpp_extension import CUDAExtension

    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*/*.cu", root_dir=ROOT))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cutlass = _cutlass_include()
    if cutlass:
        include_dirs.append(cutlass)
    else:
        _log("nvidia-cutlass is not installed: CuTe/CUTLASS headers unavailable (pip install nvidia-cutlass).")
    defines = [f'-DMMKERNELS_CUDA_ARCHS="{archs}"']
    _log(f"building mmkernels._C for archs {archs} with {cuda_home}/bin/nvcc ({len(sources)} sources)")
    return CUDAExtension(
        name="mmkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            # No --use_fast_math: RoPE needs accurate sincosf for angles of hundreds of radians.
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--expt-extended-lambda"] + defines,
        },
    )


def main():
    ext = _cuda_extension()
    kwargs = {}
    if ext is not None:
        from torch.utils.cpp_extension import BuildExtension

        kwargs = {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}
    setup(**kwargs)


if __name__ == "__main__":
    main()
