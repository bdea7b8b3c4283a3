"""Helpers shared by the Unpair-Seg model tests."""

import torch


def randomize_(module: torch.nn.Module, seed: int = 1, weight_scale: float = 0.02) -> None:
    """Random weights of a realistic scale, in place: the ConvNeXt layer scales (``gamma``, 1e-6 at init) and the
    zero biases would otherwise hide most of the trunk (and make every region alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * noise.abs())
            elif p.dim() <= 1:
                p.add_(0.1 * noise)
            else:
                p.add_(weight_scale * noise)
