"""Helpers for tests and benchmarks: tolerances, relative-norm comparison, random inputs, what runs where.

Errors are relative norms, ``||actual - expected|| / ||expected||`` computed in fp64. Tolerances per dtype follow
design.md §3.6: fp32 1e-4, fp16/bf16 1e-2. A NaN or inf that the expected value does not have never passes.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64; inf when actual has a non-finite value where expected does not."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        return float("inf")
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return 0.0
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                 tol: Optional[float] = None, what: str = "") -> float:
    """Assert rel_err(actual, expected) <= tol (default: the tolerance of ``dtype`` or of actual's dtype)."""
    tol = tol if tol is not None else tolerance(dtype or actual.dtype)
    err = rel_err(actual, expected)
    assert err <= tol, f"{what or 'tensor'}: relative error {err:.3e} > {tol:.1e} (shape {tuple(actual.shape)})"
    return err


def randn(shape: Sequence[int], dtype: torch.dtype = torch.float32, device="cpu",
          generator: Optional[torch.Generator] = None, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Standard-normal values (never zeros), made in fp32 on the CPU so every device sees the same numbers."""
    t = torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * scale + shift
    return t.to(device=device, dtype=dtype)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_devices() -> list[tuple[str, str]]:
    """(backend, device) pairs to test: torch on the CPU, Triton on the CPU under the interpreter, and every backend
    on CUDA (tests mark those ``gpu``, so they are skipped where there is no GPU)."""
    pairs = [("torch", "cpu")]
    if triton_interpreted():
        pairs.append(("triton", "cpu"))
    return pairs + [("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """Dtypes to test: fp32/fp16 everywhere, bf16 where the hardware has it (not the Triton CPU interpreter)."""
    out = [torch.float32, torch.float16]
    if device == "cuda" or backend == "torch":
        out.append(torch.bfloat16)
    return out
