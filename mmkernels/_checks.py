"""Input validation shared by the public op functions.

Every check raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape, size or value) with a
message that names the op, the argument and what was expected. The checks read only metadata, so they trace under
torch.compile without graph breaks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> torch.Tensor:
    """A floating-point tensor, optionally of exactly ``ndim`` or at least ``min_ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mmkernels.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mmkernels.{op}: argument '{name}' must be a floating-point tensor "
                        f"(float16, bfloat16, float32 or float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"mmkernels.{op}: argument '{name}' must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"mmkernels.{op}: argument '{name}' must have at least {min_ndim} dims, "
                         f"got shape {tuple(t.shape)}")
    return t


def same_device(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"mmkernels.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                         "they must be on the same device")


def finite_float(op: str, name: str, v, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"mmkernels.{op}: argument '{name}' must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"mmkernels.{op}: argument '{name}' must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"mmkernels.{op}: argument '{name}' must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"mmkernels.{op}: argument '{name}' must be >= 0, got {v}")
    return v


def int_triple(op: str, name: str, v, *, minimum: Optional[int] = None) -> tuple[int, int, int]:
    if isinstance(v, torch.Tensor) or not isinstance(v, Sequence) or len(v) != 3:
        raise TypeError(f"mmkernels.{op}: argument '{name}' must be a sequence of 3 ints, got {v!r}")
    out = []
    for i, e in enumerate(v):
        if isinstance(e, bool) or not isinstance(e, int):
            raise TypeError(f"mmkernels.{op}: argument '{name}[{i}]' must be an int, got {type(e).__name__}")
        if minimum is not None and e < minimum:
            raise ValueError(f"mmkernels.{op}: argument '{name}' must hold ints >= {minimum}, got {tuple(v)}")
        out.append(int(e))
    return out[0], out[1], out[2]
