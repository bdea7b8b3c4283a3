"""``RMSNorm`` module: a drop-in for apex ``FusedRMSNorm`` (the norm LaVin-DiT uses) on :func:`mmkernels.rms_norm`."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from mmkernels.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim of [..., N] inputs.

    Same state dict as apex ``FusedRMSNorm`` and ``torch.nn.RMSNorm``: one ``weight`` [N] (initialized to ones) when
    ``elementwise_affine``, nothing otherwise. As apex does, under autocast the input (and weight) are cast to the
    autocast dtype first, so a bf16-autocast model gets bf16 outputs with apex's rounding.
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-6,
                 elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(normalized_shape, int):
            shape = tuple(normalized_shape)
            if len(shape) != 1:
                raise ValueError(f"RMSNorm normalizes over the last dim only; normalized_shape must be an int or "
                                 f"a 1-tuple, got {shape}")
            normalized_shape = shape[0]
        self.normalized_shape = (int(normalized_shape),)
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
