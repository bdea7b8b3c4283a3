"""``MaskPooling`` module: a drop-in for Unpair-Seg's parameter-free ``MaskPooling`` on :func:`mmkernels.mask_pool`."""

from __future__ import annotations

import torch
from torch import nn

from mmkernels.ops.mask_pool import mask_pool


class MaskPooling(nn.Module):
    """Masked average of features under mask logits: ``forward(x [B, C, H, W], mask [B, Q, h, w]) -> [B, Q, C]``.

    The official module (../shared/specs/unpair_seg.md §6) resizes the logits to (H, W) (bilinear,
    align_corners=False, skipped when equal), binarizes sigmoid >= 0.5 without grad and returns the masked mean
    with +1e-8; ``mode="official"`` (the default) is exactly that, and "hard"/"soft" are the variants of
    :func:`mmkernels.mask_pool`. No parameters, no state dict entries.

    Under autocast the module follows what autocast does to the official composition: the einsum runs in the
    autocast dtype (so x is cast to it and the output has it), and F.interpolate runs in fp32 (so logits that need
    a resize are read as fp32, without rounding to their own dtype).
    """

    def __init__(self, mode: str = "official", threshold: float = 0.0, eps: float = 1e-8):
        super().__init__()
        self.mode = mode
        self.threshold = float(threshold)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
            if isinstance(mask, torch.Tensor) and mask.dim() == 4 and x.dim() == 4 and \
                    tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):
                mask = mask.float()
        return mask_pool(x, mask, mode=self.mode, threshold=self.threshold, eps=self.eps)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, threshold={self.threshold}, eps={self.eps}"
