"""``MSDeformAttn``: the Deformable-DETR multi-scale deformable attention module on :func:`mmkernels.ms_deform_attn`.

State-dict compatible with the module of the Deformable-DETR / Mask2Former / Unpair-Seg pixel decoders
(../shared/specs/unpair_seg.md §3.1): parameters ``sampling_offsets``, ``attention_weights``, ``value_proj``,
``output_proj`` (all ``nn.Linear``), the same initialization, and the same forward signature.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkernels.ops.ms_deform_attn import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels of queries and values (split over ``n_heads``; a head width that is not a power of two
            is allowed, with the same warning as the official module).
        n_levels: feature levels L; n_heads: heads H; n_points: sampling points P per head and level.
        deterministic: run a bitwise-repeatable backward (see :func:`mmkernels.ms_deform_attn`).
        fp32_sampling: compute ``sampling_offsets`` and ``attention_weights`` (two small linears) in fp32 even under
            autocast. A bf16 offset carries a rounding error of ~2^-9 of itself, and a location error times the
            spatial gradient of the value map dominated the bf16 error (measured: ~2% by norm for offsets of a few
            pixels on random features); in fp32 the only bf16 rounding left is that of the values.

    Kept for compatibility and ignored: ``im2col_step`` (the official CUDA op's batch chunking; our kernels have
    no batch-size constraint).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *,
                 deterministic: bool = False, fp32_sampling: bool = True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        head = d_model // n_heads
        if head & (head - 1) != 0:
            warnings.warn("MSDeformAttn: a head width (d_model / n_heads) that is a power of two is the most "
                          f"efficient; got {head}", stacklevel=2)
        self.im2col_step = 128
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.deterministic = deterministic
        self.fp32_sampling = fp32_sampling
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The official init: zero offset weights with a bias that points head h along the angle 2*pi*h/H (unit
        steps on the larger axis), point p at distance p + 1; zero attention logits; xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            query: [B, Lq, d_model].
            reference_points: [B, Lq, L, 2] (x, y) in [0, 1], or [B, Lq, L, 4] boxes (cx, cy, w, h).
            input_flatten: [B, S, d_model], the levels flattened row-major and concatenated.
            input_spatial_shapes: [L, 2] (H_l, W_l); input_level_start_index: [L].
            input_padding_mask: optional [B, S] bool, True where input_flatten is padding (its values are zeroed).

        Returns:
            [B, Lq, d_model].
        """
        B, Lq, _ = query.shape
        S = input_flatten.shape[1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.d_model // H)
        if self.fp32_sampling and (query.dtype != torch.float32 or torch.is_autocast_enabled(query.device.type)):
            with torch.autocast(query.device.type, enabled=False):
                q32 = query.float()
                offsets = F.linear(q32, self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float())
                logits = F.linear(q32, self.attention_weights.weight.float(), self.attention_weights.bias.float())
        else:
            offsets, logits = self.sampling_offsets(query), self.attention_weights(query)
        offsets = offsets.view(B, Lq, H, L, P, 2)
        attn = F.softmax(logits.view(B, Lq, H, L * P), -1).view(B, Lq, H, L, P)
        shapes = input_spatial_shapes.to(device=query.device)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1).to(offsets.dtype)  # (W_l, H_l)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("MSDeformAttn: reference_points must end in a dim of 2 (x, y) or 4 (cx, cy, w, h), got "
                             f"shape {tuple(reference_points.shape)}")
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, loc, attn.to(loc.dtype),
                             deterministic=self.deterministic)
        return self.output_proj(out)
