"""Small layers shared by the Unpair-Seg modules, with the official attribute names (so state-dict keys match).

* :class:`PositionEmbeddingRandom`: SAM-style random-Fourier encoding (spec §2): for normalised coords ``c`` in
  [0, 1], ``z = 2π (2c − 1) @ G`` with ``G`` the persistent buffer ``positional_encoding_gaussian_matrix``
  [2, F] (N(0, 1) at init; its values come from the checkpoint), and the encoding is ``cat(sin z, cos z)`` (2F).
* :class:`LayerNorm2d`: channel LayerNorm of an NCHW map (biased variance), per-channel affine.
* :class:`Conv2d`: detectron2's ``Conv2d(norm=..., activation=...)``: conv, then the child ``norm``, then the
  activation (keys ``<name>.weight``, ``<name>.norm.weight``, ...).
* :class:`MLP`: ``layers`` ModuleList of Linears with ReLU between (Mask2Former's MLP).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding with ``num_pos_feats`` frequencies (output 2 * num_pos_feats channels)."""

    def __init__(self, num_pos_feats: int = 128, scale: Optional[float] = None):
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0 else float(scale)
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [..., 2] (x, y) normalised to [0, 1] -> [..., 2F]."""
        g = self.positional_encoding_gaussian_matrix
        z = (2 * math.pi) * ((2 * coords.to(g.dtype) - 1) @ g)
        return torch.cat([torch.sin(z), torch.cos(z)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """The encoding of an (h, w) grid at pixel centres: [2F, h, w]."""
        h, w = int(size[0]), int(size[1])
        g = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        x = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        coords = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(coords).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords [..., 2] (x, y) in pixels of an image of ``image_size`` (h, w) -> [..., 2F]."""
        c = coords.clone().to(self.positional_encoding_gaussian_matrix.dtype)
        c[..., 0] = c[..., 0] / image_size[1]
        c[..., 1] = c[..., 1] / image_size[0]
        return self._pe_encoding(c)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of [N, C, H, W]: (x − mean) / sqrt(biased var + eps), then weight/bias per C."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` child module and an optional activation (detectron2's)."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, activation: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(module: nn.Module) -> None:
    """fvcore's c2_xavier_fill: kaiming_uniform(a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class MLP(nn.Module):
    """``num_layers`` Linears (in -> hidden -> ... -> out) with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x
