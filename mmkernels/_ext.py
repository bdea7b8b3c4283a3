"""Loading of the compiled extension ``mmkernels._C`` and what it was built for.

``C`` is the module, or None when it was not built (no nvcc or CPU-only torch at install time, or
MMKERNELS_BUILD_CUDA=0); ``C_ERROR`` then says why the import failed.
"""

from __future__ import annotations

from typing import Optional

try:
    from mmkernels import _C as C  # type: ignore[attr-defined]

    C_ERROR: Optional[str] = None
except ImportError as e:  # not built, or built against another torch
    C = None
    C_ERROR = str(e).splitlines()[0] if str(e) else type(e).__name__


def compiled_archs() -> list[str]:
    """The archs in TORCH_CUDA_ARCH_LIST at build time, e.g. ['8.0', '9.0a']; [] when _C is not built."""
    if C is None:
        return []
    return [a.strip() for a in C.cuda_archs().replace(",", ";").replace(" ", ";").split(";") if a.strip()]


def _arch_number(arch: str) -> tuple[int, int]:
    major, _, minor = arch.replace("+PTX", "").partition(".")
    return int(major), int(minor.rstrip("af") or 0)


def arch_runs_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a device of ``capability`` (major, minor).

    A cubin for sm_XY runs on sm_XZ with Z >= Y; arch-specific code (9.0a, 10.0f) only on that exact arch; PTX
    (``+PTX``) is JIT-compiled for any newer device.
    """
    for a in archs:
        major, minor = _arch_number(a)
        if (major, minor) == tuple(capability):
            return True
        if a.endswith("+PTX") and (major, minor) <= tuple(capability):
            return True
        specific = a.replace("+PTX", "").endswith(("a", "f"))
        if major == capability[0] and minor <= capability[1] and not specific:
            return True
    return False


def arch_supported(device) -> Optional[str]:
    """None when _C has code that runs on ``device``, else the reason."""
    import torch

    cap = torch.cuda.get_device_capability(device)
    if arch_runs_on(compiled_archs(), cap):
        return None
    name = torch.cuda.get_device_name(device)
    return (f"mmkernels._C was built for {';'.join(compiled_archs())}, not for {name} (sm_{cap[0]}{cap[1]}); "
            "rebuild with TORCH_CUDA_ARCH_LIST")


SM_KERNELS = ("auto", "sm80", "sm90")


def select_sm_kernel(op: str, env: str, choice: str, capability: tuple[int, int], archs) -> str:
    """Which of an op's two CUDA kernel families runs: "sm80" (mma.sync, any sm_80+ GPU) or "sm90" (wgmma, Hopper
    with 9.0a in the build). ``choice`` is the value of the op's environment variable ``env`` (one of SM_KERNELS;
    "auto" or empty picks sm90 wherever it can run); ``capability`` is the device's, ``archs`` the build's (e.g.
    ['8.0', '9.0a']). Asking for sm90 where it cannot run is a RuntimeError naming why; an unknown value a
    ValueError."""
    value = (choice or "auto").strip().lower()
    if value not in SM_KERNELS:
        raise ValueError(f"mmkernels.{op}: environment variable {env}={choice!r} is not one of "
                         f"{', '.join(SM_KERNELS)}")
    hopper = capability[0] == 9
    has_90a = any(a.strip().replace("+PTX", "") == "9.0a" for a in archs)
    if value == "auto":
        return "sm90" if hopper and has_90a else "sm80"
    if value == "sm90" and not (hopper and has_90a):
        why = (f"the device has compute capability {capability[0]}.{capability[1]}" if not hopper else
               f"mmkernels._C was built for {';'.join(archs) or 'no arch'}, without 9.0a")
        raise RuntimeError(f"mmkernels.{op}: {env}=sm90 asks for the Hopper (sm_90a) kernel, but {why}; it needs a "
                           "compute-capability-9.x GPU and 9.0a in TORCH_CUDA_ARCH_LIST")
    return value
